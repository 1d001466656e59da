//! The node proxy, L4: accepts connections the connect hooks redirected, recovers each
//! one's original destination from `FLOWS` (keyed by the client's 4-tuple, which is the
//! accepted socket's peer and local address), connects there, and relays bytes both ways.
//!
//! Relay semantics: a FIN from one side becomes a `shutdown(SHUT_WR)` towards the other
//! (half-close), and a reset or error on either side resets the other one (`SO_LINGER 0`
//! then close), so a peer that sends RST is seen as RST, never as a clean end.

pub mod accesslog;
pub mod authz;
pub mod config;
pub mod hbone;
pub mod http;
pub mod inbound;
pub mod listeners;
mod relay;
pub mod secure;
#[cfg(test)]
mod testing;
pub mod trace;
pub mod workers;
pub mod xds;

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6},
    os::fd::AsFd,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex, Weak,
    },
    time::Duration,
};

use mesh_common::{flow_flags, maps::FlowInfo};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpSocket, TcpStream},
};
use tracing::{debug, info, warn, Instrument};

use self::accesslog::{AccessLog, Entry, Flags, PathTaken, Protocol, Verdict};
use self::http::{detect, Sniffed, L7};
use self::{
    config::{policy::MeshConfig, ListenerKind},
    xds::client::{Lookup, XdsClient},
};
use crate::{
    datapath::{
        close::{self, Far},
        writer::SharedRegistry,
        Maps,
    },
    lifecycle::drain::DrainWatch,
    metrics::{
        istio::{IstioLabels, Peer, TcpSeries},
        FlowCounters, FlowLabels, Metrics,
    },
    sys,
};

/// Relay buffer per direction (bytes).
const RELAY_BUFFER: usize = 32 * 1024;
/// Connect timeout towards the original destination.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "binding the outbound listener on {addr}: {source} (is another proxy using the port?)"
    )]
    Bind { addr: SocketAddr, source: io::Error },
}

/// One outbound listening socket (of either family's `SO_REUSEPORT` group,
/// `proxy::listeners`): what its accept loop needs, so every loop is the same code.
struct FamilyListener {
    /// Kept for the hand-over; the accept loop serves a duplicate registered with its
    /// worker's runtime.
    socket: std::net::TcpListener,
    /// The listener's own address when it is bound to one (every accepted socket's local
    /// address, no `getsockname` per connection); `None` for a wildcard address.
    local: Option<SocketAddr>,
}

impl FamilyListener {
    fn new(socket: std::net::TcpListener) -> Arc<FamilyListener> {
        let local = socket
            .local_addr()
            .ok()
            .filter(|a| !a.ip().is_unspecified());
        Arc::new(FamilyListener { socket, local })
    }
}

pub struct Outbound {
    /// The IPv4 outbound listeners (`--proxy-redirect`), a `SO_REUSEPORT` group: socket
    /// `i` is served by worker `i % workers`.
    listeners: Vec<Arc<FamilyListener>>,
    /// The IPv6 outbound listeners (`--proxy-redirect6`), where the datapath sends native
    /// IPv6 connections, served the same way; empty: IPv6 is not captured.
    listeners6: Vec<Arc<FamilyListener>>,
    /// Proxy workers (`--proxy-workers`), for the sibling count of `listen6`.
    workers: usize,
    /// When set: connect to same-node destinations from this (node) address and have
    /// sockops pair that leg too (IPv4 destinations from the first, IPv6 from the second).
    upstream_source: std::sync::OnceLock<Ipv4Addr>,
    upstream_source6: std::sync::OnceLock<Ipv6Addr>,
    maps: Arc<Maps>,
    metrics: Arc<Metrics>,
    registry: SharedRegistry,
    /// Service listeners (xDS): which destinations get L7 or a load-balanced TCP hop.
    xds: Arc<XdsClient>,
    l7: Arc<L7>,
    /// The zero-trust path (HBONE to other nodes, policy for same-node destinations);
    /// unset: every flow is plain.
    secure: std::sync::OnceLock<Arc<secure::Secure>>,
    /// Unset: no access log (nothing is built for it).
    access_log: std::sync::OnceLock<AccessLog>,
    /// Unset: no spans (`proxy::trace`).
    tracer: std::sync::OnceLock<trace::Tracer>,
    /// Series resolved for earlier connections, reused by the next ones of the same flow.
    kept: Mutex<KeptSeries>,
}

/// How long a listener with a TCP fallback waits for a client's first bytes before
/// treating the connection as opaque (server-first protocols send nothing).
const SNIFF_WAIT: Duration = Duration::from_millis(300);

/// An address as the mesh knows it: a v4-mapped IPv6 address (a dual-stack socket's
/// view of an IPv4 peer) as the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The original destination a flow record names (IPv4 as IPv4).
fn orig_dst(flow: &FlowInfo) -> SocketAddr {
    let dst = flow.orig_dst();
    SocketAddr::new(canonical(dst.ip()), dst.port())
}

/// How often each worker stamps its liveness and worker 0 refreshes `PROXY_HEALTH` (well
/// under the default 1 s after which the datapath takes the proxy as unable to serve).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(200);

/// Accept-queue length of each outbound listener (the kernel caps it at
/// `net.core.somaxconn`). Every captured connection of the node lands on these sockets,
/// so a burst of connects from many pods must not overflow them: tokio's default of 128
/// did, the kernel fell back to SYN cookies and dropped final ACKs, and some clients saw
/// a reset.
const LISTEN_BACKLOG: u32 = 4096;

impl Outbound {
    /// Binds the outbound listeners on `addr`, one per worker (`workers`) in a
    /// `SO_REUSEPORT` group, beside `inherited`, the listening sockets a running agent
    /// handed over (see `handover`), which are served first.
    pub fn bind(
        addr: SocketAddr,
        inherited: Vec<std::os::fd::OwnedFd>,
        workers: usize,
        maps: Arc<Maps>,
        metrics: Arc<Metrics>,
        registry: SharedRegistry,
        xds: Arc<XdsClient>,
    ) -> Result<Outbound, ProxyError> {
        let group = listeners::group(addr, inherited, workers, LISTEN_BACKLOG)
            .map_err(|source| ProxyError::Bind { addr, source })?;
        let l7 = L7::new(xds.config(), metrics.l7.clone());
        Ok(Outbound {
            listeners: group.into_iter().map(FamilyListener::new).collect(),
            listeners6: Vec::new(),
            workers,
            upstream_source: std::sync::OnceLock::new(),
            upstream_source6: std::sync::OnceLock::new(),
            maps,
            metrics,
            registry,
            xds,
            l7,
            secure: std::sync::OnceLock::new(),
            access_log: std::sync::OnceLock::new(),
            tracer: std::sync::OnceLock::new(),
            kept: Mutex::default(),
        })
    }

    /// Listens for captured native IPv6 connections on `addr` too (`--proxy-redirect6`),
    /// a group of listeners served as the IPv4 ones, beside `inherited`, the IPv6
    /// listeners a running agent handed over if they listen on `addr`.
    ///
    /// `SO_REUSEPORT`: an agent of hand-over protocol 1 does not pass its IPv6 listener on;
    /// this one then binds its own next to the old one's while both run.
    pub fn listen6(
        &mut self,
        addr: SocketAddrV6,
        inherited: Vec<std::os::fd::OwnedFd>,
    ) -> Result<(), ProxyError> {
        let addr = SocketAddr::V6(addr);
        let inherited_at = inherited.first().map(|fd| {
            fd.try_clone()
                .and_then(|d| std::net::TcpListener::from(d).local_addr())
                .ok()
        });
        let inherited = match inherited_at {
            Some(Some(a)) if a != addr => {
                // The old agent redirected IPv6 elsewhere: its queues are its own to drain.
                warn!(
                    inherited = %a,
                    %addr,
                    "the handed-over IPv6 listeners are on another address; binding new ones"
                );
                Vec::new()
            }
            _ => inherited,
        };
        let group = listeners::group(addr, inherited, self.workers, LISTEN_BACKLOG)
            .map_err(|source| ProxyError::Bind { addr, source })?;
        self.listeners6 = group.into_iter().map(FamilyListener::new).collect();
        Ok(())
    }

    /// Writes an access-log line per connection, and per request of the L7 engine.
    pub fn set_access_log(&self, log: AccessLog) {
        self.l7.set_access_log(log.clone());
        let _ = self.access_log.set(log);
    }

