//! The destination side's telemetry (issue 12, items 1 and 3) on a simulated two-node
//! cluster (`mesh_tests::scenes::two_nodes`): node 1's agent reports Istio's
//! `reporter="destination"` series for what it terminates (HBONE streams relayed into its
//! pod, plain-text connections TC steered to it, requests it judges for an L7
//! AuthorizationPolicy), with the source's principal from the peer certificate and
//! `connection_security_policy` `mutual_tls` or `none`; and sends a span per inbound
//! connection and per request it terminates, the request's parented by the source node's
//! try span.
//!
//! Node 0 runs `client-a` (namespace `shop`, service account `web`) and `legacy`
//! (namespace `legacy`, outside the mesh); node 1 runs `server-b` (namespace `backend`,
//! service account `echo`, label `app: echo`): an echo server on 8080 and HTTP on 8081,
//! where a DENY on `/admin*` makes node 1 terminate HTTP.
//!
//! The trace test needs the venv's python with grpcio and opentelemetry-proto (`cargo
//! xtask setup`; MESH_PYTHON names another): without them it fails, never skips.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_tests::{
    metrics::{labels, Scrape},
    otlp::{self, python, script, spawn_listening, Proc, CLIENT, SERVER},
    scenes::two_nodes::{self, web_api, Member, TwoNodes, CLIENT_A, ECHO, LEGACY, SERVER_B, WEB},
    wait_for,
};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const ECHO_PORT: u16 = 8080;
const HTTP_PORT: u16 = 8081;

/// HTTP on 8081 is judged per request at node 1 (the DENY has HTTP attributes).
fn deny_admin() -> String {
    two_nodes::deny_admin(Some(HTTP_PORT))
}

fn pods() -> TwoNodes {
    TwoNodes::new(&[CLIENT_A, LEGACY, SERVER_B])
}

/// The file both nodes read: the workloads (`client-a` only `with_client`), `extra`.
fn write_config(c: &TwoNodes, with_client: bool, extra: &str) {
    let members: Vec<Member> = c
        .members
        .iter()
        .copied()
        .filter(|m| with_client || *m != CLIENT_A)
        .collect();
    c.write_text(&c.file_of(&members, extra));
}

/// What node 1 reports of what it terminates for server-b.
const DEST: [(&str, &str); 4] = [
    ("reporter", "destination"),
    ("destination_workload", "server-b"),
    ("destination_workload_namespace", "backend"),
    ("destination_principal", ECHO),
];

const FROM_CLIENT_A: [(&str, &str); 4] = [
    ("source_workload", "client-a"),
    ("source_workload_namespace", "shop"),
    ("source_principal", WEB),
    ("connection_security_policy", "mutual_tls"),
];

const FROM_OUTSIDE: [(&str, &str); 4] = [
    ("source_workload", "unknown"),
    ("source_workload_namespace", "unknown"),
    ("source_principal", "unknown"),
    ("connection_security_policy", "none"),
];

/// The status of one `GET path` from `pod` on node 0.
fn get_status(c: &TwoNodes, pod: &str, to: &str, path: &str) -> String {
    c.node(0).get_once(pod, to, path).unwrap().status
}

