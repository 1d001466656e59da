//! Direct-mode flows in the Istio series (issue 12, item 1): two pods of one node paired
//! socket to socket (sk_msg), which no proxy sees, counted from the datapath's per-flow
//! records: opened, closed, and each direction's bytes exactly, under the right workloads;
//! the same over plain TCP (no pairing), where the bytes come from TCP's acknowledged
//! counts; and a full record ring drops and counts, never grows. Its own test binary, and
//! part of `datapath` (so the kernel matrix runs it on every kernel).

use std::time::Duration;

use mesh_tests::{metric, sh, wait_for, SimNode};

/// Pair on every kernel (also those without the back-pressure check, < 6.9).
const PAIRING: &[&str] = &["--skmsg-unbounded-pairing", "true"];

/// `client` in `shop` (enrolled), `server` in `backend` in direct mode.
fn node() -> SimNode {
    let mut n = SimNode::new().expect("sim node");
    n.add_pod("client", 2).unwrap();
    n.add_pod("server", 3).unwrap();
    let p = |name: &str| n.pod(name);
    let yaml = format!(
        "namespaces:\n\
         \x20 - {{ name: shop, labels: {{ mesh-agent.io/dataplane-mode: ambient }} }}\n\
         \x20 - {{ name: backend, mode: direct }}\n\
         workloads:\n\
         \x20 - {{ name: client, namespace: shop, ip: {}, netns: {}, labels: {{ app: web }} }}\n\
         \x20 - {{ name: server, namespace: backend, ip: {}, netns: {}, labels: {{ app: db, version: v3 }} }}\n",
        p("client").ip,
        p("client").netns_path(),
        p("server").ip,
        p("server").netns_path(),
    );
    n.write_config(&yaml).unwrap();
    n
}

const FLOW: [(&str, &str); 9] = [
    ("reporter", "source"),
    ("source_workload", "client"),
    ("source_workload_namespace", "shop"),
    ("source_app", "web"),
    ("destination_workload", "server"),
    ("destination_workload_namespace", "backend"),
    ("destination_app", "db"),
    ("destination_version", "v3"),
    ("connection_security_policy", "none"),
];

/// An echo of `echo` bytes each way and a download of `download` bytes (the server
/// sends, the client sends nothing): both flows direct; then the series once both ends
/// of both flows closed.
fn exchange(n: &SimNode, agent: &mesh_tests::Agent, echo: u64, download: u64) -> String {
    let server = n.pod("server").ip;
    n.serve("server", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    n.serve(
        "server",
        &[
            "source",
            "--listen",
            "0.0.0.0:8081",
            "--bytes",
            &download.to_string(),
        ],
    )
    .unwrap();
    let r = n
        .client(
            "client",
            &[
                "echo-client",
                "--to",
                &format!("{server}:8080"),
                "--bytes",
                &echo.to_string(),
            ],
        )
        .unwrap();
    assert_eq!(r["intact"], 1, "{r}");
    let r = n
        .client(
            "client",
            &["read-client", "--to", &format!("{server}:8081")],
        )
        .unwrap();
    assert_eq!(r["received"], download, "{r}");
    let mut text = String::new();
    wait_for(
        "both flows' records (opened, both ends closed)",
        Duration::from_secs(30),
        || {
            text = agent.get("/metrics").unwrap_or_default();
            metric(&text, "istio_tcp_connections_closed_total", &FLOW) == 2
                && metric(&text, "istio_tcp_sent_bytes_total", &FLOW) == echo + download
        },
    );
    for l in text
        .lines()
        .filter(|l| l.starts_with("istio_tcp_") || l.starts_with("mesh_direct_"))
    {
        eprintln!("{l}");
    }
    assert_eq!(
        metric(&text, "istio_tcp_connections_opened_total", &FLOW),
        2,
        "{text}"
    );
    assert_eq!(
        metric(&text, "istio_tcp_received_bytes_total", &FLOW),
        echo,
        "{text}"
    );
    // Nothing else: no proxied series, no other label set.
    assert_eq!(
        metric(&text, "istio_tcp_connections_opened_total", &[]),
        2,
        "{text}"
    );
    assert_eq!(
        metric(&text, "mesh_direct_flows_total", &[("event", "closed")]),
        2
    );
    text
}

#[test]
fn direct_mode_flows_are_counted_with_their_exact_bytes() {
    let n = node();
    let agent = n.start_agent(PAIRING).unwrap();
    let (echo, download) = (100_000, 300_000);
    let text = exchange(&n, &agent, echo, download);
    // Every byte went socket to socket.
    let bytes = |dir: &str, path: &str| {
        metric(
            &text,
            "mesh_direct_bytes_total",
            &[("direction", dir), ("path", path)],
        )
    };
    assert_eq!(bytes("request", "redirect"), echo, "{text}");
    assert_eq!(bytes("response", "redirect"), echo + download, "{text}");
    assert_eq!(bytes("request", "tcp") + bytes("response", "tcp"), 0);
    assert_eq!(agent.event("sockops_server_paired"), 2);
    assert_eq!(agent.event("telemetry_dropped"), 0);
    // The principals come from the mesh workloads, as on proxied flows.
    assert!(
        text.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/default\""),
        "{text}"
    );
}

