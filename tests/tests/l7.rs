//! End-to-end L7 on a simulated node: a pod's captured connections to a service address
//! reach the node proxy through eBPF, and the routes the embedded control plane serves
//! (over a real ADS stream) decide where its HTTP requests go.

use std::time::Duration;

use mesh_tests::{l7, metric, wait_for, SimNode};

fn node() -> SimNode {
    l7::node(&["v1", "v2", "db"])
}

/// `canary_weight_v2`: weight of v2 in the default route (0: v1 only).
fn config(n: &SimNode, canary_weight_v2: u32) -> String {
    let default_route = if canary_weight_v2 == 0 {
        String::new()
    } else {
        format!(
            "      - name: split\n        backends: [ {{ service: reviews-v2, weight: {canary_weight_v2} }}, {{ service: reviews, weight: {} }} ]\n",
            100 - canary_weight_v2
        )
    };
    l7::file_head(
        n,
        &[
            ("v1", "{ app: reviews, version: v1 }"),
            ("v2", "{ app: reviews, version: v2 }"),
            ("db", "{ app: db }"),
        ],
    ) + &l7::http_service("reviews", "10.96.0.10", "{ version: v1 }")
        + "    routes:\n\
         \x20     - name: canary\n\
         \x20       match: { headers: [ { name: x-canary, exact: \"1\" } ] }\n\
         \x20       backends: [ { service: reviews-v2 } ]\n\
         \x20       request_headers: { add: { x-mesh: canary } }\n"
        + &default_route
        + &l7::http_service("reviews-v2", "10.96.0.11", "{ version: v2 }")
        + "  - name: db\n\
         \x20   namespace: backend\n\
         \x20   vip: 10.96.0.12\n\
         \x20   ports: [ { port: 5432, target_port: 9000, protocol: tcp } ]\n\
         \x20   selector: { app: db }\n"
}

fn start(n: &SimNode) -> mesh_tests::Agent {
    let agent = n.start_agent(&[]).unwrap();
    for v in ["v1", "v2"] {
        n.serve(v, &["http", "--listen", "0.0.0.0:8080", "--name", v])
            .unwrap();
    }
    n.serve("db", &["echo", "--listen", "0.0.0.0:9000"])
        .unwrap();
    agent
}

fn get(n: &SimNode, requests: u32, headers: &[&str]) -> serde_json::Value {
    n.http_get("client", "10.96.0.10:80", "/", requests, headers)
        .unwrap()
}

