//! The destination side's telemetry (issue 12, items 1 and 3) on a simulated two-node
//! cluster (`mesh_tests::cluster`): node 1's agent reports Istio's `reporter="destination"`
//! series for what it terminates (HBONE streams relayed into its pod, plain-text
//! connections TC steered to it, requests it judges for an L7 AuthorizationPolicy), with
//! the source's principal from the peer certificate and `connection_security_policy`
//! `mutual_tls` or `none`; and sends a span per inbound connection and per request it
//! terminates, the request's parented by the source node's try span.
//!
//! Node 0 runs `client-a` (namespace `shop`, service account `web`) and `legacy`
//! (namespace `legacy`, outside the mesh); node 1 runs `server-b` (namespace `backend`,
//! service account `echo`, label `app: echo`): an echo server on 8080 and HTTP on 8081,
//! where a DENY on `/admin*` makes node 1 terminate HTTP.
//!
//! The trace test needs the venv's python with grpcio and opentelemetry-proto (`cargo
//! xtask setup`; MESH_PYTHON names another): without them it fails, never skips.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use mesh_tests::{
    cluster::{NodeAgent, SimCluster},
    metric, wait_for,
};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const ECHO_PORT: u16 = 8080;
const HTTP_PORT: u16 = 8081;
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const ECHO: &str = "spiffe://cluster.local/ns/backend/sa/echo";

/// HTTP on 8081 is judged per request at node 1 (the DENY has HTTP attributes).
fn deny_admin() -> String {
    format!(
        "authorization_policies:\n\
         \x20 - metadata: {{ name: no-admin, namespace: backend }}\n\
         \x20   spec:\n\
         \x20     selector: {{ matchLabels: {{ app: echo }} }}\n\
         \x20     action: DENY\n\
         \x20     rules: [ {{ to: [ {{ operation: {{ paths: [ \"/admin*\" ], ports: [ \"{HTTP_PORT}\" ] }} }} ] }} ]\n"
    )
}

fn pods() -> SimCluster {
    let mut c = SimCluster::new(2).expect("sim cluster");
    c.add_pod(0, "client-a", 2).unwrap();
    c.add_pod(0, "legacy", 4).unwrap();
    c.add_pod(1, "server-b", 2).unwrap();
    c
}

/// The file both nodes read: the workloads (`client-a` only `with_client`), `extra`.
fn write_config(c: &SimCluster, with_client: bool, extra: &str) {
    let mut yaml = "namespaces:\n\
                    \x20 - { name: shop, labels: { mesh-agent.io/dataplane-mode: ambient } }\n\
                    \x20 - { name: backend, labels: { istio.io/dataplane-mode: ambient } }\n\
                    \x20 - { name: legacy }\nworkloads:\n"
        .to_owned();
    for (pod, ns, sa, labels) in [
        ("client-a", "shop", "web", "{}"),
        ("legacy", "legacy", "default", "{}"),
        ("server-b", "backend", "echo", "{ app: echo }"),
    ] {
        if pod == "client-a" && !with_client {
            continue;
        }
        let p = c.pod(pod);
        yaml += &format!(
            "  - {{ name: {pod}, namespace: {ns}, ip: {}, netns: {}, node: {}, service_account: {sa}, labels: {labels} }}\n",
            p.ip,
            p.netns_path(),
            c.node_of(pod).name()
        );
    }
    yaml += extra;
    for i in 0..2 {
        c.node(i).write_config(&yaml).unwrap();
    }
}

/// Waits until both agents hold server-b's workload and identity (the tunnel needs them).
fn wait_mesh(c: &SimCluster, agents: &[NodeAgent]) {
    let ip = c.pod("server-b").ip.to_string();
    for a in agents {
        wait_for("the workloads in force", Duration::from_secs(10), || {
            a.get("/config_dump")
                .map(|d| d.contains(&ip) && d.contains(ECHO))
                .unwrap_or(false)
        });
    }
}

fn dest<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut l = vec![
        ("reporter", "destination"),
        ("destination_workload", "server-b"),
        ("destination_workload_namespace", "backend"),
        ("destination_principal", ECHO),
    ];
    l.extend_from_slice(extra);
    l
}

