//! End-to-end datapath tests on a simulated node: real eBPF programs attached to a real
//! cgroup, real TCP between network namespaces, the real agent binary.

use std::time::Duration;

use mesh_tests::datapath::{self as scenario, config, NodeServer, MIB, PAIRING};
use mesh_tests::family::Family::V4;
use mesh_tests::flows::{assert_intact, assert_sunk, echo_intact, proxied_conns};
use mesh_tests::{metric, wait_for, SimNode};

/// The map-fill tests (issue 14, item 4; their own test binary too) also run in this one,
/// so the kernel matrix (`cargo xtask kernels`, which runs this binary) covers them.
#[path = "datapath_fill.rs"]
mod fill;

/// The decision-log tests (issue 14, item 7; their own binary too), for the same reason.
#[path = "datapath_log.rs"]
mod log;

/// The flow-key and IPv6 map tests (issue 14, items 4 and 5; their own binary too), for
/// the same reason.
#[path = "datapath_netns.rs"]
mod netns;

/// The direct-mode telemetry tests (issue 12, item 1; their own binary too), for the same
/// reason: the per-flow records come from sockops and sk_msg.
#[path = "telemetry_direct.rs"]
mod telemetry_direct;

/// The datapath's node (`mesh_tests::datapath::node`), IPv4 only: namespaces `shop`
/// enrolled (client, opted-out `batch`), `backend` (server) with the given mode, `legacy`
/// not enrolled. The scenarios written once for both families (`scenario::*`) run here
/// for IPv4 and in `ipv6.rs` for IPv6.
fn node(backend_mode: &str) -> SimNode {
    scenario::node(V4, backend_mode)
}

// The scenarios both families run (`mesh_tests::datapath`, each documented there), for
// IPv4; `ipv6.rs` runs them for IPv6.
mesh_tests::family_tests! { V4;
    proxied_flow_passes_the_proxy_with_skmsg_and_no_firewall_rules => proxied_flow_passes_the_proxy,
    direct_mode_skips_the_proxy_and_pairs_the_pods => direct_mode_pairs_the_pods,
    unenrolled_namespace_and_opted_out_pod_are_not_captured => unenrolled_and_opted_out_pods_are_not_captured,
    reset_from_the_server_reaches_the_client_as_reset => a_reset_reaches_the_client_as_a_reset,
    upstream_pairing_short_circuits_both_legs => upstream_pairing_short_circuits_both_legs,
    /// Direct mode skips the proxy, and with it every policy: a destination in direct mode
    /// under an AuthorizationPolicy is proxied instead, so the policy holds. The same
    /// destination without a policy stays direct (`direct_mode_*` tests).
    a_direct_mode_destination_under_policy_is_proxied_and_the_policy_holds => a_direct_destination_under_policy_is_proxied,
}

