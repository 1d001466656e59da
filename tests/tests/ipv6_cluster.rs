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

use std::time::Duration;

use mesh_tests::{
    cluster::{contains, Capture, NodeAgent},
    firewall_rules,
    flows::assert_intact,
    intact,
    metrics::Scrape,
    scenes::{
        two_nodes::{deny_admin, Member, TwoNodes, CLIENT_A, CLIENT_X, ECHO, SERVER_B, WEB},
        NS_BACKEND_ISTIO, NS_SHOP,
    },
    wait_for,
};

const MIB: u64 = 1 << 20;

/// The dual-stack cluster with client-a, client-x (node 0) and server-b (node 1), the
/// echo server listening on both families; no file, no agent.
fn pods() -> TwoNodes {
    let mut cluster = mesh_tests::cluster::SimCluster::new_dual_stack(2).expect("sim cluster");
    let members = [CLIENT_A, CLIENT_X, SERVER_B];
    for m in members {
        let p = cluster.add_pod(m.node, m.pod, m.host).unwrap();
        assert!(p.ip6.is_some(), "{} has an IPv6 address", m.pod);
    }
    let c = TwoNodes {
        cluster,
        members: members.to_vec(),
    };
    c.node(1)
        .serve("server-b", &["echo", "--listen", "[::]:8080"])
        .unwrap();
    c
}

/// Every member with both its addresses (`ip6`), then `extra`.
fn file(c: &TwoNodes, extra: &str) -> String {
    let mut yaml = format!("namespaces:\n  - {NS_SHOP}\n  - {NS_BACKEND_ISTIO}\nworkloads:\n");
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
    // A tunnel to server-b's IPv6 address needs its workload, both addresses, in force
    // on node 0 (the source) and node 1 (the judge).
    let v6 = c.pod("server-b").v6().to_string();
    for a in &agents {
        wait_for("server-b in force", Duration::from_secs(10), || {
            a.get("/config_dump")
                .map(|d| d.contains(&v6) && d.contains(ECHO))
                .unwrap_or(false)
        });
    }
    agents
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
