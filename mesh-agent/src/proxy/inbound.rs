//! Inbound capture: in-pod listeners that TC steers connections to.
//!
//! For every enrolled local workload the agent opens listeners *inside the pod's network
//! namespace* (ztunnel's in-pod model): 15006 for plaintext (IPv4, and the pod's IPv6
//! address on a dual-stack node) and 15008 for HBONE, and attaches `mesh_tc_ingress` to
//! the pod's interface there. The TC program assigns each new connection from outside the
//! mesh to the 15006 listener of its family (`bpf_sk_assign`), so an accepted socket's
//! local address is the original destination and its peer the original client. A `PlainHandler` serves it; the default (`Deliver`) connects to the
//! original destination from inside the pod and relays. The HBONE listener is handed to
//! whoever serves HBONE (`InboundOptions::on_hbone_listener`).
//!
//! The manager runs on a thread of its own (`inbound`): setting a pod up costs a thread
//! in its namespace, two binds and a netlink or bpf call, none of which belongs on a
//! runtime. It is the one writer of the `INBOUND` and `INBOUND6` maps. Every proxy worker
//! accepts from every pod listener (`WorkerSet::serve_everywhere`: one socket, an accept
//! loop per worker) and serves what it accepted; accept loops and connections hold drain
//! watches like the outbound ones. A pod leaving closes its listeners on every worker.
//!
//! See docs/architecture.md, "Inbound capture".

mod pod;
pub mod telemetry;

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    path::PathBuf,
    pin::Pin,
    sync::{atomic::Ordering::Relaxed, mpsc, Arc},
    time::Duration,
};

use mesh_common::inbound::{CAPTURE, ENROLLED, HBONE_PORT, PLAIN_PORT};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn, Instrument};

pub use self::pod::InPod;
use crate::{
    datapath::{
        tc::{AttachMode, TcLink, TcProgram},
        Maps,
    },
    lifecycle::drain::DrainWatch,
    metrics::{FlowCounters, Metrics},
    proxy::{
        accesslog::{self, AccessLog, Entry, Flags, PathTaken, Protocol},
        config::workloads::WorkloadInfo,
        trace::Tracer,
        workers::WorkerSet,
    },
    sys,
};

use self::telemetry::{ConnEnd, InboundConn};

/// A local enrolled workload, as the wiring hands it over from enrolment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundPod {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address (dual-stack nodes): a mesh source too, and captured with the
    /// IPv4 one.
    pub ip6: Option<Ipv6Addr>,
    pub netns: PathBuf,
    /// Capture its inbound traffic (false: enrolled but bypassed, or its namespace is not
    /// known; it is still a mesh source the TC programs leave alone).
    pub capture: bool,
}

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Serves a plaintext connection the TC program steered to a pod's 15006 listener.
pub trait PlainHandler: Send + Sync + 'static {
    /// `conn` is the accepted socket (inside the pod's namespace), `peer` the original
    /// client, `orig_dst` the address it dialled (one of the pod's addresses and a port):
    /// both of one family, IPv4 ones never v4-mapped.
    fn serve(
        &self,
        conn: TcpStream,
        peer: SocketAddr,
        orig_dst: SocketAddr,
        pod: Arc<InPod>,
    ) -> BoxFuture;
}

/// The default handler: connect to the original destination from inside the pod and
/// relay (`crate::proxy::relay`: half-close passed on, a reset or a cut relay resets both
/// sides).
pub struct Deliver {
    metrics: Arc<Metrics>,
    /// Unset: no access log (nothing is built for it).
    access_log: std::sync::OnceLock<AccessLog>,
    /// Unset: no spans.
    tracer: std::sync::OnceLock<Tracer>,
}

/// The policy decision that let a plain-text connection in.
#[derive(Debug, Clone)]
pub struct Judged {
    /// The deciding policy, `namespace/name` (None: no policy applied).
    pub policy: Option<String>,
    /// The pod's workload in the configuration it was judged by.
    pub destination: Arc<WorkloadInfo>,
}

