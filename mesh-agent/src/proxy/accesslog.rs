//! Access logs: one JSON line per L4 connection (when it closes) and per L7 request (when
//! its response ends), with fields named after Envoy's default access-log fields.
//!
//! The data path never waits for the log: a proxy task fills an `Entry` (a few owned
//! strings, no formatting) and hands it to a bounded queue (`QUEUE_CAPACITY`); when the
//! queue is full the entry is dropped and counted (`mesh_access_log_dropped_total`). One
//! writer thread serialises entries with serde_json into a reused buffer and writes them
//! through a buffered writer every `WRITE_TICK` (`write_lines` says why it polls). Off by
//! default, and then free: the proxy builds no line while `AccessLog::on` says no (one
//! atomic load). A namespace labelled `mesh-agent.io/access-log: "true"` turns it on for
//! the lines of its workloads only (`AccessLog` says how).

use std::{
    fs::OpenOptions,
    io::{self, BufWriter, Write},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError},
        Arc, OnceLock,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Serialize, Serializer};
use tokio::sync::watch;

use crate::{
    metrics::Metrics,
    proxy::config::{policy::MeshConfig, workloads::WorkloadIndex},
};

/// Lines the queue holds before new ones are dropped.
pub const QUEUE_CAPACITY: usize = 8192;
/// Longest HTTP path logged (bytes); longer ones are cut at a character boundary.
pub const MAX_PATH_LEN: usize = 256;
/// Buffer of the writer (bytes).
const WRITE_BUFFER: usize = 64 * 1024;
/// How often the writer takes the queued lines (a line is written at most this late;
/// with `QUEUE_CAPACITY`, about 400k lines/s before any is dropped).
const WRITE_TICK: Duration = Duration::from_millis(20);

/// Where the lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    Stderr,
    /// Appended to (created if missing).
    File(PathBuf),
}

/// Envoy's response flags (`%RESPONSE_FLAGS%`): why a request or connection did not get
/// a normal answer from its upstream. Written comma-separated, `-` when none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags(u16);

impl Flags {
    /// No healthy upstream endpoint.
    pub const UH: Flags = Flags(1);
    /// Upstream connection failure.
    pub const UF: Flags = Flags(1 << 1);
    /// Upstream overflow: the circuit breaker was open.
    pub const UO: Flags = Flags(1 << 2);
    /// No route for the request.
    pub const NR: Flags = Flags(1 << 3);
    /// The retries were exhausted.
    pub const URX: Flags = Flags(1 << 4);
    /// The route names a cluster the configuration does not have.
    pub const NC: Flags = Flags(1 << 5);
    /// Upstream request timeout.
    pub const UT: Flags = Flags(1 << 6);
    /// Rate limited (the local rate limit).
    pub const RL: Flags = Flags(1 << 7);
    /// Delayed by fault injection.
    pub const DI: Flags = Flags(1 << 8);
    /// Aborted by fault injection.
    pub const FI: Flags = Flags(1 << 9);
    /// The downstream connection ended before the response did.
    pub const DC: Flags = Flags(1 << 10);
    /// The upstream connection ended (reset or closed) before the response did.
    pub const UC: Flags = Flags(1 << 11);
    /// Denied by an AuthorizationPolicy (Envoy says it in `response_code_details`).
    pub const RBAC: Flags = Flags(1 << 12);

