//! Zero trust across nodes (issue 11) on a simulated two-node cluster
//! (`mesh_tests::scenes::two_nodes`, docs/multinode.md): identities from the cluster's CA, the
//! HBONE tunnel between nodes, inbound capture with TC, and Istio's AuthorizationPolicy
//! and PeerAuthentication enforced at the destination node.
//!
//! Node 0 runs `client-a` (namespace `shop`, service account `web`), `client-x` (`shop`,
//! service account `batch`) and `legacy` (namespace `legacy`, not in the mesh); node 1
//! runs `server-b` (namespace `backend`, enrolled with Istio's own label, service
//! account `echo`, label `app: echo`) with an echo server on 8080. Both nodes read the
//! same file: every workload with its `node:`, and the policies under test.

use mesh_tests::flows::{assert_intact, assert_sunk};
use mesh_tests::{
    cluster::{contains, Capture, ClusterNode, NodeAgent},
    firewall_rules, intact, metric,
    metrics::Scrape,
    scenes::two_nodes::{
        deny_admin, web_api, Member, TwoNodes, CLIENT_A, CLIENT_X, LEGACY, SERVER_B,
    },
    wait_for,
};
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn cluster(extra_args: &[&str], policies: &str) -> (TwoNodes, Vec<NodeAgent>) {
    let c = pods();
    c.write_file(policies);
    let agents = c.start_agents(extra_args);
    (c, agents)
}

