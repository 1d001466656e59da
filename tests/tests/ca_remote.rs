//! Workload certificates from a CA on another machine, in TLS (issue 11): a separate
//! `mesh-agent control-plane` process serves the cluster's CA on `--ca-listen` (as istiod
//! serves it on 15012), and both nodes' agents get their certificates from it with
//! `--ca-address https://...`, checking its TLS certificate against the mesh root
//! (`--ca-root-cert`) and presenting their node credential.
//!
//! Node 0 runs `client-a` (shop/web) and the control plane (in its netns, on its underlay
//! address); node 1 runs `server-b` (backend/echo) with an echo server, and reaches the CA
//! across the underlay, where a capture checks that its token never travels in clear.

use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use mesh_tests::{
    agent_bin,
    cluster::{command_in, contains, in_netns, Capture},
    intact, metric,
    scenes::two_nodes::{TwoNodes, CLIENT_A, SERVER_B},
    wait_for,
};

const CA_PORT: u16 = 15012;

/// A process the test started, killed and reaped on drop (also on a failed assertion).
struct Process(Child, PathBuf);

impl Process {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pods() -> TwoNodes {
    let c = TwoNodes::new(&[CLIENT_A, SERVER_B]);
    c.node(1)
        .serve("server-b", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    c
}

fn token(i: usize) -> String {
    format!("node-{i}-credential-3f9a1c7e5b2d4e6f")
}

/// Starts `mesh-agent control-plane` with the cluster's CA on node 0's underlay address,
/// and waits until its CA port accepts connections from node 1.
fn control_plane(c: &TwoNodes, dir: &Path) -> Process {
    let file = dir.join("control-plane.yaml");
    std::fs::write(&file, c.file("")).unwrap();
    let tokens = dir.join("node-tokens");
    std::fs::write(
        &tokens,
        format!(
            "{} {}\n{} {}\n",
            c.node(0).name(),
            token(0),
            c.node(1).name(),
            token(1)
        ),
    )
    .unwrap();
    let log = dir.join("control-plane.log");
    let n0 = c.node(0);
    let child = command_in(&agent_bin(), &n0.netns_path(), &n0.cgroup)
        .args(["control-plane", "--config"])
        .arg(&file)
        .args(["--listen", "127.0.0.1:15110", "--ca-listen"])
        .arg(format!("{}:{CA_PORT}", n0.address))
        .arg("--ca-dir")
        .arg(c.ca_dir())
        .arg("--ca-node-tokens")
        .arg(&tokens)
        .env("MESH_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let p = Process(child, log);
    let ca: SocketAddr = SocketAddr::from((n0.address, CA_PORT));
    let n1 = c.node(1).netns_path();
    wait_for(
        "the control plane's CA port",
        Duration::from_secs(10),
        || {
            in_netns(&n1, || {
                TcpStream::connect_timeout(&ca, Duration::from_millis(200)).is_ok()
            })
        },
    );
    p
}

/// The agent flags that take certificates from the control plane's CA.
fn ca_flags(c: &TwoNodes, i: usize, root: &Path) -> Vec<String> {
    let file = c.node(i).dir.join("ca-token");
    std::fs::write(&file, token(i)).unwrap();
    vec![
        "--ca-address".into(),
        format!("https://{}:{CA_PORT}", c.node(0).address),
        "--ca-token-file".into(),
        file.display().to_string(),
        "--ca-root-cert".into(),
        root.display().to_string(),
    ]
}

fn echo_ok(c: &TwoNodes) -> bool {
    let to = format!("{}:8080", c.pod("server-b").ip);
    c.node(0)
        .echo("client-a", &to, 64 << 10)
        .is_ok_and(|r| intact(&r))
}

#[test]
fn agents_get_certificates_from_a_separate_control_plane_over_tls() {
    mesh_tests::must_be_root();
    let c = pods();
    let dir = c.node(0).dir.clone();
    let cp = control_plane(&c, &dir);
    c.write_file("");
    let root = c.ca_dir().join("root-cert.pem");
    let underlay = PathBuf::from(format!("/run/netns/{}", c.underlay));
    let cap = Capture::start(&underlay).unwrap();
    let start = |i: usize, root: &Path| {
        let flags = ca_flags(&c, i, root);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        c.node(i).start_agent(&flags).expect("agent")
    };
    let mut agents: Vec<_> = (0..2).map(|i| start(i, &root)).collect();
    c.wait_mesh(&agents);
    // Each node gets its own workload's certificate (its in-pod HBONE listener asks at
    // start), from the control plane's CA, over TLS.
    for (i, id) in [
        (0, "spiffe://cluster.local/ns/shop/sa/web"),
        (1, "spiffe://cluster.local/ns/backend/sa/echo"),
    ] {
        wait_for("the workload certificate", Duration::from_secs(10), || {
            agents[i]
                .get("/certs")
                .map(|t| t.contains(id))
                .unwrap_or(false)
        });
        let log = cp.log();
        assert!(
            log.contains(&format!("node=\"{}\" id={id}", c.node(i).name()))
                || log.contains(&format!("node={} id={id}", c.node(i).name())),
            "the control plane signed {id} for node {i}:\n{log}"
        );
    }

    // Wrong CA roots: node 1's agent restarted with a root its CA's certificate does not
    // chain to gets no certificate (the TLS handshake fails before its token is sent).
    let (_, _) = agents.pop().unwrap().stop();
    let foreign = c.node(1).dir.join("foreign-ca");
    let out = std::process::Command::new(agent_bin())
        .args(["ca", "init", "--dir"])
        .arg(&foreign)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let signed_before = cp.log().matches("certificate issued").count();
    let mut a1 = start(1, &foreign.join("root-cert.pem"));
    c.wait_mesh(std::slice::from_ref(&a1));
    wait_for(
        "a failed certificate request",
        Duration::from_secs(10),
        || {
            let m = a1.get("/metrics").unwrap_or_default();
            metric(&m, "mesh_workload_cert_failures_total", &[]) >= 1
        },
    );
    assert!(
        a1.log_text().contains("TLS handshake with the CA"),
        "{}",
        a1.log_text()
    );
    assert!(!a1
        .get("/certs")
        .unwrap()
        .contains("spiffe://cluster.local/ns/backend/sa/echo"));
    assert_eq!(
        cp.log().matches("certificate issued").count(),
        signed_before,
        "nothing was signed for it"
    );
    let _ = a1.stop();

    // The right root again: traffic crosses the nodes in the tunnel with the control
    // plane's certificates.
    agents.push(start(1, &root));
    c.wait_mesh(&agents);
    assert!(
        echo_ok(&c),
        "cross-node traffic with certificates from the control plane\n{}\n{}\n{}",
        agents[0].log_text(),
        agents[1].log_text(),
        cp.log()
    );
    // Node 1's credential crossed the underlay three times (its CA is on node 0), never
    // in clear.
    let wire = cap.finish();
    assert!(!wire.is_empty(), "the capture saw the underlay");
    assert!(
        !contains(&wire, token(1).as_bytes()),
        "node 1's CA token travelled in clear"
    );
}

#[test]
fn plaintext_to_the_ca_needs_an_explicit_opt_in() {
    mesh_tests::must_be_root();
    let c = pods();
    c.node(0).write_config(&c.file("")).unwrap();
    let tok = c.node(0).dir.join("ca-token");
    std::fs::write(&tok, token(0)).unwrap();
    let plain = format!("http://{}:15010", c.node(0).address);
    let tok = tok.display().to_string();
    let agent = |ca: &str| {
        c.node(0)
            .agent_command(&["--ca-address", ca, "--ca-token-file", &tok])
    };
    let err = refused(agent(&plain));
    assert!(err.contains("--ca-plaintext"), "{err}");
    // https without the root to check the CA against.
    let err = refused(agent(&plain.replace("http", "https")));
    assert!(err.contains("--ca-root-cert"), "{err}");
    // A control plane whose CA flags have nothing to serve on is refused too.
    let mut cp = command_in(&agent_bin(), &c.node(0).netns_path(), &c.node(0).cgroup);
    cp.args(["control-plane", "--config"])
        .arg(c.node(0).config_path())
        .arg("--ca-dir")
        .arg(c.ca_dir());
    let err = refused(cp);
    assert!(err.contains("--ca-listen"), "{err}");
}

/// Runs `cmd`, which must fail; its standard error.
fn refused(mut cmd: std::process::Command) -> String {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{err}");
    err
}
