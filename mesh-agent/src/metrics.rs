//! Prometheus metrics of the node proxy and the datapath, rendered in the text exposition
//! format at the admin endpoint's `/metrics`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
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
    /// Enrolled workloads whose network namespace could not be resolved.
    pub unresolved_workloads: AtomicU64,
    pub enrolled_workloads: AtomicU64,
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
        out
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
}