/// The cluster and its pods (echo server running), no agent yet.
fn pods() -> TwoNodes {
    let c = TwoNodes::new(&[CLIENT_A, CLIENT_X, LEGACY, SERVER_B]);
    c.node(1)
        .serve("server-b", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    c
}

fn server(c: &TwoNodes) -> String {
    format!("{}:8080", c.pod("server-b").ip)
}

fn echo_ok(node: &ClusterNode, pod: &str, to: &str, bytes: u64) -> bool {
    node.echo(pod, to, bytes).is_ok_and(|r| intact(&r))
}

fn hbone_streams(agent: &NodeAgent, direction: &str) -> u64 {
    Scrape::of(agent).value("mesh_hbone_streams_total", &[("direction", direction)])
}

/// `mesh_hbone_forwarded_source_total` of `outcome` (`trusted`, `untrusted`).
fn forwarded_sources(agent: &NodeAgent, outcome: &str) -> u64 {
    Scrape::of(agent).value("mesh_hbone_forwarded_source_total", &[("outcome", outcome)])
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
fn cross_node_traffic_travels_in_mutual_tls_and_arrives_intact() {
    let (c, agents) = cluster(&[], "");
    c.wait_mesh(&agents);
    let to = server(&c);
    let underlay = std::path::PathBuf::from(format!("/run/netns/{}", c.underlay));
    let cap = Capture::start(&underlay).unwrap();
    // A marker the app sends in clear; the wire between the nodes must never show it.
    let marker = "MESH-MARKER-7c1f0e9a-cleartext";
    let r = c
        .node(0)
        .client(
            "client-a",
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
        )
        .unwrap();
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
    // Through the tunnel: streams out of node 0, into node 1's in-pod listener.
    assert!(hbone_streams(&agents[0], "out") >= 2);
    assert!(hbone_streams(&agents[1], "in") >= 2);
    // The identities each node holds certificates for.
    let certs0 = agents[0].get("/certs").unwrap();
    assert!(
        certs0.contains("spiffe://cluster.local/ns/shop/sa/web"),
        "{certs0}"
    );
    let certs1 = agents[1].get("/certs").unwrap();
    assert!(
        certs1.contains("spiffe://cluster.local/ns/backend/sa/echo"),
        "{certs1}"
    );
    assert_eq!(firewall_rules(&c.all_netns()), Vec::<String>::new());
}

/// `--skmsg-upstream true` pairs node 1's delivery leg too (docs/architecture.md,
/// "Inbound capture"): the agent's socket in the pod and the pod's accepted socket sit in
/// the sockhash while the flow lives, and what crosses the leg keeps every byte (16 MiB
/// each way, and a slow reader behind it), its half-close and its resets.
#[test]
fn with_upstream_pairing_the_delivery_leg_is_paired_and_keeps_bytes_half_close_and_resets() {
    let c = pods();
    let node1 = c.node(1);
    // A reader that waits 3 s before reading (a live, paired flow to look at), and a
    // server that resets what it accepts.
    node1
        .serve(
            "server-b",
            &[
                "sink",
                "--listen",
                "0.0.0.0:8081",
                "--pause-ms",
                "3000",
                "--delay-us",
                "0",
            ],
        )
        .unwrap();
    node1
        .serve("server-b", &["reset", "--listen", "0.0.0.0:8082"])
        .unwrap();
    c.write_file("");
    let agents = c.start_agents(&["--skmsg-upstream", "true"]);
    c.wait_mesh(&agents);
    let ip = c.pod("server-b").ip;
    // While the flow lives, node 1 lists the delivery leg as a paired flow of the pod:
    // the record the agent announced (flag `upstream`), both sockets in the sockhash.
    let sink = format!("{ip}:8081");
    let bytes = 2 * MIB;
    std::thread::scope(|s| {
        let sender = s.spawn(|| {
            c.node(0)
                .client(
                    "client-a",
                    &["sink-client", "--to", &sink, "--bytes", &bytes.to_string()],
                )
                .unwrap()
        });
        let mut seen = String::new();
        wait_for(
            "the delivery leg paired in node 1's sockhash",
            Duration::from_secs(10),
            || {
                seen = agents[1].get("/inspect/pod/backend/server-b").unwrap();
                let v: serde_json::Value = serde_json::from_str(&seen).unwrap();
                v["connections"]["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|i| {
                        i["original_destination"] == sink.as_str()
                            && i["flags"].as_str().is_some_and(|f| f.contains("upstream"))
                            && i["sockhash"]["own"] == true
                            && i["sockhash"]["peer"] == true
                            && i["path"] == "proxied+sk_msg"
                    })
            },
        );
        assert_sunk(&sender.join().unwrap(), bytes);
        assert!(!seen.is_empty());
    });
    assert!(agents[1].event("sockops_server_paired") >= 1);
    // 16 MiB each way through the tunnel and the paired leg, intact; node 1's sk_msg
    // carried bytes of it.
    let before = agents[1].event("msg_redirected_bytes");
    let to = server(&c);
    let r = c
        .node(0)
        .echo_within("client-a", &to, 16 * MIB, 30_000)
        .unwrap();
    assert_intact(&r, 16 * MIB);
    let moved = agents[1].event("msg_redirected_bytes") - before;
    assert!(moved >= MIB, "node 1 redirected {moved} bytes");
    // Half-close: the client's FIN reaches the pod after its bytes, the echo's answer and
    // FIN come back.
    let marker = "half-close-across-the-paired-leg";
    let r = node_raw(&c, &to, marker);
    assert_eq!(r["status_line"], marker, "{r}");
    assert_eq!(r["outcome"], "eof", "{r}");
    // A reset by the pod reaches the client as a reset, never as a clean end.
    let r = c
        .node(0)
        .client("client-a", &["reset-client", "--to", &format!("{ip}:8082")])
        .unwrap();
    assert_eq!(r["outcome"], "ECONNRESET", "{r}");
    // Every delivery leg's record went with its socket.
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

fn node_raw(c: &TwoNodes, to: &str, text: &str) -> serde_json::Value {
    c.node(0)
        .client(
            "client-a",
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

#[test]
fn authorization_allows_one_caller_denies_another_and_follows_edits() {
    let allow_web = "authorization_policies:\n\
         \x20 - metadata: { name: allow-web, namespace: backend }\n\
         \x20   spec:\n\
         \x20     selector: { matchLabels: { app: echo } }\n\
         \x20     action: ALLOW\n\
         \x20     rules: [ { from: [ { source: { principals: [ cluster.local/ns/shop/sa/web ] } } ] } ]\n";
    let (c, agents) = cluster(&[], allow_web);
    c.wait_mesh(&agents);
    let to = server(&c);
    assert!(
        echo_ok(c.node(0), "client-a", &to, 64 * 1024),
        "web is allowed"
    );
    assert!(
        !echo_ok(c.node(0), "client-x", &to, 64 * 1024),
        "batch is not"
    );
    assert!(decisions(&agents[1], "allow", "backend/allow-web") >= 1);
    // The refusal is counted under the ALLOW policy that applies and did not match.
    assert!(decisions(&agents[1], "deny", "backend/allow-web") >= 1);
    // Outside the mesh (plain text, PERMISSIVE by default): no principal, not allowed.
    assert!(!echo_ok(c.node(0), "legacy", &to, 4096));

    // A DENY on the namespace `shop` for port 8080 wins over the ALLOW, at the next
    // connection.
    let deny_shop = format!(
        "{allow_web}\x20 - metadata: {{ name: deny-shop, namespace: backend }}\n\
         \x20   spec:\n\
         \x20     action: DENY\n\
         \x20     rules: [ {{ from: [ {{ source: {{ namespaces: [ shop ] }} }} ], to: [ {{ operation: {{ ports: [ \"8080\" ] }} }} ] }} ]\n"
    );
    c.write_file(&deny_shop);
    wait_for("the DENY policy in force", Duration::from_secs(10), || {
        !echo_ok(c.node(0), "client-a", &to, 4096)
    });
    assert!(decisions(&agents[1], "deny", "backend/deny-shop") >= 1);
    assert_eq!(firewall_rules(&c.all_netns()), Vec::<String>::new());
}

#[test]
fn strict_refuses_plain_text_from_outside_the_mesh_and_permissive_accepts_it() {
    let (c, agents) = cluster(&[], "");
    c.wait_mesh(&agents);
    let to = server(&c);
    // PERMISSIVE (nothing configured): the plain-text client is captured by TC on node 1
    // and delivered.
    let r = c.node(0).echo("legacy", &to, MIB).unwrap();
    assert_intact(&r, MIB);
    Scrape::of(&agents[1]).expect_at_least(
        "mesh_inbound_connections_total",
        &[("outcome", "delivered")],
        1,
    );

    // An IP block DENY refuses the plain-text client by address.
    let legacy_ip = c.pod("legacy").ip;
    c.write_file(&format!(
            "authorization_policies:\n\
             \x20 - metadata: {{ name: no-legacy, namespace: backend }}\n\
             \x20   spec: {{ action: DENY, rules: [ {{ from: [ {{ source: {{ ipBlocks: [ \"{legacy_ip}/32\" ] }} }} ] }} ] }}\n"
        ),
    );
    wait_for(
        "the IP-block DENY in force",
        Duration::from_secs(10),
        || !echo_ok(c.node(0), "legacy", &to, 4096),
    );
    assert!(
        echo_ok(c.node(0), "client-a", &to, 4096),
        "mesh callers still pass"
    );

    // STRICT on the namespace: plain text refused, mutual TLS accepted.
    c.write_file(
        "peer_authentications:\n\
         \x20 - metadata: { name: strict, namespace: backend }\n\
         \x20   spec: { mtls: { mode: STRICT } }\n",
    );
    // (The IP-block DENY is gone with the edit: the refusal must come from STRICT.)
    wait_for("STRICT in force", Duration::from_secs(10), || {
        !echo_ok(c.node(0), "legacy", &to, 4096)
            && decisions(&agents[1], "deny", "backend/strict") >= 1
    });
    let r = c.node(0).echo("client-a", &to, MIB).unwrap();
    assert_intact(&r, MIB);
    assert_eq!(firewall_rules(&c.all_netns()), Vec::<String>::new());
}

#[test]
fn certificates_rotate_under_live_traffic_and_nothing_is_dropped() {
    // 10 s certificates: renewed about every 5 s, on both nodes.
    let (c, agents) = cluster(&["--workload-cert-ttl", "10s"], "");
    c.wait_mesh(&agents);
    let to = server(&c);
    assert!(echo_ok(c.node(0), "client-a", &to, 4096));
    let serial = |a: &NodeAgent, id: &str| -> String {
        let v: serde_json::Value = serde_json::from_str(&a.get("/certs").unwrap()).unwrap();
        let list = v
            .as_array()
            .cloned()
            .or_else(|| v["certs"].as_array().cloned())
            .unwrap_or_default();
        list.iter()
            .find(|c| c["identity"] == id)
            .map(|c| c["serial"].to_string())
            .unwrap_or_default()
    };
    let web = "spiffe://cluster.local/ns/shop/sa/web";
    let echo = "spiffe://cluster.local/ns/backend/sa/echo";
    let (web0, echo0) = (serial(&agents[0], web), serial(&agents[1], echo));
    assert!(!web0.is_empty() && !echo0.is_empty());
    // Transfers back to back for 12 s: every one intact while certificates turn over
    // (30 s each against a hang: 4 MiB through two debug-build agents can take over 5 s
    // on a loaded machine).
    let start = std::time::Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(12) {
        let r = c
            .node(0)
            .echo_within("client-a", &to, 4 * MIB, 30_000)
            .unwrap();
        assert_intact(&r, 4 * MIB);
        n += 1;
    }
    assert!(n >= 3, "{n} transfers");
    assert_ne!(
        serial(&agents[0], web),
        web0,
        "node 0 renewed web's certificate"
    );
    assert_ne!(
        serial(&agents[1], echo),
        echo0,
        "node 1 renewed echo's certificate"
    );
    // A fresh connection after the renewals still verifies.
    let r = c.node(0).echo("client-a", &to, MIB).unwrap();
    assert_intact(&r, MIB);
}

/// The HTTP server on `server-b` the L7 tests use (the echo server keeps 8080).
const HTTP_PORT: u16 = 8081;

/// The cluster with `policies`, both agents serving server-b, and server-b's HTTP server
/// on `HTTP_PORT` (answering `server`): its address.
fn http_cluster(policies: &str) -> (TwoNodes, Vec<NodeAgent>, String) {
    let (c, agents) = cluster(&[], policies);
    c.wait_mesh(&agents);
    let to = c.serve_http("server-b", HTTP_PORT, "");
    (c, agents, to)
}

/// Connects of `agent`'s node that its datapath let go around the proxy because the proxy
/// looked unable to take them (its heartbeat stale, or not ready): fail-open, as
/// designed, and what a loaded machine can cause (a debug agent not scheduled for a
/// second). A service address, routed nowhere, then fails with "Network is unreachable".
fn bypassed(agent: &NodeAgent) -> u64 {
    agent.event("connect_proxy_stale") + agent.event("connect_proxy_not_ready")
}

/// `get` of `pod` on node 0 (`agent`'s), tried again only when node 0's datapath counted
/// a fail-open meanwhile (`bypassed`): a request that went around the proxy asserts
/// nothing about policy. Any other failure fails the test.
fn get_captured(agent: &NodeAgent, pod: &str, c: &TwoNodes, to: &str) -> (String, String) {
    for _ in 0..5 {
        let before = bypassed(agent);
        let r = c.node(0).get_once(pod, to, "/").unwrap();
        if r.errors != serde_json::json!([]) && bypassed(agent) > before {
            eprintln!("{pod}: the connect went around a proxy that looked stuck ({r:?}); again");
            continue;
        }
        assert_eq!(r.errors, serde_json::json!([]), "GET /: {r:?}");
        return (r.status, r.body);
    }
    panic!("{pod}: every try went around the proxy")
}

/// One `GET path` from `pod`: its status and body.
fn get(node: &ClusterNode, pod: &str, to: &str, path: &str) -> (String, String) {
    let r = node.get_once(pod, to, path).unwrap();
    assert_eq!(r.errors, serde_json::json!([]), "GET {path}: {r:?}");
    (r.status, r.body)
}

/// The status line the server answers a bodiless `method path` with.
fn status_line(node: &ClusterNode, pod: &str, to: &str, method: &str, path: &str) -> String {
    let req = format!(
        "{method} {path} HTTP/1.1\\r\\nhost: server-b\\r\\ncontent-length: 0\\r\\nconnection: close\\r\\n\\r\\n"
    );
    let r = node
        .client(
            pod,
            &["raw", "--to", to, "--send", &req, "--deadline-ms", "10000"],
        )
        .unwrap();
    r["status_line"].as_str().unwrap_or_default().to_owned()
}

fn request_decisions(agent: &NodeAgent, verdict: &str, policy: &str) -> u64 {
    Scrape::of(agent).value(
        "mesh_authz_decisions_total",
        &[
            ("direction", "inbound"),
            ("level", "request"),
            ("verdict", verdict),
            ("policy", policy),
        ],
    )
}

#[test]
fn l7_allow_judges_each_request_arriving_through_the_tunnel() {
    let policy = "authorization_policies:\n\
         \x20 - metadata: { name: get-ok, namespace: backend }\n\
         \x20   spec:\n\
         \x20     selector: { matchLabels: { app: echo } }\n\
         \x20     action: ALLOW\n\
         \x20     rules:\n\
         \x20       - from: [ { source: { principals: [ cluster.local/ns/shop/sa/web ] } } ]\n\
         \x20         to: [ { operation: { methods: [ GET ], paths: [ \"/ok*\" ] } } ]\n";
    let (c, agents, to) = http_cluster(policy);
    let n0 = c.node(0);
    // The policy reaches node 1 with the workloads; the first request may race it.
    wait_for("GET /ok allowed", Duration::from_secs(10), || {
        get(n0, "client-a", &to, "/ok").0 == "200"
    });
    assert_eq!(
        get(n0, "client-a", &to, "/ok/deeper?x=1"),
        ("200".into(), "server".into())
    );
    assert_eq!(
        get(n0, "client-a", &to, "/nope"),
        ("403".into(), "RBAC: access denied".into())
    );
    assert_eq!(
        status_line(n0, "client-a", &to, "POST", "/ok"),
        "HTTP/1.1 403 Forbidden"
    );
    assert_eq!(
        status_line(n0, "client-a", &to, "GET", "/ok"),
        "HTTP/1.1 200 OK"
    );
    // Another identity: no principal match, whatever the request.
    assert_eq!(get(n0, "client-x", &to, "/ok").0, "403");

    assert!(request_decisions(&agents[1], "allow", "backend/get-ok") >= 3);
    // Refusals, whichever policy they are named after.
    let m = Scrape::of(&agents[1]);
    m.expect_at_least(
        "mesh_authz_decisions_total",
        &[("level", "request"), ("verdict", "deny")],
        3,
    );
    m.expect_at_least(
        "mesh_authz_http_connections_total",
        &[("transport", "hbone")],
        5,
    );
    // Through the tunnel, not around it.
    assert!(hbone_streams(&agents[0], "out") >= 5);
    assert_eq!(firewall_rules(&c.all_netns()), Vec::<String>::new());
}

#[test]
fn l7_deny_on_paths_answers_plain_text_clients_per_request() {
    let (c, agents, to) = http_cluster(&deny_admin(Some(HTTP_PORT)));
    let n0 = c.node(0);
    // `legacy` is outside the mesh: plain text, captured by TC on node 1 (PERMISSIVE).
    wait_for("GET /admin denied", Duration::from_secs(10), || {
        get(n0, "legacy", &to, "/admin").0 == "403"
    });
    assert_eq!(
        get(n0, "legacy", &to, "/admin/users"),
        ("403".into(), "RBAC: access denied".into())
    );
    // Dot segments and encoded letters do not get around the rule (the path is judged,
    // and forwarded, normalized).
    assert_eq!(get(n0, "legacy", &to, "/x/../admin").0, "403");
    assert_eq!(get(n0, "legacy", &to, "/%61dmin").0, "403");
    assert_eq!(get(n0, "legacy", &to, "/"), ("200".into(), "server".into()));
    assert_eq!(
        status_line(n0, "legacy", &to, "POST", "/items"),
        "HTTP/1.1 200 OK"
    );
    assert!(request_decisions(&agents[1], "deny", "backend/no-admin") >= 2);
    assert!(request_decisions(&agents[1], "allow", "none") >= 2);
    Scrape::of(&agents[1]).expect_at_least(
        "mesh_authz_http_connections_total",
        &[("transport", "plain")],
        4,
    );
    // The DENY names only the HTTP port: the echo port is still relayed whole.
    assert!(echo_ok(n0, "legacy", &server(&c), 64 * 1024));
    assert_eq!(firewall_rules(&c.all_netns()), Vec::<String>::new());
}

/// Issue 11 item 3, the L7 half: a service with `protocol: http` whose endpoint is a mesh
/// workload of another node, under STRICT mutual TLS there. Node 0's L7 engine picks the
/// endpoint and sends the requests through the HBONE tunnel as the client's identity:
/// node 1 counts the streams in and accepts them, where plain text is refused.
#[test]
fn l7_requests_to_another_nodes_mesh_workload_go_through_the_tunnel_and_pass_strict() {
    const PORT: u16 = 9090;
    let (c, agents) = cluster(&[], "");
    c.write_file(&format!(
        "{}peer_authentications:\n\
             \x20 - metadata: {{ name: strict, namespace: backend }}\n\
             \x20   spec: {{ mtls: {{ mode: STRICT }} }}\n",
        web_api(c.vip(40), PORT)
    ));
    c.serve_http("server-b", PORT, "server-b");
    c.wait_mesh(&agents);
    let n0 = c.node(0);
    // STRICT in force on node 1 before the first request, so every upstream connection
    // node 0 opens is judged under it: plain text from outside the mesh is refused.
    let plain = format!("{}:{PORT}", c.pod("server-b").ip);
    wait_for("STRICT in force", Duration::from_secs(10), || {
        !echo_ok(n0, "legacy", &plain, 4096) && decisions(&agents[1], "deny", "backend/strict") >= 1
    });
    let (out0, in1) = (
        hbone_streams(&agents[0], "out"),
        hbone_streams(&agents[1], "in"),
    );
    let vip = format!("{}:80", c.vip(40));
    let requests = |n: u32| {
        n0.client(
            "client-a",
            &[
                "http-client",
                "--to",
                &vip,
                "--path",
                "/",
                "--requests",
                &n.to_string(),
                "--deadline-ms",
                "10000",
            ],
        )
        .unwrap()
    };
    // The service may reach node 0 after the workloads: the first request may race it.
    wait_for("the HTTP service in force", Duration::from_secs(10), || {
        requests(1)["bodies"] == serde_json::json!({ "server-b": 1 })
    });
    let r = requests(20);
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    assert_eq!(r["bodies"], serde_json::json!({ "server-b": 20 }), "{r}");
    // Node 0's L7 engine answered them...
    let m = agents[0].get("/metrics").unwrap();
    assert!(
        metric(
            &m,
            "mesh_requests_total",
            &[
                ("source_workload", "shop/client-a"),
                ("response_code", "200")
            ]
        ) >= 21,
        "{m}"
    );
    // ...through the tunnel: upstream connections are kept alive, so at least one stream
    // and at most one per request, each accepted by node 1's in-pod listener.
    let out = hbone_streams(&agents[0], "out") - out0;
    let inn = hbone_streams(&agents[1], "in") - in1;
    assert!((1..=21).contains(&out), "{out} streams out");
    assert!(inn >= 1, "{inn} streams in");
    assert_eq!(firewall_rules(&c.all_netns()), Vec::<String>::new());
}

/// A peer that cannot prove the identity the caller expects is refused, whichever way it
/// fails: its certificate chains to another root, or names another identity.
#[test]
fn a_node_with_a_foreign_root_or_the_wrong_identity_is_refused() {
    let to_echo = |c: &TwoNodes| server(c);
    // Node 1's agent signs with a root of its own: node 0 cannot verify it (and node 1
    // cannot verify node 0's client certificate).
    {
        let c = pods();
        c.write_file("");
        let foreign = c.node(1).dir.join("foreign-ca");
        let out = std::process::Command::new(mesh_tests::agent_bin())
            .args(["ca", "init", "--dir"])
            .arg(&foreign)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let a0 = c.node(0).start_agent(&[]).unwrap();
        let a1 = c
            .node(1)
            .start_agent(&["--ca-dir", &foreign.display().to_string()])
            .unwrap();
        let agents = vec![a0, a1];
        c.wait_mesh(&agents);
        assert!(
            !echo_ok(c.node(0), "client-a", &to_echo(&c), 4096),
            "a peer of a foreign root was trusted"
        );
        assert!(hbone_streams(&agents[0], "out_failed") >= 1);
        assert_eq!(hbone_streams(&agents[1], "in"), 0);
    }
    // Node 1 believes server-b runs as `impostor`; node 0 expects `echo`.
    {
        let c = pods();
        let impostor = Member {
            service_account: "impostor",
            ..SERVER_B
        };
        c.node(0).write_config(&c.file("")).unwrap();
        c.node(1)
            .write_config(&c.file_of(&[CLIENT_A, CLIENT_X, LEGACY, impostor], ""))
            .unwrap();
        let agents = c.start_agents(&[]);
        c.wait_workload(&agents[..1], SERVER_B);
        c.wait_workload(&agents[1..], impostor);
        assert!(
            !echo_ok(c.node(0), "client-a", &to_echo(&c), 4096),
            "a peer presenting the wrong identity was trusted"
        );
        assert!(hbone_streams(&agents[0], "out_failed") >= 1);
        assert_eq!(hbone_streams(&agents[1], "in"), 0);
        let certs1 = agents[1].get("/certs").unwrap();
        assert!(
            certs1.contains("spiffe://cluster.local/ns/backend/sa/impostor"),
            "{certs1}"
        );
    }
}

/// ipBlocks see the source pod's address across nodes, as in Istio ambient: the sending
/// agent names it in the CONNECT (`Forwarded: for=`, ztunnel's header) and the receiving
/// agent believes it because the tunnel's identity owns that address. A node that names
/// an address its tunnel's identity does not own is not believed: the connection is then
/// judged by the sending node's address.
#[test]
fn ip_blocks_see_the_source_pod_across_nodes_and_forged_sources_are_not_believed() {
    let c = pods();
    let policy = |c: &TwoNodes| {
        format!(
            "authorization_policies:\n\
             \x20 - metadata: {{ name: only-a, namespace: backend }}\n\
             \x20   spec: {{ selector: {{ matchLabels: {{ app: echo }} }}, action: ALLOW, rules: [ {{ from: [ {{ source: {{ ipBlocks: [ \"{}/32\" ] }} }} ] }} ] }}\n",
            c.pod("client-a").ip
        )
    };
    c.write_file(&policy(&c));
    let agents = c.start_agents(&[]);
    c.wait_mesh(&agents);
    let to = server(&c);
    // client-a and client-x share node 0 (one node address): only client-a's /32 passes.
    wait_for(
        "the IP-block ALLOW in force",
        Duration::from_secs(10),
        || !echo_ok(c.node(0), "client-x", &to, 4096),
    );
    let r = c.node(0).echo("client-a", &to, MIB).unwrap();
    assert_intact(&r, MIB);
    assert!(!echo_ok(c.node(0), "client-x", &to, 4096));
    assert!(decisions(&agents[1], "allow", "backend/only-a") >= 1);
    assert!(decisions(&agents[1], "deny", "backend/only-a") >= 1);
    let forwarded = |outcome: &str| forwarded_sources(&agents[1], outcome);
    assert!(
        forwarded("trusted") >= 2,
        "both callers named their address"
    );
    assert_eq!(forwarded("untrusted"), 0);
    // Both went through the tunnel: client-a's stream opened; client-x's were refused by
    // node 1 (the deny decisions above), which the sender counts as failed to open.
    assert!(hbone_streams(&agents[0], "out") >= 1);
    assert!(hbone_streams(&agents[0], "out_failed") >= 1);

    // Node 0 now claims client-a runs as `batch` (node 1 knows it runs as `web`): its
    // tunnel for client-a proves `batch` and names client-a's address, which no `batch`
    // workload has. Not believed: judged by node 0's address, the /32 no longer matches.
    let lying = c
        .file(&policy(&c))
        .replace("service_account: web,", "service_account: batch,");
    assert!(!lying.contains("service_account: web,"));
    c.node(0).write_config(&lying).unwrap();
    wait_for("the forged source refused", Duration::from_secs(15), || {
        !echo_ok(c.node(0), "client-a", &to, 4096) && forwarded("untrusted") >= 1
    });
    let log = agents[1].log_text();
    assert!(log.contains("tunnel source address not believed"), "{log}");
    assert!(decisions(&agents[1], "deny", "backend/only-a") >= 2);
    assert_eq!(firewall_rules(&c.all_netns()), Vec::<String>::new());
}

/// The L7 engine's tunnels name their source too: a service with `protocol: http` on
/// node 0 picks server-b (node 1) and sends client-a's requests through a tunnel that
/// names client-a's address (`Forwarded: for=`), so node 1's ipBlocks ALLOW for
/// client-a's `/32` admits them and refuses client-x, its neighbour on the same node
/// (same node address): judged by the node's address, both would be refused.
#[test]
fn ip_blocks_see_the_source_pod_of_requests_the_l7_engine_tunnels() {
    const PORT: u16 = 9091;
    let c = pods();
    let text = format!(
        "{}authorization_policies:\n\
         \x20 - metadata: {{ name: only-a, namespace: backend }}\n\
         \x20   spec: {{ selector: {{ matchLabels: {{ app: echo }} }}, action: ALLOW, rules: [ {{ from: [ {{ source: {{ ipBlocks: [ \"{}/32\" ] }} }} ] }} ] }}\n",
        web_api(c.vip(41), PORT),
        c.pod("client-a").ip
    );
    c.write_file(&text);
    c.serve_http("server-b", PORT, "server-b");
    let agents = c.start_agents(&[]);
    c.wait_mesh(&agents);
    let vip = format!("{}:80", c.vip(41));
    // The service may reach node 0 after the workloads: the first requests may race it.
    wait_for("the HTTP service in force", Duration::from_secs(10), || {
        get_captured(&agents[0], "client-a", &c, &vip).1 == "server-b"
    });
    let forwarded = |outcome: &str| forwarded_sources(&agents[1], outcome);
    let trusted = forwarded("trusted");
    for _ in 0..3 {
        assert_eq!(
            get_captured(&agents[0], "client-a", &c, &vip),
            ("200".to_owned(), "server-b".to_owned())
        );
        let (status, _) = get_captured(&agents[0], "client-x", &c, &vip);
        assert_ne!(status, "200", "client-x passed an ALLOW for client-a's /32");
    }
    // Node 0's L7 engine answered both (client-x's with the tunnel's refusal)...
    let m = agents[0].get("/metrics").unwrap();
    for source in ["shop/client-a", "shop/client-x"] {
        assert!(
            metric(&m, "mesh_requests_total", &[("source_workload", source)]) >= 3,
            "{source}: {m}"
        );
    }
    // ...and node 1 believed the address each tunnel named, and judged by it.
    assert!(forwarded("trusted") > trusted, "no source named");
    assert_eq!(forwarded("untrusted"), 0);
    assert!(decisions(&agents[1], "allow", "backend/only-a") >= 1);
    assert!(decisions(&agents[1], "deny", "backend/only-a") >= 1);
    assert_eq!(firewall_rules(&c.all_netns()), Vec::<String>::new());
}

/// A WebSocket-like server in server-b's network namespace (run by the test, not in the
/// pod's cgroup, which inbound delivery does not need): answers an upgrade request `101`,
/// then echoes until the client's end and closes. The request heads it received are
/// kept, lower-cased. Stops when dropped.
struct UpgradeServer {
    heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl UpgradeServer {
    fn start(c: &TwoNodes, port: u16) -> UpgradeServer {
        use std::io::{Read, Write};
        let netns = c.pod("server-b").netns_path();
        let l = mesh_tests::cluster::in_netns(std::path::Path::new(&netns), || {
            std::net::TcpListener::bind(("0.0.0.0", port)).expect("bind in server-b")
        });
        l.set_nonblocking(true).unwrap();
        let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (seen, halt) = (heads.clone(), stop.clone());
        std::thread::spawn(move || {
            while !halt.load(std::sync::atomic::Ordering::Relaxed) {
                let mut s = match l.accept() {
                    Ok((s, _)) => s,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                };
                let seen = seen.clone();
                std::thread::spawn(move || {
                    s.set_nonblocking(false).unwrap();
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if s.read(&mut b).unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(b[0]);
                    }
                    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    seen.lock().unwrap().push(head.clone());
                    if !head.contains("upgrade: websocket") {
                        let _ = s.write_all(
                            b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 0\r\n\r\n",
                        );
                        return;
                    }
                    s.write_all(
                        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
                    )
                    .unwrap();
                    let mut r = s.try_clone().unwrap();
                    let _ = std::io::copy(&mut r, &mut s);
                    let _ = s.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        UpgradeServer { heads, stop }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

impl Drop for UpgradeServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The WebSocket client run in a pod (python: podtool has none): an upgrade request for
/// `path`, then, after a `101`, `bytes` sent while the echo is read back to its end.
const UPGRADE_CLIENT: &str = r#"
import json, socket, sys, threading
host, port = sys.argv[1].rsplit(":", 1)
path, n = sys.argv[2], int(sys.argv[3])
s = socket.create_connection((host, int(port)), timeout=10)
s.sendall(("GET %s HTTP/1.1\r\nhost: server-b\r\nconnection: Upgrade\r\nupgrade: websocket\r\n"
           "sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           "x-forwarded-for: 192.0.2.1\r\n\r\n" % path).encode())
head = b""
while not head.endswith(b"\r\n\r\n"):
    b = s.recv(1)
    if not b:
        break
    head += b
out = {"status": head.split(b"\r\n")[0].decode(errors="replace")}
if out["status"].startswith("HTTP/1.1 101"):
    data = bytes((i * 7) % 251 for i in range(n))
    def send():
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=send)
    t.start()
    back = []
    while True:
        b = s.recv(65536)
        if not b:
            break
        back.append(b)
    t.join()
    back = b"".join(back)
    out.update(received=len(back), intact=back == data)
print(json.dumps(out))
"#;

fn upgrade_client(
    node: &ClusterNode,
    pod: &str,
    to: &str,
    path: &str,
    bytes: u64,
) -> serde_json::Value {
    let python = std::env::var_os("MESH_PYTHON").unwrap_or_else(|| "python3".into());
    let out = node
        .pod_command(pod, std::path::Path::new(&python))
        .args(["-c", UPGRADE_CLIENT, to, path, &bytes.to_string()])
        .output()
        .expect("python in the pod");
    assert!(
        out.status.success(),
        "the upgrade client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the upgrade client's JSON")
}

/// HTTP upgrades on a port the destination serves as HTTP for an L7 policy: a WebSocket
/// upgrade that passes policy is forwarded to the pod and, after its `101`, both
/// connections are spliced (1 MiB each way intact), through the tunnel and from plain
/// text alike; a denied one gets `403` and never reaches the pod. The pod sees the
/// source the agent judged in `x-forwarded-for`, not the client's claim.
#[test]
fn websocket_upgrades_pass_l7_policy_and_are_spliced_both_ways() {
    const PORT: u16 = 8082;
    let c = pods();
    c.write_file(&deny_admin(None));
    let server = UpgradeServer::start(&c, PORT);
    let agents = c.start_agents(&[]);
    c.wait_mesh(&agents);
    let n0 = c.node(0);
    let to = format!("{}:{PORT}", c.pod("server-b").ip);
    wait_for("the L7 policy in force", Duration::from_secs(10), || {
        upgrade_client(n0, "client-a", &to, "/admin", 0)["status"]
            .as_str()
            .is_some_and(|s| s.starts_with("HTTP/1.1 403"))
    });
    let in1 = hbone_streams(&agents[1], "in");
    // Through the tunnel (client-a is in the mesh), then plain text (legacy is not).
    for pod in ["client-a", "legacy"] {
        let r = upgrade_client(n0, pod, &to, "/chat", MIB);
        assert_eq!(
            r["status"], "HTTP/1.1 101 Switching Protocols",
            "{pod}: {r}"
        );
        assert_eq!(r["received"].as_u64(), Some(MIB), "{pod}: {r}");
        assert_eq!(r["intact"], true, "{pod}: {r}");
        let r = upgrade_client(n0, pod, &to, "/admin/ws", MIB);
        assert!(
            r["status"]
                .as_str()
                .unwrap_or_default()
                .starts_with("HTTP/1.1 403"),
            "{pod}: {r}"
        );
        assert!(r["received"].is_null(), "{pod}: {r}");
    }
    assert!(
        hbone_streams(&agents[1], "in") > in1,
        "client-a's went through the tunnel"
    );
    // The pod saw both allowed upgrades and none of the denied ones, each with the
    // source node 1 judged (the tunnel's believed `Forwarded: for=`, or the plain
    // client's address) and not the client's `x-forwarded-for`.
    let heads = server.heads();
    assert_eq!(heads.len(), 2, "{heads:#?}");
    for (head, pod) in heads.iter().zip(["client-a", "legacy"]) {
        assert!(head.starts_with("get /chat http/1.1"), "{head}");
        assert!(head.contains("upgrade: websocket"), "{head}");
        let xff = format!("x-forwarded-for: {}\r\n", c.pod(pod).ip);
        assert!(head.contains(&xff), "{pod}: {head}");
        assert!(!head.contains("192.0.2.1"), "{head}");
    }
    assert!(request_decisions(&agents[1], "deny", "backend/no-admin") >= 2);
    assert_eq!(firewall_rules(&c.all_netns()), Vec::<String>::new());
}
