//! Access logs (issue 12, item 2) on a simulated node: with `--access-log <file>` every
//! proxied TCP connection and every HTTP request through the L7 engine leaves one JSON
//! line with what the proxy knew of it; without the flag nothing is written.

use std::{path::Path, time::Duration};

use mesh_tests::{
    metric,
    scenes::{mesh_file, NS_BACKEND, NS_LEGACY, NS_SHOP},
    wait_for, SimNode,
};
use serde_json::Value;

fn node() -> SimNode {
    let mut n = SimNode::new().expect("sim node");
    n.add_pod("client", 2).unwrap();
    n.add_pod("v1", 3).unwrap();
    n.add_pod("db", 4).unwrap();
    n.add_pod("locked", 5).unwrap();
    n.add_pod("legacy", 6).unwrap();
    n
}

/// `reviews` (HTTP, v1), `empty` (HTTP, no endpoint), `vault` (HTTP, the `locked` pod,
/// which a DENY policy closes to namespace `shop`), and `db` (TCP).
fn config(n: &SimNode) -> String {
    let mut yaml = mesh_file(
        n,
        &[NS_SHOP, NS_BACKEND, NS_LEGACY],
        &[
            ("client", "shop", "web", "{}"),
            ("v1", "backend", "reviews", "{ app: reviews }"),
            ("db", "backend", "db", "{ app: db }"),
            ("locked", "backend", "vault", "{ app: vault }"),
            ("legacy", "legacy", "default", "{}"),
        ],
    );
    yaml += "services:\n\
         \x20 - { name: reviews, namespace: backend, vip: 10.96.0.10, ports: [ { port: 80, target_port: 8080, protocol: http } ], selector: { app: reviews } }\n\
         \x20 - { name: empty, namespace: backend, vip: 10.96.0.13, ports: [ { port: 80, target_port: 8080, protocol: http } ], selector: { app: nobody } }\n\
         \x20 - { name: vault, namespace: backend, vip: 10.96.0.14, ports: [ { port: 80, target_port: 8080, protocol: http } ], selector: { app: vault } }\n\
         \x20 - { name: db, namespace: backend, vip: 10.96.0.12, ports: [ { port: 5432, target_port: 9000, protocol: tcp } ], selector: { app: db } }\n\
         authorization_policies:\n\
         \x20 - metadata: { name: deny-shop, namespace: backend }\n\
         \x20   spec:\n\
         \x20     selector: { matchLabels: { app: vault } }\n\
         \x20     action: DENY\n\
         \x20     rules: [ { from: [ { source: { namespaces: [ shop ] } } ] } ]\n";
    yaml += &format!(
        "\x20 - metadata: {{ name: deny-legacy, namespace: backend }}\n\
         \x20   spec:\n\
         \x20     selector: {{ matchLabels: {{ app: vault }} }}\n\
         \x20     action: DENY\n\
         \x20     rules: [ {{ from: [ {{ source: {{ ipBlocks: [ \"{}/32\" ] }} }} ] }} ]\n",
        n.pod("legacy").ip
    );
    // An L7 rule on db's HTTP port: inbound connections there are served as HTTP at the
    // destination, each request judged.
    yaml += "\x20 - metadata: { name: no-admin, namespace: backend }\n\
         \x20   spec:\n\
         \x20     selector: { matchLabels: { app: db } }\n\
         \x20     action: DENY\n\
         \x20     rules: [ { to: [ { operation: { paths: [ \"/admin*\" ], ports: [ \"8080\" ] } } ] } ]\n";
    yaml
}

fn start(n: &SimNode, extra: &[&str]) -> mesh_tests::Agent {
    n.write_config(&config(n)).unwrap();
    let agent = n.start_agent(extra).unwrap();
    for v in ["v1", "locked", "db"] {
        n.serve(v, &["http", "--listen", "0.0.0.0:8080", "--name", v])
            .unwrap();
    }
    for v in ["db", "locked"] {
        n.serve(v, &["echo", "--listen", "0.0.0.0:9000"]).unwrap();
    }
    agent
}

