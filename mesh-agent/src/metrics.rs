//! Prometheus metrics of the node proxy and the datapath, rendered in the text exposition
//! format at the admin endpoint's `/metrics`.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
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
    /// Enrolled workloads whose network namespace could not be resolved.
    pub unresolved_workloads: AtomicU64,
    pub enrolled_workloads: AtomicU64,
    /// The L7 proxy's series (`proxy::http::L7` counts into these).
    pub l7: Arc<L7Metrics>,
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// The counters of a series, created on first use. Called once per connection.
    pub fn flow(&self, labels: FlowLabels) -> Arc<FlowCounters> {
        let mut m = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(labels).or_default().clone()
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
            "# HELP mesh_datapath_events_total Datapath events and verdicts counted by the eBPF programs.\n# TYPE mesh_datapath_events_total counter"
        );
        for (s, v) in datapath {
            let _ = writeln!(
                out,
                "mesh_datapath_events_total{{event=\"{}\"}} {v}",
                s.name()
            );
        }
        self.l7.render(&mut out);
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

#[derive(Debug, Default)]
struct RequestSeries {
    count: u64,
    sum_us: u64,
    /// Non-cumulative counts per bucket; the last slot is `+Inf`.
    buckets: [u64; DURATION_BUCKETS_MS.len() + 1],
}

/// Request counters and latency histograms of the L7 proxy, plus its policy counters.
#[derive(Debug, Default)]
pub struct L7Metrics {
    requests: Mutex<HashMap<RequestLabels, RequestSeries>>,
    /// Retries by cluster.
    retries: Mutex<BTreeMap<String, u64>>,
    /// Requests refused by a local rate limit, by rate-limit key.
    rate_limited: Mutex<BTreeMap<String, u64>>,
    /// Requests refused by a tripped circuit breaker, by cluster.
    circuit_open: Mutex<BTreeMap<String, u64>>,
    /// Outlier ejections by cluster.
    ejections: Mutex<BTreeMap<String, u64>>,
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
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = DURATION_BUCKETS_MS
            .iter()
            .position(|b| us <= b * 1000)
            .unwrap_or(DURATION_BUCKETS_MS.len());
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        let s = m.entry(labels).or_default();
        s.count += 1;
        s.sum_us = s.sum_us.saturating_add(us);
        s.buckets[bucket] += 1;
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
        m.iter().filter(|(l, _)| f(l)).map(|(_, s)| s.count).sum()
    }

    /// Appends the L7 families in the text exposition format.
    pub fn render(&self, out: &mut String) {
        let requests: Vec<(RequestLabels, u64, u64, Vec<u64>)> = {
            let m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
            let mut v: Vec<_> = m
                .iter()
                .map(|(l, s)| (l.clone(), s.count, s.sum_us, s.buckets.to_vec()))
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
