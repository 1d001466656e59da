//! End-to-end tests on a simulated cluster (issue 11, item 1): two nodes, each a network
//! namespace with its own agent, cgroup subtree, pins and pod bridge, joined by an
//! underlay with routes between the pod ranges (`mesh_tests::cluster`,
//! docs/multinode.md).

use mesh_tests::flows::assert_intact;
use mesh_tests::{
    cluster::{ClusterNode, SimCluster},
    firewall_rules, metric, wait_for, HEARTBEAT_DEFAULT,
};
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// Node 0 ("a") and node 1 ("b"), each with `client-<x>` (namespace `shop`, enrolled) and
/// `server-<x>` (namespace `backend`, echo on 8080). Services: `echo-a` at vip(10):80 and
/// `echo-b` at vip(11):80, each with its node's server as the endpoint.
fn cluster() -> SimCluster {
    let mut c = SimCluster::new(2).expect("sim cluster");
    for (id, x) in [(0, "a"), (1, "b")] {
        c.add_pod(id, &format!("client-{x}"), 2).unwrap();
        c.add_pod(id, &format!("server-{x}"), 3).unwrap();
    }
    for id in 0..2 {
        c.node(id).write_config(&config(&c, id)).unwrap();
    }
    for x in ["a", "b"] {
        c.node_of(&format!("server-{x}"))
            .serve(
                &format!("server-{x}"),
                &["echo", "--listen", "0.0.0.0:8080"],
            )
            .unwrap();
    }
    c
}

/// Node `id`'s enrolment file: its own pods as workloads, every service of the mesh.
fn config(c: &SimCluster, id: usize) -> String {
    let mut yaml = "namespaces:\n\
                    \x20 - { name: shop, labels: { mesh-agent.io/dataplane-mode: ambient } }\n\
                    \x20 - { name: backend }\nworkloads:\n"
        .to_owned();
    for p in &c.node(id).pods {
        let ns = if p.name.starts_with("client") {
            "shop"
        } else {
            "backend"
        };
        yaml += &format!(
            "  - {{ name: {}, namespace: {ns}, ip: {}, netns: {} }}\n",
            p.name,
            p.ip,
            p.netns_path()
        );
    }
    yaml += "services:\n";
    for (x, host) in [("a", 10), ("b", 11)] {
        yaml += &format!(
            "  - name: echo-{x}\n    namespace: backend\n    vip: {}\n    \
             ports: [ {{ port: 80, target_port: 8080, protocol: tcp }} ]\n    \
             endpoints: [ {{ ip: {}, port: 8080 }} ]\n",
            c.vip(host),
            c.pod(&format!("server-{x}")).ip
        );
    }
    yaml
}

/// Connections a node's proxy opened for `src` to `dst` (`ip:port` as the client dialled).
fn proxied(metrics: &str, src: &str, dst: &str) -> u64 {
    metric(
        metrics,
        "mesh_tcp_connections_opened_total",
        &[("source_workload", src), ("destination_address", dst)],
    )
}

fn server(c: &SimCluster, x: &str) -> String {
    format!("{}:8080", c.pod(&format!("server-{x}")).ip)
}

#[test]
fn cross_node_flows_by_pod_ip_and_vip_pass_the_source_nodes_proxy() {
    let c = cluster();
    let (a, b) = (c.node(0), c.node(1));
    let agent_a = a.start_agent(&[]).unwrap();
    let agent_b = b.start_agent(&[]).unwrap();
    let to_b = server(&c, "b");
    let vip_b = format!("{}:80", c.vip(11));

    // Node a's enrolled pod to node b's pod by pod IP, then by the service address (routed
    // nowhere: only node a's proxy can resolve it). The proxy labels a flow with the
    // address it dialled, so both count under node b's pod.
    let labels = [
        ("source_workload", "shop/client-a"),
        ("destination_address", to_b.as_str()),
    ];
    for (n, dst) in [(1, &to_b), (2, &vip_b)] {
        assert_intact(&a.echo("client-a", dst, MIB).unwrap(), MIB);
        let m = agent_a.get("/metrics").unwrap();
        assert_eq!(proxied(&m, "shop/client-a", &to_b), n, "{dst}:\n{m}");
        for bytes in ["mesh_tcp_sent_bytes_total", "mesh_tcp_received_bytes_total"] {
            assert!(metric(&m, bytes, &labels) >= n * MIB, "{dst}:\n{m}");
        }
    }
    // Node b's agent proxies its own pods only: it never saw those two.
    let mb = agent_b.get("/metrics").unwrap();
    assert_eq!(proxied(&mb, "shop/client-a", &to_b), 0, "{mb}");

    // And the other way round, through node b's proxy only.
    let to_a = server(&c, "a");
    assert_intact(&b.echo("client-b", &to_a, MIB).unwrap(), MIB);
    assert_eq!(
        proxied(&agent_b.get("/metrics").unwrap(), "shop/client-b", &to_a),
        1
    );
    assert_eq!(
        proxied(&agent_a.get("/metrics").unwrap(), "shop/client-b", &to_a),
        0
    );
}