#[test]
fn destination_series_carry_the_source_principal_and_the_security_policy() {
    let c = pods();
    write_config(&c, true, &deny_admin());
    let agents = c.start_agents(&[]);
    let n1 = c.node(1);
    n1.serve(
        "server-b",
        &["echo", "--listen", &format!("0.0.0.0:{ECHO_PORT}")],
    )
    .unwrap();
    c.serve_http("server-b", HTTP_PORT, "server-b");
    c.wait_mesh(&agents);
    let server = c.pod("server-b").ip;
    let echo = format!("{server}:{ECHO_PORT}");
    let http = format!("{server}:{HTTP_PORT}");

    // L4 across nodes: through HBONE, relayed whole into the pod.
    let r = c.node(0).echo("client-a", &echo, MIB).unwrap();
    assert_eq!(r["intact"], 1, "{r}");
    let tcp = labels(&[&DEST, &FROM_CLIENT_A, &[("request_protocol", "tcp")]]);
    let m = Scrape::wait(
        &agents[1],
        "the tunnelled connection counted closed at the destination",
        Duration::from_secs(10),
        |m| m.value("istio_tcp_connections_closed_total", &tcp) >= 1,
    );
    m.expect_at_least("istio_tcp_connections_opened_total", &tcp, 1);
    m.expect_at_least("istio_tcp_received_bytes_total", &tcp, MIB);
    m.expect_at_least("istio_tcp_sent_bytes_total", &tcp, MIB);
    assert!(
        m.contains("response_flags=\"-\",connection_security_policy=\"mutual_tls\""),
        "{m}"
    );
    // The source node reports its side only, bytes through the tunnel included.
    let src = labels(&[
        &[("reporter", "source"), ("destination_workload", "server-b")],
        &FROM_CLIENT_A,
        &[("request_protocol", "tcp")],
    ]);
    let m0 = Scrape::wait(
        &agents[0],
        "the tunnelled connection's bytes in the source series",
        Duration::from_secs(10),
        |m| {
            m.value("istio_tcp_received_bytes_total", &src) >= MIB
                && m.value("istio_tcp_sent_bytes_total", &src) >= MIB
        },
    );
    m0.expect(
        "istio_tcp_connections_opened_total",
        &[("reporter", "destination")],
        0,
    );

    // Plain text from outside the mesh: captured by TC, delivered, `none`, no principal.
    let r = c.node(0).echo("legacy", &echo, 4096).unwrap();
    assert_eq!(r["intact"], 1, "{r}");
    let plain = labels(&[&DEST, &FROM_OUTSIDE, &[("request_protocol", "tcp")]]);
    let m = Scrape::wait(
        &agents[1],
        "the plain-text connection counted at the destination",
        Duration::from_secs(10),
        |m| m.value("istio_tcp_connections_closed_total", &plain) >= 1,
    );
    m.expect_at_least("istio_tcp_received_bytes_total", &plain, 4096);

    // L7: requests node 1 terminates for the DENY, allowed and denied.
    wait_for("GET /admin denied", Duration::from_secs(10), || {
        get_status(&c, "client-a", &http, "/admin") == "403"
    });
    assert_eq!(get_status(&c, "client-a", &http, "/ok"), "200");
    assert_eq!(get_status(&c, "legacy", &http, "/ok"), "200");
    let m = Scrape::of(&agents[1]);
    let ok = labels(&[
        &DEST,
        &FROM_CLIENT_A,
        &[
            ("request_protocol", "http"),
            ("response_code", "200"),
            ("response_flags", "-"),
        ],
    ]);
    m.expect_at_least("istio_requests_total", &ok, 1);
    let denied = labels(&[
        &DEST,
        &FROM_CLIENT_A,
        &[("response_code", "403"), ("response_flags", "RBAC")],
    ]);
    m.expect_at_least("istio_requests_total", &denied, 1);
    m.expect_at_least("istio_request_duration_milliseconds_count", &ok, 1);
    m.expect_at_least("istio_response_bytes_count", &ok, 1);
    let outside = labels(&[&DEST, &FROM_OUTSIDE, &[("response_code", "200")]]);
    m.expect_at_least("istio_requests_total", &outside, 1);
    // No address or port in any destination label set.
    for l in m.lines().filter(|l| l.contains("reporter=\"destination\"")) {
        assert!(
            !l.contains(&server.to_string()),
            "an address in a label: {l}"
        );
    }

    // client-a leaves the configuration: its series go with it at the next scrape.
    write_config(&c, false, &deny_admin());
    Scrape::wait(
        &agents[1],
        "client-a's destination series dropped",
        Duration::from_secs(10),
        |m| {
            !m.lines().any(|l| {
                l.contains("reporter=\"destination\"") && l.contains("source_workload=\"client-a\"")
            }) && m.value("mesh_istio_series_pruned_total", &[]) >= 1
        },
    );
    let m = Scrape::of(&agents[1]);
    assert!(
        m.value("istio_tcp_connections_opened_total", &plain) >= 1,
        "the outside source's series stay: {m}"
    );
}

// --- traces ---

/// A receiver on 127.0.0.1 of node `i` (its agent's network namespace, not its pods'
/// cgroups: nothing captures it); its spans land in the returned file.
fn receiver(c: &TwoNodes, i: usize, py: &Path) -> (Proc, u16, PathBuf) {
    let out = std::env::temp_dir().join(format!(
        "mesh-dest-spans-{}-{}.jsonl",
        std::process::id(),
        c.node(i).name()
    ));
    let (p, port) = otlp::receiver(py, Some(&c.node(i).netns), &out);
    (p, port, out)
}

const TID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SID: &str = "00f067aa0ba902b7";

