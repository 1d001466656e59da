//! The node proxy's runtime on a simulated node: by default one worker thread per CPU the
//! agent may run on (a proxy pinned to one CPU never hands a connection between two
//! workers), `--proxy-workers` overriding it, and traffic relayed either way.

use std::{fs, time::Duration};

use mesh_tests::{metric, on_cpu, scenes::client_server, wait_for, Agent, SimNode};

fn node() -> SimNode {
    let n = client_server("");
    n.serve("server", &["echo", "--listen", "0.0.0.0:7000"])
        .unwrap();
    n
}

/// Threads of `pid` named as the proxy names its workers (`mesh-proxy-N`, a current-thread
/// runtime each).
fn proxy_threads(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the agent's threads")
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end().starts_with("mesh-proxy-"))
        .count()
}

/// An echo through the proxy arrives whole, and the proxy counted it.
fn echo_through_proxy(n: &SimNode, agent: &Agent) {
    let to = format!("{}:7000", n.pod("server").ip);
    let r = n.echo_once("client", &to).unwrap();
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    let labels = [("destination_address", to.as_str())];
    wait_for(
        "the proxy counted the flow",
        Duration::from_secs(10),
        || {
            let text = agent.get("/metrics").unwrap_or_default();
            metric(&text, "mesh_tcp_connections_closed_total", &labels) >= 1
        },
    );
}

#[test]
fn one_proxy_worker_per_allowed_cpu_unless_told() {
    let n = node();
    let pinned = on_cpu(0, || n.start_agent(&[]).unwrap());
    assert_eq!(
        proxy_threads(pinned.pid()),
        1,
        "pinned to one CPU: one worker"
    );
    echo_through_proxy(&n, &pinned);
    assert_eq!(
        proxy_threads(pinned.pid()),
        1,
        "no other thread after traffic"
    );
    drop(pinned);

    let three = n.start_agent(&["--proxy-workers", "3"]).unwrap();
    assert_eq!(proxy_threads(three.pid()), 3);
    echo_through_proxy(&n, &three);
}
