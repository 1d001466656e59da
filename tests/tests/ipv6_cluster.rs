//! Native IPv6 between pods on different nodes (issue 14 item 5 across issue 11's tunnel),
//! on a dual-stack simulated two-node cluster (`SimCluster::new_dual_stack`: pods at
//! `fd00:(210+i):K::H` beside their IPv4 address, IPv6 routes between the nodes' pod
//! ranges over the link's own IPv6 addresses, each agent `--proxy-redirect6`).
//!
//! Node 0 runs `client-a` (namespace `shop`, service account `web`) and `client-x`
//! (`shop`, `batch`); node 1 runs `server-b` (`backend`, `echo`, label `app: echo`) with an
//! echo server on `[::]:8080`. An IPv6 connection from node 0 to server-b's IPv6 address
//! is captured by connect6, tunnelled by node 0's proxy (HBONE to server-b's node, the
//! CONNECT naming `[v6]:8080` and the client's IPv6 address), judged by node 1 and
//! delivered over IPv6 inside server-b's network namespace (docs/architecture.md, "IPv6").
//!
//! Plain text over IPv6 from outside the mesh (`legacy` and `legacy-2`, namespace
//! `legacy`, on node 0) to server-b's IPv6 address is captured by node 1's TC program
//! inside server-b's namespace and judged there like its IPv4 counterpart (tests/tests/
//! zerotrust.rs): PERMISSIVE delivers it, an IPv6 ipBlocks DENY resets one client and not
//! the other, STRICT refuses both. (Not `family_tests!`: that macro builds single
//! simulated nodes, and the IPv4 bodies live on zerotrust's IPv4-only cluster.)

use std::{path::Path, time::Duration};

use mesh_tests::{
    cluster::{contains, Capture, NodeAgent},
    firewall_rules,
    flows::assert_intact,
    intact,
    metrics::Scrape,
    scenes::{
        two_nodes::{
            deny_admin, Member, TwoNodes, CLIENT_A, CLIENT_X, ECHO, LEGACY, SERVER_B, WEB,
        },
        NS_BACKEND_ISTIO, NS_LEGACY, NS_SHOP,
    },
    wait_for,
};

const MIB: u64 = 1 << 20;

/// A second client outside the mesh, beside `legacy` on node 0.
const LEGACY_2: Member = Member {
    pod: "legacy-2",
    node: 0,
    host: 5,
    namespace: "legacy",
    service_account: "default",
    labels: "{}",
};

/// The dual-stack cluster with client-a, client-x (node 0) and server-b (node 1), the
/// echo server listening on both families; no file, no agent.
fn pods() -> TwoNodes {
    pods_of(&[CLIENT_A, CLIENT_X, SERVER_B])
}

fn pods_of(members: &[Member]) -> TwoNodes {
    let mut cluster = mesh_tests::cluster::SimCluster::new_dual_stack(2).expect("sim cluster");
    let members = members.to_vec();
    for m in &members {
        let p = cluster.add_pod(m.node, m.pod, m.host).unwrap();
        assert!(p.ip6.is_some(), "{} has an IPv6 address", m.pod);
    }
    let c = TwoNodes { cluster, members };
    c.node(1)
        .serve("server-b", &["echo", "--listen", "[::]:8080"])
        .unwrap();
    c
}

/// Every member with both its addresses (`ip6`), then `extra`.
fn file(c: &TwoNodes, extra: &str) -> String {
    let mut yaml = format!("namespaces:\n  - {NS_SHOP}\n  - {NS_BACKEND_ISTIO}\n");
    if c.members.iter().any(|m| m.namespace == "legacy") {
        yaml += &format!("  - {NS_LEGACY}\n");
    }
    yaml += "workloads:\n";
    for m in &c.members {
        let p = c.pod(m.pod);
        yaml += &format!(
            "  - {{ name: {}, namespace: {}, ip: {}{}, netns: {}, node: {}, service_account: {}, labels: {} }}\n",
            p.name,
            m.namespace,
            p.ip,
            p.ip6_field(),
            p.netns_path(),
            c.node(m.node).name(),
            m.service_account,
            m.labels
        );
    }
    yaml + extra
}

fn start(c: &TwoNodes, extra: &str, args: &[&str]) -> Vec<NodeAgent> {
    c.write_text(&file(c, extra));
    let agents = c.start_agents(args);
    wait_server_b(c, &agents);
    agents
}

