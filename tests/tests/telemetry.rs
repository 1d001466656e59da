//! Istio-standard telemetry (issue 12, item 1) on a simulated node: after a TCP echo and a
//! few HTTP requests through the node proxy, `/metrics` has Istio's series with Istio's
//! labels (workloads, namespaces, principals, services), the counts and bytes match, and
//! the series of a workload removed from the configuration go away.

use std::time::Duration;

use mesh_tests::{metric, wait_for, SimNode};

fn node() -> SimNode {
    let mut n = SimNode::new().expect("sim node");
    n.add_pod("client", 2).unwrap();
    n.add_pod("v1", 3).unwrap();
    n.add_pod("db", 4).unwrap();
    n
}

/// `reviews` (HTTP, pod v1) and `db` (TCP service, pod db); `with_db`: whether pod db is
/// a workload of the configuration.
fn config(n: &SimNode, with_db: bool) -> String {
    let p = |name: &str| n.pod(name);
    let mut yaml = "namespaces:\n\
         \x20 - { name: shop, labels: { mesh-agent.io/dataplane-mode: ambient } }\n\
         \x20 - { name: backend, labels: { mesh-agent.io/dataplane-mode: ambient } }\n\
         workloads:\n"
        .to_owned();
    for (pod, ns, sa, labels) in [
        ("client", "shop", "web", "{}"),
        ("v1", "backend", "reviews", "{ app: reviews }"),
        ("db", "backend", "db", "{ app: db }"),
    ] {
        if pod == "db" && !with_db {
            continue;
        }
        yaml += &format!(
            "  - {{ name: {pod}, namespace: {ns}, ip: {}, netns: {}, service_account: {sa}, labels: {labels} }}\n",
            p(pod).ip,
            p(pod).netns_path(),
        );
    }
    yaml += "services:\n\
         \x20 - { name: reviews, namespace: backend, vip: 10.96.0.10, ports: [ { port: 80, target_port: 8080, protocol: http } ], selector: { app: reviews } }\n\
         \x20 - { name: db, namespace: backend, vip: 10.96.0.12, ports: [ { port: 5432, target_port: 9000, protocol: tcp } ], selector: { app: db } }\n";
    yaml
}

const SOURCE: [(&str, &str); 5] = [
    ("reporter", "source"),
    ("source_workload", "client"),
    ("source_workload_namespace", "shop"),
    ("source_principal", "spiffe://cluster.local/ns/shop/sa/web"),
    ("connection_security_policy", "none"),
];

fn with<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    SOURCE
        .iter()
        .copied()
        .chain(extra.iter().copied())
        .collect()
}

#[test]
fn istio_series_count_tcp_and_http_and_drop_gone_workloads() {
    let n = node();
    n.write_config(&config(&n, true)).unwrap();
    let agent = n.start_agent(&[]).unwrap();
    n.serve("v1", &["http", "--listen", "0.0.0.0:8080", "--name", "v1"])
        .unwrap();
    n.serve("db", &["echo", "--listen", "0.0.0.0:9000"])
        .unwrap();
    let db = n.pod("db").ip;

    // L4: one echo to the db pod, relayed by the proxy.
    let r = n
        .client(
            "client",
            &[
                "echo-client",
                "--to",
                &format!("{db}:9000"),
                "--bytes",
                "12345",
            ],
        )
        .unwrap();
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    let tcp = with(&[
        ("destination_workload", "db"),
        ("destination_workload_namespace", "backend"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/backend/sa/db",
        ),
        ("destination_app", "db"),
        ("destination_service", "unknown"),
        ("request_protocol", "tcp"),
        ("response_flags", "-"),
    ]);
    let mut text = String::new();
    wait_for("the TCP connection closed", Duration::from_secs(10), || {
        text = agent.get("/metrics").unwrap_or_default();
        metric(&text, "istio_tcp_connections_closed_total", &tcp) == 1
    });
    for l in text.lines().filter(|l| l.starts_with("istio_tcp_")) {
        eprintln!("{l}");
    }
    assert_eq!(
        metric(&text, "istio_tcp_connections_opened_total", &tcp),
        1,
        "{text}"
    );
    assert_eq!(
        metric(&text, "istio_tcp_received_bytes_total", &tcp),
        12345,
        "{text}"
    );
    assert_eq!(
        metric(&text, "istio_tcp_sent_bytes_total", &tcp),
        12345,
        "{text}"
    );

    // L4 through a TCP service: the service's labels come from its cluster.
    let r = n.echo_once("client", "10.96.0.12:5432").unwrap();
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    let svc = with(&[
        ("destination_workload", "db"),
        ("destination_service", "db.backend"),
        ("destination_service_name", "db"),
        ("destination_service_namespace", "backend"),
        ("request_protocol", "tcp"),
    ]);
    wait_for(
        "the service connection closed",
        Duration::from_secs(10),
        || {
            text = agent.get("/metrics").unwrap_or_default();
            metric(&text, "istio_tcp_connections_closed_total", &svc) == 1
        },
    );
    for l in text
        .lines()
        .filter(|l| l.starts_with("istio_tcp_sent") && l.contains("db.backend"))
    {
        eprintln!("{l}");
    }
    assert_eq!(
        metric(&text, "istio_tcp_connections_opened_total", &svc),
        1,
        "{text}"
    );
    assert_eq!(
        metric(&text, "istio_tcp_sent_bytes_total", &svc),
        4096,
        "{text}"
    );
    assert_eq!(
        metric(&text, "istio_tcp_received_bytes_total", &svc),
        4096,
        "{text}"
    );

    // L7: N requests to the reviews service, one series with code 200.
    const N: u64 = 5;
    let r = n
        .http_get("client", "10.96.0.10:80", "/hello", N as u32, &[])
        .unwrap();
    assert_eq!(r["status"], serde_json::json!({ "200": N }), "{r}");
    let http = with(&[
        ("destination_workload", "v1"),
        ("destination_workload_namespace", "backend"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/backend/sa/reviews",
        ),
        ("destination_service_name", "reviews"),
        ("destination_service_namespace", "backend"),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("response_flags", "-"),
    ]);
    wait_for("the requests counted", Duration::from_secs(10), || {
        text = agent.get("/metrics").unwrap_or_default();
        metric(&text, "istio_requests_total", &http) == N
    });
    for l in text.lines().filter(|l| {
        l.starts_with("istio_requests_total")
            || l.starts_with("istio_request_duration_milliseconds_count")
    }) {
        eprintln!("{l}");
    }
    assert_eq!(
        metric(&text, "istio_request_duration_milliseconds_count", &http),
        N,
        "{text}"
    );
    assert_eq!(
        metric(&text, "istio_response_bytes_count", &http),
        N,
        "{text}"
    );
    assert!(
        text.contains("# TYPE istio_request_duration_milliseconds histogram"),
        "{text}"
    );
    // The agent's own series are still there, once each.
    assert_eq!(
        text.matches("# TYPE mesh_requests_total counter").count(),
        1,
        "{text}"
    );
    assert!(!text.contains("# EOF"), "{text}");

    // The db workload leaves the configuration: its series go, v1's stay.
    n.write_config(&config(&n, false)).unwrap();
    wait_for("db's series dropped", Duration::from_secs(20), || {
        text = agent.get("/metrics").unwrap_or_default();
        !text.contains("destination_workload=\"db\"")
    });
    assert_eq!(metric(&text, "istio_requests_total", &http), N, "{text}");
    assert!(
        metric(&text, "mesh_istio_series_pruned_total", &[]) >= 1,
        "{text}"
    );
}
