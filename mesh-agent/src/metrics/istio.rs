//! Istio's standard series (`istio_tcp_*`, `istio_requests_total` and the request
//! histograms), with Istio's label names, encoded by `prometheus-client` beside the
//! agent's own `mesh_*` text. The proxy counts what it relays; direct-mode flows, which
//! skip it, are counted from the datapath's per-flow records (`DirectFlows`).
//!
//! Cost: the proxy resolves a label set once per connection (TCP: one `TcpSeries` handle;
//! HTTP: a per-connection `HttpConn` whose small cache maps (endpoint, cluster, code,
//! flags) to a `CodeSeries`), so a request only bumps counters it already holds. A TCP
//! label set maps to its handle in one lookup (`tcp`), and the L4 proxy keeps the handles
//! it resolved for reuse while `tcp_generation` stays the same (no pruning since).
//!
//! Bounds: labels name workloads and services, never addresses. At most
//! `MAX_ISTIO_SERIES` label sets per kind; past it, new connections count under one
//! overflow set (`destination_service="other"`). At each scrape, label sets naming a
//! workload that is no longer in the proxy's workload model are dropped (`set_live`).

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex, OnceLock,
    },
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

/// Istio's value for what the reporter does not know.
pub const UNKNOWN: &str = "unknown";
/// `reporter` of the series a node proxy reports for its captured clients.
pub const SOURCE: &str = "source";
/// `reporter` of the series the destination node reports for what it terminates
/// (`proxy::inbound::telemetry`).
pub const DESTINATION: &str = "destination";
/// Most label sets kept per kind (TCP, HTTP).
pub const MAX_ISTIO_SERIES: usize = 2048;
/// `destination_service` of connections counted once `MAX_ISTIO_SERIES` is reached.
pub const OVERFLOW_SERVICE: &str = "other";
/// Entries of one HTTP connection's handle cache; past it, the oldest is replaced.
const CONN_CACHE: usize = 16;

/// Istio's default request duration buckets (milliseconds).
const DURATION_BUCKETS_MS: [f64; 14] = [
    1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0,
];

/// Istio's default size buckets (bytes): 1, 10, ... 10^8.
fn size_buckets() -> impl Iterator<Item = f64> {
    (0..9).map(|i| 10f64.powi(i))
}

/// One side of a connection as the proxy knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peer {
    pub workload: String,
    pub namespace: String,
    pub principal: String,
    pub app: String,
    pub version: String,
}

impl Default for Peer {
    fn default() -> Self {
        Peer {
            workload: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            principal: UNKNOWN.into(),
            app: UNKNOWN.into(),
            version: UNKNOWN.into(),
        }
    }
}

impl Peer {
    /// A peer known by its verified identity only: its principal, and the namespace the
    /// SPIFFE ID names; the workload stays unknown.
    pub fn from_identity(id: &crate::identity::SpiffeId) -> Peer {
        Peer {
            principal: id.to_string(),
            namespace: id.namespace().to_owned(),
            ..Peer::default()
        }
    }

    /// From `namespace/name` (the registry's form); anything else stays unknown.
    pub fn from_qualified(name: Option<&str>) -> Peer {
        let mut p = Peer::default();
        if let Some((ns, n)) = name.and_then(|s| s.split_once('/')) {
            p.namespace = ns.into();
            p.workload = n.into();
        }
        p
    }
}

/// The service behind a cluster named `outbound|PORT|SUBSET|NAME.NAMESPACE[...]`:
/// (service host, name, namespace); all unknown for another form or no cluster.
pub fn service_of(cluster: Option<&str>) -> (String, String, String) {
    let host = cluster
        .and_then(|c| c.strip_prefix("outbound|"))
        .and_then(|c| c.rsplit('|').next())
        .filter(|h| !h.is_empty());
    match host.and_then(|h| h.split_once('.').map(|(n, rest)| (h, n, rest))) {
        Some((h, n, rest)) => {
            let ns = rest.split('.').next().unwrap_or(UNKNOWN);
            (h.into(), n.into(), ns.into())
        }
        None => (UNKNOWN.into(), UNKNOWN.into(), UNKNOWN.into()),
    }
}

/// Istio's standard labels of a TCP series (an HTTP series adds `response_code`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct IstioLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub request_protocol: &'static str,
    pub response_flags: String,
    pub connection_security_policy: &'static str,
}

impl IstioLabels {
    /// `reporter`: "source" or "destination"; `protocol`: "tcp", "http" or "grpc";
    /// `mtls`: the connection is the mesh's mutual TLS.
    pub fn new(
        reporter: &'static str,
        source: &Peer,
        destination: &Peer,
        cluster: Option<&str>,
        protocol: &'static str,
        mtls: bool,
    ) -> IstioLabels {
        let (svc, svc_name, svc_ns) = service_of(cluster);
        IstioLabels {
            reporter,
            source_workload: source.workload.clone(),
            source_workload_namespace: source.namespace.clone(),
            source_principal: source.principal.clone(),
            source_app: source.app.clone(),
            source_version: source.version.clone(),
            destination_workload: destination.workload.clone(),
            destination_workload_namespace: destination.namespace.clone(),
            destination_principal: destination.principal.clone(),
            destination_app: destination.app.clone(),
            destination_version: destination.version.clone(),
            destination_service: svc,
            destination_service_name: svc_name,
            destination_service_namespace: svc_ns,
            request_protocol: protocol,
            response_flags: "-".into(),
            connection_security_policy: if mtls { "mutual_tls" } else { "none" },
        }
    }