    /// Records a span per connection, and per request and try of the L7 engine.
    pub fn set_tracer(&self, t: trace::Tracer) {
        self.l7.set_tracer(t.clone());
        let _ = self.tracer.set(t);
    }

    /// Sends `entry` (if the access log is on) once `f` has filled in how it ended; the
    /// connection's span (if tracing is on) is made from it.
    fn log_end(&self, entry: Option<Box<Entry>>, f: impl FnOnce(&mut Entry)) {
        let Some(mut e) = entry else {
            return;
        };
        f(&mut e);
        e.finish();
        if let Some(t) = self.tracer.get() {
            t.connection(&e);
        }
        if let Some(log) = self.access_log.get() {
            log.send(e);
        }
    }

    /// The principals, and the destination's workload, of a flow from `client` to
    /// `target` as the mesh configuration in force knows them.
    fn describe(&self, e: &mut Entry, client: IpAddr, target: SocketAddr) {
        let Some(s) = self.secure.get() else {
            return;
        };
        let mesh = s.mesh_now();
        if let Some(w) = mesh.workloads.by_ip(client) {
            e.source_principal = Some(w.identity.to_string());
        }
        if let Some(w) = mesh.workloads.by_ip(target.ip()) {
            e.destination_principal = Some(w.identity.to_string());
            if e.destination_workload.is_none() {
                e.destination_workload = Some(format!("{}/{}", w.namespace, w.name));
            }
        }
    }

    /// Istio's labels of a flow from `client` (`src`: its `ns/name`) to `target` (`dst`:
    /// the registry's name for it) as `mesh`, the configuration in force, knows them.
    fn istio_labels(
        mesh: Option<&MeshConfig>,
        client: IpAddr,
        target: SocketAddr,
        (src, dst): (Option<&str>, Option<&str>),
        cluster: Option<&str>,
        mtls: bool,
    ) -> IstioLabels {
        let (mut source, mut destination) = (Peer::from_qualified(src), Peer::from_qualified(dst));
        if let Some(mesh) = mesh {
            if let Some(w) = mesh.workloads.by_ip(client) {
                source.principal = w.identity.to_string();
                w.label_peer(&mut source);
            }
            if let Some(w) = mesh.workloads.by_ip(target.ip()) {
                destination.principal = w.identity.to_string();
                destination.workload = w.name.clone();
                destination.namespace = w.namespace.clone();
                w.label_peer(&mut destination);
            }
        }
        IstioLabels::new("source", &source, &destination, cluster, "tcp", mtls)
    }

    /// The registry's `namespace/name` of a flow's source and destination workloads
    /// (`None`: not a workload of this node). An id names the same workload for the
    /// agent's life, so any moment's answer is the answer.
    fn names(&self, src_id: u32, dst_id: u32) -> Names {
        let r = self.registry.read().unwrap_or_else(|e| e.into_inner());
        (r.name(src_id), r.name(dst_id))
    }

    /// `namespace/name` of the workload at `ip`, an endpoint the proxy picked: as the
    /// mesh configuration in force knows it, else a workload of this node (`DESTS`).
    fn endpoint_name(&self, mesh: Option<&MeshConfig>, ip: IpAddr) -> Option<String> {
        let ip = canonical(ip);
        mesh.and_then(|m| m.workloads.by_ip(ip))
            .map(|w| format!("{}/{}", w.namespace, w.name))
            .or_else(|| {
                let id = self.maps.dest(ip)?.id;
                let r = self.registry.read().unwrap_or_else(|e| e.into_inner());
                r.name(id)
            })
    }

    /// A connection's L4 series and Istio series. Both are functions of `key` and of the
    /// mesh configuration in force (principals, names, `app`/`version` labels), so the
    /// handles resolved for one connection serve the next ones of the same flow while
    /// that configuration's version, and the Istio families (`tcp_generation`: nothing
    /// pruned since), stay the same, and while the L4 series is still rendered
    /// (`Metrics::flow_again`). Otherwise they are resolved from label strings and kept.
    /// Overflow series are never kept: each connection counted into one is counted as
    /// such.
    fn series(
        &self,
        key: &SeriesKey<'_>,
        names: &mut Option<Names>,
    ) -> (Arc<FlowCounters>, Arc<TcpSeries>) {
        let mesh = self.secure.get().map(|s| s.mesh_now());
        let version = mesh.as_ref().map_or(0, |m| m.version);
        let istio = &self.metrics.l7.istio;
        // Read before resolving: a prune after this makes what is resolved now stale.
        let generation = istio.tcp_generation();
        let hit = {
            let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
            kept.find(key)
                .filter(|k| k.version == version && k.generation == generation)
                .map(|k| (k.flow.clone(), k.istio.clone()))
        };
        if let Some((flow, series)) = hit {
            if let Some(flow) = self.metrics.flow_again(&flow) {
                return (flow, series);
            }
        }
        let (src, dst) = names.get_or_insert_with(|| self.names(key.src_id, key.dst_id));
        // A service's cluster picked `target`: the destination is the endpoint's workload,
        // not the original destination's (a VIP: none), as in the Istio series.
        let dst_workload = match key.cluster {
            Some(_) => self.endpoint_name(mesh.as_deref(), key.target.ip()),
            None => dst.clone(),
        };
        let (flow, flow_overflow) = self.metrics.flow_series(FlowLabels {
            source_workload: src.clone().unwrap_or_else(|| "unknown".into()),
            destination_address: key.target.to_string(),
            destination_workload: dst_workload.unwrap_or_else(|| "unknown".into()),
            skmsg: key.skmsg,
        });
        let labels = Self::istio_labels(
            mesh.as_deref(),
            key.client,
            key.target,
            (src.as_deref(), dst.as_deref()),
            key.cluster,
            key.path == PathKind::Tunnel,
        );
        let series = istio.tcp(match key.path {
            PathKind::Denied => labels.with_flags("RBAC"),
            _ => labels,
        });
        if !flow_overflow && !series.is_overflow() {
            self.kept
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keep(Kept {
                    src_id: key.src_id,
                    dst_id: key.dst_id,
                    client: key.client,
                    target: key.target,
                    skmsg: key.skmsg,
                    cluster: key.cluster.map(Box::from),
                    path: key.path,
                    version,
                    generation,
                    flow: Arc::downgrade(&flow),
                    istio: series.clone(),
                });
        }
        (flow, series)
    }

    /// Sends flows to mesh workloads of other nodes through HBONE, and judges same-node
    /// ones by policy (`proxy::secure`).
    pub fn set_secure(&self, s: Arc<secure::Secure>) {
        self.l7.set_secure(s.clone());
        let _ = self.secure.set(s);
    }