impl Deliver {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Deliver> {
        Arc::new(Deliver {
            metrics,
            access_log: std::sync::OnceLock::new(),
            tracer: std::sync::OnceLock::new(),
        })
    }

    /// Sends a span per delivered (or refused) connection.
    pub fn set_tracer(&self, t: Tracer) {
        let _ = self.tracer.set(t);
    }

    /// The tracer, if tracing is on.
    pub fn tracer(&self) -> Option<&Tracer> {
        self.tracer.get()
    }

    /// Reports a plain-text connection to `dst` refused by policy (reset): Istio's
    /// destination series with `RBAC`, and its span.
    pub fn report_denied(
        &self,
        peer: SocketAddr,
        orig_dst: SocketAddr,
        dst: &WorkloadInfo,
        policy: Option<&str>,
    ) {
        InboundConn::open(
            &self.metrics,
            self.tracer.get(),
            &istio_unknown(),
            &telemetry::destination_peer(dst),
            false,
            Flags::RBAC,
            || {
                let mut e = plain_entry(peer, orig_dst);
                e.policy_verdict = Some(accesslog::Verdict::Deny);
                e.policy_name = policy.map(str::to_owned);
                e
            },
        )
        .finish(ConnEnd {
            error: Some(format!("denied by {}", policy.unwrap_or("policy"))),
            ..ConnEnd::default()
        });
    }

    /// Writes an access-log line per delivered connection.
    pub fn set_access_log(&self, log: AccessLog) {
        let _ = self.access_log.set(log);
    }

    /// The access log, if it is on.
    pub fn access_log(&self) -> Option<&AccessLog> {
        self.access_log.get().filter(|l| l.on())
    }

    /// Delivers `conn` into `pod` (`PlainHandler::serve`), with the policy decision that
    /// let it in, if one was made (for the access log, Istio's series and the span).
    pub fn serve_judged(
        &self,
        conn: TcpStream,
        peer: SocketAddr,
        orig_dst: SocketAddr,
        pod: Arc<InPod>,
        judged: Option<Judged>,
    ) -> BoxFuture {
        let metrics = self.metrics.clone();
        let tracer = self.tracer.get().cloned();
        let pod_name = pod.display_name();
        // Istio's destination: the pod, with its identity when the configuration named it.
        let destination = match &judged {
            Some(j) => telemetry::destination_peer(&j.destination),
            None => crate::metrics::istio::Peer::from_qualified(Some(&pod_name)),
        };
        let record = move || {
            let mut e = plain_entry(peer, orig_dst);
            e.destination_workload = Some(pod_name.clone());
            if let Some(j) = &judged {
                e.destination_principal = Some(j.destination.identity.to_string());
                e.policy_verdict = Some(accesslog::Verdict::Allow);
                e.policy_name = j.policy.clone();
            }
            e
        };
        let entry = self
            .access_log()
            .map(|log| (log.clone(), Box::new(record())));
        Box::pin(async move {
            let m = &metrics.inbound;
            let up = tokio::time::timeout(DELIVER_CONNECT_TIMEOUT, pod.connect_in(orig_dst))
                .await
                .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")));
            let upstream = match up {
                Ok(s) => s,
                Err(e) => {
                    // As if the pod had answered the client itself: a reset.
                    debug!(%peer, %orig_dst, error = %e, "delivering into the pod failed; resetting the client");
                    m.refused.fetch_add(1, Relaxed);
                    let _ = sys::set_linger_zero(conn.as_fd());
                    InboundConn::open(
                        &metrics,
                        tracer.as_ref(),
                        &istio_unknown(),
                        &destination,
                        false,
                        Flags::UF,
                        &record,
                    )
                    .finish(ConnEnd {
                        error: Some(format!("delivering into the pod: {e}")),
                        ..ConnEnd::default()
                    });
                    if let Some((log, mut entry)) = entry {
                        entry.flag(accesslog::Flags::UF);
                        entry.connection_termination_details =
                            Some(format!("delivering into the pod: {e}"));
                        entry.finish();
                        log.send(entry);
                    }
                    return;
                }
            };
            m.delivered.fetch_add(1, Relaxed);
            let _ = conn.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let report = InboundConn::open(
                &metrics,
                tracer.as_ref(),
                &istio_unknown(),
                &destination,
                false,
                Flags::default(),
                &record,
            );
            let c = FlowCounters::default();
            let end = crate::proxy::relay(conn, upstream, &c).await;
            report.finish(ConnEnd {
                received: end.received,
                sent: end.sent,
                error: end.reset.then(|| "reset".to_owned()),
            });
            m.received_bytes
                .fetch_add(c.received.load(Relaxed), Relaxed);
            m.sent_bytes.fetch_add(c.sent.load(Relaxed), Relaxed);
            if let Some((log, mut entry)) = entry {
                entry.bytes_received = Some(end.received);
                entry.bytes_sent = Some(end.sent);
                if end.reset {
                    entry.connection_termination_details = Some("reset".into());
                }
                entry.finish();
                log.send(entry);
            }
        })
    }
}

