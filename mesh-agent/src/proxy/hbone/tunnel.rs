//! What both ends of the tunnel share: limits, errors, and the relay between a TCP
//! connection and a tunnel stream.

use std::{
    collections::VecDeque,
    io::{self, IoSlice},
    net::SocketAddr,
    os::fd::AsFd,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use futures_util::FutureExt;
use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};

use super::HboneStream;
use crate::{
    metrics::{istio::TcpSeries, FlowCounters},
    proxy::relay_buffers::Buffer,
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
/// Encrypted bytes rustls may hold for the socket (rustls' default is 64 KiB): a whole
/// DATA frame of `MAX_FRAME_SIZE` and its header go out in one write, not the frame and
/// then its last 9 bytes in a record and a write of their own.
pub const TLS_SEND_BUFFER: usize = 256 * 1024;
/// Bytes h2 may buffer per stream waiting to be sent.
pub const MAX_SEND_BUFFER: usize = 256 * 1024;
/// Streams a server accepts at once on one connection (ztunnel's figure); clients open
/// another connection beyond the peer's limit.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;
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
/// Istio series). The splice of upgraded HTTP connections (`secure::http::upgrade`).
///
/// A silent connection holds no relay buffer: the wait for bytes reads into a small one,
/// and a pooled buffer (`proxy::relay_buffers`, the L4 relay's) is taken only while reads
/// keep finding bytes.
pub async fn pipe<R, W>(
    mut r: R,
    mut w: W,
    count: &AtomicU64,
    istio: Option<&Counter>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let add = |n: usize| {
        count.fetch_add(n as u64, Relaxed);
        if let Some(c) = istio {
            c.inc_by(n as u64);
        }
    };
    let mut first = [0u8; WAIT_BUFFER];
    loop {
        let n = r.read(&mut first).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(());
        }
        w.write_all(&first[..n]).await?;
        add(n);
        if n < first.len() {
            continue;
        }
        // More may be waiting: read on with a pooled buffer while reads are ready at once.
        let mut buf = Buffer::take();
        while let Some(read) = r.read(&mut buf).now_or_never() {
            let n = read?;
            if n == 0 {
                drop(buf);
                w.shutdown().await?;
                return Ok(());
            }
            w.write_all(&buf[..n]).await?;
            add(n);
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
    mut tunnel: HboneStream,
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
    let up = Tally {
        shared: from_tcp,
        own: moved.0,
        istio: istio_from_tcp,
    };
    let down = Tally {
        shared: from_tunnel,
        own: moved.1,
        istio: istio_from_tunnel,
    };
    let mut state = RelayState::default();
    if !tunnel.buf.is_empty() {
        // Read from the stream before the relay began (not the case today).
        let b = std::mem::take(&mut tunnel.buf);
        state.down_bytes = b.len();
        state.down.push_back(b);
    }
    // On an error, returning drops the tunnel before both its directions ended (which
    // resets it) and the socket still armed (which resets it too).
    std::future::poll_fn(|cx| poll_relay(cx, &mut tcp, &mut tunnel, &mut state, &up, &down))
        .await?;
    // Both directions ended cleanly: a normal close.
    let _ = sys::clear_linger(tcp.as_fd());
    Ok(())
}

/// Where one direction's bytes are counted as they go.
struct Tally<'a> {
    /// The series' counter (shared by many connections).
    shared: &'a AtomicU64,
    /// This connection's.
    own: &'a AtomicU64,
    istio: Option<&'a Counter>,
}

impl Tally<'_> {
    fn add(&self, n: usize) {
        self.shared.fetch_add(n as u64, Relaxed);
        self.own.fetch_add(n as u64, Relaxed);
        if let Some(c) = self.istio {
            c.inc_by(n as u64);
        }
    }
}

