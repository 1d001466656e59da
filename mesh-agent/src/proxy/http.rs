//! The L7 half of the node proxy: HTTP/1.1, HTTP/2 and gRPC, configured by
//! `proxy::config` (routes, clusters, endpoints) with Envoy's semantics. Downstream
//! HTTP/1.1 is served by the engine's own codec (`server`; `--l7-h1-server hyper` keeps
//! hyper's), HTTP/2 by hyper (`--l7-h2-server own`: the `h2` crate's server driven in the
//! connection's task, `h2server`); upstream HTTP/1.1 by the own client codec (`h1`),
//! HTTP/2 by hyper.
//!
//! A request goes: virtual host and route (`route`), local rate limit and fault injection
//! (`policy`), then the route's action. Forwarding picks a weighted cluster, checks the
//! cluster's circuit breaker, picks an endpoint (`lb`), takes a pooled connection (`pool`)
//! and retries per the retry policy while the request body can be replayed (`body`). Each
//! request reads the configuration in force when it arrives; runtime state (pools,
//! balancer state, ejections, token buckets) is kept by cluster and rate-limit names, so a
//! push neither resets it nor disturbs requests in flight.
//!
//! HTTP/1.1 upgrades (`Connection: upgrade`, `Upgrade: websocket` or any other protocol but
//! `h2c`) are routed like any request, then spliced once the upstream switched (`upgrade`).
//! h2c upgrade (`Upgrade: h2c`) is not offered: hyper's HTTP/2 server cannot adopt the
//! upgrading request as stream 1, and a splice would carry the requests after it past
//! routing, so the header is dropped and the request is answered over HTTP/1.1, which RFC
//! 9113 allows (and Envoy does the same by default). HTTP/2 prior knowledge is sniffed from
//! the connection preface. WebSocket over HTTP/2 (extended CONNECT, RFC 8441) is not
//! offered: hyper's HTTP/2 server does not announce it.
//!
//! Zero trust (`proxy::secure`, when set): once an endpoint is picked, a request to a mesh
//! workload of another node goes through an HBONE tunnel as the client workload's
//! identity, naming the client workload's address in the CONNECT (`Forwarded: for=`, as
//! the L4 path does; connections pooled per source workload, `pool`), and one to a
//! same-node mesh
//! workload is judged by policy first (403 when denied). The path is judged once per
//! downstream connection, endpoint and mesh configuration (`Hops`); endpoints outside the
//! mesh cost one lookup per request.

mod body;
mod chunked;
mod drained;
mod h1;
mod h2server;
mod lb;
mod policy;
mod pool;
mod route;
mod server;
mod sniff;
mod timer;
mod upgrade;

use std::{
    any::Any,
    collections::HashMap,
    convert::Infallible,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc, Mutex, OnceLock, Weak,
    },
    task::Poll,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};
use hyper::{
    body::Incoming,
    server::conn::{http1, http2},
    service::service_fn,
    upgrade::OnUpgrade,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::watch,
    time::Instant,
};
use tracing::{debug, Instrument};

pub use self::sniff::{detect, Sniffed};
// The destination's HTTP policy path (`proxy::secure::http`) serves connections the same way.
use self::{
    body::{
        Active, ConnSeries, Finish, Labels, Name, Recorder, ReqBody, RequestLog, Source, Tracked,
    },
    drained::until_drained,
    lb::ClusterState,
    policy::{Buckets, Gauge, Slot, TryOutcome},
    pool::{EndpointPool, Sender, Tunnel, UpBody, Via},
    timer::{ConnTimer, Timer},
    upgrade::ClientSide,
};
pub(crate) use self::{route::strip_hop_by_hop, sniff::Prefixed};
pub use crate::metrics::L7Metrics;
use crate::{
    lifecycle::drain::DrainWatch,
    metrics::istio::{HttpConn, Peer, RequestTelemetry},
    proxy::{
        accesslog::{self, AccessLog, Entry, Flags, PathTaken, Protocol},
        config::{
            policy::MeshConfig, Cluster, Codec, FaultAbort, Forward, HttpListener, Listener,
            ListenerKind, ProxyConfig, Route, RouteAction, UpstreamProtocol, VirtualHost,
        },
        hbone::HboneError,
        secure::{Path, Secure},
    },
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the engine sends, either way.
type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// How long a new connection may take to send its first bytes (hyper's default header
/// read timeout, which applies after the sniff).
const SNIFF_TIMEOUT: Duration = Duration::from_secs(30);
/// Fresh connections tried when reused ones turn out closed before a request went out.
const STALE_CONNECTION_TRIES: usize = 3;
/// Mesh endpoints whose path one downstream connection remembers (past it, it starts
/// over: a judgement costs a policy evaluation, not a connection).
const MAX_HOPS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum L7Error {
    #[error("connecting to upstream {addr}: {source} (is the endpoint listening?)")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("connecting to upstream {addr} timed out after {timeout:?} (cluster connect_timeout)")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("HTTP handshake with upstream {addr}: {source} (does the cluster's protocol match the endpoint's?)")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("upstream {addr} reset or closed before a response: {source}")]
    Reset {
        addr: SocketAddr,
        source: h1::H1Error,
    },
    #[error("upstream {addr} broke HTTP/1.1: {source}")]
    Protocol {
        addr: SocketAddr,
        source: h1::H1Error,
    },
    #[error("cluster {cluster}: circuit breaker open ({limit} reached)")]
    Overflow {
        cluster: String,
        limit: &'static str,
    },
    #[error("the client's request body failed: {reason} (malformed framing, or the client went away mid-body; not the upstream's fault)")]
    ClientBody { reason: String },
    #[error("opening the HBONE tunnel to upstream {addr} through {hbone}: {source}")]
    Tunnel {
        addr: SocketAddr,
        hbone: SocketAddr,
        source: HboneError,
    },
}

/// Any upstream connection's IO: a TCP stream, or a tunnel stream.
pub(crate) trait UpstreamIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// Itself, to find the TCP socket of an upgraded stream (`upgrade`: a reset on drop).
    /// Call it on the `dyn UpstreamIo` (`&*boxed`), not on the `BoxIo`, which is one too.
    fn as_any(&self) -> &dyn Any;
}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> UpstreamIo for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
}
pub(crate) type BoxIo = Box<dyn UpstreamIo>;

type OpenFuture<'a> = Pin<Box<dyn Future<Output = Result<BoxIo, HboneError>> + Send + 'a>>;

/// What the engine asks of the zero-trust path: `Secure` in the agent. A trait so the
/// engine's tests can stand in for the mesh (and its certificates) with a double.
pub(crate) trait MeshPaths: Send + Sync {
    /// The configuration paths are judged by; a path stays right while its `version` is
    /// the one in force.
    fn mesh_now(&self) -> Arc<MeshConfig>;
    /// The path from the local workload at `client` to the endpoint `target`.
    fn path(&self, client: IpAddr, target: SocketAddr) -> Path;
    /// A stream to `authority` through `tunnel`.
    fn open<'a>(&'a self, tunnel: &'a Tunnel, authority: SocketAddr) -> OpenFuture<'a>;
}

impl MeshPaths for Secure {
    fn mesh_now(&self) -> Arc<MeshConfig> {
        Secure::mesh_now(self)
    }

    fn path(&self, client: IpAddr, target: SocketAddr) -> Path {
        self.outbound(client, target)
    }

    fn open<'a>(&'a self, t: &'a Tunnel, authority: SocketAddr) -> OpenFuture<'a> {
        Box::pin(async move {
            let s = self
                .open_tunnel(&t.src, t.source, t.hbone, &t.dst_id, authority)
                .await?;
            Ok(Box::new(s) as BoxIo)
        })
    }
}