    /// The same with Envoy's response flags (`-` for none).
    pub fn with_flags(mut self, flags: &str) -> IstioLabels {
        self.response_flags = flags.into();
        self
    }

    /// Whether the set names a workload (`namespace`, `name`) for which `live` says no.
    fn names_gone(&self, live: &HashSet<(String, String)>) -> bool {
        let gone =
            |ns: &str, n: &str| n != UNKNOWN && !live.contains(&(ns.to_owned(), n.to_owned()));
        gone(&self.source_workload_namespace, &self.source_workload)
            || gone(
                &self.destination_workload_namespace,
                &self.destination_workload,
            )
    }

    fn overflow(&self) -> IstioLabels {
        let u = Peer::default();
        let mut l = IstioLabels::new(
            self.reporter,
            &u,
            &u,
            None,
            self.request_protocol,
            self.connection_security_policy == "mutual_tls",
        );
        l.destination_service = OVERFLOW_SERVICE.into();
        l
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HttpLabels {
    #[prometheus(flatten)]
    pub common: IstioLabels,
    pub response_code: u16,
}

/// The TCP counters of one label set; a connection holds it from open to close.
#[derive(Debug)]
pub struct TcpSeries {
    pub opened: Counter,
    pub closed: Counter,
    /// Bytes sent to the source workload (response direction).
    pub sent: Counter,
    /// Bytes received from the source workload (request direction).
    pub received: Counter,
    /// The overflow set (`destination_service="other"`): a caller that keeps handles for
    /// reuse must not keep this one, each connection counted into it is counted in
    /// `mesh_istio_series_overflow_total` too.
    overflow: bool,
}

impl TcpSeries {
    /// Counters no family holds: counted into, never exported.
    fn detached() -> TcpSeries {
        TcpSeries {
            opened: Counter::default(),
            closed: Counter::default(),
            sent: Counter::default(),
            received: Counter::default(),
            overflow: false,
        }
    }

    /// Whether this is the overflow set's handle (see the field).
    pub fn is_overflow(&self) -> bool {
        self.overflow
    }
}

/// The counters of one HTTP label set (response code included).
#[derive(Debug)]
pub struct CodeSeries {
    pub requests: Counter,
    pub duration: Histogram,
    pub request_bytes: Histogram,
    pub response_bytes: Histogram,
}

type HistogramFamily = Family<HttpLabels, Histogram, fn() -> Histogram>;

/// Istio's families and the label sets in them.
pub struct Istio {
    registry: Registry,
    tcp_opened: Family<IstioLabels, Counter>,
    tcp_closed: Family<IstioLabels, Counter>,
    tcp_sent: Family<IstioLabels, Counter>,
    tcp_received: Family<IstioLabels, Counter>,
    requests: Family<HttpLabels, Counter>,
    duration: HistogramFamily,
    request_bytes: HistogramFamily,
    response_bytes: HistogramFamily,
    /// Each TCP label set's handle: one lookup per connection, no label clone.
    tcp_keys: Mutex<HashMap<IstioLabels, Arc<TcpSeries>>>,
    /// Bumped whenever a handle `tcp` gave may no longer be exported (its set pruned,
    /// or the series switched off or on): kept handles are resolved again.
    tcp_generation: AtomicU64,
    http_keys: Mutex<HashSet<HttpLabels>>,
    /// The workloads (`namespace`, `name`) in the proxy's model now; `None`: not known
    /// yet (nothing is pruned).
    live: OnceLock<LiveFn>,
    /// Label sets dropped because a workload they name is gone, and connections counted
    /// under the overflow set.
    pub pruned: AtomicU64,
    pub overflow: AtomicU64,
    /// `--telemetry off`: nothing is recorded (TCP handles are detached counters, HTTP
    /// requests return before the cache).
    enabled: std::sync::atomic::AtomicBool,
    /// The datapath's own counters of direct-mode flows (`DirectFlows`), kept with
    /// `--telemetry off` too.
    pub direct: DirectCounters,
}

/// What the datapath reported of direct-mode flows (`mesh_direct_*`), whatever the Istio
/// series' bounds and pruning did with them.
#[derive(Debug, Default)]
pub struct DirectCounters {
    pub records: AtomicU64,
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    /// Client to server: redirected socket to socket, and over TCP.
    pub request_redirected: AtomicU64,
    pub request_tcp: AtomicU64,
    /// Server to client.
    pub response_redirected: AtomicU64,
    pub response_tcp: AtomicU64,
    /// Sum of the closed flows' durations (ESTABLISHED to the client's close), ns.
    pub duration_ns: AtomicU64,
}

/// Reads the workloads in force (`namespace`, `name`), or `None` before the first.
pub type LiveFn = Box<dyn Fn() -> Option<HashSet<(String, String)>> + Send + Sync>;

impl std::fmt::Debug for Istio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Istio").finish_non_exhaustive()
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

fn size_histogram() -> Histogram {
    Histogram::new(size_buckets())
}

impl Default for Istio {
    fn default() -> Self {
        let mut registry = Registry::default();
        let tcp_opened = Family::<IstioLabels, Counter>::default();
        let tcp_closed = Family::<IstioLabels, Counter>::default();
        let tcp_sent = Family::<IstioLabels, Counter>::default();
        let tcp_received = Family::<IstioLabels, Counter>::default();
        let requests = Family::<HttpLabels, Counter>::default();
        let duration: HistogramFamily = Family::new_with_constructor(duration_histogram);
        let request_bytes: HistogramFamily = Family::new_with_constructor(size_histogram);
        let response_bytes: HistogramFamily = Family::new_with_constructor(size_histogram);
        // prometheus-client appends `_total` to counters' samples.
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened (Istio standard)",
            tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed (Istio standard)",
            tcp_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the source workload over TCP connections (Istio standard)",
            tcp_sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the source workload over TCP connections (Istio standard)",
            tcp_received.clone(),
        );
        registry.register(
            "istio_requests",
            "Requests (Istio standard)",
            requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Time from request to the response's last byte, in milliseconds (Istio standard)",
            duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes in bytes (Istio standard)",
            request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes in bytes (Istio standard)",
            response_bytes.clone(),
        );
        Istio {
            registry,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            requests,
            duration,
            request_bytes,
            response_bytes,
            tcp_keys: Mutex::default(),
            tcp_generation: AtomicU64::new(0),
            http_keys: Mutex::default(),
            live: OnceLock::new(),
            pruned: AtomicU64::new(0),
            overflow: AtomicU64::new(0),
            enabled: std::sync::atomic::AtomicBool::new(true),
            direct: DirectCounters::default(),
        }
    }
}

impl Istio {
    /// Where the workloads in force are read at each scrape, to drop gone ones' series.
    pub fn set_live(&self, f: LiveFn) {
        let _ = self.live.set(f);
    }

