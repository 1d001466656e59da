//! Direct-mode flows in the Istio series (issue 12, item 1): two pods of one node paired
//! socket to socket (sk_msg), which no proxy sees, counted from the datapath's per-flow
//! records: opened, closed, and each direction's bytes exactly, under the right workloads;
//! the same over plain TCP (no pairing), where the bytes come from TCP's acknowledged
//! counts; and a full record ring drops and counts, never grows. Its own test binary, and
//! part of `datapath` (so the kernel matrix runs it on every kernel).

use std::time::Duration;

use mesh_tests::{
    metrics::Scrape,
    scenes::{mesh_file, NS_SHOP},
    sh, SimNode,
};

/// Pair on every kernel (also those without the back-pressure check, < 6.9).
const PAIRING: &[&str] = &["--skmsg-unbounded-pairing", "true"];

/// `client` in `shop` (enrolled), `server` in `backend` in direct mode.
fn node() -> SimNode {
    let mut n = SimNode::new().expect("sim node");
    n.add_pod("client", 2).unwrap();
    n.add_pod("server", 3).unwrap();
    let yaml = mesh_file(
        &n,
        &[NS_SHOP, "{ name: backend, mode: direct }"],
        &[
            ("client", "shop", "", "{ app: web }"),
            ("server", "backend", "", "{ app: db, version: v3 }"),
        ],
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
fn exchange(n: &SimNode, agent: &mesh_tests::Agent, echo: u64, download: u64) -> Scrape {
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
    let r = n.echo("client", &format!("{server}:8080"), echo).unwrap();
    assert_eq!(r["intact"], 1, "{r}");
    let r = n
        .client(
            "client",
            &["read-client", "--to", &format!("{server}:8081")],
        )
        .unwrap();
    assert_eq!(r["received"], download, "{r}");
    let s = Scrape::wait(
        agent,
        "both flows' records (opened, both ends closed)",
        Duration::from_secs(30),
        |s| {
            s.value("istio_tcp_connections_closed_total", &FLOW) == 2
                && s.value("istio_tcp_sent_bytes_total", &FLOW) == echo + download
        },
    );
    s.show(&["istio_tcp_", "mesh_direct_"]);
    s.expect("istio_tcp_connections_opened_total", &FLOW, 2);
    s.expect("istio_tcp_received_bytes_total", &FLOW, echo);
    // Nothing else: no proxied series, no other label set.
    s.expect("istio_tcp_connections_opened_total", &[], 2);
    s.expect("mesh_direct_flows_total", &[("event", "closed")], 2);
    s
}

/// `mesh_direct_bytes_total` of one direction and path.
fn direct_bytes(s: &Scrape, direction: &str, path: &str) -> u64 {
    s.value(
        "mesh_direct_bytes_total",
        &[("direction", direction), ("path", path)],
    )
}

#[test]
fn direct_mode_flows_are_counted_with_their_exact_bytes() {
    let n = node();
    let agent = n.start_agent(PAIRING).unwrap();
    let (echo, download) = (100_000, 300_000);
    let s = exchange(&n, &agent, echo, download);
    // Every byte went socket to socket.
    let bytes = |dir: &str, path: &str| direct_bytes(&s, dir, path);
    assert_eq!(bytes("request", "redirect"), echo, "{s}");
    assert_eq!(bytes("response", "redirect"), echo + download, "{s}");
    assert_eq!(bytes("request", "tcp") + bytes("response", "tcp"), 0);
    assert_eq!(agent.event("sockops_server_paired"), 2);
    assert_eq!(agent.event("telemetry_dropped"), 0);
    // The principals come from the mesh workloads, as on proxied flows.
    assert!(
        s.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/default\""),
        "{s}"
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
    let s = exchange(&n, &agent, echo, download);
    let bytes = |dir: &str, path: &str| direct_bytes(&s, dir, path);
    // Acknowledged payload only: no SYN, no FIN in the count.
    assert_eq!(bytes("request", "tcp"), echo, "{s}");
    assert_eq!(bytes("response", "tcp"), echo + download, "{s}");
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
    let s = Scrape::wait(
        &agent,
        "every record read or dropped",
        Duration::from_secs(60),
        |s| {
            let dropped = s.value(
                "mesh_datapath_events_total",
                &[("event", "telemetry_dropped")],
            );
            s.value("mesh_direct_flow_records_total", &[]) + dropped == total
        },
    );
    let dropped = s.value(
        "mesh_datapath_events_total",
        &[("event", "telemetry_dropped")],
    );
    eprintln!("{total} records: {dropped} dropped on a full ring, the rest read");
    assert!(dropped >= dropped_stopped && dropped < total, "{dropped}");
    // What was read is counted, what was dropped is not: never more flows than ran.
    let closed = s.value("istio_tcp_connections_closed_total", &FLOW);
    let opened = s.value("istio_tcp_connections_opened_total", &FLOW);
    assert!(closed <= batches * per && opened <= batches * per, "{s}");
    // The ring works again: a new flow is counted in full.
    let before = s.value("istio_tcp_received_bytes_total", &FLOW);
    let r = n.echo_once("client", &format!("{server}:8080")).unwrap();
    assert_eq!(r["intact"], 1, "{r}");
    Scrape::wait(
        &agent,
        "the new flow counted",
        Duration::from_secs(30),
        |s| s.value("istio_tcp_received_bytes_total", &FLOW) == before + 4096,
    );
}
