//! Upstream connections: an HTTP/1.1 keep-alive pool per endpoint (the engine's own codec,
//! `h1`) and one multiplexed HTTP/2 connection per endpoint (hyper's client connection
//! API). Connections count against the cluster's `max_connections`; a request that needs a
//! connection when none may be opened waits as pending (up to `max_pending_requests`).
//!
//! An HTTP/1.1 connection has no task of its own: whoever holds it drives it. The request
//! that checked it out writes its head and reads the response head itself, and the
//! response body (`body::Tracked`) reads the rest from the connection as the downstream
//! codec asks for it; once the body has ended the connection goes back to the pool, where
//! nothing polls it until the next checkout (which first looks at it, so a connection the
//! endpoint closed meanwhile is seen then and dropped). A request thus never crosses to
//! another task, or another worker thread, or even a channel, to reach its upstream
//! connection. An HTTP/2 connection is shared by the requests of many downstream
//! connections, so it runs in a task of its own.
//!
//! An endpoint that is a mesh workload of another node is reached through an HBONE
//! stream (`Via::Tunnel`) that carries the source workload's identity and names its
//! address (`Forwarded: for=`, which the destination believes only from that identity):
//! its connections are pooled per tunnel (source workload's address and identity,
//! destination identity, HBONE address) beside the endpoint's plain pool, so a
//! connection opened for one workload never carries another's requests, not even those
//! of another pod of the same identity (its source address would be wrong for them).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    pin::pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Request, Response};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::{debug, Instrument};

use super::{
    h1::{self, SendFail},
    h2server,
    lb::EndpointState,
    policy::{Counters, Gauge, Slot},
    L7Error, MeshPaths, ProxyBody, SpanExec,
};
use crate::{
    identity::SpiffeId,
    proxy::config::{Cluster, UpstreamProtocol},
};

/// An HTTP/1.1 upstream connection and its circuit-breaker slot. Dropping it closes the
/// connection and frees the slot.
pub(super) struct H1 {
    pub conn: h1::Conn,
    /// Held for its Drop: the cluster's `max_connections` slot.
    _slot: Slot,
}

impl std::fmt::Debug for H1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.conn.fmt(f)
    }
}

/// A response body as it comes from upstream.
pub(super) enum UpBody {
    /// hyper's, failed on a `NO_ERROR` reset before its end (hyper ends it cleanly).
    H2(h2server::HyperBody),
    /// HTTP/1.1: read from the connection the response's `Finish` holds.
    H1,
}

#[derive(Debug, Default)]
pub(super) struct EndpointPool {
    idle: std::sync::Mutex<Vec<H1>>,
    h2: tokio::sync::Mutex<Option<http2::SendRequest<ProxyBody>>>,
}

impl EndpointPool {
    /// Gives a keep-alive connection back once its response has been read to the end.
    pub fn put(&self, h1: H1, counters: &Counters) {
        if !h1.conn.is_reusable() {
            return;
        }
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(h1);
        counters.released.notify_waiters();
    }

    fn pop(&self) -> Option<H1> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    /// An idle connection still usable, if one is kept: each is driven first, so a close
    /// by the endpoint while it sat idle shows now (and that one is dropped).
    async fn take_idle(&self) -> Option<H1> {
        loop {
            let mut h1 = self.pop()?;
            if std::future::poll_fn(|cx| h1.conn.poll_idle(cx))
                .await
                .is_ok()
            {
                return Some(h1);
            }
        }
    }

    /// Holds no connection (an HTTP/2 one being opened counts as held).
    fn is_empty(&self) -> bool {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
            && self.h2.try_lock().is_ok_and(|h2| h2.is_none())
    }
}

/// An HBONE tunnel an upstream connection travels in: who it speaks as, who must answer.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct Tunnel {
    /// The source workload's identity (the client's certificate).
    pub src: SpiffeId,
    /// The source workload's address, named in the CONNECT (`Forwarded: for=`): the
    /// destination judges ipBlocks and `source.ip` by it.
    pub source: IpAddr,
    /// The identity the destination must prove.
    pub dst_id: SpiffeId,
    pub hbone: SocketAddr,
}

/// How a new upstream connection reaches its endpoint.
#[derive(Clone, Copy)]
pub(super) enum Via<'a> {
    Tcp,
    Tunnel(&'a dyn MeshPaths, &'a Arc<Tunnel>),
}

