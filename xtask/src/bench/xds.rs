//! The xDS suite's figures (xtask/bench-xds.py measures): per client and scale, time to
//! the full ACK, time and bytes for one endpoint change, client memory; the issue's
//! control-plane targets.

use std::fmt::Write as _;

use super::{cell, get, meta_md, num, targets_md, Meta, Table, Target};

/// Clients (the raw lines' path column), in the order of the tables.
pub(super) const CLIENTS: &[(&str, &str)] = &[
    (
        "mesh-delta",
        "our proxy's xDS client (`xds-watch`), delta, wildcard",
    ),
    (
        "mesh-sotw",
        "our proxy's xDS client (`xds-watch`), state of the world, wildcard",
    ),
    ("envoy-delta", "Envoy 1.40, delta (DELTA_GRPC)"),
    ("envoy-sotw", "Envoy 1.40, state of the world (GRPC)"),
];

/// Raw metrics in table order.
pub(super) const COLUMNS: &[&str] = &[
    "ack_ms",
    "start_ack_ms",
    "rss_kb",
    "load_bytes",
    "change_ms",
    "change_server_ms",
    "change_client_ms",
    "change_bytes",
];

/// Scales (the raw lines' placement column): services, with 10 endpoints each.
const SCALES: &[(&str, &str)] = &[
    ("20", "20 services, 200 endpoints (smoke)"),
    ("1k", "1k services, 10k endpoints"),
    ("10k", "10k services, 100k endpoints"),
];

const ACK_GOAL_MS: f64 = 1000.0;
const CHANGE_GOAL_MS: f64 = 50.0;

/// metric -> (title, unit of the raw value, higher is better)
pub(super) fn metric_info(metric: &str) -> Option<(&'static str, &'static str, bool)> {
    Some(match metric {
        "ack_ms" => ("stream open -> all four types ACKed", "ms", false),
        "start_ack_ms" => ("process start -> all ACKed", "ms", false),
        "rss_kb" => ("client RSS after loading", "kB", false),
        "load_bytes" => ("bytes sent for the full config", "bytes", false),
        "change_ms" => ("one endpoint change: file -> ACKed", "ms", false),
        "change_server_ms" => ("of which server: file -> new version", "ms", false),
        "change_client_ms" => ("of which push, client apply and ACK", "ms", false),
        "change_bytes" => ("bytes sent for that change", "bytes", false),
        _ => return None,
    })
}

/// (display unit, factor from the raw value)
fn display(metric: &str) -> (&'static str, f64) {
    match metric {
        "rss_kb" => ("MB", 1.0 / 1024.0),
        "load_bytes" => ("MB", 1.0 / (1024.0 * 1024.0)),
        "change_bytes" => ("kB", 1.0 / 1024.0),
        m => (metric_info(m).map(|i| i.1).unwrap_or(""), 1.0),
    }
}

pub(super) fn targets(t: &Table) -> Vec<Target> {
    let scale = "10k";
    let mut out = Vec::new();
    for &mine in &["mesh-delta", "mesh-sotw"] {
        let mode = mine.trim_start_matches("mesh-");
        let med = |c: &str, m: &str| get(t, c, scale, m).map(|s| s.median);
        if let Some(v) = med(mine, "ack_ms") {
            out.push(Target {
                what: "10k services fully ACKed".into(),
                path: mine.into(),
                placement: scale.into(),
                metric: "ack_ms".into(),
                value: v,
                reference: ACK_GOAL_MS,
                reference_name: "ms".into(),
                ratio: None,
                goal: format!("< {ACK_GOAL_MS} ms"),
                pass: v < ACK_GOAL_MS,
            });
            let envoy = format!("envoy-{mode}");
            if let Some(e) = med(&envoy, "ack_ms") {
                out.push(Target {
                    what: "10k services fully ACKed faster than Envoy".into(),
                    path: mine.into(),
                    placement: scale.into(),
                    metric: "ack_ms".into(),
                    value: v,
                    reference: e,
                    reference_name: envoy,
                    ratio: Some(v / e),
                    goal: "< 1x".into(),
                    pass: v < e,
                });
            }
        }
        if let Some(v) = med(mine, "change_ms") {
            out.push(Target {
                what: "one endpoint change applied (10k services)".into(),
                path: mine.into(),
                placement: scale.into(),
                metric: "change_ms".into(),
                value: v,
                reference: CHANGE_GOAL_MS,
                reference_name: "ms".into(),
                ratio: None,
                goal: format!("< {CHANGE_GOAL_MS} ms"),
                pass: v < CHANGE_GOAL_MS,
            });
        }
    }
    out
}