#[test]
fn enrolment_changes_apply_to_new_connections_without_restart() {
    let n = node("proxied");
    n.write_config(&config(&n, "proxied", false)).unwrap();
    let agent = n.start_agent(&[]).unwrap();
    let dst = format!("{}:8080", n.pod("server").ip);
    n.serve("server", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    let send = || {
        n.client("client", &["echo-client", "--to", &dst, "--bytes", "4096"])
            .unwrap()
    };
    let enrolled = || {
        agent
            .get("/metrics")
            .map(|m| metric(&m, "mesh_workloads_enrolled", &[]))
            .unwrap_or(0)
    };

    send();
    assert_eq!(proxied_conns(&agent.get("/metrics").unwrap(), &dst), 0);

    n.write_config(&config(&n, "proxied", true)).unwrap();
    wait_for("enrolment", Duration::from_secs(10), || enrolled() == 1);
    send();
    assert_eq!(proxied_conns(&agent.get("/metrics").unwrap(), &dst), 1);

    n.write_config(&config(&n, "proxied", false)).unwrap();
    wait_for("release", Duration::from_secs(10), || enrolled() == 0);
    send();
    assert_eq!(proxied_conns(&agent.get("/metrics").unwrap(), &dst), 1);

    // A broken edit is refused and the last good configuration (enrolled) stays.
    n.write_config(&config(&n, "proxied", true)).unwrap();
    wait_for("enrolment again", Duration::from_secs(10), || {
        enrolled() == 1
    });
    std::fs::write(n.config_path(), "namespaces: [oops\n").unwrap();
    wait_for(
        "the broken edit to be rejected",
        Duration::from_secs(10),
        || agent.log_text().contains("enrolment file rejected"),
    );
    send();
    assert_eq!(proxied_conns(&agent.get("/metrics").unwrap(), &dst), 2);
    assert_eq!(enrolled(), 1);
}

#[test]
fn a_thousand_concurrent_connections_complete_intact() {
    let n = node("proxied");
    // A slow machine (an emulated kernel) can leave the proxy's heartbeat older than the
    // default second under this load; the datapath would then pass connections around
    // the proxy (fail open), which is what it should do, but not what this test counts.
    let agent = n
        .start_agent(&["--proxy-heartbeat-timeout-ms", "30000"])
        .unwrap();
    let dst = format!("{}:8080", n.pod("server").ip);
    n.serve("server", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    let r = n
        .client(
            "client",
            &[
                "echo-client",
                "--to",
                &dst,
                "--bytes",
                "16384",
                "--conns",
                "1000",
            ],
        )
        .unwrap();
    if r["errors"] != serde_json::json!([]) {
        let m = agent.get("/metrics").unwrap();
        let nonzero: Vec<&str> = m
            .lines()
            .filter(|l| !l.starts_with('#') && !l.ends_with(" 0"))
            .collect();
        panic!(
            "{r}\nagent metrics:\n{}\nagent log:\n{}",
            nonzero.join("\n"),
            agent.log_text()
        );
    }
    assert_intact(&r, 16384);
    assert_eq!(proxied_conns(&agent.get("/metrics").unwrap(), &dst), 1000);
}

fn slow_reader(mode: &str) {
    slow_reader_with(mode, &[]);
}

/// A blocking writer sends 32 MiB into a reader that reads slowly: no error, bytes intact,
/// and the kernel's queue bounded: by the back-pressure check where the kernel has it
/// (6.9+), else by not pairing at all (plain TCP). Returns the agent's `/metrics`.
fn slow_reader_with(mode: &str, flags: &[&str]) -> String {
    let n = node(mode);
    let agent = n.start_agent(flags).unwrap();
    let queue_check = queue_check(&agent);
    let dst = format!("{}:9000", n.pod("server").ip);
    n.serve(
        "server",
        &["sink", "--listen", "0.0.0.0:9000", "--delay-us", "300"],
    )
    .unwrap();
    let bytes = 32 * MIB;
    let r = n
        .client(
            "client",
            &["sink-client", "--to", &dst, "--bytes", &bytes.to_string()],
        )
        .unwrap();
    assert_sunk(&r, bytes);
    let m = agent.get("/metrics").unwrap();
    if queue_check {
        // The redirect queue filled and the flow went back to TCP's own back-pressure.
        assert!(agent.event("msg_pass_backpressure") >= 1, "{m}");
    } else {
        // No way to see the queue: nothing was paired, TCP carried every byte.
        assert_eq!(agent.event("sockops_client_paired"), 0, "{m}");
        assert_eq!(agent.event("msg_redirected"), 0, "{m}");
        assert!(agent.get("/ready").unwrap().contains("degraded: kernel"));
    }
    m
}

/// Issue 14, item 3: below 6.9 the kernel does not show the redirect queue, so the agent
/// pairs nothing (unless told to) and a slow reader cannot make a writer grow kernel
/// memory: forced here on a kernel that has the check.
#[test]
fn without_the_queue_check_nothing_is_paired_and_a_slow_reader_gets_tcp() {
    let m = slow_reader_with(
        "direct",
        &["--assume-missing-feature", "skmsg_queue_length"],
    );
    assert_eq!(
        metric(
            &m,
            "mesh_kernel_feature",
            &[("feature", "skmsg_queue_length")]
        ),
        0,
        "{m}"
    );
}

/// ... and the operator can accept unbounded queues to keep the short-circuit there.
#[test]
fn unbounded_pairing_pairs_without_the_queue_check() {
    let n = node("direct");
    let agent = n
        .start_agent(&[
            "--assume-missing-feature",
            "skmsg_queue_length",
            "--skmsg-unbounded-pairing",
            "true",
        ])
        .unwrap();
    let dst = format!("{}:8080", n.pod("server").ip);
    n.serve("server", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    echo_intact(&n, "client", &dst, MIB);
    assert!(agent.event("sockops_client_paired") >= 1);
    assert!(agent.event("msg_redirected") >= 1);
}

#[test]
fn fast_sender_into_slow_reader_direct() {
    slow_reader("direct");
}

#[test]
fn fast_sender_into_slow_reader_proxied() {
    slow_reader("proxied");
}

#[test]
fn dual_stack_sockets_are_captured_and_short_circuited() {
    for mode in ["proxied", "direct"] {
        let n = node(mode);
        let agent = n.start_agent(PAIRING).unwrap();
        n.serve("server", &["echo", "--listen", "[::]:8080"])
            .unwrap();
        let (paired, redirected) = (
            agent.event("sockops_server_paired"),
            agent.event("msg_redirected_bytes"),
        );
        // A v6 client socket to the v4-mapped address, to a dual-stack listener.
        let to = format!("[::ffff:{}]:8080", n.pod("server").ip);
        let r = n
            .client(
                "client",
                &["echo-client", "--to", &to, "--bytes", &MIB.to_string()],
            )
            .unwrap();
        assert_intact(&r, MIB);
        assert_eq!(agent.event("sockops_server_paired") - paired, 1, "{mode}");
        assert!(agent.event("msg_redirected_bytes") > redirected, "{mode}");
        let proxied = proxied_conns(
            &agent.get("/metrics").unwrap(),
            &format!("{}:8080", n.pod("server").ip),
        );
        assert_eq!(proxied, u64::from(mode == "proxied"), "{mode}");
    }
}

#[test]
fn bypass_switch_sends_new_connections_direct() {
    let n = node("proxied");
    let agent = n.start_agent(&[]).unwrap();
    let dst = format!("{}:8080", n.pod("server").ip);
    n.serve("server", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    let out = agent.cli(&["bypass", "on"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    n.client("client", &["echo-client", "--to", &dst, "--bytes", "4096"])
        .unwrap();
    assert_eq!(proxied_conns(&agent.get("/metrics").unwrap(), &dst), 0);
    assert_eq!(agent.event("connect_bypass"), 1);
    assert!(agent.cli(&["bypass", "off"]).status.success());
    n.client("client", &["echo-client", "--to", &dst, "--bytes", "4096"])
        .unwrap();
    assert_eq!(proxied_conns(&agent.get("/metrics").unwrap(), &dst), 1);
}

#[test]
fn excluded_destinations_are_not_captured() {
    let n = node("proxied");
    let server = n.pod("server").ip;
    let yaml = config(&n, "proxied", true).replace(
        "namespaces:",
        &format!("exclude:\n  - {{ cidr: {server}/32, port: 8080 }}\nnamespaces:"),
    );
    n.write_config(&yaml).unwrap();
    let agent = n.start_agent(&[]).unwrap();
    n.serve("server", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    n.serve("server", &["echo", "--listen", "0.0.0.0:9090"])
        .unwrap();
    echo_intact(&n, "client", &format!("{server}:8080"), 4096);
    echo_intact(&n, "client", &format!("{server}:9090"), 4096);
    let m = agent.get("/metrics").unwrap();
    assert_eq!(proxied_conns(&m, &format!("{server}:8080")), 0, "{m}");
    assert_eq!(proxied_conns(&m, &format!("{server}:9090")), 1, "{m}");
    assert_eq!(agent.event("connect_excluded"), 1);
    let ex = agent.cli(&["dump", "EXCLUDES", "-o", "json"]);
    let ex: serde_json::Value = serde_json::from_slice(&ex.stdout).unwrap();
    assert_eq!(ex[0]["cidr"], format!("{server}/32").as_str(), "{ex}");
}

#[test]
fn sigterm_drains_then_detaches_and_traffic_goes_direct() {
    let n = node("proxied");
    let mut agent = n.start_agent(&["--drain-ms", "500"]).unwrap();
    let dst = format!("{}:8080", n.pod("server").ip);
    n.serve("server", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    // A long-lived proxied connection is open when the agent is told to stop.
    let mut long = n
        .pod_command("client", &mesh_tests::podtool())
        .args(["ping", "--to", &dst, "--count", "100000000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the proxied connection", Duration::from_secs(5), || {
        proxied_conns(&agent.get("/metrics").unwrap(), &dst) == 1
    });
    let t = std::time::Instant::now();
    let (code, log) = agent.stop();
    assert_eq!(code, Some(0), "{log}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "drain took {:?}",
        t.elapsed()
    );
    assert!(log.contains("drain deadline passed"), "{log}");
    // The proxied connection ended with the agent; new connections go direct.
    let mut ended = None;
    wait_for(
        "the proxied connection to end",
        Duration::from_secs(5),
        || {
            ended = long.try_wait().unwrap();
            ended.is_some()
        },
    );
    assert_ne!(ended.unwrap().code(), Some(0));
    echo_intact(&n, "client", &dst, 65536);
    assert_eq!(n.cgroup_programs().unwrap(), Vec::<String>::new());
}

/// Stopping the agent frees SOCKHASH while a pair still has bytes waiting in a redirect
/// queue; the kernel hands the socket back to plain TCP with its queue intact (measured:
/// this test passes; it guards against a future shutdown path that would lose them).
#[test]
fn an_agent_stop_loses_no_redirected_bytes_of_live_pairs() {
    let n = node("direct");
    let mut agent = n.start_agent(PAIRING).unwrap();
    let dst = format!("{}:9000", n.pod("server").ip);
    // The reader does not read for 3 s: everything the client sends (3 MiB, under the
    // back-pressure limit) waits in its redirect queue while the agent stops.
    n.serve(
        "server",
        &[
            "sink",
            "--listen",
            "0.0.0.0:9000",
            "--pause-ms",
            "3000",
            "--delay-us",
            "0",
        ],
    )
    .unwrap();
    let bytes = 3 * MIB;
    std::thread::scope(|s| {
        let sender = s.spawn(|| {
            n.client(
                "client",
                &["sink-client", "--to", &dst, "--bytes", &bytes.to_string()],
            )
            .unwrap()
        });
        wait_for(
            "the bytes in the reader's redirect queue",
            Duration::from_secs(10),
            || agent.event("msg_redirected_bytes") >= bytes,
        );
        let (code, log) = agent.stop();
        assert_eq!(code, Some(0), "{log}");
        assert_eq!(n.cgroup_programs().unwrap(), Vec::<String>::new());
        assert_sunk(&sender.join().unwrap(), bytes);
    });
}

/// Issue 10, item 1: enrolment must never widen a pod's reach. `0.0.0.0` (and
/// `::ffff:0.0.0.0`) means "this host": captured, the proxy dialled it in the node's
/// namespace and the pod read the agent's admin endpoint and services bound to the node's
/// loopback. Now "this host" and "this link" destinations and the node's own addresses are
/// never captured (the pod reaches exactly what it reaches unenrolled), and the proxy
/// refuses to dial them even when a flow record names one.
#[test]
fn enrolment_never_widens_what_a_pod_reaches_on_the_node() {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    let n = node("proxied");
    // A link-local service on the node (a node-local DNS cache, a metadata proxy).
    let link_local = Ipv4Addr::new(169, 254, 200, n.index);
    mesh_tests::sh(&format!("ip addr add {link_local}/32 dev {}", n.bridge)).unwrap();
    let agent = n.start_agent(&[]).unwrap();
    let on_node = |ip: Ipv4Addr| NodeServer::start(SocketAddr::new(IpAddr::V4(ip), 0));
    let loopback = on_node(Ipv4Addr::LOCALHOST);
    let own = on_node(n.gateway);
    let ll = on_node(link_local);
    let refused = serde_json::json!(["connect: ECONNREFUSED"]);

    // "This host" stays the pod's own host, enrolled or not.
    let admin = n.admin_port;
    let lo = loopback.addr.port();
    for to in [
        format!("0.0.0.0:{admin}"),
        format!("[::ffff:0.0.0.0]:{admin}"),
        format!("0.0.0.0:{lo}"),
        format!("127.0.0.1:{lo}"),
    ] {
        for pod in ["client", "legacy"] {
            let r = n
                .client(pod, &["echo-client", "--to", &to, "--bytes", "64"])
                .unwrap();
            assert_eq!(r["errors"], refused, "{pod} -> {to}: {r}");
        }
    }
    assert!(loopback.peers().is_empty(), "{:?}", loopback.peers());
    assert_eq!(agent.event("connect_local_scope"), 4);

    // The node's own and link-local addresses: reached straight from the pod, as an
    // unenrolled pod reaches them (the server sees the pod's address, not the node's).
    for to in [own.addr.to_string(), ll.addr.to_string()] {
        for pod in ["client", "legacy"] {
            echo_intact(&n, pod, &to, 4096);
        }
    }
    let pods = [n.pod("client").ip, n.pod("legacy").ip].map(IpAddr::V4);
    assert_eq!(own.peers(), pods);
    assert_eq!(ll.peers(), pods);
    assert_eq!(agent.event("connect_node_address"), 1);
    assert_eq!(agent.event("connect_local_scope"), 5);
    let m = agent.get("/metrics").unwrap();
    assert_eq!(
        metric(&m, "mesh_tcp_connections_opened_total", &[]),
        0,
        "the proxy must not see any of these:\n{m}"
    );

    // NODE_ADDRS holds the node's addresses and follows changes.
    let dump = || {
        let out = agent.cli(&["dump", "NODE_ADDRS", "-o", "json"]);
        assert!(out.status.success(), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| r["ip"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let now = dump();
    for ip in [n.gateway, link_local, Ipv4Addr::LOCALHOST] {
        assert!(now.contains(&ip.to_string()), "{ip} not in {now:?}");
    }
    // TEST-NET-2: not an address of this machine (TEST-NET-1 can be, e.g. a VM's eth0).
    let added = Ipv4Addr::new(198, 51, 100, n.index);
    mesh_tests::sh(&format!("ip addr add {added}/32 dev {}", n.bridge)).unwrap();
    wait_for(
        "the new node address in NODE_ADDRS",
        Duration::from_secs(5),
        || dump().contains(&added.to_string()),
    );
    mesh_tests::sh(&format!("ip addr del {added}/32 dev {}", n.bridge)).unwrap();
    wait_for(
        "the removed address gone from NODE_ADDRS",
        Duration::from_secs(5),
        || !dump().contains(&added.to_string()),
    );

    // The proxy side: a flow record naming such a destination (here written by hand for a
    // client that dials the proxy from a known port) is refused with a reset, never dialled.
    let client = n.pod("client").ip;
    let flows = n.pin_path.join("FLOWS");
    let config: serde_json::Value =
        serde_json::from_slice(&agent.cli(&["dump", "CONFIG", "-o", "json"]).stdout).unwrap();
    let proxy_netns = config[0]["proxy_netns"].as_u64().unwrap();
    assert_ne!(proxy_netns, 0, "{config}");
    let hex = |b: &[u8]| {
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    // Writes a flow record for the client's port `41000 + 4 * index + i` naming `orig`,
    // and connects from that port.
    let captured_to = |i: u16, orig: std::net::SocketAddrV4| {
        let from = 41000 + u16::from(n.index) * 4 + i;
        // `FLOWS` key: the accepting side's (the proxy's) namespace, then the client's
        // view with 16-byte addresses (IPv4 v4-mapped).
        let key = [
            &proxy_netns.to_le_bytes()[..],
            &client.to_ipv6_mapped().octets(),
            &n.gateway.to_ipv6_mapped().octets(),
            &from.to_le_bytes(),
            &15001u16.to_le_bytes(),
            &0u32.to_le_bytes(),
        ]
        .concat();
        let value = [
            &orig.ip().to_ipv6_mapped().octets()[..],
            &u32::from(orig.port()).to_le_bytes(),
            &1u32.to_le_bytes(), // flow_flags::PROXIED
            &0u32.to_le_bytes(),
            &u32::MAX.to_le_bytes(),
            &0u64.to_le_bytes(), // the client's netns cookie: not known
        ]
        .concat();
        mesh_tests::sh(&format!(
            "bpftool map update pinned {} key hex {} value hex {}",
            flows.display(),
            hex(&key),
            hex(&value)
        ))
        .unwrap();
        n.client(
            "client",
            &[
                "reset-client",
                "--to",
                &format!("{}:15001", n.gateway),
                "--from-port",
                &from.to_string(),
            ],
        )
        .unwrap()
    };
    for (i, (orig, reason)) in [
        (
            std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, admin),
            "local_scope",
        ),
        (
            std::net::SocketAddrV4::new(n.gateway, own.addr.port()),
            "node_address",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let r = captured_to(i as u16, orig);
        assert_eq!(r["outcome"], "ECONNRESET", "{orig}: {r}");
        let m = agent.get("/metrics").unwrap();
        assert_eq!(
            metric(
                &m,
                "mesh_proxy_refused_destinations_total",
                &[("reason", reason)]
            ),
            1,
            "{m}"
        );
    }
    // The proxy's check follows NODE_ADDRS (it reads a user-space copy of the map's keys):
    // an address added to the node is refused once the map has it, and dialled again once
    // the map has dropped it (here into an unreachable route: a connect failure).
    let refused_node = || {
        let m = agent.get("/metrics").unwrap();
        let r = (
            metric(
                &m,
                "mesh_proxy_refused_destinations_total",
                &[("reason", "node_address")],
            ),
            metric(&m, "mesh_tcp_connect_failures_total", &[]),
        );
        (r, m)
    };
    mesh_tests::sh(&format!("ip addr add {added}/32 dev {}", n.bridge)).unwrap();
    wait_for(
        "the added address in NODE_ADDRS again",
        Duration::from_secs(5),
        || dump().contains(&added.to_string()),
    );
    let r = captured_to(2, std::net::SocketAddrV4::new(added, 9));
    assert_eq!(r["outcome"], "ECONNRESET", "{added}: {r}");
    let ((refused, failed), m) = refused_node();
    assert_eq!((refused, failed), (2, 0), "{m}");
    mesh_tests::sh(&format!("ip addr del {added}/32 dev {}", n.bridge)).unwrap();
    wait_for(
        "the added address gone from NODE_ADDRS again",
        Duration::from_secs(5),
        || !dump().contains(&added.to_string()),
    );
    /// Removes the route it was made with, even when an assertion fails.
    struct Unreachable(Ipv4Addr);
    impl Drop for Unreachable {
        fn drop(&mut self) {
            let _ = mesh_tests::sh(&format!("ip route del unreachable {}/32", self.0));
        }
    }
    mesh_tests::sh(&format!("ip route add unreachable {added}/32")).unwrap();
    let _route = Unreachable(added);
    let r = captured_to(3, std::net::SocketAddrV4::new(added, 9));
    assert_eq!(r["outcome"], "ECONNRESET", "{added}: {r}");
    wait_for(
        "the proxy's failed dial of the removed address",
        Duration::from_secs(5),
        || refused_node().0 .1 == 1,
    );
    let ((refused, _), m) = refused_node();
    assert_eq!(refused, 2, "{m}");
    // Neither the admin endpoint's nor the node server's peers include the proxy.
    assert_eq!(own.peers(), pods);
}

/// Issue 10, item 3: a proxied stream the agent cannot finish ends in a reset the app
/// sees, never in an orderly end of stream short of bytes (a truncated transfer that
/// looks complete). `stop` cuts it: SIGKILL, or SIGTERM with a drain deadline shorter
/// than the transfer.
fn cut_stream_ends_in_reset(stop: impl FnOnce(&mut mesh_tests::Agent)) {
    let n = node("proxied");
    let mut agent = n.start_agent(&["--drain-ms", "300"]).unwrap();
    let dst = format!("{}:9100", n.pod("server").ip);
    let total = 64 * MIB;
    // 16 KiB every 2 ms: about 8 s for the whole stream.
    n.serve(
        "server",
        &[
            "source",
            "--listen",
            "0.0.0.0:9100",
            "--bytes",
            &total.to_string(),
            "--chunk-delay-us",
            "2000",
        ],
    )
    .unwrap();
    std::thread::scope(|s| {
        let reader = s.spawn(|| n.client("client", &["read-client", "--to", &dst]).unwrap());
        wait_for("the proxied stream", Duration::from_secs(5), || {
            proxied_conns(&agent.get("/metrics").unwrap_or_default(), &dst) == 1
        });
        std::thread::sleep(Duration::from_millis(300));
        stop(&mut agent);
        let r = reader.join().unwrap();
        assert!(r["received"].as_u64().unwrap() < total, "{r}");
        assert_eq!(r["outcome"], "ECONNRESET", "{r}");
    });
}

#[test]
fn a_proxied_stream_cut_by_a_killed_agent_ends_in_a_reset() {
    cut_stream_ends_in_reset(|a| a.kill());
}

#[test]
fn a_proxied_stream_cut_by_the_drain_deadline_ends_in_a_reset() {
    cut_stream_ends_in_reset(|a| {
        let (code, log) = a.stop();
        assert_eq!(code, Some(0), "{log}");
        assert!(log.contains("drain deadline passed"), "{log}");
    });
}

/// Issue 10, item 4: a reloaded file that declares nothing would un-mesh the node within
/// a reload interval; it is refused (and counted) unless `--allow-empty-config` says so.
#[test]
fn an_empty_enrolment_file_is_refused_on_reload() {
    let n = node("proxied");
    let agent = n.start_agent(&[]).unwrap();
    let m = || agent.get("/metrics").unwrap();
    let enrolled = || metric(&m(), "mesh_workloads_enrolled", &[]);
    let rejected = || metric(&m(), "mesh_config_reloads_total", &[("result", "rejected")]);
    assert_eq!(enrolled(), 1, "the client");
    for (i, empty) in ["namespaces: []\n", "", "# nothing here\n"]
        .iter()
        .enumerate()
    {
        n.write_config(empty).unwrap();
        wait_for("the rejection", Duration::from_secs(10), || {
            rejected() == i as u64 + 1
        });
        assert_eq!(enrolled(), 1, "{empty:?} released the workloads");
    }
    let dst = format!("{}:8080", n.pod("server").ip);
    n.serve("server", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    echo_intact(&n, "client", &dst, 4096);
    assert_eq!(proxied_conns(&m(), &dst), 1, "still meshed");
    assert!(agent.log_text().contains("--allow-empty-config"));
    drop(agent);

    // Explicitly allowed: the node is released.
    n.write_config(&config(&n, "proxied", true)).unwrap();
    let agent = n.start_agent(&["--allow-empty-config", "true"]).unwrap();
    let enrolled = || {
        metric(
            &agent.get("/metrics").unwrap(),
            "mesh_workloads_enrolled",
            &[],
        )
    };
    assert_eq!(enrolled(), 1);
    n.write_config("namespaces: []\n").unwrap();
    wait_for("the release", Duration::from_secs(10), || enrolled() == 0);
}

/// A connect the hooks decided on that never completes (here refused: nothing listens on
/// a direct-mode destination) leaves nothing behind: its state lived in the socket's own
/// storage (`SOCK_STATE`, freed with the socket) and it never reached `FLOWS`. (Before
/// socket storage, such records held LRU slots until eviction pushed out live ones.)
#[test]
fn connects_that_never_complete_leave_no_socket_records() {
    let n = node("direct");
    let agent = n.start_agent(&[]).unwrap();
    let dst = format!("{}:9999", n.pod("server").ip);
    let r = n
        .client(
            "client",
            &[
                "echo-client",
                "--to",
                &dst,
                "--bytes",
                "16",
                "--conns",
                "20",
            ],
        )
        .unwrap();
    assert_eq!(r["intact"], 0, "{r}");
    let flows = agent.cli(&["dump", "FLOWS", "-o", "json"]);
    let flows = serde_json::from_slice::<serde_json::Value>(&flows.stdout).unwrap();
    assert_eq!(flows, serde_json::json!([]));
    // Socket storage cannot be listed, and says so.
    let out = agent.cli(&["dump", "SOCK_STATE", "-o", "json"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("socket storage"),
        "{out:?}"
    );
    assert_eq!(agent.event("connect_direct"), 20);
    assert_eq!(agent.event("flow_evicted"), 0);
}

/// Issue 10, item 4: every distinct `ip:port` a pod dials added L4 metric series and an
/// on-demand subscription for good (2,000 dials: 3,170 series, 479 KB of `/metrics`). Now
/// both are bounded: idle series are dropped past the bound, absent names forgotten.
#[test]
fn dialling_many_addresses_keeps_the_agents_state_bounded() {
    let n = node("proxied");
    let agent = n
        .start_agent(&["--xds-on-demand-timeout-ms", "200"])
        .unwrap();
    let server = n.pod("server").ip.to_string();
    // Nothing listens on these ports: each connect reaches the proxy, which finds no
    // service, dials the port and resets the client.
    let r = n
        .client(
            "client",
            &["dial-range", "--to", &server, "--ports", "20000-21199"],
        )
        .unwrap();
    assert_eq!(r["dialled"], 1200, "{r}");
    let m = agent.get("/metrics").unwrap();
    let series = m
        .lines()
        .filter(|l| l.starts_with("mesh_tcp_connections_opened_total{"))
        .count();
    assert!(series <= 512, "{series} series");
    assert!(m.len() < 400 * 1024, "{} bytes of /metrics", m.len());
    assert!(
        metric(&m, "mesh_metrics_flow_series_evicted_total", &[]) > 0,
        "{m}"
    );
    let dump: serde_json::Value =
        serde_json::from_str(&agent.get("/config_dump").unwrap()).unwrap();
    let absent = dump["on_demand"]["absent"].as_array().unwrap().len();
    assert!(absent <= 1024, "{absent} absent names remembered");
}

/// Issue 10, item 4: NACKs had no metric. An update the proxy refuses (a token bucket
/// Envoy would refuse too) is counted, and the last good configuration stays.
#[test]
fn a_refused_xds_update_is_counted() {
    let n = node("proxied");
    let agent = n.start_agent(&[]).unwrap();
    let nacks = || {
        metric(
            &agent.get("/metrics").unwrap(),
            "mesh_xds_responses_total",
            &[("verdict", "nack")],
        )
    };
    assert_eq!(nacks(), 0);
    let server = n.pod("server").ip;
    let with_service = |rate: &str| {
        config(&n, "proxied", true)
            + &format!(
                "services:\n  - name: web\n    namespace: backend\n    vip: 10.96.{}.10\n    \
                 ports: [ {{ port: 80, protocol: http }} ]\n    endpoints: [ {{ ip: {server}, port: 8080 }} ]\n    \
                 rate_limit: {{ max_tokens: {rate}, fill_interval_ms: 1000 }}\n",
                n.index
            )
    };
    n.write_config(&with_service("5")).unwrap();
    let vip = format!("10.96.{}.10:80", n.index);
    n.serve(
        "server",
        &["http", "--listen", "0.0.0.0:8080", "--name", "web"],
    )
    .unwrap();
    // The listener arrives over xDS after the file is read: wait for it to serve.
    wait_for("the service to answer", Duration::from_secs(20), || {
        n.http_get("client", &vip, "/", 1, &[])
            .is_ok_and(|r| r["errors"] == serde_json::json!([]))
    });
    // Refused at the xDS level (an empty bucket), not by the file check.
    n.write_config(&with_service("0")).unwrap();
    wait_for("the NACK to be counted", Duration::from_secs(10), || {
        nacks() >= 1
    });
    let r = n.http_get("client", &vip, "/", 1, &[]).unwrap();
    assert_eq!(
        r["errors"],
        serde_json::json!([]),
        "the last good configuration stays: {r}"
    );
}

/// Issue 14, item 2: kernels before 5.14 have no `SO_NETNS_COOKIE`. With the probe (a UDP
/// connect from the pod's namespace answered by connect4), the agent learns the same
/// cookies, so capture works as with the socket option; the mode in force and every
/// kernel feature are visible in `/kernel` and `/metrics`.
#[test]
fn netns_cookies_read_through_the_connect4_probe_capture_as_the_sockopt_does() {
    let n = node("proxied");
    let agent = n.start_agent(&["--netns-cookie", "probe"]).unwrap();
    let kernel: serde_json::Value = serde_json::from_str(&agent.get("/kernel").unwrap()).unwrap();
    assert_eq!(kernel["netns_cookie"], "probe", "{kernel}");
    let has_sockopt = agent.kernel_feature("so_netns_cookie") == Some(true);
    let m = agent.get("/metrics").unwrap();
    assert_eq!(
        metric(&m, "mesh_kernel_feature", &[("feature", "so_netns_cookie")]),
        u64::from(has_sockopt),
        "{m}"
    );
    assert_eq!(metric(&m, "mesh_workloads_unresolved", &[]), 0, "{m}");

    let dst = format!("{}:8080", n.pod("server").ip);
    n.serve("server", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    echo_intact(&n, "client", &dst, MIB);
    assert_eq!(proxied_conns(&agent.get("/metrics").unwrap(), &dst), 1);
    // The probe's sockets are the agent's own: no connection of theirs reached the proxy,
    // and nothing is left in the probe map.
    let probes = mesh_tests::sh(&format!(
        "bpftool -j map dump pinned {}/NETNS_PROBE",
        n.pin_path.display()
    ))
    .unwrap();
    assert_eq!(probes.trim(), "[]", "{probes}");
}

/// The status never says captured for a workload the maps do not hold: a workload whose
/// network namespace cannot be read is reported unresolved, with the reason, in
/// `/workloads` and the metrics, while the others are captured.
#[test]
fn a_workload_whose_namespace_cannot_be_read_is_reported_unresolved() {
    let n = node("proxied");
    let missing = format!("/run/netns/mt-missing-{}", std::process::id());
    let yaml = config(&n, "proxied", true).replace(
        "workloads:\n",
        &format!("workloads:\n  - {{ name: ghost, namespace: shop, ip: 10.201.{}.250, netns: {missing} }}\n", n.index),
    );
    n.write_config(&yaml).unwrap();
    let agent = n.start_agent(&[]).unwrap();
    let ws: serde_json::Value = serde_json::from_str(&agent.get("/workloads").unwrap()).unwrap();
    let find = |name: &str| {
        ws["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {ws}"))
    };
    let ghost = find("ghost");
    assert!(
        ghost["unresolved"]
            .as_str()
            .is_some_and(|r| r.contains(&missing)),
        "{ghost}"
    );
    assert!(find("client")["unresolved"].is_null(), "{ws}");
    let m = agent.get("/metrics").unwrap();
    assert_eq!(metric(&m, "mesh_workloads_unresolved", &[]), 1, "{m}");
    // The others are captured all the same.
    let dst = format!("{}:8080", n.pod("server").ip);
    n.serve("server", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    echo_intact(&n, "client", &dst, MIB);
    assert_eq!(proxied_conns(&agent.get("/metrics").unwrap(), &dst), 1);
}

/// Issue 14, item 4: only TCP is carried (`connect_not_tcp` leaves other stream protocols,
/// SCTP, alone; this host's kernel has no SCTP to try it with). An MPTCP socket connects
/// through a TCP subflow, which is what connect4 sees: it is captured like TCP and, the
/// proxy answering plain TCP, runs as TCP, bytes intact through the proxy.
#[test]
fn an_mptcp_connection_runs_as_tcp_through_the_proxy() {
    let n = node("proxied");
    let mptcp = std::fs::read_to_string("/proc/sys/net/mptcp/enabled").unwrap_or_default();
    if mptcp.trim() != "1" {
        // A kernel without MPTCP (or with it off): no such socket can be made, so none can
        // go around the mesh either.
        let r = n
            .client(
                "client",
                &["proto-echo", "--to", "10.0.0.1:9", "--protocol", "262"],
            )
            .unwrap();
        assert!(
            r["errors"][0]
                .as_str()
                .is_some_and(|e| e.starts_with("connect: ")),
            "{r}"
        );
        return;
    }
    let agent = n.start_agent(&[]).unwrap();
    let dst = format!("{}:8080", n.pod("server").ip);
    n.serve("server", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    let not_tcp = agent.event("connect_not_tcp");
    let r = n
        .client(
            "client",
            &[
                "proto-echo",
                "--to",
                &dst,
                "--protocol",
                "262",
                "--bytes",
                "262144",
            ],
        )
        .unwrap();
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    assert_eq!(r["intact"], true, "{r}");
    assert_eq!(proxied_conns(&agent.get("/metrics").unwrap(), &dst), 1);
    assert_eq!(agent.event("connect_not_tcp"), not_tcp);
}

/// Issue 13, item 2: a pair that fell back to TCP under back-pressure comes back to the
/// short-circuit once what it sent over TCP has been read and the redirect queue drained,
/// and the bytes stay in order through every switch. A small queue floor makes the pair
/// switch often; echo and sink both check every byte.
#[test]
fn direct_mode_recovers_from_back_pressure_with_bytes_in_order() {
    for mode in ["direct", "proxied"] {
        let n = node(mode);
        let agent = n
            .start_agent(&["--skmsg-queue-floor", "65536", "--skmsg-upstream", "true"])
            .unwrap();
        let dst = format!("{}:8080", n.pod("server").ip);
        n.serve("server", &["echo", "--listen", "0.0.0.0:8080"])
            .unwrap();
        let r = n
            .client(
                "client",
                &[
                    "echo-client",
                    "--to",
                    &dst,
                    "--bytes",
                    &(32 * MIB).to_string(),
                    "--conns",
                    "4",
                ],
            )
            .unwrap();
        assert_intact(&r, 32 * MIB);
        let m = agent.get("/metrics").unwrap();
        eprintln!(
            "{mode}: backpressure {} recovered {} redirected bytes {}",
            agent.event("msg_pass_backpressure"),
            agent.event("msg_fallback_recovered"),
            agent.event("msg_redirected_bytes")
        );
        if queue_check(&agent) {
            assert!(agent.event("msg_pass_backpressure") >= 1, "{m}");
            assert!(agent.event("msg_fallback_recovered") >= 1, "{m}");
        } else {
            // Below 6.9 nothing is paired: TCP all the way, bytes intact (above).
            assert_eq!(agent.event("sockops_client_paired"), 0, "{m}");
        }
    }
}

/// A reader that waits for whole blocks (`recv(MSG_WAITALL)`) sits inside the TCP receive
/// path while it waits: bytes the pair sends meanwhile must still reach it, in order,
/// across every fallback and recovery (a small queue floor makes the pair switch often).
#[test]
fn a_waitall_reader_gets_every_byte_in_order_across_fallbacks() {
    let n = node("direct");
    let agent = n.start_agent(&["--skmsg-queue-floor", "65536"]).unwrap();
    let total = (64 * MIB).to_string();
    let python = std::env::var("MESH_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut server = n
        .pod_command("server", python.as_ref())
        .args(["-c", WAITALL_READER, "9100", &total, "0.005"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "listening");
    let sent = n
        .pod_command("client", python.as_ref())
        .args([
            "-c",
            PATTERN_WRITER,
            &n.pod("server").ip.to_string(),
            "9100",
            &total,
        ])
        .output()
        .unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let r: serde_json::Value = serde_json::from_str(line.trim())
        .unwrap_or_else(|e| panic!("{e}: {line:?}; writer: {sent:?}"));
    eprintln!(
        "waitall: {r}; backpressure {} recovered {} redirected bytes {}",
        agent.event("msg_pass_backpressure"),
        agent.event("msg_fallback_recovered"),
        agent.event("msg_redirected_bytes")
    );
    assert_eq!(r["error"], serde_json::Value::Null, "{r}");
    assert_eq!(
        r["bad_at"],
        serde_json::Value::Null,
        "bytes out of order: {r}"
    );
    assert_eq!(r["received"].as_u64().unwrap(), 64 * MIB, "{r}");
}

/// Reads `total` bytes in 1 MiB `MSG_WAITALL` blocks, checking each against the writer's
/// pattern (each 8 bytes: their own offset / 8, little-endian); prints one JSON line.
const WAITALL_READER: &str = r#"
import socket, sys, time, array, json
port=int(sys.argv[1]); total=int(sys.argv[2]); delay=float(sys.argv[3])
ls=socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", port)); ls.listen(1); print("listening", flush=True)
c,_=ls.accept(); c.settimeout(20)
got=0; bad=None; err=None; chunk=1<<20
while got<total:
    try:
        b=c.recv(min(chunk,total-got), socket.MSG_WAITALL)
    except Exception as e:
        err=repr(e); break
    if not b: break
    if bad is None:
        # bytes are 8-byte little-endian counters of their own offset / 8 (offsets stay 8-aligned only if len%8==0)
        start=got
        a0=start//8; pad=start%8
        exp=array.array('Q', range(a0, (start+len(b))//8+2)).tobytes()[pad:pad+len(b)]
        if b!=exp:
            i=next(i for i in range(len(b)) if b[i]!=exp[i]); bad=start+i
    got+=len(b)
    if delay: time.sleep(delay)
print(json.dumps({"received": got, "bad_at": bad, "error": err}), flush=True)
"#;

/// Writes `total` bytes of that pattern in 256 KiB writes, then waits for the reader's close.
const PATTERN_WRITER: &str = r#"
import socket, sys, array
host=sys.argv[1]; port=int(sys.argv[2]); total=int(sys.argv[3])
s=socket.create_connection((host,port)); step=256*1024; off=0
while off<total:
    n=min(step,total-off)
    s.sendall(array.array('Q', range(off//8, (off+n)//8)).tobytes())
    off+=n
s.shutdown(socket.SHUT_WR); s.recv(1); print("sent", off, flush=True)
"#;

/// Whether the agent's kernel has the sk_msg back-pressure check (6.9+).
fn queue_check(agent: &mesh_tests::Agent) -> bool {
    agent.kernel_feature("skmsg_queue_length") == Some(true)
}
