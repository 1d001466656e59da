//! The HBONE client: opens CONNECT streams from a local identity to a peer's HBONE
//! address, checking that the peer is the identity expected, on pooled connections.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::SeqCst},
        Arc, Weak,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, Instrument};

use super::{
    pool::{Checkout, Conn, Pool, PoolKey, PoolLimits, StreamGuard},
    HboneError, HboneStream, CONNECTION_WINDOW, DEFAULT_CONNECT_TIMEOUT, MAX_FRAME_SIZE,
    MAX_HEADER_LIST_SIZE, MAX_SEND_BUFFER, STREAM_WINDOW, TLS_SEND_BUFFER,
};
use crate::identity::{
    tls::{self, MeshTls},
    SpiffeId,
};

#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// TCP connect, TLS and HTTP/2 handshakes and the answer to the CONNECT, together.
    pub connect_timeout: Duration,
    /// A connection without streams for this long is closed.
    pub idle_timeout: Duration,
    /// Connections per (source identity, destination, destination identity).
    pub max_connections_per_key: usize,
    /// Connections in all.
    pub max_connections: usize,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            // ztunnel's pool closes idle connections after 10 minutes... ours: 60 s.
            idle_timeout: Duration::from_secs(60),
            max_connections_per_key: 16,
            max_connections: 1024,
        }
    }
}

pub struct HboneClient {
    tls: Arc<MeshTls>,
    opts: ClientOptions,
    pool: Pool,
    next_id: AtomicU64,
}

impl std::fmt::Debug for HboneClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneClient")
            .field("opts", &self.opts)
            .field("connections", &self.pool.len())
            .finish_non_exhaustive()
    }
}

impl HboneClient {
    /// A client and its idle sweeper (a task on the current runtime that ends with the
    /// client).
    pub fn new(tls: Arc<MeshTls>, opts: ClientOptions) -> Arc<HboneClient> {
        let client = Arc::new(HboneClient {
            tls,
            opts,
            pool: Pool::new(PoolLimits {
                max_per_key: opts.max_connections_per_key.max(1),
                max_total: opts.max_connections.max(1),
                idle_timeout: opts.idle_timeout,
            }),
            next_id: AtomicU64::new(1),
        });
        let weak: Weak<HboneClient> = Arc::downgrade(&client);
        let period = (opts.idle_timeout / 2).max(Duration::from_millis(100));
        tokio::spawn(
            async move {
                let mut tick = tokio::time::interval(period);
                loop {
                    tick.tick().await;
                    let Some(c) = weak.upgrade() else { return };
                    c.pool.sweep(Instant::now());
                }
            }
            .instrument(tracing::debug_span!("hbone_pool_sweeper")),
        );
        client
    }

    /// Connections held (dials in progress included).
    pub fn connections(&self) -> usize {
        self.pool.len()
    }

    /// Opens a tunnel as `src` to `authority` (the original destination) through the
    /// HBONE endpoint `dst_hbone`, which must prove it is `dst_id`. Any answer but 200 is
    /// an error carrying the status (`HboneError::status`).
    pub async fn connect(
        &self,
        src: &SpiffeId,
        dst_hbone: SocketAddr,
        dst_id: &SpiffeId,
        authority: SocketAddr,
    ) -> Result<HboneStream, HboneError> {
        self.connect_from(src, None, dst_hbone, dst_id, authority)
            .await
    }

    /// `connect`, naming the source workload's address (`ip:port` of the connection the
    /// stream carries) in a `Forwarded: for=` header, as ztunnel does: the destination's
    /// agent judges ipBlocks by it if the address belongs to a workload of the identity
    /// this stream is opened as (`proxy::authz::tunnel_source`).
    pub async fn connect_from(
        &self,
        src: &SpiffeId,
        source: Option<SocketAddr>,
        dst_hbone: SocketAddr,
        dst_id: &SpiffeId,
        authority: SocketAddr,
    ) -> Result<HboneStream, HboneError> {
        self.connect_naming(src, source.map(forwarded_for), dst_hbone, dst_id, authority)
            .await
    }

    /// `connect`, naming the source workload by its address only (`Forwarded: for=ip`):
    /// for a stream that carries requests of several of that workload's connections (the
    /// L7 engine's pooled upstream connections), where no one source port is right.
    pub async fn connect_from_ip(
        &self,
        src: &SpiffeId,
        source: IpAddr,
        dst_hbone: SocketAddr,
        dst_id: &SpiffeId,
        authority: SocketAddr,
    ) -> Result<HboneStream, HboneError> {
        self.connect_naming(
            src,
            Some(forwarded_for_ip(source)),
            dst_hbone,
            dst_id,
            authority,
        )
        .await
    }

    async fn connect_naming(
        &self,
        src: &SpiffeId,
        forwarded: Option<http::HeaderValue>,
        dst_hbone: SocketAddr,
        dst_id: &SpiffeId,
        authority: SocketAddr,
    ) -> Result<HboneStream, HboneError> {
        let after = self.opts.connect_timeout;
        tokio::time::timeout(
            after,
            self.open(src, forwarded, dst_hbone, dst_id, authority),
        )
        .await
        .map_err(|_| HboneError::Timeout {
            addr: dst_hbone,
            after,
        })?
    }

