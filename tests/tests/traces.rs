//! Distributed traces (issue 12, item 3) on a simulated node: with `--trace-otlp` the agent
//! sends OpenTelemetry spans over OTLP/gRPC to a real receiver (the OpenTelemetry Python
//! protobufs served by grpcio, `tests/interop/otlp_receiver.py`): a server span per HTTP
//! request continuing the caller's trace (W3C `traceparent`, B3 single and multi-header),
//! a client span per try (a retry shows as a second try), the try's context on the
//! upstream request, and a span per proxied TCP connection with its bytes and path.
//!
//! Needs the venv's python with grpcio and opentelemetry-proto (`cargo xtask setup`
//! installs both; MESH_PYTHON names another); without them these tests fail, never skip.

use std::{path::Path, time::Duration};

use mesh_tests::{
    metric,
    otlp::{self, python, script, spawn_listening, Proc, CLIENT, ERROR, SERVER},
    scenes::{mesh_file, NS_BACKEND, NS_SHOP},
    wait_for, SimNode,
};
use serde_json::Value;

/// W3C / B3 trace and span ids the "caller" sends.
const TID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SID: &str = "00f067aa0ba902b7";
/// The web service's address (HTTP, retries on reset) and the db pod's echo port (TCP).
const WEB: &str = "10.96.0.20:80";

fn node() -> SimNode {
    let mut n = SimNode::new().expect("sim node");
    n.add_pod("client", 2).unwrap();
    n.add_pod("web", 3).unwrap();
    n.add_pod("db", 4).unwrap();
    n
}

fn config(n: &SimNode) -> String {
    let mut yaml = mesh_file(
        n,
        &[NS_SHOP, NS_BACKEND],
        &[
            ("client", "shop", "client", "{}"),
            ("web", "backend", "web", "{ app: web }"),
            ("db", "backend", "db", "{ app: db }"),
        ],
    );
    // A try that ends in a reset is retried once.
    yaml += "services:\n\
         \x20 - name: web\n\
         \x20   namespace: backend\n\
         \x20   vip: 10.96.0.20\n\
         \x20   ports: [ { port: 80, target_port: 8080, protocol: http } ]\n\
         \x20   selector: { app: web }\n\
         \x20   routes:\n\
         \x20     - name: all\n\
         \x20       match: { prefix: / }\n\
         \x20       retries: { attempts: 1, on: reset, backoff_ms: 10 }\n";
    yaml
}

/// The node with its servers: the header-echoing upstream in `web` (its first try per
/// `x-fail-key` closes without an answer), podtool's echo in `db`.
fn start(n: &SimNode, py: &Path, extra: &[&str]) -> (mesh_tests::Agent, Proc) {
    n.write_config(&config(n)).unwrap();
    let agent = n.start_agent(extra).unwrap();
    let mut cmd = n.pod_command("web", py);
    cmd.arg(script())
        .args(["upstream", "--listen", "0.0.0.0:8080", "--fail-first", "1"]);
    let (web, _) = spawn_listening(cmd, None);
    n.serve("db", &["echo", "--listen", "0.0.0.0:9000"])
        .unwrap();
    (agent, web)
}

/// One GET from the client pod through the proxy: (status, the headers the upstream got).
fn get(n: &SimNode, py: &Path, path: &str, headers: &[&str]) -> (u64, Value) {
    otlp::get(n.pod_command("client", py), WEB, path, headers)
}

/// Waits until at least `count` spans of trace `tid` arrived; returns them all.
fn trace(out: &Path, tid: &str, count: usize) -> Vec<Value> {
    let mut found = Vec::new();
    wait_for(
        &format!("{count} spans of trace {tid}"),
        Duration::from_secs(15),
        || {
            found = otlp::spans(out)
                .into_iter()
                .filter(|s| s["trace_id"] == tid)
                .collect();
            found.len() >= count
        },
    );
    found
}

fn by_kind(spans: &[Value], kind: u64) -> Vec<&Value> {
    spans.iter().filter(|s| s["kind"] == kind).collect()
}

