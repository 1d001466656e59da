//! Native IPv6 (issue 14, item 5): the datapath tests of `datapath.rs`, for IPv6 pods on a
//! dual-stack simulated node (`SimNode::new_dual_stack`: every pod has an IPv4 and an IPv6
//! address, the agent runs with `--proxy-redirect6 [gateway6]:15001`). Capture, original
//! destination, sk_msg pairing, direct mode, what is never captured, resets, and the IPv4
//! traffic of the same pods.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use mesh_tests::flows::{echo_intact, proxied_conns};
use mesh_tests::{firewall_rules, metric, wait_for, SimNode, PROXY_PORT};

const MIB: u64 = 1 << 20;

/// Pair on every kernel (as `datapath.rs`'s pairing tests do): none of these tests has a
/// slow reader.
const PAIRING: &[&str] = &["--skmsg-unbounded-pairing", "true"];

/// As `datapath.rs`'s node: `shop` enrolled (client, opted-out `batch`), `backend`
/// (server) with the given mode, `legacy` not enrolled; every pod dual-stack.
fn node(backend_mode: &str) -> SimNode {
    let mut n = SimNode::new_dual_stack().expect("dual-stack sim node");
    n.add_pod("client", 2).unwrap();
    n.add_pod("server", 3).unwrap();
    n.add_pod("batch", 4).unwrap();
    n.add_pod("legacy", 5).unwrap();
    n.write_config(&config(&n, backend_mode)).unwrap();
    n
}

fn config(n: &SimNode, backend_mode: &str) -> String {
    let w = |name: &str, ns: &str, extra: &str| {
        let p = n.pod(name);
        format!(
            "  - {{ name: {name}, namespace: {ns}, ip: {}{}, netns: {}{extra} }}\n",
            p.ip,
            p.ip6_field(),
            p.netns_path()
        )
    };
    format!(
        "namespaces:\n  - name: shop\n    labels: {{ mesh-agent.io/dataplane-mode: ambient }}\n\
         \x20 - name: backend\n    mode: {backend_mode}\n  - name: legacy\n\
         workloads:\n{}{}{}{}",
        w("client", "shop", ""),
        w(
            "batch",
            "shop",
            ", labels: { mesh-agent.io/dataplane-mode: none }"
        ),
        w("server", "backend", ""),
        w("legacy", "legacy", ""),
    )
}

/// `[ip6]:port` of a pod.
fn v6(n: &SimNode, pod: &str, port: u16) -> String {
    SocketAddr::new(IpAddr::V6(n.pod(pod).v6()), port).to_string()
}

/// The simulated node is what it says: each pod has its IPv6 address and reaches the
/// others' and the node's over IPv6 without the mesh (the agent not running), so a failure
/// in the tests below is the mesh's, not the harness's.
#[test]
fn the_dual_stack_node_carries_ipv6_without_the_mesh() {
    let n = node("proxied");
    n.serve("server", &["echo", "--listen", "[::]:8080"])
        .unwrap();
    let dst = v6(&n, "server", 8080);
    echo_intact(&n, "client", &dst, 64 * 1024);
    let r = n.client("client", &["peer", "--to", &dst]).unwrap();
    assert_eq!(r["peer"], dst.as_str(), "{r}");
    // And IPv4 alike, to the same dual-stack listener.
    echo_intact(&n, "client", &format!("{}:8080", n.pod("server").ip), 4096);
}