    /// The listening sockets, to hand over to the next agent (the group's first socket
    /// first).
    pub fn listener_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        self.listeners.iter().map(|l| l.socket.as_fd()).collect()
    }

    /// The IPv6 listening sockets (`--proxy-redirect6`), for the same hand-over.
    pub fn listener6_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        self.listeners6.iter().map(|l| l.socket.as_fd()).collect()
    }

    /// The L7 engine (its live state: outlier ejections, for `/config_dump`).
    pub fn l7(&self) -> Arc<L7> {
        self.l7.clone()
    }

    /// Pair the proxy's connections to same-node destinations too, connecting from `ip`
    /// (the node's address on the pod network, which the destination sees as the peer).
    pub fn pair_upstream_from(&self, ip: Ipv4Addr) {
        let _ = self.upstream_source.set(ip);
    }

    /// `pair_upstream_from` for IPv6 destinations (the node's IPv6 address on the pod
    /// network, `--proxy-redirect6`).
    pub fn pair_upstream6_from(&self, ip: Ipv6Addr) {
        let _ = self.upstream_source6.set(ip);
    }

    /// Connects to the original destination. For a same-node destination with upstream
    /// pairing on, bind first to learn our 4-tuple and announce it in `FLOWS`, so sockops
    /// pairs both ends when the connection is established; if anything in that fails, a
    /// plain connect.
    async fn connect_upstream(&self, dst: SocketAddr, flow: &FlowInfo) -> io::Result<TcpStream> {
        let local_dst = flow.dst_id != u32::MAX;
        let src = match dst {
            SocketAddr::V4(_) => self.upstream_source.get().map(|a| IpAddr::V4(*a)),
            SocketAddr::V6(_) => self.upstream_source6.get().map(|a| IpAddr::V6(*a)),
        };
        if let (Some(src), true) = (src, local_dst) {
            let sock = match dst {
                SocketAddr::V4(_) => TcpSocket::new_v4()?,
                SocketAddr::V6(_) => TcpSocket::new_v6()?,
            };
            if sock.bind(SocketAddr::new(src, 0)).is_ok() {
                if let Ok(local) = sock.local_addr() {
                    let info = FlowInfo {
                        flags: flow_flags::PROXIED | flow_flags::UPSTREAM,
                        ..*flow
                    };
                    if let Ok(key) = self
                        .maps
                        .announce_upstream(relay::sock_key(local, dst), info)
                    {
                        let r = sock.connect(dst).await;
                        if r.is_err() {
                            self.maps.forget_flow(key);
                        }
                        return r;
                    }
                }
                return sock.connect(dst).await;
            }
        }
        TcpStream::connect(dst).await
    }

    /// Why the proxy must not dial `ip` on a workload's behalf, if it must not (counted):
    /// "this host" and "this link" addresses of either family, and the node's own.
    fn refuse(&self, ip: IpAddr) -> Option<&'static str> {
        let ip = canonical(ip);
        if mesh_common::local_scope(&mesh_common::maps::ip_from(ip)) {
            self.metrics.refused_local_scope.fetch_add(1, Relaxed);
            Some("local_scope")
        } else if self.maps.is_node_addr(ip) {
            self.metrics.refused_node_address.fetch_add(1, Relaxed);
            Some("node_address")
        } else {
            None
        }
    }

    /// Starts an accept loop per listening socket on its worker (socket `i` of each
    /// family on worker `i % workers`), and the workers' liveness stamps (worker 0 beats
    /// the proxy heartbeat), all until the drain begins. Every connection task holds a
    /// clone of `drain` until it ends, so the drain's trigger can wait for them: HTTP
    /// connections are told to finish (`L7::serve`), TCP relays run until their streams
    /// end or the deadline passes (then the workers stop and `relay` resets them).
    pub fn serve(self: Arc<Self>, workers: &workers::Workers, drain: DrainWatch) {
        let n = workers.count();
        self.metrics.worker_accepts.init(n);
        for (family, group) in [
            ("outbound", &self.listeners),
            ("outbound6", &self.listeners6),
        ] {
            for (i, l) in group.iter().enumerate() {
                let w = i % n;
                let (me, l, drain) = (self.clone(), l.clone(), drain.clone());
                workers.handle(w).spawn(
                    me.accept_loop(l, w, drain).instrument(tracing::info_span!(
                        "listener",
                        family,
                        worker = w
                    )),
                );
            }
        }
        let maps = self.maps.clone();
        workers.start_liveness(
            {
                let drain = drain.clone();
                move || {
                    let drain = drain.clone();
                    Box::pin(async move { drain.signaled().await })
                }
            },
            move || {
                if let Err(e) = maps.beat() {
                    warn!(error = %e, "writing the proxy heartbeat failed");
                }
            },
        );
    }

    /// The accept loop of one listening socket, on worker `worker`.
    async fn accept_loop(
        self: Arc<Self>,
        listener: Arc<FamilyListener>,
        worker: usize,
        drain: DrainWatch,
    ) {
        let local = listener.local;
        let socket = match listener.socket.try_clone().and_then(TcpListener::from_std) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot serve an outbound listener");
                return;
            }
        };
        info!(addr = ?socket.local_addr().ok(), "outbound listener ready");
        // One drain future for the whole loop, not one (a receiver clone and a waiter)
        // per accepted connection.
        let drained = drain.signaled();
        tokio::pin!(drained);
        let mut next_id: u64 = 0;
        loop {
            // The drain first, so a burst of connections cannot delay it.
            tokio::select! {
                biased;
                () = &mut drained => {
                    info!("outbound listener closed; draining");
                    return;
                }
                r = socket.accept() => match r {
                    Ok((conn, peer)) => {
                        self.metrics.worker_accepts.add(worker);
                        let me = self.clone();
                        next_id += 1;
                        let id = next_id;
                        let drain = drain.clone();
                        tokio::spawn(async move {
                            me.handle(conn, peer, local, drain).await;
                        }.instrument(tracing::debug_span!("conn", worker, id, %peer)));
                    }
                    // Taken out of its group (a hand-over to an agent of an older
                    // protocol, `listeners::leave_group`): nothing more comes.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        info!("outbound listener shut down");
                        drained.await;
                        return;
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }

    /// Serves one accepted connection; `drain` is held until it ends (moved into the L7
    /// engine for HTTP, kept through the relay for TCP).
    /// `local` is the listener's own address (`None`: a wildcard, asked per connection).
    async fn handle(
        &self,
        client: TcpStream,
        peer: SocketAddr,
        local: Option<SocketAddr>,
        drain: DrainWatch,
    ) {
        let local = match local {
            Some(a) => a,
            None => match client.local_addr() {
                Ok(a) => a,
                Err(_) => return,
            },
        };
        // The client's address as the mesh knows it (a v4-mapped peer as IPv4).
        let pip = canonical(peer.ip());
        let key = self.maps.proxied_key(peer, local);
        let Some(flow) = self.maps.accepted_flow(&client, key) else {
            // Not a redirected connection (someone dialled the listener directly), or the
            // record was lost: there is nowhere to send it.
            self.metrics.orig_dst_missing.fetch_add(1, Relaxed);
            debug!("no original destination recorded; closing");
            let _ = sys::set_linger_zero(client.as_fd());
            return;
        };
        let dst = orig_dst(&flow);
        // The kernel side never captures these; a record that names one anyway (written by
        // hand, or by programs of another build) must not make the proxy dial, from the
        // node's namespace, an address that means "this host" there.
        if let Some(refused) = self.refuse(dst.ip()) {
            warn!(%dst, reason = refused, "refusing to dial a node-local destination for a workload; resetting the client");
            let _ = sys::set_linger_zero(client.as_fd());
            return;
        }
        // The workloads' names, looked up only where something needs them: the log line,
        // the L7 engine, a series resolved anew.
        let mut names: Option<Names> = None;
        let skmsg = flow.flags & flow_flags::SERVER_PAIRED != 0;
        let recorded =
            self.access_log.get().is_some_and(AccessLog::on) || self.tracer.get().is_some();
        let mut entry = recorded.then(|| {
            let (src_name, dst_name) = names
                .get_or_insert_with(|| self.names(flow.src_id, flow.dst_id))
                .clone();
            let mut e = Entry::new(
                Protocol::Tcp,
                if skmsg {
                    PathTaken::ProxiedSkMsg
                } else {
                    PathTaken::Proxied
                },
            );
            e.source_address = Some(accesslog::Addr::Sock(peer));
            e.source_workload = src_name;
            e.destination_address = Some(dst);
            e.destination_workload = dst_name;
            Box::new(e)
        });
        // The L7 engine's view of the client: zero trust needs its address.
        let l7_client = |names: &mut Option<Names>| http::Client {
            name: names
                .get_or_insert_with(|| self.names(flow.src_id, flow.dst_id))
                .0
                .clone()
                .unwrap_or_else(|| "unknown".into()),
            // Either family: the workload table holds both addresses of a dual-stack
            // workload, so an IPv6 client is found (identity, namespace, labels) as is.
            ip: Some(pip),
            peer: Some(peer),
            skmsg,
        };
        // A service listener for the destination: L7, or TCP to one of its endpoints.
        let mut target = dst;
        let mut prefix = Vec::new();
        let mut client = client;
        let mut istio_cluster = None;
        // A destination already known answers at once; only one being subscribed to on
        // demand makes (and boxes) the waiting future.
        let answer = match self.xds.lookup_now(target) {
            Some(answer) => answer,
            None => Box::pin(self.xds.await_listener(target)).await,
        };
        let listener = match answer {
            Lookup::Found(l) => Some(l),
            Lookup::Absent => None,
            // Never skip routing or policy silently: the workload's fail mode decides.
            Lookup::Unknown(why) if flow.flags & flow_flags::FAIL_CLOSED != 0 => {
                self.metrics.config_unknown_refused.fetch_add(1, Relaxed);
                debug!(%dst, why, "configuration unknown and the workload fails closed; resetting the client");
                let _ = sys::set_linger_zero(client.as_fd());
                return;
            }
            Lookup::Unknown(why) => {
                self.metrics.config_unknown_passed.fetch_add(1, Relaxed);
                debug!(%dst, why, "configuration unknown and the workload fails open; relaying as plain TCP");
                None
            }
        };
        if let Some(l) = listener {
            let tcp_cluster = match (&l.kind, &l.tcp_fallback) {
                (ListenerKind::Http(_), None) => {
                    // (TCP_NODELAY: inherited from the listener, see `listen`.)
                    // Boxed, here and below: the rarer paths' state stays out of every
                    // connection task's allocation (memory per held connection).
                    Box::pin(
                        self.l7
                            .clone()
                            .serve(client, target, l7_client(&mut names), drain),
                    )
                    .await;
                    return;
                }
                (ListenerKind::Http(_), Some(fallback)) => {
                    let (bytes, sniffed) = match Box::pin(detect(&mut client, SNIFF_WAIT)).await {
                        Ok(x) => x,
                        Err(e) => {
                            debug!(error = %e, "client went away before its first bytes");
                            return;
                        }
                    };
                    if sniffed != Sniffed::Opaque {
                        Box::pin(self.l7.clone().serve_sniffed(
                            client,
                            bytes,
                            sniffed,
                            target,
                            l7_client(&mut names),
                            drain,
                        ))
                        .await;
                        return;
                    }
                    prefix = bytes;
                    fallback.clone()
                }
                (ListenerKind::Tcp { cluster }, _) => cluster.clone(),
            };
            if let Some(e) = entry.as_mut() {
                e.destination_service = Some(l.name.clone());
                e.upstream_cluster = Some(tcp_cluster.clone());
            }
            istio_cluster = Some(tcp_cluster.clone());
            match self.l7.pick_endpoint(&tcp_cluster) {
                Some(ep) => target = ep,
                None => {
                    debug!(cluster = %tcp_cluster, "no healthy endpoint; resetting the client");
                    self.metrics.no_endpoint.fetch_add(1, Relaxed);
                    let _ = sys::set_linger_zero(client.as_fd());
                    self.log_end(entry, |e| {
                        e.flag(Flags::UH);
                        e.connection_termination_details = Some("no healthy upstream".into());
                    });
                    return;
                }
            }
        }
        if let Some(e) = entry.as_mut() {
            e.upstream_host = Some(target);
            self.describe(e, pip, target);
        }
        let path = match self.secure.get() {
            Some(s) => s.outbound(pip, target),
            None => secure::Path::Plain,
        };
        // The L4 series and Istio's: one label set each per connection, resolved here (or
        // kept from an earlier connection of the same flow); Istio's closed when this
        // function returns, whichever way.
        let (counters, istio) = self.series(
            &SeriesKey {
                src_id: flow.src_id,
                dst_id: flow.dst_id,
                client: pip,
                target,
                skmsg,
                cluster: istio_cluster.as_deref(),
                path: PathKind::of(&path),
            },
            &mut names,
        );
        counters.opened.fetch_add(1, Relaxed);
        istio.opened.inc();
        let _closed = CloseOnDrop(&istio);
        match path {
            secure::Path::Plain => {}
            secure::Path::Denied(v) => {
                counters.closed.fetch_add(1, Relaxed);
                let _ = sys::set_linger_zero(client.as_fd());
                self.log_end(entry, |e| {
                    e.flag(Flags::RBAC);
                    e.policy_verdict = Some(Verdict::Deny);
                    e.policy_name = v.policy_name.as_deref().map(str::to_owned);
                    e.connection_termination_details = Some(format!("denied: {v}"));
                });
                return;
            }
            secure::Path::Tunnel { src, dst, hbone } => {
                let s = self
                    .secure
                    .get()
                    .expect("a tunnel path comes from `secure`");
                let sent =
                    Box::pin(
                        s.hbone
                            .connect_from(&src, Some(peer), hbone, &dst.identity, target),
                    );
                let mut stream = match sent.await {
                    Ok(st) => st,
                    Err(err) => {
                        debug!(%target, %hbone, error = %err, "HBONE stream failed; resetting the client");
                        self.metrics.authz.tunnel_out_failures.fetch_add(1, Relaxed);
                        counters.connect_failures.fetch_add(1, Relaxed);
                        counters.closed.fetch_add(1, Relaxed);
                        let _ = sys::set_linger_zero(client.as_fd());
                        self.log_end(entry, |e| {
                            e.path_taken = PathTaken::Tunnel;
                            e.flag(Flags::UF);
                            e.connection_termination_details =
                                Some(format!("HBONE stream through {hbone}: {err}"));
                        });
                        return;
                    }
                };
                self.metrics.authz.tunnel_out.fetch_add(1, Relaxed);
                if !prefix.is_empty() {
                    if stream.write_all(&prefix).await.is_err() {
                        counters.closed.fetch_add(1, Relaxed);
                        let _ = sys::set_linger_zero(client.as_fd());
                        return;
                    }
                    counters.received.fetch_add(prefix.len() as u64, Relaxed);
                }
                istio.received.inc_by(prefix.len() as u64);
                let end = Box::pin(hbone::relay_tunnel_counted(
                    client,
                    stream,
                    &counters,
                    hbone::TcpSide::Source,
                    Some(&istio),
                ))
                .await;
                counters.closed.fetch_add(1, Relaxed);
                drop(drain);
                self.log_end(entry, |e| {
                    e.path_taken = PathTaken::Tunnel;
                    e.bytes_received = Some(end.from_tcp + prefix.len() as u64);
                    e.bytes_sent = Some(end.from_tunnel);
                    if let Err(err) = end.result {
                        e.connection_termination_details = Some(format!("reset: {err}"));
                    }
                });
                return;
            }
        }
        let connect = match target {
            t if t == dst => {
                Box::pin(tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    self.connect_upstream(dst, &flow),
                ))
                .await
            }
            t if self.kernel_relay() => {
                Box::pin(tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    self.connect_endpoint(t),
                ))
                .await
            }
            t => Box::pin(tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(t))).await,
        }
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")));
        let mut upstream = match connect {
            Ok(s) => s,
            Err(err) => {
                debug!(%target, error = %err, "upstream connect failed; resetting the client");
                counters.connect_failures.fetch_add(1, Relaxed);
                counters.closed.fetch_add(1, Relaxed);
                let _ = sys::set_linger_zero(client.as_fd());
                self.log_end(entry, |e| {
                    e.flag(Flags::UF);
                    e.connection_termination_details = Some(format!("upstream connect: {err}"));
                });
                return;
            }
        };
        if !prefix.is_empty() {
            // The bytes read while sniffing go first.
            if upstream.write_all(&prefix).await.is_err() {
                counters.closed.fetch_add(1, Relaxed);
                let _ = sys::set_linger_zero(client.as_fd());
                return;
            }
            counters.received.fetch_add(prefix.len() as u64, Relaxed);
            istio.received.inc_by(prefix.len() as u64);
        }
        // The client's socket has TCP_NODELAY from the listener (`listen`).
        let _ = upstream.set_nodelay(true);
        let armed = relay::arm(&self.maps, &client, &upstream, key, prefix.len());
        // Which legs can have a far end closing with bytes unread (`close::take_far_unread`):
        // the client's if our accepted socket was paired (its addresses known); the
        // upstream's only where upstream legs are paired at all.
        let far_client = if skmsg {
            Far::Addrs { local, peer }
        } else {
            Far::Unpaired
        };
        let pairs_upstream = match target {
            SocketAddr::V4(_) => self.upstream_source.get().is_some(),
            SocketAddr::V6(_) => self.upstream_source6.get().is_some(),
        };
        let far_upstream = if pairs_upstream {
            Far::Ask
        } else {
            Far::Unpaired
        };
        let back = armed.as_ref().and_then(|a| a.back_gate());
        let end = relay_gated(
            client,
            upstream,
            &counters,
            Some(&istio),
            [far_client, far_upstream],
            back.as_ref(),
        )
        .await;
        let end = relay::finish(&self.maps, armed, end, &counters, Some(&istio));
        counters.closed.fetch_add(1, Relaxed);
        drop(drain);
        self.log_end(entry, |e| {
            let prefix = prefix.len() as u64;
            e.bytes_received = Some(end.received + prefix);
            e.bytes_sent = Some(end.sent);
            if end.reset {
                e.connection_termination_details = Some("reset".into());
            }
        });
    }
}