    /// Records the series (`true`, the default) or nothing (`--telemetry off`).
    pub fn set_enabled(&self, on: bool) {
        if self.enabled.swap(on, Relaxed) != on {
            self.tcp_generation.fetch_add(1, Relaxed);
        }
    }

    /// Changes whenever a handle `tcp` returned may have stopped being exported (see
    /// the field): a caller keeping handles resolves them again when it differs from
    /// what it read before resolving them.
    pub fn tcp_generation(&self) -> u64 {
        self.tcp_generation.load(Relaxed)
    }

    /// The handle of a TCP label set, created on first use. Called once per connection
    /// (or once per kept handle, see `tcp_generation`).
    pub fn tcp(&self, labels: IstioLabels) -> Arc<TcpSeries> {
        if !self.enabled.load(Relaxed) {
            return Arc::new(TcpSeries::detached());
        }
        let mut keys = self.tcp_keys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = keys.get(&labels) {
            return s.clone();
        }
        let (labels, overflow) = if keys.len() < MAX_ISTIO_SERIES {
            (labels, false)
        } else {
            self.overflow.fetch_add(1, Relaxed);
            let o = labels.overflow();
            if let Some(s) = keys.get(&o) {
                return s.clone();
            }
            (o, true)
        };
        let series = Arc::new(TcpSeries {
            opened: self.tcp_opened.get_or_create_owned(&labels),
            closed: self.tcp_closed.get_or_create_owned(&labels),
            sent: self.tcp_sent.get_or_create_owned(&labels),
            received: self.tcp_received.get_or_create_owned(&labels),
            overflow,
        });
        keys.insert(labels, series.clone());
        series
    }

    /// The handle of an HTTP label set with its response code, created on first use.
    pub fn http(&self, labels: IstioLabels, response_code: u16) -> Arc<CodeSeries> {
        let mut labels = HttpLabels {
            common: labels,
            response_code,
        };
        {
            let mut keys = self.http_keys.lock().unwrap_or_else(|e| e.into_inner());
            if !keys.contains(&labels) && keys.len() >= MAX_ISTIO_SERIES {
                self.overflow.fetch_add(1, Relaxed);
                labels.common = labels.common.overflow();
            }
            keys.insert(labels.clone());
        }
        Arc::new(CodeSeries {
            requests: self.requests.get_or_create_owned(&labels),
            duration: self.duration.get_or_create_owned(&labels),
            request_bytes: self.request_bytes.get_or_create_owned(&labels),
            response_bytes: self.response_bytes.get_or_create_owned(&labels),
        })
    }