/// A plain-text source: nothing proves who it is (Istio's `unknown`).
fn istio_unknown() -> crate::metrics::istio::Peer {
    crate::metrics::istio::Peer::default()
}

/// The record of a plain-text connection delivered (or refused) at `orig_dst`.
fn plain_entry(peer: SocketAddr, orig_dst: SocketAddr) -> Entry {
    let mut e = Entry::new(Protocol::Tcp, PathTaken::Inbound);
    e.source_address = Some(accesslog::Addr::Sock(peer));
    e.destination_address = Some(orig_dst);
    e.upstream_host = Some(orig_dst);
    e
}

/// How long delivering waits for the application's port to answer.
const DELIVER_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `dst` from inside `pod`'s network namespace (see `InPod::connect_in`).
pub async fn connect_in(pod: &InPod, dst: SocketAddr) -> io::Result<TcpStream> {
    pod.connect_in(dst).await
}

impl PlainHandler for Deliver {
    fn serve(
        &self,
        conn: TcpStream,
        peer: SocketAddr,
        orig_dst: SocketAddr,
        pod: Arc<InPod>,
    ) -> BoxFuture {
        self.serve_judged(conn, peer, orig_dst, pod, None)
    }
}

/// Whether sockops pairs sockets at all (`CONFIG` without `NO_PAIRING`: kernels before
/// 6.9 without `--skmsg-unbounded-pairing`). Where it does not, a delivery leg's `FLOWS`
/// record would never be taken over (nor removed at close): none is written.
fn kernel_pairs(maps: &Maps) -> bool {
    let m = maps.config.lock().unwrap_or_else(|e| e.into_inner());
    m.get(&0, 0)
        .is_ok_and(|c| c.flags & mesh_common::cfg_flags::NO_PAIRING == 0)
}

/// Called with each pod's HBONE listener (15008, inside the pod, non-blocking, registered
/// with no runtime) when the pod is set up. The callee serves it (from every worker:
/// `WorkerSet::serve_everywhere`) until `InPod::closed` resolves, then drops it on every
/// worker.
pub type HboneHandoff = Arc<dyn Fn(Arc<InPod>, std::net::TcpListener) + Send + Sync>;

pub struct InboundOptions {
    pub maps: Arc<Maps>,
    /// `None`: listeners only, no TC (nothing is steered to them).
    pub tc: Option<Arc<TcProgram>>,
    pub metrics: Arc<Metrics>,
    /// The proxy's workers: each accepts from every pod listener and serves what it took.
    pub workers: WorkerSet,
    pub drain: DrainWatch,
    pub plain: Arc<dyn PlainHandler>,
    /// `None`: 15008 is held open but connections to it are reset.
    pub on_hbone_listener: Option<HboneHandoff>,
    /// Pair each delivery leg (the agent's socket in the pod and the pod's accepted one)
    /// in the sockhash (`--skmsg-upstream`): `InPod::connect_in`.
    pub pair_delivery: bool,
}