/// Who a downstream connection comes from.
#[derive(Debug, Clone)]
pub struct Client {
    /// The source workload's name for metrics (`ns/name`, or `unknown`).
    pub name: String,
    /// Its address (either family: a dual-stack workload is found by both). Zero trust
    /// needs it: requests go through the tunnel as the identity of the workload there,
    /// and same-node policy sees it as `source.ip`. None: every upstream connection is
    /// plain.
    pub ip: Option<IpAddr>,
    /// Its address and port, and whether sk_msg short-circuits its leg, for the access log.
    pub peer: Option<SocketAddr>,
    pub skmsg: bool,
}

/// A client known by name only (upstream connections stay plain).
impl From<&str> for Client {
    fn from(name: &str) -> Client {
        Client {
            name: name.to_owned(),
            ip: None,
            peer: None,
            skmsg: false,
        }
    }
}

/// How one downstream connection's requests reach one endpoint.
#[derive(Debug, Clone)]
enum Hop {
    Plain,
    Tunnel(Arc<Tunnel>),
    /// Policy refuses the client this (same-node) endpoint; the deciding policy's name.
    Denied(Option<Arc<str>>),
}

/// A downstream connection's paths to mesh endpoints, judged under the mesh
/// configuration of `version` (`MeshConfig::version`: the version, not the `Arc`, so an
/// idle connection does not keep an old configuration alive).
#[derive(Default)]
struct Hops {
    version: u64,
    hops: Vec<(SocketAddr, Hop)>,
}

/// Spawns hyper's background tasks (HTTP/2 streams and connections) inside a span.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SpanExec;

impl<F> hyper::rt::Executor<F> for SpanExec
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut.instrument(tracing::debug_span!("h2_task")));
    }
}

/// The L7 engine: serves captured downstream connections by the configuration in force.
pub struct L7 {
    config: watch::Receiver<Arc<ProxyConfig>>,
    metrics: Arc<L7Metrics>,
    clusters: Mutex<Clusters>,
    buckets: Buckets,
    /// The zero-trust path; unset: every upstream connection is plain TCP.
    paths: OnceLock<Arc<dyn MeshPaths>>,
    /// Unset: no access log (nothing is built for it).
    access_log: OnceLock<AccessLog>,
    /// The `ProxyConfig::version` `prune` last ran for (read without the lock).
    pruned: AtomicU64,
    /// Unset: no spans (`proxy::trace`; nothing is built for them).
    trace: OnceLock<crate::proxy::trace::Tracer>,
    /// The downstream HTTP/1.1 codec; unset: the process default (`set_default_h1_server`).
    h1_server: OnceLock<H1Server>,
    /// The downstream HTTP/2 server; unset: the process default (`set_default_h2_server`).
    h2_server: OnceLock<H2Server>,
}

/// The L7 engine's downstream HTTP/1.1 codec (`--l7-h1-server`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum H1Server {
    /// hyper's HTTP/1.1 server.
    Hyper,
    /// The engine's own codec (`proxy::http::server`).
    Own,
}

impl H1Server {
    /// The process default (`--l7-h1-server`'s): the own codec.
    pub const DEFAULT: H1Server = H1Server::Own;
}

impl Default for H1Server {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The L7 engine's downstream HTTP/2 server (`--l7-h2-server`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum H2Server {
    /// hyper's HTTP/2 server (a task per stream).
    Hyper,
    /// The `h2` crate's server driven by the connection's task (`proxy::http::h2server`).
    Own,
}

impl H2Server {
    /// The process default (`--l7-h2-server`'s): the own server (docs/l7.md); hyper's
    /// is the fallback.
    pub const DEFAULT: H2Server = H2Server::Own;
}

impl Default for H2Server {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The process-wide choice between hyper's server and the engine's own for one protocol
/// (`set_default_h1_server`, `set_default_h2_server`). The engine's unit tests run on
/// either: `test_var=hyper|own` (the default's otherwise), read once.
struct ServerChoice {
    own: AtomicBool,
    #[cfg(test)]
    test_var: &'static str,
    #[cfg(test)]
    test: OnceLock<Option<bool>>,
}

impl ServerChoice {
    const fn new(own: bool, test_var: &'static str) -> ServerChoice {
        #[cfg(not(test))]
        let _ = test_var;
        ServerChoice {
            own: AtomicBool::new(own),
            #[cfg(test)]
            test_var,
            #[cfg(test)]
            test: OnceLock::new(),
        }
    }

    fn set(&self, own: bool) {
        self.own.store(own, Relaxed);
    }