/// Snapshot of what node `n`'s agent holds in the kernel: its pins and the decoded
/// entries of its enrolment and configuration maps.
fn kernel_state(n: &ClusterNode, agent: &mesh_tests::cluster::NodeAgent) -> String {
    let mut state = format!(
        "pins: {:?}\nprograms: {:?}\n",
        n.pins(),
        n.cgroup_programs().unwrap()
    );
    let maps = agent.cli(&["maps", "-o", "json"]);
    assert!(
        maps.status.success(),
        "{}",
        String::from_utf8_lossy(&maps.stderr)
    );
    let maps: serde_json::Value = serde_json::from_slice(&maps.stdout).unwrap();
    for m in maps.as_array().expect("a list of maps") {
        let name = m["name"].as_str().expect("map name");
        // Counters and per-connection maps move on their own; the rest is configuration.
        if ["STATS", "PROXY_HEALTH"].contains(&name)
            || m["type"]
                .as_str()
                .is_some_and(|t| t.contains("Sock") || t.contains("Lru"))
        {
            continue;
        }
        let out = agent.cli(&["dump", name, "-o", "json"]);
        state += &format!("{name}: {}\n", String::from_utf8_lossy(&out.stdout));
    }
    state
}

#[test]
fn each_nodes_agent_is_independent() {
    let c = cluster();
    let (a, b) = (c.node(0), c.node(1));
    let agent_a = a.start_agent(&[]).unwrap();
    let mut agent_b = b.start_agent(&[]).unwrap();
    let (to_a, to_b) = (server(&c, "a"), server(&c, "b"));
    assert!(!a.pins().is_empty() && !b.pins().is_empty());
    assert!(!a.cgroup_programs().unwrap().is_empty());
    assert!(!b.cgroup_programs().unwrap().is_empty());
    // Both capture before.
    assert_intact(&b.echo("client-b", &to_a, 65536).unwrap(), 65536);
    assert_eq!(
        proxied(&agent_b.get("/metrics").unwrap(), "shop/client-b", &to_a),
        1
    );
    let before = kernel_state(a, &agent_a);

    let (status, log) = agent_b.stop();
    assert_eq!(status, Some(0), "{log}");
    assert!(b.pins().is_empty(), "node b's agent removes its own pins");
    assert_eq!(b.cgroup_programs().unwrap(), Vec::<String>::new());

    // Node a: same pins, same programs, same map contents, still ready.
    assert_eq!(kernel_state(a, &agent_a), before);
    assert!(agent_a.get("/ready").unwrap().starts_with("ready"));

    // Node a still captures its pod's flow to node b, which arrives.
    assert_intact(&a.echo("client-a", &to_b, MIB).unwrap(), MIB);
    assert_eq!(
        proxied(&agent_a.get("/metrics").unwrap(), "shop/client-a", &to_b),
        1
    );
    // Node b's enrolled pod is no longer captured (nothing attached, fail-open): its
    // connection goes straight to node a's pod. Were it still sent to node b's proxy
    // address, nothing would listen there.
    assert_intact(&b.echo("client-b", &to_a, MIB).unwrap(), MIB);
    assert_eq!(
        proxied(&agent_a.get("/metrics").unwrap(), "shop/client-b", &to_a),
        0
    );
}

/// A killed agent leaves its programs attached and its maps pinned (for the next agent
/// to adopt); its node's pods then fail open once its heartbeat is stale, and the other
/// node is not affected.
#[test]
fn a_killed_agent_fails_open_on_its_node_only() {
    let c = cluster();
    let (a, b) = (c.node(0), c.node(1));
    let agent_a = a.start_agent(&[]).unwrap();
    // The agent's own 1 s timeout (the harness gives agents a longer one).
    let mut agent_b = b.start_agent(&HEARTBEAT_DEFAULT).unwrap();
    let (to_a, to_b) = (server(&c, "a"), server(&c, "b"));
    let before = kernel_state(a, &agent_a);
    let stale = agent_b.stat("connect_proxy_stale");

    agent_b.kill();
    // Past the 1 s heartbeat timeout.
    std::thread::sleep(Duration::from_millis(1100));
    let r = b.echo("client-b", &to_a, 65536).unwrap();
    assert_intact(&r, 65536);
    assert_eq!(
        agent_b.stat("connect_proxy_stale") - stale,
        1,
        "node b's datapath sent it direct"
    );
    assert_eq!(kernel_state(a, &agent_a), before);
    assert!(agent_a.get("/ready").unwrap().starts_with("ready"));
    assert_intact(&a.echo("client-a", &to_b, 65536).unwrap(), 65536);
    wait_for("node a's proxy to count it", Duration::from_secs(2), || {
        proxied(&agent_a.get("/metrics").unwrap(), "shop/client-a", &to_b) == 1
    });
}

#[test]
fn no_firewall_rules_in_any_node() {
    let c = cluster();
    let (a, b) = (c.node(0), c.node(1));
    let _agent_a = a.start_agent(&[]).unwrap();
    let _agent_b = b.start_agent(&[]).unwrap();
    assert_intact(
        &a.echo_once("client-a", &format!("{}:80", c.vip(11)))
            .unwrap(),
        4096,
    );
    assert_intact(&b.echo_once("client-b", &server(&c, "a")).unwrap(), 4096);
    // The check must be able to see rules: both tools are there and work in a netns.
    for tool in ["iptables-save", "nft list ruleset"] {
        mesh_tests::sh(&format!("ip netns exec {} {tool}", a.netns))
            .unwrap_or_else(|e| panic!("{tool} cannot run in a node netns: {e}"));
    }
    let netns = c.all_netns();
    let rules: Vec<String> = firewall_rules(&netns)
        .into_iter()
        .filter(|r| r.starts_with("ip netns exec"))
        .collect();
    assert_eq!(
        rules,
        Vec::<String>::new(),
        "the datapath must not add iptables/nftables rules in {netns:?}"
    );
}
