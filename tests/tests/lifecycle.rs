//! Start-up failures, the node lock, clean shutdown and its drain, and the inspection CLI.
#![expect(
    unsafe_code,
    reason = "setuid(2) in a pre_exec hook, to run the agent as nobody; kill(2) to start a drain"
)]

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use mesh_tests::{agent_bin, sh, SimNode};

fn simple_node() -> SimNode {
    let mut n = SimNode::new().expect("sim node");
    n.add_pod("client", 2).unwrap();
    n.add_pod("server", 3).unwrap();
    let (c, s) = (n.pod("client"), n.pod("server"));
    let yaml = format!(
        "namespaces:\n  - name: shop\n    labels: {{ mesh-agent.io/dataplane-mode: ambient }}\n  - name: backend\n\
         workloads:\n  - {{ name: client, namespace: shop, ip: {}, netns: {} }}\n  - {{ name: server, namespace: backend, ip: {}, netns: {} }}\n",
        c.ip,
        c.netns_path(),
        s.ip,
        s.netns_path()
    );
    n.write_config(&yaml).unwrap();
    n
}

/// Runs the agent to completion (it must fail) and returns its stderr.
fn run_failing(n: &SimNode, wrap: Option<&str>, extra: &[&str]) -> String {
    let out = match wrap {
        None => n
            .agent_command(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap(),
        Some(shell) => {
            let cmd = n.agent_command(extra);
            let args: Vec<String> = std::iter::once(cmd.get_program())
                .chain(cmd.get_args())
                .map(|a| format!("'{}'", a.to_string_lossy()))
                .collect();
            let script = format!("{shell} {}", args.join(" "));
            // unshare -m: a private mount namespace, so the test can hide kernel features
            // from the agent without touching the machine.
            std::process::Command::new("unshare")
                .args(["-m", "sh", "-c", &script])
                .output()
                .unwrap()
        }
    };
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "agent should fail with exit 1:\n{err}"
    );
    let last = err
        .lines()
        .filter(|l| l.starts_with("mesh-agent: error:"))
        .collect::<Vec<_>>();
    assert_eq!(last.len(), 1, "exactly one error line:\n{err}");
    // Nothing half-attached, no pins left.
    assert_eq!(n.cgroup_programs().unwrap(), Vec::<String>::new());
    assert!(!n.pin_path.exists() || std::fs::read_dir(&n.pin_path).unwrap().next().is_none());
    last[0].to_owned()
}

#[test]
fn malformed_config_names_file_line_and_field() {
    let n = simple_node();
    let good = std::fs::read_to_string(n.config_path()).unwrap();
    std::fs::write(n.config_path(), good.replace("ip: 10.201", "ip: 10.301")).unwrap();
    let e = run_failing(&n, None, &[]);
    assert!(e.contains(&n.config_path().display().to_string()), "{e}");
    assert!(e.contains("workloads[0].ip") && e.contains("line 6"), "{e}");
    std::fs::write(
        n.config_path(),
        good.replace("namespace: backend", "namespace: nowhere"),
    )
    .unwrap();
    let e = run_failing(&n, None, &[]);
    assert!(
        e.contains("mesh.yaml:7:") && e.contains("\"nowhere\""),
        "{e}"
    );
}

#[test]
fn not_root_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let n = simple_node();
    // The build tree may sit in a folder only root can enter (a mktemp -d clone): run a
    // copy from the node's own folder instead.
    let bin = n.dir.join("mesh-agent");
    std::fs::copy(agent_bin(), &bin).unwrap();
    for p in [&n.dir, &bin] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut cmd = std::process::Command::new(&bin);
    cmd.args(n.agent_command(&[]).get_args());
    // SAFETY: setgid(2)/setuid(2) only, between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // ETXTBSY: a child forked by a parallel test at the moment of the copy can still hold
    // the copy's write descriptor until it execs.
    let out = (0..50)
        .find_map(|_| match cmd.output() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                std::thread::sleep(std::time::Duration::from_millis(50));
                None
            }
            r => Some(r.unwrap()),
        })
        .expect("the copied agent stayed busy");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("must run as root"), "{err}");
}