/// Received from the tunnel and not yet written to the TCP side, at most (bytes): one
/// vectored write takes what arrived together.
const DOWN_BATCH: usize = 256 * 1024;
/// Read from the TCP side and not yet handed to the stream, at most (bytes).
const UP_BATCH: usize = MAX_FRAME_SIZE as usize;
/// Slices in one vectored write.
const DOWN_SLICES: usize = 16;
/// What `pipe` waits for bytes with (bytes).
const WAIT_BUFFER: usize = 1024;

#[derive(Default)]
struct RelayState {
    /// Read from the TCP side, not yet handed to the stream: one chunk per read.
    up: VecDeque<Bytes>,
    up_bytes: usize,
    /// The TCP side's FIN was read (END_STREAM goes with the last of `up`).
    fin: bool,
    /// Taken from the stream, not yet written to the TCP side (flow-control capacity is
    /// released as they are written, so a slow TCP reader slows the sender).
    down: VecDeque<Bytes>,
    down_bytes: usize,
    /// FIN passed on to the TCP side.
    down_done: bool,
}

/// A pooled buffer's first `len` bytes, as the owner of a `Bytes`: the bytes read from the
/// TCP side go to h2 without a copy, and the buffer returns to its pool once h2 has
/// written them (and dropped its handle).
struct Filled(Buffer, usize);

impl AsRef<[u8]> for Filled {
    fn as_ref(&self) -> &[u8] {
        &self.0[..self.1]
    }
}

/// Reads shorter than this are copied out of the pooled buffer (which goes back to the
/// pool at once) rather than lent to h2 with it (bytes): what h2 holds waiting for
/// flow-control capacity (`MAX_SEND_BUFFER` a stream) then takes at most twice its size
/// in buffers, and small messages hold no 32 KiB buffer.
const LEND_MIN: usize = 16 * 1024;

/// TCP -> tunnel: reads while the socket has bytes, up to `UP_BATCH` queued, each read's
/// bytes one chunk (one DATA frame); a read that does not fill the buffer drained the
/// socket, and it is read again only if it has news already (a FIN that came with the
/// bytes), which costs no syscall to find out.
fn read_up(
    cx: &mut Context<'_>,
    tcp: &mut TcpStream,
    st: &mut RelayState,
    progress: &mut bool,
) -> io::Result<()> {
    while st.up_bytes < UP_BATCH {
        let mut buf = Buffer::take();
        let cap = buf.len();
        let mut rb = ReadBuf::new(&mut buf);
        let Poll::Ready(r) = Pin::new(&mut *tcp).poll_read(cx, &mut rb) else {
            break;
        };
        r?;
        *progress = true;
        let n = rb.filled().len();
        if n == 0 {
            // FIN: END_STREAM, on the last bytes' frame if they came with it.
            st.fin = true;
            break;
        }
        let chunk = if n < LEND_MIN {
            Bytes::copy_from_slice(&buf[..n])
        } else {
            Bytes::from_owner(Filled(buf, n))
        };
        st.up_bytes += n;
        st.up.push_back(chunk);
        if n < cap && tcp.poll_read_ready(cx).is_pending() {
            break;
        }
    }
    Ok(())
}