    async fn open(
        &self,
        src: &SpiffeId,
        forwarded: Option<http::HeaderValue>,
        dst_hbone: SocketAddr,
        dst_id: &SpiffeId,
        authority: SocketAddr,
    ) -> Result<HboneStream, HboneError> {
        // On demand: the first stream of an identity waits for its certificate.
        self.tls
            .certificates()
            .get(src)
            .await
            .map_err(|source| HboneError::NoCertificate {
                id: src.to_string(),
                source,
            })?;
        let key = PoolKey {
            src: src.clone(),
            dst: dst_hbone,
            dst_id: dst_id.clone(),
        };
        // A pooled connection may have been closed by the peer (GOAWAY) since it was
        // last used: then a fresh one, once.
        let mut pooled_failed = false;
        loop {
            let (guard, pooled) = match self.pool.checkout(&key)? {
                Checkout::Ready(g) => (g, true),
                Checkout::Dial(r) => (self.pool.insert(r, self.dial(&key).await?), false),
            };
            match request(&guard, dst_hbone, authority, forwarded.as_ref()).await {
                Ok((send, recv)) => return Ok(HboneStream::new(send, recv, Some(Arc::new(guard)))),
                Err(Failure::NotSent(e)) => {
                    guard.0.closed.store(true, SeqCst);
                    if pooled && !pooled_failed {
                        debug!(conn = guard.0.id, error = %e, "pooled HBONE connection unusable, dialling anew");
                        pooled_failed = true;
                        continue;
                    }
                    return Err(HboneError::H2 {
                        addr: dst_hbone,
                        source: e,
                    });
                }
                Err(Failure::Other(e)) => return Err(e),
            }
        }
    }

    async fn dial(&self, key: &PoolKey) -> Result<Conn, HboneError> {
        let addr = key.dst;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| HboneError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let config = self.tls.client_config(&key.src, &key.dst_id)?;
        let mut tls_stream = TlsConnector::from(config)
            .connect(tls::server_name(), tcp)
            .await
            .map_err(|source| HboneError::Tls { addr, source })?;
        tls_stream
            .get_mut()
            .1
            .set_buffer_limit(Some(TLS_SEND_BUFFER));
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .enable_push(false)
            .handshake::<_, Bytes>(tls_stream)
            .await
            .map_err(|source| HboneError::H2 { addr, source })?;
        let id = self.next_id.fetch_add(1, SeqCst);
        let closed = Arc::new(AtomicBool::new(false));
        let done = closed.clone();
        tokio::spawn(
            async move {
                if let Err(e) = conn.await {
                    debug!(error = %e, "HBONE connection ended");
                }
                done.store(true, SeqCst);
            }
            .instrument(tracing::debug_span!("hbone_client_conn", id, peer = %addr)),
        );
        debug!(id, peer = %addr, src = %key.src, dst_id = %key.dst_id, "HBONE connection up");
        Ok(Conn::new(id, send, closed))
    }
}

enum Failure {
    /// The connection failed before the request left: safe to try another connection.
    NotSent(h2::Error),
    Other(HboneError),
}

/// `Forwarded: for="<ip:port>"` (RFC 7239; quoted, as `:` and `[` require).
pub fn forwarded_for(source: SocketAddr) -> http::HeaderValue {
    http::HeaderValue::try_from(format!("for=\"{source}\""))
        .expect("a socket address is a valid header value")
}

/// `Forwarded: for=<ip>` (RFC 7239: an IPv6 address bracketed and quoted).
pub fn forwarded_for_ip(source: IpAddr) -> http::HeaderValue {
    let v = match source {
        IpAddr::V4(ip) => format!("for={ip}"),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
    };
    http::HeaderValue::try_from(v).expect("an IP address is a valid header value")
}

/// The HTTP/2 `CONNECT` of one stream: `authority` (`ip:port`, ztunnel's wire format),
/// and the source's address in `Forwarded`.
pub(super) fn connect_request(
    authority: &str,
    forwarded: Option<&http::HeaderValue>,
) -> http::Request<()> {
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority)
        .version(http::Version::HTTP_2)
        .body(())
        .expect("a valid CONNECT request");
    if let Some(f) = forwarded {
        req.headers_mut().insert(http::header::FORWARDED, f.clone());
    }
    req
}

async fn request(
    guard: &StreamGuard,
    addr: SocketAddr,
    authority: SocketAddr,
    forwarded: Option<&http::HeaderValue>,
) -> Result<(h2::SendStream<Bytes>, h2::RecvStream), Failure> {
    let mut send = guard
        .0
        .send
        .clone()
        .ready()
        .await
        .map_err(Failure::NotSent)?;
    let req = connect_request(&authority.to_string(), forwarded);
    let (response, stream) = send.send_request(req, false).map_err(Failure::NotSent)?;
    let h2_err = |source| Failure::Other(HboneError::H2 { addr, source });
    let response = response.await.map_err(h2_err)?;
    let status = response.status();
    if status != http::StatusCode::OK {
        return Err(Failure::Other(HboneError::Status {
            addr,
            authority,
            status,
        }));
    }
    Ok((stream, response.into_body()))
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::proxy::hbone::parse_forwarded_for;

    #[test]
    fn a_source_named_by_address_only_reads_back_as_that_address() {
        for (ip, text) in [
            ("10.0.0.1", "for=10.0.0.1"),
            ("fd00::1", r#"for="[fd00::1]""#),
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let v = forwarded_for_ip(ip);
            assert_eq!(v, text);
            let mut h = http::HeaderMap::new();
            h.insert(http::header::FORWARDED, v);
            assert_eq!(parse_forwarded_for(&h), Some(ip));
        }
    }
}