fn wait_server_b(c: &TwoNodes, agents: &[NodeAgent]) {
    // A tunnel to server-b's IPv6 address needs its workload, both addresses, in force
    // on node 0 (the source) and node 1 (the judge).
    let v6 = c.pod("server-b").v6().to_string();
    for a in agents {
        wait_for("server-b in force", Duration::from_secs(10), || {
            a.get("/config_dump")
                .map(|d| d.contains(&v6) && d.contains(ECHO))
                .unwrap_or(false)
        });
    }
}

/// `[server-b's IPv6 address]:port`.
fn server6(c: &TwoNodes, port: u16) -> String {
    format!("[{}]:{port}", c.pod("server-b").v6())
}

fn echo_ok(c: &TwoNodes, m: Member, to: &str, bytes: u64) -> bool {
    c.node(m.node)
        .echo(m.pod, to, bytes)
        .is_ok_and(|r| intact(&r))
}

fn raw(c: &TwoNodes, m: Member, to: &str, text: &str) -> serde_json::Value {
    c.node(m.node)
        .client(
            m.pod,
            &[
                "raw",
                "--to",
                to,
                "--send",
                text,
                "--half-close",
                "--deadline-ms",
                "5000",
            ],
        )
        .unwrap()
}

fn hbone_streams(agent: &NodeAgent, direction: &str) -> u64 {
    Scrape::of(agent).value("mesh_hbone_streams_total", &[("direction", direction)])
}

fn decisions(agent: &NodeAgent, verdict: &str, policy: &str) -> u64 {
    Scrape::of(agent).value(
        "mesh_authz_decisions_total",
        &[
            ("direction", "inbound"),
            ("verdict", verdict),
            ("policy", policy),
        ],
    )
}

#[test]
fn ipv6_between_nodes_travels_in_mutual_tls_and_arrives_intact() {
    let c = pods();
    let agents = start(&c, "", &[]);
    let to = server6(&c, 8080);
    // Without the mesh this would cross in clear: the nodes route each other's IPv6 pod
    // ranges (an agent without `--proxy-redirect6` leaves it uncaptured, and the capture
    // below then finds the marker).
    let underlay = std::path::PathBuf::from(format!("/run/netns/{}", c.underlay));
    let cap = Capture::start(&underlay).unwrap();
    let marker = "MESH-MARKER-v6-3d94b1e2-cleartext";
    let r = raw(&c, CLIENT_A, &to, marker);
    assert_eq!(r["status_line"], marker, "the echo came back: {r}");
    assert_eq!(r["outcome"], "eof", "{r}");
    let r = c
        .node(0)
        .echo_within("client-a", &to, 16 * MIB, 30_000)
        .unwrap();
    assert_intact(&r, 16 * MIB);
    let wire = cap.finish();
    assert!(
        wire.len() as u64 > 32 * MIB,
        "the capture saw the transfer ({} bytes)",
        wire.len()
    );
    assert!(
        !contains(&wire, marker.as_bytes()),
        "the marker crossed the wire in clear"
    );
    // Through the tunnel: streams out of node 0, into server-b's in-pod listener, where
    // node 1 judged them (no policy: allowed) and counted the bytes as the destination
    // of client-a's mutual-TLS connection (the source address named and believed).
    assert!(hbone_streams(&agents[0], "out") >= 2);
    assert!(hbone_streams(&agents[1], "in") >= 2);
    let dest = [
        ("reporter", "destination"),
        ("destination_workload", "server-b"),
        ("destination_principal", ECHO),
        ("source_workload", "client-a"),
        ("source_principal", WEB),
        ("connection_security_policy", "mutual_tls"),
    ];
    Scrape::wait(
        &agents[1],
        "node 1 counted the tunnelled IPv6 bytes",
        Duration::from_secs(10),
        |m| {
            m.value("istio_tcp_received_bytes_total", &dest) >= 16 * MIB
                && m.value("istio_tcp_sent_bytes_total", &dest) >= 16 * MIB
        },
    );
    assert!(
        Scrape::of(&agents[1]).value(
            "mesh_hbone_forwarded_source_total",
            &[("outcome", "trusted")]
        ) >= 2
    );
    assert_eq!(firewall_rules(&c.all_netns()), Vec::<String>::new());
}

