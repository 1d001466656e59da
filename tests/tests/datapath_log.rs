//! Issue 14, item 7: the eBPF programs' decisions in the agent's log (aya-log), at a level
//! set at run time from the agent's log filter, off by default. Its own test binary, and
//! part of `datapath` (so the kernel matrix runs it on every kernel).

use std::time::Duration;

use mesh_tests::{wait_for, Agent, SimNode};

/// The agent's tracing target for the programs' records.
const TARGET: &str = "mesh_agent::datapath::events";

/// `shop/client` enrolled, `backend/server` proxied with port 9090 excluded, `legacy/old`
/// not enrolled.
fn node() -> SimNode {
    let mut n = SimNode::new().expect("sim node");
    n.add_pod("client", 2).unwrap();
    n.add_pod("server", 3).unwrap();
    n.add_pod("old", 4).unwrap();
    let p = |name: &str| n.pod(name);
    let yaml = format!(
        "exclude:\n  - {{ cidr: {server}/32, port: 9090 }}\n\
         namespaces:\n\
         \x20 - {{ name: shop, labels: {{ mesh-agent.io/dataplane-mode: ambient }} }}\n\
         \x20 - {{ name: backend, labels: {{ mesh-agent.io/dataplane-mode: ambient }} }}\n\
         \x20 - {{ name: legacy }}\n\
         workloads:\n\
         \x20 - {{ name: client, namespace: shop, ip: {}, netns: {} }}\n\
         \x20 - {{ name: server, namespace: backend, ip: {server}, netns: {} }}\n\
         \x20 - {{ name: old, namespace: legacy, ip: {}, netns: {} }}\n",
        p("client").ip,
        p("client").netns_path(),
        p("server").netns_path(),
        p("old").ip,
        p("old").netns_path(),
        server = p("server").ip,
    );
    n.write_config(&yaml).unwrap();
    n
}

/// The agent's log lines of the programs' records.
fn records(agent: &Agent) -> Vec<String> {
    agent
        .log_text()
        .lines()
        .filter(|l| l.contains(&format!(" {TARGET}: ")))
        .map(str::to_owned)
        .collect()
}

/// `CONFIG.log_level` as the programs see it (`mesh-agent dump CONFIG`).
fn kernel_level(agent: &Agent) -> String {
    let out = agent.cli(&["dump", "CONFIG", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["log_level"].as_str().unwrap_or_default().to_owned()
}

fn log_level(agent: &Agent, filter: &str) {
    let out = std::process::Command::new(mesh_tests::agent_bin())
        .args(["log-level", filter, "--admin-address"])
        .arg(format!("127.0.0.1:{}", agent.admin_port))
        .output()
        .expect("run mesh-agent");
    assert!(
        out.status.success(),
        "log-level {filter}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One short echo exchange from `pod` to `to` (the bytes come back intact).
fn echo(n: &SimNode, pod: &str, to: &str) {
    let r = n
        .client(pod, &["echo-client", "--to", to, "--bytes", "4096"])
        .unwrap();
    assert!(mesh_tests::intact(&r), "{r}");
}

#[test]
fn decisions_are_logged_with_the_flow_only_while_the_level_is_raised() {
    let n = node();
    let agent = n.start_agent(&[]).unwrap();
    let (client, server) = (n.pod("client").ip, n.pod("server").ip);
    for port in ["8080", "9090"] {
        n.serve("server", &["echo", "--listen", &format!("0.0.0.0:{port}")])
            .unwrap();
    }
    let captured = format!("{server}:8080");
    let excluded = format!("{server}:9090");
    let cookie = {
        let out = agent.cli(&["dump", "WORKLOADS", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .find(|w| w["ip"] == client.to_string().as_str())
            .map(|w| w["netns_cookie"].as_u64().unwrap())
            .expect("the client in WORKLOADS")
    };

    // Off by default: the programs are told so, and nothing reaches the log.
    assert_eq!(kernel_level(&agent), "off");
    echo(&n, "client", &captured);
    echo(&n, "client", &excluded);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(records(&agent), Vec::<String>::new());
    assert_eq!(agent.event("connect_redirected"), 1);
    assert_eq!(agent.event("connect_excluded"), 1);

    // Raised at run time for the datapath alone.
    log_level(&agent, &format!("{TARGET}=debug,info"));
    assert_eq!(kernel_level(&agent), "debug");
    echo(&n, "client", &captured);
    echo(&n, "client", &excluded);
    echo(&n, "old", &captured);
    let flow = |dst: &str| format!("netns={cookie} src={client} dst={dst}");
    let has = |what: &str, dst: &str| {
        records(&agent)
            .iter()
            .any(|l| l.contains(what) && l.contains(&flow(dst)))
    };
    wait_for("the decision records", Duration::from_secs(10), || {
        has("connect_redirected: captured", &captured)
            && has("connect_excluded: not captured", &excluded)
    });
    let lines = records(&agent);
    // sockops names the client's 4-tuple and the original destination.
    assert!(
        lines
            .iter()
            .any(|l| l.contains("flow_recorded: proxied client established")
                && l.contains(&format!("netns={cookie} {client}:"))
                && l.contains(&format!("orig={captured}"))),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("flow_accepted") && l.contains(&format!("orig={captured}"))),
        "{lines:#?}"
    );
    // Exactly one record per decision and connection (no duplicates, nothing per message).
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("connect_redirected") && l.contains(&client.to_string()))
            .count(),
        1,
        "{lines:#?}"
    );
    // The program is named.
    assert!(lines.iter().all(|l| l.contains("program=")), "{lines:#?}");
    // A namespace that is not enrolled is a trace record: not at debug.
    assert!(
        !lines.iter().any(|l| l.contains("connect_not_enrolled")),
        "{lines:#?}"
    );
    log_level(&agent, &format!("{TARGET}=trace,info"));
    assert_eq!(kernel_level(&agent), "trace");
    echo(&n, "old", &captured);
    wait_for("the not-enrolled record", Duration::from_secs(10), || {
        records(&agent)
            .iter()
            .any(|l| l.contains("connect_not_enrolled") && l.contains(&format!("dst={captured}")))
    });

    // Back off: the programs stop writing, nothing more is logged.
    log_level(&agent, "info");
    assert_eq!(kernel_level(&agent), "off");
    let before = records(&agent).len();
    echo(&n, "client", &captured);
    echo(&n, "client", &excluded);
    echo(&n, "old", &captured);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(records(&agent).len(), before);
}