/// A flow's source and destination workload names (`namespace/name`), from the registry.
type Names = (Option<String>, Option<String>);

/// How a connection leaves the proxy, as far as its series' labels tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathKind {
    Plain,
    /// Through the HBONE tunnel: `connection_security_policy="mutual_tls"`.
    Tunnel,
    /// Refused by policy: `response_flags="RBAC"`.
    Denied,
}

impl PathKind {
    fn of(p: &secure::Path) -> PathKind {
        match p {
            secure::Path::Plain => PathKind::Plain,
            secure::Path::Tunnel { .. } => PathKind::Tunnel,
            secure::Path::Denied(_) => PathKind::Denied,
        }
    }
}

/// What a connection's series are resolved from, besides the mesh configuration.
#[derive(Debug, Clone, Copy)]
struct SeriesKey<'a> {
    src_id: u32,
    dst_id: u32,
    client: IpAddr,
    target: SocketAddr,
    skmsg: bool,
    cluster: Option<&'a str>,
    path: PathKind,
}

/// The series resolved for one `SeriesKey`, with what they were resolved against.
struct Kept {
    src_id: u32,
    dst_id: u32,
    client: IpAddr,
    target: SocketAddr,
    skmsg: bool,
    cluster: Option<Box<str>>,
    path: PathKind,
    /// The mesh configuration's version (0: no zero-trust path, labels from names only).
    version: u64,
    /// `Istio::tcp_generation` before resolving.
    generation: u64,
    /// Weak: a kept series must not look live to the L4 series' eviction, which drops
    /// only series no connection holds.
    flow: Weak<FlowCounters>,
    istio: Arc<TcpSeries>,
}

