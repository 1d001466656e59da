//! Fail modes (issue 10 "fail modes by policy", issue 9 item 3): when the mesh cannot
//! serve a workload's connection (the proxy stuck, the configuration unknown), a
//! fail-open workload's connection goes around the mesh and a fail-closed one's is
//! refused, each counted; nothing skips the mesh silently, and capture resumes when the
//! proxy recovers.

use std::{process::Command, time::Duration};

use mesh_tests::{agent_bin, intact, metric, wait_for, SimNode, HEARTBEAT_DEFAULT};

/// `shop/open` fails open, `vault/closed` fails closed (namespace label), `vault/loose`
/// overrides it to open, `ops/bypassed` is enrolled but bypassed; `backend/server` serves.
fn node() -> SimNode {
    let mut n = SimNode::new().expect("sim node");
    for (name, host) in [
        ("open", 2),
        ("closed", 3),
        ("loose", 4),
        ("bypassed", 5),
        ("server", 6),
    ] {
        n.add_pod(name, host).unwrap();
    }
    let p = |name: &str| (n.pod(name).ip, n.pod(name).netns_path());
    let w = |name: &str, ns: &str, labels: &str| {
        let (ip, netns) = p(name);
        format!("  - {{ name: {name}, namespace: {ns}, ip: {ip}, netns: {netns}, labels: {{ {labels} }} }}\n")
    };
    let yaml = format!(
        "namespaces:\n\
         \x20 - {{ name: shop, labels: {{ mesh-agent.io/dataplane-mode: ambient }} }}\n\
         \x20 - {{ name: vault, labels: {{ mesh-agent.io/dataplane-mode: ambient, mesh-agent.io/fail-mode: closed }} }}\n\
         \x20 - {{ name: ops, labels: {{ mesh-agent.io/dataplane-mode: ambient, mesh-agent.io/bypass: \"true\" }} }}\n\
         \x20 - {{ name: backend }}\n\
         workloads:\n{}{}{}{}{}",
        w("open", "shop", ""),
        w("closed", "vault", ""),
        w("loose", "vault", "mesh-agent.io/fail-mode: open"),
        w("bypassed", "ops", ""),
        w("server", "backend", ""),
    );
    n.write_config(&yaml).unwrap();
    n.serve("server", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    n.serve("server", &["echo", "--listen", "0.0.0.0:9090"])
        .unwrap();
    n
}

fn proxied(agent_metrics: &str, src: &str) -> u64 {
    metric(
        agent_metrics,
        "mesh_tcp_connections_opened_total",
        &[("source_workload", src)],
    )
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn a_stuck_proxy_is_bypassed_or_refused_within_a_second_then_used_again() {
    let n = node();
    // The agent's own 1 s timeout (the harness gives agents a longer one).
    let agent = n.start_agent(&HEARTBEAT_DEFAULT).unwrap();
    let dst = format!("{}:8080", n.pod("server").ip);
    for pod in ["open", "closed", "loose", "bypassed"] {
        assert!(intact(&n.echo_once(pod, &dst).unwrap()), "{pod}");
    }
    let m = agent.get("/metrics").unwrap();
    for (pod, ns, through_proxy) in [
        ("open", "shop", 1),
        ("closed", "vault", 1),
        ("loose", "vault", 1),
        ("bypassed", "ops", 0),
    ] {
        assert_eq!(
            proxied(&m, &format!("{ns}/{pod}")),
            through_proxy,
            "{pod}:\n{m}"
        );
    }
    let bypassed = agent.stat("connect_bypass");
    assert_eq!(bypassed, 1);

    // The agent stops answering (stuck, not dead: its programs stay attached). Its last
    // heartbeat is at most 200 ms old; after the 1 s timeout the datapath stops sending
    // connections to it.
    signal(agent.pid(), "-STOP");
    std::thread::sleep(Duration::from_millis(1100));
    let r = n.echo_once("open", &dst).unwrap();
    assert!(intact(&r), "a fail-open workload goes direct: {r}");
    let r = n.echo_once("loose", &dst).unwrap();
    assert!(intact(&r), "the pod's own fail mode wins: {r}");
    let r = n.echo_once("closed", &dst).unwrap();
    assert_eq!(
        r["errors"],
        serde_json::json!(["connect: EPERM"]),
        "a fail-closed workload is refused: {r}"
    );
    assert_eq!(agent.stat("connect_proxy_stale"), 2);
    assert_eq!(agent.stat("connect_refused"), 1);

    // It recovers: connections are captured again within a heartbeat.
    signal(agent.pid(), "-CONT");
    wait_for("the proxy taken back", Duration::from_secs(3), || {
        intact(&n.echo_once("closed", &dst).unwrap())
    });
    assert!(intact(&n.echo_once("open", &dst).unwrap()));
    let m = agent.get("/metrics").unwrap();
    assert!(proxied(&m, "vault/closed") >= 2, "{m}");
    assert_eq!(proxied(&m, "shop/open"), 2, "{m}");
    let health = agent.cli(&["dump", "PROXY_HEALTH", "-o", "json"]);
    let health: serde_json::Value = serde_json::from_slice(&health.stdout).unwrap();
    assert_eq!(health[0]["stale_after_ms"], 1000, "{health}");
    assert!(
        health[0]["heartbeat_age_ms"].as_u64().unwrap() < 1000,
        "{health}"
    );
}

/// The control plane stalls (stopped, its stream still open): a connection to a new
/// destination waits for its configuration (bounded), then fails open or closed.
#[test]
fn an_unknown_configuration_is_passed_or_refused_per_fail_mode() {
    let n = node();
    let lo = std::net::Ipv4Addr::LOCALHOST;
    let port = {
        let l = std::net::TcpListener::bind((lo, 0)).unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cp = Command::new(agent_bin())
        .args(["control-plane", "--config"])
        .arg(n.config_path())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = cp.id();
    wait_for("the control plane", Duration::from_secs(10), || {
        cp.try_wait().unwrap().is_none() && std::net::TcpStream::connect((lo, port)).is_ok()
    });
    let _cp = Reap(cp);
    let agent = n
        .start_agent(&[
            "--xds-address",
            &format!("http://127.0.0.1:{port}"),
            "--xds-on-demand-timeout-ms",
            "300",
        ])
        .unwrap();
    let server = n.pod("server").ip;
    // Known destinations (answered: no listener) before the stall.
    for pod in ["open", "closed"] {
        assert!(
            intact(&n.echo_once(pod, &format!("{server}:8080")).unwrap()),
            "{pod}"
        );
    }
    signal(pid, "-STOP");
    let fresh = format!("{server}:9090");
    let r = n.echo_once("open", &fresh).unwrap();
    assert!(intact(&r), "fail open: relayed as plain TCP: {r}");
    let r = n.echo_once("closed", &fresh).unwrap();
    assert_ne!(r["errors"], serde_json::json!([]), "fail closed: {r}");
    assert!(
        r["errors"].to_string().contains("ECONNRESET"),
        "refused with a reset: {r}"
    );
    let m = agent.get("/metrics").unwrap();
    let unknown = |outcome| {
        metric(
            &m,
            "mesh_proxy_config_unknown_total",
            &[("outcome", outcome)],
        )
    };
    assert_eq!(unknown("passed"), 1, "{m}");
    assert_eq!(unknown("refused"), 1, "{m}");
    // The destination answered before the stall is still known: no wait, no refusal.
    assert!(intact(
        &n.echo_once("closed", &format!("{server}:8080")).unwrap()
    ));
    signal(pid, "-CONT");
    wait_for(
        "the closed workload served again",
        Duration::from_secs(5),
        || intact(&n.echo_once("closed", &fresh).unwrap()),
    );
}