    /// Whether an engine serves with the own server: `engine`'s choice
    /// (`L7::set_h1_server`, `L7::set_h2_server`) if it made one, else the process's.
    fn own(&self, engine: Option<bool>) -> bool {
        if let Some(own) = engine {
            return own;
        }
        #[cfg(test)]
        {
            let test = self
                .test
                .get_or_init(|| match std::env::var(self.test_var).as_deref() {
                    Ok("own") => Some(true),
                    Ok("hyper") => Some(false),
                    _ => None,
                });
            if let Some(own) = *test {
                return own;
            }
        }
        self.own.load(Relaxed)
    }
}

static H1_CHOICE: ServerChoice = ServerChoice::new(
    matches!(H1Server::DEFAULT, H1Server::Own),
    "MESH_TEST_L7_H1_SERVER",
);
static H2_CHOICE: ServerChoice = ServerChoice::new(
    matches!(H2Server::DEFAULT, H2Server::Own),
    "MESH_TEST_L7_H2_SERVER",
);

/// Sets the downstream HTTP/1.1 codec of every engine that has not been given its own
/// (`L7::set_h1_server`); the agent calls it once at start-up from `--l7-h1-server`.
pub fn set_default_h1_server(s: H1Server) {
    H1_CHOICE.set(s == H1Server::Own);
}

/// Sets the downstream HTTP/2 server of every engine that has not been given its own
/// (`L7::set_h2_server`); the agent calls it once at start-up from `--l7-h2-server`.
pub fn set_default_h2_server(s: H2Server) {
    H2_CHOICE.set(s == H2Server::Own);
}

/// Runtime state by cluster name, pruned when a push removes clusters.
#[derive(Default)]
struct Clusters {
    /// The `ProxyConfig::version` the names were last checked against.
    checked: u64,
    map: HashMap<String, Arc<ClusterState>>,
}

/// One downstream connection.
struct Conn {
    dst: SocketAddr,
    source: String,
    client_ip: Option<IpAddr>,
    peer: Option<SocketAddr>,
    skmsg: bool,
    /// The listener at accept time, used if a push removes it while the connection lives.
    listener: Arc<Listener>,
    hops: Mutex<Hops>,
    /// Istio's series of this connection's requests (source resolved at accept).
    istio: Arc<HttpConn>,
    /// Our `mesh_requests_total` series of this connection's requests.
    series: Arc<ConnSeries>,
    /// HTTP/1.1: the route deadlines' timer, shared by the connection's requests (they
    /// come one at a time; `timer`). None: one per request (HTTP/2 streams run in tasks
    /// of their own).
    timer: Option<Arc<Timer>>,
    /// What this connection's last request found (`Seen`).
    seen: Mutex<Seen>,
    /// HTTP/1.1: an upgrade the upstream accepted, spliced once its `101` went out
    /// (`serve_sniffed`).
    upgraded: Mutex<Option<upgrade::Pending>>,
}

/// What a downstream connection's last request found: a request under the same
/// configuration skips the listener's lookup by address, one to the same cluster its
/// lookup by name (both SipHash) and the shared state map's lock.
struct Seen {
    /// The configuration `listener` and `cluster` were found in. A `Weak`, so an idle
    /// connection keeps no old configuration alive; while it lives the allocation is not
    /// reused, so a configuration at the same address is this one.
    config: Weak<ProxyConfig>,
    listener: Arc<Listener>,
    cluster: Option<Arc<Cluster>>,
    /// The last cluster's state, kept across configurations while the cluster is the same
    /// `Arc` (one a push removed has another `Arc` when it comes back, so a remembered
    /// state is never one `prune` dropped).
    state: Option<(Arc<Cluster>, Arc<ClusterState>)>,
}

/// An upstream's `101` and what passing it on needs.
struct Switch {
    /// The protocols the request offered (None: it offered none, yet got a `101`).
    offered: Option<HeaderValue>,
    /// The client's side of the connection, once the `101` went out.
    client: Option<ClientSide>,
    /// The upstream's connection (`h1`).
    io: h1::Upgraded,
    /// The request's count of bytes from the client.
    received: Arc<AtomicU64>,
}

/// Why a try produced no response.
enum TryFail {
    Timeout,
    Error(L7Error),
}

impl From<L7Error> for TryFail {
    fn from(e: L7Error) -> Self {
        TryFail::Error(e)
    }
}

/// Marks the request's access-log line, if the log is on, and its Istio series.
fn flag(rec: &mut Option<Recorder>, f: Flags) {
    if let Some(r) = rec.as_mut() {
        r.flags.insert(f);
    }
    if let Some(l) = rec.as_mut().and_then(|r| r.log.as_mut()) {
        l.entry.flag(f);
    }
}

/// The request's access-log line, if the log is on.
fn log_of(rec: &mut Option<Recorder>) -> Option<&mut Entry> {
    rec.as_mut()
        .and_then(|r| r.log.as_mut())
        .map(|l| &mut *l.entry)
}

/// The gRPC status Envoy gives a local reply of this HTTP status.
fn grpc_status_for(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}

fn empty() -> ProxyBody {
    Empty::new().map_err(|n| match n {}).boxed_unsync()
}

/// A reply the proxy makes itself. gRPC callers get it trailers-only (HTTP 200 and a
/// `grpc-status`), as Envoy answers them.
fn local(grpc: bool, status: StatusCode, msg: &str) -> Response<ProxyBody> {
    if grpc {
        return grpc_reply(grpc_status_for(status), msg);
    }
    let mut r = Response::new(
        Full::new(Bytes::copy_from_slice(msg.as_bytes()))
            .map_err(|n| match n {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    if !msg.is_empty() {
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    r
}

fn grpc_reply(code: u32, msg: &str) -> Response<ProxyBody> {
    let mut r = Response::new(empty());
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(msg) {
        h.insert("grpc-message", v);
    }
    r
}

fn overloaded(grpc: bool) -> Response<ProxyBody> {
    let mut r = local(
        grpc,
        StatusCode::SERVICE_UNAVAILABLE,
        "upstream connect error or disconnect/reset before headers. reset reason: overflow",
    );
    r.headers_mut()
        .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
    r
}

impl L7 {
    pub fn new(config: watch::Receiver<Arc<ProxyConfig>>, metrics: Arc<L7Metrics>) -> Arc<L7> {
        Arc::new(L7 {
            config,
            metrics,
            clusters: Mutex::default(),
            buckets: Buckets::default(),
            paths: OnceLock::new(),
            access_log: OnceLock::new(),
            pruned: AtomicU64::new(0),
            trace: OnceLock::new(),
            h1_server: OnceLock::new(),
            h2_server: OnceLock::new(),
        })
    }

    /// Records a span per request and per try, and propagates the trace (`proxy::trace`).
    pub fn set_tracer(&self, t: crate::proxy::trace::Tracer) {
        let _ = self.trace.set(t);
    }

    /// This engine's downstream HTTP/1.1 codec, whatever the process default.
    pub fn set_h1_server(&self, s: H1Server) {
        let _ = self.h1_server.set(s);
    }

    /// This engine's downstream HTTP/2 server, whatever the process default.
    pub fn set_h2_server(&self, s: H2Server) {
        let _ = self.h2_server.set(s);
    }

    fn h2_own(&self) -> bool {
        H2_CHOICE.own(self.h2_server.get().map(|s| *s == H2Server::Own))
    }

    fn h1_own(&self) -> bool {
        H1_CHOICE.own(self.h1_server.get().map(|s| *s == H1Server::Own))
    }

    /// Writes an access-log line per request (`proxy::accesslog`).
    pub fn set_access_log(&self, log: AccessLog) {
        let _ = self.access_log.set(log);
    }

    /// A request's access-log line as far as its arrival tells (None: the log is off).
    fn request_log(
        &self,
        conn: &Conn,
        service: &str,
        req: &Request<ReqBody>,
    ) -> Option<RequestLog> {
        let sink = self.access_log.get().filter(|l| l.on())?.clone();
        let path = if conn.skmsg {
            PathTaken::ProxiedSkMsg
        } else {
            PathTaken::Proxied
        };
        let mut e = Entry::new(Protocol::of(req.version()), path);
        e.source_address = match (conn.peer, conn.client_ip) {
            (Some(p), _) => Some(accesslog::Addr::Sock(p)),
            (None, Some(ip)) => Some(accesslog::Addr::Ip(ip)),
            (None, None) => None,
        };
        e.source_workload = Some(conn.source.clone()).filter(|s| s != "unknown");
        e.destination_address = Some(conn.dst);
        e.destination_service = Some(service.to_owned());
        e.bytes_received = Some(0);
        e.bytes_sent = Some(0);
        e.http = Some(accesslog::HttpFields {
            method: req.method().as_str().to_owned(),
            authority: route::authority(req).map(str::to_owned),
            path: accesslog::bounded_path(req.uri().path_and_query().map_or("/", |p| p.as_str())),
            response_code: 0,
            attempts: 0,
        });
        if let (Some(paths), Some(ip)) = (self.paths.get(), conn.client_ip) {
            if let Some(w) = paths.mesh_now().workloads.by_ip(ip) {
                e.source_principal = Some(w.identity.to_string());
            }
        }
        Some(RequestLog {
            sink,
            entry: Box::new(e),
            received: None,
        })
    }

    /// Istio's view of a connection from `source` (`ns/name` or `unknown`) at `ip`: its
    /// peer resolved once, destinations resolved per endpoint on first use.
    fn istio_conn(&self, source: &str, ip: Option<IpAddr>) -> HttpConn {
        let mut peer = Peer::from_qualified(Some(source));
        let paths = self.paths.get().cloned();
        if let (Some(p), Some(ip)) = (&paths, ip) {
            if let Some(w) = p.mesh_now().workloads.by_ip(ip) {
                peer.principal = w.identity.to_string();
                w.label_peer(&mut peer);
            }
        }
        let resolve = Arc::new(move |ep: SocketAddr| {
            let mut d = Peer::default();
            if let Some(p) = &paths {
                if let Some(w) = p.mesh_now().workloads.by_ip(ep.ip()) {
                    d.workload = w.name.clone();
                    d.namespace = w.namespace.clone();
                    d.principal = w.identity.to_string();
                    w.label_peer(&mut d);
                }
            }
            d
        });
        HttpConn::new(self.metrics.istio.clone(), "source", peer, resolve)
    }

    /// Notes the endpoint a try goes to on the request's access-log line and for its
    /// Istio series.
    fn log_try(&self, rec: &mut Option<Recorder>, ep: SocketAddr, hop: &Hop, attempts: u32) {
        if let Some(t) = rec.as_mut().and_then(|r| r.istio.as_mut()) {
            t.endpoint = Some(ep);
            t.mtls = matches!(hop, Hop::Tunnel(_));
        }
        let Some(e) = log_of(rec) else {
            return;
        };
        e.upstream_host = Some(ep);
        if let Some(h) = e.http.as_mut() {
            h.attempts = attempts;
        }
        if matches!(hop, Hop::Tunnel(_)) {
            e.path_taken = PathTaken::Tunnel;
        }
        if let Some(paths) = self.paths.get() {
            if let Some(w) = paths.mesh_now().workloads.by_ip(ep.ip()) {
                e.destination_workload = Some(format!("{}/{}", w.namespace, w.name));
                e.destination_principal = Some(w.identity.to_string());
            }
        }
    }

    /// Sends requests to other nodes' mesh workloads through HBONE as the client's
    /// identity, and judges same-node ones by policy (`proxy::secure`).
    pub fn set_secure(&self, s: Arc<Secure>) {
        self.set_paths(s);
    }

    pub(crate) fn set_paths(&self, p: Arc<dyn MeshPaths>) {
        let _ = self.paths.set(p);
    }

    /// How `conn`'s requests reach the endpoint `ep` under the mesh configuration in force.
    fn hop(&self, conn: &Conn, ep: SocketAddr) -> Hop {
        let (Some(paths), Some(client)) = (self.paths.get(), conn.client_ip) else {
            return Hop::Plain;
        };
        let mesh = paths.mesh_now();
        let lock = || conn.hops.lock().unwrap_or_else(|e| e.into_inner());
        // Remembered (an endpoint outside the mesh too: no workload lookup per request).
        {
            let mut h = lock();
            if h.version != mesh.version {
                h.version = mesh.version;
                h.hops.clear();
            }
            if let Some((_, hop)) = h.hops.iter().find(|(a, _)| *a == ep) {
                return hop.clone();
            }
        }
        // Outside the mesh: plain, without a policy evaluation or an allocation.
        let outside = mesh.workloads.by_ip(ep.ip()).is_none();
        // Judged outside the lock (a policy evaluation); `path` reads the configuration
        // again, at worst a newer one, which only makes the next request judge anew.
        let path = if outside {
            Path::Plain
        } else {
            paths.path(client, ep)
        };
        let hop = match path {
            Path::Plain => Hop::Plain,
            Path::Denied(v) => Hop::Denied(v.policy_name),
            Path::Tunnel { src, dst, hbone } => Hop::Tunnel(Arc::new(Tunnel {
                src,
                source: client,
                dst_id: dst.identity.clone(),
                hbone,
            })),
        };
        let mut h = lock();
        if h.version == mesh.version {
            if h.hops.len() >= MAX_HOPS {
                h.hops.clear();
            }
            h.hops.push((ep, hop.clone()));
        }
        hop
    }

    /// The HTTP listener of `conn`'s destination in `cfg` (one a push removed since keeps
    /// serving the connections it accepted), remembered per connection (`Seen`).
    fn conn_listener(&self, conn: &Conn, cfg: &Arc<ProxyConfig>) -> Arc<Listener> {
        let mut seen = conn.seen.lock().unwrap_or_else(|e| e.into_inner());
        if std::ptr::eq(seen.config.as_ptr(), Arc::as_ptr(cfg)) {
            return seen.listener.clone();
        }
        // A pushed listener applies to new requests of live connections; one removed since
        // keeps serving the connections it accepted (Envoy drains them the same way).
        let listener = cfg
            .listener(conn.dst)
            .filter(|l| matches!(l.kind, ListenerKind::Http(_)))
            .unwrap_or(&conn.listener)
            .clone();
        seen.config = Arc::downgrade(cfg);
        seen.listener = listener.clone();
        seen.cluster = None;
        listener
    }

    /// The cluster `name` in `cfg` and its runtime state (`cluster_state`), remembered per
    /// connection (`Seen`). None: `cfg` has no such cluster.
    fn conn_cluster(
        &self,
        conn: &Conn,
        cfg: &Arc<ProxyConfig>,
        name: &str,
    ) -> Option<(Arc<Cluster>, Arc<ClusterState>)> {
        let mut seen = conn.seen.lock().unwrap_or_else(|e| e.into_inner());
        let current = std::ptr::eq(seen.config.as_ptr(), Arc::as_ptr(cfg));
        let known = seen
            .cluster
            .as_ref()
            .filter(|c| current && c.name == name)
            .cloned();
        let cluster = match known {
            Some(c) => c,
            None => {
                let c = cfg.cluster(name)?.clone();
                // Remembered only under the configuration the connection knows (another
                // request of it may have seen a newer one in between).
                if current {
                    seen.cluster = Some(c.clone());
                }
                c
            }
        };
        if let Some((c, s)) = seen.state.as_ref() {
            if Arc::ptr_eq(c, &cluster) {
                return Some((cluster, s.clone()));
            }
        }
        let s = self.cluster_state(name);
        seen.state = Some((cluster.clone(), s.clone()));
        Some((cluster, s))
    }

    fn cluster_state(&self, name: &str) -> Arc<ClusterState> {
        let mut c = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = c.map.get(name) {
            return s.clone();
        }
        c.map.entry(name.to_owned()).or_default().clone()
    }

    /// Drops the state (and so the pooled connections) of clusters the configuration no
    /// longer has; requests still using one keep their own reference.
    fn prune(&self, cfg: &Arc<ProxyConfig>) {
        let version = cfg.version;
        if self.pruned.load(Relaxed) == version {
            return;
        }
        self.pruned.store(version, Relaxed);
        let mut c = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        if c.checked != version {
            c.checked = version;
            c.map.retain(|name, _| cfg.clusters.contains_key(name));
        }
    }

    /// The configuration in force as `/config_dump` shows it, with the endpoints outlier
    /// detection keeps out shown ejected: that state lives here, not in the configuration.
    pub fn config_dump(&self) -> serde_json::Value {
        let cfg = self.config.borrow().clone();
        let states: Vec<_> = {
            let c = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
            cfg.clusters
                .values()
                .filter_map(|cl| Some((cl, c.map.get(&cl.name)?.clone())))
                .collect()
        };
        let (now, wall) = (Instant::now(), SystemTime::now());
        let ejected: HashMap<&str, HashMap<SocketAddr, Instant>> = states
            .into_iter()
            .map(|(cl, state)| (cl.name.as_str(), state.ejections(cl)))
            .collect();
        crate::proxy::xds::dump::config_with(&cfg, |cluster, addr| {
            let until = ejected.get(cluster)?.get(&addr)?;
            Some(wall + until.saturating_duration_since(now))
        })
    }

    /// L4 (tcp_proxy) listeners: an endpoint of `cluster` by its load balancer (None if
    /// none is healthy or the cluster is unknown).
    pub fn pick_endpoint(&self, cluster: &str) -> Option<SocketAddr> {
        let c = self.config.borrow().cluster(cluster).cloned()?;
        self.cluster_state(cluster)
            .pick(&c, None)
            .map(|e| e.address)
    }

    /// Serves one downstream connection whose original destination is `dst` (which has an
    /// HTTP listener in the config at accept time), from `client`. Once `drain` is
    /// signaled the connection winds down gracefully (`serve_sniffed`).
    pub async fn serve<IO>(
        self: Arc<Self>,
        mut io: IO,
        dst: SocketAddr,
        client: Client,
        drain: DrainWatch,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let codec = match self.config.borrow().listener(dst).map(|l| &l.kind) {
            Some(ListenerKind::Http(http)) => http.codec,
            _ => {
                debug!(%dst, "no HTTP listener for the destination any more; closing");
                return;
            }
        };
        let (prefix, sniffed) = match codec {
            Codec::Http1 => (Vec::new(), Sniffed::Http1),
            Codec::Http2 => (Vec::new(), Sniffed::Http2),
            Codec::Auto => match tokio::time::timeout(SNIFF_TIMEOUT, sniff::sniff(&mut io)).await {
                Ok(Ok(p)) if p == sniff::H2_PREFACE => (p, Sniffed::Http2),
                Ok(Ok(p)) => (p, Sniffed::Http1),
                Ok(Err(e)) => {
                    debug!("reading the connection preface: {e}");
                    return;
                }
                Err(_) => {
                    debug!("no bytes within {SNIFF_TIMEOUT:?}; closing");
                    return;
                }
            },
        };
        self.serve_sniffed(io, prefix, sniffed, dst, client, drain)
            .await;
    }

    /// Like `serve`, for a connection whose first bytes were already read by `detect`
    /// (listeners with a `tcp_fallback`: the caller relays `Opaque` connections itself).
    /// `prefix` is replayed to the codec; `Http2` selects h2, anything else HTTP/1.x.
    ///
    /// When `drain` is signaled, the codec shuts the connection down gracefully: an HTTP/1.1
    /// connection answers the request in flight with `connection: close` and closes (an
    /// idle one closes at once), an HTTP/2 one sends GOAWAY and closes once its open
    /// streams are done. `drain` is held until then.
    pub async fn serve_sniffed<IO>(
        self: Arc<Self>,
        io: IO,
        prefix: Vec<u8>,
        sniffed: Sniffed,
        dst: SocketAddr,
        client: Client,
        drain: DrainWatch,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let listener = self.config.borrow().listener(dst).cloned();
        let Some(listener) = listener else {
            debug!(%dst, "no listener for the destination any more; closing");
            return;
        };
        let ListenerKind::Http(http) = &listener.kind else {
            debug!(%dst, "listener is not HTTP; closing");
            return;
        };
        let max_headers = http.max_request_headers_bytes;
        let own = sniffed != Sniffed::Http2 && self.h1_own();
        let io = sniff::Prefixed::new(prefix, io);
        let istio = Arc::new(self.istio_conn(&client.name, client.ip));
        let series = Arc::new(ConnSeries::new(self.metrics.clone(), client.name.clone()));
        let h1 = sniffed != Sniffed::Http2;
        let conn = Arc::new(Conn {
            dst,
            source: client.name,
            client_ip: client.ip,
            peer: client.peer,
            skmsg: client.skmsg,
            listener: listener.clone(),
            hops: Mutex::default(),
            istio,
            series,
            timer: h1.then(Timer::new),
            seen: Mutex::new(Seen {
                config: Weak::new(),
                listener: listener.clone(),
                cluster: None,
                state: None,
            }),
            upgraded: Mutex::default(),
        });
        if own {
            self.serve_own(io, conn, max_headers, drain).await;
            return;
        }
        if !h1 && self.h2_own() {
            self.serve_h2(io, conn, max_headers, drain).await;
            return;
        }
        let io = TokioIo::new(io);
        let served = conn.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let l7 = self.clone();
            let conn = conn.clone();
            async move {
                // HTTP/2: a client's `NO_ERROR` reset of a request stream fails its body
                // unless the response has gone out in full (hyper would end it cleanly).
                let (req, answered) = h2server::hyper_request(req);
                let resp = l7.handle(&conn, req).await;
                Ok::<_, Infallible>(h2server::hyper_response(resp, answered))
            }
        });
        let res = if sniffed == Sniffed::Http2 {
            let conn = http2::Builder::new(SpanExec)
                .timer(TokioTimer::new())
                .max_header_list_size(u32::try_from(max_headers).unwrap_or(u32::MAX))
                .serve_connection(io, svc);
            until_drained(conn, &drain, |c| c.graceful_shutdown()).await
        } else {
            // Headers over `max_header_size` get 431 from hyper; the read buffer leaves
            // room for them so that limit, not the buffer's, is the one that applies.
            let conn = http1::Builder::new()
                .timer(ConnTimer::default())
                .max_header_size(max_headers)
                .max_buf_size(max_headers.saturating_add(8192).max(16 * 1024))
                .serve_connection(io, svc)
                .with_upgrades();
            let res = until_drained(conn, &drain, |c| c.graceful_shutdown()).await;
            // Set when the last answer was an upstream's `101` (`upgrade`); hyper has
            // written it and handed the connection over (or failed to).
            let pending = served
                .upgraded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(p) = pending {
                match res {
                    Ok(()) => p.splice::<IO>(upgrade::IDLE_TIMEOUT, None).await,
                    Err(_) => p.abandon(),
                }
            }
            res
        };
        drop(drain);
        if let Err(e) = res {
            debug!("downstream connection ended: {e}");
        }
    }

    /// `serve_sniffed` on the own HTTP/1.1 codec (`server`).
    async fn serve_own<IO>(
        self: Arc<Self>,
        io: sniff::Prefixed<IO>,
        conn: Arc<Conn>,
        max_headers: usize,
        drain: DrainWatch,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let draining = AtomicBool::new(false);
        let timer = conn.timer.clone().unwrap_or_default();
        let settings = server::Settings {
            max_head: max_headers,
            timer: &timer,
            draining: &draining,
        };
        // Each request's future borrows the engine and the connection (no `Arc` taken per
        // request): both outlive the codec.
        let (l7, c) = (&*self, &*conn);
        let codec = server::serve(Box::new(io), settings, move |req| l7.handle(c, req));
        let mut end = None;
        let codec = async {
            end = Some(codec.await?);
            Ok::<(), io::Error>(())
        };
        let res = until_drained(codec, &drain, |_| draining.store(true, Relaxed))
            .await
            .map(|()| end.unwrap_or(server::End::Closed));
        // Set when the last answer was an upstream's `101` (`upgrade`).
        let pending = conn
            .upgraded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match (res, pending) {
            (Ok(server::End::Upgraded(io, early)), Some(p)) => {
                drop(drain);
                p.splice::<IO>(upgrade::IDLE_TIMEOUT, Some((io, early)))
                    .await;
            }
            (res, Some(p)) => {
                p.abandon();
                if let Err(e) = res {
                    debug!("downstream connection ended: {e}");
                }
            }
            (Err(e), None) => debug!("downstream connection ended: {e}"),
            (Ok(_), None) => {}
        }
    }

    /// `serve_sniffed` on the own HTTP/2 server (`h2server`): the connection's streams
    /// polled by this task.
    async fn serve_h2<IO>(
        self: Arc<Self>,
        io: sniff::Prefixed<IO>,
        conn: Arc<Conn>,
        max_headers: usize,
        drain: DrainWatch,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let draining = AtomicBool::new(false);
        let settings = h2server::Settings {
            max_header_list: u32::try_from(max_headers).unwrap_or(u32::MAX),
            draining: &draining,
        };
        let (l7, c) = (&*self, &*conn);
        let codec = h2server::serve(io, settings, move |req| l7.handle(c, req));
        let res = until_drained(codec, &drain, |_| draining.store(true, Relaxed)).await;
        drop(drain);
        if let Err(e) = res {
            debug!("downstream connection ended: {e}");
        }
    }

    /// One request of `conn`, answered.
    async fn handle(&self, conn: &Conn, req: Request<ReqBody>) -> Response<ProxyBody> {
        let start = Instant::now();
        let cfg = self.config.borrow().clone();
        self.prune(&cfg);
        let listener = self.conn_listener(conn, &cfg);
        let ListenerKind::Http(http) = &listener.kind else {
            return local(false, StatusCode::NOT_FOUND, "");
        };
        let log = self.request_log(conn, &listener.name, &req);
        let trace = self.trace.get().and_then(|t| {
            let d = crate::proxy::trace::Downstream {
                peer: conn.peer,
                client_ip: conn.client_ip,
                source: &conn.source,
                dst: conn.dst,
                service: &listener.name,
                authority: route::authority(&req),
                skmsg: conn.skmsg,
            };
            t.request(&req, d)
        });
        // Read once: the request's telemetry, local replies and routing all want it.
        let grpc = route::is_grpc(req.headers());
        let istio = RequestTelemetry::new(conn.istio.clone(), grpc);
        let mut rec = Some(Recorder {
            series: conn.series.clone(),
            labels: Labels {
                destination_cluster: Name::Static("unknown"),
                destination_service: Name::Listener(listener.clone()),
                route: Name::Static(""),
                response_code: 0,
            },
            start,
            log,
            istio: Some(istio),
            flags: Flags::default(),
            trace: trace.map(Box::new),
        });
        // HTTP/2: a timer of the request's own (`Timer::default`, armed on first use).
        let timer = conn.timer.clone().unwrap_or_default();
        let resp = self
            .dispatch(&cfg, conn, http, (req, grpc), &mut rec, &timer)
            .await;
        if let Some(mut r) = rec {
            r.labels.response_code = resp.status().as_u16();
            if let Some(t) = r.istio.as_mut() {
                t.sent = http_body::Body::size_hint(resp.body()).exact().unwrap_or(0);
            }
            // A local reply: its body is all there is.
            if let Some(l) = r.log.as_mut() {
                l.entry.bytes_sent = http_body::Body::size_hint(resp.body()).exact();
            }
        }
        resp
    }

    /// `req` with whether it is gRPC (`route::is_grpc`).
    async fn dispatch(
        &self,
        cfg: &Arc<ProxyConfig>,
        conn: &Conn,
        http: &HttpListener,
        (req, grpc): (Request<ReqBody>, bool),
        rec: &mut Option<Recorder>,
        timer: &Arc<Timer>,
    ) -> Response<ProxyBody> {
        // No route matches a CONNECT (Envoy's, without a `connect_matcher`): the engine
        // does not tunnel, and a 2xx would leave the client a tunnel closed at once.
        if req.method() == http::Method::CONNECT {
            flag(rec, Flags::NR);
            return local(grpc, StatusCode::NOT_FOUND, "");
        }
        let rc = &http.route_config;
        let Some(vhost) = route::virtual_host(rc, route::authority(&req).unwrap_or("")) else {
            flag(rec, Flags::NR);
            return local(grpc, StatusCode::NOT_FOUND, "");
        };
        let Some(route) = route::find(vhost, &req) else {
            flag(rec, Flags::NR);
            return local(grpc, StatusCode::NOT_FOUND, "");
        };
        if let Some(r) = rec.as_mut() {
            if let Name::Listener(l) = &r.labels.destination_service {
                // Indexes into the listener the label holds: no copy of the name.
                let v = rc.virtual_hosts.iter().position(|x| std::ptr::eq(x, vhost));
                let i = vhost.routes.iter().position(|x| std::ptr::eq(x, route));
                if let (Some(v), Some(i)) = (v, i) {
                    r.labels.route = Name::Route(l.clone(), v, i);
                }
            }
        }
        // The most specific rate limit replaces the others (Envoy's per-route override).
        let limit = route
            .rate_limit
            .as_ref()
            .or(vhost.rate_limit.as_ref())
            .or(http.rate_limit.as_ref());
        let mut limit_headers = None;
        if let Some(rl) = limit {
            let taken = self.buckets.take(rl, Instant::now());
            if !taken.allowed {
                self.metrics.rate_limited(&rl.key);
                flag(rec, Flags::RL);
                let status =
                    StatusCode::from_u16(rl.status).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
                let mut r = local(grpc, status, "local_rate_limited");
                if rl.x_ratelimit_headers {
                    taken.apply(r.headers_mut());
                }
                return r;
            }
            limit_headers = rl.x_ratelimit_headers.then_some(taken);
        }
        if let Some(fault) = route.fault.as_ref().or(http.fault.as_ref()) {
            if let Some((delay, ppm)) = fault.delay {
                if policy::roll(ppm) {
                    flag(rec, Flags::DI);
                    tokio::time::sleep(delay).await;
                }
            }
            if let Some((abort, ppm)) = fault.abort {
                if policy::roll(ppm) {
                    flag(rec, Flags::FI);
                    return match abort {
                        FaultAbort::Grpc(code) => grpc_reply(code, "fault filter abort"),
                        FaultAbort::Http(s) => local(
                            grpc,
                            StatusCode::from_u16(s).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                            "fault filter abort",
                        ),
                    };
                }
            }
        }
        let mut resp = match &route.action {
            RouteAction::Respond { status, body } => {
                let mut r = local(false, StatusCode::OK, body);
                *r.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
                r
            }
            RouteAction::Redirect { status, host, path } => {
                let mut r = Response::new(empty());
                *r.status_mut() =
                    StatusCode::from_u16(*status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
                let loc = route::redirect_location(&req, host.as_deref(), path.as_deref());
                if let Ok(v) = HeaderValue::from_str(&loc) {
                    r.headers_mut().insert(header::LOCATION, v);
                }
                r
            }
            RouteAction::Forward(fwd) => {
                self.forward(cfg, conn, http, vhost, route, fwd, (req, grpc), rec, timer)
                    .await
            }
        };
        for m in [
            &route.response_headers,
            &vhost.response_headers,
            &rc.response_headers,
        ] {
            route::apply_mutation(m, resp.headers_mut());
        }
        if let Some(t) = limit_headers {
            t.apply(resp.headers_mut());
        }
        resp
    }

    #[allow(clippy::too_many_arguments, reason = "one request's whole context")]
    async fn forward(
        &self,
        cfg: &Arc<ProxyConfig>,
        conn: &Conn,
        http: &HttpListener,
        vhost: &VirtualHost,
        route: &Route,
        fwd: &Forward,
        (req, grpc): (Request<ReqBody>, bool),
        rec: &mut Option<Recorder>,
        timer: &Arc<Timer>,
    ) -> Response<ProxyBody> {
        let Some(wc) = route::pick_weighted(fwd) else {
            flag(rec, Flags::NC);
            return local(grpc, StatusCode::SERVICE_UNAVAILABLE, "");
        };
        // Envoy's `NC`: the route names a cluster the configuration does not have.
        let Some((cluster, state)) = self.conn_cluster(conn, cfg, &wc.name) else {
            flag(rec, Flags::NC);
            return local(grpc, StatusCode::SERVICE_UNAVAILABLE, "");
        };
        if let Some(r) = rec.as_mut() {
            r.labels.destination_cluster = Name::Cluster(cluster.clone());
        }
        let cb = cluster.circuit_breaker;
        let Some(request_slot) = Slot::acquire(&state.counters, Gauge::Requests, cb.max_requests)
        else {
            self.metrics.circuit_open(&cluster.name);
            flag(rec, Flags::UO);
            return overloaded(grpc);
        };
        let hash = route::request_hash(&fwd.hash_headers, req.headers());
        // An upgrade goes to an HTTP/1.1 upstream only (HTTP/2 has no `Upgrade`): to
        // another, the request goes without its `Upgrade`, an ordinary request. Only a
        // request whose codec can hand its connection over (below) can switch: the
        // others' fields are not read for it.
        let upgradable = req.extensions().get::<OnUpgrade>().is_some()
            || req.extensions().get::<server::Upgradable>().is_some();
        let mut upgrade = if cluster.protocol == UpstreamProtocol::Http1 && upgradable {
            route::upgrade_offered(req.headers(), req.version())
        } else {
            None
        };
        let (mut parts, body) = req.into_parts();
        // The client's side of the connection once a `101` went out (hyper's, or the own
        // codec's).
        let mut client_side =
            upgrade
                .as_ref()
                .and_then(|_| match parts.extensions.remove::<OnUpgrade>() {
                    Some(u) => Some(ClientSide::Hyper(u)),
                    None => parts
                        .extensions
                        .remove::<server::Upgradable>()
                        .map(|_| ClientSide::Own),
                });
        if client_side.is_none() {
            upgrade = None;
        }
        let rc = &http.route_config;
        let mut up = route::upstream(
            parts,
            route,
            fwd,
            [
                &wc.request_headers,
                &route.request_headers,
                &vhost.request_headers,
                &rc.request_headers,
            ],
            cluster.protocol,
        );
        if let Some(p) = &upgrade {
            route::keep_upgrade(&mut up.headers, p.clone());
        }
        // No retry for an upgrade: after a `101` there is no request left to send again.
        let retry = match upgrade {
            Some(_) => None,
            None => fwd.retry_policy.as_ref().or(vhost.retry_policy.as_ref()),
        };
        let timeout = match (fwd.timeout, http.request_timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // One clock read serves the deadline and the first try (a retry reads it again).
        let mut now = Instant::now();
        let deadline = timeout.map(|t| now + t);
        let upstream_timeout = || {
            local(
                grpc,
                StatusCode::GATEWAY_TIMEOUT,
                "upstream request timeout",
            )
        };
        let mut source = Source::new(body, retry.is_some());
        // A bodiless request's count stays 0 without one (no allocation); an upgrade's
        // counts the bytes spliced after the switch.
        if source.has_body() || upgrade.is_some() {
            if let Some(l) = rec.as_mut().and_then(|r| r.log.as_mut()) {
                l.received = Some(source.received());
            }
            if let Some(t) = rec.as_mut().and_then(|r| r.istio.as_mut()) {
                t.received = Some(source.received());
            }
        }
        let mut unsent = None;
        let mut retries = 0;
        let mut _retry_slot = None;
        loop {
            if retries > 0 {
                now = Instant::now();
            }
            let per_try = retry.and_then(|p| p.per_try_timeout);
            let budget = match (per_try, deadline) {
                (Some(p), Some(d)) => Some(p.min(d.saturating_duration_since(now))),
                (p, d) => p.or(d.map(|d| d.saturating_duration_since(now))),
            };
            let Some(ep) = state.pick_at(&cluster, hash, now) else {
                flag(rec, Flags::UH);
                return local(grpc, StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
            };
            let hop = self.hop(conn, ep.address);
            self.log_try(rec, ep.address, &hop, retries + 1);
            let via = match (&hop, self.paths.get()) {
                (Hop::Tunnel(t), Some(p)) => Via::Tunnel(&**p, t),
                // Policy's verdict on this client, not the endpoint's fault: no retry, no
                // outlier report (`Secure::outbound` counted and logged it).
                (Hop::Denied(policy), _) => {
                    flag(rec, Flags::RBAC);
                    if let Some(e) = log_of(rec) {
                        e.flag(Flags::RBAC);
                        e.policy_verdict = Some(accesslog::Verdict::Deny);
                        e.policy_name = policy.as_deref().map(str::to_owned);
                        // Judged, never tried.
                        if let Some(h) = e.http.as_mut() {
                            h.attempts = 0;
                        }
                    }
                    return local(grpc, StatusCode::FORBIDDEN, "RBAC: access denied");
                }
                _ => Via::Tcp,
            };
            if let Some(t) = rec.as_mut().and_then(|r| r.trace.as_mut()) {
                let unsent = unsent.as_mut().map(Request::headers_mut);
                let tunnel = matches!(hop, Hop::Tunnel(_));
                t.start_try(&mut up.headers, unsent, &cluster.name, ep.address, tunnel);
            }
            let active = Active::new(ep.clone());
            // Without a retry policy there is one try: its request takes the head.
            let up = (&mut up, retry.is_none());
            let fresh = upgrade.is_some();
            // Pinned where it is built, in a scope that ends with the try: it is the
            // request's largest future, and handing it to the timer by value copied it
            // (twice) per request.
            let res = {
                let mut attempt = std::pin::pin!(self.try_once(
                    &state,
                    &cluster,
                    &ep,
                    via,
                    up,
                    &mut source,
                    &mut unsent,
                    fresh,
                ));
                let expires = budget.map(|b| now + b);
                std::future::poll_fn(|cx| {
                    if let Poll::Ready(r) = attempt.as_mut().poll(cx) {
                        return Poll::Ready(Some(r));
                    }
                    match expires {
                        Some(d) => timer.poll_expired(d, cx).map(|()| None),
                        None => Poll::Pending,
                    }
                })
                .await
                .unwrap_or(Err(TryFail::Timeout))
            };
            let outcome = match &res {
                Ok((r, _, _)) => TryOutcome::Response(r.status().as_u16(), r.headers()),
                Err(TryFail::Timeout) => TryOutcome::Timeout,
                Err(TryFail::Error(L7Error::Overflow { .. })) => {
                    self.metrics.circuit_open(&cluster.name);
                    flag(rec, Flags::UO);
                    return overloaded(grpc);
                }
                // The client's fault: the endpoint did nothing wrong, and no retry can
                // send a body that failed to arrive.
                Err(TryFail::Error(e @ L7Error::ClientBody { .. })) => {
                    debug!(cluster = %cluster.name, "{e}");
                    if let Some(l) = log_of(rec) {
                        l.connection_termination_details = Some(e.to_string());
                    }
                    return local(grpc, StatusCode::BAD_REQUEST, "malformed request body");
                }
                Err(TryFail::Error(
                    L7Error::Connect { .. }
                    | L7Error::ConnectTimeout { .. }
                    | L7Error::Tunnel { .. }
                    | L7Error::Handshake { .. },
                )) => TryOutcome::ConnectFailure,
                Err(TryFail::Error(L7Error::Reset { .. } | L7Error::Protocol { .. })) => {
                    TryOutcome::Reset
                }
            };
            if let Some(t) = rec.as_mut().and_then(|r| r.trace.as_mut()) {
                t.try_result(match outcome {
                    TryOutcome::Response(s, _) => Ok(s),
                    TryOutcome::Timeout => Err("timeout"),
                    TryOutcome::ConnectFailure => Err("connect_failure"),
                    TryOutcome::Reset => Err("reset"),
                });
            }
            if state.report(&cluster, &ep, outcome.is_failure()) {
                self.metrics.ejection(&cluster.name);
            }
            // The clock is read only when a retry is otherwise possible.
            let expired = || deadline.is_some_and(|d| Instant::now() >= d);
            let wants_retry = retry.filter(|p| {
                retries < p.num_retries
                    && policy::retriable(p, outcome)
                    && (unsent.is_some() || source.can_replay())
                    && !expired()
            });
            // Envoy's `URX`: the last try still failed and no retry was left.
            let exhausted = retry.is_some_and(|p| {
                retries > 0 && retries >= p.num_retries && policy::retriable(p, outcome)
            });
            if let Some(p) = wants_retry {
                // The retry budget: at most `max_retries` retries in flight per cluster.
                if let Some(slot) = Slot::acquire(&state.counters, Gauge::Retries, cb.max_retries) {
                    retries += 1;
                    self.metrics.retry(&cluster.name);
                    _retry_slot = Some(slot);
                    drop(res);
                    let wait = policy::backoff(p, retries);
                    if deadline.is_some_and(|d| Instant::now() + wait >= d) {
                        flag(rec, Flags::UT);
                        return upstream_timeout();
                    }
                    tokio::time::sleep(wait).await;
                    continue;
                }
                self.metrics.circuit_open(&cluster.name);
            }
            if exhausted {
                flag(rec, Flags::URX);
            }
            return match res {
                Ok((resp, sender, home)) => {
                    let (mut parts, inc) = resp.into_parts();
                    if let Some(io) = parts.extensions.remove::<h1::Upgraded>() {
                        // `h1` hands a `101` back only to a request with an `Upgrade`.
                        let switch = Switch {
                            offered: upgrade.take(),
                            client: client_side.take(),
                            io,
                            received: source.received(),
                        };
                        let finish = Finish {
                            recorder: None,
                            request_slot: Some(request_slot),
                            active,
                            sender: Some(sender),
                            home,
                            counters: state.counters.clone(),
                        };
                        return self.switched(
                            conn,
                            parts,
                            switch,
                            finish,
                            &wc.response_headers,
                            rec,
                        );
                    }
                    route::strip_hop_by_hop(&mut parts.headers, false);
                    route::apply_mutation(&wc.response_headers, &mut parts.headers);
                    // The downstream codec decides the version it speaks.
                    parts.version = Version::HTTP_11;
                    let recorder = rec.take().map(|mut r| {
                        r.labels.response_code = parts.status.as_u16();
                        r
                    });
                    let finish = Finish {
                        recorder,
                        request_slot: Some(request_slot),
                        active,
                        sender: Some(sender),
                        home,
                        counters: state.counters.clone(),
                    };
                    Response::from_parts(
                        parts,
                        Tracked::new(inc, finish, deadline.map(|d| (d, timer.clone())))
                            .boxed_unsync(),
                    )
                }
                Err(TryFail::Timeout) => {
                    flag(rec, Flags::UT);
                    upstream_timeout()
                }
                Err(TryFail::Error(e)) => {
                    debug!(cluster = %cluster.name, "{e}");
                    let f = match e {
                        L7Error::Reset { .. } | L7Error::Protocol { .. } => Flags::UC,
                        _ => Flags::UF,
                    };
                    flag(rec, f);
                    if let Some(l) = log_of(rec) {
                        l.flag(f);
                        l.connection_termination_details = Some(e.to_string());
                    }
                    let (reason, status) = match e {
                        L7Error::Reset { .. } => {
                            ("connection termination", StatusCode::SERVICE_UNAVAILABLE)
                        }
                        // Envoy's answer to an upstream that breaks the protocol.
                        L7Error::Protocol { .. } => ("protocol error", StatusCode::BAD_GATEWAY),
                        _ => ("connection failure", StatusCode::SERVICE_UNAVAILABLE),
                    };
                    local(
                        grpc,
                        status,
                        &format!(
                            "upstream connect error or disconnect/reset before headers. reset reason: {reason}"
                        ),
                    )
                }
            };
        }
    }

    /// An upstream's `101`: passed on to the client with its `Upgrade` headers, and the
    /// stream left for `serve_sniffed` to splice once hyper has written it (`upgrade`). A
    /// switch to a protocol the request did not offer is a protocol error (502), and the
    /// upstream, which switched, is reset.
    fn switched(
        &self,
        conn: &Conn,
        mut parts: http::response::Parts,
        s: Switch,
        mut finish: Finish,
        mutation: &crate::proxy::config::HeaderMutation,
        rec: &mut Option<Recorder>,
    ) -> Response<ProxyBody> {
        let chosen = s
            .offered
            .as_ref()
            .and_then(|o| route::upgrade_switched(&parts.headers, o));
        let taken = s.io.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (proto, client, (io, early)) = match (chosen, s.client, taken) {
            (Some(p), Some(c), Some(t)) => (p, c, t),
            (_, _, taken) => {
                const WHY: &str = "upstream switched to a protocol not offered";
                debug!(upgrade = ?parts.headers.get(header::UPGRADE), "{WHY}");
                flag(rec, Flags::UC);
                if let Some(l) = log_of(rec) {
                    l.connection_termination_details = Some(WHY.to_owned());
                }
                if let Some((io, _)) = taken {
                    upgrade::reset(io);
                }
                drop(finish);
                return local(false, StatusCode::BAD_GATEWAY, WHY);
            }
        };
        route::strip_hop_by_hop(&mut parts.headers, false);
        route::apply_mutation(mutation, &mut parts.headers);
        route::keep_upgrade(&mut parts.headers, proto);
        parts.version = Version::HTTP_11;
        finish.recorder = rec.take().map(|mut r| {
            r.labels.response_code = StatusCode::SWITCHING_PROTOCOLS.as_u16();
            r
        });
        *conn.upgraded.lock().unwrap_or_else(|e| e.into_inner()) = Some(upgrade::Pending {
            client,
            upstream: io,
            upstream_early: early,
            finish,
            received: s.received,
        });
        Response::from_parts(parts, empty())
    }

    /// One try: a connection (reaching `ep` `via` TCP or a tunnel), the request, the
    /// response head; with the connection and the pool it goes back to. `fresh`: on a
    /// new connection of its own (an upgrade, `pool::checkout`).
    #[expect(clippy::too_many_arguments, reason = "one try's whole context")]
    async fn try_once(
        &self,
        state: &ClusterState,
        cluster: &crate::proxy::config::Cluster,
        ep: &lb::EndpointState,
        via: Via<'_>,
        (up, last): (&mut route::Upstream, bool),
        source: &mut Source,
        unsent: &mut Option<Request<ProxyBody>>,
        fresh: bool,
    ) -> Result<(Response<UpBody>, Sender, Option<Arc<EndpointPool>>), TryFail> {
        let mut stale = 0;
        loop {
            let mut co = pool::checkout(&state.counters, ep, cluster, via, fresh).await?;
            let req = match unsent.take() {
                Some(r) => r,
                None if last => up.take_request(source.next()),
                None => up.request(source.next()),
            };
            match co.sender.send(req).await {
                Ok(resp) => return Ok((resp, co.sender, co.home)),
                Err(e) => {
                    if let Some(reason) = source.client_error() {
                        return Err(TryFail::Error(L7Error::ClientBody {
                            reason: reason.to_owned(),
                        }));
                    }
                    // A request that never left can go again, on a fresh connection when
                    // a kept-alive one had closed under it.
                    let back = e.request;
                    let retry_now = co.reused && back.is_some() && stale < STALE_CONNECTION_TRIES;
                    *unsent = back;
                    if retry_now {
                        stale += 1;
                        continue;
                    }
                    let addr = ep.address;
                    return Err(TryFail::Error(if e.error.is_protocol() {
                        L7Error::Protocol {
                            addr,
                            source: e.error,
                        }
                    } else {
                        L7Error::Reset {
                            addr,
                            source: e.error,
                        }
                    }));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod h2tests;