/// What one set-up pod holds.
struct PodState {
    want: InboundPod,
    pod: Arc<InPod>,
    link: Option<TcLink>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

enum Msg {
    Update(Vec<InboundPod>),
    Stop,
}

/// The inbound manager: follows the enrolled local workloads (`update`), opens and closes
/// per-pod listeners, attaches and detaches TC. `stop` (or drop) tears everything down.
pub struct Inbound {
    tx: mpsc::Sender<Msg>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The attach mode of the last attachment (`None` before the first).
    mode: Arc<std::sync::Mutex<Option<AttachMode>>>,
}

/// How often pods whose set-up failed are tried again.
const RETRY: Duration = Duration::from_secs(2);

impl Inbound {
    pub fn start(opts: InboundOptions) -> io::Result<Inbound> {
        for w in &opts.metrics.inbound.worker_accepts {
            w.init(opts.workers.count());
        }
        let (tx, rx) = mpsc::channel();
        let mode = Arc::new(std::sync::Mutex::new(None));
        let mut mgr = Manager {
            opts,
            pods: HashMap::new(),
            want: Vec::new(),
            written: HashMap::new(),
            first: true,
            mode: mode.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("inbound".into())
            .spawn(move || {
                let _span = tracing::info_span!("inbound").entered();
                loop {
                    let timeout = if mgr.pending() {
                        RETRY
                    } else {
                        Duration::from_secs(3600)
                    };
                    match rx.recv_timeout(timeout) {
                        Ok(Msg::Update(mut want)) => {
                            // Only the newest of those waiting matters.
                            let mut stop = false;
                            while let Ok(m) = rx.try_recv() {
                                match m {
                                    Msg::Update(w) => want = w,
                                    Msg::Stop => stop = true,
                                }
                            }
                            mgr.want = want;
                            mgr.reconcile();
                            if stop {
                                break;
                            }
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => mgr.reconcile(),
                        Ok(Msg::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
                mgr.shutdown();
            })?;
        Ok(Inbound {
            tx,
            thread: Some(thread),
            mode,
        })
    }

    /// The enrolled local workloads now (the whole set, not a change).
    pub fn update(&self, pods: Vec<InboundPod>) {
        let _ = self.tx.send(Msg::Update(pods));
    }

    /// How the TC program was last attached (`tcx` or `clsact`), if it was.
    pub fn attach_mode(&self) -> Option<AttachMode> {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Detaches TC from every pod, closes every listener (connections being served go on,
    /// holding their drain watches), clears `INBOUND`, and waits for it all.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Inbound {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

struct Manager {
    opts: InboundOptions,
    /// Set-up pods by address.
    pods: HashMap<Ipv4Addr, PodState>,
    want: Vec<InboundPod>,
    /// What `INBOUND` and `INBOUND6` hold as far as this manager knows.
    written: HashMap<IpAddr, u32>,
    /// The first reconcile also removes entries an earlier agent left (adopted maps).
    first: bool,
    mode: Arc<std::sync::Mutex<Option<AttachMode>>>,
}

impl Manager {
    /// Some wanted pod is not set up (its set-up failed): retry later.
    fn pending(&self) -> bool {
        self.want
            .iter()
            .any(|w| w.capture && !self.pods.get(&w.ip).is_some_and(|p| p.want == *w))
    }

    fn reconcile(&mut self) {
        if self.first {
            self.written = self
                .opts
                .maps
                .inbound_entries()
                .into_iter()
                .map(|(ip, f)| (IpAddr::V4(ip), f))
                .chain(self.opts.maps.inbound6_entries())
                .collect();
            self.first = false;
        }
        let want: HashMap<Ipv4Addr, InboundPod> =
            self.want.iter().map(|w| (w.ip, w.clone())).collect();
        // Pods that left, or changed (another namespace: a new pod with a reused address).
        let gone: Vec<Ipv4Addr> = self
            .pods
            .iter()
            .filter(|(ip, p)| want.get(ip).is_none_or(|w| !w.capture || *w != p.want))
            .map(|(ip, _)| *ip)
            .collect();
        for ip in gone {
            if let Some(p) = self.pods.remove(&ip) {
                self.teardown(p);
            }
        }
        for w in want.values() {
            if w.capture && !self.pods.contains_key(&w.ip) {
                match self.setup(w) {
                    Ok(p) => {
                        self.pods.insert(w.ip, p);
                    }
                    Err(e) => {
                        self.opts
                            .metrics
                            .inbound
                            .setup_failures
                            .fetch_add(1, Relaxed);
                        warn!(pod = %format!("{}/{}", w.namespace, w.name), ip = %w.ip, error = %e,
                            "cannot capture the pod's inbound traffic; retrying");
                    }
                }
            }
        }
        // INBOUND(6): every enrolled workload is a mesh source, by each of its addresses;
        // set-up pods capture.
        let entries: HashMap<IpAddr, u32> = want
            .values()
            .flat_map(|w| {
                let flags = ENROLLED
                    | if self.pods.contains_key(&w.ip) {
                        CAPTURE
                    } else {
                        0
                    };
                w.addrs().map(move |a| (a, flags))
            })
            .collect();
        // A pod set up just now already has its entry (written before the attach).
        for (ip, flags) in &entries {
            if self.written.get(ip) != Some(flags) {
                match self.opts.maps.set_inbound(*ip, *flags) {
                    Ok(()) => {
                        self.written.insert(*ip, *flags);
                    }
                    Err(e) => warn!(ip = %ip, error = %e, "cannot write INBOUND"),
                }
            }
        }
        let stale: Vec<IpAddr> = self
            .written
            .keys()
            .filter(|ip| !entries.contains_key(ip))
            .copied()
            .collect();
        for ip in stale {
            self.opts.maps.remove_inbound(ip);
            self.written.remove(&ip);
        }
        self.opts
            .metrics
            .inbound
            .pods
            .store(self.pods.len() as u64, Relaxed);
    }

    fn setup(&mut self, w: &InboundPod) -> io::Result<PodState> {
        let pair = (self.opts.pair_delivery && kernel_pairs(&self.opts.maps))
            .then(|| self.opts.maps.clone());
        let pod = InPod::open(
            w.namespace.clone(),
            w.name.clone(),
            w.ip,
            w.ip6,
            w.netns.clone(),
            pair,
        )?;
        let listeners = pod.listen()?;
        let mut tasks = Vec::new();
        let set_up = (|| {
            for plain in std::iter::once(listeners.plain).chain(listeners.plain6) {
                let (pod, handler, metrics, drain) = (
                    pod.clone(),
                    self.opts.plain.clone(),
                    self.opts.metrics.clone(),
                    self.opts.drain.clone(),
                );
                tasks.extend(self.opts.workers.serve_everywhere(plain, move |worker, l| {
                    let span = tracing::info_span!("inbound_plain", pod = %pod.display_name(), worker);
                    accept_plain(
                        l,
                        worker,
                        pod.clone(),
                        handler.clone(),
                        metrics.clone(),
                        drain.clone(),
                    )
                    .instrument(span)
                })?);
            }
            match &self.opts.on_hbone_listener {
                Some(f) => f(pod.clone(), listeners.hbone),
                None => {
                    let (pod, drain) = (pod.clone(), self.opts.drain.clone());
                    tasks.extend(self.opts.workers.serve_everywhere(
                        listeners.hbone,
                        move |_, l| {
                            refuse_all(l, drain.clone()).instrument(
                                tracing::info_span!("inbound_hbone", pod = %pod.display_name()),
                            )
                        },
                    )?)
                }
            }
            Ok::<_, io::Error>(())
        })();
        if let Err(e) = set_up {
            pod.close();
            for t in &tasks {
                t.abort();
            }
            return Err(e);
        }
        // The entries first: the program captures from its first packet.
        for a in w.addrs() {
            self.opts
                .maps
                .set_inbound(a, ENROLLED | CAPTURE)
                .map_err(io::Error::other)?;
            self.written.insert(a, ENROLLED | CAPTURE);
        }
        let link = match &self.opts.tc {
            Some(tc) => match pod.attach(tc.clone()) {
                Ok(l) => {
                    *self.mode.lock().unwrap_or_else(|e| e.into_inner()) = Some(l.mode);
                    info!(pod = %pod.display_name(), ip = %w.ip, ip6 = ?w.ip6, iface = %l.iface, mode = %l.mode,
                        "inbound capture on");
                    Some(l)
                }
                Err(e) => {
                    pod.close();
                    for t in &tasks {
                        t.abort();
                    }
                    return Err(e);
                }
            },
            None => None,
        };
        Ok(PodState {
            want: w.clone(),
            pod,
            link,
            tasks,
        })
    }

    fn teardown(&mut self, p: PodState) {
        if let Some(link) = p.link {
            if let Err(e) = p.pod.detach(link) {
                // The namespace is gone with its interface (and the program with it).
                debug!(pod = %p.pod.display_name(), error = %e, "detaching TC failed");
            }
        }
        p.pod.close();
        for t in &p.tasks {
            t.abort();
        }
        info!(pod = %p.pod.display_name(), ip = %p.want.ip, ip6 = ?p.want.ip6, "inbound capture off");
    }

    fn shutdown(&mut self) {
        for (_, p) in std::mem::take(&mut self.pods) {
            self.teardown(p);
        }
        for ip in std::mem::take(&mut self.written).into_keys() {
            self.opts.maps.remove_inbound(ip);
        }
        self.opts.metrics.inbound.pods.store(0, Relaxed);
    }
}

impl InboundPod {
    /// Its addresses: IPv4, then IPv6 if it has one.
    fn addrs(&self) -> impl Iterator<Item = IpAddr> {
        std::iter::once(IpAddr::V4(self.ip)).chain(self.ip6.map(IpAddr::V6))
    }
}

/// An accepted socket's address with a v4-mapped IPv6 address as the IPv4 one it is.
fn plain_addr(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(ip) => SocketAddr::new(IpAddr::V4(ip), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// Accepts on a pod's 15006 listener until the drain begins or the pod leaves.
async fn accept_plain(
    listener: TcpListener,
    worker: usize,
    pod: Arc<InPod>,
    handler: Arc<dyn PlainHandler>,
    metrics: Arc<Metrics>,
    drain: DrainWatch,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((conn, peer)) => {
                    metrics.inbound.accepted.fetch_add(1, Relaxed);
                    metrics.inbound.worker_accepts[0].add(worker);
                    let Ok(orig) = conn.local_addr().map(plain_addr) else {
                        metrics.inbound.refused.fetch_add(1, Relaxed);
                        continue;
                    };
                    let peer = plain_addr(peer);
                    // Dialled directly (not steered by TC), or looped back: delivering it
                    // would connect to ourselves.
                    if orig.port() == PLAIN_PORT || orig.port() == HBONE_PORT || orig.ip().is_loopback() || !pod.owns(orig.ip()) || peer.is_ipv4() != orig.is_ipv4() {
                        metrics.inbound.refused.fetch_add(1, Relaxed);
                        let _ = sys::set_linger_zero(conn.as_fd());
                        continue;
                    }
                    let fut = handler.serve(conn, peer, orig, pod.clone());
                    let watch = drain.clone();
                    tokio::spawn(async move {
                        fut.await;
                        drop(watch);
                    }.instrument(tracing::debug_span!("inbound_conn", %peer, %orig)));
                    // Let the other workers take what else waits in the queue (a burst
                    // would otherwise all land on the worker that woke first).
                    tokio::task::yield_now().await;
                }
                Err(e) => {
                    warn!(error = %e, "inbound accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = drain.signaled() => return,
            _ = pod.closed() => return,
        }
    }
}

/// Holds a pod's 15008 while nobody serves HBONE: connections are reset at once.
async fn refuse_all(listener: TcpListener, drain: DrainWatch) {
    loop {
        tokio::select! {
            r = listener.accept() => if let Ok((c, _)) = r {
                let _ = sys::set_linger_zero(c.as_fd());
            },
            _ = drain.signaled() => return,
        }
    }
}