    /// Drops the label sets that name a workload not in `live`. Connections still
    /// holding a dropped set's handle count into counters no scrape shows.
    pub fn prune(&self, live: &HashSet<(String, String)>) {
        let mut n = 0;
        {
            let mut keys = self.tcp_keys.lock().unwrap_or_else(|e| e.into_inner());
            keys.retain(|l, _| {
                if !l.names_gone(live) {
                    return true;
                }
                self.tcp_opened.remove(l);
                self.tcp_closed.remove(l);
                self.tcp_sent.remove(l);
                self.tcp_received.remove(l);
                n += 1;
                false
            });
            if n > 0 {
                // Under the lock: a handle resolved after this is of the new families.
                self.tcp_generation.fetch_add(1, Relaxed);
            }
        }
        {
            let mut keys = self.http_keys.lock().unwrap_or_else(|e| e.into_inner());
            keys.retain(|l| {
                if !l.common.names_gone(live) {
                    return true;
                }
                self.requests.remove(l);
                self.duration.remove(l);
                self.request_bytes.remove(l);
                self.response_bytes.remove(l);
                n += 1;
                false
            });
        }
        self.pruned.fetch_add(n, Relaxed);
    }

    /// Appends the families (Prometheus text; no OpenMetrics `# EOF`), after dropping
    /// the series of workloads that are gone.
    pub fn encode(&self, out: &mut String) {
        if let Some(live) = self.live.get().and_then(|f| f()) {
            self.prune(&live);
        }
        let _ = prometheus_client::encoding::text::encode_registry(out, &self.registry);
        let _ = writeln!(
            out,
            "# HELP mesh_istio_series_pruned_total Istio label sets dropped because a workload they name left the configuration.\n# TYPE mesh_istio_series_pruned_total counter\nmesh_istio_series_pruned_total {}\n\
             # HELP mesh_istio_series_overflow_total Connections counted under destination_service=\"other\" because the Istio series bound was reached.\n# TYPE mesh_istio_series_overflow_total counter\nmesh_istio_series_overflow_total {}",
            self.pruned.load(Relaxed),
            self.overflow.load(Relaxed),
        );
        let d = &self.direct;
        let l = |a: &AtomicU64| a.load(Relaxed);
        let _ = writeln!(
            out,
            "# HELP mesh_direct_flow_records_total Direct-mode flow records read from the datapath (FLOW_EVENTS); records the kernel dropped on a full ring are mesh_datapath_events_total{{event=\"telemetry_dropped\"}}.\n# TYPE mesh_direct_flow_records_total counter\nmesh_direct_flow_records_total {}\n\
             # HELP mesh_direct_flows_total Direct-mode flows (socket to socket, no proxy) opened and closed.\n# TYPE mesh_direct_flows_total counter\nmesh_direct_flows_total{{event=\"opened\"}} {}\nmesh_direct_flows_total{{event=\"closed\"}} {}\n\
             # HELP mesh_direct_bytes_total Bytes of closed direct-mode flows by direction (request: client to server) and how they went (redirect: sk_msg socket to socket; tcp: the TCP path).\n# TYPE mesh_direct_bytes_total counter\n\
             mesh_direct_bytes_total{{direction=\"request\",path=\"redirect\"}} {}\nmesh_direct_bytes_total{{direction=\"request\",path=\"tcp\"}} {}\n\
             mesh_direct_bytes_total{{direction=\"response\",path=\"redirect\"}} {}\nmesh_direct_bytes_total{{direction=\"response\",path=\"tcp\"}} {}\n\
             # HELP mesh_direct_flow_seconds_total Summed lifetime of closed direct-mode flows, seconds.\n# TYPE mesh_direct_flow_seconds_total counter\nmesh_direct_flow_seconds_total {:.6}",
            l(&d.records),
            l(&d.opened),
            l(&d.closed),
            l(&d.request_redirected),
            l(&d.request_tcp),
            l(&d.response_redirected),
            l(&d.response_tcp),
            l(&d.duration_ns) as f64 / 1e9,
        );
    }
}

/// Resolves a datapath workload id (`WorkloadInfo.id`) and the workload's address to the
/// peer the labels name (the wiring reads the registry and the proxy's mesh workloads).
pub type ResolveId = Box<dyn Fn(u32, std::net::IpAddr) -> Peer + Send>;

/// Direct-mode flows (two same-node pods paired socket to socket, which no proxy sees) in
/// the Istio series, from the datapath's flow records (`datapath::events::FlowReader`):
/// `reporter="source"` (the node is the source's), `destination_service` unknown (a direct
/// flow is a connection to a pod's address, not to a service's), `request_protocol="tcp"`,
/// `connection_security_policy="none"` (plain text between two pods of this node, as the
/// proxy reports same-node plain-text flows). A record resolves its labels once; the bytes
/// of a flow are added when each end closes (the request direction at the client's close,
/// the response at the server's), as the destination side's series count theirs.
pub struct DirectFlows {
    istio: Arc<Istio>,
    resolve: ResolveId,
    /// Series handles by (source id, source address, destination id, destination address),
    /// resolved once per `DIRECT_RESOLVE_FOR` and kept while `tcp_generation` stays the
    /// same (no pruning since): a connection's three records, and the records of one peer
    /// pair, then cost a map lookup instead of two resolutions, a label set and the family
    /// lookup (measured: about 1 us a record, a tenth of a direct-mode connection's CPU at
    /// one vCPU). A label change shows that much later.
    cache: Mutex<DirectCache>,
}

/// How long `DirectFlows` keeps a resolved handle, and how many at most.
const DIRECT_RESOLVE_FOR: Duration = Duration::from_millis(100);
const DIRECT_CACHE_MAX: usize = 4096;

type DirectKey = (u32, std::net::IpAddr, u32, std::net::IpAddr);

struct DirectCache {
    since: std::time::Instant,
    generation: u64,
    series: HashMap<DirectKey, Arc<TcpSeries>>,
}

impl DirectFlows {
    pub fn new(istio: Arc<Istio>, resolve: ResolveId) -> DirectFlows {
        DirectFlows {
            istio,
            resolve,
            cache: Mutex::new(DirectCache {
                since: std::time::Instant::now(),
                generation: 0,
                series: HashMap::new(),
            }),
        }
    }

