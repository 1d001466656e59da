//! Prometheus metrics of the node proxy and the datapath, rendered in the text exposition
//! format at the admin endpoint's `/metrics`.

pub mod istio;

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex, Weak,
    },
    time::Duration,
};

use mesh_common::Stat;

/// Labels of one L4 flow series.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowLabels {
    /// `namespace/name` of the client workload, or `unknown`.
    pub source_workload: String,
    /// Original destination `ip:port`.
    pub destination_address: String,
    /// `namespace/name` when the destination is a workload of this node, else `unknown`.
    pub destination_workload: String,
    /// The app <-> proxy leg was short-circuited by sk_msg.
    pub skmsg: bool,
}

#[derive(Debug, Default)]
pub struct FlowCounters {
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    /// Bytes received from the source workload (request direction).
    pub received: AtomicU64,
    /// Bytes sent to the source workload (response direction).
    pub sent: AtomicU64,
    /// Connections to the original destination that failed.
    pub connect_failures: AtomicU64,
}

/// Name, help text and reader of one L4 counter family.
type Series = (&'static str, &'static str, fn(&FlowCounters) -> u64);

#[derive(Default)]
pub struct Metrics {
    flows: Mutex<BTreeMap<FlowLabels, Arc<FlowCounters>>>,
    /// Accepted connections whose original destination was not found.
    pub orig_dst_missing: AtomicU64,
    /// Connections to a TCP service listener whose cluster had no healthy endpoint (reset).
    pub no_endpoint: AtomicU64,
    /// Captured connections whose original destination the proxy refuses to dial on a
    /// workload's behalf (reset), by reason.
    pub refused_local_scope: AtomicU64,
    pub refused_node_address: AtomicU64,
    /// Connections whose listener configuration was unknown (control plane unreachable or
    /// slow): relayed as plain TCP (fail-open workload) or reset (fail-closed).
    pub config_unknown_passed: AtomicU64,
    pub config_unknown_refused: AtomicU64,
    /// L4 series dropped to stay within `MAX_FLOW_SERIES`, and connections counted under
    /// `OVERFLOW_ADDRESS` because every series was live.
    pub series_evicted: AtomicU64,
    pub series_overflow: AtomicU64,
    /// Enrolled workloads whose network namespace could not be resolved.
    pub unresolved_workloads: AtomicU64,
    pub enrolled_workloads: AtomicU64,
    /// 1 while native IPv6 connections are captured (`--proxy-redirect6`), else 0.
    pub ipv6_capture: AtomicU64,
    /// Connections each node proxy worker accepted (`proxy::workers`).
    pub worker_accepts: WorkerAccepts,
    /// Reloads of the standalone file, applied and rejected.
    pub reloads: Arc<crate::enrol::file::ReloadStats>,
    /// Datapath map writes of the map syncer that failed, by map.
    pub map_writes: crate::datapath::writer::MapWriteStats,
    /// The L7 proxy's series (`proxy::http::L7` counts into these).
    pub l7: Arc<L7Metrics>,
    /// Inbound capture (`proxy::inbound`).
    pub inbound: InboundMetrics,
    /// Policy decisions and the tunnel (`proxy::secure`).
    pub authz: AuthzMetrics,
    /// Access-log lines dropped because the writer's queue was full (`proxy::accesslog`).
    pub access_log_dropped: AtomicU64,
    /// Spans (`proxy::trace`): dropped because the export queue was full, exported, and
    /// lost in exports that failed.
    pub trace_spans_dropped: AtomicU64,
    pub trace_spans_exported: AtomicU64,
    pub trace_spans_failed: AtomicU64,
}

/// At most this many (direction, level, verdict, policy) series; past it, `policy="other"`.
pub const MAX_AUTHZ_SERIES: usize = 1024;