/// (trace id, span id) of a `traceparent` the upstream received.
fn traceparent(headers: &Value) -> (String, String) {
    let tp = headers["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("no traceparent upstream: {headers}"));
    let f: Vec<&str> = tp.split('-').collect();
    assert_eq!((f.len(), f[0], f[3]), (4, "00", "01"), "{tp}");
    (f[1].to_owned(), f[2].to_owned())
}

/// The request's server span, and its tries in order; checks the links between them.
fn request_spans(spans: &[Value], tries: usize) -> (Value, Vec<Value>) {
    let server = by_kind(spans, SERVER);
    assert_eq!(server.len(), 1, "one server span: {spans:#?}");
    let server = server[0].clone();
    let mut t: Vec<Value> = by_kind(spans, CLIENT).into_iter().cloned().collect();
    t.sort_by_key(|s| s["start_ns"].as_u64());
    assert_eq!(t.len(), tries, "{tries} try span(s): {spans:#?}");
    for s in &t {
        assert_eq!(
            s["parent_span_id"], server["span_id"],
            "a try's parent is the request: {s:#}"
        );
        assert!(
            s["start_ns"].as_u64() >= server["start_ns"].as_u64(),
            "{s:#}"
        );
        assert!(s["end_ns"].as_u64() <= server["end_ns"].as_u64(), "{s:#}");
    }
    (server, t)
}

#[test]
fn requests_tries_and_connections_arrive_with_their_parents() {
    let py = python();
    let n = node();
    let out = n.dir.join("spans.jsonl");
    // On 127.0.0.1 of the node: the agent's network namespace.
    let (_receiver, port) = otlp::receiver(&py, None, &out);
    let endpoint = format!("http://127.0.0.1:{port}");
    let (agent, _web) = start(
        &n,
        &py,
        &[
            "--trace-otlp",
            &endpoint,
            "--trace-sampling",
            "1",
            "--node-name",
            "trace-node",
        ],
    );

    // 1. W3C: the caller's trace goes on; the first try is reset, the retry answers.
    let (status, up) = get(
        &n,
        &py,
        "/orders?id=7",
        &[
            &format!("traceparent: 00-{TID}-{SID}-01"),
            "tracestate: vendor=opaque",
            "x-fail-key: w3c",
        ],
    );
    assert_eq!(status, 200, "{up}");
    let spans = trace(&out, TID, 3);
    let (server, tries) = request_spans(&spans, 2);
    assert_eq!(
        server["parent_span_id"], SID,
        "continues the caller's span: {server:#}"
    );
    let a = &server["attributes"];
    assert_eq!(a["http.request.method"], "GET", "{server:#}");
    assert_eq!(a["url.path"], "/orders", "{server:#}");
    assert_eq!(a["http.response.status_code"], 200, "{server:#}");
    assert_eq!(a["mesh.attempts"], 2, "{server:#}");
    assert_eq!(a["mesh.source.workload"], "shop/client", "{server:#}");
    assert_eq!(a["mesh.destination.address"], WEB, "{server:#}");
    assert!(
        ["proxied", "proxied+sk_msg"].contains(&a["mesh.path_taken"].as_str().unwrap()),
        "{server:#}"
    );
    assert!(
        a["http.response.body.size"].as_u64().unwrap() > 0,
        "{server:#}"
    );
    assert_ne!(server["status_code"], ERROR, "{server:#}");
    let web = n.pod("web").ip.to_string();
    let (first, second) = (&tries[0], &tries[1]);
    assert_eq!(
        first["status_code"], ERROR,
        "the reset try failed: {first:#}"
    );
    assert_eq!(first["attributes"]["error.type"], "reset", "{first:#}");
    assert!(first["attributes"]
        .get("http.request.resend_count")
        .is_none());
    assert_eq!(
        second["attributes"]["http.request.resend_count"], 1,
        "{second:#}"
    );
    assert_eq!(
        second["attributes"]["http.response.status_code"], 200,
        "{second:#}"
    );
    for t in [first, second] {
        assert_eq!(t["attributes"]["server.address"], web.as_str(), "{t:#}");
        assert_eq!(t["attributes"]["server.port"], 8080, "{t:#}");
        assert_eq!(t["attributes"]["mesh.path_taken"], "proxied", "{t:#}");
    }
    // The upstream saw the answering try as its parent, and the caller's tracestate.
    assert_eq!(
        traceparent(&up),
        (
            TID.to_owned(),
            second["span_id"].as_str().unwrap().to_owned()
        )
    );
    assert_eq!(up["tracestate"], "vendor=opaque", "{up}");
    // The resource and the scope.
    let r = &server["resource"];
    assert_eq!(r["service.name"], "mesh-agent", "{r}");
    assert_eq!(r["k8s.node.name"], "trace-node", "{r}");
    assert_eq!(r["service.instance.id"], "trace-node", "{r}");
    assert!(r["service.version"].is_string(), "{r}");
    assert_eq!(r["telemetry.sdk.name"], "opentelemetry", "{r}");
    assert_eq!(server["scope"], "mesh-agent");

    // 2. B3 multi-header, 64-bit trace id: answered in kind, `traceparent` added.
    let tid64 = "a3ce929d0e0e4736";
    let (status, up) = get(
        &n,
        &py,
        "/b3multi",
        &[
            &format!("x-b3-traceid: {tid64}"),
            &format!("x-b3-spanid: {SID}"),
            "x-b3-sampled: 1",
        ],
    );
    assert_eq!(status, 200, "{up}");
    let full = format!("{tid64:0>32}");
    let spans = trace(&out, &full, 2);
    let (server, tries) = request_spans(&spans, 1);
    assert_eq!(server["parent_span_id"], SID);
    assert_eq!(up["x-b3-traceid"], tid64, "{up}");
    assert_eq!(up["x-b3-spanid"], tries[0]["span_id"], "{up}");
    assert_eq!(up["x-b3-parentspanid"], server["span_id"], "{up}");
    assert_eq!(up["x-b3-sampled"], "1", "{up}");
    assert_eq!(traceparent(&up).0, full);

    // 3. B3 single header.
    let tid3 = "0123456789abcdef0123456789abcdef";
    let (status, up) = get(&n, &py, "/b3", &[&format!("b3: {tid3}-{SID}-1")]);
    assert_eq!(status, 200, "{up}");
    let spans = trace(&out, tid3, 2);
    let (server, tries) = request_spans(&spans, 1);
    assert_eq!(server["parent_span_id"], SID);
    let b3 = format!(
        "{tid3}-{}-1-{}",
        tries[0]["span_id"].as_str().unwrap(),
        server["span_id"].as_str().unwrap()
    );
    assert_eq!(up["b3"], b3.as_str(), "{up}");

    // 4. The caller decided not to sample: nothing recorded, its header passes untouched.
    let unsampled = "ffffffffffffffffffffffffffffff01";
    let tp = format!("00-{unsampled}-{SID}-00");
    let (status, up) = get(&n, &py, "/quiet", &[&format!("traceparent: {tp}")]);
    assert_eq!(status, 200, "{up}");
    assert_eq!(up["traceparent"], tp.as_str(), "{up}");

    // 5. No context: a new trace, rooted at the proxy, handed on upstream.
    let (status, up) = get(&n, &py, "/fresh", &[]);
    assert_eq!(status, 200, "{up}");
    let (fresh, try_id) = traceparent(&up);
    let spans = trace(&out, &fresh, 2);
    let (server, tries) = request_spans(&spans, 1);
    assert_eq!(server["parent_span_id"], "", "a root: {server:#}");
    assert_eq!(tries[0]["span_id"], try_id.as_str());
    // Spans go out in order, so by now the unsampled request's would have arrived.
    assert!(
        spans_of(&out, unsampled).is_empty(),
        "an unsampled request left spans"
    );

    // 6. L4: a proxied TCP connection, its bytes and path.
    let db = n.pod("db").ip;
    let r = n.echo("client", &format!("{db}:9000"), 12345).unwrap();
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    let mut tcp = Vec::new();
    wait_for("the connection's span", Duration::from_secs(15), || {
        tcp = otlp::spans(&out)
            .into_iter()
            .filter(|s| s["name"] == "tcp" && s["attributes"]["server.port"] == 9000)
            .collect();
        !tcp.is_empty()
    });
    assert_eq!(tcp.len(), 1, "{tcp:#?}");
    let s = &tcp[0];
    let a = &s["attributes"];
    assert_eq!(s["kind"], SERVER);
    assert_eq!(s["parent_span_id"], "");
    assert_eq!(a["mesh.bytes_received"], 12345, "{s:#}");
    assert_eq!(a["mesh.bytes_sent"], 12345, "{s:#}");
    assert_eq!(a["server.address"], db.to_string().as_str(), "{s:#}");
    assert_eq!(a["network.peer.address"], db.to_string().as_str(), "{s:#}");
    assert_eq!(a["mesh.destination.workload"], "backend/db", "{s:#}");
    assert_eq!(a["network.transport"], "tcp");
    assert!(
        ["proxied", "proxied+sk_msg"].contains(&a["mesh.path_taken"].as_str().unwrap()),
        "{s:#}"
    );
    assert_ne!(s["status_code"], ERROR, "{s:#}");
    assert!(s["end_ns"].as_u64() > s["start_ns"].as_u64());

    let m = agent.get("/metrics").unwrap();
    assert!(
        metric(&m, "mesh_trace_spans_exported_total", &[]) >= 10,
        "{m}"
    );
    assert_eq!(metric(&m, "mesh_trace_spans_dropped_total", &[]), 0, "{m}");
    assert_eq!(metric(&m, "mesh_trace_spans_failed_total", &[]), 0, "{m}");
    // Last: where the client's address comes from (the accepted socket's peer) is the
    // datapath's business; everything above holds whatever it says.
    let a = &s["attributes"];
    assert_eq!(
        a["client.address"],
        n.pod("client").ip.to_string().as_str(),
        "{s:#}"
    );
}

fn spans_of(out: &Path, tid: &str) -> Vec<Value> {
    otlp::spans(out)
        .into_iter()
        .filter(|s| s["trace_id"] == tid)
        .collect()
}

#[test]
fn without_the_flag_headers_pass_untouched_and_nothing_is_exported() {
    let py = python();
    let n = node();
    let (agent, _web) = start(&n, &py, &[]);
    let tp = format!("00-{TID}-{SID}-01");
    let (status, up) = get(&n, &py, "/", &[&format!("traceparent: {tp}"), "b3: 1"]);
    assert_eq!(status, 200, "{up}");
    assert_eq!(up["traceparent"], tp.as_str(), "{up}");
    assert_eq!(up["b3"], "1", "{up}");
    let (status, up) = get(&n, &py, "/", &[]);
    assert_eq!(status, 200, "{up}");
    assert!(up.get("traceparent").is_none(), "{up}");
    let m = agent.get("/metrics").unwrap();
    assert!(m.contains("mesh_trace_spans_exported_total 0"), "{m}");
}

#[test]
fn an_unreachable_receiver_costs_spans_not_requests() {
    let py = python();
    let n = node();
    // Nothing listens there: exports fail, requests do not.
    let (agent, _web) = start(
        &n,
        &py,
        &[
            "--trace-otlp",
            "http://127.0.0.1:9",
            "--trace-sampling",
            "1",
        ],
    );
    for i in 0..3 {
        let (status, up) = get(&n, &py, &format!("/{i}"), &[]);
        assert_eq!(status, 200, "{up}");
        assert!(up.get("traceparent").is_some(), "{up}");
    }
    wait_for("failed exports counted", Duration::from_secs(30), || {
        let m = agent.get("/metrics").unwrap();
        metric(&m, "mesh_trace_spans_failed_total", &[]) >= 6
    });
    let m = agent.get("/metrics").unwrap();
    assert_eq!(metric(&m, "mesh_trace_spans_exported_total", &[]), 0, "{m}");
}

/// Tracing's cost on the L7 path: HTTP/1.1 requests/s (wrk, 16 keep-alive connections,
/// wrk, the agent and podtool's server pinned to vCPU 0, the receiver to vCPU 1) and the
/// agent's CPU time per request, with tracing off and on (every request sampled: a server
/// span and a try span each, exported to the real receiver), alternating, 5 rounds;
/// prints each run and the medians. A measurement, not a check: run it on a quiet machine
/// with the release agent, `MESH_AGENT_BIN=target/release/mesh-agent cargo test -p
/// mesh-tests --test traces -- --ignored --nocapture`. `MESH_TRACE_COST_SAMPLING=0.01`
/// measures the default ratio instead (mostly the unsampled path).
#[test]
#[ignore = "a measurement (minutes); run by hand"]
fn cost_of_tracing_on_the_l7_path() {
    let py = python();
    let n = node();
    n.write_config(&config(&n)).unwrap();
    n.serve(
        "web",
        &["http", "--listen", "0.0.0.0:8080", "--name", "web"],
    )
    .unwrap();
    let out = n.dir.join("cost-spans.jsonl");
    let (receiver, port) = otlp::receiver(&py, None, &out);
    mesh_tests::sh(&format!(
        "taskset -a -p -c 1 {} > /dev/null",
        receiver.0.id()
    ))
    .unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let sampling = std::env::var("MESH_TRACE_COST_SAMPLING").unwrap_or_else(|_| "1".into());
    let cpu = mesh_tests::cost::cpu_seconds;
    // The exporter thread's share (it runs on the agent's pinned vCPU too).
    let export_cpu = |pid: u32| -> f64 {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return 0.0;
        };
        tasks
            .filter_map(|t| {
                let t = t.ok()?.path();
                let comm = std::fs::read_to_string(t.join("comm")).ok()?;
                if comm.trim() != "trace-export" {
                    return None;
                }
                let stat = std::fs::read_to_string(t.join("stat")).ok()?;
                let f: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
                Some((f[11].parse::<u64>().ok()? + f[12].parse::<u64>().ok()?) as f64 / 100.0)
            })
            .sum()
    };
    let wrk = |secs: u32| mesh_tests::cost::wrk(&n, "client", &format!("http://{WEB}/"), secs);
    let mut results: Vec<(bool, f64, f64)> = Vec::new();
    for _round in 0..5 {
        for on in [false, true] {
            let args: Vec<&str> = if on {
                vec!["--trace-otlp", &endpoint, "--trace-sampling", &sampling]
            } else {
                vec![]
            };
            let mut agent = n.start_agent(&args).unwrap();
            let pid = agent.pid();
            mesh_tests::sh(&format!("taskset -a -p -c 0 {pid} > /dev/null")).unwrap();
            wrk(1); // warm: on-demand listener, pools
            let (before, export_before) = (cpu(pid), export_cpu(pid));
            let secs = 3;
            let rps = wrk(secs);
            let used = cpu(pid) - before;
            let export_us = (export_cpu(pid) - export_before) * 1e6 / (rps * f64::from(secs));
            let us_per_req = used * 1e6 / (rps * f64::from(secs));
            results.push((on, rps, us_per_req));
            let m = agent.get("/metrics").unwrap();
            eprintln!(
                "tracing {}: {rps:.0} req/s, {us_per_req:.1} us agent CPU/request, of which the exporter thread {export_us:.1} (spans exported {}, dropped {}, failed {})",
                if on { "on " } else { "off" },
                metric(&m, "mesh_trace_spans_exported_total", &[]),
                metric(&m, "mesh_trace_spans_dropped_total", &[]),
                metric(&m, "mesh_trace_spans_failed_total", &[]),
            );
            agent.stop();
        }
    }
    let stats = |on: bool, i: usize| {
        let mut v: Vec<f64> = results
            .iter()
            .filter(|r| r.0 == on)
            .map(|r| if i == 1 { r.1 } else { r.2 })
            .collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    for on in [false, true] {
        let (rps, lo, hi) = stats(on, 1);
        let (us, ulo, uhi) = stats(on, 2);
        eprintln!(
            "tracing {}: median {rps:.0} req/s ({lo:.0}..{hi:.0}), {us:.1} us CPU/request ({ulo:.1}..{uhi:.1})",
            if on { "on " } else { "off" }
        );
    }
    eprintln!(
        "on/off requests/s {:.3}, CPU/request {:.3}",
        stats(true, 1).0 / stats(false, 1).0,
        stats(true, 2).0 / stats(false, 2).0
    );
}