/// Without `--proxy-redirect6` the agent leaves native IPv6 alone (as before the mesh
/// carried it): the connection reaches the server straight, counted as not captured, and
/// the proxy opens no IPv6 listener; IPv4 of the same pods is still captured.
#[test]
fn without_an_ipv6_redirect_native_ipv6_is_left_alone() {
    let mut n = node("proxied");
    n.redirect6 = false;
    let agent = n.start_agent(&[]).unwrap();
    let dst = v6(&n, "server", 8080);
    n.serve("server", &["echo", "--listen", "[::]:8080"])
        .unwrap();
    let before = agent.event("connect_not_ipv4");
    echo_intact(&n, "client", &dst, 65536);
    assert_eq!(agent.event("connect_not_ipv4") - before, 1);
    let m = agent.get("/metrics").unwrap();
    assert_eq!(
        metric(&m, "mesh_tcp_connections_opened_total", &[]),
        0,
        "{m}"
    );
    let proxy6 = SocketAddr::new(IpAddr::V6(n.gateway6()), PROXY_PORT).to_string();
    let r = n.echo_once("client", &proxy6).unwrap();
    assert_eq!(
        r["errors"],
        serde_json::json!(["connect: ECONNREFUSED"]),
        "{r}"
    );
    let v4 = format!("{}:8080", n.pod("server").ip);
    echo_intact(&n, "client", &v4, 4096);
    assert_eq!(proxied_conns(&agent.get("/metrics").unwrap(), &v4), 1);
}

/// A proxied IPv6 flow passes the proxy (its series count it, with both workloads named),
/// the app <-> proxy leg is paired by sk_msg, bytes arrive intact both ways, `getpeername`
/// in the client says the original IPv6 destination, and no firewall rule appears.
#[test]
fn a_proxied_ipv6_flow_passes_the_proxy_with_skmsg_and_no_firewall_rules() {
    let n = node("proxied");
    let rules_before = firewall_rules(&[]);
    let agent = n.start_agent(PAIRING).unwrap();
    let dst = v6(&n, "server", 8080);
    n.serve("server", &["echo", "--listen", "[::]:8080"])
        .unwrap();
    let (paired, redirected) = (
        agent.event("sockops_server_paired"),
        agent.event("msg_redirected_bytes"),
    );

    echo_intact(&n, "client", &dst, 16 * MIB);

    let m = agent.get("/metrics").unwrap();
    let labels = [
        ("source_workload", "shop/client"),
        ("destination_address", dst.as_str()),
        ("destination_workload", "backend/server"),
        ("skmsg", "true"),
    ];
    assert_eq!(
        metric(&m, "mesh_tcp_connections_opened_total", &labels),
        1,
        "{m}"
    );
    assert!(
        metric(&m, "mesh_tcp_received_bytes_total", &labels) >= 16 * MIB,
        "{m}"
    );
    assert!(
        metric(&m, "mesh_tcp_sent_bytes_total", &labels) >= 16 * MIB,
        "{m}"
    );
    assert_eq!(agent.event("sockops_server_paired") - paired, 1, "{m}");
    assert!(agent.event("msg_redirected_bytes") > redirected, "{m}");
    wait_for("connection close", Duration::from_secs(5), || {
        metric(
            &agent.get("/metrics").unwrap(),
            "mesh_tcp_connections_closed_total",
            &labels,
        ) == 1
    });
    // Istio's series name both ends by the workloads the proxy knows at those IPv6
    // addresses (the control plane serves both families of each workload).
    assert!(
        metric(
            &m,
            "istio_tcp_connections_opened_total",
            &[
                ("source_workload", "client"),
                ("destination_workload", "server"),
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/shop/sa/default"
                ),
                (
                    "destination_principal",
                    "spiffe://cluster.local/ns/backend/sa/default"
                ),
            ]
        ) >= 1,
        "{m}"
    );

    // The redirect is invisible to the application: its socket's peer is the server.
    let r = n.client("client", &["peer", "--to", &dst]).unwrap();
    assert_eq!(r["peer"], dst.as_str(), "{r}");
    assert_eq!(proxied_conns(&agent.get("/metrics").unwrap(), &dst), 2);

    let ns: Vec<&str> = n.pods.iter().map(|p| p.netns.as_str()).collect();
    assert_eq!(
        firewall_rules(&ns),
        rules_before,
        "the datapath must not add iptables/ip6tables/nftables rules"
    );
}