    /// The series of a record's peers: from the cache while it is fresh, else resolved
    /// (the overflow set's handle is never kept, as `TcpSeries::is_overflow` asks).
    fn series(&self, r: &mesh_common::maps::FlowRecord) -> Arc<TcpSeries> {
        let (src, dst) = (r.key.local().ip(), r.key.remote().ip());
        let key = (r.src_id, src, r.dst_id, dst);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        let generation = self.istio.tcp_generation();
        if now.duration_since(cache.since) >= DIRECT_RESOLVE_FOR || cache.generation != generation {
            cache.series.clear();
            cache.since = now;
            cache.generation = generation;
        }
        if let Some(s) = cache.series.get(&key) {
            return s.clone();
        }
        let source = (self.resolve)(r.src_id, src);
        let destination = (self.resolve)(r.dst_id, dst);
        let series = self.istio.tcp(IstioLabels::new(
            SOURCE,
            &source,
            &destination,
            None,
            "tcp",
            false,
        ));
        if !series.is_overflow() && cache.series.len() < DIRECT_CACHE_MAX {
            cache.series.insert(key, series.clone());
        }
        series
    }

    /// Counts one record.
    pub fn record(&self, r: &mesh_common::maps::FlowRecord) {
        use mesh_common::flow_record as kind;
        let d = &self.istio.direct;
        d.records.fetch_add(1, Relaxed);
        if !matches!(
            r.kind,
            kind::OPENED | kind::CLIENT_CLOSED | kind::SERVER_CLOSED
        ) {
            return;
        }
        let series = self.series(r);
        let bytes = r.sent_redirected + r.sent_tcp;
        match r.kind {
            kind::OPENED => {
                d.opened.fetch_add(1, Relaxed);
                series.opened.inc();
            }
            kind::CLIENT_CLOSED => {
                d.closed.fetch_add(1, Relaxed);
                d.request_redirected.fetch_add(r.sent_redirected, Relaxed);
                d.request_tcp.fetch_add(r.sent_tcp, Relaxed);
                d.duration_ns.fetch_add(r.duration_ns, Relaxed);
                series.closed.inc();
                series.received.inc_by(bytes);
            }
            _ => {
                d.response_redirected.fetch_add(r.sent_redirected, Relaxed);
                d.response_tcp.fetch_add(r.sent_tcp, Relaxed);
                series.sent.inc_by(bytes);
            }
        }
    }
}

/// Resolves the destination workload at an endpoint address (the proxy's model).
pub type Resolve = Arc<dyn Fn(SocketAddr) -> Peer + Send + Sync>;

/// One HTTP connection's view: its source and a small cache of resolved handles, so a
/// request costs a short scan of at most `CONN_CACHE` entries, never a label string.
pub struct HttpConn {
    istio: Arc<Istio>,
    reporter: &'static str,
    source: Peer,
    resolve: Resolve,
    cache: Mutex<Vec<(CacheKey, Arc<CodeSeries>)>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct CacheKey {
    endpoint: Option<SocketAddr>,
    cluster: Arc<str>,
    protocol: &'static str,
    code: u16,
    flags: String,
    mtls: bool,
}

impl HttpConn {
    pub fn new(istio: Arc<Istio>, reporter: &'static str, source: Peer, resolve: Resolve) -> Self {
        HttpConn {
            istio,
            reporter,
            source,
            resolve,
            cache: Mutex::default(),
        }
    }