#[test]
fn policy_judges_ipv6_flows_by_principal_and_by_their_ipv6_source() {
    let c = pods();
    let a6 = c.pod("client-a").v6();
    // DENY batch (client-x) by principal; ALLOW only client-a's IPv6 address.
    let policies = format!(
        "authorization_policies:\n\
         \x20 - metadata: {{ name: deny-batch, namespace: backend }}\n\
         \x20   spec: {{ selector: {{ matchLabels: {{ app: echo }} }}, action: DENY, rules: [ {{ from: [ {{ source: {{ principals: [ cluster.local/ns/shop/sa/batch ] }} }} ] }} ] }}\n\
         \x20 - metadata: {{ name: only-a6, namespace: backend }}\n\
         \x20   spec: {{ selector: {{ matchLabels: {{ app: echo }} }}, action: ALLOW, rules: [ {{ from: [ {{ source: {{ ipBlocks: [ \"{a6}/128\" ] }} }} ] }} ] }}\n"
    );
    let agents = start(&c, &policies, &[]);
    let to6 = server6(&c, 8080);
    let to4 = format!("{}:8080", c.pod("server-b").ip);
    wait_for("the policies in force", Duration::from_secs(10), || {
        !echo_ok(&c, CLIENT_X, &to6, 4096)
    });
    // client-a over IPv6: its IPv6 address is in the block.
    let r = c.node(0).echo("client-a", &to6, MIB).unwrap();
    assert_intact(&r, MIB);
    assert!(decisions(&agents[1], "allow", "backend/only-a6") >= 1);
    // client-a over IPv4: same caller, same tunnel, but its IPv4 source is not in the
    // block.
    let before = decisions(&agents[1], "deny", "backend/only-a6");
    assert!(!echo_ok(&c, CLIENT_A, &to4, 4096));
    assert!(decisions(&agents[1], "deny", "backend/only-a6") > before);
    // client-x over IPv6: denied by its principal, and it gets a reset, never a clean
    // end.
    let before = decisions(&agents[1], "deny", "backend/deny-batch");
    let r = c.node(0).echo("client-x", &to6, 4096).unwrap();
    let errors = r["errors"].as_array().cloned().unwrap_or_default();
    assert!(
        errors
            .iter()
            .any(|e| e.as_str().is_some_and(|e| e.contains("ECONNRESET"))),
        "{r}"
    );
    assert_eq!(r["received"], 0, "{r}");
    assert!(decisions(&agents[1], "deny", "backend/deny-batch") > before);
    // Judged at node 1 (the destination), through the tunnel.
    assert!(hbone_streams(&agents[0], "out_failed") >= 2);
    assert_eq!(firewall_rules(&c.all_netns()), Vec::<String>::new());
}

/// A policy with HTTP attributes at server-b's port: node 1 terminates the IPv6 tunnel's
/// HTTP (dialling server-b's IPv6 address per connection) and judges each request.
#[test]
fn http_policy_judges_each_request_of_an_ipv6_tunnel() {
    let c = pods();
    c.node(1)
        .serve("server-b", &["http", "--listen", "[::]:8081"])
        .unwrap();
    let agents = start(&c, &deny_admin(Some(8081)), &[]);
    let to = server6(&c, 8081);
    let get = |path: &str| c.node(0).get_once("client-a", &to, path).unwrap();
    wait_for("the L7 policy in force", Duration::from_secs(10), || {
        get("/admin").status == "403"
    });
    let ok = get("/");
    assert_eq!(ok.status, "200", "{ok:?}");
    assert!(
        Scrape::of(&agents[1]).value(
            "mesh_authz_decisions_total",
            &[
                ("direction", "inbound"),
                ("level", "request"),
                ("verdict", "deny"),
                ("policy", "backend/no-admin"),
            ]
        ) >= 1
    );
    // Through the tunnel, from node 0's L4 path.
    assert!(hbone_streams(&agents[0], "out") >= 1);
}