#[test]
fn missing_kernel_features_are_named() {
    let n = simple_node();
    let e = run_failing(&n, Some("mount -t tmpfs none /sys/kernel/btf && exec"), &[]);
    assert!(e.contains("kernel BTF"), "{e}");
    let e = run_failing(&n, None, &["--cgroup", "/tmp"]);
    assert!(e.contains("is not a cgroup v2 folder"), "{e}");
    // No cgroup2 mounted at all (and no --cgroup): the agent finds none in mountinfo.
    let out = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c"])
        .arg(format!(
            "umount -l {} && exec '{}' run --config '{}' --pin-path '{}' --proxy-address 127.0.0.1:1",
            mesh_tests::cgroup2_root().display(),
            agent_bin().display(),
            n.config_path().display(),
            n.pin_path.display()
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no cgroup v2 filesystem is mounted"), "{err}");
    // bpffs: a pin path that is not on one, and a /sys/fs/bpf that cannot be mounted.
    let e = run_failing(&n, None, &["--pin-path", "/tmp/mesh-not-bpffs/mesh"]);
    assert!(e.contains("is not on a bpffs"), "{e}");
    let e = run_failing(
        &n,
        Some("umount -l /sys/fs/bpf 2>/dev/null; mount -t tmpfs none /sys/fs/bpf && exec setpriv --inh-caps=-sys_admin --bounding-set=-sys_admin"),
        &["--pin-path", "/sys/fs/bpf/mesh-x"],
    );
    assert!(
        e.contains("bpffs is not mounted at /sys/fs/bpf and mounting it failed"),
        "{e}"
    );
}

#[test]
fn second_agent_on_the_node_is_refused_and_stop_cleans_up() {
    let n = simple_node();
    let mut first = n.start_agent(&[]).unwrap();
    let attached = n.cgroup_programs().unwrap();
    assert_eq!(
        attached.len(),
        5,
        "connect4|6, getpeername4|6, sockops (sk_msg sits on the sockhash): {attached:?}"
    );

    // Same node (pin folder), same admin port: the lock is what it must trip on.
    let out = n.agent_command(&[]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("another mesh-agent already runs on this node"),
        "{err}"
    );
    assert_eq!(
        n.cgroup_programs().unwrap(),
        attached,
        "the refused agent must not attach anything"
    );
    assert!(first.get("/ready").is_ok(), "the first agent keeps running");

    // Another pin folder, same cgroup: the attached programs give the other agent away.
    let other_pins = format!("{}-other", n.pin_path.display());
    let out = n
        .agent_command(&["--pin-path", &other_pins, "--admin-address", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("another mesh-agent's programs are attached to cgroup"),
        "{err}"
    );
    assert_eq!(n.cgroup_programs().unwrap(), attached);
    assert!(
        !std::path::Path::new(&other_pins).exists(),
        "the refused agent removes its pins"
    );

    let (code, log) = first.stop();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("programs detached, pins removed"), "{log}");
    assert_eq!(n.cgroup_programs().unwrap(), Vec::<String>::new());
    assert!(!n.pin_path.exists(), "pins must be removed on stop");
}

#[test]
fn inspection_cli_lists_and_decodes() {
    let n = simple_node();
    let agent = n.start_agent(&[]).unwrap();
    n.serve("server", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();

    let progs = agent.cli(&["programs", "-o", "json"]);
    let progs: serde_json::Value = serde_json::from_slice(&progs.stdout).unwrap();
    let names: Vec<&str> = progs
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for want in [
        "mesh_connect4",
        "mesh_connect6",
        "mesh_peername4",
        "mesh_peername6",
        "mesh_sockops",
        "mesh_sk_msg",
    ] {
        assert!(names.contains(&want), "{names:?}");
    }
    let links = String::from_utf8(agent.cli(&["links"]).stdout).unwrap();
    assert!(
        links.contains("mesh_sockops") && links.contains("prog_attach(SOCKHASH)"),
        "{links}"
    );
    let maps = String::from_utf8(agent.cli(&["maps"]).stdout).unwrap();
    for m in ["WORKLOADS", "FLOWS", "SOCKHASH", "STATS", "CONFIG"] {
        assert!(maps.contains(m), "{maps}");
    }
    // The programs' pinned links share the folder; they are links, not maps.
    assert!(!maps.contains("link_"), "{maps}");

    let dests: serde_json::Value =
        serde_json::from_slice(&agent.cli(&["dump", "DESTS", "-o", "json"]).stdout).unwrap();
    let server_ip = n.pod("server").ip.to_string();
    assert!(
        dests
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["ip"] == server_ip.as_str()),
        "{dests}"
    );
    let cfg = String::from_utf8(agent.cli(&["dump", "CONFIG"]).stdout).unwrap();
    assert!(
        cfg.contains(&format!("{}:15001", n.gateway)) && cfg.contains("proxy_ready"),
        "{cfg}"
    );

    // Keep a captured connection open and find it decoded in FLOWS and SOCKHASH.
    let mut conn = n
        .pod_command("client", &mesh_tests::podtool())
        .args([
            "ping",
            "--to",
            &format!("{server_ip}:8080"),
            "--count",
            "200000",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    mesh_tests::wait_for("a flow", Duration::from_secs(5), || {
        let flows: serde_json::Value =
            serde_json::from_slice(&agent.cli(&["dump", "FLOWS", "-o", "json"]).stdout)
                .unwrap_or_default();
        flows.as_array().is_some_and(|a| {
            a.iter().any(|f| {
                f["original_dst"] == format!("{server_ip}:8080").as_str()
                    && f["flags"].as_str().unwrap_or("").contains("server_paired")
            })
        })
    });
    let sockhash = String::from_utf8(agent.cli(&["dump", "SOCKHASH"]).stdout).unwrap();
    assert!(
        sockhash.contains(&format!("{}:15001", n.gateway)),
        "{sockhash}"
    );
    // bpftool reads the pinned maps with their BTF field names.
    let raw = sh(&format!(
        "bpftool map dump pinned {}/FLOWS",
        n.pin_path.display()
    ))
    .unwrap();
    assert!(
        raw.contains("\"orig_ip\"") && raw.contains("\"local_port\""),
        "{raw}"
    );
    let _ = conn.kill();
    let _ = conn.wait();

    let bad = agent.cli(&["dump", "NOPE"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown map \"NOPE\""));
}

/// The service the drain test calls, on the web pod: HTTP/1.1 (port 80) and sniffed
/// (port 81, where HTTP/2 with prior knowledge is served).
const WEB_VIP: &str = "10.96.0.20:80";
const WEB_VIP_AUTO: &str = "10.96.0.20:81";

fn http_node() -> SimNode {
    let mut n = SimNode::new().expect("sim node");
    n.add_pod("client", 2).unwrap();
    n.add_pod("web", 3).unwrap();
    let (c, w) = (n.pod("client"), n.pod("web"));
    let yaml = format!(
        "namespaces:\n  - name: shop\n    labels: {{ mesh-agent.io/dataplane-mode: ambient }}\n  - name: backend\n\
         workloads:\n  - {{ name: client, namespace: shop, ip: {}, netns: {} }}\n  - {{ name: web, namespace: backend, ip: {}, netns: {}, labels: {{ app: web }} }}\n\
         services:\n  - name: web\n    namespace: backend\n    vip: 10.96.0.20\n    ports: [ {{ port: 80, target_port: 8080, protocol: http }}, {{ port: 81, target_port: 8080, protocol: auto }} ]\n    selector: {{ app: web }}\n",
        c.ip,
        c.netns_path(),
        w.ip,
        w.netns_path()
    );
    n.write_config(&yaml).unwrap();
    n
}

/// One admin GET, whatever the status: `(status, body)`. Fails (instead of hanging) when
/// the endpoint does not answer within 2 s.
fn admin_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    mesh_tests::http_get_status(port, path, Duration::from_secs(2))
}

/// Issue 9, item 5: a SIGTERM drain tells HTTP clients to go instead of waiting for them
/// (or cutting them at the deadline), and `/ready` says so at once. Requests in flight when
/// the drain begins are answered; then an HTTP/1.1 connection gets `connection: close` and
/// a clean close, an HTTP/2 one a GOAWAY; the agent exits well before its deadline.
#[test]
fn a_sigterm_drain_closes_http_connections_gracefully_and_is_not_ready() {
    let n = http_node();
    let mut agent = n.start_agent(&["--drain-ms", "15000"]).unwrap();
    n.serve(
        "web",
        &["http", "--listen", "0.0.0.0:8080", "--name", "web"],
    )
    .unwrap();
    // The listener is known to the proxy (on-demand xDS) before the clients under test.
    let warm = n.http_get("client", WEB_VIP, "/", 1, &[]).unwrap();
    assert_eq!(warm["bodies"], serde_json::json!({ "web": 1 }), "{warm}");

    // HTTP/1.1: an answer at once, then a request the server holds for 4 s.
    let h1 = n
        .pod_command("client", &mesh_tests::podtool())
        .args([
            "http-conn",
            "--to",
            WEB_VIP,
            "--delays-ms",
            "0,4000",
            "--deadline-ms",
            "20000",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // HTTP/2 with prior knowledge: one stream the server holds for 4 s.
    let h2 = n
        .pod_command("client", std::path::Path::new("nghttp"))
        .args([
            "-v",
            "-H",
            "x-delay-ms: 4000",
            &format!("http://{WEB_VIP_AUTO}/"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nghttp (nghttp2-client) must be installed for this test");
    std::thread::sleep(Duration::from_millis(1500));

    // SAFETY: plain kill(2) on our child.
    assert_eq!(unsafe { libc::kill(agent.pid() as i32, libc::SIGTERM) }, 0);
    let signalled = Instant::now();
    // Not ready as soon as the drain begins, and the admin endpoint still answers.
    let ready = loop {
        let r = admin_get(agent.admin_port, "/ready")
            .expect("the admin endpoint answers while draining");
        if r.0 != 200 || signalled.elapsed() > Duration::from_secs(1) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(ready.0, 503, "{ready:?}");
    assert!(ready.1.contains("draining"), "{ready:?}");

    let out = h1.wait_with_output().unwrap();
    let h1: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("http-conn output: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(h1["errors"], serde_json::json!([]), "{h1}");
    assert_eq!(
        h1["responses"],
        serde_json::json!([
            { "status": "200", "connection": "-" },
            { "status": "200", "connection": "close" },
        ]),
        "the response after the drain began closes the connection: {h1}"
    );
    assert_eq!(h1["end"], "eof", "then a clean close: {h1}");

    let out = h2.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{log}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let goaway = log
        .find("recv GOAWAY frame")
        .unwrap_or_else(|| panic!("no GOAWAY:\n{log}"));
    let answered = log
        .find(":status: 200")
        .unwrap_or_else(|| panic!("the open stream is answered:\n{log}"));
    assert!(
        goaway < answered,
        "the GOAWAY comes when the drain begins, before the held answer:\n{log}"
    );

    // Nothing was left to cut: the agent is gone long before its 15 s deadline.
    let code = agent.wait_exit(Duration::from_secs(10));
    let log = agent.log_text();
    assert_eq!(code, Some(0), "{log}");
    assert!(signalled.elapsed() < Duration::from_secs(10), "{log}");
    assert!(!log.contains("drain deadline passed"), "{log}");
}