/// Most flows whose series are kept; past it, the oldest kept is replaced. A scan of at
/// most this many small entries per connection, against label strings and four hashed
/// map lookups.
const KEPT_SERIES: usize = 64;

#[derive(Default)]
struct KeptSeries {
    entries: Vec<Kept>,
    /// The entry the next new flow replaces once `entries` is full.
    next: usize,
}

impl Kept {
    fn is(&self, k: &SeriesKey<'_>) -> bool {
        self.src_id == k.src_id
            && self.dst_id == k.dst_id
            && self.client == k.client
            && self.target == k.target
            && self.skmsg == k.skmsg
            && self.path == k.path
            && self.cluster.as_deref() == k.cluster
    }
}

impl KeptSeries {
    fn find(&self, k: &SeriesKey<'_>) -> Option<&Kept> {
        self.entries.iter().find(|e| e.is(k))
    }

    /// Keeps `new`, in place of the same flow's stale entry if there is one.
    fn keep(&mut self, new: Kept) {
        let same = self.entries.iter().position(|e| {
            e.is(&SeriesKey {
                src_id: new.src_id,
                dst_id: new.dst_id,
                client: new.client,
                target: new.target,
                skmsg: new.skmsg,
                cluster: new.cluster.as_deref(),
                path: new.path,
            })
        });
        if let Some(i) = same {
            self.entries[i] = new;
        } else if self.entries.len() < KEPT_SERIES {
            self.entries.push(new);
        } else {
            self.entries[self.next] = new;
            self.next = (self.next + 1) % KEPT_SERIES;
        }
    }
}

/// Counts a connection's close in its Istio series when dropped (every return of
/// `handle` after the open).
struct CloseOnDrop<'a>(&'a TcpSeries);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.closed.inc();
    }
}

/// How a relay ended: this connection's bytes each way, and whether it ended in a reset.
#[derive(Debug, Clone, Copy, Default)]
pub struct RelayEnd {
    /// From the client (request direction).
    pub received: u64,
    /// To the client (response direction).
    pub sent: u64,
    pub reset: bool,
}

/// Relay buffers, taken when a socket has bytes to read and given back as soon as it has
/// none: a held connection that is silent holds no buffer (memory per held connection,
/// issue 13). Each thread keeps a few for the next reader.
mod relay_buffers {
    use std::{
        cell::RefCell,
        ops::{Deref, DerefMut},
    };

    use super::RELAY_BUFFER;

    /// Free buffers kept per thread (`KEEP` x 32 KiB); more are freed.
    const KEEP: usize = 8;

    thread_local! {
        static FREE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    }

    /// A buffer that goes back to its thread's free list when dropped.
    pub(super) struct Buffer(Option<Box<[u8]>>);

    impl Buffer {
        pub(super) fn take() -> Buffer {
            let b = FREE
                .with(|f| f.borrow_mut().pop())
                .unwrap_or_else(|| vec![0u8; RELAY_BUFFER].into_boxed_slice());
            Buffer(Some(b))
        }
    }

    impl Deref for Buffer {
        type Target = [u8];
        fn deref(&self) -> &[u8] {
            self.0.as_deref().expect("held until drop")
        }
    }

    impl DerefMut for Buffer {
        fn deref_mut(&mut self) -> &mut [u8] {
            self.0.as_deref_mut().expect("held until drop")
        }
    }

    impl Drop for Buffer {
        fn drop(&mut self) {
            if let Some(b) = self.0.take() {
                // A thread being torn down has no free list any more: the buffer is freed.
                let _ = FREE.try_with(|f| {
                    let mut f = f.borrow_mut();
                    if f.len() < KEEP {
                        f.push(b);
                    }
                });
            }
        }
    }
}