    const NAMES: [(Flags, &'static str); 13] = [
        (Flags::UH, "UH"),
        (Flags::UF, "UF"),
        (Flags::UO, "UO"),
        (Flags::NR, "NR"),
        (Flags::URX, "URX"),
        (Flags::NC, "NC"),
        (Flags::UT, "UT"),
        (Flags::RL, "RL"),
        (Flags::DI, "DI"),
        (Flags::FI, "FI"),
        (Flags::DC, "DC"),
        (Flags::UC, "UC"),
        (Flags::RBAC, "RBAC"),
    ];

    pub fn insert(&mut self, f: Flags) {
        self.0 |= f.0;
    }

    pub fn contains(self, f: Flags) -> bool {
        self.0 & f.0 == f.0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl Serialize for Flags {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.is_empty() {
            return s.serialize_str("-");
        }
        let mut out = String::with_capacity(16);
        for (f, name) in Flags::NAMES {
            if self.contains(f) {
                if !out.is_empty() {
                    out.push(',');
                }
                out.push_str(name);
            }
        }
        s.serialize_str(&out)
    }
}

/// The application protocol of the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "HTTP/1.0")]
    Http10,
    #[serde(rename = "HTTP/1.1")]
    Http11,
    #[serde(rename = "HTTP/2")]
    Http2,
}

impl Protocol {
    pub fn of(v: ::http::Version) -> Protocol {
        match v {
            ::http::Version::HTTP_10 | ::http::Version::HTTP_09 => Protocol::Http10,
            ::http::Version::HTTP_2 => Protocol::Http2,
            _ => Protocol::Http11,
        }
    }
}

/// The way the connection or request travelled through this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PathTaken {
    /// Captured outbound, relayed by the proxy over plain TCP.
    #[serde(rename = "proxied")]
    Proxied,
    /// As `Proxied`, with the app <-> proxy leg short-circuited by sk_msg.
    #[serde(rename = "proxied+sk_msg")]
    ProxiedSkMsg,
    /// Captured outbound, sent through the HBONE tunnel to another node.
    #[serde(rename = "tunnel")]
    Tunnel,
    /// Captured inbound (plaintext, steered by TC), delivered into the pod.
    #[serde(rename = "inbound")]
    Inbound,
    /// Arrived through the HBONE tunnel, delivered into the pod.
    #[serde(rename = "inbound+tunnel")]
    InboundTunnel,
}

/// The authorization decision, when one was made for this line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

/// HTTP-only fields.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HttpFields {
    pub method: String,
    pub authority: Option<String>,
    /// Path and query, at most `MAX_PATH_LEN` bytes.
    pub path: String,
    /// 0: no response was sent (Envoy's convention).
    pub response_code: u16,
    /// Tries made upstream (1 + retries); 0 when the proxy answered itself.
    pub attempts: u32,
}

/// One line, filled by a proxy task. Unknown fields stay `None` (written as null).
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    #[serde(serialize_with = "rfc3339")]
    pub start_time: SystemTime,
    #[serde(rename = "duration_ms", serialize_with = "millis")]
    pub duration: Duration,
    pub protocol: Protocol,
    pub path_taken: PathTaken,
    /// The client's address (an IP alone when its port is not known).
    pub source_address: Option<Addr>,
    /// `namespace/name`.
    pub source_workload: Option<String>,
    pub source_principal: Option<String>,
    /// The original destination the client dialled.
    pub destination_address: Option<SocketAddr>,
    pub destination_workload: Option<String>,
    pub destination_service: Option<String>,
    pub destination_principal: Option<String>,
    /// The endpoint the proxy dialled.
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: Option<String>,
    pub route_name: Option<String>,
    #[serde(flatten)]
    pub http: Option<HttpFields>,
    pub response_flags: Flags,
    /// From the client (TCP: bytes of the connection; HTTP: request body bytes).
    pub bytes_received: Option<u64>,
    /// To the client (TCP: bytes of the connection; HTTP: response body bytes).
    pub bytes_sent: Option<u64>,
    pub policy_verdict: Option<Verdict>,
    /// The deciding policy, `namespace/name`.
    pub policy_name: Option<String>,
    /// Why the connection or request ended other than normally.
    pub connection_termination_details: Option<String>,
}

/// An address written `ip:port`, or `ip` when the port is not known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addr {
    Sock(SocketAddr),
    Ip(IpAddr),
}

impl Serialize for Addr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Addr::Sock(a) => s.collect_str(a),
            Addr::Ip(a) => s.collect_str(a),
        }
    }
}

impl Entry {
    /// A line of `protocol` started now, every other field unknown.
    pub fn new(protocol: Protocol, path_taken: PathTaken) -> Entry {
        Entry {
            start_time: SystemTime::now(),
            duration: Duration::ZERO,
            protocol,
            path_taken,
            source_address: None,
            source_workload: None,
            source_principal: None,
            destination_address: None,
            destination_workload: None,
            destination_service: None,
            destination_principal: None,
            upstream_host: None,
            upstream_cluster: None,
            route_name: None,
            http: None,
            response_flags: Flags::default(),
            bytes_received: None,
            bytes_sent: None,
            policy_verdict: None,
            policy_name: None,
            connection_termination_details: None,
        }
    }