/// Direct mode pairs the two pods' IPv6 sockets; the proxy never sees the flow.
#[test]
fn direct_mode_pairs_the_pods_ipv6_sockets_and_skips_the_proxy() {
    let n = node("direct");
    let agent = n.start_agent(PAIRING).unwrap();
    let dst = v6(&n, "server", 8080);
    n.serve("server", &["echo", "--listen", "[::]:8080"])
        .unwrap();
    let (direct, paired, redirected) = (
        agent.event("connect_direct"),
        agent.event("sockops_server_paired"),
        agent.event("msg_redirected_bytes"),
    );

    echo_intact(&n, "client", &dst, 16 * MIB);

    let m = agent.get("/metrics").unwrap();
    assert_eq!(
        metric(&m, "mesh_tcp_connections_opened_total", &[]),
        0,
        "the proxy must not see a direct flow:\n{m}"
    );
    assert_eq!(agent.event("connect_direct") - direct, 1, "{m}");
    assert_eq!(agent.event("sockops_server_paired") - paired, 1, "{m}");
    assert!(agent.event("msg_redirected_bytes") > redirected, "{m}");
    let r = n.client("client", &["peer", "--to", &dst]).unwrap();
    assert_eq!(r["peer"], dst.as_str(), "{r}");
}

/// IPv6 connections of an unenrolled namespace's pod and of an opted-out pod are not
/// captured; dialling the proxy's IPv6 listener itself is not either (no loop), and the
/// proxy, finding no original destination, closes it.
#[test]
fn unenrolled_and_opted_out_pods_ipv6_connections_are_not_captured() {
    let n = node("proxied");
    let agent = n.start_agent(&[]).unwrap();
    let dst = v6(&n, "server", 8080);
    n.serve("server", &["echo", "--listen", "[::]:8080"])
        .unwrap();
    let before = agent.event("connect_not_enrolled");
    for pod in ["legacy", "batch"] {
        echo_intact(&n, pod, &dst, 65536);
    }
    assert_eq!(agent.event("connect_not_enrolled") - before, 2);
    assert_eq!(proxied_conns(&agent.get("/metrics").unwrap(), &dst), 0);

    let proxy = SocketAddr::new(IpAddr::V6(n.gateway6()), PROXY_PORT).to_string();
    let to_proxy = agent.event("connect_to_proxy");
    n.client("client", &["peer", "--to", &proxy]).unwrap();
    assert_eq!(agent.event("connect_to_proxy") - to_proxy, 1);
    wait_for("the proxy to refuse it", Duration::from_secs(5), || {
        metric(
            &agent.get("/metrics").unwrap(),
            "mesh_proxy_orig_dst_missing_total",
            &[],
        ) == 1
    });
    // The enrolled pod next to them is captured.
    echo_intact(&n, "client", &dst, 65536);
    assert_eq!(proxied_conns(&agent.get("/metrics").unwrap(), &dst), 1);
}

/// An echo server in the node's network namespace that records who connected.
struct NodeServer {
    addr: SocketAddr,
    peers: std::sync::Arc<std::sync::Mutex<Vec<SocketAddr>>>,
}

impl NodeServer {
    fn start(addr: SocketAddr) -> NodeServer {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind(addr).expect("node server");
        let addr = l.local_addr().unwrap();
        let peers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = peers.clone();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                if let Ok(p) = c.peer_addr() {
                    seen.lock().unwrap().push(p);
                }
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n @ 1..) = c.read(&mut buf) {
                        if c.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        NodeServer { addr, peers }
    }

    fn peers(&self) -> Vec<IpAddr> {
        self.peers.lock().unwrap().iter().map(|p| p.ip()).collect()
    }
}