/// The log's lines, parsed (every line must be JSON).
fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Waits for exactly one new line matching `f` after the first `seen` lines.
fn one_line(path: &Path, seen: usize, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let mut found = Vec::new();
    wait_for(what, Duration::from_secs(10), || {
        found = lines(path).into_iter().skip(seen).filter(&f).collect();
        !found.is_empty()
    });
    // A second line for the same event would show up right after the first.
    std::thread::sleep(Duration::from_millis(300));
    let again: Vec<Value> = lines(path).into_iter().skip(seen).filter(&f).collect();
    assert_eq!(again.len(), 1, "{what}: {again:#?}");
    again.into_iter().next().unwrap()
}

fn assert_common(l: &Value) {
    let t = l["start_time"].as_str().expect("start_time");
    assert!(
        t.len() == 24 && t.ends_with('Z') && t.as_bytes()[10] == b'T',
        "RFC 3339: {t}"
    );
    assert!(l["duration_ms"].is_u64(), "{l}");
    assert_eq!(l["source_workload"], "shop/client", "{l}");
    assert_eq!(
        l["source_principal"], "spiffe://cluster.local/ns/shop/sa/web",
        "{l}"
    );
}

#[test]
fn connections_and_requests_leave_one_line_each() {
    let n = node();
    let log = n.dir.join("access.log");
    let _ = std::fs::remove_file(&log);
    let agent = start(&n, &["--access-log", log.to_str().unwrap()]);
    let (client, v1, db, locked) = (
        n.pod("client").ip,
        n.pod("v1").ip,
        n.pod("db").ip,
        n.pod("locked").ip,
    );

    // L4: an echo to a pod's own address, relayed as plain TCP.
    let seen = lines(&log).len();
    let r = n.echo("client", &format!("{db}:9000"), 12345).unwrap();
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    let l = one_line(&log, seen, "the echo's line", |l| l["protocol"] == "TCP");
    assert_common(&l);
    assert!(
        l["source_address"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{client}:")),
        "{l}"
    );
    assert_eq!(l["destination_address"], format!("{db}:9000"), "{l}");
    assert_eq!(l["upstream_host"], format!("{db}:9000"), "{l}");
    assert_eq!(l["destination_workload"], "backend/db", "{l}");
    assert_eq!(
        l["destination_principal"], "spiffe://cluster.local/ns/backend/sa/db",
        "{l}"
    );
    assert_eq!(l["bytes_received"], 12345, "{l}");
    assert_eq!(l["bytes_sent"], 12345, "{l}");
    assert_eq!(l["response_flags"], "-", "{l}");
    assert!(
        ["proxied", "proxied+sk_msg"].contains(&l["path_taken"].as_str().unwrap()),
        "{l}"
    );
    assert!(l.get("method").is_none(), "{l}");

    // L4 through a TCP service: the endpoint picked and the cluster.
    let seen = lines(&log).len();
    let r = n.echo_once("client", "10.96.0.12:5432").unwrap();
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    let l = one_line(&log, seen, "the TCP service's line", |l| {
        l["destination_address"] == "10.96.0.12:5432"
    });
    assert_eq!(l["upstream_host"], format!("{db}:9000"), "{l}");
    assert!(
        l["upstream_cluster"].as_str().unwrap().contains("db"),
        "{l}"
    );
    assert_eq!(l["bytes_received"], 4096, "{l}");
    assert_eq!(l["bytes_sent"], 4096, "{l}");

    // L7: one request, one line.
    let seen = lines(&log).len();
    let r = n
        .http_get("client", "10.96.0.10:80", "/hello?x=1", 1, &[])
        .unwrap();
    assert_eq!(r["status"], serde_json::json!({ "200": 1 }), "{r}");
    let l = one_line(&log, seen, "the request's line", |l| {
        l["path"] == "/hello?x=1"
    });
    assert_common(&l);
    assert_eq!(l["protocol"], "HTTP/1.1", "{l}");
    assert_eq!(l["method"], "GET", "{l}");
    assert_eq!(l["response_code"], 200, "{l}");
    assert_eq!(l["response_flags"], "-", "{l}");
    assert_eq!(l["attempts"], 1, "{l}");
    assert_eq!(l["destination_address"], "10.96.0.10:80", "{l}");
    assert_eq!(l["upstream_host"], format!("{v1}:8080"), "{l}");
    assert_eq!(l["destination_workload"], "backend/v1", "{l}");
    assert!(l["route_name"].is_string(), "{l}");
    assert!(
        l["upstream_cluster"].as_str().unwrap().contains("reviews"),
        "{l}"
    );
    assert!(l["destination_service"].is_string(), "{l}");
    assert!(l["bytes_sent"].as_u64().unwrap() > 0, "{l}");
    assert_eq!(l["bytes_received"], 0, "{l}");

    // No healthy upstream: 503 UH, no endpoint tried.
    let seen = lines(&log).len();
    let r = n.http_get("client", "10.96.0.13:80", "/", 1, &[]).unwrap();
    assert_eq!(r["status"], serde_json::json!({ "503": 1 }), "{r}");
    let l = one_line(&log, seen, "the UH line", |l| {
        l["destination_address"] == "10.96.0.13:80"
    });
    assert_eq!(l["response_code"], 503, "{l}");
    assert_eq!(l["response_flags"], "UH", "{l}");
    assert_eq!(l["attempts"], 0, "{l}");
    assert!(l["upstream_host"].is_null(), "{l}");

    // Denied by policy: 403 RBAC over HTTP...
    let seen = lines(&log).len();
    let r = n.http_get("client", "10.96.0.14:80", "/", 1, &[]).unwrap();
    assert_eq!(r["status"], serde_json::json!({ "403": 1 }), "{r}");
    let l = one_line(&log, seen, "the denied request's line", |l| {
        l["destination_address"] == "10.96.0.14:80"
    });
    assert_eq!(l["response_code"], 403, "{l}");
    assert_eq!(l["response_flags"], "RBAC", "{l}");
    assert_eq!(l["policy_verdict"], "deny", "{l}");
    assert_eq!(l["upstream_host"], format!("{locked}:8080"), "{l}");

    // ...and a reset with the policy's name over TCP.
    let seen = lines(&log).len();
    let r = n.echo_once("client", &format!("{locked}:9000")).unwrap();
    assert_ne!(r["errors"], serde_json::json!([]), "refused: {r}");
    let l = one_line(&log, seen, "the denied connection's line", |l| {
        l["destination_address"] == format!("{locked}:9000")
    });
    assert_eq!(l["protocol"], "TCP", "{l}");
    assert_eq!(l["response_flags"], "RBAC", "{l}");
    assert_eq!(l["policy_verdict"], "deny", "{l}");
    assert_eq!(l["policy_name"], "backend/deny-shop", "{l}");

    // Inbound: plain text from outside the mesh, captured by TC and delivered...
    let legacy = n.pod("legacy").ip;
    let seen = lines(&log).len();
    let r = n.echo_once("legacy", &format!("{db}:9000")).unwrap();
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    let l = one_line(&log, seen, "the inbound line", |l| {
        l["path_taken"] == "inbound"
    });
    assert!(
        l["source_address"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{legacy}:")),
        "{l}"
    );
    assert_eq!(l["destination_address"], format!("{db}:9000"), "{l}");
    assert_eq!(l["destination_workload"], "backend/db", "{l}");
    assert_eq!(l["policy_verdict"], "allow", "{l}");
    assert_eq!(l["bytes_received"], 4096, "{l}");
    assert_eq!(l["bytes_sent"], 4096, "{l}");
    // ...or refused by the destination's policy.
    let seen = lines(&log).len();
    let r = n.echo_once("legacy", &format!("{locked}:9000")).unwrap();
    assert_ne!(r["errors"], serde_json::json!([]), "refused: {r}");
    let l = one_line(&log, seen, "the refused inbound line", |l| {
        l["path_taken"] == "inbound"
    });
    assert_eq!(l["response_flags"], "RBAC", "{l}");
    assert_eq!(l["policy_verdict"], "deny", "{l}");
    assert_eq!(l["policy_name"], "backend/deny-legacy", "{l}");
    assert_eq!(l["destination_workload"], "backend/locked", "{l}");

    // Inbound HTTP under an L7 policy: a line per request, judged at the destination.
    let seen = lines(&log).len();
    let r = n
        .http_get("legacy", &format!("{db}:8080"), "/admin/x", 1, &[])
        .unwrap();
    assert_eq!(r["status"], serde_json::json!({ "403": 1 }), "{r}");
    let l = one_line(&log, seen, "the denied inbound request's line", |l| {
        l["path"] == "/admin/x"
    });
    assert_eq!(l["path_taken"], "inbound", "{l}");
    assert_eq!(l["method"], "GET", "{l}");
    assert_eq!(l["response_code"], 403, "{l}");
    assert_eq!(l["response_flags"], "RBAC", "{l}");
    assert_eq!(l["policy_verdict"], "deny", "{l}");
    assert_eq!(l["policy_name"], "backend/no-admin", "{l}");
    assert_eq!(l["source_address"], legacy.to_string(), "{l}");
    assert_eq!(l["destination_workload"], "backend/db", "{l}");
    let seen = lines(&log).len();
    let r = n
        .http_get("legacy", &format!("{db}:8080"), "/items", 1, &[])
        .unwrap();
    assert_eq!(r["status"], serde_json::json!({ "200": 1 }), "{r}");
    let l = one_line(&log, seen, "the allowed inbound request's line", |l| {
        l["path"] == "/items"
    });
    assert_eq!(l["response_code"], 200, "{l}");
    assert_eq!(l["response_flags"], "-", "{l}");
    assert_eq!(l["policy_verdict"], "allow", "{l}");
    assert_eq!(l["upstream_host"], format!("{db}:8080"), "{l}");
    assert!(l["bytes_sent"].as_u64().unwrap() > 0, "{l}");

    let m = agent.get("/metrics").unwrap();
    assert_eq!(metric(&m, "mesh_access_log_dropped_total", &[]), 0, "{m}");
    // The whole log, for `--nocapture` readers.
    eprintln!("{}", std::fs::read_to_string(&log).unwrap());
}

#[test]
fn without_the_flag_nothing_is_written() {
    let n = node();
    let agent = start(&n, &[]);
    let r = n.http_get("client", "10.96.0.10:80", "/", 3, &[]).unwrap();
    assert_eq!(r["status"], serde_json::json!({ "200": 3 }), "{r}");
    let r = n.echo_once("client", "10.96.0.12:5432").unwrap();
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    // No file but the test's own: the config and the agent's log.
    let files: Vec<_> = std::fs::read_dir(&n.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        files.iter().all(|f| f == "mesh.yaml" || f == "agent.log"),
        "{files:?}"
    );
    // The agent's own log (stderr) carries no access-log line either.
    assert!(!agent.log_text().contains("\"start_time\""));
    let m = agent.get("/metrics").unwrap();
    assert!(m.contains("mesh_access_log_dropped_total 0"), "{m}");
}

/// The agent without `--access-log`, its standard output (where the lines of namespaces
/// that ask for them go) in a file; stopped (SIGTERM) on drop.
struct StdoutAgent {
    child: std::process::Child,
    stdout: std::path::PathBuf,
    admin_port: u16,
}

impl StdoutAgent {
    fn start(n: &SimNode) -> StdoutAgent {
        let stdout = n.dir.join("stdout.log");
        let log = n.dir.join("agent.log");
        let child = n
            .agent_command(&[])
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut a = StdoutAgent {
            child,
            stdout,
            admin_port: n.admin_port,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !a.get("/ready").is_ok_and(|b| b.starts_with("ready")) {
            if let Ok(Some(st)) = a.child.try_wait() {
                panic!(
                    "agent exited ({st}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "agent not ready after 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        a
    }

    fn get(&mut self, path: &str) -> anyhow::Result<String> {
        mesh_tests::http_get(self.admin_port, path)
    }
}

impl Drop for StdoutAgent {
    fn drop(&mut self) {
        let _ = mesh_tests::sh(&format!("kill -TERM {}", self.child.id()));
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while !matches!(self.child.try_wait(), Ok(Some(_))) {
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether the proxy's mesh workload `ns/name` has the access-log switch as `on`
/// (`/config_dump`).
fn switched(a: &mut StdoutAgent, ns: &str, name: &str, on: bool) -> bool {
    let dump: Value = a
        .get("/config_dump")
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let found = dump["mesh"]["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|w| w["namespace"] == ns && w["name"] == name)
        .map(|w| w["access_log"] == on);
    found == Some(true)
}

/// Without `--access-log`, a namespace labelled `mesh-agent.io/access-log: "true"` has
/// its workloads' connections and requests logged (to standard output), and another
/// namespace's none; removing the label stops it without a restart.
#[test]
fn a_namespace_that_asks_is_logged_without_the_flag_and_another_is_not() {
    let n = node();
    let with_label = |yaml: String| {
        yaml.replace(
            "{ name: backend, labels: { mesh-agent.io/dataplane-mode: ambient } }",
            "{ name: backend, labels: { mesh-agent.io/dataplane-mode: ambient, mesh-agent.io/access-log: \"true\" } }",
        )
    };
    let yaml = with_label(config(&n));
    assert!(yaml.contains("access-log"), "the scene changed: {yaml}");
    n.write_config(&yaml).unwrap();
    let mut agent = StdoutAgent::start(&n);
    for v in ["v1", "db"] {
        n.serve(v, &["http", "--listen", "0.0.0.0:8080", "--name", v])
            .unwrap();
    }
    for v in ["db", "legacy"] {
        n.serve(v, &["echo", "--listen", "0.0.0.0:9000"]).unwrap();
    }
    let (db, legacy) = (n.pod("db").ip, n.pod("legacy").ip);
    let out = agent.stdout.clone();
    wait_for("the switch in force", Duration::from_secs(10), || {
        switched(&mut agent, "backend", "db", true)
    });

    // shop -> legacy: neither end asks.
    let r = n.echo_once("client", &format!("{legacy}:9000")).unwrap();
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    // shop -> backend, TCP to a pod and HTTP through a service: backend asks.
    let r = n.echo_once("client", &format!("{db}:9000")).unwrap();
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    let r = n
        .http_get("client", "10.96.0.10:80", "/asked", 2, &[])
        .unwrap();
    assert_eq!(r["status"], serde_json::json!({ "200": 2 }), "{r}");
    // legacy -> backend, captured inbound at db (legacy is not enrolled).
    let r = n.echo_once("legacy", &format!("{db}:9000")).unwrap();
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");

    let mut all = Vec::new();
    wait_for("the asked lines", Duration::from_secs(10), || {
        all = lines(&out);
        all.iter().filter(|l| l["path"] == "/asked").count() == 2
            && all.iter().any(|l| l["path_taken"] == "inbound")
    });
    std::thread::sleep(Duration::from_millis(300));
    all = lines(&out);
    let tcp: Vec<&Value> = all
        .iter()
        .filter(|l| l["protocol"] == "TCP" && l["path_taken"] != "inbound")
        .collect();
    assert_eq!(tcp.len(), 1, "only the echo to db: {all:#?}");
    assert_eq!(tcp[0]["destination_workload"], "backend/db", "{all:#?}");
    assert_common(tcp[0]);
    let http: Vec<&Value> = all.iter().filter(|l| l["path"] == "/asked").collect();
    assert!(
        http.iter()
            .all(|l| l["destination_workload"] == "backend/v1"),
        "{http:#?}"
    );
    let inbound: Vec<&Value> = all
        .iter()
        .filter(|l| l["path_taken"] == "inbound")
        .collect();
    assert_eq!(inbound.len(), 1, "{all:#?}");
    assert_eq!(inbound[0]["destination_workload"], "backend/db", "{all:#?}");
    assert!(
        all.iter()
            .all(|l| l["destination_address"] != format!("{legacy}:9000")),
        "shop -> legacy logged: {all:#?}"
    );
    assert_eq!(all.len(), 4, "{all:#?}");

    // The label removed: once the proxy has it, nothing more is written.
    n.write_config(&config(&n)).unwrap();
    wait_for("the switch off in force", Duration::from_secs(10), || {
        switched(&mut agent, "backend", "db", false)
    });
    let r = n.echo_once("client", &format!("{db}:9000")).unwrap();
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    let r = n
        .http_get("client", "10.96.0.10:80", "/after", 1, &[])
        .unwrap();
    assert_eq!(r["status"], serde_json::json!({ "200": 1 }), "{r}");
    // A line would reach the file within a writer tick (20 ms).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lines(&out).len(), 4, "{:#?}", lines(&out));
    let m = agent.get("/metrics").unwrap();
    assert_eq!(metric(&m, "mesh_access_log_dropped_total", &[]), 0, "{m}");
}

/// The log's cost on the L7 path: HTTP/1.1 requests/s (wrk, 16 keep-alive connections,
/// pinned to vCPU 0 with the agent and the server) and the agent's CPU time per request,
/// with the log off and on, alternating, 5 rounds; prints the medians. A measurement,
/// not a check: run it on a quiet machine with the release agent,
/// `MESH_AGENT_BIN=target/release/mesh-agent cargo test -p mesh-tests --test accesslog -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement (minutes); run by hand"]
fn cost_of_the_access_log_on_the_l7_path() {
    let n = node();
    let log = n.dir.join("cost.log");
    let path = log.to_str().unwrap().to_owned();
    measure(
        &n,
        &[
            ("off", config(&n), vec![]),
            ("on ", config(&n), vec!["--access-log".to_owned(), path]),
        ],
        &log,
    );
}

/// The per-namespace switch's cost on the same path, flag off: no namespace asking
/// (the baseline), another namespace asking (each request's line is built, then not
/// kept), and the requests' own namespace asking (every line written, to standard
/// output: /dev/null here). Run as `cost_of_the_access_log_on_the_l7_path`.
#[test]
#[ignore = "a measurement (minutes); run by hand"]
fn cost_of_the_namespace_switch_on_the_l7_path() {
    let n = node();
    let label = |ns: &str| {
        config(&n).replace(
            &format!("{{ name: {ns} }}"),
            &format!("{{ name: {ns}, labels: {{ mesh-agent.io/access-log: \"true\" }} }}"),
        )
        .replace(
            &format!("{{ name: {ns}, labels: {{ mesh-agent.io/dataplane-mode: ambient }} }}"),
            &format!("{{ name: {ns}, labels: {{ mesh-agent.io/dataplane-mode: ambient, mesh-agent.io/access-log: \"true\" }} }}"),
        )
    };
    assert!(label("legacy").contains("access-log") && label("backend").contains("access-log"));
    measure(
        &n,
        &[
            ("none asks     ", config(&n), vec![]),
            ("another asks  ", label("legacy"), vec![]),
            ("backend asks  ", label("backend"), vec![]),
        ],
        &n.dir.join("unused.log"),
    );
}

/// For each mode (name, configuration, agent flags), alternating, 5 rounds: requests/s
/// and the agent's CPU per request; prints each and the medians.
fn measure(n: &SimNode, modes: &[(&str, String, Vec<String>)], log: &Path) {
    n.serve("v1", &["http", "--listen", "0.0.0.0:8080", "--name", "v1"])
        .unwrap();
    let cpu = mesh_tests::cost::cpu_seconds;
    let wrk = |secs: u32| mesh_tests::cost::wrk(n, "client", "http://10.96.0.10:80/", secs);
    let mut results: Vec<(usize, f64, f64)> = Vec::new();
    for _round in 0..5 {
        for (i, (name, yaml, args)) in modes.iter().enumerate() {
            let _ = std::fs::remove_file(log);
            n.write_config(yaml).unwrap();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut agent = n.start_agent(&args).unwrap();
            let pid = agent.pid();
            mesh_tests::sh(&format!("taskset -a -p -c 0 {pid} > /dev/null")).unwrap();
            wrk(1); // warm: on-demand listener, pools
            let before = cpu(pid);
            let secs = 3;
            let rps = wrk(secs);
            let used = cpu(pid) - before;
            let us_per_req = used * 1e6 / (rps * f64::from(secs));
            results.push((i, rps, us_per_req));
            eprintln!("{name}: {rps:.0} req/s, {us_per_req:.1} us agent CPU/request");
            agent.stop();
        }
    }
    let stats = |i: usize, rps: bool| {
        let mut v: Vec<f64> = results
            .iter()
            .filter(|r| r.0 == i)
            .map(|r| if rps { r.1 } else { r.2 })
            .collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (base, _, _) = stats(0, true);
    let (base_cpu, _, _) = stats(0, false);
    for (i, (name, _, _)) in modes.iter().enumerate() {
        let ((rps, lo, hi), (c, clo, chi)) = (stats(i, true), stats(i, false));
        eprintln!(
            "median of 5, {name}: {rps:.0} req/s ({lo:.0}..{hi:.0}), {c:.1} us/req ({clo:.1}..{chi:.1}); \
             vs the first: requests/s {:.3}, CPU/request {:.3}",
            rps / base,
            c / base_cpu
        );
    }
}
