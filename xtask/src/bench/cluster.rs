//! The cluster suite's figures (xtask/bench-cluster.sh measures): pod -> pod across two
//! simulated nodes, plain routed TCP against our HBONE tunnel and Envoy's, ratios against
//! `direct`, the targets of issue 11.

use std::fmt::Write as _;

use super::{cell, get, meta_md, targets_md, Meta, Table, Target};

/// Paths, in the order of the tables, with what each one is.
pub(super) const PATHS: &[(&str, &str)] = &[
    ("direct", "direct (namespaces not enrolled: routed TCP)"),
    (
        "mesh-tunnel",
        "mesh: our HBONE tunnel (node 0's proxy -> node 1, mTLS + HTTP/2 CONNECT)",
    ),
    (
        "envoy-hbone",
        "Envoy 1.40 HBONE client (node 0) -> Envoy 1.40 HBONE server (node 1)",
    ),
];

pub(super) const COLUMNS: &[&str] = &["p50_us", "p99_us", "tps", "bulk_gbps", "cps"];

const PLACEMENTS: &[(&str, &str)] = &[
    (
        "1cpu",
        "One vCPU: client, server, both agents and both Envoys on cpu 0 (main figure)",
    ),
    (
        "2cpu",
        "One vCPU per node: node 0 (client, agent, Envoy client) on cpu 0, node 1 (server, agent, Envoy server) on cpu 1",
    ),
];

/// (metric, goal as a ratio against direct, at most?) for the mesh tunnel (issue 11).
const GOALS: &[(&str, f64, bool)] = &[
    ("p50_us", 2.5, true),
    ("tps", 0.4, false),
    ("bulk_gbps", 0.5, false),
    ("cps", 0.3, false),
];

/// metric -> (column title, unit of the raw value, higher is better); the ones the L4
/// suite shares (p50_us, p99_us, tps, cps) are its.
pub(super) fn metric_info(metric: &str) -> Option<(&'static str, &'static str, bool)> {
    Some(match metric {
        "bulk_gbps" => ("bulk, 1 conn", "Gbit/s", true),
        "hbone_streams" => ("HBONE streams node 0 opened", "", true),
        _ => return None,
    })
}

fn title(m: &str) -> (&'static str, &'static str) {
    let (t, u, _) = super::metric_info(m);
    (t, u)
}

pub(super) fn targets(t: &Table) -> Vec<Target> {
    let mut out = Vec::new();
    for &(placement, _) in PLACEMENTS {
        let med = |path: &str, metric: &str| get(t, path, placement, metric).map(|s| s.median);
        for &(metric, goal, at_most) in GOALS {
            let what = title(metric).0;
            if let (Some(v), Some(d)) = (med("mesh-tunnel", metric), med("direct", metric)) {
                let r = v / d;
                out.push(Target {
                    what: format!("tunnel {what} against direct"),
                    path: "mesh-tunnel".into(),
                    placement: placement.into(),
                    metric: metric.into(),
                    value: v,
                    reference: d,
                    reference_name: "direct".into(),
                    ratio: Some(r),
                    goal: format!("{} {goal}x", if at_most { "<=" } else { ">=" }),
                    pass: if at_most { r <= goal } else { r >= goal },
                });
            }
            if let (Some(v), Some(e)) = (med("mesh-tunnel", metric), med("envoy-hbone", metric)) {
                out.push(Target {
                    what: format!(
                        "tunnel {what} {} Envoy's",
                        if at_most { "below" } else { "above" }
                    ),
                    path: "mesh-tunnel".into(),
                    placement: placement.into(),
                    metric: metric.into(),
                    value: v,
                    reference: e,
                    reference_name: "envoy-hbone".into(),
                    ratio: Some(v / e),
                    goal: if at_most { "< 1x" } else { "> 1x" }.into(),
                    pass: if at_most { v < e } else { v > e },
                });
            }
        }
    }
    out
}

