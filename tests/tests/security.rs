//! Who can reach the agent's control plane (issue 10, item 1): the agent's own proxy over
//! a Unix socket only root can open; other clients over TCP, on loopback or with a bearer
//! token. A pod, enrolled or not, never gets the mesh's configuration.

use std::{os::unix::fs::PermissionsExt, process::Stdio};

use mesh_tests::{agent_bin, SimNode};

fn node() -> SimNode {
    let mut n = SimNode::new().expect("sim node");
    n.add_pod("client", 2).unwrap();
    let c = n.pod("client");
    let yaml = format!(
        "namespaces:\n  - name: shop\n    labels: {{ mesh-agent.io/dataplane-mode: ambient }}\n\
         workloads:\n  - {{ name: client, namespace: shop, ip: {}, netns: {} }}\n\
         services:\n  - name: web\n    namespace: shop\n    vip: 10.96.{}.10\n    \
         ports: [ {{ port: 80, protocol: http }} ]\n    endpoints: [ {{ ip: {}, port: 8080 }} ]\n",
        c.ip,
        c.netns_path(),
        n.index,
        c.ip
    );
    n.write_config(&yaml).unwrap();
    n
}

/// `mesh-agent xds-watch` for `ms` milliseconds, in `pod` (or on the node): the JSON
/// verdict lines it printed.
fn xds_watch(n: &SimNode, pod: Option<&str>, address: &str, extra: &[&str], ms: u64) -> String {
    let mut cmd = match pod {
        Some(p) => n.pod_command(p, &agent_bin()),
        None => std::process::Command::new(agent_bin()),
    };
    let out = cmd
        .args(["xds-watch", "--xds-address", address, "--mode", "delta"])
        .args(["--duration-ms", &ms.to_string()])
        .args(extra)
        .stderr(Stdio::null())
        .output()
        .expect("xds-watch");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn rejected(agent: &mesh_tests::Agent) -> u64 {
    let dump: serde_json::Value =
        serde_json::from_str(&agent.get("/config_dump").unwrap()).unwrap();
    dump["embedded_control_plane"]["rejected"].as_u64().unwrap()
}

#[test]
fn the_proxy_uses_a_root_only_unix_socket() {
    let n = node();
    let socket = n.dir.join("xds").join("ads.sock");
    let agent = n
        .start_agent(&["--xds-socket", socket.to_str().unwrap()])
        .unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&socket), 0o600);
    assert_eq!(mode(socket.parent().unwrap()), 0o700);
    // The proxy's stream is up (the agent is ready only then) and goes over the socket.
    let cfg: serde_json::Value = serde_json::from_str(&agent.get("/config").unwrap()).unwrap();
    assert_eq!(cfg["xds_socket"], socket.to_str().unwrap(), "{cfg}");
    // Root on the node may use it too (the inspection tools).
    let v = xds_watch(&n, None, &format!("unix:{}", socket.display()), &[], 1500);
    assert!(v.contains("\"accepted\":true"), "{v}");
    drop(agent);
}

#[test]
fn tokenless_ads_must_stay_on_loopback() {
    let n = node();
    let open = format!("{}:{}", n.gateway, n.xds_port());
    let out = n.agent_command(&["--xds-listen", &open]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("would serve the mesh's configuration to anyone") && err.contains(&open),
        "{err}"
    );
    assert!(!n.pin_path.exists(), "nothing may be left: {err}");
    let out = std::process::Command::new(agent_bin())
        .args(["control-plane", "--config"])
        .arg(n.config_path())
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--xds-token-file"), "{err}");
}

#[test]
fn a_pod_cannot_read_the_mesh_configuration() {
    let n = node();
    let token = n.dir.join("xds-token");
    std::fs::write(&token, "s3cr3t-token-of-the-test-node\n").unwrap();
    // The control plane on the node's address, where pods can reach it, with a token.
    let listen = format!("{}:{}", n.gateway, n.xds_port());
    let agent = n
        .start_agent(&[
            "--xds-listen",
            &listen,
            "--xds-token-file",
            token.to_str().unwrap(),
        ])
        .unwrap();
    let url = format!("http://{listen}");
    // From the enrolled pod, without the token: nothing, and the refusal is counted.
    let v = xds_watch(&n, Some("client"), &url, &[], 1500);
    assert!(v.trim().is_empty(), "a pod read the configuration: {v}");
    assert!(rejected(&agent) >= 1);
    // With a wrong token: nothing either.
    let wrong = n.dir.join("wrong-token");
    std::fs::write(&wrong, "not-the-token-at-all-0000").unwrap();
    let before = rejected(&agent);
    let v = xds_watch(
        &n,
        Some("client"),
        &url,
        &["--xds-token-file", wrong.to_str().unwrap()],
        1500,
    );
    assert!(v.trim().is_empty(), "{v}");
    assert!(rejected(&agent) > before);
    // "This host" from the pod is the pod itself: the admin endpoint and a loopback ADS
    // are not there.
    let r = n
        .client(
            "client",
            &[
                "echo-client",
                "--to",
                &format!("0.0.0.0:{}", n.admin_port),
                "--bytes",
                "16",
            ],
        )
        .unwrap();
    assert_eq!(
        r["errors"],
        serde_json::json!(["connect: ECONNREFUSED"]),
        "{r}"
    );
    // A client holding the token is served.
    let v = xds_watch(
        &n,
        None,
        &url,
        &["--xds-token-file", token.to_str().unwrap()],
        1500,
    );
    assert!(v.contains("\"accepted\":true"), "{v}");
    // A short token is refused at start.
    std::fs::write(&token, "short").unwrap();
    let out = n
        .agent_command(&["--xds-token-file", token.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("use at least 16"), "{err}");
}