const FROM_CLIENT_A: [(&str, &str); 4] = [
    ("source_workload", "client-a"),
    ("source_workload_namespace", "shop"),
    ("source_principal", WEB),
    ("connection_security_policy", "mutual_tls"),
];

const FROM_OUTSIDE: [(&str, &str); 4] = [
    ("source_workload", "unknown"),
    ("source_workload_namespace", "unknown"),
    ("source_principal", "unknown"),
    ("connection_security_policy", "none"),
];

/// The status of one `GET path` from `pod` on node 0.
fn get_status(c: &SimCluster, pod: &str, to: &str, path: &str) -> String {
    let r = c
        .node(0)
        .client(
            pod,
            &[
                "http-client",
                "--to",
                to,
                "--path",
                path,
                "--deadline-ms",
                "10000",
            ],
        )
        .unwrap();
    r["status"]
        .as_object()
        .and_then(|m| m.keys().next().cloned())
        .unwrap_or_default()
}

#[test]
fn destination_series_carry_the_source_principal_and_the_security_policy() {
    let c = pods();
    write_config(&c, true, &deny_admin());
    let agents: Vec<NodeAgent> = (0..2)
        .map(|i| c.node(i).start_agent(&[]).expect("agent"))
        .collect();
    let n1 = c.node(1);
    n1.serve(
        "server-b",
        &["echo", "--listen", &format!("0.0.0.0:{ECHO_PORT}")],
    )
    .unwrap();
    n1.serve(
        "server-b",
        &[
            "http",
            "--listen",
            &format!("0.0.0.0:{HTTP_PORT}"),
            "--name",
            "server-b",
        ],
    )
    .unwrap();
    wait_mesh(&c, &agents);
    let server = c.pod("server-b").ip;
    let echo = format!("{server}:{ECHO_PORT}");
    let http = format!("{server}:{HTTP_PORT}");

    // L4 across nodes: through HBONE, relayed whole into the pod.
    let r = c.node(0).echo("client-a", &echo, MIB).unwrap();
    assert_eq!(r["intact"], 1, "{r}");
    let tcp = dest(&[&FROM_CLIENT_A[..], &[("request_protocol", "tcp")]].concat());
    let mut m = String::new();
    wait_for(
        "the tunnelled connection counted closed at the destination",
        Duration::from_secs(10),
        || {
            m = agents[1].get("/metrics").unwrap();
            metric(&m, "istio_tcp_connections_closed_total", &tcp) >= 1
        },
    );
    assert!(
        metric(&m, "istio_tcp_connections_opened_total", &tcp) >= 1,
        "{m}"
    );
    assert!(
        metric(&m, "istio_tcp_received_bytes_total", &tcp) >= MIB,
        "{m}"
    );
    assert!(metric(&m, "istio_tcp_sent_bytes_total", &tcp) >= MIB, "{m}");
    assert!(
        m.contains("response_flags=\"-\",connection_security_policy=\"mutual_tls\""),
        "{m}"
    );
    // The source node reports its side only, bytes through the tunnel included.
    let src: Vec<(&str, &str)> = [
        &[("reporter", "source"), ("destination_workload", "server-b")][..],
        &FROM_CLIENT_A[..],
        &[("request_protocol", "tcp")],
    ]
    .concat();
    let mut m0 = String::new();
    wait_for(
        "the tunnelled connection's bytes in the source series",
        Duration::from_secs(10),
        || {
            m0 = agents[0].get("/metrics").unwrap();
            metric(&m0, "istio_tcp_received_bytes_total", &src) >= MIB
                && metric(&m0, "istio_tcp_sent_bytes_total", &src) >= MIB
        },
    );
    assert_eq!(
        metric(
            &m0,
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination")]
        ),
        0,
        "{m0}"
    );

    // Plain text from outside the mesh: captured by TC, delivered, `none`, no principal.
    let r = c.node(0).echo("legacy", &echo, 4096).unwrap();
    assert_eq!(r["intact"], 1, "{r}");
    let plain = dest(&[&FROM_OUTSIDE[..], &[("request_protocol", "tcp")]].concat());
    wait_for(
        "the plain-text connection counted at the destination",
        Duration::from_secs(10),
        || {
            m = agents[1].get("/metrics").unwrap();
            metric(&m, "istio_tcp_connections_closed_total", &plain) >= 1
        },
    );
    assert!(
        metric(&m, "istio_tcp_received_bytes_total", &plain) >= 4096,
        "{m}"
    );

    // L7: requests node 1 terminates for the DENY, allowed and denied.
    wait_for("GET /admin denied", Duration::from_secs(10), || {
        get_status(&c, "client-a", &http, "/admin") == "403"
    });
    assert_eq!(get_status(&c, "client-a", &http, "/ok"), "200");
    assert_eq!(get_status(&c, "legacy", &http, "/ok"), "200");
    let m = agents[1].get("/metrics").unwrap();
    let ok = dest(
        &[
            &FROM_CLIENT_A[..],
            &[
                ("request_protocol", "http"),
                ("response_code", "200"),
                ("response_flags", "-"),
            ],
        ]
        .concat(),
    );
    assert!(metric(&m, "istio_requests_total", &ok) >= 1, "{m}");
    let denied = dest(
        &[
            &FROM_CLIENT_A[..],
            &[("response_code", "403"), ("response_flags", "RBAC")],
        ]
        .concat(),
    );
    assert!(metric(&m, "istio_requests_total", &denied) >= 1, "{m}");
    assert!(
        metric(&m, "istio_request_duration_milliseconds_count", &ok) >= 1,
        "{m}"
    );
    assert!(metric(&m, "istio_response_bytes_count", &ok) >= 1, "{m}");
    let outside = dest(&[&FROM_OUTSIDE[..], &[("response_code", "200")]].concat());
    assert!(metric(&m, "istio_requests_total", &outside) >= 1, "{m}");
    // No address or port in any destination label set.
    for l in m.lines().filter(|l| l.contains("reporter=\"destination\"")) {
        assert!(
            !l.contains(&server.to_string()),
            "an address in a label: {l}"
        );
    }

    // client-a leaves the configuration: its series go with it at the next scrape.
    write_config(&c, false, &deny_admin());
    wait_for(
        "client-a's destination series dropped",
        Duration::from_secs(10),
        || {
            let m = agents[1].get("/metrics").unwrap();
            !m.lines().any(|l| {
                l.contains("reporter=\"destination\"") && l.contains("source_workload=\"client-a\"")
            }) && metric(&m, "mesh_istio_series_pruned_total", &[]) >= 1
        },
    );
    let m = agents[1].get("/metrics").unwrap();
    assert!(
        metric(&m, "istio_tcp_connections_opened_total", &plain) >= 1,
        "the outside source's series stay: {m}"
    );
}

