//! The OpenTelemetry side of the trace tests: a real OTLP/gRPC receiver (the OpenTelemetry
//! Python protobufs served by grpcio, `tests/interop/otlp_receiver.py`) whose spans land
//! in a file, one JSON line each, and the same script's HTTP helpers (an upstream that
//! echoes the headers it got, a client).
//!
//! Needs the venv's python with grpcio and opentelemetry-proto (`cargo xtask setup`
//! installs both; MESH_PYTHON names another): without them the tests fail, never skip.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::wait_for;

/// OTLP's span kinds.
pub const SERVER: u64 = 2;
pub const CLIENT: u64 = 3;
/// OTLP's status code of a failed span.
pub const ERROR: u64 = 2;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// `tests/interop/otlp_receiver.py`: the receiver, the upstream and the client.
pub fn script() -> PathBuf {
    workspace().join("tests/interop/otlp_receiver.py")
}

/// The python with grpcio and opentelemetry-proto: MESH_PYTHON, else the venv `cargo
/// xtask setup` fills.
pub fn python() -> PathBuf {
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
        "{} lacks grpcio or opentelemetry-proto: run `cargo xtask setup` (it installs both \
         into target/bench/venv) or set MESH_PYTHON",
        p.display()
    );
    p
}

/// A child process killed (and reaped) on drop, and a file removed with it.
pub struct Proc(pub Child, pub Option<PathBuf>);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if let Some(f) = &self.1 {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Starts `cmd` and waits for its first stdout line (which must start with `listening`);
/// `file` goes with the process.
pub fn spawn_listening(mut cmd: Command, file: Option<PathBuf>) -> (Proc, String) {
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

/// A receiver on 127.0.0.1 of network namespace `netns` (a name under /run/netns; `None`:
/// this process's), its spans in `out` (removed first, and again when the receiver goes);
/// the process and its port.
pub fn receiver(py: &Path, netns: Option<&str>, out: &Path) -> (Proc, u16) {
    let _ = std::fs::remove_file(out);
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(py);
            c
        }
        None => Command::new(py),
    };
    cmd.arg(script()).args(["receiver", "--out"]).arg(out);
    let (p, line) = spawn_listening(cmd, Some(out.to_owned()));
    let port = line
        .rsplit(' ')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    (p, port)
}

/// Every span the receiver wrote to `out` so far (every line must be JSON).
pub fn spans(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Waits (15 s at most) for a span of `out` that `f` accepts.
pub fn span_where(out: &Path, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let mut found = None;
    wait_for(what, Duration::from_secs(15), || {
        found = spans(out).into_iter().find(|s| f(s));
        found.is_some()
    });
    found.expect("found")
}

/// The script's HTTP client, run by `cmd` (the python, in a pod): one GET of `path` from
/// `to` with `headers` (`name: value`); the status and the body (the upstream's JSON: the
/// headers it got).
pub fn get(mut cmd: Command, to: &str, path: &str, headers: &[&str]) -> (u64, Value) {
    cmd.arg(script()).args(["get", "--to", to, "--path", path]);
    for h in headers {
        cmd.args(["--header", h]);
    }
    let out = cmd.output().expect("client");
    assert!(
        out.status.success(),
        "client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("client JSON");
    (v["status"].as_u64().expect("status"), v["body"].clone())
}