/// Both directions of a tunnel relay in one future, so one wake-up serves whichever side
/// is ready, with no split lock between them. TCP -> tunnel: a pooled buffer
/// (`proxy::relay_buffers`) is taken only while the socket has bytes, and a large read's
/// buffer itself becomes the DATA frame's payload (`read_up`), no copy; tunnel -> TCP:
/// the frames' own buffers are written (vectored), no copy. Ready once both directions
/// ended cleanly.
fn poll_relay(
    cx: &mut Context<'_>,
    tcp: &mut TcpStream,
    t: &mut HboneStream,
    st: &mut RelayState,
    up: &Tally<'_>,
    down: &Tally<'_>,
) -> Poll<io::Result<()>> {
    loop {
        let mut progress = false;
        // TCP -> tunnel.
        if !t.write_closed {
            if st.up.is_empty() && !st.fin {
                read_up(cx, tcp, st, &mut progress)?;
            }
            if st.fin && st.up.is_empty() {
                // END_STREAM alone (nothing came with the FIN).
                t.send
                    .send_data(Bytes::new(), true)
                    .map_err(super::stream::reset_error)?;
                t.write_closed = true;
                progress = true;
            }
            if !st.up.is_empty() {
                t.send.reserve_capacity(st.up_bytes);
                loop {
                    let have = t.send.capacity();
                    if have > 0 {
                        let front = st.up.front_mut().expect("bytes queued");
                        let chunk = if have >= front.len() {
                            st.up.pop_front().expect("bytes queued")
                        } else {
                            front.split_to(have)
                        };
                        let n = chunk.len();
                        st.up_bytes -= n;
                        // The last bytes before a FIN carry END_STREAM.
                        let end = st.fin && st.up.is_empty();
                        t.send
                            .send_data(chunk, end)
                            .map_err(super::stream::reset_error)?;
                        up.add(n);
                        progress = true;
                        if end {
                            t.write_closed = true;
                        }
                        if st.up.is_empty() {
                            break;
                        }
                        continue;
                    }
                    match t.send.poll_capacity(cx) {
                        Poll::Ready(Some(Ok(_))) => continue,
                        Poll::Ready(Some(Err(e))) => {
                            return Poll::Ready(Err(super::stream::reset_error(e)))
                        }
                        Poll::Ready(None) => {
                            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
                        }
                        Poll::Pending => {
                            // A reset from the peer ends the wait for capacity.
                            if let Poll::Ready(r) = t.send.poll_reset(cx) {
                                return Poll::Ready(Err(match r {
                                    Ok(reason) => io::Error::new(
                                        io::ErrorKind::ConnectionReset,
                                        h2::Error::from(reason),
                                    ),
                                    Err(e) => super::stream::reset_error(e),
                                }));
                            }
                            break;
                        }
                    }
                }
            }
        }
        // Tunnel -> TCP.
        if !st.down_done {
            while !t.read_eof && st.down_bytes < DOWN_BATCH {
                match t.recv.poll_data(cx) {
                    Poll::Ready(Some(Ok(b))) => {
                        progress = true;
                        if !b.is_empty() {
                            st.down_bytes += b.len();
                            st.down.push_back(b);
                        }
                    }
                    Poll::Ready(Some(Err(e))) => {
                        return Poll::Ready(Err(super::stream::reset_error(e)))
                    }
                    Poll::Ready(None) => {
                        progress = true;
                        t.read_eof = true;
                    }
                    Poll::Pending => break,
                }
            }
            while !st.down.is_empty() {
                let mut slices = [IoSlice::new(&[]); DOWN_SLICES];
                let k = st.down.len().min(DOWN_SLICES);
                for (s, b) in slices.iter_mut().zip(st.down.iter()) {
                    *s = IoSlice::new(b);
                }
                let written = if k == 1 {
                    Pin::new(&mut *tcp).poll_write(cx, &st.down[0])
                } else {
                    Pin::new(&mut *tcp).poll_write_vectored(cx, &slices[..k])
                };
                let Poll::Ready(r) = written else { break };
                let mut n = r?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                progress = true;
                st.down_bytes -= n;
                let _ = t.recv.flow_control().release_capacity(n);
                down.add(n);
                while n > 0 {
                    let front = st.down.front_mut().expect("written bytes were queued");
                    if n >= front.len() {
                        n -= front.len();
                        st.down.pop_front();
                    } else {
                        front.advance(n);
                        n = 0;
                    }
                }
            }
            if st.down.is_empty() && t.read_eof {
                // END_STREAM: FIN.
                ready!(Pin::new(&mut *tcp).poll_shutdown(cx))?;
                st.down_done = true;
                progress = true;
            }
        }
        if t.write_closed && st.down_done {
            return Poll::Ready(Ok(()));
        }
        if !progress {
            return Poll::Pending;
        }
    }
}