/// An endpoint's pools of tunnelled connections, one per tunnel.
#[derive(Debug, Default)]
pub(super) struct TunnelPools(Mutex<HashMap<Arc<Tunnel>, Arc<EndpointPool>>>);

impl TunnelPools {
    fn get(&self, t: &Arc<Tunnel>) -> Arc<EndpointPool> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = m.get(t) {
            return p.clone();
        }
        // Pools nobody uses and that hold nothing go when a new tunnel comes (identities
        // come and go with the workloads; the map stays as large as those in use).
        m.retain(|_, p| Arc::strong_count(p) > 1 || !p.is_empty());
        m.entry(t.clone()).or_default().clone()
    }
}

pub(super) enum Sender {
    H1(H1),
    H2(http2::SendRequest<ProxyBody>),
}

impl Sender {
    /// Sends `req` and waits for the response head.
    pub async fn send(&mut self, req: Request<ProxyBody>) -> Result<Response<UpBody>, SendFail> {
        match self {
            Sender::H1(h) => Ok(h.conn.send(req).await?.map(|()| UpBody::H1)),
            Sender::H2(s) => match s.try_send_request(req).await {
                Ok(r) => Ok(r.map(|b| UpBody::H2(h2server::HyperBody::response(b)))),
                Err(mut e) => Err(SendFail {
                    request: e.take_message(),
                    error: h1::H1Error::H2(e.into_error()),
                }),
            },
        }
    }
}

/// A connection ready for one request; `reused` when it carried requests before (so a
/// request it failed to send may go again on a fresh one).
pub(super) struct Checkout {
    pub sender: Sender,
    pub reused: bool,
    /// The tunnel pool an HTTP/1.1 connection goes back to (None: the endpoint's own).
    pub home: Option<Arc<EndpointPool>>,
}

impl Checkout {
    /// An idle HTTP/1.1 connection taken from its pool again.
    fn reused(h1: H1, home: Option<Arc<EndpointPool>>) -> Self {
        Checkout {
            sender: Sender::H1(h1),
            reused: true,
            home,
        }
    }
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, L7Error> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => Err(L7Error::ConnectTimeout { addr, timeout }),
        Ok(Err(source)) => Err(L7Error::Connect { addr, source }),
        Ok(Ok(s)) => {
            // Requests are small writes; Nagle would hold them for an ACK.
            let _ = s.set_nodelay(true);
            Ok(s)
        }
    }
}

/// Runs an HTTP/2 upstream connection in a task until it ends; its circuit-breaker slot
/// goes with it.
fn drive<C, E>(conn: C, slot: Slot, span: tracing::Span)
where
    C: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    tokio::spawn(
        async move {
            if let Err(e) = conn.await {
                debug!("upstream connection ended: {e}");
            }
            drop(slot);
        }
        .instrument(span),
    );
}