/// `--skmsg-upstream true`: the IPv6 delivery leg inside server-b is paired in node 1's
/// sockhash as the IPv4 one is (docs/architecture.md, "Inbound capture").
#[test]
fn with_upstream_pairing_the_ipv6_delivery_leg_is_paired() {
    let c = pods();
    let agents = start(&c, "", &["--skmsg-upstream", "true"]);
    let to = server6(&c, 8080);
    let paired = agents[1].event("sockops_server_paired");
    let moved = agents[1].event("msg_redirected_bytes");
    let r = c
        .node(0)
        .echo_within("client-a", &to, 16 * MIB, 30_000)
        .unwrap();
    assert_intact(&r, 16 * MIB);
    assert!(agents[1].event("sockops_server_paired") > paired);
    let moved = agents[1].event("msg_redirected_bytes") - moved;
    assert!(moved >= MIB, "node 1 redirected {moved} bytes");
    // Half-close and the FIN back, through the paired leg.
    let marker = "half-close-across-the-ipv6-leg";
    let r = raw(&c, CLIENT_A, &to, marker);
    assert_eq!(r["status_line"], marker, "{r}");
    assert_eq!(r["outcome"], "eof", "{r}");
    wait_for(
        "node 1's delivery records removed",
        Duration::from_secs(10),
        || {
            let v: serde_json::Value =
                serde_json::from_str(&agents[1].get("/inspect/pod/backend/server-b").unwrap())
                    .unwrap();
            v["connections"]["total"] == 0
        },
    );
}

/// The access log's lines (JSON, one per connection).
fn log_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Whether an echo client's report ends in a reset with nothing received back.
fn reset_with_nothing(r: &serde_json::Value) -> bool {
    let errors = r["errors"].as_array().cloned().unwrap_or_default();
    errors.iter().any(|e| {
        e.as_str()
            .is_some_and(|e| e.contains("ECONNRESET") || e.contains("ECONNREFUSED"))
    }) && r["received"] == 0
}

/// STRICT mutual TLS for namespace `backend` (the file's only policy), in force once
/// `agent` (the destination's) has denied a plain-text connection, or `probe`'s plain-text
/// echo to `to` fails.
fn strict(c: &TwoNodes, agent: &NodeAgent, probe: Member, to: &str) {
    c.write_text(&file(
        c,
        "peer_authentications:\n\
         \x20 - metadata: { name: strict, namespace: backend }\n\
         \x20   spec: { mtls: { mode: STRICT } }\n",
    ));
    wait_for("STRICT in force", Duration::from_secs(10), || {
        decisions(agent, "deny", "backend/strict") >= 1 || !echo_ok(c, probe, to, 4096)
    });
}

fn delivered(agent: &NodeAgent) -> u64 {
    Scrape::of(agent).value(
        "mesh_inbound_connections_total",
        &[("outcome", "delivered")],
    )
}

