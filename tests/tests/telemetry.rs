//! Istio-standard telemetry (issue 12, item 1) on a simulated node: after a TCP echo and a
//! few HTTP requests through the node proxy, `/metrics` has Istio's series with Istio's
//! labels (workloads, namespaces, principals, services), the counts and bytes match, and
//! the series of a workload removed from the configuration go away.

use std::time::Duration;

use mesh_tests::{
    metrics::{labels, Scrape},
    scenes::{mesh_file, NS_BACKEND, NS_SHOP},
    SimNode,
};

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
    let workloads = [
        ("client", "shop", "web", "{}"),
        ("v1", "backend", "reviews", "{ app: reviews }"),
        ("db", "backend", "db", "{ app: db }"),
    ];
    let count = if with_db { 3 } else { 2 };
    mesh_file(n, &[NS_SHOP, NS_BACKEND], &workloads[..count])
        + "services:\n\
         \x20 - { name: reviews, namespace: backend, vip: 10.96.0.10, ports: [ { port: 80, target_port: 8080, protocol: http } ], selector: { app: reviews } }\n\
         \x20 - { name: db, namespace: backend, vip: 10.96.0.12, ports: [ { port: 5432, target_port: 9000, protocol: tcp } ], selector: { app: db } }\n"
}

const SOURCE: [(&str, &str); 5] = [
    ("reporter", "source"),
    ("source_workload", "client"),
    ("source_workload_namespace", "shop"),
    ("source_principal", "spiffe://cluster.local/ns/shop/sa/web"),
    ("connection_security_policy", "none"),
];

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
    let r = n.echo("client", &format!("{db}:9000"), 12345).unwrap();
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    let tcp = labels(&[
        &SOURCE,
        &[
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
        ],
    ]);
    let s = Scrape::wait(
        &agent,
        "the TCP connection closed",
        Duration::from_secs(10),
        |s| s.value("istio_tcp_connections_closed_total", &tcp) == 1,
    );
    s.show(&["istio_tcp_"]);
    s.expect("istio_tcp_connections_opened_total", &tcp, 1);
    s.expect("istio_tcp_received_bytes_total", &tcp, 12345);
    s.expect("istio_tcp_sent_bytes_total", &tcp, 12345);

    // L4 through a TCP service: the service's labels come from its cluster.
    let r = n.echo_once("client", "10.96.0.12:5432").unwrap();
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    let svc = labels(&[
        &SOURCE,
        &[
            ("destination_workload", "db"),
            ("destination_service", "db.backend"),
            ("destination_service_name", "db"),
            ("destination_service_namespace", "backend"),
            ("request_protocol", "tcp"),
        ],
    ]);
    let s = Scrape::wait(
        &agent,
        "the service connection closed",
        Duration::from_secs(10),
        |s| s.value("istio_tcp_connections_closed_total", &svc) == 1,
    );
    for l in s
        .lines()
        .filter(|l| l.starts_with("istio_tcp_sent") && l.contains("db.backend"))
    {
        eprintln!("{l}");
    }
    s.expect("istio_tcp_connections_opened_total", &svc, 1);
    s.expect("istio_tcp_sent_bytes_total", &svc, 4096);
    s.expect("istio_tcp_received_bytes_total", &svc, 4096);

    // L7: N requests to the reviews service, one series with code 200.
    const N: u64 = 5;
    let r = n
        .http_get("client", "10.96.0.10:80", "/hello", N as u32, &[])
        .unwrap();
    assert_eq!(r["status"], serde_json::json!({ "200": N }), "{r}");
    let http = labels(&[
        &SOURCE,
        &[
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
        ],
    ]);
    let s = Scrape::wait(
        &agent,
        "the requests counted",
        Duration::from_secs(10),
        |s| s.value("istio_requests_total", &http) == N,
    );
    s.show(&[
        "istio_requests_total",
        "istio_request_duration_milliseconds_count",
    ]);
    s.expect("istio_request_duration_milliseconds_count", &http, N);
    s.expect("istio_response_bytes_count", &http, N);
    assert!(
        s.contains("# TYPE istio_request_duration_milliseconds histogram"),
        "{s}"
    );
    // The agent's own series are still there, once each.
    assert_eq!(
        s.matches("# TYPE mesh_requests_total counter").count(),
        1,
        "{s}"
    );
    assert!(!s.contains("# EOF"), "{s}");

    // The db workload leaves the configuration: its series go, v1's stay.
    n.write_config(&config(&n, false)).unwrap();
    let s = Scrape::wait(
        &agent,
        "db's series dropped",
        Duration::from_secs(20),
        |s| !s.contains("destination_workload=\"db\""),
    );
    s.expect("istio_requests_total", &http, N);
    s.expect_at_least("mesh_istio_series_pruned_total", &[], 1);
}