// --- traces ---

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn script() -> PathBuf {
    workspace().join("tests/interop/otlp_receiver.py")
}

/// The python with grpcio and opentelemetry-proto (as `traces.rs` finds it).
fn python() -> PathBuf {
    let p = std::env::var_os("MESH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/bench/venv/bin/python"));
    let ok = Command::new(&p)
        .args([
            "-c",
            "import grpc; from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc",
        ])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} lacks grpcio or opentelemetry-proto: run `cargo xtask setup` or set MESH_PYTHON",
        p.display()
    );
    p
}

/// A child process killed (and reaped) on drop, and a file removed.
struct Proc(Child, Option<PathBuf>);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if let Some(f) = &self.1 {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Starts `cmd` and waits for its first stdout line (which must start with `listening`).
fn spawn_listening(mut cmd: Command, file: Option<PathBuf>) -> (Proc, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("first line");
    let p = Proc(child, file);
    assert!(line.starts_with("listening"), "{line:?}");
    (p, line.trim().to_owned())
}

/// A receiver on 127.0.0.1 of node `i` (its agent's network namespace, not its pods'
/// cgroups: nothing captures it); its spans land in the returned file.
fn receiver(c: &SimCluster, i: usize, py: &Path) -> (Proc, u16, PathBuf) {
    let out = std::env::temp_dir().join(format!(
        "mesh-dest-spans-{}-{}.jsonl",
        std::process::id(),
        c.node(i).name()
    ));
    let _ = std::fs::remove_file(&out);
    let netns = c.node(i).netns_path();
    let name = netns.file_name().expect("netns name").to_owned();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec"])
        .arg(name)
        .arg(py)
        .arg(script())
        .args(["receiver", "--out"])
        .arg(&out);
    let (p, line) = spawn_listening(cmd, Some(out.clone()));
    let port = line
        .rsplit(' ')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    (p, port, out)
}

fn spans(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Waits for a span of `out` that `f` accepts.
fn span_where(out: &Path, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let mut found = None;
    wait_for(what, Duration::from_secs(15), || {
        found = spans(out).into_iter().find(|s| f(s));
        found.is_some()
    });
    found.unwrap()
}

const TID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SID: &str = "00f067aa0ba902b7";
/// OTLP's span kinds.
const SERVER: u64 = 2;
const CLIENT: u64 = 3;

#[test]
fn destination_spans_arrive_with_the_source_try_as_parent() {
    let py = python();
    let c = pods();
    let vip = c.vip(40);
    write_config(
        &c,
        true,
        &format!(
            "{}services:\n\
             \x20 - name: web-api\n\
             \x20   namespace: backend\n\
             \x20   vip: {vip}\n\
             \x20   ports: [ {{ port: 80, target_port: {HTTP_PORT}, protocol: http }} ]\n\
             \x20   selector: {{ app: echo }}\n",
            deny_admin()
        ),
    );
    let (_r0, port0, out0) = receiver(&c, 0, &py);
    let (_r1, port1, out1) = receiver(&c, 1, &py);
    let agents: Vec<NodeAgent> = [port0, port1]
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let endpoint = format!("http://127.0.0.1:{port}");
            c.node(i)
                .start_agent(&["--trace-otlp", &endpoint, "--trace-sampling", "1"])
                .expect("agent")
        })
        .collect();
    // The application echoes the headers it got, `traceparent` among them.
    let mut cmd = c.node(1).pod_command("server-b", &py);
    cmd.arg(script())
        .args(["upstream", "--listen", &format!("0.0.0.0:{HTTP_PORT}")]);
    let (_app, _) = spawn_listening(cmd, None);
    c.node(1)
        .serve(
            "server-b",
            &["echo", "--listen", &format!("0.0.0.0:{ECHO_PORT}")],
        )
        .unwrap();
    wait_mesh(&c, &agents);

