//! What both ends of the tunnel share: limits, errors, and the relay between a TCP
//! connection and a tunnel stream.

use std::{
    io,
    net::SocketAddr,
    os::fd::AsFd,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use super::HboneStream;
use crate::{
    metrics::{istio::TcpSeries, FlowCounters},
    sys,
};

/// The HBONE port (ztunnel's, Istio's `15008`).
pub const HBONE_PORT: u16 = 15008;

/// HTTP/2 flow-control window of one stream (bytes): bounds what a peer may send ahead
/// of our reads on one tunnel.
pub const STREAM_WINDOW: u32 = 1024 * 1024;
/// HTTP/2 flow-control window of a connection (bytes): bounds all its streams together.
pub const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// Largest DATA frame accepted (bytes).
pub const MAX_FRAME_SIZE: u32 = 64 * 1024;
/// Largest header block accepted (bytes): a CONNECT carries a handful of short headers.
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// Bytes h2 may buffer per stream waiting to be sent.
pub const MAX_SEND_BUFFER: usize = 256 * 1024;
/// Streams a server accepts at once on one connection (ztunnel's figure); clients open
/// another connection beyond the peer's limit.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;
/// Relay buffer per direction (bytes).
pub const RELAY_BUFFER: usize = 32 * 1024;
/// TCP connect plus TLS handshake towards a peer, and the wait for its answer to a
/// CONNECT.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error(
        "HBONE connection to {addr} failed: {source} (maybe a NetworkPolicy or firewall \
         blocks HBONE port 15008?)"
    )]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("HBONE connection to {addr} timed out after {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("TLS with {addr} failed: {source}")]
    Tls { addr: SocketAddr, source: io::Error },
    #[error("HTTP/2 with {addr}: {source}")]
    H2 { addr: SocketAddr, source: h2::Error },
    #[error("no certificate for local identity {id}: {source}")]
    NoCertificate {
        id: String,
        source: crate::identity::IdentityError,
    },
    #[error("TLS configuration: {0}")]
    Config(#[from] crate::identity::tls::TlsError),
    #[error("{addr} answered CONNECT {authority} with status {status}")]
    Status {
        addr: SocketAddr,
        authority: SocketAddr,
        status: http::StatusCode,
    },
    #[error(
        "HBONE pool full ({0} connections, all busy): raise the pool's caps or wait for \
         connections to close"
    )]
    PoolFull(usize),
}