    /// Counts one finished request.
    #[expect(
        clippy::too_many_arguments,
        reason = "each is one label or one observation"
    )]
    pub fn record(
        &self,
        endpoint: Option<SocketAddr>,
        cluster: &str,
        grpc: bool,
        mtls: bool,
        code: u16,
        flags: &str,
        elapsed: Duration,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        if !self.istio.enabled.load(Relaxed) {
            return;
        }
        let protocol = if grpc { "grpc" } else { "http" };
        let series = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            let hit = cache.iter().find(|(k, _)| {
                k.endpoint == endpoint
                    && k.code == code
                    && k.protocol == protocol
                    && k.mtls == mtls
                    && *k.cluster == *cluster
                    && k.flags == flags
            });
            match hit {
                Some((_, s)) => s.clone(),
                None => {
                    let dst = endpoint.map(|e| (self.resolve)(e)).unwrap_or_default();
                    let c = Some(cluster).filter(|c| *c != UNKNOWN);
                    let labels =
                        IstioLabels::new(self.reporter, &self.source, &dst, c, protocol, mtls)
                            .with_flags(flags);
                    let s = self.istio.http(labels, code);
                    if cache.len() >= CONN_CACHE {
                        cache.remove(0);
                    }
                    cache.push((
                        CacheKey {
                            endpoint,
                            cluster: cluster.into(),
                            protocol,
                            code,
                            flags: flags.into(),
                            mtls,
                        },
                        s.clone(),
                    ));
                    s
                }
            }
        };
        series.requests.inc();
        series.duration.observe(elapsed.as_secs_f64() * 1000.0);
        series.request_bytes.observe(request_bytes as f64);
        series.response_bytes.observe(response_bytes as f64);
    }
}

/// One request's telemetry on its way: filled by the L7 engine as the request goes
/// (the endpoint of the last try, the path, body bytes) and counted when it ends.
#[derive(Debug)]
pub struct RequestTelemetry {
    pub conn: Arc<HttpConn>,
    /// The last try's endpoint (None: the proxy answered itself).
    pub endpoint: Option<SocketAddr>,
    /// The last try went through the mesh's mutual TLS tunnel.
    pub mtls: bool,
    pub grpc: bool,
    /// Request body bytes received from the client, counted by the body.
    pub received: Option<Arc<AtomicU64>>,
    /// Response body bytes sent to the client.
    pub sent: u64,
}

impl RequestTelemetry {
    pub fn new(conn: Arc<HttpConn>, grpc: bool) -> Self {
        RequestTelemetry {
            conn,
            endpoint: None,
            mtls: false,
            grpc,
            received: None,
            sent: 0,
        }
    }

    /// Counts the request: `cluster` (or `unknown`), the status sent, Envoy's flags.
    pub fn finish(&self, cluster: &str, code: u16, flags: &str, elapsed: Duration) {
        self.conn.record(
            self.endpoint,
            cluster,
            self.grpc,
            self.mtls,
            code,
            flags,
            elapsed,
            self.received.as_ref().map_or(0, |r| r.load(Relaxed)),
            self.sent,
        );
    }
}