#[test]
fn direct_mode_flows_over_tcp_are_counted_exactly_too() {
    let n = node();
    // Without the redirect queue's length the agent pairs nothing (issue 14): direct
    // flows run over plain TCP, still without the proxy.
    let agent = n
        .start_agent(&["--assume-missing-feature", "skmsg_queue_length"])
        .unwrap();
    let (echo, download) = (70_001, 250_003);
    let text = exchange(&n, &agent, echo, download);
    let bytes = |dir: &str, path: &str| {
        metric(
            &text,
            "mesh_direct_bytes_total",
            &[("direction", dir), ("path", path)],
        )
    };
    // Acknowledged payload only: no SYN, no FIN in the count.
    assert_eq!(bytes("request", "tcp"), echo, "{text}");
    assert_eq!(bytes("response", "tcp"), echo + download, "{text}");
    assert_eq!(
        bytes("request", "redirect") + bytes("response", "redirect"),
        0
    );
    assert_eq!(agent.event("msg_redirected"), 0);
}

#[test]
fn a_full_record_ring_drops_and_counts_and_the_rest_is_read() {
    let n = node();
    let agent = n.start_agent(PAIRING).unwrap();
    let server = n.pod("server").ip;
    n.serve("server", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    // The agent stops reading (SIGSTOP); the flows do not need it. 1,600 flows write
    // 4,800 records (opened, each end's close) into a ring of 256 KiB (3,640 records).
    let pid = agent.pid();
    sh(&format!("kill -STOP {pid}")).unwrap();
    // Batches below the server's listen backlog (128), so no SYN waits for a retry.
    let batches = 16;
    let per = 100;
    let mut failed = Vec::new();
    for _ in 0..batches {
        let r = n.client(
            "client",
            &[
                "echo-client",
                "--to",
                &format!("{server}:8080"),
                "--bytes",
                "100",
                "--conns",
                &per.to_string(),
            ],
        );
        if !r.as_ref().is_ok_and(|r| r["intact"] == per) {
            failed.push(format!("{r:?}"));
        }
    }
    // The ring overflowed while nobody read it (a server end may still be closing: more
    // drops may follow, the final count is read below).
    let dropped_stopped = agent.stat("telemetry_dropped");
    sh(&format!("kill -CONT {pid}")).unwrap();
    assert!(
        failed.is_empty(),
        "the flows work without the agent reading: {failed:?}"
    );
    assert!(dropped_stopped > 0, "a full ring drops");
    let total = 3 * batches * per;
    let mut text = String::new();
    let mut dropped = 0;
    wait_for(
        "every record read or dropped",
        Duration::from_secs(60),
        || {
            text = agent.get("/metrics").unwrap_or_default();
            dropped = metric(
                &text,
                "mesh_datapath_events_total",
                &[("event", "telemetry_dropped")],
            );
            metric(&text, "mesh_direct_flow_records_total", &[]) + dropped == total
        },
    );
    eprintln!("{total} records: {dropped} dropped on a full ring, the rest read");
    assert!(dropped >= dropped_stopped && dropped < total, "{dropped}");
    // What was read is counted, what was dropped is not: never more flows than ran.
    let closed = metric(&text, "istio_tcp_connections_closed_total", &FLOW);
    let opened = metric(&text, "istio_tcp_connections_opened_total", &FLOW);
    assert!(closed <= batches * per && opened <= batches * per, "{text}");
    // The ring works again: a new flow is counted in full.
    let before = metric(&text, "istio_tcp_received_bytes_total", &FLOW);
    let r = n.echo_once("client", &format!("{server}:8080")).unwrap();
    assert_eq!(r["intact"], 1, "{r}");
    wait_for("the new flow counted", Duration::from_secs(30), || {
        text = agent.get("/metrics").unwrap_or_default();
        metric(&text, "istio_tcp_received_bytes_total", &FLOW) == before + 4096
    });
}
