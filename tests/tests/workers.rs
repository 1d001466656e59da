//! The node proxy's workers (`--proxy-workers`, `proxy::workers`): a current-thread
//! runtime per thread, each accepting from its own `SO_REUSEPORT` listener. Connections
//! are spread over every worker, and a hand-over passes every listener of the group on,
//! to an agent with as many workers or fewer, losing no connection.

use std::{
    sync::atomic::{AtomicBool, Ordering::Relaxed},
    time::Duration,
};

use mesh_tests::{intact, metric, scenes::workload_entry, wait_for, Agent, SimNode};

fn node() -> SimNode {
    let mut n = SimNode::new().expect("sim node");
    for (name, host) in [("client", 2), ("server", 3)] {
        n.add_pod(name, host).unwrap();
    }
    let w = |name: &str, ns: &str| workload_entry(n.pod(name), ns, "", "{}", "");
    let yaml = format!(
        "namespaces:\n\
         \x20 - {{ name: shop, labels: {{ mesh-agent.io/dataplane-mode: ambient, mesh-agent.io/fail-mode: closed }} }}\n\
         \x20 - {{ name: backend }}\n\
         workloads:\n{}{}",
        w("client", "shop"),
        w("server", "backend"),
    );
    n.write_config(&yaml).unwrap();
    n.serve("server", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    n
}

fn accepted(agent: &Agent, worker: &str) -> u64 {
    metric(
        &agent.get("/metrics").unwrap_or_default(),
        "mesh_proxy_worker_connections_total",
        &[("worker", worker)],
    )
}

#[test]
fn connections_are_spread_over_the_workers_and_a_handover_loses_none() {
    let n = node();
    let dst = format!("{}:8080", n.pod("server").ip);
    let mut old = n.start_agent(&["--proxy-workers", "2"]).unwrap();
    for _ in 0..40 {
        let r = n.echo_once("client", &dst).unwrap();
        assert!(intact(&r), "{r}");
    }
    // The kernel hashes each connection to one of the two listeners: both get some.
    let (w0, w1) = (accepted(&old, "0"), accepted(&old, "1"));
    assert_eq!(w0 + w1, 40, "{}", old.get("/metrics").unwrap());
    assert!(w0 > 0 && w1 > 0, "worker 0: {w0}, worker 1: {w1}");
    assert_eq!(accepted(&old, "2"), 0);

    // A hand-over to an agent with one worker, connections all along (fail-closed client:
    // a connection that found no proxy would be refused, not sent around).
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let churn = s.spawn(|| {
            let mut results = Vec::new();
            let until = std::time::Instant::now() + Duration::from_secs(60);
            while !stop.load(Relaxed) && std::time::Instant::now() < until {
                results.push(n.echo_once("client", &dst).unwrap());
            }
            results
        });
        std::thread::sleep(Duration::from_millis(300));
        let new = n.start_agent_as(
            "agent-new",
            n.admin_port + 500,
            &["--takeover", "true", "--proxy-workers", "1"],
        );
        let new = match new {
            Ok(a) => a,
            Err(e) => {
                stop.store(true, Relaxed);
                panic!("{e:#}");
            }
        };
        assert!(
            new.log_text().contains("listeners=2"),
            "both listeners handed over: {}",
            new.log_text()
        );
        wait_for(
            "the old agent to finish draining",
            Duration::from_secs(10),
            || old.log_text().contains("waiting for the signal to exit"),
        );
        // Both sockets of the group are the new agent's one worker's now: connections
        // the kernel hashes to either are served.
        let before = accepted(&new, "0");
        std::thread::sleep(Duration::from_millis(500));
        let (code, log) = old.stop();
        assert_eq!(code, Some(0), "{log}");
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Relaxed);
        let results = churn.join().unwrap();
        assert!(results.len() >= 10, "{}", results.len());
        for r in &results {
            assert!(intact(r), "{r}");
        }
        for event in [
            "connect_proxy_not_ready",
            "connect_proxy_stale",
            "connect_refused",
        ] {
            assert_eq!(new.stat(event), 0, "{event}");
        }
        for _ in 0..20 {
            let r = n.echo_once("client", &dst).unwrap();
            assert!(intact(&r), "{r}");
        }
        assert!(accepted(&new, "0") >= before + 20);
        drop(new);
    });
}