pub(super) fn md(meta: &Meta, skipped: &[(&str, &str)], t: &Table, targets: &[Target]) -> String {
    let mut o = String::from("# xDS suite: the embedded control plane and its clients\n\n");
    o += &meta_md(meta, skipped);
    o += "\n`mesh-agent control-plane` (server, on cpu 1) serves a generated standalone file \
          (N services, 10 explicit endpoints each, HTTP) to one client at a time (on cpu 0), \
          a fresh server per run. ACK times are seen from the server (`/xds_clients` polled \
          every ~1 ms). Bytes: what the server wrote to the client's socket (`ss -ti` \
          bytes_sent: protobuf + gRPC + HTTP/2 framing). The change: one endpoint's port \
          in the file, renamed into place; the server polls the file every 5 ms, re-parses \
          and re-translates all of it. The split of that time at the moment the server's \
          `/version` changes is polled too, but the control plane answers its admin \
          endpoint on the same single thread that re-translates: while it is busy the poll \
          waits, and when the translation takes long (10k) the new version and the ACK are \
          seen in the same poll, so the client part reads 0 and is an indication only, not \
          a measurement (no target uses it). `xds-watch` subscribes to everything (wildcard, like \
          Envoy; the node proxy itself subscribes on demand) and holds the decoded, \
          validated config as the proxy would; its RSS approximates the proxy's config \
          memory. Envoy runs with one worker (it binds a socket per worker and listener, \
          and the container's fd limit cannot take 2 x 10k), which only makes its work \
          lighter.\n\nEach cell: median (min–max) over the runs.\n";
    for &(scale, what) in SCALES {
        if !t.keys().any(|(_, s, _)| s == scale) {
            continue;
        }
        let _ = write!(o, "\n## {what}\n\n| client |");
        for m in COLUMNS {
            let title = metric_info(m).map(|i| i.0).unwrap_or("?");
            let _ = write!(o, " {title} ({}) |", display(m).0);
        }
        o += "\n|---|";
        o += &"---|".repeat(COLUMNS.len());
        o += "\n";
        for &(client, desc) in CLIENTS {
            let _ = write!(o, "| {desc} |");
            for m in COLUMNS {
                let _ = write!(o, " {} |", cell(get(t, client, scale, m), display(m).1));
            }
            o += "\n";
        }
        for kind in ["mesh", "envoy"] {
            if let (Some(d), Some(s)) = (
                get(t, &format!("{kind}-delta"), scale, "change_bytes"),
                get(t, &format!("{kind}-sotw"), scale, "change_bytes"),
            ) {
                let _ = writeln!(
                    o,
                    "\n{kind}: one endpoint change costs {} bytes in delta, {} in state of the world ({:.0}x).",
                    num(d.median),
                    num(s.median),
                    s.median / d.median
                );
            }
        }
    }
    o += "\n## Targets (issue 5)\n\n";
    o += &targets_md(targets);
    o
}

pub(super) fn svg(t: &Table) -> String {
    let panels: &[(&str, &str)] = &[
        (
            "ack_ms",
            "stream open -> full config ACKed (ms, lower is better)",
        ),
        (
            "change_ms",
            "one endpoint change -> ACKed (ms, lower is better)",
        ),
        (
            "change_client_ms",
            "of which push, client apply, ACK (ms, lower is better)",
        ),
        ("rss_kb", "client RSS after loading (kB, lower is better)"),
    ];
    let series: Vec<(&str, &str, &str)> = [
        ("20", "#7aa6d6", "20 services"),
        ("1k", "#9cc3e8", "1k services"),
        ("10k", "#1f5fa8", "10k services"),
    ]
    .into_iter()
    .filter(|&(s, _, _)| t.keys().any(|(_, sc, _)| sc == s))
    .collect();
    super::l7::bars(
        "mesh-agent xDS: embedded control plane -> client (median, whiskers: min–max)",
        panels,
        &CLIENTS.iter().map(|&(c, _)| (c, c)).collect::<Vec<_>>(),
        &series,
        t,
    )
}

/// Every client produced every figure at the smoke run's scale.
pub(super) fn missing(t: &Table) -> Vec<String> {
    CLIENTS
        .iter()
        .flat_map(|&(c, _)| COLUMNS.iter().map(move |&m| (c, m)))
        // A tiny config's client side can be under the poll's resolution: 0 ms.
        .filter(|&(c, m)| {
            !get(t, c, "20", m).is_some_and(|s| s.median > 0.0 || m == "change_client_ms")
        })
        .map(|(c, m)| format!("{c} {m}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::{parse_raw, tabulate};
    use super::*;

    #[test]
    fn xds_targets_at_10k_against_constants_and_envoy_of_the_same_mode() {
        let raw = "xds mesh-delta 10k ack_ms 1 400\nxds envoy-delta 10k ack_ms 1 300\n\
                   xds mesh-delta 10k change_ms 1 20\nxds mesh-sotw 1k ack_ms 1 5000\n";
        let tg = targets(&tabulate(&parse_raw(raw).unwrap(), "xds"));
        assert_eq!(tg.len(), 3, "1k is not a target scale: {tg:?}");
        assert!(tg[0].pass && !tg[1].pass && tg[2].pass);
        assert_eq!(tg[1].ratio, Some(400.0 / 300.0));
    }
}