/// One read from `from` into `buf`: the bytes read, and whether the read emptied the
/// socket's receive queue. With `tcp_only` (a socket that was never paired, so TCP's
/// receive queue is its only source) a read shorter than `buf` did: TCP copies everything
/// queued up to the buffer's length. The socket's readiness is cleared then, without the
/// read that would only answer `EAGAIN`: one system call less per relayed message (a
/// ping-pong relay read twice per message, as haproxy does not). No wake-up is lost: the
/// readiness is cleared only if no event came for the socket since before the read
/// (tokio compares its event tick), and bytes that arrive after the read raise a new
/// edge-triggered event. A paired socket also reads from its sk_msg queue, where a short
/// read says nothing of TCP's queue: it reads until `EAGAIN`, as before. The exception
/// is TCP urgent data (`MSG_OOB`, which RFC 6093 tells applications not to use): a read
/// stops at its mark, and bytes queued after it wait for the socket's next event.
fn read_once(from: &TcpStream, buf: &mut [u8], tcp_only: bool) -> io::Result<(usize, bool)> {
    if !tcp_only {
        return from.try_read(buf).map(|n| (n, false));
    }
    let mut n = 0;
    let len = buf.len();
    let r = from.try_io(tokio::io::Interest::READABLE, || {
        n = from.try_read(buf)?;
        if n > 0 && n < len {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    match r {
        Ok(()) => Ok((n, false)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && n > 0 => Ok((n, true)),
        Err(e) => Err(e),
    }
}

/// What a pipe reads: a socket of the runtime's (`TcpSource`), or the egress relay's leg
/// P_u, watched on its own (`UpSource`).
trait Source {
    /// Waits until the socket may have bytes, its end or an error; `written`: what the
    /// pipe wrote so far (the egress relay's gate publishes it).
    async fn ready(&mut self, written: u64) -> io::Result<()>;
    /// One read (`read_once`): the bytes, and whether the read emptied the socket.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<(usize, bool)>;
    /// The socket's local and peer addresses.
    fn addrs(&self) -> Option<(SocketAddr, SocketAddr)>;
}

/// A socket of the runtime's; `tcp_only`: it was never paired (`read_once`).
struct TcpSource<'a> {
    from: &'a TcpStream,
    tcp_only: bool,
}

impl Source for TcpSource<'_> {
    async fn ready(&mut self, _written: u64) -> io::Result<()> {
        self.from.readable().await
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<(usize, bool)> {
        read_once(self.from, buf, self.tcp_only)
    }

    fn addrs(&self) -> Option<(SocketAddr, SocketAddr)> {
        self.from.local_addr().ok().zip(self.from.peer_addr().ok())
    }
}

/// `UpSource`'s masks of P_u in its own epoll: watching its receive queue, and quiet
/// (its end and its errors only: `EPOLLERR` and `EPOLLHUP` are always reported). A
/// data-ready wake-up carries `EPOLLIN` as its key, which a quiet mask does not match:
/// epoll neither queues P_u nor wakes anyone.
const UP_WATCH: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
const UP_QUIET: u32 = (libc::EPOLLRDHUP | libc::EPOLLET) as u32;

/// How long a quiet flow waits before it looks at P_u itself, doubling up to
/// `QUIET_LOOK_MAX` while nothing comes. A lost `RELAY_WAKE` record (full ring, counted as
/// `relay_wake_dropped`) does not wait for it: the reader then wakes every quiet flow. So
/// the look is a last resort (a reader that missed the count), and an idle relayed flow
/// wakes the proxy about once a minute, not every 5 s.
const QUIET_LOOK: Duration = Duration::from_millis(100);
const QUIET_LOOK_MAX: Duration = Duration::from_secs(60);

/// The quiet flow's next look: back to `QUIET_LOOK` after a wake-up, else doubled up to
/// `QUIET_LOOK_MAX`.
fn next_look(look: Duration, woke: bool) -> Duration {
    if woke {
        QUIET_LOOK
    } else {
        (look * 2).min(QUIET_LOOK_MAX)
    }
}

/// The egress kernel relay's leg P_u, read by the destination's pipe. Out of the
/// runtime's epoll for reading (the runtime registers every socket for `EPOLLIN`): P_u
/// sits in an epoll of its own (`ep`, itself watched by the runtime), whose mask drops
/// `EPOLLIN` while the kernel relays the destination's bytes (`BackGate::quiet`), so
/// the psock's data-ready after each relayed segment wakes no thread. The proxy then
/// wakes on P_u's end or error (`UP_QUIET`), the program's `RELAY_WAKE` record for a
/// segment it handed to the proxy, or its own slow look (`QUIET_LOOK`).
struct UpSource<'a> {
    sock: &'a tokio::io::unix::AsyncFd<std::net::TcpStream>,
    ep: &'a tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    gate: &'a crate::datapath::relay::BackGate<'a>,
    look: Duration,
}

/// P_u taken out of the runtime's epoll for reading: registered for `EPOLLOUT` only (the
/// up pipe's writes), and in an epoll of its own (`UP_WATCH`, for `UpSource`). `Err`
/// gives the socket back as it was (the flow then relays as without the gate's quiet
/// mode) or, if taking it out failed half-way, nothing (the socket is closed: reset).
fn own_leg(
    upstream: TcpStream,
) -> Result<
    (
        tokio::io::unix::AsyncFd<std::net::TcpStream>,
        tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    ),
    Option<TcpStream>,
> {
    use std::os::fd::AsRawFd;
    use tokio::io::Interest;
    let ep = sys::epoll_create()
        .and_then(|ep| {
            sys::epoll_set(ep.as_fd(), upstream.as_raw_fd(), UP_WATCH, true).map(|()| ep)
        })
        .and_then(|ep| register(ep, Interest::READABLE));
    let Ok(ep) = ep else {
        return Err(Some(upstream));
    };
    let std = upstream.into_std().map_err(|_| None)?;
    match try_register(std, Interest::WRITABLE) {
        Ok(pu) => Ok((pu, ep)),
        Err(e) => {
            let (std, _) = e.into_parts();
            Err(TcpStream::from_std(std).ok())
        }
    }
}

/// `AsyncFd::with_interest`: deprecated for fds that could be closed while registered,
/// which cannot happen here (the `AsyncFd` owns the socket or epoll fd it registers).
#[expect(
    deprecated,
    reason = "the AsyncFd owns its fd for as long as it is registered"
)]
fn register<T: std::os::fd::AsRawFd>(
    inner: T,
    interest: tokio::io::Interest,
) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    tokio::io::unix::AsyncFd::with_interest(inner, interest)
}

/// `register`, giving `inner` back on failure.
#[expect(
    deprecated,
    reason = "the AsyncFd owns its fd for as long as it is registered"
)]
fn try_register<T: std::os::fd::AsRawFd>(
    inner: T,
    interest: tokio::io::Interest,
) -> Result<tokio::io::unix::AsyncFd<T>, tokio::io::unix::AsyncFdTryNewError<T>> {
    tokio::io::unix::AsyncFd::try_with_interest(inner, interest)
}

/// Runs both directions of a relay until both ended; whether one failed.
async fn both(
    up: impl std::future::Future<Output = io::Result<()>>,
    down: impl std::future::Future<Output = io::Result<()>>,
) -> bool {
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    loop {
        tokio::select! {
            r = &mut up, if !up_done => { up_done = true; if r.is_err() { return true; } }
            r = &mut down, if !down_done => { down_done = true; if r.is_err() { return true; } }
        }
        if up_done && down_done {
            return false;
        }
    }
}

impl UpSource<'_> {
    /// Waits for P_u's own epoll and takes its events.
    async fn watched(&self) -> io::Result<()> {
        let mut g = self.ep.readable().await?;
        sys::epoll_drain(self.ep.as_fd())?;
        g.clear_ready();
        Ok(())
    }
}

impl Source for UpSource<'_> {
    async fn ready(&mut self, written: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let fd = self.sock.get_ref().as_raw_fd();
        let Some(wake) = self.gate.wake().cloned() else {
            return self.watched().await;
        };
        // The mask first: a segment that comes from here on either finds the flag set
        // (a wake-up record) or is found by `quiet`.
        sys::epoll_set(self.ep.as_fd(), fd, UP_QUIET, false)?;
        if !self.gate.quiet(written, fd) {
            // Watching again; a segment already queued raises an event at once.
            sys::epoll_set(self.ep.as_fd(), fd, UP_WATCH, false)?;
            return self.watched().await;
        }
        let woke = tokio::select! {
            r = self.watched() => Some(r),
            _ = wake.notified() => Some(Ok(())),
            _ = tokio::time::sleep(self.look) => None,
        };
        self.look = next_look(self.look, woke.is_some());
        let r = woke.unwrap_or(Ok(()));
        // Watching again before the flag goes: the pipe reads what came.
        sys::epoll_set(self.ep.as_fd(), fd, UP_WATCH, false)?;
        self.gate.publish(written);
        r
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<(usize, bool)> {
        use std::io::Read;
        let mut s: &std::net::TcpStream = self.sock.get_ref();
        s.read(buf).map(|n| (n, false))
    }

    fn addrs(&self) -> Option<(SocketAddr, SocketAddr)> {
        let s = self.sock.get_ref();
        s.local_addr().ok().zip(s.peer_addr().ok())
    }
}

/// The proxy's leg to the destination in a relay: a socket of the runtime's, or the egress
/// relay's P_u with its own epoll (`own_leg`).
enum Up {
    Runtime(TcpStream),
    Own(
        tokio::io::unix::AsyncFd<std::net::TcpStream>,
        tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    ),
}

/// The write side of the egress relay's leg P_u (registered with the runtime for
/// `EPOLLOUT` only: see `UpSource`).
struct UpWriter<'a>(&'a tokio::io::unix::AsyncFd<std::net::TcpStream>);

