//! Istio's `app` and `version` labels (issue 12, item 1) on a simulated node: a workload's
//! `app.kubernetes.io/name` (else `app`) and `app.kubernetes.io/version` (else `version`)
//! labels travel from the standalone file through the embedded control plane's workload
//! resources to the proxy, and fill `source_app`/`source_version` and
//! `destination_app`/`destination_version` of the `istio_*` series; a workload without
//! them stays `unknown`. A connection to a service VIP is counted against the endpoint's
//! workload, in the proxy's own series and in Istio's.

use std::time::Duration;

use mesh_tests::{
    metrics::{labels, Scrape},
    scenes::{mesh_file, NS_BACKEND, NS_SHOP},
    SimNode,
};

#[test]
fn app_and_version_labels_fill_the_istio_series_of_both_ends() {
    let mut n = SimNode::new().expect("sim node");
    n.add_pod("client", 2).unwrap();
    n.add_pod("v1", 3).unwrap();
    n.add_pod("db", 4).unwrap();
    let yaml = mesh_file(
        &n,
        &[NS_SHOP, NS_BACKEND],
        &[
            // Kubernetes' recommended labels win over Istio's short ones.
            (
                "client",
                "shop",
                "",
                "{ app.kubernetes.io/name: storefront, app: ignored, app.kubernetes.io/version: \"2.1\" }",
            ),
            ("v1", "backend", "", "{ app: reviews, version: v1 }"),
            ("db", "backend", "", "{ app: db }"),
        ],
    ) + "services:\n\
         \x20 - { name: reviews, namespace: backend, vip: 10.96.0.10, ports: [ { port: 80, target_port: 8080, protocol: http } ], selector: { app: reviews } }\n\
         \x20 - { name: db, namespace: backend, vip: 10.96.0.11, ports: [ { port: 90, target_port: 9000, protocol: tcp } ], selector: { app: db } }\n";
    n.write_config(&yaml).unwrap();
    let agent = n.start_agent(&[]).unwrap();
    n.serve("v1", &["http", "--listen", "0.0.0.0:8080", "--name", "v1"])
        .unwrap();
    n.serve("db", &["echo", "--listen", "0.0.0.0:9000"])
        .unwrap();
    let source = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("source_app", "storefront"),
        ("source_version", "2.1"),
    ];

    // L4 to db: its app, no version.
    let db = n.pod("db").ip;
    let r = n.echo_once("client", &format!("{db}:9000")).unwrap();
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    let tcp = labels(&[
        &source,
        &[
            ("destination_workload", "db"),
            ("destination_app", "db"),
            ("destination_version", "unknown"),
        ],
    ]);
    let s = Scrape::wait(
        &agent,
        "the TCP connection closed",
        Duration::from_secs(10),
        |s| s.value("istio_tcp_connections_closed_total", &tcp) == 1,
    );
    s.show(&["istio_tcp_connections_opened"]);
    s.expect("istio_tcp_connections_opened_total", &tcp, 1);
    s.expect("istio_tcp_sent_bytes_total", &tcp, 4096);

    // L4 to db's service VIP: the proxy's own series name the endpoint's workload (its
    // address is the endpoint's), not `unknown` for the VIP; so do Istio's.
    let db_addr = format!("{db}:9000");
    let flow = [
        ("source_workload", "shop/client"),
        ("destination_address", db_addr.as_str()),
        ("destination_workload", "backend/db"),
    ];
    Scrape::of(&agent).expect("mesh_tcp_connections_opened_total", &flow, 1);
    let r = n.echo_once("client", "10.96.0.11:90").unwrap();
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    let s = Scrape::wait(
        &agent,
        "the TCP connection through the VIP closed",
        Duration::from_secs(10),
        |s| s.value("istio_tcp_connections_closed_total", &tcp) == 2,
    );
    s.show(&[
        "mesh_tcp_connections_opened",
        "istio_tcp_connections_opened",
    ]);
    s.expect("mesh_tcp_connections_opened_total", &flow, 2);
    s.expect("istio_tcp_connections_opened_total", &tcp, 2);
    let unknown: Vec<&str> = s
        .lines()
        .filter(|l| l.starts_with("mesh_tcp_") || l.starts_with("istio_tcp_"))
        .filter(|l| l.contains("destination_workload=\"unknown\""))
        .collect();
    assert!(
        unknown.is_empty(),
        "connections to a workload counted as to `unknown`: {unknown:#?}"
    );

    // L7 to reviews: v1's app and version.
    let r = n.http_get("client", "10.96.0.10:80", "/", 3, &[]).unwrap();
    assert_eq!(r["status"], serde_json::json!({ "200": 3 }), "{r}");
    let http = labels(&[
        &source,
        &[
            ("destination_workload", "v1"),
            ("destination_app", "reviews"),
            ("destination_version", "v1"),
            ("response_code", "200"),
        ],
    ]);
    let s = Scrape::wait(
        &agent,
        "the requests counted",
        Duration::from_secs(10),
        |s| s.value("istio_requests_total", &http) == 3,
    );
    s.show(&["istio_requests_total"]);
    s.expect("istio_request_duration_milliseconds_count", &http, 3);
    // No series of these workloads says `unknown` for what their labels say.
    assert!(
        !s.contains("source_app=\"unknown\"") && !s.contains("source_app=\"ignored\""),
        "{s}"
    );

    // A relabel reaches the series of new connections: v1 becomes v2.
    n.write_config(&yaml.replace("version: v1", "version: v2"))
        .unwrap();
    let v2 = labels(&[&http[..], &[("destination_version", "v2")]]);
    Scrape::wait(&agent, "v2 in the series", Duration::from_secs(10), |s| {
        let r = n.http_get("client", "10.96.0.10:80", "/", 1, &[]);
        assert!(r.is_ok(), "{r:?}");
        s.value("istio_requests_total", &v2) >= 1
    });
}