    /// Sets the duration from `start_time` to now.
    pub fn finish(&mut self) {
        self.duration = self.start_time.elapsed().unwrap_or_default();
    }

    pub fn flag(&mut self, f: Flags) {
        self.response_flags.insert(f);
    }
}

/// `path`, cut to at most `MAX_PATH_LEN` bytes at a character boundary.
pub fn bounded_path(path: &str) -> String {
    if path.len() <= MAX_PATH_LEN {
        return path.to_owned();
    }
    let mut end = MAX_PATH_LEN;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    path[..end].to_owned()
}

fn millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&Rfc3339(*t))
}

/// A UTC time as RFC 3339 with milliseconds: `2026-12-06T09:45:01.123Z`.
struct Rfc3339(SystemTime);

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = self.0.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = d.as_secs();
        let (days, rem) = (secs / 86_400, secs % 86_400);
        let (y, m, day) = crate::identity::certs::civil_from_days(days as i64);
        write!(
            f,
            "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            d.subsec_millis()
        )
    }
}

/// The proxy's handle on the access log: cheap to clone, never blocks.
///
/// Two scopes. With `--access-log` naming a sink every line is written (`all`). Without
/// it, only the lines of workloads whose namespace asks for them (`Telemetry::access_log`
/// in the mesh workloads the proxy holds): the proxy builds lines only while some
/// namespace asks (`on`, one atomic load), `send` keeps those whose source or
/// destination is such a workload, and the writer (to standard output, as a container
/// log) is started at the first line kept. No namespace asking: nothing is built and no
/// thread runs, as with the log off.
#[derive(Clone)]
pub struct AccessLog {
    inner: Arc<Inner>,
}

struct Inner {
    /// `--access-log` names a sink: every line.
    all: bool,
    /// Some mesh workload's namespace asks for access logs (kept by `follow`).
    scoped: AtomicBool,
    /// The mesh workloads in force (`XdsClient::mesh`): who asks. None: `all` only.
    mesh: Option<watch::Receiver<Arc<MeshConfig>>>,
    /// The queue to the writer thread: started with the handle (`all`) or at the first
    /// line kept (None inside: it could not be started; lines are dropped, counted).
    tx: OnceLock<Option<SyncSender<Box<Entry>>>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessLog")
    }
}

impl AccessLog {
    /// With `sink`: opens it and starts the writer thread (`access-log`), every line
    /// written. Without: lines of namespaces that ask for them only (`mesh` says which),
    /// to standard output. The writer ends, after writing what is queued, once every
    /// handle is dropped. `follow` must run for the namespaces' switch to take effect.
    pub fn start(
        sink: Option<Sink>,
        metrics: Arc<Metrics>,
        mesh: watch::Receiver<Arc<MeshConfig>>,
    ) -> io::Result<AccessLog> {
        let tx = OnceLock::new();
        if let Some(sink) = &sink {
            let _ = tx.set(Some(spawn_writer(sink)?));
        }
        Ok(AccessLog {
            inner: Arc::new(Inner {
                all: sink.is_some(),
                scoped: AtomicBool::new(false),
                mesh: Some(mesh),
                tx,
                metrics,
            }),
        })
    }

    /// A log of every line whose lines the caller reads from the receiver.
    #[cfg(test)]
    fn channel(capacity: usize, metrics: Arc<Metrics>) -> (AccessLog, Receiver<Box<Entry>>) {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let log = AccessLog {
            inner: Arc::new(Inner {
                all: true,
                scoped: AtomicBool::new(false),
                mesh: None,
                tx: OnceLock::from(Some(tx)),
                metrics,
            }),
        };
        (log, rx)
    }

    /// A log whose lines the test reads from the receiver (no writer thread).
    #[cfg(test)]
    pub(crate) fn for_tests() -> (AccessLog, Receiver<Box<Entry>>) {
        AccessLog::channel(QUEUE_CAPACITY, Arc::new(Metrics::default()))
    }

