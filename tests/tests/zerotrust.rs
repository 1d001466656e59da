//! Zero trust across nodes (issue 11) on a simulated two-node cluster
//! (`mesh_tests::cluster`, docs/multinode.md): identities from the cluster's CA, the
//! HBONE tunnel between nodes, inbound capture with TC, and Istio's AuthorizationPolicy
//! and PeerAuthentication enforced at the destination node.
//!
//! Node 0 runs `client-a` (namespace `shop`, service account `web`), `client-x` (`shop`,
//! service account `batch`) and `legacy` (namespace `legacy`, not in the mesh); node 1
//! runs `server-b` (namespace `backend`, enrolled with Istio's own label, service
//! account `echo`, label `app: echo`) with an echo server on 8080. Both nodes read the
//! same file: every workload with its `node:`, and the policies under test.

use mesh_tests::{
    cluster::{contains, Capture, ClusterNode, SimCluster},
    firewall_rules, metric, wait_for,
};
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn cluster(
    extra_args: &[&str],
    policies: &str,
) -> (SimCluster, Vec<mesh_tests::cluster::NodeAgent>) {
    let c = pods();
    write_config(&c, policies);
    let agents = (0..2)
        .map(|i| c.node(i).start_agent(extra_args).expect("agent"))
        .collect();
    (c, agents)
}

