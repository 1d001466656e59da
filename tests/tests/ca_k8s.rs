//! The embedded CA's Kubernetes callers end to end: a real agent (`--source kubernetes`,
//! on a simulated node) acting as the CA against the API server test double, which reviews
//! tokens from a table the test sets (TokenReview) and holds the pods of three nodes. The
//! caller is a small gRPC client of `IstioCertificateService` (HTTP/2 and the two protobuf
//! messages by hand: the tests crate does not depend on the agent's) in TLS to the CA's
//! `--ca-listen`, checking its certificate against the CA's root, with CSRs made by
//! `openssl req`.
//!
//! Node A runs the CA; the agent ServiceAccount is `mesh-system/mesh-agent`, learnt from
//! the API server (SelfSubjectReview of the CA agent's own kubeconfig token).

use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use mesh_tests::{
    kubeapi::{kubeconfig_yaml, service_account_user, KubeApi},
    SimNode,
};

const TD: &str = "cluster.local";
const AUD: &str = "istio-ca";
const AGENT_NS: &str = "mesh-system";
const AGENT_SA: &str = "mesh-agent";
/// gRPC status codes.
const OK: u32 = 0;
const PERMISSION_DENIED: u32 = 7;
const UNAVAILABLE: u32 = 14;
const UNAUTHENTICATED: u32 = 16;

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://{TD}/ns/{ns}/sa/{sa}")
}

/// A pod on `node`; returns its UID.
fn pod(api: &KubeApi, ns: &str, name: &str, sa: &str, node: &str) -> String {
    let manifest = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec: {{nodeName: {node}, serviceAccountName: {sa}, containers: [{{name: c, image: i}}]}}\n"
    );
    api.kubectl_stdin(&["apply", "-f", "-"], &manifest).unwrap();
    api.objects("pods")
        .into_iter()
        .find(|p| p["metadata"]["name"] == name && p["metadata"]["namespace"] == ns)
        .and_then(|p| p["metadata"]["uid"].as_str().map(str::to_owned))
        .expect("the pod's uid")
}

