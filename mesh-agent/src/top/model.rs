//! What each pane lists, read from the admin endpoint's answers (JSON and the Prometheus
//! text): pure functions of those answers, so they are tested without a terminal or an
//! agent. Rows are cells of text; the view aligns them.

use std::collections::BTreeMap;

use serde_json::Value;

/// A pane's content: column names and rows of cells, or a message instead of rows.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Table {
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
    /// Said above the rows (counts, which object the rows are of).
    pub caption: String,
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// `namespace/name` of an object of `/workloads` (a workload or a service).
pub fn key(v: &Value) -> String {
    format!("{}/{}", text(&v["namespace"]), text(&v["name"]))
}

/// How the datapath treats a workload of the enrolment snapshot, named as `mesh-agent
/// inspect` names it.
fn mode(w: &Value) -> &'static str {
    let on = |f: &str| w[f].as_bool().unwrap_or(false);
    if on("bypass") {
        "bypass"
    } else if on("enrolled") {
        "captured"
    } else if on("direct") {
        "direct"
    } else {
        "not enrolled"
    }
}

/// The Workloads pane, from `/workloads`.
pub fn workloads(v: &Value) -> Table {
    let rows: Vec<Vec<String>> = v["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            vec![
                key(w),
                text(&w["ip"]),
                mode(w).to_owned(),
                if w["fail_closed"].as_bool().unwrap_or(false) {
                    "closed".into()
                } else {
                    "open".into()
                },
                text(&w["identity"]),
                text(&w["unresolved"]),
            ]
        })
        .collect();
    Table {
        columns: vec!["workload", "ip", "mode", "fail", "identity", "unresolved"],
        caption: format!("{} workloads on this node", rows.len()),
        rows,
    }
}

/// The connections of one pod, from its `/inspect/pod/NS/NAME` answer: the peer is the
/// destination for the pod's own connections, the source for those it serves.
pub fn connections(pod: &str, v: &Value) -> Table {
    let c = &v["connections"];
    let rows: Vec<Vec<String>> = c["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let peer = if r["role"] == "client" {
                &r["destination"]
            } else {
                &r["source"]
            };
            vec![
                text(&r["role"]),
                text(&r["local"]),
                text(&r["remote"]),
                text(&r["original_destination"]),
                text(peer),
                text(&r["path"]),
                text(&r["flags"]),
            ]
        })
        .collect();
    Table {
        columns: vec![
            "role",
            "local",
            "remote",
            "original_dst",
            "peer",
            "path",
            "flags",
        ],
        caption: format!(
            "connections of {pod} ({} listed of {} in FLOWS)",
            text(&c["listed"]),
            text(&c["total"])
        ),
        rows,
    }
}