impl std::fmt::Debug for HttpConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConn")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// Direct-mode flow peers as the proxy names its own clients': the workload the datapath's
/// registry holds under the record's id (`namespace/name`), then whatever `mesh` adds from
/// the mesh's workload at the address (principal, `app`, `version`). `mesh` is the proxy's
/// workload model, which this module may not read itself (docs/architecture.md): the
/// wiring passes a lookup into it.
impl DirectFlows {
    pub fn from_registry(
        istio: Arc<Istio>,
        registry: crate::datapath::writer::SharedRegistry,
        mesh: impl Fn(std::net::IpAddr, &mut Peer) + Send + 'static,
    ) -> DirectFlows {
        DirectFlows::new(
            istio,
            Box::new(move |id, ip| {
                let name = registry.read().unwrap_or_else(|e| e.into_inner()).name(id);
                let mut peer = Peer::from_qualified(name.as_deref());
                mesh(ip, &mut peer);
                peer
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ns: &str, n: &str) -> Peer {
        Peer {
            principal: format!("spiffe://cluster.local/ns/{ns}/sa/{n}"),
            ..Peer::from_qualified(Some(&format!("{ns}/{n}")))
        }
    }

    fn text(i: &Istio) -> String {
        let mut s = String::new();
        i.encode(&mut s);
        s
    }

    #[test]
    fn services_come_from_the_cluster_name() {
        assert_eq!(
            service_of(Some("outbound|80||reviews.backend")),
            ("reviews.backend".into(), "reviews".into(), "backend".into())
        );
        assert_eq!(
            service_of(Some("outbound|80|v1|reviews.backend.svc.cluster.local")).2,
            "backend"
        );
        assert_eq!(service_of(None).0, UNKNOWN);
        assert_eq!(service_of(Some("static")).1, UNKNOWN);
        assert_eq!(Peer::from_qualified(Some("shop/client")).namespace, "shop");
        assert_eq!(Peer::from_qualified(None), Peer::default());
    }

    #[test]
    fn tcp_labels_render_with_istio_names_and_handles_share_counters() {
        let i = Istio::default();
        let l = IstioLabels::new(
            "source",
            &peer("shop", "client"),
            &peer("backend", "v1"),
            Some("outbound|80||reviews.backend"),
            "tcp",
            false,
        );
        let a = i.tcp(l.clone());
        let b = i.tcp(l);
        a.opened.inc();
        b.opened.inc();
        a.sent.inc_by(5);
        let t = text(&i);
        assert!(t.contains("istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"client\",source_workload_namespace=\"shop\",source_principal=\"spiffe://cluster.local/ns/shop/sa/client\",source_app=\"unknown\",source_version=\"unknown\",destination_workload=\"v1\",destination_workload_namespace=\"backend\""), "{t}");
        assert!(t.contains("destination_service=\"reviews.backend\",destination_service_name=\"reviews\",destination_service_namespace=\"backend\",request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"none\"} 2"), "{t}");
        assert!(
            t.contains("istio_tcp_sent_bytes_total{") && t.contains("} 5"),
            "{t}"
        );
        assert!(!t.contains("# EOF"));
    }

    #[test]
    fn http_requests_are_cached_per_connection_and_histograms_counted() {
        let i = Arc::new(Istio::default());
        let ep: SocketAddr = "10.0.0.3:8080".parse().unwrap();
        let resolved = Arc::new(AtomicU64::new(0));
        let r = resolved.clone();
        let conn = HttpConn::new(
            i.clone(),
            "source",
            peer("shop", "client"),
            Arc::new(move |_| {
                r.fetch_add(1, Relaxed);
                peer("backend", "v1")
            }),
        );
        for _ in 0..3 {
            conn.record(
                Some(ep),
                "outbound|80||reviews.backend",
                false,
                false,
                200,
                "-",
                Duration::from_millis(3),
                0,
                2,
            );
        }
        conn.record(None, UNKNOWN, false, false, 404, "NR", Duration::ZERO, 0, 0);
        assert_eq!(
            resolved.load(Relaxed),
            1,
            "resolved once per (endpoint, code)"
        );
        let t = text(&i);
        assert!(t.contains("response_code=\"200\"} 3"), "{t}");
        assert!(
            t.contains("istio_request_duration_milliseconds_count{") && t.contains("} 3\n"),
            "{t}"
        );
        assert!(
            t.contains("istio_request_duration_milliseconds_bucket{"),
            "{t}"
        );
        // prometheus-client writes `le` first.
        assert!(
            t.contains("istio_request_duration_milliseconds_bucket{le=\"5.0\",reporter=\"source\"")
                && t.contains("response_code=\"200\"} 3"),
            "{t}"
        );
        assert!(!t.contains(".."), "one period at the end of HELP: {t}");
        assert!(t.contains("response_flags=\"NR\""), "{t}");
        assert!(t.contains("istio_response_bytes_sum{"), "{t}");
    }

    #[test]
    fn series_of_gone_workloads_are_pruned() {
        let i = Istio::default();
        let gone = i.tcp(IstioLabels::new(
            "source",
            &peer("shop", "client"),
            &peer("backend", "old"),
            None,
            "tcp",
            true,
        ));
        gone.opened.inc();
        let kept = i.tcp(IstioLabels::new(
            "source",
            &peer("shop", "client"),
            &Peer::default(),
            None,
            "tcp",
            true,
        ));
        kept.opened.inc();
        i.http(
            IstioLabels::new(
                "source",
                &peer("shop", "client"),
                &peer("backend", "old"),
                None,
                "http",
                false,
            ),
            200,
        )
        .requests
        .inc();
        let live: HashSet<_> = [("shop".to_owned(), "client".to_owned())].into();
        i.set_live(Box::new(move || Some(live.clone())));
        let t = text(&i);
        assert!(!t.contains("destination_workload=\"old\""), "{t}");
        assert!(t.contains("destination_workload=\"unknown\""), "{t}");
        assert!(
            t.contains("connection_security_policy=\"mutual_tls\""),
            "{t}"
        );
        assert_eq!(i.pruned.load(Relaxed), 2);
    }

    #[test]
    fn direct_flow_records_count_both_directions_under_the_source_reporter() {
        use mesh_common::{flow_record, maps::FlowRecord, maps::SockKey};
        let i = Arc::new(Istio::default());
        let d = DirectFlows::new(
            i.clone(),
            Box::new(|id, ip| match id {
                1 => {
                    assert_eq!(ip, std::net::IpAddr::from([10, 0, 0, 2]));
                    peer("shop", "client")
                }
                2 => peer("backend", "db"),
                _ => Peer::default(),
            }),
        );
        let base = FlowRecord {
            src_id: 1,
            dst_id: 2,
            key: SockKey::new(
                0,
                "10.0.0.2:40000".parse().unwrap(),
                "10.0.0.3:9000".parse().unwrap(),
            ),
            ..FlowRecord::default()
        };
        d.record(&FlowRecord {
            kind: flow_record::OPENED,
            ..base
        });
        d.record(&FlowRecord {
            kind: flow_record::CLIENT_CLOSED,
            sent_redirected: 1000,
            sent_tcp: 24,
            duration_ns: 1_500_000_000,
            ..base
        });
        d.record(&FlowRecord {
            kind: flow_record::SERVER_CLOSED,
            sent_redirected: 77,
            ..base
        });
        let t = text(&i);
        let series = "{reporter=\"source\",source_workload=\"client\",source_workload_namespace=\"shop\",source_principal=\"spiffe://cluster.local/ns/shop/sa/client\",source_app=\"unknown\",source_version=\"unknown\",destination_workload=\"db\",destination_workload_namespace=\"backend\",destination_principal=\"spiffe://cluster.local/ns/backend/sa/db\",destination_app=\"unknown\",destination_version=\"unknown\",destination_service=\"unknown\",destination_service_name=\"unknown\",destination_service_namespace=\"unknown\",request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"none\"}";
        for (m, v) in [
            ("istio_tcp_connections_opened_total", 1),
            ("istio_tcp_connections_closed_total", 1),
            ("istio_tcp_received_bytes_total", 1024),
            ("istio_tcp_sent_bytes_total", 77),
        ] {
            assert!(t.contains(&format!("{m}{series} {v}\n")), "{m}: {t}");
        }
        assert!(
            t.contains("mesh_direct_flows_total{event=\"opened\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("mesh_direct_bytes_total{direction=\"request\",path=\"tcp\"} 24\n"),
            "{t}"
        );
        assert!(t.contains("mesh_direct_flow_seconds_total 1.500000"), "{t}");
        assert!(t.contains("mesh_direct_flow_records_total 3\n"), "{t}");
    }

    #[test]
    fn a_label_set_has_one_handle_and_pruning_moves_the_generation() {
        let i = Istio::default();
        let labels = |w: &str| {
            IstioLabels::new(
                "source",
                &peer("shop", "client"),
                &peer("backend", w),
                None,
                "tcp",
                false,
            )
        };
        let a = i.tcp(labels("v1"));
        assert!(Arc::ptr_eq(&a, &i.tcp(labels("v1"))));
        assert!(!a.is_overflow());
        let g = i.tcp_generation();
        let live: HashSet<_> = [
            ("shop".to_owned(), "client".to_owned()),
            ("backend".to_owned(), "v1".to_owned()),
        ]
        .into();
        i.prune(&live);
        assert_eq!(i.tcp_generation(), g, "nothing pruned");
        i.tcp(labels("gone")).opened.inc();
        i.prune(&live);
        assert_ne!(i.tcp_generation(), g, "a kept handle may be stale now");
        // A set resolved again after its prune counts where a scrape sees it.
        let g = i.tcp_generation();
        let again = i.tcp(labels("gone"));
        again.opened.inc();
        assert!(text(&i).contains("destination_workload=\"gone\""));
        i.set_enabled(false);
        assert_ne!(i.tcp_generation(), g);
    }

    #[test]
    fn label_sets_stay_bounded() {
        let i = Istio::default();
        for n in 0..MAX_ISTIO_SERIES + 10 {
            i.tcp(IstioLabels::new(
                "source",
                &peer("shop", &format!("w{n}")),
                &Peer::default(),
                None,
                "tcp",
                false,
            ))
            .opened
            .inc();
        }
        assert_eq!(i.overflow.load(Relaxed), 10);
        assert_eq!(i.tcp_keys.lock().unwrap().len(), MAX_ISTIO_SERIES + 1);
        let o = i.tcp(IstioLabels::new(
            "source",
            &peer("shop", "one-more"),
            &Peer::default(),
            None,
            "tcp",
            false,
        ));
        assert!(o.is_overflow(), "not to be kept by callers");
        assert_eq!(i.overflow.load(Relaxed), 11);
        assert!(text(&i).contains("destination_service=\"other\""));
    }

    #[test]
    fn direct_flows_resolve_a_peer_pair_once_until_its_series_is_pruned() {
        use mesh_common::{flow_record, maps::FlowRecord, maps::SockKey};
        let i = Arc::new(Istio::default());
        let calls = Arc::new(AtomicU64::new(0));
        let d = DirectFlows::new(i.clone(), {
            let calls = calls.clone();
            Box::new(move |id, _| {
                calls.fetch_add(1, Relaxed);
                if id == 1 {
                    peer("shop", "client")
                } else {
                    peer("backend", "db")
                }
            })
        });
        let opened = |port: u16| FlowRecord {
            kind: flow_record::OPENED,
            src_id: 1,
            dst_id: 2,
            key: SockKey::new(
                0,
                format!("10.0.0.2:{port}").parse().unwrap(),
                "10.0.0.3:9000".parse().unwrap(),
            ),
            ..FlowRecord::default()
        };
        for port in 40000..40003 {
            d.record(&opened(port));
        }
        assert_eq!(
            calls.load(Relaxed),
            2,
            "one resolution per peer, then the cache"
        );
        let count = |i: &Istio| {
            text(i)
                .lines()
                .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
                .map(|l| l.rsplit(' ').next().unwrap_or_default().to_string())
        };
        assert_eq!(count(&i).as_deref(), Some("3"));
        // The destination leaves the model: its series go, and a kept handle with them.
        let live: HashSet<(String, String)> = [("shop".to_string(), "client".to_string())]
            .into_iter()
            .collect();
        i.prune(&live);
        assert_eq!(count(&i), None);
        d.record(&opened(40003));
        assert_eq!(calls.load(Relaxed), 4, "resolved again after the pruning");
        assert_eq!(
            count(&i).as_deref(),
            Some("1"),
            "counted into a live series"
        );
    }
}