/// (direction, level, verdict); each holds its counts by deciding policy, so counting a
/// decision looks the policy up by `&str` (no key built per connection).
type DecisionKey = (&'static str, &'static str, &'static str);

/// Policy decisions by direction, level (a connection, or a request where the agent
/// terminates HTTP for L7 rules), outcome and deciding policy; tunnel streams.
#[derive(Debug, Default)]
pub struct AuthzMetrics {
    decisions: Mutex<BTreeMap<DecisionKey, BTreeMap<String, u64>>>,
    /// Inbound connections judged without policy: their pod was not in the workloads in
    /// force yet.
    pub unknown: AtomicU64,
    /// HBONE streams opened towards other nodes, and those that failed (reset).
    pub tunnel_out: AtomicU64,
    pub tunnel_out_failures: AtomicU64,
    /// HBONE streams accepted on in-pod listeners and delivered.
    pub tunnel_in: AtomicU64,
    /// HBONE streams whose `Forwarded: for=` source address was believed (the peer's
    /// identity owns it), and those whose claim was not (judged by the peer's address).
    pub source_forwarded: AtomicU64,
    pub source_untrusted: AtomicU64,
    /// Inbound connections whose HTTP the agent terminated to judge each request, by
    /// how they arrived.
    pub http_plain: AtomicU64,
    pub http_tunnel: AtomicU64,
}

impl AuthzMetrics {
    /// Counts one connection's decision (`direction`: inbound or outbound).
    pub fn count(&self, direction: &'static str, allowed: bool, policy: Option<&str>) {
        self.add(direction, "connection", allowed, policy);
    }

    /// Counts one HTTP request's decision (`direction`: inbound).
    pub fn count_request(&self, direction: &'static str, allowed: bool, policy: Option<&str>) {
        self.add(direction, "request", allowed, policy);
    }

    fn add(
        &self,
        direction: &'static str,
        level: &'static str,
        allowed: bool,
        policy: Option<&str>,
    ) {
        let verdict = if allowed { "allow" } else { "deny" };
        let policy = policy.unwrap_or("none");
        let mut m = self.decisions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m
            .get_mut(&(direction, level, verdict))
            .and_then(|p| p.get_mut(policy))
        {
            *n += 1;
            return;
        }
        let series: usize = m.values().map(BTreeMap::len).sum();
        let policy = if series < MAX_AUTHZ_SERIES {
            policy
        } else {
            "other"
        };
        *m.entry((direction, level, verdict))
            .or_default()
            .entry(policy.to_owned())
            .or_default() += 1;
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP mesh_authz_decisions_total Connections, and requests where the agent terminates HTTP for L7 rules, judged by AuthorizationPolicy and PeerAuthentication, by direction, level (connection, request), verdict and deciding policy (`none`: no policy decided).\n# TYPE mesh_authz_decisions_total counter"
        );
        for ((dir, level, verdict), policy, n) in self
            .decisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flat_map(|(k, p)| p.iter().map(move |(policy, n)| (k, policy, n)))
        {
            let _ = writeln!(
                out,
                "mesh_authz_decisions_total{{direction=\"{dir}\",level=\"{level}\",verdict=\"{verdict}\",policy=\"{}\"}} {n}",
                esc(policy)
            );
        }
        let _ = writeln!(
            out,
            "# HELP mesh_authz_unknown_total Inbound connections judged without policy: their pod was not in the configuration yet.\n# TYPE mesh_authz_unknown_total counter\nmesh_authz_unknown_total {}",
            self.unknown.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP mesh_authz_http_connections_total Inbound connections whose HTTP the agent terminated to judge each request (a policy with HTTP attributes applies to the port), by how they arrived.\n# TYPE mesh_authz_http_connections_total counter\n\
             mesh_authz_http_connections_total{{transport=\"plain\"}} {}\n\
             mesh_authz_http_connections_total{{transport=\"hbone\"}} {}",
            self.http_plain.load(Relaxed),
            self.http_tunnel.load(Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP mesh_hbone_streams_total HBONE streams: opened to other nodes (out), failed to open (out_failed), accepted and delivered into a pod (in).\n# TYPE mesh_hbone_streams_total counter\n\
             mesh_hbone_streams_total{{direction=\"out\"}} {}\n\
             mesh_hbone_streams_total{{direction=\"out_failed\"}} {}\n\
             mesh_hbone_streams_total{{direction=\"in\"}} {}",
            self.tunnel_out.load(Relaxed),
            self.tunnel_out_failures.load(Relaxed),
            self.tunnel_in.load(Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP mesh_hbone_forwarded_source_total HBONE streams naming their source address (Forwarded: for=): believed (a workload of the peer's identity has it) or not (judged by the peer's address).\n# TYPE mesh_hbone_forwarded_source_total counter\n\
             mesh_hbone_forwarded_source_total{{outcome=\"trusted\"}} {}\n\
             mesh_hbone_forwarded_source_total{{outcome=\"untrusted\"}} {}",
            self.source_forwarded.load(Relaxed),
            self.source_untrusted.load(Relaxed),
        );
    }
}

/// Inbound capture: connections the in-pod listeners took, and the pods capturing.
#[derive(Debug, Default)]
pub struct InboundMetrics {
    /// Plaintext connections accepted by an in-pod listener (steered there by TC).
    pub accepted: AtomicU64,
    /// Of those, delivered to the application (connected inside the pod).
    pub delivered: AtomicU64,
    /// Of those, refused (reset): the application's port did not answer, or the
    /// connection named the agent's own port.
    pub refused: AtomicU64,
    /// Bytes relayed to and from the application.
    pub received_bytes: AtomicU64,
    pub sent_bytes: AtomicU64,
    /// Pods with listeners open and the TC program attached (gauge).
    pub pods: AtomicU64,
    /// Pods whose capture could not be set up (listener or attach failed; retried).
    pub setup_failures: AtomicU64,
    /// Connections each proxy worker accepted from the in-pod listeners: plaintext
    /// (`[0]`) and HBONE (`[1]`); sized by `WorkerAccepts::init`.
    pub worker_accepts: [WorkerAccepts; 2],
}

impl InboundMetrics {
    fn render(&self, out: &mut String) {
        if self.worker_accepts[0].0.get().is_some() {
            let _ = writeln!(
                out,
                "# HELP mesh_inbound_worker_connections_total Connections each node proxy worker accepted from the in-pod listeners (plaintext 15006, HBONE 15008; every worker accepts from every pod's listeners).\n# TYPE mesh_inbound_worker_connections_total counter"
            );
            for (listener, w) in ["plain", "hbone"].iter().zip(&self.worker_accepts) {
                w.render_lines(
                    out,
                    "mesh_inbound_worker_connections_total",
                    &format!("listener=\"{listener}\","),
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP mesh_inbound_connections_total Plaintext inbound connections taken by the in-pod listeners (accepted), delivered to the application, or refused (reset).\n# TYPE mesh_inbound_connections_total counter\n\
             mesh_inbound_connections_total{{outcome=\"accepted\"}} {}\n\
             mesh_inbound_connections_total{{outcome=\"delivered\"}} {}\n\
             mesh_inbound_connections_total{{outcome=\"refused\"}} {}",
            self.accepted.load(Relaxed),
            self.delivered.load(Relaxed),
            self.refused.load(Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP mesh_inbound_bytes_total Bytes of inbound connections relayed from the client (received) and to it (sent).\n# TYPE mesh_inbound_bytes_total counter\n\
             mesh_inbound_bytes_total{{direction=\"received\"}} {}\n\
             mesh_inbound_bytes_total{{direction=\"sent\"}} {}",
            self.received_bytes.load(Relaxed),
            self.sent_bytes.load(Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP mesh_inbound_pods Pods whose inbound traffic is captured (in-pod listeners open, TC attached).\n# TYPE mesh_inbound_pods gauge\nmesh_inbound_pods {}",
            self.pods.load(Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP mesh_inbound_setup_failures_total Attempts to set up a pod's inbound capture that failed (retried).\n# TYPE mesh_inbound_setup_failures_total counter\nmesh_inbound_setup_failures_total {}",
            self.setup_failures.load(Relaxed),
        );
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Most L4 series kept at once. Their labels come from what pods dial (a destination
/// address per series), so without a bound every distinct `ip:port` would add a series
/// for good (2,000 dials made 3,170 series and 479 KB of `/metrics`).
pub const MAX_FLOW_SERIES: usize = 512;

/// `destination_address` of connections counted once the bound is reached and every
/// series still has a live connection.
pub const OVERFLOW_ADDRESS: &str = "other";

impl Metrics {
    /// The counters of a series, created on first use. Called once per connection.
    ///
    /// At `MAX_FLOW_SERIES`, the series without a live connection are dropped first (a
    /// scrape sees their counters end, as for a restart); if every series is live, the
    /// connection is counted under `destination_address="other"`.
    pub fn flow(&self, labels: FlowLabels) -> Arc<FlowCounters> {
        self.flow_series(labels).0
    }

    /// `flow`, and whether the connection was counted under `OVERFLOW_ADDRESS` (a caller
    /// that keeps series for reuse must not keep that one: each connection counted into
    /// it is counted in `mesh_metrics_flow_series_overflow_total` too).
    pub fn flow_series(&self, mut labels: FlowLabels) -> (Arc<FlowCounters>, bool) {
        let mut m = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = m.get(&labels) {
            return (c.clone(), false);
        }
        let mut overflow = false;
        if m.len() >= MAX_FLOW_SERIES {
            let before = m.len();
            // Only the map holds the counters of a series with no connection open (kept
            // series are `Weak`, see `flow_again`).
            m.retain(|_, c| Arc::strong_count(c) > 1);
            self.series_evicted
                .fetch_add((before - m.len()) as u64, Relaxed);
            if m.len() >= MAX_FLOW_SERIES {
                self.series_overflow.fetch_add(1, Relaxed);
                labels.destination_address = OVERFLOW_ADDRESS.into();
                overflow = true;
            }
        }
        (m.entry(labels).or_default().clone(), overflow)
    }

    /// The counters of a series `flow_series` gave before (kept as `Weak`), if the series
    /// is still rendered; `None` if it was dropped since (resolve it again). Under the
    /// map's lock, so it cannot race the eviction: a series leaves the map only while no
    /// connection holds it, and the map's reference was then the last one.
    pub fn flow_again(&self, kept: &Weak<FlowCounters>) -> Option<Arc<FlowCounters>> {
        let _m = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        kept.upgrade()
    }

    pub fn render(&self, datapath: &[(Stat, u64)]) -> String {
        let mut out = String::with_capacity(4096);
        let flows: Vec<(FlowLabels, Arc<FlowCounters>)> = {
            let m = self.flows.lock().unwrap_or_else(|e| e.into_inner());
            m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let series: [Series; 5] = [
            (
                "mesh_tcp_connections_opened_total",
                "Connections accepted by the node proxy.",
                |c| c.opened.load(Relaxed),
            ),
            (
                "mesh_tcp_connections_closed_total",
                "Connections of the node proxy that ended.",
                |c| c.closed.load(Relaxed),
            ),
            (
                "mesh_tcp_received_bytes_total",
                "Bytes received from the source workload.",
                |c| c.received.load(Relaxed),
            ),
            (
                "mesh_tcp_sent_bytes_total",
                "Bytes sent to the source workload.",
                |c| c.sent.load(Relaxed),
            ),
            (
                "mesh_tcp_connect_failures_total",
                "Failed connections to the original destination.",
                |c| c.connect_failures.load(Relaxed),
            ),
        ];
        for (name, help, get) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (l, c) in &flows {
                let _ = writeln!(
                    out,
                    "{name}{{source_workload=\"{}\",destination_address=\"{}\",destination_workload=\"{}\",skmsg=\"{}\"}} {}",
                    esc(&l.source_workload),
                    esc(&l.destination_address),
                    esc(&l.destination_workload),
                    l.skmsg,
                    get(c)
                );
            }
        }
        let scalars = [
            (
                "mesh_proxy_orig_dst_missing_total",
                "counter",
                "Accepted connections without a recorded original destination (closed).",
                &self.orig_dst_missing,
            ),
            (
                "mesh_proxy_no_healthy_endpoint_total",
                "counter",
                "Connections to a TCP service with no healthy endpoint (reset).",
                &self.no_endpoint,
            ),
            (
                "mesh_metrics_flow_series_evicted_total",
                "counter",
                "L4 series without a live connection dropped to stay within the series bound.",
                &self.series_evicted,
            ),
            (
                "mesh_metrics_flow_series_overflow_total",
                "counter",
                "Connections counted under destination_address=\"other\" because every L4 series was live.",
                &self.series_overflow,
            ),
            (
                "mesh_access_log_dropped_total",
                "counter",
                "Access-log lines dropped because the writer's queue was full (the proxy never waits for the log).",
                &self.access_log_dropped,
            ),
            (
                "mesh_trace_spans_dropped_total",
                "counter",
                "Spans dropped because the export queue was full (the proxy never waits for the exporter).",
                &self.trace_spans_dropped,
            ),
            (
                "mesh_trace_spans_exported_total",
                "counter",
                "Spans the OTLP receiver accepted.",
                &self.trace_spans_exported,
            ),
            (
                "mesh_trace_spans_failed_total",
                "counter",
                "Spans lost in OTLP exports that failed (receiver unreachable or refusing, after the exporter's retries).",
                &self.trace_spans_failed,
            ),
            (
                "mesh_workloads_enrolled",
                "gauge",
                "Workloads whose outbound traffic is captured.",
                &self.enrolled_workloads,
            ),
            (
                "mesh_workloads_unresolved",
                "gauge",
                "Enrolled workloads whose network namespace cannot be found.",
                &self.unresolved_workloads,
            ),
            (
                "mesh_ipv6_capture",
                "gauge",
                "1 while native IPv6 connections of enrolled pods are captured (--proxy-redirect6); 0: they go around the mesh (connect_not_ipv4).",
                &self.ipv6_capture,
            ),
        ];
        for (name, kind, help, v) in scalars {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP mesh_proxy_config_unknown_total Connections whose configuration was unknown when they arrived (control plane unreachable or not answering in time): relayed as plain TCP for fail-open workloads (passed), reset for fail-closed ones (refused).\n# TYPE mesh_proxy_config_unknown_total counter\n\
             mesh_proxy_config_unknown_total{{outcome=\"passed\"}} {}\n\
             mesh_proxy_config_unknown_total{{outcome=\"refused\"}} {}",
            self.config_unknown_passed.load(Relaxed),
            self.config_unknown_refused.load(Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP mesh_proxy_refused_destinations_total Captured connections to an address the proxy never dials for a workload (reset): this host or link (local_scope), or the node's own addresses (node_address).\n# TYPE mesh_proxy_refused_destinations_total counter\n\
             mesh_proxy_refused_destinations_total{{reason=\"local_scope\"}} {}\n\
             mesh_proxy_refused_destinations_total{{reason=\"node_address\"}} {}",
            self.refused_local_scope.load(Relaxed),
            self.refused_node_address.load(Relaxed),
        );
        self.worker_accepts.render(&mut out);
        let _ = writeln!(
            out,
            "# HELP mesh_datapath_events_total Datapath events and verdicts counted by the eBPF programs.\n# TYPE mesh_datapath_events_total counter"
        );
        for (s, v) in datapath {
            let _ = writeln!(
                out,
                "mesh_datapath_events_total{{event=\"{}\"}} {v}",
                s.name()
            );
        }
        self.reloads.render(&mut out);
        self.map_writes.render(&mut out);
        self.l7.render(&mut out);
        self.inbound.render(&mut out);
        self.authz.render(&mut out);
        out
    }
}

/// Labels of one L7 request series (Istio's standard labels, trimmed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestLabels {
    /// `namespace/name` of the client workload, or `unknown`.
    pub source_workload: String,
    /// The cluster the request went to (`unknown` for local replies). Not a workload:
    /// one request's tries may go to several endpoints.
    pub destination_cluster: String,
    /// The listener (service) the request was sent to.
    pub destination_service: String,
    pub response_code: u16,
    /// The route's name; empty when no route matched.
    pub route: String,
}

/// Upper bounds (milliseconds) of the request duration histogram buckets (Istio's).
const DURATION_BUCKETS_MS: [u64; 14] = [
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000,
];

/// The counters of one request series. The proxy resolves a handle once per label set
/// and connection (`L7Metrics::series`) and bumps it per request without a lookup.
#[derive(Debug, Default)]
pub struct RequestSeries {
    count: AtomicU64,
    sum_us: AtomicU64,
    /// Non-cumulative counts per bucket; the last slot is `+Inf`.
    buckets: [AtomicU64; DURATION_BUCKETS_MS.len() + 1],
}

impl RequestSeries {
    /// One finished request that took `elapsed`.
    pub fn observe(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = DURATION_BUCKETS_MS
            .iter()
            .position(|b| us <= b * 1000)
            .unwrap_or(DURATION_BUCKETS_MS.len());
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
        self.buckets[bucket].fetch_add(1, Relaxed);
    }
}

/// Request counters and latency histograms of the L7 proxy, plus its policy counters.
#[derive(Debug, Default)]
pub struct L7Metrics {
    requests: Mutex<HashMap<RequestLabels, Arc<RequestSeries>>>,
    /// Retries by cluster.
    retries: Mutex<BTreeMap<String, u64>>,
    /// Requests refused by a local rate limit, by rate-limit key.
    rate_limited: Mutex<BTreeMap<String, u64>>,
    /// Requests refused by a tripped circuit breaker, by cluster.
    circuit_open: Mutex<BTreeMap<String, u64>>,
    /// Outlier ejections by cluster.
    ejections: Mutex<BTreeMap<String, u64>>,
    /// Istio's standard series (`metrics::istio`, L4 and L7), encoded by prometheus-client.
    pub istio: Arc<istio::Istio>,
}

fn bump(m: &Mutex<BTreeMap<String, u64>>, key: &str) {
    let mut m = m.lock().unwrap_or_else(|e| e.into_inner());
    match m.get_mut(key) {
        Some(v) => *v += 1,
        None => {
            m.insert(key.to_owned(), 1);
        }
    }
}

impl L7Metrics {
    /// One finished request (after its response's last byte).
    pub fn request(&self, labels: RequestLabels, elapsed: Duration) {
        self.series(labels).observe(elapsed);
    }

    /// The handle of a series, created on first use.
    pub fn series(&self, labels: RequestLabels) -> Arc<RequestSeries> {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(labels).or_default().clone()
    }

    pub fn retry(&self, cluster: &str) {
        bump(&self.retries, cluster);
    }

    pub fn rate_limited(&self, key: &str) {
        bump(&self.rate_limited, key);
    }

    pub fn circuit_open(&self, cluster: &str) {
        bump(&self.circuit_open, cluster);
    }

    pub fn ejection(&self, cluster: &str) {
        bump(&self.ejections, cluster);
    }

    /// Total of the request counter for series matching `f`.
    #[cfg(test)]
    pub fn requests_where(&self, f: impl Fn(&RequestLabels) -> bool) -> u64 {
        let m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .filter(|(l, _)| f(l))
            .map(|(_, s)| s.count.load(Relaxed))
            .sum()
    }

    /// Appends the L7 families in the text exposition format.
    pub fn render(&self, out: &mut String) {
        let requests: Vec<(RequestLabels, u64, u64, Vec<u64>)> = {
            let m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
            let mut v: Vec<_> = m
                .iter()
                .map(|(l, s)| {
                    let load = |a: &AtomicU64| a.load(Relaxed);
                    let buckets = s.buckets.iter().map(load).collect();
                    (l.clone(), load(&s.count), load(&s.sum_us), buckets)
                })
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        let labels = |l: &RequestLabels| {
            format!(
                "source_workload=\"{}\",destination_cluster=\"{}\",destination_service=\"{}\",response_code=\"{}\",route=\"{}\"",
                esc(&l.source_workload),
                esc(&l.destination_cluster),
                esc(&l.destination_service),
                l.response_code,
                esc(&l.route)
            )
        };
        let _ = writeln!(
            out,
            "# HELP mesh_requests_total Requests served by the L7 proxy.\n# TYPE mesh_requests_total counter"
        );
        for (l, count, _, _) in &requests {
            let _ = writeln!(out, "mesh_requests_total{{{}}} {count}", labels(l));
        }
        let name = "mesh_request_duration_milliseconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from request to the response's last byte.\n# TYPE {name} histogram"
        );
        for (l, count, sum_us, buckets) in &requests {
            let l = labels(l);
            let mut cumulative = 0;
            for (i, n) in buckets.iter().enumerate() {
                cumulative += n;
                let le = DURATION_BUCKETS_MS
                    .get(i)
                    .map_or("+Inf".to_owned(), |b| b.to_string());
                let _ = writeln!(out, "{name}_bucket{{{l},le=\"{le}\"}} {cumulative}");
            }
            let _ = writeln!(out, "{name}_sum{{{l}}} {}", *sum_us as f64 / 1000.0);
            let _ = writeln!(out, "{name}_count{{{l}}} {count}");
        }
        let families = [
            (
                "mesh_upstream_retries_total",
                "cluster",
                "Retries of upstream requests.",
                &self.retries,
            ),
            (
                "mesh_rate_limited_total",
                "key",
                "Requests refused by a local rate limit.",
                &self.rate_limited,
            ),
            (
                "mesh_circuit_open_total",
                "cluster",
                "Requests refused by a tripped circuit breaker.",
                &self.circuit_open,
            ),
            (
                "mesh_outlier_ejections_total",
                "cluster",
                "Endpoints ejected by outlier detection.",
                &self.ejections,
            ),
        ];
        for (name, label, help, m) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let m = m.lock().unwrap_or_else(|e| e.into_inner());
            for (k, v) in m.iter() {
                let _ = writeln!(out, "{name}{{{label}=\"{}\"}} {v}", esc(k));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_series_stay_bounded_and_live_ones_are_kept() {
        let m = Metrics::default();
        let labels = |i: usize| FlowLabels {
            source_workload: "shop/client".into(),
            destination_address: format!("10.9.{}.{}:80", i / 250, i % 250),
            destination_workload: "unknown".into(),
            skmsg: false,
        };
        // One connection stays open throughout.
        let live = m.flow(labels(0));
        for i in 1..3 * MAX_FLOW_SERIES {
            let c = m.flow(labels(i));
            c.opened.fetch_add(1, Relaxed);
        }
        let n = m.flows.lock().unwrap().len();
        assert!(n <= MAX_FLOW_SERIES, "{n}");
        assert!(m.flows.lock().unwrap().contains_key(&labels(0)));
        assert!(m.series_evicted.load(Relaxed) >= MAX_FLOW_SERIES as u64);
        assert_eq!(m.series_overflow.load(Relaxed), 0);
        // Every series live: new ones fold into "other".
        let held: Vec<_> = (0..MAX_FLOW_SERIES - 1)
            .map(|i| m.flow(labels(10_000 + i)))
            .collect();
        let (other, overflow) = m.flow_series(labels(99_999));
        assert!(overflow);
        assert_eq!(m.series_overflow.load(Relaxed), 1);
        let text = m.render(&[]);
        assert!(text.contains("destination_address=\"other\""), "{text}");
        assert!(text.len() < 400 * 1024, "{}", text.len());
        drop((held, other, live));
    }

    /// A series kept (as `Weak`) by the proxy is given again while rendered, and not
    /// once evicted; keeping it does not make it look live to the eviction.
    #[test]
    fn kept_flow_series_come_back_until_evicted() {
        let m = Metrics::default();
        let labels = |i: usize| FlowLabels {
            source_workload: "shop/client".into(),
            destination_address: format!("10.8.{}.{}:80", i / 250, i % 250),
            destination_workload: "unknown".into(),
            skmsg: false,
        };
        let (c, overflow) = m.flow_series(labels(0));
        assert!(!overflow);
        let kept = Arc::downgrade(&c);
        drop(c);
        let again = m.flow_again(&kept).expect("still rendered");
        again.opened.fetch_add(1, Relaxed);
        drop(again);
        for i in 1..=MAX_FLOW_SERIES {
            m.flow(labels(i));
        }
        assert!(m.flow_again(&kept).is_none(), "evicted: resolve again");
        assert!(!m.flows.lock().unwrap().contains_key(&labels(0)));
    }

    #[test]
    fn authz_decisions_are_counted_per_policy_and_bounded() {
        let a = AuthzMetrics::default();
        a.count("outbound", true, None);
        a.count("outbound", true, None);
        a.count("outbound", false, Some("shop/deny"));
        for i in 0..MAX_AUTHZ_SERIES + 5 {
            a.count_request("inbound", true, Some(&format!("p{i}")));
        }
        let mut out = String::new();
        a.render(&mut out);
        assert!(out.contains("mesh_authz_decisions_total{direction=\"outbound\",level=\"connection\",verdict=\"allow\",policy=\"none\"} 2\n"), "{out}");
        assert!(out.contains("mesh_authz_decisions_total{direction=\"outbound\",level=\"connection\",verdict=\"deny\",policy=\"shop/deny\"} 1\n"), "{out}");
        // Two series above: the last 7 policies fold into "other".
        assert!(out.contains("policy=\"other\"} 7\n"), "{out}");
        // Sorted by direction, level, verdict, then policy.
        let inbound = out.find("direction=\"inbound\"").unwrap();
        let outbound = out.find("direction=\"outbound\"").unwrap();
        assert!(inbound < outbound);
    }

    #[test]
    fn renders_flow_series_with_escaped_labels() {
        let m = Metrics::default();
        let c = m.flow(FlowLabels {
            source_workload: "shop/web".into(),
            destination_address: "10.0.0.3:80".into(),
            destination_workload: "a\"b".into(),
            skmsg: true,
        });
        c.opened.fetch_add(2, Relaxed);
        c.received.fetch_add(100, Relaxed);
        let text = m.render(&[(Stat::MsgRedirected, 7)]);
        assert!(text.contains(
            "mesh_tcp_connections_opened_total{source_workload=\"shop/web\",destination_address=\"10.0.0.3:80\",destination_workload=\"a\\\"b\",skmsg=\"true\"} 2"
        ), "{text}");
        assert!(text.contains("mesh_tcp_received_bytes_total{") && text.contains("} 100"));
        assert!(text.contains("mesh_datapath_events_total{event=\"msg_redirected\"} 7"));
    }

    #[test]
    fn renders_l7_requests_and_histogram() {
        let m = Metrics::default();
        let labels = RequestLabels {
            source_workload: "shop/web".into(),
            destination_cluster: "cart".into(),
            destination_service: "cart.shop:80".into(),
            response_code: 200,
            route: "r1".into(),
        };
        m.l7.request(labels.clone(), Duration::from_millis(3));
        m.l7.request(labels, Duration::from_secs(60));
        m.l7.retry("cart");
        let text = m.render(&[]);
        let l = "source_workload=\"shop/web\",destination_cluster=\"cart\",destination_service=\"cart.shop:80\",response_code=\"200\",route=\"r1\"";
        assert!(
            text.contains(&format!("mesh_requests_total{{{l}}} 2")),
            "{text}"
        );
        assert!(text.contains(&format!(
            "mesh_request_duration_milliseconds_bucket{{{l},le=\"2\"}} 0"
        )));
        assert!(text.contains(&format!(
            "mesh_request_duration_milliseconds_bucket{{{l},le=\"5\"}} 1"
        )));
        assert!(text.contains(&format!(
            "mesh_request_duration_milliseconds_bucket{{{l},le=\"+Inf\"}} 2"
        )));
        assert!(text.contains(&format!(
            "mesh_request_duration_milliseconds_sum{{{l}}} 60003"
        )));
        assert!(text.contains("mesh_upstream_retries_total{cluster=\"cart\"} 1"));
    }
}

/// Outbound connections each node proxy worker accepted, one slot per worker on a cache
/// line of its own (each worker adds to its slot only).
#[derive(Default)]
pub struct WorkerAccepts(std::sync::OnceLock<Box<[PaddedCounter]>>);

#[derive(Default)]
#[repr(align(64))]
pub struct PaddedCounter(AtomicU64);

impl WorkerAccepts {
    /// Sizes it for `workers` workers (once; later calls change nothing).
    pub fn init(&self, workers: usize) {
        let _ = self
            .0
            .set((0..workers).map(|_| PaddedCounter::default()).collect());
    }

    pub fn add(&self, worker: usize) {
        if let Some(c) = self.0.get().and_then(|s| s.get(worker)) {
            c.0.fetch_add(1, Relaxed);
        }
    }

    fn render(&self, out: &mut String) {
        if self.0.get().is_none() {
            return;
        }
        let _ = writeln!(
            out,
            "# HELP mesh_proxy_worker_connections_total Outbound connections each node proxy worker accepted (--proxy-workers; the kernel spreads them over the workers' SO_REUSEPORT listeners).\n# TYPE mesh_proxy_worker_connections_total counter"
        );
        self.render_lines(out, "mesh_proxy_worker_connections_total", "");
    }

    /// One sample per worker: `name{<labels>worker="i"}`.
    fn render_lines(&self, out: &mut String, name: &str, labels: &str) {
        let Some(slots) = self.0.get() else { return };
        for (i, c) in slots.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}{{{labels}worker=\"{i}\"}} {}",
                c.0.load(Relaxed)
            );
        }
    }
}

impl std::fmt::Debug for WorkerAccepts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerAccepts").finish_non_exhaustive()
    }
}