/// Plain text over IPv6 from pods outside the mesh to an enrolled dual-stack pod's IPv6
/// address is captured by TC in that pod (issue 11, item 4): PERMISSIVE delivers it
/// intact and the agent saw the flow with the client's real IPv6 source; a DENY by that
/// client's IPv6 `/128` resets it while another plain-text client passes; STRICT refuses
/// plain text (nothing delivered) while mutual TLS over IPv6 still passes. Without the
/// capture each of these connections would reach the echo server untouched.
#[test]
fn plain_text_ipv6_from_outside_the_mesh_is_captured_and_judged() {
    let c = pods_of(&[CLIENT_A, LEGACY, LEGACY_2, SERVER_B]);
    c.write_text(&file(&c, ""));
    let log = c.node(1).dir.join("access-v6.log");
    let _ = std::fs::remove_file(&log);
    let agents = vec![
        c.node(0).start_agent(&[]).expect("agent 0"),
        c.node(1)
            .start_agent(&["--access-log", log.to_str().unwrap()])
            .expect("agent 1"),
    ];
    wait_server_b(&c, &agents);
    let to = server6(&c, 8080);
    let (l6, l2_6) = (c.pod("legacy").v6(), c.pod("legacy-2").v6());

    // PERMISSIVE (nothing configured): captured in server-b's namespace and delivered.
    let assigned = agents[1].event("tc_assigned6");
    let before = delivered(&agents[1]);
    let r = c.node(0).echo("legacy", &to, MIB).unwrap();
    assert_intact(&r, MIB);
    assert!(
        agents[1].event("tc_assigned6") > assigned,
        "node 1's TC program assigned the IPv6 connection"
    );
    assert!(delivered(&agents[1]) > before);
    // The access log has the flow with the client's own IPv6 address as its source.
    let src = format!("[{l6}]:");
    let mut line = serde_json::Value::Null;
    wait_for(
        "the captured IPv6 flow's log line",
        Duration::from_secs(10),
        || {
            line = log_lines(&log)
                .into_iter()
                .find(|l| {
                    l["source_address"]
                        .as_str()
                        .is_some_and(|s| s.starts_with(&src))
                })
                .unwrap_or_default();
            !line.is_null()
        },
    );
    assert_eq!(line["destination_address"], to, "{line}");
    assert_eq!(line["destination_workload"], "backend/server-b", "{line}");
    assert_eq!(line["bytes_received"], MIB, "{line}");
    assert_eq!(line["bytes_sent"], MIB, "{line}");
    assert_eq!(line["policy_verdict"], "allow", "{line}");

    // A DENY by legacy's IPv6 address resets it; legacy-2, also plain text, passes.
    c.write_text(&file(
        &c,
        &format!(
            "authorization_policies:\n\
             \x20 - metadata: {{ name: no-legacy6, namespace: backend }}\n\
             \x20   spec: {{ action: DENY, rules: [ {{ from: [ {{ source: {{ ipBlocks: [ \"{l6}/128\" ] }} }} ] }} ] }}\n"
        ),
    ));
    wait_for(
        "the IPv6 ipBlocks DENY in force",
        Duration::from_secs(10),
        || {
            decisions(&agents[1], "deny", "backend/no-legacy6") >= 1
                || !echo_ok(&c, LEGACY, &to, 4096)
        },
    );
    let denied = decisions(&agents[1], "deny", "backend/no-legacy6");
    let r = c.node(0).echo("legacy", &to, 4096).unwrap();
    assert!(reset_with_nothing(&r), "legacy is reset: {r}");
    assert!(decisions(&agents[1], "deny", "backend/no-legacy6") > denied);
    let r = c.node(0).echo("legacy-2", &to, MIB).unwrap();
    assert_intact(&r, MIB);
    wait_for("legacy-2's log line", Duration::from_secs(10), || {
        log_lines(&log).iter().any(|l| {
            l["source_address"]
                .as_str()
                .is_some_and(|s| s.starts_with(&format!("[{l2_6}]:")))
                && l["bytes_received"] == MIB
        })
    });
    // The denial is logged with legacy's IPv6 source.
    assert!(
        log_lines(&log).iter().any(|l| {
            l["source_address"]
                .as_str()
                .is_some_and(|s| s.starts_with(&src))
                && l["policy_verdict"] == "deny"
        }),
        "the denial's log line"
    );

    // STRICT on the namespace: plain text over IPv6 is refused (the DENY is gone with the
    // edit), mutual TLS over IPv6 passes.
    strict(&c, &agents[1], LEGACY_2, &to);
    let before = delivered(&agents[1]);
    let strict = decisions(&agents[1], "deny", "backend/strict");
    for m in [LEGACY, LEGACY_2] {
        let r = c.node(0).echo(m.pod, &to, 4096).unwrap();
        assert!(reset_with_nothing(&r), "{} is refused: {r}", m.pod);
        // The marker never comes back: a report without it, or podtool failing on the
        // reset it got before it could send.
        let marker = "MESH-MARKER-strict-v6";
        match c.node(m.node).client(
            m.pod,
            &[
                "raw",
                "--to",
                &to,
                "--send",
                marker,
                "--half-close",
                "--deadline-ms",
                "5000",
            ],
        ) {
            Ok(r) => assert_ne!(r["status_line"], marker, "{r}"),
            Err(e) => assert!(format!("{e:#}").contains("Connection reset"), "{e:#}"),
        }
    }
    assert!(decisions(&agents[1], "deny", "backend/strict") >= strict + 4);
    assert_eq!(delivered(&agents[1]), before, "nothing was delivered");
    let r = c.node(0).echo("client-a", &to, MIB).unwrap();
    assert_intact(&r, MIB);
    assert_eq!(firewall_rules(&c.all_netns()), Vec::<String>::new());
}

/// The agent stopped: nothing is steered (fail open), the IPv6 connection reaches the
/// application directly; the IPv6 entries of `INBOUND6` are gone with the agent.
#[test]
fn without_an_agent_plain_text_ipv6_is_left_alone() {
    let c = pods_of(&[LEGACY, SERVER_B]);
    let mut agents = start(&c, "", &[]);
    let to = server6(&c, 8080);
    let r = c.node(0).echo("legacy", &to, 64 * 1024).unwrap();
    assert_intact(&r, 64 * 1024);
    assert!(agents[1].event("tc_assigned6") >= 1);
    for a in &mut agents {
        let (status, log) = a.stop();
        assert_eq!(status, Some(0), "{log}");
    }
    let r = c.node(0).echo("legacy", &to, 64 * 1024).unwrap();
    assert_intact(&r, 64 * 1024);
}