/// An HBONE stream to `addr` through `tunnel`; any failure to open it is a connect
/// failure of the endpoint.
async fn connect_tunnel(
    mesh: &dyn MeshPaths,
    tunnel: &Tunnel,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<super::BoxIo, L7Error> {
    match tokio::time::timeout(timeout, mesh.open(tunnel, addr)).await {
        Err(_) => Err(L7Error::ConnectTimeout { addr, timeout }),
        Ok(Err(source)) => Err(L7Error::Tunnel {
            addr,
            hbone: tunnel.hbone,
            source,
        }),
        Ok(Ok(s)) => Ok(s),
    }
}

async fn open(
    ep: &EndpointState,
    cluster: &Cluster,
    slot: Slot,
    via: Via<'_>,
) -> Result<Sender, L7Error> {
    let addr = ep.address;
    match via {
        Via::Tcp => {
            let io = connect(addr, cluster.connect_timeout).await?;
            handshake(Box::new(io), addr, cluster, slot).await
        }
        Via::Tunnel(mesh, t) => {
            let io = connect_tunnel(mesh, t, addr, cluster.connect_timeout).await?;
            handshake(io, addr, cluster, slot).await
        }
    }
}

async fn handshake(
    io: super::BoxIo,
    addr: SocketAddr,
    cluster: &Cluster,
    slot: Slot,
) -> Result<Sender, L7Error> {
    match cluster.protocol {
        UpstreamProtocol::Http1 => Ok(Sender::H1(H1 {
            conn: h1::Conn::new(io),
            _slot: slot,
        })),
        UpstreamProtocol::Http2 => {
            let io = TokioIo::new(io);
            let span = tracing::debug_span!("upstream_conn", cluster = %cluster.name, %addr);
            let (sender, conn) = http2::Builder::new(SpanExec)
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(|source| L7Error::Handshake { addr, source })?;
            drive(conn, slot, span);
            Ok(Sender::H2(sender))
        }
    }
}

/// A connection to `ep` for one request, reaching it `via` plain TCP or a tunnel (then
/// from that tunnel's pool). Tunnelled connections count against the same cluster limits.
///
/// `fresh` (an upgrade request, HTTP/1.1 only): a new connection, never an idle one, which
/// the exchange then keeps for itself (`h1::Conn` pools no connection that asked for an
/// upgrade), so an upgraded stream never shares a connection and a declined one leaves
/// nothing behind in the pool.
pub(super) async fn checkout(
    counters: &Arc<Counters>,
    ep: &EndpointState,
    cluster: &Cluster,
    via: Via<'_>,
    fresh: bool,
) -> Result<Checkout, L7Error> {
    let home = match via {
        Via::Tcp => None,
        Via::Tunnel(_, t) => Some(ep.tunnels.get(t)),
    };
    let pool = home.as_deref().unwrap_or(&ep.pool);
    let cb = cluster.circuit_breaker;
    let overflow = |limit| L7Error::Overflow {
        cluster: cluster.name.clone(),
        limit,
    };
    if cluster.protocol == UpstreamProtocol::Http2 {
        let mut slot = pool.h2.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.is_closed()) {
            let sender = Sender::H2(s.clone());
            drop(slot);
            return Ok(Checkout {
                sender,
                reused: true,
                home,
            });
        }
        *slot = None;
        let conn = Slot::acquire(counters, Gauge::Connections, cb.max_connections)
            .ok_or_else(|| overflow("max_connections"))?;
        let Sender::H2(s) = Box::pin(open(ep, cluster, conn, via)).await? else {
            unreachable!("an http2 cluster opens http2 connections")
        };
        *slot = Some(s.clone());
        drop(slot);
        return Ok(Checkout {
            sender: Sender::H2(s),
            reused: false,
            home,
        });
    }
    // The common case first: an idle connection, taken without registering for a wake-up
    // (the loop below registers before it looks, for the case where it has to wait).
    if !fresh {
        if let Some(h1) = pool.take_idle().await {
            return Ok(Checkout::reused(h1, home));
        }
    }
    let mut pending = None;
    loop {
        let mut released = pin!(counters.released.notified());
        // Registered before looking, so a release between the look and the wait is seen.
        released.as_mut().enable();
        if !fresh {
            if let Some(h1) = pool.take_idle().await {
                return Ok(Checkout::reused(h1, home));
            }
        }
        if let Some(conn) = Slot::acquire(counters, Gauge::Connections, cb.max_connections) {
            drop(pending);
            // Boxed: opening (connect, handshake) is the rare case, and its future is
            // large; inline, every request's future would carry (and move) its size.
            return Ok(Checkout {
                sender: Box::pin(open(ep, cluster, conn, via)).await?,
                reused: false,
                home,
            });
        }
        if pending.is_none() {
            pending = Some(
                Slot::acquire(counters, Gauge::Pending, cb.max_pending_requests)
                    .ok_or_else(|| overflow("max_pending_requests"))?,
            );
        }
        // A fresh connection has no use for this pool's idle ones either.
        close_idle_elsewhere(ep, (!fresh).then_some(pool));
        released.await;
    }
}

/// At the connection limit, closes one idle HTTP/1.1 connection of another pool of `ep`
/// (another identity's tunnel pool, or the plain one) than `keep` (None: of any pool):
/// its slot is released when the connection ends. One pool per identity must not keep
/// another's requests pending on slots it only holds idle, which one shared pool never did.
fn close_idle_elsewhere(ep: &EndpointState, keep: Option<&EndpointPool>) {
    let keep = |p: &EndpointPool| keep.is_some_and(|k| std::ptr::eq(p, k));
    if !keep(&ep.pool) {
        if let Some(s) = ep.pool.pop() {
            drop(s);
            return;
        }
    }
    let tunnels = ep.tunnels.0.lock().unwrap_or_else(|e| e.into_inner());
    for p in tunnels.values() {
        if !keep(p) {
            if let Some(s) = p.pop() {
                drop(s);
                return;
            }
        }
    }
}