#[test]
fn destination_spans_arrive_with_the_source_try_as_parent() {
    let py = python();
    let c = pods();
    let vip = c.vip(40);
    write_config(&c, true, &(deny_admin() + &web_api(vip, HTTP_PORT)));
    let (_r0, port0, out0) = receiver(&c, 0, &py);
    let (_r1, port1, out1) = receiver(&c, 1, &py);
    let agents: Vec<_> = [port0, port1]
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let endpoint = format!("http://127.0.0.1:{port}");
            c.node(i)
                .start_agent(&["--trace-otlp", &endpoint, "--trace-sampling", "1"])
                .expect("agent")
        })
        .collect();
    // The application echoes the headers it got, `traceparent` among them.
    let mut cmd = c.node(1).pod_command("server-b", &py);
    cmd.arg(script())
        .args(["upstream", "--listen", &format!("0.0.0.0:{HTTP_PORT}")]);
    let (_app, _) = spawn_listening(cmd, None);
    c.node(1)
        .serve(
            "server-b",
            &["echo", "--listen", &format!("0.0.0.0:{ECHO_PORT}")],
        )
        .unwrap();
    c.wait_mesh(&agents);

    // L7: client-a -> the service (node 0's L7 engine: a try span) -> HBONE -> node 1,
    // which terminates HTTP for the DENY: its span's parent is node 0's try.
    let get = |path: &str| -> (u64, Value) {
        otlp::get(
            c.node(0).pod_command("client-a", &py),
            &format!("{vip}:80"),
            path,
            &[&format!("traceparent: 00-{TID}-{SID}-01")],
        )
    };
    let mut got = (0, Value::Null);
    wait_for(
        "the service in force on node 0",
        Duration::from_secs(10),
        || {
            got = get("/items");
            got.0 == 200
        },
    );
    let (_, up) = got;
    let tp = up["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("no traceparent at the application: {up}"));
    let app_parent = tp.split('-').nth(2).expect("span id").to_owned();
    let dest = otlp::span_where(&out1, "node 1's request span", |s| {
        s["trace_id"] == TID
            && s["kind"] == SERVER
            && s["attributes"]["mesh.reporter"] == "destination"
            && s["span_id"] == app_parent.as_str()
    });
    let try_span = otlp::span_where(&out0, "node 0's try span", |s| {
        s["trace_id"] == TID && s["kind"] == CLIENT && s["span_id"] == dest["parent_span_id"]
    });
    assert_eq!(
        try_span["attributes"]["mesh.path_taken"], "tunnel",
        "{try_span:#}"
    );
    let a = &dest["attributes"];
    assert_eq!(a["mesh.source.principal"], WEB, "{dest:#}");
    assert_eq!(
        a["mesh.destination.workload"], "backend/server-b",
        "{dest:#}"
    );
    assert_eq!(a["mesh.path_taken"], "inbound+tunnel", "{dest:#}");
    assert_eq!(a["http.response.status_code"], 200, "{dest:#}");
    assert_eq!(a["url.path"], "/items", "{dest:#}");
    assert_eq!(
        dest["resource"]["k8s.node.name"],
        c.node(1).name(),
        "{dest:#}"
    );
    assert!(
        dest["start_ns"].as_u64() >= try_span["start_ns"].as_u64(),
        "{dest:#} {try_span:#}"
    );

    // A denied request: its span carries the flag and the policy, no application span.
    let (status, _) = get("/admin");
    assert_eq!(status, 403);
    let denied = otlp::span_where(&out1, "the denied request's span", |s| {
        s["trace_id"] == TID
            && s["kind"] == SERVER
            && s["attributes"]["mesh.reporter"] == "destination"
            && s["attributes"]["http.response.status_code"] == 403
    });
    assert_eq!(
        denied["attributes"]["mesh.response_flags"], "RBAC",
        "{denied:#}"
    );
    assert_eq!(
        denied["attributes"]["mesh.policy"], "backend/no-admin",
        "{denied:#}"
    );

    // L4 across nodes: node 1's span of the stream it relayed, with its bytes.
    let r = c
        .node(0)
        .echo(
            "client-a",
            &format!("{}:{ECHO_PORT}", c.pod("server-b").ip),
            12345,
        )
        .unwrap();
    assert_eq!(r["intact"], 1, "{r}");
    let tcp = otlp::span_where(&out1, "node 1's span of the tunnelled connection", |s| {
        s["name"] == "tcp"
            && s["attributes"]["mesh.reporter"] == "destination"
            && s["attributes"]["mesh.bytes_received"] == 12345
    });
    let a = &tcp["attributes"];
    assert_eq!(a["mesh.path_taken"], "inbound+tunnel", "{tcp:#}");
    assert_eq!(a["mesh.bytes_sent"], 12345, "{tcp:#}");
    assert_eq!(a["mesh.source.principal"], WEB, "{tcp:#}");
    assert_eq!(a["mesh.source.workload"], "shop/client-a", "{tcp:#}");
    assert_eq!(a["mesh.destination.principal"], ECHO, "{tcp:#}");
    assert_eq!(tcp["parent_span_id"], "", "{tcp:#}");
    // Node 0's span of the same connection: the source side knows its bytes too.
    let src = otlp::span_where(&out0, "node 0's span of the tunnelled connection", |s| {
        s["name"] == "tcp"
            && s["attributes"]["mesh.path_taken"] == "tunnel"
            && s["attributes"]["server.port"] == ECHO_PORT
            && s["attributes"]["mesh.bytes_received"] == 12345
    });
    let a = &src["attributes"];
    assert_eq!(a["mesh.bytes_sent"], 12345, "{src:#}");

    // Plain text from outside the mesh: `inbound`.
    let r = c
        .node(0)
        .echo(
            "legacy",
            &format!("{}:{ECHO_PORT}", c.pod("server-b").ip),
            777,
        )
        .unwrap();
    assert_eq!(r["intact"], 1, "{r}");
    let plain = otlp::span_where(&out1, "node 1's span of the plain-text connection", |s| {
        s["name"] == "tcp"
            && s["attributes"]["mesh.reporter"] == "destination"
            && s["attributes"]["mesh.path_taken"] == "inbound"
    });
    assert_eq!(plain["attributes"]["mesh.bytes_received"], 777, "{plain:#}");
    assert!(
        plain["attributes"].get("mesh.source.principal").is_none(),
        "{plain:#}"
    );
}