/// A plain-text IPv6 client whose packets carry an extension header (`dst`: destination
/// options, `hop`: hop-by-hop): one option of a type whose top bits tell receivers to skip
/// it (0x1e, RFC 8200 section 4.2), with a payload a wire capture can find. Prints
/// `ok <echo>` or `error <errno name>`.
const EXT_CLIENT: &str = r#"
import errno, socket, sys
kind, host, port, text = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
opt = {"dst": socket.IPV6_DSTOPTS, "hop": socket.IPV6_HOPOPTS}[kind]
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_IPV6, opt, bytes([0, 0, 0x1e, 4]) + b"MSH6")
s.settimeout(5)
try:
    s.connect((host, port))
    s.sendall(text)
    s.shutdown(socket.SHUT_WR)
    got = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        got += b
    print("ok " + got.decode(errors="replace"))
except OSError as e:
    print("error " + (errno.errorcode.get(e.errno, str(e)) if e.errno else type(e).__name__))
"#;

/// A TCP SYN behind seven destination-options headers (more than the TC program walks),
/// sent from a raw socket: dropped on its way to a captured pod.
const LONG_CHAIN_SYN: &str = r#"
import socket, struct, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, 60)
chain = b"".join(bytes([60 if i < 6 else 6, 0, 1, 4, 0, 0, 0, 0]) for i in range(7))
syn = struct.pack("!HHIIBBHHH", 40000, port, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
s.sendto(chain + syn, (host, 0))
print("sent")
"#;

fn ext_client(c: &TwoNodes, m: Member, kind: &str, to: std::net::SocketAddr, text: &str) -> String {
    let out = c
        .node(m.node)
        .pod_command(m.pod, &mesh_tests::otlp::python())
        .args([
            "-c",
            EXT_CLIENT,
            kind,
            &to.ip().to_string(),
            &to.port().to_string(),
            text,
        ])
        .output()
        .expect("python");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A destination-options or hop-by-hop header in front of TCP does not take a plain-text
/// IPv6 connection past capture: the TC program walks the headers the kernel walks. Under
/// PERMISSIVE such a connection is assigned and delivered; under STRICT it is refused. A
/// chain longer than the walk's bound is dropped and counted.
#[test]
fn ipv6_extension_headers_do_not_slip_past_capture() {
    let c = pods_of(&[LEGACY, SERVER_B]);
    let agents = start(&c, "", &[]);
    let to: std::net::SocketAddr = server6(&c, 8080).parse().unwrap();
    let underlay = std::path::PathBuf::from(format!("/run/netns/{}", c.underlay));
    for kind in ["dst", "hop"] {
        let assigned = agents[1].event("tc_assigned6");
        let passed = agents[1].event("tc_pass_ipv6_ext_header");
        let cap = Capture::start(&underlay).unwrap();
        let text = format!("through-{kind}-options");
        assert_eq!(
            ext_client(&c, LEGACY, kind, to, &text),
            format!("ok {text}")
        );
        // The header was on the wire, and the connection was captured all the same.
        assert!(
            contains(&cap.finish(), b"\x1e\x04MSH6"),
            "{kind}: no option seen"
        );
        assert!(
            agents[1].event("tc_assigned6") > assigned,
            "{kind}: not assigned"
        );
        assert_eq!(agents[1].event("tc_pass_ipv6_ext_header"), passed, "{kind}");
    }
    // Past the bound, to a captured pod with its agent there: dropped and counted, never
    // passed around capture (docs/security.md).
    let passed = agents[1].event("tc_pass_ipv6_ext_header");
    let dropped = agents[1].event("tc_drop_ipv6_ext_chain");
    let out = c
        .node(0)
        .pod_command("legacy", &mesh_tests::otlp::python())
        .args([
            "-c",
            LONG_CHAIN_SYN,
            &to.ip().to_string(),
            &to.port().to_string(),
        ])
        .output()
        .expect("python");
    assert!(out.status.success(), "{out:?}");
    wait_for("the long chain dropped", Duration::from_secs(5), || {
        agents[1].event("tc_drop_ipv6_ext_chain") > dropped
    });
    assert_eq!(agents[1].event("tc_pass_ipv6_ext_header"), passed);
    strict(&c, &agents[1], LEGACY, &server6(&c, 8080));
    for kind in ["dst", "hop"] {
        let out = ext_client(&c, LEGACY, kind, to, "MESH-MARKER-ext-strict");
        assert!(out.starts_with("error ECONNRESET"), "{kind}: {out}");
    }
}