impl tokio::io::AsyncWrite for UpWriter<'_> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        use std::io::Write;
        loop {
            let mut g = std::task::ready!(self.0.poll_write_ready(cx))?;
            if let Ok(r) = g.try_io(|s| {
                let mut s: &std::net::TcpStream = s.get_ref();
                s.write(buf)
            }) {
                return std::task::Poll::Ready(r);
            }
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(self.0.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

/// Copies one direction, counted in `count` (a series) and `own` (this connection); a
/// clean EOF half-closes the writer. A buffer is held only while the reader has bytes.
/// `far`: what is known of the reader's far end (`close::take_far_unread`).
async fn pipe(
    mut from: impl Source,
    mut w: impl tokio::io::AsyncWrite + Unpin,
    count: &AtomicU64,
    own: &AtomicU64,
    istio: Option<&prometheus_client::metrics::counter::Counter>,
    far: Far,
    back: Option<&crate::datapath::relay::BackGate<'_>>,
) -> io::Result<()> {
    // With `back` (the egress kernel relay's destination direction): what this pipe wrote,
    // and since when an EOF came short of the bytes the program passed (read again).
    let mut written: u64 = 0;
    let mut short_eof: Option<std::time::Instant> = None;
    loop {
        from.ready(written).await?;
        let mut buf = relay_buffers::Buffer::take();
        loop {
            let (n, drained) = match from.read(&mut buf) {
                Ok(r) => r,
                // Past a short EOF the socket raises no new event: read again (below).
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && short_eof.is_some() => {
                    (0, false)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            if n == 0 {
                // Every byte the program passed must have been read and written before
                // the FIN goes: one it deferred (the psock's worker) can reach P_u's
                // receive queue after the FIN. Read again for a while; still short, the
                // client gets a reset, never a clean end short of bytes.
                if let Some(g) = back {
                    use crate::datapath::relay::AtEof;
                    match g.at_eof(written, short_eof) {
                        AtEof::Complete => {}
                        AtEof::Retry { .. } => {
                            short_eof.get_or_insert_with(std::time::Instant::now);
                            tokio::time::sleep(Duration::from_millis(2)).await;
                            continue;
                        }
                        AtEof::Short { unread } => {
                            tracing::warn!(unread, written, "egress kernel relay: the destination's EOF came short of bytes the kernel passed to the proxy; resetting both ends");
                            return Err(io::Error::new(
                                io::ErrorKind::ConnectionReset,
                                format!("{unread} bytes passed by the kernel relay never reached the proxy"),
                            ));
                        }
                    }
                }
                drop(buf);
                // A far end that was a paired socket closed with bytes unread: plain TCP
                // would have answered with a reset, so the other side gets one too
                // (docs/architecture.md, "A paired socket closed with unread bytes").
                if let Some((peer, unread)) = close::take_far_unread(far, || from.addrs()) {
                    tracing::info!(%peer, unread, "peer closed with {unread} unread bytes; resetting the other side");
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        format!("{peer} closed with {unread} bytes unread"),
                    ));
                }
                // The kernel may still hold relayed bytes for the writer (its backlog
                // queue): the FIN goes behind them, or, if that cannot be confirmed, the
                // other side gets a reset rather than a short stream that looks complete.
                if let Some(g) = back {
                    if !g.wait_drained(written, Some(BACK_STALL)).await {
                        return Err(io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            "the kernel relay's bytes did not all leave the client socket",
                        ));
                    }
                }
                w.shutdown().await?;
                return Ok(());
            }
            // A late segment read: the wait for the rest starts again (a slow client
            // below may hold the write; the flow is still making progress).
            if short_eof.is_some() {
                short_eof = Some(std::time::Instant::now());
            }
            if let Some(g) = back {
                // Behind every byte the kernel relayed (it went back to the proxy only
                // because the writer's backlog was full).
                if !g.wait_drained(written, None).await {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "the client socket failed under the kernel relay",
                    ));
                }
            }
            w.write_all(&buf[..n]).await?;
            if let Some(g) = back {
                written += n as u64;
                g.publish(written);
            }
            count.fetch_add(n as u64, Relaxed);
            own.fetch_add(n as u64, Relaxed);
            if let Some(c) = istio {
                c.inc_by(n as u64);
            }
            if drained && short_eof.is_none() {
                break;
            }
        }
    }
}

/// Relays until both directions ended; on an error in either, resets both sockets.
///
/// Both sockets are armed to reset (`SO_LINGER 0`) for as long as the relay runs and
/// disarmed only once both directions ended cleanly: whatever else closes them (the
/// process killed, the runtime dropped at the end of a drain, a task cancelled) ends the
/// stream with a reset both apps see, never with a FIN that makes a cut transfer look
/// complete.
pub async fn relay(client: TcpStream, upstream: TcpStream, c: &FlowCounters) -> RelayEnd {
    relay_counted(client, upstream, c, None, [Far::Ask; 2]).await
}

/// How long the half-close of the client waits for the kernel relay's bytes to leave the
/// client socket without any of them moving (a client that stopped reading).
const BACK_STALL: std::time::Duration = std::time::Duration::from_secs(60);

/// `relay_gated` without the egress relay's gate.
async fn relay_counted(
    client: TcpStream,
    upstream: TcpStream,
    c: &FlowCounters,
    istio: Option<&TcpSeries>,
    far: [Far; 2],
) -> RelayEnd {
    relay_gated(client, upstream, c, istio, far, None).await
}