/// Addresses (`ip:port`) of the listeners in force, from `/config_dump`.
fn listeners_in_force(dump: &Value) -> Vec<String> {
    dump["in_force"]["listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["address"].as_str().map(str::to_owned))
        .collect()
}

/// The Services pane: the services of the enrolment snapshot (`/workloads`), each port
/// with whether its listener is in force in the proxy (`/config_dump`; listeners are
/// subscribed on demand, at the first connection to them).
pub fn services(workloads: &Value, dump: Option<&Value>) -> Table {
    let in_force = dump.map(listeners_in_force).unwrap_or_default();
    let rows: Vec<Vec<String>> = workloads["services"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let vip = text(&s["vip"]);
            // A dual-stack service's IPv6 address, whose listener counts as well.
            let vip6 = s["vip6"].as_str();
            let ports: Vec<&Value> = s["ports"].as_array().into_iter().flatten().collect();
            let listed: Vec<String> = ports
                .iter()
                .map(|p| {
                    let target = match &p["target_port"] {
                        Value::Null => String::new(),
                        t => format!("->{t}"),
                    };
                    format!("{}{target}/{}", text(&p["port"]), text(&p["protocol"]))
                })
                .collect();
            let live = ports
                .iter()
                .filter(|p| {
                    let port = text(&p["port"]);
                    in_force.contains(&format!("{vip}:{port}"))
                        || vip6.is_some_and(|v6| in_force.contains(&format!("[{v6}]:{port}")))
                })
                .count();
            let selector: Vec<String> = s["selector"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={}", text(v)))
                .collect();
            let endpoints = s["endpoints"].as_array().map_or(0, Vec::len);
            vec![
                key(s),
                match vip6 {
                    Some(v6) => format!("{vip} {v6}"),
                    None => vip,
                },
                listed.join(","),
                if selector.is_empty() {
                    "-".into()
                } else {
                    selector.join(",")
                },
                endpoints.to_string(),
                match dump {
                    Some(_) => format!("{live}/{}", ports.len()),
                    None => "?".into(),
                },
            ]
        })
        .collect();
    Table {
        columns: vec![
            "service",
            "vip",
            "ports",
            "selector",
            "declared_endpoints",
            "listeners_in_force",
        ],
        caption: format!(
            "{} services; {} listeners in force in the proxy",
            rows.len(),
            if dump.is_some() {
                in_force.len().to_string()
            } else {
                "?".into()
            }
        ),
        rows,
    }
}

/// One Prometheus sample line: the name, its labels, the value.
pub fn sample(line: &str) -> Option<(&str, BTreeMap<&str, &str>, f64)> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.trim().parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        Some((n, rest)) => (n, rest.strip_suffix('}')?),
        None => (series, ""),
    };
    let mut out = BTreeMap::new();
    // Label values here never hold `",` (event names, verdicts, reasons).
    for pair in labels.split("\",").filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=')?;
        out.insert(k.trim(), v.trim_matches('"'));
    }
    Some((name, out, value))
}

/// `mesh_datapath_events_total{event=...}` from `/metrics`: event -> count.
pub fn datapath_counters(metrics: &str) -> BTreeMap<String, u64> {
    metrics
        .lines()
        .filter_map(sample)
        .filter(|(name, _, _)| *name == "mesh_datapath_events_total")
        .filter_map(|(_, labels, v)| Some((labels.get("event")?.to_string(), v as u64)))
        .collect()
}

/// The Datapath pane: each event's count and its rate per second since the previous
/// refresh (`previous`: the counters then and the seconds elapsed since).
pub fn datapath(
    now: &BTreeMap<String, u64>,
    previous: Option<(&BTreeMap<String, u64>, f64)>,
) -> Table {
    let rows: Vec<Vec<String>> = now
        .iter()
        .map(|(event, n)| {
            let rate = match previous {
                Some((before, secs)) if secs > 0.0 => {
                    let delta = n.saturating_sub(before.get(event).copied().unwrap_or(0));
                    format!("{:.1}", delta as f64 / secs)
                }
                _ => "-".into(),
            };
            vec![event.clone(), n.to_string(), rate]
        })
        .collect();
    Table {
        columns: vec!["event", "total", "per_second"],
        caption: format!(
            "mesh_datapath_events_total: {} events{}",
            rows.len(),
            match previous {
                Some((_, secs)) => format!(", rates over the last {secs:.1} s"),
                None => ", rates from the next refresh".into(),
            }
        ),
        rows,
    }
}