/// The cluster and its pods (echo server running), no agent yet.
fn pods() -> SimCluster {
    let mut c = SimCluster::new(2).expect("sim cluster");
    c.add_pod(0, "client-a", 2).unwrap();
    c.add_pod(0, "client-x", 3).unwrap();
    c.add_pod(0, "legacy", 4).unwrap();
    c.add_pod(1, "server-b", 2).unwrap();
    c.node(1)
        .serve("server-b", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    c
}

/// The one file both nodes read: all workloads, the policies given.
fn write_config(c: &SimCluster, policies: &str) {
    let yaml = config_text(c, policies, "echo");
    for i in 0..2 {
        c.node(i).write_config(&yaml).unwrap();
    }
}

/// The file's text, with `server_sa` as server-b's service account.
fn config_text(c: &SimCluster, policies: &str, server_sa: &str) -> String {
    let mut yaml = "namespaces:\n\
                    \x20 - { name: shop, labels: { mesh-agent.io/dataplane-mode: ambient } }\n\
                    \x20 - { name: backend, labels: { istio.io/dataplane-mode: ambient } }\n\
                    \x20 - { name: legacy }\nworkloads:\n"
        .to_owned();
    for (pod, ns, sa, labels) in [
        ("client-a", "shop", "web", "{}"),
        ("client-x", "shop", "batch", "{}"),
        ("legacy", "legacy", "default", "{}"),
        ("server-b", "backend", server_sa, "{ app: echo }"),
    ] {
        let p = c.pod(pod);
        yaml += &format!(
            "  - {{ name: {pod}, namespace: {ns}, ip: {}, netns: {}, node: {}, service_account: {sa}, labels: {labels} }}\n",
            p.ip,
            p.netns_path(),
            c.node_of(pod).name()
        );
    }
    yaml += policies;
    yaml
}

fn server(c: &SimCluster) -> String {
    format!("{}:8080", c.pod("server-b").ip)
}

fn echo_ok(node: &ClusterNode, pod: &str, to: &str, bytes: u64) -> bool {
    node.echo(pod, to, bytes)
        .map(|r| r["errors"] == serde_json::json!([]) && r["intact"] == 1)
        .unwrap_or(false)
}

fn assert_intact(r: &serde_json::Value, bytes: u64) {
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    assert_eq!(r["intact"], 1, "{r}");
    assert_eq!(r["received"].as_u64(), Some(bytes), "{r}");
    assert_eq!(r["sha_sent"], r["sha_received"], "{r}");
}

fn hbone_streams(agent: &mesh_tests::cluster::NodeAgent, direction: &str) -> u64 {
    let m = agent.get("/metrics").unwrap();
    metric(&m, "mesh_hbone_streams_total", &[("direction", direction)])
}

fn decisions(agent: &mesh_tests::cluster::NodeAgent, verdict: &str, policy: &str) -> u64 {
    let m = agent.get("/metrics").unwrap();
    metric(
        &m,
        "mesh_authz_decisions_total",
        &[
            ("direction", "inbound"),
            ("verdict", verdict),
            ("policy", policy),
        ],
    )
}

/// Waits until both agents serve the workloads of the file (the tunnel needs them).
fn wait_mesh(c: &SimCluster, agents: &[mesh_tests::cluster::NodeAgent]) {
    let ip = c.pod("server-b").ip.to_string();
    for a in agents {
        wait_for("the workloads in force", Duration::from_secs(10), || {
            a.get("/config_dump")
                .map(|d| d.contains(&ip) && d.contains("spiffe://cluster.local/ns/backend/sa/echo"))
                .unwrap_or(false)
        });
    }
}

#[test]
fn cross_node_traffic_travels_in_mutual_tls_and_arrives_intact() {
    let (c, agents) = cluster(&[], "");
    wait_mesh(&c, &agents);
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
        .client(
            "client-a",
            &[
                "echo-client",
                "--to",
                &to,
                "--bytes",
                &(16 * MIB).to_string(),
                "--deadline-ms",
                "30000",
            ],
        )
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

#[test]
fn authorization_allows_one_caller_denies_another_and_follows_edits() {
    let allow_web = "authorization_policies:\n\
         \x20 - metadata: { name: allow-web, namespace: backend }\n\
         \x20   spec:\n\
         \x20     selector: { matchLabels: { app: echo } }\n\
         \x20     action: ALLOW\n\
         \x20     rules: [ { from: [ { source: { principals: [ cluster.local/ns/shop/sa/web ] } } ] } ]\n";
    let (c, agents) = cluster(&[], allow_web);
    wait_mesh(&c, &agents);
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
    write_config(&c, &deny_shop);
    wait_for("the DENY policy in force", Duration::from_secs(10), || {
        !echo_ok(c.node(0), "client-a", &to, 4096)
    });
    assert!(decisions(&agents[1], "deny", "backend/deny-shop") >= 1);
    assert_eq!(firewall_rules(&c.all_netns()), Vec::<String>::new());
}

#[test]
fn strict_refuses_plain_text_from_outside_the_mesh_and_permissive_accepts_it() {
    let (c, agents) = cluster(&[], "");
    wait_mesh(&c, &agents);
    let to = server(&c);
    // PERMISSIVE (nothing configured): the plain-text client is captured by TC on node 1
    // and delivered.
    let r = c.node(0).echo("legacy", &to, MIB).unwrap();
    assert_intact(&r, MIB);
    let m = agents[1].get("/metrics").unwrap();
    assert!(
        metric(
            &m,
            "mesh_inbound_connections_total",
            &[("outcome", "delivered")]
        ) >= 1
    );

    // An IP block DENY refuses the plain-text client by address.
    let legacy_ip = c.pod("legacy").ip;
    write_config(
        &c,
        &format!(
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
    write_config(
        &c,
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
    wait_mesh(&c, &agents);
    let to = server(&c);
    assert!(echo_ok(c.node(0), "client-a", &to, 4096));
    let serial = |a: &mesh_tests::cluster::NodeAgent, id: &str| -> String {
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
    // Transfers back to back for 12 s: every one intact while certificates turn over.
    let start = std::time::Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(12) {
        let r = c.node(0).echo("client-a", &to, 4 * MIB).unwrap();
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

fn serve_http(c: &SimCluster) -> String {
    c.node(1)
        .serve(
            "server-b",
            &["http", "--listen", &format!("0.0.0.0:{HTTP_PORT}")],
        )
        .unwrap();
    format!("{}:{HTTP_PORT}", c.pod("server-b").ip)
}

/// One `GET path` from `pod`: its status and body.
fn get(node: &ClusterNode, pod: &str, to: &str, path: &str) -> (String, String) {
    let r = node
        .client(
            pod,
            &[
                "http-client",
                "--to",
                to,
                "--path",
                path,
                "--deadline-ms",
                "10000",
            ],
        )
        .unwrap();
    assert_eq!(r["errors"], serde_json::json!([]), "GET {path}: {r}");
    let one = |k: &str| {
        r[k].as_object()
            .and_then(|m| m.keys().next().cloned())
            .unwrap_or_default()
    };
    (one("status"), one("bodies"))
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

fn request_decisions(agent: &mesh_tests::cluster::NodeAgent, verdict: &str, policy: &str) -> u64 {
    let m = agent.get("/metrics").unwrap();
    metric(
        &m,
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
    let (c, agents) = cluster(&[], policy);
    wait_mesh(&c, &agents);
    let to = serve_http(&c);
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
    let m = agents[1].get("/metrics").unwrap();
    let denied = metric(
        &m,
        "mesh_authz_decisions_total",
        &[("level", "request"), ("verdict", "deny")],
    );
    assert!(denied >= 3, "{denied} requests denied");
    assert!(
        metric(
            &m,
            "mesh_authz_http_connections_total",
            &[("transport", "hbone")]
        ) >= 5
    );
    // Through the tunnel, not around it.
    assert!(hbone_streams(&agents[0], "out") >= 5);
    assert_eq!(firewall_rules(&c.all_netns()), Vec::<String>::new());
}

#[test]
fn l7_deny_on_paths_answers_plain_text_clients_per_request() {
    let policy = format!(
        "authorization_policies:\n\
         \x20 - metadata: {{ name: no-admin, namespace: backend }}\n\
         \x20   spec:\n\
         \x20     selector: {{ matchLabels: {{ app: echo }} }}\n\
         \x20     action: DENY\n\
         \x20     rules: [ {{ to: [ {{ operation: {{ paths: [ \"/admin*\" ], ports: [ \"{HTTP_PORT}\" ] }} }} ] }} ]\n"
    );
    let (c, agents) = cluster(&[], &policy);
    wait_mesh(&c, &agents);
    let to = serve_http(&c);
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
    let m = agents[1].get("/metrics").unwrap();
    assert!(
        metric(
            &m,
            "mesh_authz_http_connections_total",
            &[("transport", "plain")]
        ) >= 4
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
    write_config(
        &c,
        &format!(
            "services:\n\
             \x20 - name: web-api\n\
             \x20   namespace: backend\n\
             \x20   vip: {}\n\
             \x20   ports: [ {{ port: 80, target_port: {PORT}, protocol: http }} ]\n\
             \x20   selector: {{ app: echo }}\n\
             peer_authentications:\n\
             \x20 - metadata: {{ name: strict, namespace: backend }}\n\
             \x20   spec: {{ mtls: {{ mode: STRICT }} }}\n",
            c.vip(40)
        ),
    );
    c.node(1)
        .serve(
            "server-b",
            &[
                "http",
                "--listen",
                &format!("0.0.0.0:{PORT}"),
                "--name",
                "server-b",
            ],
        )
        .unwrap();
    wait_mesh(&c, &agents);
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
    let to_echo = |c: &SimCluster| server(c);
    // Node 1's agent signs with a root of its own: node 0 cannot verify it (and node 1
    // cannot verify node 0's client certificate).
    {
        let c = pods();
        write_config(&c, "");
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
        wait_mesh(&c, &agents);
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
        c.node(0)
            .write_config(&config_text(&c, "", "echo"))
            .unwrap();
        c.node(1)
            .write_config(&config_text(&c, "", "impostor"))
            .unwrap();
        let agents: Vec<_> = (0..2)
            .map(|i| c.node(i).start_agent(&[]).unwrap())
            .collect();
        let ip = c.pod("server-b").ip.to_string();
        for a in &agents {
            wait_for("the workloads in force", Duration::from_secs(10), || {
                a.get("/config_dump")
                    .map(|d| d.contains(&ip))
                    .unwrap_or(false)
            });
        }
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