pub(super) fn md(meta: &Meta, skipped: &[(&str, &str)], t: &Table, targets: &[Target]) -> String {
    let mut o = String::from("# Cluster suite: pod on node 0 -> pod on node 1\n\n");
    o += &meta_md(meta, skipped);
    o += "\nTwo simulated nodes (network namespaces on an underlay bridge, routed pod ranges), \
          an agent in each (`--node-name`, `--ca-dir` of one shared root). p50, p99 and \
          transactions/s: `sockperf ping-pong --tcp -m 64 --full-rtt` on one connection; \
          bulk: `iperf3 -P 1`, the receiver's figure; connections/s: `benchtool crr` \
          (connect, 64-byte exchange, server closes), one at a time. Both tunnels pool: our \
          agent keeps HTTP/2 connections per (source identity, destination, destination \
          identity) and Envoy's tcp_proxy keeps its cluster's HTTP/2 connections, so a new \
          application connection is a new CONNECT stream, not a new TLS handshake. Envoy \
          runs `--concurrency 1` at both ends: each node's processes are pinned to one vCPU, where the agent's proxy runs one worker (`--proxy-workers 0` follows the affinity), so both tunnels have equal workers.\n\
          \nEach cell: median (min–max) over the runs. Ratios: medians against `direct` of \
          the same placement, with the min–max of the per-run ratios.\n";
    for &(placement, what) in PLACEMENTS {
        if !t.keys().any(|(_, pl, _)| pl == placement) {
            continue;
        }
        let _ = write!(o, "\n## {what}\n\n| path |");
        for &m in COLUMNS {
            let (title, unit) = title(m);
            let _ = write!(o, " {title} ({unit}) |");
        }
        o += "\n|---|";
        o += &"---|".repeat(COLUMNS.len());
        o += "\n";
        for &(path, desc) in PATHS {
            let _ = write!(o, "| {desc} |");
            for &m in COLUMNS {
                let _ = write!(o, " {} |", cell(get(t, path, placement, m), 1.0));
            }
            o += "\n";
        }
        o += "\nRatios against direct (min–max of the per-run ratios):\n\n| path |";
        for &m in COLUMNS {
            let _ = write!(o, " {} |", title(m).0);
        }
        o += "\n|---|";
        o += &"---|".repeat(COLUMNS.len());
        o += "\n";
        for &(path, _) in &PATHS[1..] {
            let _ = write!(o, "| {path} |");
            for &m in COLUMNS {
                let r =
                    super::ratio_cell(get(t, path, placement, m), get(t, "direct", placement, m));
                let _ = write!(o, " {r} |");
            }
            o += "\n";
        }
    }
    o += "\n## Targets (issue 11)\n\n";
    o += &targets_md(targets, t);
    o
}

/// Every path produced every figure (one vCPU: the smoke run's placement).
pub(super) fn missing(t: &Table) -> Vec<String> {
    PATHS
        .iter()
        .flat_map(|&(p, _)| COLUMNS.iter().map(move |&m| (p, m)))
        .filter(|&(p, m)| !get(t, p, "1cpu", m).is_some_and(|s| s.median > 0.0))
        .map(|(p, m)| format!("{p} {m}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::{parse_raw, tabulate};
    use super::*;

    #[test]
    fn cluster_targets_hold_the_tunnel_against_direct_and_envoy() {
        let raw = "cluster direct 1cpu p50_us 1 20\ncluster mesh-tunnel 1cpu p50_us 1 45\n\
                   cluster envoy-hbone 1cpu p50_us 1 60\ncluster direct 1cpu cps 1 10000\n\
                   cluster mesh-tunnel 1cpu cps 1 2500\ncluster envoy-hbone 1cpu cps 1 3000\n";
        let tg = targets(&tabulate(&parse_raw(raw).unwrap(), "cluster"));
        let one = |what: &str| tg.iter().find(|x| x.what == what).unwrap();
        let p = one("tunnel p50 against direct");
        assert_eq!((p.ratio, p.pass), (Some(2.25), true));
        assert!(one("tunnel p50 below Envoy's").pass);
        let c = one("tunnel connections/s against direct");
        assert_eq!((c.ratio, c.pass), (Some(0.25), false));
        assert!(!one("tunnel connections/s above Envoy's").pass);
        // Nothing measured, nothing claimed.
        assert!(!tg
            .iter()
            .any(|x| x.metric == "tps" || x.placement == "2cpu"));
        assert_eq!(
            missing(&tabulate(&parse_raw(raw).unwrap(), "cluster")).len(),
            9
        );
    }
}
