//! Agent restarts that keep the datapath (`--on-exit keep`, issue 10): while no agent runs
//! the programs stay attached, so fail modes still hold (fail-closed workloads refused,
//! fail-open ones direct, both counted) and paired sockets stay short-circuited; the next
//! agent adopts the pinned maps (their state and counters carry over) and swaps its
//! programs into the pinned links in one step.

use std::time::Duration;

use mesh_tests::{intact, metric, wait_for, SimNode};

fn node() -> SimNode {
    let mut n = SimNode::new().expect("sim node");
    for (name, host) in [("open", 2), ("closed", 3), ("server", 4), ("cache", 5)] {
        n.add_pod(name, host).unwrap();
    }
    let w = |name: &str, ns: &str| {
        let p = n.pod(name);
        format!(
            "  - {{ name: {name}, namespace: {ns}, ip: {}, netns: {} }}\n",
            p.ip,
            p.netns_path()
        )
    };
    let yaml = format!(
        "namespaces:\n\
         \x20 - {{ name: shop, labels: {{ mesh-agent.io/dataplane-mode: ambient }} }}\n\
         \x20 - {{ name: vault, labels: {{ mesh-agent.io/dataplane-mode: ambient, mesh-agent.io/fail-mode: closed }} }}\n\
         \x20 - {{ name: backend }}\n\
         \x20 - {{ name: cache, mode: direct }}\n\
         workloads:\n{}{}{}{}",
        w("open", "shop"),
        w("closed", "vault"),
        w("server", "backend"),
        w("cache", "cache"),
    );
    n.write_config(&yaml).unwrap();
    n.serve("server", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    n.serve("cache", &["echo", "--listen", "0.0.0.0:6379"])
        .unwrap();
    n
}

#[test]
fn a_kept_datapath_holds_fail_modes_while_no_agent_runs_and_is_adopted() {
    let n = node();
    let server = format!("{}:8080", n.pod("server").ip);
    let cache = format!("{}:6379", n.pod("cache").ip);
    let mut first = n.start_agent(&["--on-exit", "keep"]).unwrap();
    let attached = n.cgroup_programs().unwrap();
    assert_eq!(attached.len(), 5, "{attached:?}");
    for pod in ["open", "closed"] {
        assert!(intact(&n.echo_once(pod, &server).unwrap()), "{pod}");
    }
    // A long-lived direct-mode pair, short-circuited in the kernel.
    let mut pair = n
        .pod_command("open", &mesh_tests::podtool())
        .args(["ping", "--to", &cache, "--count", "100000000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        "the pair to be short-circuited",
        Duration::from_secs(5),
        || first.stat("msg_redirected") > 100,
    );

    let (code, log) = first.stop();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("programs left attached"), "{log}");
    // No agent runs: the programs are still there...
    assert_eq!(n.cgroup_programs().unwrap(), attached);
    // ...the pair is still short-circuited...
    let before = first.stat("msg_redirected");
    wait_for(
        "redirects with no agent running",
        Duration::from_secs(5),
        || first.stat("msg_redirected") > before + 100,
    );
    // ...and the fail modes hold: open goes direct, closed is refused, both counted.
    assert!(intact(&n.echo_once("open", &server).unwrap()));
    let r = n.echo_once("closed", &server).unwrap();
    assert_eq!(r["errors"], serde_json::json!(["connect: EPERM"]), "{r}");
    assert_eq!(first.stat("connect_proxy_not_ready"), 1);
    assert_eq!(first.stat("connect_refused"), 1);

    // The next agent adopts what was left: maps with their state, links updated in place.
    let mut second = n.start_agent(&[]).unwrap();
    let log = second.log_text();
    assert!(
        log.contains("adopted the datapath an earlier agent left pinned"),
        "{log}"
    );
    assert!(log.contains("links=5"), "{log}");
    assert_eq!(n.cgroup_programs().unwrap().len(), 5, "replaced, not added");
    // Counters carried over (the pinned STATS map was adopted).
    assert_eq!(second.stat("connect_refused"), 1);
    for pod in ["open", "closed"] {
        assert!(intact(&n.echo_once(pod, &server).unwrap()), "{pod}");
    }
    let m = second.get("/metrics").unwrap();
    assert_eq!(
        metric(
            &m,
            "mesh_tcp_connections_opened_total",
            &[("source_workload", "vault/closed")]
        ),
        1,
        "{m}"
    );
    assert!(
        pair.try_wait().unwrap().is_none(),
        "the pair survived both restarts"
    );
    let _ = pair.kill();
    let _ = pair.wait();
    // This one detaches on exit (the default): nothing left behind.
    let (code, log) = second.stop();
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(n.cgroup_programs().unwrap(), Vec::<String>::new());
    assert!(!n.pin_path.exists(), "pins removed");
}

/// Issue 10, "hitless restart and upgrade": a new agent (`--takeover`) takes the node from
/// a running one while a transfer goes through the old agent's proxy and new connections
/// keep arriving. The old agent hands its listener over, the new one adopts the datapath,
/// and the old one drains: zero bytes lost, zero connections refused or sent around the
/// mesh.
#[test]
fn a_takeover_loses_no_byte_and_refuses_no_connection() {
    let n = node();
    let server = n.pod("server").ip;
    let echo_dst = format!("{server}:8080");
    let total: u64 = 48 << 20;
    // 16 KiB every 2 ms: about 6 s of stream, relayed by the old agent to its end.
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
    let mut old = n.start_agent(&[]).unwrap();
    let stream_dst = format!("{server}:9100");
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let stream = s.spawn(|| {
            n.client("closed", &["read-client", "--to", &stream_dst])
                .unwrap()
        });
        // New connections all along, from a fail-open and a fail-closed workload.
        let churn = s.spawn(|| {
            let mut results = Vec::new();
            // Bounded, so a failing test cannot hang here.
            let until = std::time::Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && std::time::Instant::now() < until
            {
                for pod in ["open", "closed"] {
                    results.push((pod, n.echo_once(pod, &echo_dst).unwrap()));
                }
            }
            results
        });
        wait_for(
            "the stream through the old proxy",
            Duration::from_secs(5),
            || {
                metric(
                    &old.get("/metrics").unwrap_or_default(),
                    "mesh_tcp_connections_opened_total",
                    &[("destination_address", &stream_dst)],
                ) == 1
            },
        );
        let new = n.start_agent_as("agent-new", n.admin_port + 500, &["--takeover", "true"]);
        let new = match new {
            Ok(a) => a,
            Err(e) => {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                panic!("{e:#}");
            }
        };
        assert!(
            new.log_text().contains("taking the node"),
            "{}",
            new.log_text()
        );
        // The old agent relays its stream to the end, closes its control listeners (the
        // admin port now answers from the new agent only), then waits for its signal.
        let r = stream.join().unwrap();
        assert_eq!(r["outcome"], "eof", "{r}");
        assert_eq!(r["received"].as_u64().unwrap(), total, "{r}");
        wait_for(
            "the old agent to finish draining",
            Duration::from_secs(10),
            || old.log_text().contains("waiting for the signal to exit"),
        );
        assert_eq!(
            old.wait_exit(Duration::from_millis(500)),
            None,
            "it stays until told"
        );
        for _ in 0..20 {
            // SO_REUSEPORT would spread these over both agents if the old one still listened.
            assert!(mesh_tests::http_get(n.admin_port, "/ready").is_err());
        }
        let (code, log) = old.stop();
        assert_eq!(code, Some(0), "{log}");
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let results = churn.join().unwrap();
        assert!(results.len() >= 4, "{}", results.len());
        for (pod, r) in &results {
            assert!(intact(r), "{pod}: {r}");
        }
        // None went around the mesh or was refused: every one reached a proxy.
        for event in [
            "connect_proxy_not_ready",
            "connect_proxy_stale",
            "connect_refused",
        ] {
            assert_eq!(new.stat(event), 0, "{event}");
        }
        assert_eq!(n.cgroup_programs().unwrap().len(), 5);
        // The new agent serves the node on its own now.
        assert!(intact(&n.echo_once("closed", &echo_dst).unwrap()));
        let m = new.get("/metrics").unwrap();
        assert!(
            metric(
                &m,
                "mesh_tcp_connections_opened_total",
                &[("source_workload", "vault/closed")]
            ) >= 1,
            "{m}"
        );
        drop(new);
    });
}