/// The interface index of `dev` in network namespace `netns` (`None`: the node's).
fn ifindex(netns: Option<&str>, dev: &str) -> u32 {
    let prefix = netns
        .map(|ns| format!("ip netns exec {ns} "))
        .unwrap_or_default();
    mesh_tests::sh(&format!("{prefix}cat /sys/class/net/{dev}/ifindex"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Enrolment never widens a pod's reach, in IPv6 either: `::1` and `::` stay the pod's own
/// host, the node's own IPv6 address and a link-local address on the node are reached
/// straight from the pod (the server sees the pod, not the proxy), and the proxy sees none
/// of these connections.
#[test]
fn ipv6_to_the_node_loopback_and_link_local_is_never_captured() {
    let n = node("proxied");
    // Link-local addresses without duplicate address detection, usable at once: the
    // node's on the bridge, and the pods' (their own would stay tentative for a while).
    let node_ll: Ipv6Addr = "fe80::1:1".parse().unwrap();
    mesh_tests::sh(&format!("ip addr add {node_ll}/64 dev {} nodad", n.bridge)).unwrap();
    for (pod, host) in [("client", 2), ("legacy", 5)] {
        mesh_tests::sh(&format!(
            "ip -n {} addr add fe80::{host}/64 dev eth0 nodad",
            n.pod(pod).netns
        ))
        .unwrap();
    }
    let agent = n.start_agent(&[]).unwrap();
    let loopback = NodeServer::start("[::1]:0".parse().unwrap());
    let own = NodeServer::start(SocketAddr::new(IpAddr::V6(n.gateway6()), 0));
    let ll = NodeServer::start(SocketAddr::V6(std::net::SocketAddrV6::new(
        node_ll,
        0,
        0,
        ifindex(None, &n.bridge),
    )));
    let refused = serde_json::json!(["connect: ECONNREFUSED"]);

    // "This host" stays the pod's own host (nothing listens there), enrolled or not.
    let lo = loopback.addr.port();
    for to in [format!("[::1]:{lo}"), format!("[::]:{lo}")] {
        for pod in ["client", "legacy"] {
            let r = n
                .client(pod, &["echo-client", "--to", &to, "--bytes", "64"])
                .unwrap();
            assert_eq!(r["errors"], refused, "{pod} -> {to}: {r}");
        }
    }
    assert!(loopback.peers().is_empty(), "{:?}", loopback.peers());

    // The node's own IPv6 address: reached from the pod as unenrolled (the server sees the
    // pod's address, never the node's, which the proxy would dial from).
    for pod in ["client", "legacy"] {
        echo_intact(&n, pod, &own.addr.to_string(), 4096);
    }
    let pods6 = [n.pod("client").v6(), n.pod("legacy").v6()].map(IpAddr::V6);
    assert_eq!(own.peers(), pods6);

    // Link-local: the node's address on the pod's link.
    for pod in ["client", "legacy"] {
        let to = SocketAddr::V6(std::net::SocketAddrV6::new(
            node_ll,
            ll.addr.port(),
            0,
            ifindex(Some(&n.pod(pod).netns), "eth0"),
        ));
        echo_intact(&n, pod, &to.to_string(), 4096);
    }
    let seen = ll.peers();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen.iter()
            .all(|ip| matches!(ip, IpAddr::V6(a) if a.segments()[0] == 0xfe80)),
        "the pods reach a link-local server from their own link-local addresses: {seen:?}"
    );

    let m = agent.get("/metrics").unwrap();
    assert_eq!(
        metric(&m, "mesh_tcp_connections_opened_total", &[]),
        0,
        "the proxy must not see any of these:\n{m}"
    );
}

/// A reset from an IPv6 server reaches the client as a reset, through the proxy; a refused
/// upstream connect resets the client too.
#[test]
fn a_reset_from_an_ipv6_server_reaches_the_client_as_a_reset() {
    let n = node("proxied");
    let agent = n.start_agent(&[]).unwrap();
    let dst = v6(&n, "server", 7000);
    n.serve("server", &["reset", "--listen", "[::]:7000"])
        .unwrap();
    let r = n.client("client", &["reset-client", "--to", &dst]).unwrap();
    assert_eq!(r["outcome"], "ECONNRESET", "{r}");
    assert_eq!(proxied_conns(&agent.get("/metrics").unwrap(), &dst), 1);
    let r = n
        .client("client", &["reset-client", "--to", &v6(&n, "server", 7999)])
        .unwrap();
    assert_eq!(r["outcome"], "ECONNRESET", "{r}");
}

/// Same-node policy holds for IPv6 sources: the proxy knows the client by its IPv6 address,
/// so a DENY for its namespace refuses the flow (and a direct-mode destination under policy
/// is proxied, as in IPv4).
#[test]
fn a_policy_holds_for_an_ipv6_flow() {
    let n = node("direct");
    let deny_shop = "authorization_policies:\n\
         \x20 - metadata: { name: deny-shop, namespace: backend }\n\
         \x20   spec:\n\
         \x20     action: DENY\n\
         \x20     rules: [ { from: [ { source: { namespaces: [ shop ] } } ] } ]\n";
    n.write_config(&format!("{}{deny_shop}", config(&n, "direct")))
        .unwrap();
    let agent = n.start_agent(&[]).unwrap();
    let dst = v6(&n, "server", 8080);
    n.serve("server", &["echo", "--listen", "[::]:8080"])
        .unwrap();
    let direct = agent.event("connect_direct");
    let r = n.echo_once("client", &dst).unwrap();
    assert_ne!(
        r["errors"],
        serde_json::json!([]),
        "the DENY must hold: {r}\n{}",
        agent.get("/metrics").unwrap()
    );
    assert_eq!(
        agent.event("connect_direct"),
        direct,
        "not paired around the proxy"
    );
    let m = agent.get("/metrics").unwrap();
    assert!(
        metric(
            &m,
            "mesh_authz_decisions_total",
            &[("verdict", "deny"), ("policy", "backend/deny-shop")]
        ) >= 1,
        "{m}"
    );
}

/// The same dual-stack pods' IPv4 traffic is carried as before: proxied with sk_msg and a
/// transparent `getpeername`, and from an IPv6 socket to a v4-mapped address.
#[test]
fn ipv4_traffic_of_dual_stack_pods_works_as_before() {
    let n = node("proxied");
    let agent = n.start_agent(PAIRING).unwrap();
    n.serve("server", &["echo", "--listen", "[::]:8080"])
        .unwrap();
    let dst = format!("{}:8080", n.pod("server").ip);
    let paired = agent.event("sockops_server_paired");
    echo_intact(&n, "client", &dst, 4 * MIB);
    let mapped = format!("[::ffff:{}]:8080", n.pod("server").ip);
    echo_intact(&n, "client", &mapped, MIB);
    assert_eq!(agent.event("sockops_server_paired") - paired, 2);
    let m = agent.get("/metrics").unwrap();
    assert_eq!(
        metric(
            &m,
            "mesh_tcp_connections_opened_total",
            &[
                ("source_workload", "shop/client"),
                ("destination_address", dst.as_str()),
                ("destination_workload", "backend/server"),
                ("skmsg", "true"),
            ]
        ),
        2,
        "{m}"
    );
    let r = n.client("client", &["peer", "--to", &dst]).unwrap();
    assert_eq!(r["peer"], dst.as_str(), "{r}");
    // And IPv6 next to it, on the same agent.
    echo_intact(&n, "client", &v6(&n, "server", 8080), MIB);
    assert_eq!(
        proxied_conns(&agent.get("/metrics").unwrap(), &v6(&n, "server", 8080)),
        1
    );
}

/// With upstream pairing the proxy's IPv6 leg to a same-node destination is paired too
/// (bound to the node's IPv6 address, announced in `FLOWS`): two clients and two servers
/// paired per flow, the destination sees the node as its peer, `getpeername` stays
/// transparent.
#[test]
fn upstream_pairing_short_circuits_both_ipv6_legs() {
    let n = node("proxied");
    let agent = n
        .start_agent(&[
            "--skmsg-upstream",
            "true",
            "--skmsg-unbounded-pairing",
            "true",
        ])
        .unwrap();
    let dst = v6(&n, "server", 8080);
    n.serve("server", &["echo", "--listen", "[::]:8080"])
        .unwrap();
    let (clients, servers) = (
        agent.event("sockops_client_paired"),
        agent.event("sockops_server_paired"),
    );
    echo_intact(&n, "client", &dst, 16 * MIB);
    assert_eq!(agent.event("sockops_client_paired") - clients, 2);
    assert_eq!(agent.event("sockops_server_paired") - servers, 2);
    assert_eq!(proxied_conns(&agent.get("/metrics").unwrap(), &dst), 1);
    let r = n.client("client", &["peer", "--to", &dst]).unwrap();
    assert_eq!(r["peer"], dst.as_str(), "{r}");
}

/// The kernel relay (`--kernel-relay`, 6.9+) takes a decided IPv6 flow as it takes an
/// IPv4 one: after the first exchange both directions move socket to socket, intact.
/// Where the kernel lacks it, the proxy relays in user space (asserted the same way).
#[test]
fn the_kernel_relay_moves_a_decided_ipv6_flow() {
    let n = node("proxied");
    let agent = n.start_agent(&["--kernel-relay", "true"]).unwrap();
    let kernel: serde_json::Value = serde_json::from_str(&agent.get("/kernel").unwrap()).unwrap();
    let on = kernel["features"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["name"] == "kernel_relay" && f["available"] == true);
    let dst = v6(&n, "server", 9000);
    n.serve("server", &["echo", "--listen", "[::]:9000"])
        .unwrap();
    let (started, relayed) = (agent.event("relay_started"), agent.event("msg_relayed"));
    let r = n
        .client("client", &["ping", "--to", &dst, "--count", "500"])
        .unwrap();
    assert_eq!(r["count"], 500, "{r}");
    echo_intact(&n, "client", &dst, 4 * MIB);
    if on {
        assert!(
            agent.event("relay_started") - started >= 2,
            "{}",
            agent.log_text()
        );
        assert!(agent.event("msg_relayed") - relayed > 400);
    } else {
        assert_eq!(agent.event("relay_started"), started);
    }
    assert_eq!(proxied_conns(&agent.get("/metrics").unwrap(), &dst), 2);
}

/// An upgrade (`--takeover`) keeps native IPv6 captured and loses nothing: the old agent
/// hands both listeners over (hand-over protocol 2), the new one accepts from the same
/// IPv6 socket, so no connection waiting in its queue is refused or reset, and the later
/// connections are served by the new agent's proxy.
#[test]
fn a_takeover_keeps_ipv6_captured() {
    let n = node("proxied");
    let mut old = n.start_agent(&[]).unwrap();
    let dst = v6(&n, "server", 8080);
    n.serve("server", &["echo", "--listen", "[::]:8080"])
        .unwrap();
    echo_intact(&n, "client", &dst, 4096);
    assert_eq!(proxied_conns(&old.get("/metrics").unwrap(), &dst), 1);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let new = std::thread::scope(|s| {
        let churn = s.spawn(|| {
            let mut results = Vec::new();
            let until = std::time::Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && std::time::Instant::now() < until
            {
                results.push(n.echo_once("client", &dst).unwrap());
            }
            results
        });
        let new = n.start_agent_as("agent-new", n.admin_port + 500, &["--takeover", "true"]);
        wait_for(
            "the old agent to finish draining",
            Duration::from_secs(15),
            || old.log_text().contains("waiting for the signal to exit"),
        );
        let (code, log) = old.stop();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let results = churn.join().unwrap();
        let new = new.unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(code, Some(0), "{log}");
        let failed: Vec<_> = results
            .iter()
            .filter(|r| r["errors"] != serde_json::json!([]))
            .collect();
        assert!(results.len() >= 4, "{}", results.len());
        assert!(
            failed.is_empty(),
            "{} of {}: {failed:?}",
            failed.len(),
            results.len()
        );
        assert!(
            new.log_text().contains("ipv6=true"),
            "the IPv6 listener was not handed over:\n{}",
            new.log_text()
        );
        new
    });
    let before = proxied_conns(&new.get("/metrics").unwrap(), &dst);
    echo_intact(&n, "client", &dst, MIB);
    assert_eq!(
        proxied_conns(&new.get("/metrics").unwrap(), &dst),
        before + 1
    );
}
