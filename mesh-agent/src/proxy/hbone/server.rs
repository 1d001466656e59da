//! The HBONE server: accepts mutual TLS on 15008, HTTP/2 on top, and for each `CONNECT`
//! to a valid `ip:port` asks the `ConnectHandler` (policy, then the dial), answers 200 and
//! relays (telling the handler how the relay ended when it asks, `Opened::Reported`: the
//! destination's telemetry), or hands the stream to the handler (`Opened::Serve`); a
//! refusal is answered with its status.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{atomic::Ordering::Relaxed, Arc},
    time::Duration,
};

use bytes::Bytes;
use futures_util::{stream::FuturesUnordered, StreamExt};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn, Instrument};

use super::{
    relay_tunnel, HboneStream, TcpSide, CONNECTION_WINDOW, MAX_CONCURRENT_STREAMS, MAX_FRAME_SIZE,
    MAX_HEADER_LIST_SIZE, MAX_SEND_BUFFER, STREAM_WINDOW, TLS_SEND_BUFFER,
};
use crate::{
    identity::{tls::peer_identity, BoxFuture, SpiffeId},
    lifecycle::drain::DrainWatch,
    metrics::FlowCounters,
    proxy::inbound::telemetry::ConnEnd,
};

/// The authenticated peer of a tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The SPIFFE ID of the peer's verified client certificate.
    pub identity: SpiffeId,
    /// The peer's TCP address (its node).
    pub addr: SocketAddr,
    /// The source address this stream's CONNECT names (`Forwarded: for=`), as the peer
    /// claims it: not checked here (`proxy::authz::tunnel_source` decides whether it is
    /// believed).
    pub forwarded_for: Option<IpAddr>,
}

/// The address in the first `for=` of a `Forwarded` header (RFC 7239): `ip`, `"ip:port"`,
/// `"[v6]"` or `"[v6]:port"`. Obfuscated identifiers (`_hidden`, `unknown`) and anything
/// unreadable: `None`.
pub fn parse_forwarded_for(headers: &http::HeaderMap) -> Option<IpAddr> {
    let value = headers.get(http::header::FORWARDED)?.to_str().ok()?;
    let first = value.split(',').next()?;
    let node = first.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        k.trim().eq_ignore_ascii_case("for").then(|| v.trim())
    })?;
    let node = node
        .strip_prefix('"')
        .and_then(|n| n.strip_suffix('"'))
        .unwrap_or(node);
    if let Ok(sa) = node.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    if let Some(v6) = node.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    node.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// Why a CONNECT was not opened; `status` is what the peer gets (403 denied by policy,
/// 503 or 502 destination unreachable).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status}: {reason}")]
pub struct Refusal {
    pub status: http::StatusCode,
    pub reason: String,
}

impl Refusal {
    pub fn new(status: http::StatusCode, reason: impl Into<String>) -> Refusal {
        Refusal {
            status,
            reason: reason.into(),
        }
    }
}

/// Serves an opened tunnel's bytes itself (`Opened::Serve`): e.g. terminates HTTP on it.
/// The future owns the stream; dropping it before both directions ended resets it.
pub type ServeTunnel = Box<dyn FnOnce(HboneStream) -> BoxFuture<'static, ()> + Send>;

/// Told how a relayed tunnel ended (its bytes each way, the error that cut it): the
/// destination's telemetry (`proxy::inbound::telemetry`).
pub type RelayDone = Box<dyn FnOnce(ConnEnd) + Send>;

/// What a `ConnectHandler` opened for a CONNECT it accepted.
pub enum Opened {
    /// A connection the server relays the tunnel to, byte for byte.
    Relay(TcpStream),
    /// The same, and who to tell how the relay ended.
    Reported(TcpStream, RelayDone),
    /// The handler serves the stream itself once the server answered 200.
    Serve(ServeTunnel),
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Opened::Relay(s) => f.debug_tuple("Relay").field(s).finish(),
            Opened::Reported(s, _) => f.debug_tuple("Reported").field(s).finish(),
            Opened::Serve(_) => f.write_str("Serve(..)"),
        }
    }
}