    // L7: client-a -> the service (node 0's L7 engine: a try span) -> HBONE -> node 1,
    // which terminates HTTP for the DENY: its span's parent is node 0's try.
    let get = |path: &str| -> (u64, Value) {
        let mut cmd = c.node(0).pod_command("client-a", &py);
        cmd.arg(script()).args([
            "get",
            "--to",
            &format!("{vip}:80"),
            "--path",
            path,
            "--header",
            &format!("traceparent: 00-{TID}-{SID}-01"),
        ]);
        let out = cmd.output().expect("client");
        assert!(
            out.status.success(),
            "client: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("client JSON");
        (v["status"].as_u64().unwrap(), v["body"].clone())
    };
    let mut got = (0, Value::Null);
    wait_for(
        "the service in force on node 0",
        Duration::from_secs(10),
        || {
            got = get("/items");
            got.0 == 200
        },
    );
    let (_, up) = got;
    let tp = up["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("no traceparent at the application: {up}"));
    let app_parent = tp.split('-').nth(2).expect("span id").to_owned();
    let dest = span_where(&out1, "node 1's request span", |s| {
        s["trace_id"] == TID
            && s["kind"] == SERVER
            && s["attributes"]["mesh.reporter"] == "destination"
            && s["span_id"] == app_parent.as_str()
    });
    let try_span = span_where(&out0, "node 0's try span", |s| {
        s["trace_id"] == TID && s["kind"] == CLIENT && s["span_id"] == dest["parent_span_id"]
    });
    assert_eq!(
        try_span["attributes"]["mesh.path_taken"], "tunnel",
        "{try_span:#}"
    );
    let a = &dest["attributes"];
    assert_eq!(a["mesh.source.principal"], WEB, "{dest:#}");
    assert_eq!(
        a["mesh.destination.workload"], "backend/server-b",
        "{dest:#}"
    );
    assert_eq!(a["mesh.path_taken"], "inbound+tunnel", "{dest:#}");
    assert_eq!(a["http.response.status_code"], 200, "{dest:#}");
    assert_eq!(a["url.path"], "/items", "{dest:#}");
    assert_eq!(
        dest["resource"]["k8s.node.name"],
        c.node(1).name(),
        "{dest:#}"
    );
    assert!(
        dest["start_ns"].as_u64() >= try_span["start_ns"].as_u64(),
        "{dest:#} {try_span:#}"
    );

    // A denied request: its span carries the flag and the policy, no application span.
    let (status, _) = get("/admin");
    assert_eq!(status, 403);
    let denied = span_where(&out1, "the denied request's span", |s| {
        s["trace_id"] == TID
            && s["kind"] == SERVER
            && s["attributes"]["mesh.reporter"] == "destination"
            && s["attributes"]["http.response.status_code"] == 403
    });
    assert_eq!(
        denied["attributes"]["mesh.response_flags"], "RBAC",
        "{denied:#}"
    );
    assert_eq!(
        denied["attributes"]["mesh.policy"], "backend/no-admin",
        "{denied:#}"
    );

    // L4 across nodes: node 1's span of the stream it relayed, with its bytes.
    let r = c
        .node(0)
        .echo(
            "client-a",
            &format!("{}:{ECHO_PORT}", c.pod("server-b").ip),
            12345,
        )
        .unwrap();
    assert_eq!(r["intact"], 1, "{r}");
    let tcp = span_where(&out1, "node 1's span of the tunnelled connection", |s| {
        s["name"] == "tcp"
            && s["attributes"]["mesh.reporter"] == "destination"
            && s["attributes"]["mesh.bytes_received"] == 12345
    });
    let a = &tcp["attributes"];
    assert_eq!(a["mesh.path_taken"], "inbound+tunnel", "{tcp:#}");
    assert_eq!(a["mesh.bytes_sent"], 12345, "{tcp:#}");
    assert_eq!(a["mesh.source.principal"], WEB, "{tcp:#}");
    assert_eq!(a["mesh.source.workload"], "shop/client-a", "{tcp:#}");
    assert_eq!(a["mesh.destination.principal"], ECHO, "{tcp:#}");
    assert_eq!(tcp["parent_span_id"], "", "{tcp:#}");
    // Node 0's span of the same connection: the source side knows its bytes too.
    let src = span_where(&out0, "node 0's span of the tunnelled connection", |s| {
        s["name"] == "tcp"
            && s["attributes"]["mesh.path_taken"] == "tunnel"
            && s["attributes"]["server.port"] == ECHO_PORT
            && s["attributes"]["mesh.bytes_received"] == 12345
    });
    let a = &src["attributes"];
    assert_eq!(a["mesh.bytes_sent"], 12345, "{src:#}");

    // Plain text from outside the mesh: `inbound`.
    let r = c
        .node(0)
        .echo(
            "legacy",
            &format!("{}:{ECHO_PORT}", c.pod("server-b").ip),
            777,
        )
        .unwrap();
    assert_eq!(r["intact"], 1, "{r}");
    let plain = span_where(&out1, "node 1's span of the plain-text connection", |s| {
        s["name"] == "tcp"
            && s["attributes"]["mesh.reporter"] == "destination"
            && s["attributes"]["mesh.path_taken"] == "inbound"
    });
    assert_eq!(plain["attributes"]["mesh.bytes_received"], 777, "{plain:#}");
    assert!(
        plain["attributes"].get("mesh.source.principal").is_none(),
        "{plain:#}"
    );
}