/// The xDS pane: the proxy's xDS client (`/config_dump`: server, connection, ACK and NACK
/// counts, each type's version, on-demand subscriptions, warming, recent verdicts), the
/// embedded control plane's counters, and the `mesh_xds_*` series of `/metrics`.
pub fn xds(dump: Option<&Value>, metrics: Option<&str>) -> Table {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut row = |what: &str, value: String| rows.push(vec![what.to_owned(), value]);
    if let Some(d) = dump {
        let x = &d["xds"];
        row("server", text(&x["server"]));
        row("mode", text(&x["mode"]));
        row("node", text(&x["node"]["id"]));
        row("connected", text(&x["connected"]));
        row("on_demand", text(&x["on_demand"]));
        row("acks", text(&x["acks"]));
        row("nacks", text(&x["nacks"]));
        row("last_nack", text(&x["last_nack"]));
        row("config version in force", text(&d["in_force"]["version"]));
        for (kind, t) in d["resources"].as_object().into_iter().flatten() {
            row(
                &format!("type {kind}"),
                format!(
                    "version {}  resources {}  wildcard {}  nonce {}",
                    text(&t["version_info"]),
                    t["resources"].as_array().map_or(0, Vec::len),
                    text(&t["wildcard"]),
                    text(&t["last_nonce"]),
                ),
            );
        }
        let names = |v: &Value| -> String {
            let n: Vec<String> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| match x {
                    Value::String(s) => s.clone(),
                    x => x.to_string(),
                })
                .collect();
            if n.is_empty() {
                "-".into()
            } else {
                n.join(" ")
            }
        };
        row("on-demand requested", names(&d["on_demand"]["requested"]));
        row("on-demand absent", names(&d["on_demand"]["absent"]));
        row("warming listeners", names(&d["warming"]["listeners"]));
        row("warming clusters", names(&d["warming"]["clusters"]));
        for (i, v) in d["recent_verdicts"]
            .as_array()
            .into_iter()
            .flatten()
            .take(5)
            .enumerate()
        {
            row(&format!("recent verdict {}", i + 1), compact(v));
        }
        if let Some(cp) = d["embedded_control_plane"].as_object() {
            let parts: Vec<String> = cp.iter().map(|(k, v)| format!("{k} {}", text(v))).collect();
            row("embedded control plane", parts.join("  "));
        }
    }
    for line in metrics.unwrap_or_default().lines() {
        if line.starts_with("mesh_xds_") {
            if let Some((series, value)) = line.rsplit_once(' ') {
                row(series, value.to_owned());
            }
        }
    }
    Table {
        columns: vec!["what", "value"],
        caption: "the proxy's xDS client, the embedded control plane, mesh_xds_* series".into(),
        rows,
    }
}

/// One JSON value on one line, its object's fields as `key value`.
fn compact(v: &Value) -> String {
    match v.as_object() {
        Some(o) => o
            .iter()
            .map(|(k, v)| format!("{k} {}", text(v)))
            .collect::<Vec<_>>()
            .join("  "),
        None => text(v),
    }
}