/// Decides on and opens the destination of each tunnel (the integrator's policy check
/// and dial).
pub trait ConnectHandler: Send + Sync + 'static {
    /// Judges and dials: the stream relayed to the tunnel.
    fn open(
        &self,
        peer: PeerInfo,
        authority: SocketAddr,
    ) -> BoxFuture<'static, Result<TcpStream, Refusal>>;

    /// What the server calls for each CONNECT. By default `open`, relayed; a handler that
    /// serves some tunnels itself (L7 policy) overrides it.
    fn accept(
        &self,
        peer: PeerInfo,
        authority: SocketAddr,
    ) -> BoxFuture<'static, Result<Opened, Refusal>> {
        let open = self.open(peer, authority);
        Box::pin(async move { open.await.map(Opened::Relay) })
    }

    /// Counters the relay of an opened tunnel adds to; none by default.
    fn counters(&self, _peer: &PeerInfo, _authority: SocketAddr) -> Option<Arc<FlowCounters>> {
        None
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    /// TLS and HTTP/2 handshakes of an accepted connection.
    pub handshake_timeout: Duration,
    /// Connections served at once; beyond, new ones are closed at once.
    pub max_connections: usize,
}

impl Default for ServerOptions {
    fn default() -> ServerOptions {
        ServerOptions {
            handshake_timeout: Duration::from_secs(10),
            max_connections: 4096,
        }
    }
}

/// Serves HBONE on `listener` until the drain begins: then stops accepting, sends GOAWAY
/// on every connection and lets its streams finish (each holds a clone of `drain`). The
/// default options, one accept loop (`serve_shared` with slots of its own).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handler: Arc<dyn ConnectHandler>,
    drain: DrainWatch,
) {
    let opts = ServerOptions::default();
    let slots = connection_slots(&opts);
    serve_shared(listener, tls, handler, drain, opts, slots, || {}).await
}

/// The connection slots of one listener (`ServerOptions::max_connections`), for the
/// accept loops that share it (`serve_shared`).
pub fn connection_slots(opts: &ServerOptions) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(opts.max_connections.max(1)))
}

/// One of several accept loops of one listener (a proxy worker's:
/// `WorkerSet::serve_everywhere`), as `serve`: connections run on this loop's runtime;
/// `slots` (`connection_slots`) caps the connections of all the loops together, and
/// `accepted` is called for each connection this loop accepts. The TLS configuration (and
/// so its session cache and ticketer) and the handler are shared, hence thread-safe.
pub async fn serve_shared(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handler: Arc<dyn ConnectHandler>,
    drain: DrainWatch,
    opts: ServerOptions,
    slots: Arc<Semaphore>,
    accepted: impl Fn() + Send + Sync,
) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = drain.signaled() => break,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    warn!(error = %e, "HBONE accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        accepted();
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            warn!(%peer, "HBONE connection refused: too many connections");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, handler, drain) = (acceptor.clone(), handler.clone(), drain.clone());
        tokio::spawn(
            async move {
                connection(tcp, peer, acceptor, handler, drain, opts).await;
                drop(slot);
            }
            .instrument(tracing::debug_span!("hbone_server_conn", %peer)),
        );
        // With several accept loops on one socket (`serve_shared`): let the others take
        // what else waits in the queue, so a burst of tunnels (nodes connecting at once)
        // spreads over the workers instead of landing on the first one awake.
        tokio::task::yield_now().await;
    }
    info!("HBONE listener stopped (drain)");
}