/// A P-256 CSR whose one SAN is `uri`.
fn csr(dir: &Path, uri: &str) -> String {
    let out = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-subj", "/O=mesh-test", "-addext"])
        .arg(format!("subjectAltName=URI:{uri}"))
        .arg("-keyout")
        .arg(dir.join("csr-key.pem"))
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The URI SANs of a PEM certificate, as openssl prints them.
fn uri_sans(pem: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(pem.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn read_varint(b: &[u8], i: &mut usize) -> u64 {
    let (mut v, mut shift) = (0u64, 0);
    while *i < b.len() {
        let byte = b[*i];
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    v
}

/// `IstioCertificateRequest { csr = 1, validity_duration = 3 }`.
fn request(csr: &str) -> Vec<u8> {
    let mut m = vec![0x0a];
    varint(csr.len() as u64, &mut m);
    m.extend_from_slice(csr.as_bytes());
    m.push(0x18);
    varint(3600, &mut m);
    m
}

/// `IstioCertificateResponse { repeated string cert_chain = 1 }`.
fn chain_of(msg: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < msg.len() {
        let key = read_varint(msg, &mut i);
        match key & 7 {
            0 => {
                read_varint(msg, &mut i);
            }
            2 => {
                let len = read_varint(msg, &mut i) as usize;
                let field = &msg[i..(i + len).min(msg.len())];
                if key >> 3 == 1 {
                    out.push(String::from_utf8_lossy(field).into_owned());
                }
                i += len;
            }
            _ => break,
        }
    }
    out
}

/// A TLS client configuration that trusts only the PEM root at `root` (ALPN h2).
fn tls_trusting(root: &Path) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::{pem::PemObject as _, CertificateDer};
    let mut store = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(root).unwrap() {
        store.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    std::sync::Arc::new(config)
}

/// One `CreateCertificate` call over TLS (the CA's `--ca-listen`): (gRPC status, message,
/// chain).
fn create_certificate(
    addr: SocketAddr,
    tls: &std::sync::Arc<rustls::ClientConfig>,
    token: Option<&str>,
    csr: &str,
) -> (u32, String, Vec<String>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tcp = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(
                rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
                tcp,
            )
            .await
            .expect("TLS to the CA, verified against its root");
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let msg = request(csr);
        let mut body = vec![0u8];
        body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        body.extend_from_slice(&msg);
        let mut req = http::Request::post(format!(
            "https://{addr}/istio.v1.auth.IstioCertificateService/CreateCertificate"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = send
            .send_request(req.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .unwrap();
        let headers = resp.headers().clone();
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let data = collected.to_bytes();
        let field = |k: &str| {
            trailers
                .get(k)
                .or_else(|| headers.get(k))
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let code = field("grpc-status").parse().unwrap_or(u32::MAX);
        let message = field("grpc-message").replace("%20", " ");
        let chain = if data.len() > 5 {
            chain_of(&data[5..])
        } else {
            Vec::new()
        };
        (code, message, chain)
    })
}

#[test]
fn the_ca_signs_for_kubernetes_callers_only_what_runs_on_their_node() {
    mesh_tests::must_be_root();
    let api = KubeApi::start().unwrap();
    for ns in [AGENT_NS, "shop"] {
        api.kubectl(&["create", "namespace", ns]).unwrap();
    }
    // The mesh agents of nodes B and C, and one workload on each.
    let agent_b = pod(&api, AGENT_NS, "mesh-agent-b", AGENT_SA, "node-b");
    let agent_c = pod(&api, AGENT_NS, "mesh-agent-c", AGENT_SA, "node-c");
    let web = pod(&api, "shop", "web", "web", "node-b");
    pod(&api, "shop", "db", "db", "node-c");
    // Node B's agent token as Kubernetes 1.30+ reviews it (node name in the extras);
    // node C's as older servers do (the pod only: the CA reads the pod's node).
    let tok_b = "token-of-the-agent-on-node-b";
    let tok_c = "token-of-the-agent-on-node-c";
    let tok_web = "token-of-the-web-workload";
    let tok_wrong_aud = "token-of-the-agent-for-the-api-server";
    let sa_user =
        |pod: (&str, &str), node| service_account_user(AGENT_NS, AGENT_SA, Some(pod), node);
    api.set_token(
        tok_b,
        sa_user(("mesh-agent-b", &agent_b), Some("node-b")),
        &[AUD],
    );
    api.set_token(tok_c, sa_user(("mesh-agent-c", &agent_c), None), &[AUD]);
    api.set_token(
        tok_web,
        service_account_user("shop", "web", Some(("web", &web)), Some("node-b")),
        &[AUD],
    );
    api.set_token(
        tok_wrong_aud,
        sa_user(("mesh-agent-b", &agent_b), Some("node-b")),
        &[mesh_tests::kubeapi::API_AUDIENCE],
    );
    // The CA agent (node A) talks to the API server with its own ServiceAccount token.
    let node = SimNode::new().unwrap();
    let own = "token-of-the-agent-on-node-a";
    api.set_token(
        own,
        service_account_user(AGENT_NS, AGENT_SA, None, None),
        &[],
    );
    let kubeconfig = node.dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        kubeconfig_yaml(&api.url()).replace("  user: {}", &format!("  user: {{token: {own}}}")),
    )
    .unwrap();
    node.write_config("exclude: []\n").unwrap();
    let kubepods = node.cgroup.join("kubepods.slice");
    std::fs::create_dir_all(&kubepods).unwrap();
    // The CA serves other agents in TLS only (`--ca-listen`), with a certificate its own
    // root signs for the address.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let ca_dir = node.dir.join("ca");
    let agent = node
        .start_agent(&[
            "--source",
            "kubernetes",
            "--node-name",
            "node-a",
            "--kubeconfig",
            &kubeconfig.display().to_string(),
            "--kubepods-cgroup",
            &kubepods.display().to_string(),
            "--ca-dir",
            &ca_dir.display().to_string(),
            "--ca-listen",
            &addr.to_string(),
        ])
        .unwrap();
    let tls = tls_trusting(&ca_dir.join("root-cert.pem"));
    let call =
        |token: Option<&str>, id: &str| create_certificate(addr, &tls, token, &csr(&node.dir, id));
    let log = || agent.log_text();

    // Node B's agent: web runs on node B, db does not.
    let (code, msg, chain) = call(Some(tok_b), &spiffe("shop", "web"));
    assert_eq!(code, OK, "{msg}\n{}", log());
    assert!(chain.len() >= 2, "leaf and root: {chain:?}");
    assert!(
        uri_sans(&chain[0]).contains(&spiffe("shop", "web")),
        "{}",
        chain[0]
    );
    let (code, msg, _) = call(Some(tok_b), &spiffe("shop", "db"));
    assert_eq!(code, PERMISSION_DENIED, "{msg}");
    assert!(msg.contains("node-b"), "{msg}");
    // Node C's agent, found through its pod: db yes, web no.
    let (code, msg, _) = call(Some(tok_c), &spiffe("shop", "db"));
    assert_eq!(code, OK, "{msg}\n{}", log());
    let (code, msg, _) = call(Some(tok_c), &spiffe("shop", "web"));
    assert_eq!(code, PERMISSION_DENIED, "{msg}");
    // An unknown token, no token, a workload's token, a token for another audience.
    let (code, msg, _) = call(
        Some("a-token-nobody-issued-0123456789"),
        &spiffe("shop", "web"),
    );
    assert_eq!(code, UNAUTHENTICATED, "{msg}");
    assert!(msg.contains("does not accept the token"), "{msg}");
    let (code, _, _) = call(None, &spiffe("shop", "web"));
    assert_eq!(code, UNAUTHENTICATED);
    let (code, msg, _) = call(Some(tok_web), &spiffe("shop", "web"));
    assert_eq!(code, UNAUTHENTICATED, "{msg}");
    assert!(msg.contains("is not the mesh agent's"), "{msg}");
    let (code, msg, _) = call(Some(tok_wrong_aud), &spiffe("shop", "web"));
    assert_eq!(code, UNAUTHENTICATED, "{msg}");

    // The API server failing: UNAVAILABLE, not a refusal (a token not reviewed yet). A
    // 500, which the kube client does not retry by itself (503s it does, with back-off,
    // bounded by the CA's API_TIMEOUT of 5 s).
    let tok_b2 = "second-token-of-the-agent-on-node-b";
    api.set_token(
        tok_b2,
        sa_user(("mesh-agent-b", &agent_b), Some("node-b")),
        &[AUD],
    );
    api.fail_next(1, 500);
    let (code, msg, _) = call(Some(tok_b2), &spiffe("shop", "web"));
    assert_eq!(code, UNAVAILABLE, "{msg}");
    assert!(msg.contains("TokenReview"), "{msg}");
    api.fail_next(0, 503);
    let (code, msg, _) = call(Some(tok_b2), &spiffe("shop", "web"));
    assert_eq!(code, OK, "{msg}");

    // The web pod leaves node B: within the listing cache's 2 s, web is refused there.
    api.kubectl(&["delete", "pod", "web", "-n", "shop"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let (code, msg, _) = call(Some(tok_b), &spiffe("shop", "web"));
    assert_eq!(code, PERMISSION_DENIED, "{msg}");
    // The agent learnt its ServiceAccount from the API server, and reviewed with the
    // CA's audience.
    let requests = api.requests();
    assert!(
        requests.iter().any(|r| r.contains("selfsubjectreviews")),
        "{requests:?}"
    );
    assert!(
        requests.iter().any(
            |r| r.starts_with("GET /api/v1/pods?") && r.contains("fieldSelector=spec.nodeName")
        ),
        "{requests:?}"
    );
}
