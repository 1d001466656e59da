//! The node proxy's workers (`--proxy-workers`, `proxy::workers`): a current-thread
//! runtime per thread, each accepting from its own `SO_REUSEPORT` listener. Connections
//! are spread over every worker, and a hand-over passes every listener of the group on,
//! to an agent with as many workers or fewer, losing no connection.

use std::{
    sync::atomic::{AtomicBool, Ordering::Relaxed},
    time::Duration,
};

use mesh_tests::{
    intact, metric,
    scenes::{inbound_pods, listening, workload_entry},
    wait_for, Agent, SimNode,
};

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

fn inbound_on(agent: &Agent, listener: &str, worker: &str) -> u64 {
    metric(
        &agent.get("/metrics").unwrap_or_default(),
        "mesh_inbound_worker_connections_total",
        &[("listener", listener), ("worker", worker)],
    )
}

/// The agent's listeners in `netns` (15006, 15008), one line per listening socket.
fn in_pod_listeners(netns: &str) -> Vec<String> {
    listening(netns, &[15006, 15008])
}

/// Inbound capture's in-pod listeners are one socket each that every worker accepts
/// from: connections from outside the mesh to an enrolled pod are served by both
/// workers, and the pod leaving the mesh closes its listeners (no worker keeps one open).
#[test]
fn inbound_connections_are_served_by_every_worker_and_a_leaving_pod_closes_its_listeners() {
    let mut n = SimNode::new().expect("sim node");
    n.add_pod("web", 2).unwrap();
    n.add_pod("outsider", 3).unwrap();
    let yaml = |enrolled: bool| {
        let label = if enrolled {
            "{ mesh-agent.io/dataplane-mode: ambient }"
        } else {
            "{}"
        };
        format!(
            "namespaces:\n  - {{ name: app, labels: {label} }}\n  - {{ name: legacy }}\n\
             workloads:\n{}{}",
            workload_entry(n.pod("web"), "app", "", "{}", ""),
            workload_entry(n.pod("outsider"), "legacy", "", "{}", ""),
        )
    };
    n.write_config(&yaml(true)).unwrap();
    n.serve("web", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    let agent = n.start_agent(&["--proxy-workers", "2"]).unwrap();
    let web = n.pod("web");
    wait_for("web's inbound capture", Duration::from_secs(10), || {
        inbound_pods(&agent) == 1
    });
    // One socket per listener whatever the workers: 15006 and 15008.
    let listening = in_pod_listeners(&web.netns);
    assert_eq!(listening.len(), 2, "{listening:?}");
    let dst = format!("{}:8080", web.ip);
    // Connections in parallel bursts: whichever worker calls accept first takes each.
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    (0..15)
                        .map(|_| n.echo_once("outsider", &dst).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for r in runs {
            for r in r.join().unwrap() {
                assert!(intact(&r), "{r}");
            }
        }
    });
    let (w0, w1) = (
        inbound_on(&agent, "plain", "0"),
        inbound_on(&agent, "plain", "1"),
    );
    let m = agent.get("/metrics").unwrap();
    assert_eq!(w0 + w1, 60, "{m}");
    assert!(w0 > 0 && w1 > 0, "worker 0: {w0}, worker 1: {w1}");
    assert_eq!(
        metric(
            &m,
            "mesh_inbound_connections_total",
            &[("outcome", "delivered")]
        ),
        60,
        "{m}"
    );
    eprintln!("inbound connections by worker: {w0} / {w1}");

    // The namespace leaves the mesh: no listener is left in the pod on any worker, and
    // connections go straight to the application.
    n.write_config(&yaml(false)).unwrap();
    wait_for("web's listeners closed", Duration::from_secs(10), || {
        in_pod_listeners(&web.netns).is_empty()
    });
    let r = n.echo_once("outsider", &dst).unwrap();
    assert!(intact(&r), "{r}");
    assert_eq!(
        w0 + w1,
        inbound_on(&agent, "plain", "0") + inbound_on(&agent, "plain", "1")
    );
    // And back in: listeners again, served.
    n.write_config(&yaml(true)).unwrap();
    wait_for("web's capture again", Duration::from_secs(10), || {
        in_pod_listeners(&web.netns).len() == 2 && inbound_pods(&agent) == 1
    });
    let r = n.echo_once("outsider", &dst).unwrap();
    assert!(intact(&r), "{r}");
    assert_eq!(
        w0 + w1 + 1,
        inbound_on(&agent, "plain", "0") + inbound_on(&agent, "plain", "1")
    );
}

/// Cross-node mTLS: node 1's in-pod HBONE listener (15008 in `server-b`) is served by
/// every worker too. Each agent node 0 runs opens a tunnel connection per source
/// identity (`client-a`, `client-x`): three agents in turn make six connections, each
/// taken by whichever of node 1's workers accepts first (which worker is not fixed: the
/// unit test `hbone::tests::every_worker_serves_tunnels_of_a_shared_listener` shows each
/// worker serving on its own). When `server-b` leaves, its listeners close.
#[test]
fn hbone_connections_are_accepted_by_the_workers_of_the_destination_node() {
    use mesh_tests::scenes::two_nodes::{TwoNodes, CLIENT_A, CLIENT_X, SERVER_B};

    let c = TwoNodes::new(&[CLIENT_A, CLIENT_X, SERVER_B]);
    c.node(1)
        .serve("server-b", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    c.write_file("");
    let args = ["--proxy-workers", "2"];
    let mut agents = c.start_agents(&args);
    c.wait_mesh(&agents);
    let to = format!("{}:8080", c.pod("server-b").ip);
    let hbone = |a: &mesh_tests::cluster::NodeAgent, w: &str| {
        metric(
            &a.get("/metrics").unwrap_or_default(),
            "mesh_inbound_worker_connections_total",
            &[("listener", "hbone"), ("worker", w)],
        )
    };
    for round in 0..3 {
        if round > 0 {
            let (code, log) = agents[0].stop();
            assert_eq!(code, Some(0), "{log}");
            agents[0] = c.node(0).start_agent(&args).expect("agent");
            c.wait_mesh(&agents[..1]);
        }
        for pod in ["client-a", "client-x"] {
            let r = c.node(0).echo(pod, &to, 256 << 10).unwrap();
            assert!(intact(&r), "{pod}: {r}");
        }
    }
    let (w0, w1) = (hbone(&agents[1], "0"), hbone(&agents[1], "1"));
    eprintln!("HBONE connections by worker on node 1: {w0} / {w1}");
    assert!(w0 + w1 >= 6, "worker 0: {w0}, worker 1: {w1}");
    let streams = metric(
        &agents[1].get("/metrics").unwrap(),
        "mesh_hbone_streams_total",
        &[("direction", "in")],
    );
    assert!(streams >= 6, "{streams}");
    // server-b leaves the mesh: its in-pod listeners close on every worker.
    let netns = c.pod("server-b").netns.clone();
    assert_eq!(in_pod_listeners(&netns).len(), 2);
    c.write_text(&c.file_of(&[CLIENT_A, CLIENT_X], ""));
    wait_for(
        "server-b's listeners closed",
        Duration::from_secs(10),
        || in_pod_listeners(&netns).is_empty(),
    );
}