async fn connection(
    tcp: TcpStream,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    handler: Arc<dyn ConnectHandler>,
    drain: DrainWatch,
    opts: ServerOptions,
) {
    let handshakes = async {
        let mut tls = acceptor
            .accept(tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        tls.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER));
        let identity = peer_identity(tls.get_ref().1)
            .ok_or_else(|| "the client certificate has no SPIFFE ID".to_string())?;
        let conn = h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| format!("HTTP/2: {e}"))?;
        Ok::<_, String>((identity, conn))
    };
    let (identity, mut conn) = match tokio::time::timeout(opts.handshake_timeout, handshakes).await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            debug!(error = %e, "HBONE handshake refused");
            return;
        }
        Err(_) => {
            debug!("HBONE handshake timed out");
            return;
        }
    };
    let peer = PeerInfo {
        identity,
        addr,
        forwarded_for: None,
    };
    debug!(peer = %peer.identity, "HBONE connection up");
    // On a runtime of one worker a task per stream buys no parallelism, only a wake-up
    // between tasks for every frame (the connection's task decodes it, the stream's task
    // relays it, and back): there the connection's task drives its streams itself.
    let inline = tokio::runtime::Handle::current().metrics().num_workers() == 1;
    let mut streams = FuturesUnordered::new();
    let mut draining = false;
    loop {
        let next = tokio::select! {
            biased;
            _ = drain.signaled(), if !draining => {
                // GOAWAY: no new streams; those open finish, then `accept` ends.
                draining = true;
                conn.graceful_shutdown();
                continue;
            }
            Some(()) = streams.next(), if !streams.is_empty() => continue,
            next = conn.accept() => next,
        };
        match next {
            Some(Ok((req, respond))) => {
                let (peer, handler, drain) = (peer.clone(), handler.clone(), drain.clone());
                let s = async move {
                    stream(req, respond, peer, handler).await;
                    drop(drain);
                }
                .instrument(tracing::debug_span!("hbone_stream"));
                if inline {
                    streams.push(s);
                } else {
                    tokio::spawn(s);
                }
            }
            Some(Err(e)) => {
                debug!(error = %e, "HBONE connection error");
                break;
            }
            None => break,
        }
    }
    // The connection ended (dropping it tells every stream still open); their relays may
    // still be writing their last bytes.
    drop(conn);
    while streams.next().await.is_some() {}
}

fn answer(respond: &mut h2::server::SendResponse<Bytes>, status: http::StatusCode) {
    let resp = http::Response::builder()
        .status(status)
        .body(())
        .expect("a valid response");
    let _ = respond.send_response(resp, true);
}

async fn stream(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    mut peer: PeerInfo,
    handler: Arc<dyn ConnectHandler>,
) {
    peer.forwarded_for = parse_forwarded_for(req.headers());
    if req.method() != http::Method::CONNECT {
        answer(&mut respond, http::StatusCode::METHOD_NOT_ALLOWED);
        return;
    }
    let authority = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok());
    let Some(authority) = authority else {
        debug!(uri = %req.uri(), "CONNECT without an ip:port authority");
        answer(&mut respond, http::StatusCode::BAD_REQUEST);
        return;
    };
    let opened = match handler.accept(peer.clone(), authority).await {
        Ok(o) => o,
        Err(r) => {
            debug!(peer = %peer.identity, %authority, refusal = %r, "CONNECT refused");
            answer(&mut respond, r.status);
            return;
        }
    };
    let ok = http::Response::builder()
        .status(http::StatusCode::OK)
        .body(())
        .expect("a valid response");
    let send = match respond.send_response(ok, false) {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "the tunnel went before it opened");
            return;
        }
    };
    let tunnel = HboneStream::new(send, req.into_body(), None);
    let (upstream, done) = match opened {
        Opened::Relay(s) => (s, None),
        Opened::Reported(s, done) => (s, Some(done)),
        Opened::Serve(serve) => return serve(tunnel).await,
    };
    let Some(done) = done else {
        let counters = handler
            .counters(&peer, authority)
            .unwrap_or_else(|| Arc::new(FlowCounters::default()));
        if let Err(e) = relay_tunnel(upstream, tunnel, &counters, TcpSide::Destination).await {
            debug!(peer = %peer.identity, %authority, error = %e, "tunnel reset");
        }
        return;
    };
    // This stream's own bytes (a handler's counters may be shared between streams),
    // added to the handler's at the end.
    let own = FlowCounters::default();
    let r = relay_tunnel(upstream, tunnel, &own, TcpSide::Destination).await;
    if let Err(e) = &r {
        debug!(peer = %peer.identity, %authority, error = %e, "tunnel reset");
    }
    let (received, sent) = (own.received.load(Relaxed), own.sent.load(Relaxed));
    if let Some(shared) = handler.counters(&peer, authority) {
        shared.received.fetch_add(received, Relaxed);
        shared.sent.fetch_add(sent, Relaxed);
    }
    done(ConnEnd {
        received,
        sent,
        error: r.err().map(|e| e.to_string()),
    });
}