/// Rows that contain `filter` (any cell, case-insensitive); all rows for an empty one.
pub fn filtered<'a>(rows: &'a [Vec<String>], filter: &str) -> Vec<&'a Vec<String>> {
    let f = filter.to_lowercase();
    rows.iter()
        .filter(|r| f.is_empty() || r.iter().any(|c| c.to_lowercase().contains(&f)))
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn workloads_name_mode_and_why_unresolved() {
        let v = json!({"workloads": [
            {"namespace": "shop", "name": "client", "ip": "10.0.0.2", "enrolled": true, "direct": false, "bypass": false, "fail_closed": false, "identity": "spiffe://cluster.local/ns/shop/sa/web"},
            {"namespace": "data", "name": "cache", "ip": "10.0.0.4", "enrolled": false, "direct": true, "bypass": false, "fail_closed": true, "unresolved": "netns gone"},
        ], "services": []});
        let t = workloads(&v);
        assert_eq!(
            t.rows[0][..4],
            ["shop/client", "10.0.0.2", "captured", "open"]
        );
        assert_eq!(t.rows[1][2], "direct");
        assert_eq!(t.rows[1][3], "closed");
        assert_eq!(t.rows[1][5], "netns gone");
        assert_eq!(t.caption, "2 workloads on this node");
        assert_eq!(filtered(&t.rows, "CACHE").len(), 1);
        assert_eq!(filtered(&t.rows, "").len(), 2);
        assert!(filtered(&t.rows, "nope").is_empty());
    }

    #[test]
    fn connections_show_the_peer_by_role() {
        let v = json!({"connections": {"total": 3, "listed": 2, "items": [
            {"role": "client", "local": "10.0.0.2:4000", "remote": "10.0.0.1:15001", "original_destination": "10.0.0.3:7000",
             "source": "shop/client", "destination": "backend/server", "path": "proxied+sk_msg", "flags": "proxied"},
            {"role": "server", "local": "10.0.0.5:5000", "remote": "10.0.0.2:7000", "original_destination": "10.0.0.2:7000",
             "source": "shop/other", "destination": "shop/client", "path": "direct", "flags": "direct"},
        ]}});
        let t = connections("shop/client", &v);
        assert_eq!(t.rows[0][3], "10.0.0.3:7000");
        assert_eq!(t.rows[0][4], "backend/server");
        assert_eq!(t.rows[1][4], "shop/other");
        assert_eq!(
            t.caption,
            "connections of shop/client (2 listed of 3 in FLOWS)"
        );
    }

    #[test]
    fn services_say_which_listeners_are_in_force() {
        let w = json!({"workloads": [], "services": [
            {"namespace": "backend", "name": "echo", "vip": "10.96.0.20", "selector": {"app": "echo"}, "endpoints": [],
             "ports": [{"port": 80, "target_port": 7000, "protocol": "tcp"}, {"port": 81, "target_port": null, "protocol": "http"}]}]});
        let d = json!({"in_force": {"listeners": [{"address": "10.96.0.20:80"}]}});
        let t = services(&w, Some(&d));
        assert_eq!(
            t.rows[0],
            [
                "backend/echo",
                "10.96.0.20",
                "80->7000/tcp,81/http",
                "app=echo",
                "0",
                "1/2"
            ]
        );
        assert_eq!(services(&w, None).rows[0][5], "?");
    }

    #[test]
    fn datapath_counters_and_rates() {
        let m = "# HELP mesh_datapath_events_total x\n\
                 mesh_datapath_events_total{event=\"connect_redirected\"} 12\n\
                 mesh_datapath_events_total{event=\"connect_seen\"} 40\n\
                 mesh_xds_responses_total{verdict=\"ack\"} 3\n";
        let now = datapath_counters(m);
        assert_eq!(now["connect_redirected"], 12);
        assert_eq!(now.len(), 2);
        let before = BTreeMap::from([
            ("connect_redirected".to_owned(), 2),
            ("connect_seen".to_owned(), 40),
        ]);
        let t = datapath(&now, Some((&before, 2.0)));
        assert_eq!(t.rows[0], ["connect_redirected", "12", "5.0"]);
        assert_eq!(t.rows[1][2], "0.0");
        assert_eq!(datapath(&now, None).rows[0][2], "-");
    }

    #[test]
    fn xds_shows_versions_verdicts_and_series() {
        let d = json!({
            "xds": {"server": "unix:/x", "mode": "delta", "node": {"id": "n"}, "connected": true, "on_demand": true, "acks": 7, "nacks": 1, "last_nack": "bad cluster"},
            "resources": {"listener": {"version_info": "4", "resources": [{"name": "a"}], "wildcard": false, "last_nonce": "9"}},
            "on_demand": {"requested": ["10.96.0.20:80"], "absent": []},
            "warming": {"listeners": [], "clusters": []},
            "recent_verdicts": [{"kind": "listener", "verdict": "ack"}],
            "in_force": {"version": 3},
        });
        let t = xds(
            Some(&d),
            Some("mesh_xds_responses_total{verdict=\"nack\"} 1\n"),
        );
        let get = |k: &str| t.rows.iter().find(|r| r[0] == k).map(|r| r[1].clone());
        assert_eq!(get("acks").as_deref(), Some("7"));
        assert_eq!(get("nacks").as_deref(), Some("1"));
        assert_eq!(get("last_nack").as_deref(), Some("bad cluster"));
        assert_eq!(
            get("type listener").as_deref(),
            Some("version 4  resources 1  wildcard false  nonce 9")
        );
        assert_eq!(get("on-demand requested").as_deref(), Some("10.96.0.20:80"));
        assert_eq!(get("on-demand absent").as_deref(), Some("-"));
        assert_eq!(
            get("mesh_xds_responses_total{verdict=\"nack\"}").as_deref(),
            Some("1")
        );
    }

    #[test]
    fn samples_parse_labels() {
        let (n, l, v) = sample("a_total{x=\"1\",y=\"b c\"} 2.5").unwrap();
        assert_eq!((n, v), ("a_total", 2.5));
        assert_eq!(l["x"], "1");
        assert_eq!(l["y"], "b c");
        assert!(sample("# TYPE a counter").is_none());
        assert_eq!(sample("up 1").unwrap().0, "up");
    }
}