    /// Whether lines are wanted at all now: the flag, or some namespace asking. The
    /// proxy builds a line only when this says so.
    pub fn on(&self) -> bool {
        self.inner.all || self.inner.scoped.load(Relaxed)
    }

    /// Keeps `on` in step with the mesh workloads in force: whether any namespace asks
    /// for access logs. Runs until the mesh's sender is gone; nothing to do with `all`.
    pub async fn follow(self) {
        let Some(mut mesh) = self.inner.mesh.clone().filter(|_| !self.inner.all) else {
            return;
        };
        loop {
            let asked = mesh.borrow_and_update().workloads.any_access_logged();
            if self.inner.scoped.swap(asked, Relaxed) != asked {
                tracing::info!(
                    namespaces_ask = asked,
                    "access log: lines of namespaces labelled mesh-agent.io/access-log=true go to standard output"
                );
            }
            if mesh.changed().await.is_err() {
                return;
            }
        }
    }

    /// Queues a line (without the flag: only if its source or destination is a workload
    /// whose namespace asks); drops it (counted) if the queue is full or the writer is
    /// gone.
    pub fn send(&self, entry: Box<Entry>) {
        let inner = &*self.inner;
        if !inner.all {
            let wanted = inner
                .mesh
                .as_ref()
                .is_some_and(|m| wanted(&entry, &m.borrow().workloads));
            if !wanted {
                return;
            }
        }
        let tx = inner.tx.get_or_init(|| match spawn_writer(&Sink::Stdout) {
            Ok(tx) => Some(tx),
            Err(e) => {
                tracing::warn!(error = %e, "starting the access-log writer failed; namespaces' lines are dropped (mesh_access_log_dropped_total)");
                None
            }
        });
        let sent = tx.as_ref().map(|tx| tx.try_send(entry));
        match sent {
            Some(Ok(())) => {}
            None | Some(Err(TrySendError::Full(_) | TrySendError::Disconnected(_))) => {
                inner.metrics.access_log_dropped.fetch_add(1, Relaxed);
            }
        }
    }
}

/// Opens `sink` and starts the writer thread on it.
fn spawn_writer(sink: &Sink) -> io::Result<SyncSender<Box<Entry>>> {
    let out: Box<dyn Write + Send> = match sink {
        Sink::Stdout => Box::new(io::stdout()),
        Sink::Stderr => Box::new(io::stderr()),
        Sink::File(p) => Box::new(OpenOptions::new().create(true).append(true).open(p)?),
    };
    let (tx, rx) = mpsc::sync_channel(QUEUE_CAPACITY);
    std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || write_lines(rx, BufWriter::with_capacity(WRITE_BUFFER, out), WRITE_TICK))?;
    Ok(tx)
}

/// Whether a line concerns a workload whose namespace asks for access logs: its client
/// (by address, `namespace/name` or SPIFFE ID) or its destination (the endpoint dialled,
/// the original destination, `namespace/name` or SPIFFE ID).
fn wanted(e: &Entry, w: &WorkloadIndex) -> bool {
    let ns_of_name = |s: &Option<String>| {
        s.as_deref()
            .and_then(|s| s.split_once('/'))
            .is_some_and(|(ns, _)| w.access_logged_namespace(ns))
    };
    // spiffe://<trust domain>/ns/<namespace>/sa/<service account>
    let ns_of_principal = |s: &Option<String>| {
        s.as_deref()
            .and_then(|s| s.strip_prefix("spiffe://"))
            .and_then(|s| s.split('/').skip_while(|p| *p != "ns").nth(1))
            .is_some_and(|ns| w.access_logged_namespace(ns))
    };
    let source_ip = e.source_address.map(|a| match a {
        Addr::Sock(s) => s.ip(),
        Addr::Ip(ip) => ip,
    });
    [
        source_ip,
        e.upstream_host.map(|a| a.ip()),
        e.destination_address.map(|a| a.ip()),
    ]
    .into_iter()
    .flatten()
    .any(|ip| w.access_logged_ip(ip))
        || ns_of_name(&e.source_workload)
        || ns_of_name(&e.destination_workload)
        || ns_of_principal(&e.source_principal)
        || ns_of_principal(&e.destination_principal)
}