/// `relay`, counting into the connection's Istio series too; `far`: what is known of
/// the client's and the upstream's far ends (`close::take_far_unread`); `back`: the egress
/// kernel relay's gate of the upstream-to-client copy.
async fn relay_gated(
    mut client: TcpStream,
    upstream: TcpStream,
    c: &FlowCounters,
    istio: Option<&TcpSeries>,
    far: [Far; 2],
    back: Option<&crate::datapath::relay::BackGate<'_>>,
) -> RelayEnd {
    let _ = sys::set_linger_zero(client.as_fd());
    let _ = sys::set_linger_zero(upstream.as_fd());
    let (received, sent) = (AtomicU64::new(0), AtomicU64::new(0));
    // The egress relay's destination direction: P_u watched on its own (`UpSource`).
    let quiet = back.filter(|g| g.wake().is_some());
    let own = match quiet {
        None => Err(Some(upstream)),
        Some(_) => own_leg(upstream),
    };
    let mut upstream = match own {
        Ok((pu, ep)) => Up::Own(pu, ep),
        Err(Some(upstream)) => Up::Runtime(upstream),
        Err(None) => {
            debug!("the egress relay's upstream leg was lost leaving the runtime's epoll; resetting the client");
            return RelayEnd {
                received: 0,
                sent: 0,
                reset: true,
            };
        }
    };
    let failed = {
        let (cr, cw) = client.split();
        let up_src = TcpSource {
            from: cr.as_ref(),
            tcp_only: far[0] == Far::Unpaired,
        };
        let up_count = (&c.received, &received, istio.map(|i| &i.received));
        let down_count = (&c.sent, &sent, istio.map(|i| &i.sent));
        match (&mut upstream, quiet) {
            (Up::Runtime(upstream), _) => {
                let (ur, uw) = upstream.split();
                let down_src = TcpSource {
                    from: ur.as_ref(),
                    tcp_only: far[1] == Far::Unpaired,
                };
                let (count, own, istio) = up_count;
                let up = pipe(up_src, uw, count, own, istio, far[0], None);
                let (count, own, istio) = down_count;
                let down = pipe(down_src, cw, count, own, istio, far[1], back);
                both(up, down).await
            }
            // An own leg only with the gate (`own_leg` above).
            (Up::Own(pu, ep), Some(gate)) => {
                let down_src = UpSource {
                    sock: pu,
                    ep,
                    gate,
                    look: QUIET_LOOK,
                };
                let (count, own, istio) = up_count;
                let up = pipe(up_src, UpWriter(pu), count, own, istio, far[0], None);
                let (count, own, istio) = down_count;
                let down = pipe(down_src, cw, count, own, istio, far[1], back);
                // Boxed: only egress-relayed flows pay for this branch's larger state; an
                // ordinary connection's future stays the size of the branch above.
                Box::pin(both(up, down)).await
            }
            (Up::Own(..), None) => true,
        }
    };
    if !failed {
        let _ = sys::clear_linger(client.as_fd());
        let _ = sys::clear_linger(match &upstream {
            Up::Runtime(s) => s.as_fd(),
            Up::Own(s, _) => s.get_ref().as_fd(),
        });
    }
    RelayEnd {
        received: received.into_inner(),
        sent: sent.into_inner(),
        reset: failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Two connected loopback sockets: (the end `relay` gets, the far end the test drives).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let far = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (near, _) = l.accept().await.unwrap();
        (near, far)
    }

    /// The relay leaves `TCP_NODELAY` of the client's socket to the listener (`listen`):
    /// this is what makes that right, on the kernel the tests run on.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let l = TcpListener::from_std(listeners::bind("127.0.0.1:0".parse().unwrap(), 16).unwrap())
            .unwrap();
        let _far = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (near, _) = l.accept().await.unwrap();
        assert!(near.nodelay().unwrap());
        // An adopted listener (an upgrade's hand-over) gets it too.
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = plain.local_addr().unwrap();
        let l = TcpListener::from_std(listeners::adopt(std::os::fd::OwnedFd::from(plain)).unwrap())
            .unwrap();
        let _far = TcpStream::connect(addr).await.unwrap();
        let (near, _) = l.accept().await.unwrap();
        assert!(near.nodelay().unwrap());
    }

    fn kept(target: &str, cluster: Option<&str>, version: u64) -> Kept {
        Kept {
            src_id: 1,
            dst_id: 2,
            client: IpAddr::from([10, 0, 0, 2]),
            target: target.parse().unwrap(),
            skmsg: true,
            cluster: cluster.map(Box::from),
            path: PathKind::Plain,
            version,
            generation: 0,
            flow: Weak::new(),
            istio: crate::metrics::istio::Istio::default().tcp(IstioLabels::new(
                "source",
                &Peer::default(),
                &Peer::default(),
                None,
                "tcp",
                false,
            )),
        }
    }

    fn key<'a>(target: SocketAddr, cluster: Option<&'a str>) -> SeriesKey<'a> {
        SeriesKey {
            src_id: 1,
            dst_id: 2,
            client: IpAddr::from([10, 0, 0, 2]),
            target,
            skmsg: true,
            cluster,
            path: PathKind::Plain,
        }
    }

    #[test]
    fn kept_series_are_found_by_every_part_of_the_key_replaced_per_flow_and_bounded() {
        let mut k = KeptSeries::default();
        k.keep(kept("10.0.0.3:80", Some("c"), 1));
        let t: SocketAddr = "10.0.0.3:80".parse().unwrap();
        assert_eq!(k.find(&key(t, Some("c"))).map(|e| e.version), Some(1));
        assert!(k.find(&key(t, None)).is_none());
        assert!(k.find(&key(t, Some("d"))).is_none());
        assert!(k
            .find(&SeriesKey {
                path: PathKind::Tunnel,
                ..key(t, Some("c"))
            })
            .is_none());
        assert!(k
            .find(&SeriesKey {
                skmsg: false,
                ..key(t, Some("c"))
            })
            .is_none());
        assert!(k
            .find(&SeriesKey {
                src_id: 9,
                ..key(t, Some("c"))
            })
            .is_none());
        // The same flow again (a newer configuration): replaced, not added.
        k.keep(kept("10.0.0.3:80", Some("c"), 2));
        assert_eq!(k.entries.len(), 1);
        assert_eq!(k.find(&key(t, Some("c"))).map(|e| e.version), Some(2));
        for i in 0..2 * KEPT_SERIES {
            k.keep(kept(&format!("10.0.1.{}:80", i % 250), None, 1));
        }
        assert_eq!(k.entries.len(), KEPT_SERIES);
    }

    #[tokio::test]
    async fn half_close_is_passed_on_and_the_answer_still_arrives() {
        let (client_near, mut app) = pair().await;
        let (upstream_near, mut server) = pair().await;
        let counters = Arc::new(FlowCounters::default());
        let c = counters.clone();
        let relay = tokio::spawn(async move { relay(client_near, upstream_near, &c).await });

        app.write_all(b"request").await.unwrap();
        app.shutdown().await.unwrap(); // FIN from the app...
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap(); // ...reaches the server as EOF
        assert_eq!(got, b"request");
        server
            .write_all(b"answer after the half-close")
            .await
            .unwrap();
        drop(server);
        let mut back = Vec::new();
        app.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"answer after the half-close");
        let end = relay.await.unwrap();
        assert_eq!(counters.received.load(Relaxed), 7);
        assert_eq!(counters.sent.load(Relaxed), 27);
        // This connection's own count, for its access-log line.
        assert_eq!((end.received, end.sent, end.reset), (7, 27, false));
    }

    #[tokio::test]
    async fn a_relay_cut_short_resets_both_ends() {
        let (client_near, mut app) = pair().await;
        let (upstream_near, mut server) = pair().await;
        let counters = Arc::new(FlowCounters::default());
        let c = counters.clone();
        let relay = tokio::spawn(async move { relay(client_near, upstream_near, &c).await });
        server.write_all(&[7u8; 16384]).await.unwrap();
        let mut got = vec![0u8; 16384];
        app.read_exact(&mut got).await.unwrap();
        // The agent goes away mid-stream (drain deadline, or the task is dropped).
        relay.abort();
        let _ = relay.await;
        let mut buf = [0u8; 8];
        let err = app.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn a_reset_from_the_server_reaches_the_app_as_a_reset() {
        let (client_near, mut app) = pair().await;
        let (upstream_near, server) = pair().await;
        let counters = Arc::new(FlowCounters::default());
        let c = counters.clone();
        let relay = tokio::spawn(async move { relay(client_near, upstream_near, &c).await });

        sys::set_linger_zero(server.as_fd()).unwrap();
        drop(server); // RST
        relay.await.unwrap();
        let mut buf = [0u8; 8];
        let err = app.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    /// Sockets that were never paired are read once per message (`read_once`): a short
    /// read clears the readiness. Ping-pong messages of every size around the relay
    /// buffer's, then bulk both ways at once, then half-closes, on two workers (the I/O
    /// driver on either thread): every byte arrives, in order, and nothing stalls.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unpaired_sockets_read_once_per_message_and_lose_no_wake_up() {
        let (client_near, mut app) = pair().await;
        let (upstream_near, mut server) = pair().await;
        let counters = Arc::new(FlowCounters::default());
        let c = counters.clone();
        let relay = tokio::spawn(async move {
            relay_counted(client_near, upstream_near, &c, None, [Far::Unpaired; 2]).await
        });
        let run = async {
            let mut sent = 0u64;
            for i in 0..2000usize {
                let len = [
                    1,
                    64,
                    1500,
                    RELAY_BUFFER - 1,
                    RELAY_BUFFER,
                    RELAY_BUFFER + 1,
                ][i % 6];
                let msg: Vec<u8> = (0..len).map(|j| (i + j) as u8).collect();
                app.write_all(&msg).await.unwrap();
                let mut got = vec![0u8; len];
                server.read_exact(&mut got).await.unwrap();
                assert_eq!(got, msg, "request {i}");
                server.write_all(&msg).await.unwrap();
                app.read_exact(&mut got).await.unwrap();
                assert_eq!(got, msg, "answer {i}");
                sent += len as u64;
            }
            // Bulk both ways at once (each side writes while the other reads).
            const BULK: usize = 8 << 20;
            let data: Vec<u8> = (0..BULK).map(|j| (j % 251) as u8).collect();
            let (mut ar, mut aw) = app.split();
            let (mut sr, mut sw) = server.split();
            let (_, _, up, down) = tokio::join!(
                async {
                    aw.write_all(&data).await.unwrap();
                    aw.shutdown().await.unwrap();
                },
                async {
                    sw.write_all(&data).await.unwrap();
                    sw.shutdown().await.unwrap();
                },
                async {
                    let mut v = Vec::new();
                    sr.read_to_end(&mut v).await.unwrap();
                    v
                },
                async {
                    let mut v = Vec::new();
                    ar.read_to_end(&mut v).await.unwrap();
                    v
                },
            );
            assert!(up == data && down == data, "bulk bytes changed or lost");
            sent + BULK as u64
        };
        let total = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("the relay stalled");
        let end = relay.await.unwrap();
        assert_eq!((end.received, end.sent, end.reset), (total, total, false));
        assert_eq!(counters.received.load(Relaxed), total);
    }

    /// Looks of a quiet flow over `idle` with nothing coming (each look finds nothing).
    fn looks_in(idle: Duration) -> (u32, Duration) {
        let (mut t, mut look, mut n) = (Duration::ZERO, QUIET_LOOK, 0);
        while t + look <= idle {
            t += look;
            n += 1;
            look = next_look(look, false);
        }
        (n, look)
    }

    /// An idle quiet flow backs off to one look a minute (a lost wake-up record wakes
    /// every quiet flow instead of waiting for it): 9 looks in its first idle minute,
    /// then one a minute, where a 5 s cap made 16, then 12 a minute. A wake-up starts
    /// again at 100 ms.
    #[test]
    fn an_idle_quiet_flow_looks_about_once_a_minute() {
        let (first, look) = looks_in(Duration::from_secs(60));
        assert!(first <= 10, "{first} looks in the first idle minute");
        let (ten, _) = looks_in(Duration::from_secs(600));
        assert!(
            ten - first <= 10,
            "{} looks in the next nine idle minutes",
            ten - first
        );
        assert!(look <= QUIET_LOOK_MAX);
        assert_eq!(next_look(QUIET_LOOK_MAX, false), QUIET_LOOK_MAX);
        assert_eq!(next_look(QUIET_LOOK_MAX, true), QUIET_LOOK);
        eprintln!("idle quiet flow: {first} looks in the first minute, {ten} in ten");
    }
}