#[test]
fn routes_from_the_embedded_control_plane_steer_captured_http() {
    let n = node();
    n.write_config(&config(&n, 0)).unwrap();
    let agent = start(&n);

    let plain = get(&n, 20, &[]);
    assert_eq!(plain["errors"], serde_json::json!([]), "{plain}");
    assert_eq!(plain["bodies"], serde_json::json!({ "v1": 20 }), "{plain}");
    assert_eq!(
        plain["seen_mesh"],
        serde_json::json!({ "-": 20 }),
        "{plain}"
    );

    let canary = get(&n, 20, &["x-canary: 1"]);
    assert_eq!(
        canary["bodies"],
        serde_json::json!({ "v2": 20 }),
        "{canary}"
    );
    // The route's request header reached the upstream.
    assert_eq!(
        canary["seen_mesh"],
        serde_json::json!({ "canary": 20 }),
        "{canary}"
    );

    let m = agent.get("/metrics").unwrap();
    assert_eq!(
        metric(
            &m,
            "mesh_requests_total",
            &[("route", "canary"), ("response_code", "200")]
        ),
        20,
        "{m}"
    );
    assert_eq!(
        metric(&m, "mesh_requests_total", &[("route", "default")]),
        20,
        "{m}"
    );

    // A TCP service: bytes to a load-balanced endpoint, intact.
    let r = n
        .client(
            "client",
            &["echo-client", "--to", "10.96.0.12:5432", "--bytes", "65536"],
        )
        .unwrap();
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    assert_eq!(r["sha_sent"], r["sha_received"], "{r}");
    let m = agent.get("/metrics").unwrap();
    let db = n.pod("db").ip;
    assert_eq!(
        metric(
            &m,
            "mesh_tcp_connections_opened_total",
            &[("destination_address", &format!("{db}:9000"))]
        ),
        1,
        "{m}"
    );

    // On demand: this node asked for exactly the listeners its client called.
    let dump: serde_json::Value =
        serde_json::from_str(&agent.get("/config_dump").unwrap()).unwrap();
    let requested = dump["on_demand"]["requested"].as_array().unwrap();
    assert!(
        requested.iter().any(|v| v == "10.96.0.10:80")
            && requested.iter().any(|v| v == "10.96.0.12:5432"),
        "{dump}"
    );
    assert!(
        !dump["resources"]["listener"]["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "10.96.0.11:80"),
        "reviews-v2's listener was never called, so never sent: {dump}"
    );
    assert_eq!(dump["xds"]["nacks"], 0, "{dump}");
}

#[test]
fn a_route_pushed_while_running_changes_where_requests_go() {
    let n = node();
    n.write_config(&config(&n, 0)).unwrap();
    let _agent = start(&n);
    assert_eq!(get(&n, 5, &[])["bodies"], serde_json::json!({ "v1": 5 }));
    // Everything to v2 now: the file changes, the control plane pushes, the proxy applies.
    n.write_config(&config(&n, 100)).unwrap();
    wait_for("the new route", Duration::from_secs(10), || {
        get(&n, 5, &[])["bodies"] == serde_json::json!({ "v2": 5 })
    });
    // A 50/50 split over 400 requests lands within 40..60%.
    n.write_config(&config(&n, 50)).unwrap();
    wait_for("the split", Duration::from_secs(10), || {
        get(&n, 20, &[])["bodies"].get("v1").is_some()
    });
    let r = get(&n, 400, &[]);
    let v2 = r["bodies"]["v2"].as_u64().unwrap_or(0);
    assert!((160..=240).contains(&v2), "{r}");
}

/// Issue 10, item 2, on the simulated node: a pod's invalid chunked bodies got 503 and
/// counted as upstream 5xx, so six of them ejected the only endpoint and every client got
/// "no healthy upstream". Now each gets 400 and the endpoint keeps serving.
#[test]
fn a_clients_malformed_body_gets_400_and_never_ejects_the_endpoint() {
    let n = node();
    let yaml = config(&n, 0).replacen(
        "   selector: { version: v1 }\n",
        "   selector: { version: v1 }\n    outlier_detection: { consecutive_5xx: 2, base_ejection_ms: 60000, max_ejection_percent: 100 }\n",
        1,
    );
    assert!(yaml.contains("outlier_detection"), "{yaml}");
    n.write_config(&yaml).unwrap();
    let _agent = start(&n);
    let ok = get(&n, 1, &[]);
    assert_eq!(ok["bodies"], serde_json::json!({ "v1": 1 }), "{ok}");
    let bad = "POST / HTTP/1.1\\r\\nhost: reviews\\r\\ntransfer-encoding: chunked\\r\\n\\r\\nZZ\\r\\nnot a chunk\\r\\n\\r\\n";
    for i in 0..6 {
        let r = n
            .client("client", &["raw", "--to", "10.96.0.10:80", "--send", bad])
            .unwrap();
        assert!(
            r["status_line"]
                .as_str()
                .unwrap()
                .starts_with("HTTP/1.1 400"),
            "request {i}: {r}"
        );
    }
    let after = get(&n, 5, &[]);
    assert_eq!(after["errors"], serde_json::json!([]), "{after}");
    assert_eq!(
        after["bodies"],
        serde_json::json!({ "v1": 5 }),
        "not ejected: {after}"
    );
}