/// The writer thread: every `tick`, takes what is queued, one line per entry, and writes
/// it out (one `write` per tick, or per `WRITE_BUFFER`). It polls instead of blocking in
/// `recv`: a receiver blocked on an empty queue makes each `try_send` wake it, a futex
/// call and a context switch per request on a busy node (and a `write` per request when
/// the queue runs empty after each line); a polled queue keeps `try_send` a lock-free
/// push. Ends, after writing what is queued, once every handle is dropped.
fn write_lines(rx: Receiver<Box<Entry>>, mut out: impl Write, tick: Duration) {
    let mut buf = Vec::with_capacity(1024);
    let mut failed = false;
    let mut report = |e: io::Error| {
        if !std::mem::replace(&mut failed, true) {
            tracing::warn!(error = %e, "writing the access log failed");
        }
    };
    loop {
        let mut written = false;
        let gone = loop {
            match rx.try_recv() {
                Ok(e) => {
                    buf.clear();
                    if serde_json::to_writer(&mut buf, &*e).is_ok() {
                        buf.push(b'\n');
                        if let Err(e) = out.write_all(&buf) {
                            report(e);
                        }
                        written = true;
                    }
                }
                Err(TryRecvError::Empty) => break false,
                Err(TryRecvError::Disconnected) => break true,
            }
        };
        if written {
            if let Err(e) = out.flush() {
                report(e);
            }
        }
        if gone {
            return;
        }
        std::thread::sleep(tick);
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let metrics = Arc::new(Metrics::default());
        // No writer drains this queue.
        let (log, rx) = AccessLog::channel(4, metrics.clone());
        let started = std::time::Instant::now();
        for _ in 0..10 {
            log.send(Box::new(Entry::new(Protocol::Tcp, PathTaken::Proxied)));
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(metrics.access_log_dropped.load(Relaxed), 6);
        assert_eq!(rx.try_iter().count(), 4);
        // A writer that is gone drops too.
        drop(rx);
        log.send(Box::new(Entry::new(Protocol::Tcp, PathTaken::Proxied)));
        assert_eq!(metrics.access_log_dropped.load(Relaxed), 7);
    }

    #[test]
    fn the_writer_writes_one_json_line_per_entry() {
        let metrics = Arc::new(Metrics::default());
        let (log, rx) = AccessLog::channel(16, metrics.clone());
        let mut e = Entry::new(Protocol::Http11, PathTaken::ProxiedSkMsg);
        e.start_time = UNIX_EPOCH + Duration::from_millis(1_796_549_101_123);
        e.duration = Duration::from_micros(12_700);
        e.source_address = Some(Addr::Ip(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))));
        e.destination_address = Some(SocketAddr::from(([10, 96, 0, 1], 80)));
        e.http = Some(HttpFields {
            method: "GET".into(),
            authority: Some("web".into()),
            path: "/a?b=1".into(),
            response_code: 503,
            attempts: 3,
        });
        e.flag(Flags::URX);
        e.flag(Flags::UF);
        log.send(Box::new(e));
        log.send(Box::new(Entry::new(Protocol::Tcp, PathTaken::Tunnel)));
        drop(log);
        let mut out = Vec::new();
        write_lines(rx, &mut out, Duration::from_millis(1));
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        let l = &lines[0];
        assert_eq!(l["start_time"], "2026-12-06T09:25:01.123Z");
        assert_eq!(l["duration_ms"], 12);
        assert_eq!(l["protocol"], "HTTP/1.1");
        assert_eq!(l["path_taken"], "proxied+sk_msg");
        assert_eq!(l["source_address"], "10.0.0.2");
        assert_eq!(l["destination_address"], "10.96.0.1:80");
        assert_eq!(l["method"], "GET");
        assert_eq!(l["path"], "/a?b=1");
        assert_eq!(l["response_code"], 503);
        assert_eq!(l["attempts"], 3);
        assert_eq!(l["response_flags"], "UF,URX");
        assert!(l["upstream_host"].is_null());
        let t = &lines[1];
        assert_eq!(t["protocol"], "TCP");
        assert_eq!(t["path_taken"], "tunnel");
        assert_eq!(t["response_flags"], "-");
        assert!(t.get("method").is_none(), "no HTTP fields on a TCP line");
    }

    fn mesh(logged: &[(&str, &str, [u8; 4], bool)]) -> Arc<MeshConfig> {
        use crate::proxy::config::workloads::{Telemetry, WorkloadInfo};
        let ws: Vec<Arc<WorkloadInfo>> = logged
            .iter()
            .map(|(ns, name, ip, on)| {
                Arc::new(WorkloadInfo {
                    uid: format!("Kubernetes//Pod/{ns}/{name}"),
                    name: (*name).into(),
                    namespace: (*ns).into(),
                    ips: vec![IpAddr::from(*ip)],
                    identity: crate::identity::SpiffeId::new("cluster.local", ns, "default")
                        .unwrap(),
                    node: String::new(),
                    hbone: true,
                    authorization_policies: vec![],
                    peer_authentications: vec![],
                    telemetry: Telemetry {
                        access_log: *on,
                        ..Default::default()
                    },
                })
            })
            .collect();
        Arc::new(MeshConfig {
            workloads: WorkloadIndex::new(&ws),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn without_the_flag_only_namespaces_that_ask_are_logged() {
        let metrics = Arc::new(Metrics::default());
        let (mesh_tx, mesh_rx) = watch::channel(Arc::new(MeshConfig::default()));
        let (tx, rx) = mpsc::sync_channel(16);
        let log = AccessLog {
            inner: Arc::new(Inner {
                all: false,
                scoped: AtomicBool::new(false),
                mesh: Some(mesh_rx),
                tx: OnceLock::from(Some(tx)),
                metrics: metrics.clone(),
            }),
        };
        tokio::spawn(log.clone().follow());
        let settle = |want: bool| {
            let log = log.clone();
            async move {
                for _ in 0..1000 {
                    if log.on() == want {
                        return;
                    }
                    tokio::task::yield_now().await;
                }
                panic!("on() never became {want}");
            }
        };
        settle(false).await;
        mesh_tx.send_replace(mesh(&[
            ("shop", "a", [10, 0, 0, 1], true),
            ("backend", "b", [10, 0, 0, 2], false),
        ]));
        settle(true).await;

        let line = |f: &dyn Fn(&mut Entry)| {
            let mut e = Entry::new(Protocol::Tcp, PathTaken::Proxied);
            f(&mut e);
            Box::new(e)
        };
        // Neither end in `shop`: not logged, and not counted as a drop.
        log.send(line(&|e| {
            e.source_address = Some(Addr::Sock(SocketAddr::from(([10, 0, 0, 2], 4000))));
            e.destination_address = Some(SocketAddr::from(([10, 0, 0, 9], 80)));
            e.destination_workload = Some("backend/b".into());
        }));
        // One end in `shop`, by each of the ways a line names it.
        log.send(line(&|e| {
            e.source_address = Some(Addr::Sock(SocketAddr::from(([10, 0, 0, 1], 4000))));
        }));
        log.send(line(&|e| {
            e.upstream_host = Some(SocketAddr::from(([10, 0, 0, 1], 80)))
        }));
        log.send(line(&|e| e.destination_workload = Some("shop/gone".into())));
        log.send(line(&|e| {
            e.source_principal = Some("spiffe://cluster.local/ns/shop/sa/web".into())
        }));
        assert_eq!(rx.try_iter().count(), 4);
        assert_eq!(metrics.access_log_dropped.load(Relaxed), 0);

        // The label removed: nothing is built any more.
        mesh_tx.send_replace(mesh(&[("shop", "a", [10, 0, 0, 1], false)]));
        settle(false).await;
    }

    #[test]
    fn dates_are_rfc3339_utc() {
        let at = |s: u64| Rfc3339(UNIX_EPOCH + Duration::from_secs(s)).to_string();
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59.000Z");
        assert_eq!(at(1_709_251_199), "2024-02-29T23:59:59.000Z");
    }

    #[test]
    fn long_paths_are_cut_at_a_character_boundary() {
        assert_eq!(bounded_path("/short"), "/short");
        let long = format!("/{}", "é".repeat(200));
        let cut = bounded_path(&long);
        assert!(cut.len() <= MAX_PATH_LEN);
        assert!(long.starts_with(&cut));
    }
}