impl HboneError {
    /// The HTTP status a peer refused a CONNECT with, if that is what happened.
    pub fn status(&self) -> Option<http::StatusCode> {
        match self {
            HboneError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl From<HboneError> for io::Error {
    fn from(e: HboneError) -> io::Error {
        let kind = match &e {
            HboneError::Timeout { .. } => io::ErrorKind::TimedOut,
            HboneError::Status { status, .. } if *status == http::StatusCode::FORBIDDEN => {
                io::ErrorKind::PermissionDenied
            }
            HboneError::Status { .. } | HboneError::Connect { .. } => {
                io::ErrorKind::ConnectionRefused
            }
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// Which workload the TCP side of `relay_tunnel` is, for `FlowCounters`' directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpSide {
    /// The client workload (outbound, the tunnel leads to the destination).
    Source,
    /// The destination workload (inbound, the tunnel comes from the source).
    Destination,
}

/// Copies `r` to `w` until `r` ends, then shuts `w` down; counted in `count` (and an
/// Istio series). Also the splice of upgraded HTTP connections (`secure::http::upgrade`).
pub async fn pipe<R, W>(r: R, w: W, count: &AtomicU64, istio: Option<&Counter>) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    pipe_counted(r, w, count, &AtomicU64::new(0), istio).await
}

/// `pipe`, also counting into `moved`: this one connection's bytes (the shared `count`
/// sums many), kept as they go so a relay that ends in an error still knows them.
async fn pipe_counted<R, W>(
    mut r: R,
    mut w: W,
    count: &AtomicU64,
    moved: &AtomicU64,
    istio: Option<&Counter>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUFFER];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        count.fetch_add(n as u64, Relaxed);
        moved.fetch_add(n as u64, Relaxed);
        if let Some(c) = istio {
            c.inc_by(n as u64);
        }
    }
}

/// Relays between a TCP connection and a tunnel stream until both directions ended.
///
/// A clean end of either side is passed on as a half-close (FIN -> END_STREAM and back).
/// An error on either side resets both: the TCP socket is armed with `SO_LINGER 0` for as
/// long as the relay runs (dropping it then sends RST), and the `HboneStream` dropped
/// before both its directions ended sends RST_STREAM. So a relay cut short (an error, the
/// task aborted at the end of a drain) is seen as a reset on both sides, never as a clean
/// close short of bytes. Returns the first error.
pub async fn relay_tunnel(
    tcp: TcpStream,
    tunnel: HboneStream,
    counters: &FlowCounters,
    side: TcpSide,
) -> io::Result<()> {
    relay_tunnel_counted(tcp, tunnel, counters, side, None)
        .await
        .result
}

/// What one tunnel relay moved, and how it ended.
#[derive(Debug)]
pub struct TunnelEnd {
    /// Bytes read from the TCP side and sent into the tunnel.
    pub from_tcp: u64,
    /// Bytes read from the tunnel and written to the TCP side.
    pub from_tunnel: u64,
    /// The first error (the relay then reset both sides), or a clean end.
    pub result: io::Result<()>,
}

/// `relay_tunnel`, counting into the connection's Istio series too as bytes flow (the
/// source side's series: `received` from the TCP side, `sent` to it), and returning this
/// connection's bytes each way (for its access-log line).
pub async fn relay_tunnel_counted(
    tcp: TcpStream,
    tunnel: HboneStream,
    counters: &FlowCounters,
    side: TcpSide,
    istio: Option<&TcpSeries>,
) -> TunnelEnd {
    let (from_tcp, from_tunnel) = (AtomicU64::new(0), AtomicU64::new(0));
    let result = relay_tunnel_inner(
        tcp,
        tunnel,
        counters,
        side,
        istio,
        (&from_tcp, &from_tunnel),
    )
    .await;
    TunnelEnd {
        from_tcp: from_tcp.into_inner(),
        from_tunnel: from_tunnel.into_inner(),
        result,
    }
}

async fn relay_tunnel_inner(
    mut tcp: TcpStream,
    tunnel: HboneStream,
    counters: &FlowCounters,
    side: TcpSide,
    istio: Option<&TcpSeries>,
    moved: (&AtomicU64, &AtomicU64),
) -> io::Result<()> {
    let _ = sys::set_linger_zero(tcp.as_fd());
    let (from_tcp, from_tunnel) = match side {
        TcpSide::Source => (&counters.received, &counters.sent),
        TcpSide::Destination => (&counters.sent, &counters.received),
    };
    let (istio_from_tcp, istio_from_tunnel) = match (istio, side) {
        (None, _) => (None, None),
        (Some(i), TcpSide::Source) => (Some(&i.received), Some(&i.sent)),
        (Some(i), TcpSide::Destination) => (Some(&i.sent), Some(&i.received)),
    };
    {
        let (tr, tw) = tcp.split();
        let (hr, hw) = tokio::io::split(tunnel);
        let up = pipe_counted(tr, hw, from_tcp, moved.0, istio_from_tcp);
        let down = pipe_counted(hr, tw, from_tunnel, moved.1, istio_from_tunnel);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        while !(up_done && down_done) {
            // On an error, returning drops the tunnel's halves before both ended (which
            // resets it) and the socket still armed (which resets it too).
            tokio::select! {
                r = &mut up, if !up_done => { up_done = true; r?; }
                r = &mut down, if !down_done => { down_done = true; r?; }
            }
        }
    }
    // Both directions ended cleanly: a normal close.
    let _ = sys::clear_linger(tcp.as_fd());
    Ok(())
}
