//! The tunnel end to end on loopback: real TLS with a test CA, real sockets.

use std::{
    collections::hash_map::DefaultHasher,
    hash::Hasher,
    io,
    net::SocketAddr,
    os::fd::AsFd,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsConnector;

use super::*;
use crate::{
    identity::{
        tls::{server_name, testing::*, MeshTls},
        BoxFuture, Certificates,
    },
    lifecycle::drain::{self, DrainTrigger},
};

struct TestHandler {
    refuse_port: u16,
    seen: Mutex<Vec<(PeerInfo, SocketAddr)>>,
}

impl ConnectHandler for TestHandler {
    fn open(
        &self,
        peer: PeerInfo,
        authority: SocketAddr,
    ) -> BoxFuture<'static, Result<TcpStream, Refusal>> {
        self.seen.lock().unwrap().push((peer, authority));
        let refuse = authority.port() == self.refuse_port;
        Box::pin(async move {
            if refuse {
                return Err(Refusal::new(http::StatusCode::FORBIDDEN, "policy says no"));
            }
            TcpStream::connect(authority)
                .await
                .map_err(|e| Refusal::new(http::StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
        })
    }
}

struct Env {
    ca: TestCa,
    certs: Arc<TestCerts>,
    tls: Arc<MeshTls>,
    server: SocketAddr,
    client: Arc<HboneClient>,
    handler: Arc<TestHandler>,
    _drain: DrainTrigger,
}

async fn env_with(opts: ClientOptions) -> Env {
    let ca = TestCa::new("a");
    let certs = TestCerts::new(vec![ca.root.clone()]);
    certs.put(ca.leaf(&id("client")));
    certs.put(ca.leaf(&id("other-client")));
    certs.put(ca.leaf(&id("server")));
    let tls = MeshTls::new(certs.clone());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = l.local_addr().unwrap();
    let handler = Arc::new(TestHandler {
        refuse_port: 9,
        seen: Mutex::new(Vec::new()),
    });
    let (trigger, watch) = drain::new();
    tokio::spawn(serve(
        l,
        tls.server_config(&id("server")).unwrap(),
        handler.clone(),
        watch,
    ));
    let client = HboneClient::new(tls.clone(), opts);
    Env {
        ca,
        certs,
        tls,
        server,
        client,
        handler,
        _drain: trigger,
    }
}

async fn env() -> Env {
    env_with(ClientOptions::default()).await
}

impl Env {
    async fn connect(&self, authority: SocketAddr) -> Result<HboneStream, HboneError> {
        self.client
            .connect(&id("client"), self.server, &id("server"), authority)
            .await
    }
}

/// A TCP server running `f` on each accepted connection.
async fn upstream<F, Fut>(f: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(f(s));
        }
    });
    addr
}

async fn echo() -> SocketAddr {
    upstream(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// Deterministic pseudo-random bytes (xorshift).
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

/// Writes `out` (then a half-close) while reading everything back; the bytes read.
async fn exchange(stream: HboneStream, out: Vec<u8>) -> io::Result<Vec<u8>> {
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = async move {
        for chunk in out.chunks(100 * 1024) {
            w.write_all(chunk).await?;
        }
        w.shutdown().await?;
        Ok::<_, io::Error>(w)
    };
    let reader = async {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await?;
        Ok::<_, io::Error>(got)
    };
    let (w, got) = tokio::try_join!(writer, reader)?;
    drop(r.unsplit(w));
    Ok(got)
}

const MIB16: usize = 16 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_each_way_arrive_intact() {
    let e = env().await;
    let stream = e.connect(echo().await).await.unwrap();
    let out = data(MIB16, 7);
    let start = Instant::now();
    let got = exchange(stream, out.clone()).await.unwrap();
    let took = start.elapsed();
    assert_eq!(got.len(), MIB16);
    assert_eq!(hash(&got), hash(&out));
    eprintln!(
        "16 MiB each way in {took:?} ({:.0} MiB/s each way)",
        16.0 / took.as_secs_f64()
    );
    let (peer, _) = e.handler.seen.lock().unwrap()[0].clone();
    assert_eq!(peer.identity, id("client"));
}

/// An IPv6 destination (a dual-stack pod's IPv6 address) through a tunnel to its node:
/// the CONNECT names `[v6]:port` and the IPv6 source, the bytes arrive, and an IPv4 and
/// an IPv6 stream of one source identity to one destination share the pooled connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_authority_and_source_cross_the_tunnel() {
    let l = match TcpListener::bind("[::1]:0").await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("skipped: no IPv6 loopback here ({e})");
            return;
        }
    };
    let dst6 = l.local_addr().unwrap();
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
    let e = env().await;
    let source: std::net::IpAddr = "fd00:210:1::2".parse().unwrap();
    let stream = e
        .client
        .connect_from_ip(&id("client"), source, e.server, &id("server"), dst6)
        .await
        .unwrap();
    let out = data(1 << 20, 11);
    let got = exchange(stream, out.clone()).await.unwrap();
    assert_eq!(hash(&got), hash(&out));
    let (peer, authority) = e.handler.seen.lock().unwrap()[0].clone();
    assert_eq!(authority, dst6);
    assert!(authority.to_string().starts_with("[::1]:"), "{authority}");
    assert_eq!(peer.forwarded_for, Some(source));
    assert_eq!(peer.identity, id("client"));
    // The same source identity to the same node over IPv4: the pooled connection.
    let stream = e.connect(echo().await).await.unwrap();
    let got = exchange(stream, b"v4".to_vec()).await.unwrap();
    assert_eq!(got, b"v4");
    assert_eq!(e.client.connections(), 1);
}

#[test]
fn the_futures_the_integrator_spawns_are_send() {
    fn send<T: Send>(_: &T) {}
    fn check(c: &HboneClient, tcp: TcpStream, t: HboneStream, f: &crate::metrics::FlowCounters) {
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        send(&c.connect(&id("a"), a, &id("b"), b));
        send(&relay_tunnel(tcp, t, f, TcpSide::Source));
    }
    let _ = check;
}

#[tokio::test]
async fn a_half_close_is_passed_on_and_the_answer_still_arrives() {
    let e = env().await;
    let up = upstream(|mut s| async move {
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap(); // the client's FIN arrived as EOF
        assert_eq!(got, b"request");
        s.write_all(b"answer after the half-close").await.unwrap();
    })
    .await;
    let stream = e.connect(up).await.unwrap();
    let got = exchange(stream, b"request".to_vec()).await.unwrap();
    assert_eq!(got, b"answer after the half-close");
}

#[tokio::test]
async fn the_client_refuses_a_server_with_another_identity() {
    let e = env().await;
    let err = e
        .client
        .connect(&id("client"), e.server, &id("db"), echo().await)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, HboneError::Tls { .. }), "{msg}");
    assert!(
        msg.contains("expected spiffe://cluster.local/ns/default/sa/db"),
        "{msg}"
    );
    assert!(e.handler.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn the_server_refuses_clients_it_cannot_verify() {
    let e = env().await;
    // From a foreign root.
    e.certs.put(TestCa::new("b").leaf(&id("client")));
    assert!(e.connect(echo().await).await.is_err());
    // Expired.
    e.certs
        .put(e.ca.leaf_with(&id("client"), &[&id("client").to_string()], true));
    assert!(e.connect(echo().await).await.is_err());
    assert!(e.handler.seen.lock().unwrap().is_empty());
    // And a valid one again.
    e.certs.put(e.ca.leaf(&id("client")));
    e.connect(echo().await).await.unwrap();
}

#[tokio::test]
async fn a_refusal_reaches_the_client_with_its_status() {
    let e = env().await;
    let err = e.connect("127.0.0.1:9".parse().unwrap()).await.unwrap_err();
    assert_eq!(err.status(), Some(http::StatusCode::FORBIDDEN));
    assert!(err.to_string().contains("403"), "{err}");
    let io: io::Error = err.into();
    assert_eq!(io.kind(), io::ErrorKind::PermissionDenied);
    // The refused stream did not spoil the connection.
    e.connect(echo().await).await.unwrap();
    assert_eq!(e.client.connections(), 1);
}

#[tokio::test]
async fn concurrent_streams_share_one_connection() {
    let e = env().await;
    let echo = echo().await;
    let mut tasks = Vec::new();
    let first = e.connect(echo).await.unwrap();
    for i in 0..20u64 {
        let stream = e.connect(echo).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let out = data(256 * 1024, i + 1);
            let got = exchange(stream, out.clone()).await.unwrap();
            assert_eq!(hash(&got), hash(&out));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    drop(first);
    let seen = e.handler.seen.lock().unwrap();
    assert_eq!(seen.len(), 21);
    let peers: std::collections::HashSet<SocketAddr> = seen.iter().map(|(p, _)| p.addr).collect();
    assert_eq!(peers.len(), 1, "one TCP connection carried every stream");
    assert_eq!(e.client.connections(), 1);
}

#[tokio::test]
async fn beyond_the_stream_limit_a_second_connection_opens() {
    let e = env().await;
    let echo = echo().await;
    let mut held = Vec::new();
    for _ in 0..=pool::MAX_STREAMS_PER_CONNECTION {
        held.push(e.connect(echo).await.unwrap());
    }
    assert_eq!(e.client.connections(), 2);
    let peers: std::collections::HashSet<SocketAddr> = e
        .handler
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|(p, _)| p.addr)
        .collect();
    assert_eq!(peers.len(), 2);
    // Every stream works, on either connection.
    let last = held.pop().unwrap();
    assert_eq!(exchange(last, b"101".to_vec()).await.unwrap(), b"101");
    let first = held.swap_remove(0);
    assert_eq!(exchange(first, b"1".to_vec()).await.unwrap(), b"1");
}

#[tokio::test]
async fn the_pool_is_bounded_and_evicts_idle_connections() {
    let e = env_with(ClientOptions {
        max_connections: 1,
        ..ClientOptions::default()
    })
    .await;
    let echo = echo().await;
    let held = e.connect(echo).await.unwrap();
    // Another key (another source identity) needs another connection: none free.
    let err = e
        .client
        .connect(&id("other-client"), e.server, &id("server"), echo)
        .await
        .unwrap_err();
    assert!(matches!(err, HboneError::PoolFull(1)), "{err}");
    // Once the first connection is idle it makes room.
    drop(held);
    e.client
        .connect(&id("other-client"), e.server, &id("server"), echo)
        .await
        .unwrap();
    assert_eq!(e.client.connections(), 1);
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let e = env_with(ClientOptions {
        idle_timeout: Duration::from_millis(200),
        ..ClientOptions::default()
    })
    .await;
    let s = e.connect(echo().await).await.unwrap();
    exchange(s, b"x".to_vec()).await.unwrap();
    assert_eq!(e.client.connections(), 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(e.client.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_rotated_mid_transfer_leaves_the_transfer_intact() {
    let e = env().await;
    let stream = e.connect(echo().await).await.unwrap();
    let out = data(MIB16, 3);
    let old = e.certs.current(&id("server")).unwrap().serial.clone();
    let (mut r, mut w) = tokio::io::split(stream);
    let certs = e.certs.clone();
    let (server_leaf, client_leaf) = (e.ca.leaf(&id("server")), e.ca.leaf(&id("client")));
    let sent = out.clone();
    let writer = tokio::spawn(async move {
        let (first, second) = sent.split_at(MIB16 / 2);
        w.write_all(first).await.unwrap();
        // Both ends' certificates rotate with half of the bytes on their way.
        certs.put(client_leaf);
        let new = certs.put(server_leaf).serial.clone();
        w.write_all(second).await.unwrap();
        w.shutdown().await.unwrap();
        (w, new)
    });
    let mut got = Vec::new();
    r.read_to_end(&mut got).await.unwrap();
    let (w, new) = writer.await.unwrap();
    drop(r.unsplit(w));
    assert_eq!(got.len(), MIB16);
    assert_eq!(hash(&got), hash(&out));
    assert_ne!(old, new);
    // A new connection's handshake sees the new certificate.
    let tcp = TcpStream::connect(e.server).await.unwrap();
    let tls = TlsConnector::from(e.tls.client_config(&id("client"), &id("server")).unwrap())
        .connect(server_name(), tcp)
        .await
        .unwrap();
    let leaf = &tls.get_ref().1.peer_certificates().unwrap()[0];
    assert_eq!(serial_of(leaf.as_ref()), new);
}

#[tokio::test]
async fn an_upstream_reset_reaches_the_client_as_an_error() {
    let e = env().await;
    let up = upstream(|s| async move {
        let mut s = s;
        s.write_all(&[1u8; 65536]).await.unwrap();
        crate::sys::set_linger_zero(s.as_fd()).unwrap();
        drop(s); // RST
    })
    .await;
    let mut stream = e.connect(up).await.unwrap();
    let mut got = Vec::new();
    let err = stream.read_to_end(&mut got).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
}

#[tokio::test]
async fn a_client_reset_reaches_the_upstream_as_a_reset() {
    let e = env().await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = Mutex::new(Some(tx));
    let up = upstream(move |mut s| {
        let tx = tx.lock().unwrap().take();
        async move {
            let mut buf = vec![0u8; 65536];
            let r = loop {
                match s.read(&mut buf).await {
                    Ok(0) => break Ok(()),
                    Ok(_) => continue,
                    Err(e) => break Err(e.kind()),
                }
            };
            let _ = tx.unwrap().send(r);
        }
    })
    .await;
    // The app's side: a TCP connection relayed into the tunnel.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut app = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (near, _) = l.accept().await.unwrap();
    let tunnel = e.connect(up).await.unwrap();
    let counters = Arc::new(crate::metrics::FlowCounters::default());
    let c = counters.clone();
    let relay = tokio::spawn(async move { relay_tunnel(near, tunnel, &c, TcpSide::Source).await });
    app.write_all(&[2u8; 100_000]).await.unwrap();
    crate::sys::set_linger_zero(app.as_fd()).unwrap();
    drop(app); // RST from the app
    assert!(relay.await.unwrap().is_err());
    let seen = tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen, Err(io::ErrorKind::ConnectionReset));
}

#[tokio::test]
async fn dropping_a_stream_before_its_end_resets_the_upstream() {
    let e = env().await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = Mutex::new(Some(tx));
    let up = upstream(move |mut s| {
        let tx = tx.lock().unwrap().take();
        async move {
            // Either the write or the read after it meets the reset.
            let w = s.write_all(&[3u8; 4 << 20]).await.map_err(|e| e.kind());
            let mut b = [0u8; 16];
            let r = s.read(&mut b).await.map_err(|e| e.kind());
            let _ = tx.unwrap().send((w, r));
        }
    })
    .await;
    let stream = e.connect(up).await.unwrap();
    let (mut r, w) = tokio::io::split(stream);
    let mut some = [0u8; 1024];
    r.read_exact(&mut some).await.unwrap();
    drop(r.unsplit(w)); // neither END_STREAM sent nor every byte read
    let (w, r) = tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .unwrap()
        .unwrap();
    assert!(
        w == Err(io::ErrorKind::ConnectionReset) || r == Err(io::ErrorKind::ConnectionReset),
        "write {w:?}, read {r:?}"
    );
    // The connection itself is fine: the next stream on it works.
    let s = e.connect(echo().await).await.unwrap();
    assert_eq!(exchange(s, b"ok".to_vec()).await.unwrap(), b"ok");
    assert_eq!(e.client.connections(), 1);
}

/// A raw HTTP/2 client on a verified connection, for requests `HboneClient` never sends.
async fn raw_h2(e: &Env) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = TcpStream::connect(e.server).await.unwrap();
    let tls = TlsConnector::from(e.tls.client_config(&id("client"), &id("server")).unwrap())
        .connect(server_name(), tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    send
}

#[tokio::test]
async fn only_connect_to_an_ip_and_port_is_served() {
    let e = env().await;
    let mut send = raw_h2(&e).await.ready().await.unwrap();
    let get = http::Request::builder()
        .uri("https://example.com/")
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(get, true).unwrap();
    assert_eq!(
        resp.await.unwrap().status(),
        http::StatusCode::METHOD_NOT_ALLOWED
    );
    let mut send = send.ready().await.unwrap();
    let by_name = super::client::connect_request("example.com:80", None);
    let (resp, _) = send.send_request(by_name, false).unwrap();
    assert_eq!(resp.await.unwrap().status(), http::StatusCode::BAD_REQUEST);
    assert!(e.handler.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn the_drain_stops_new_streams_and_lets_open_ones_finish() {
    let ca = TestCa::new("a");
    let certs = TestCerts::new(vec![ca.root.clone()]);
    certs.put(ca.leaf(&id("client")));
    certs.put(ca.leaf(&id("server")));
    let tls = MeshTls::new(certs.clone());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = l.local_addr().unwrap();
    let handler = Arc::new(TestHandler {
        refuse_port: 9,
        seen: Mutex::new(Vec::new()),
    });
    let (trigger, watch) = drain::new();
    let served = tokio::spawn(serve(
        l,
        tls.server_config(&id("server")).unwrap(),
        handler,
        watch,
    ));
    let client = HboneClient::new(tls, ClientOptions::default());
    let echo = echo().await;
    let open = client
        .connect(&id("client"), server, &id("server"), echo)
        .await
        .unwrap();
    trigger.start();
    served.await.unwrap();
    assert_eq!(
        exchange(open, b"still here".to_vec()).await.unwrap(),
        b"still here"
    );
    assert_eq!(trigger.wait(Duration::from_secs(5)).await, 0);
}

/// The sending side names the source in `Forwarded: for=` (ztunnel's header); the server
/// hands the claim to the handler per stream, unverified, and nothing when absent.
#[tokio::test]
async fn the_source_address_travels_in_forwarded_per_stream() {
    let e = env().await;
    let up = echo().await;
    let from: SocketAddr = "10.1.2.3:40000".parse().unwrap();
    let s = e
        .client
        .connect_from(&id("client"), Some(from), e.server, &id("server"), up)
        .await
        .unwrap();
    let plain = e.connect(up).await.unwrap();
    let v6: SocketAddr = "[fd00::7]:1".parse().unwrap();
    let s6 = e
        .client
        .connect_from(&id("client"), Some(v6), e.server, &id("server"), up)
        .await
        .unwrap();
    let seen: Vec<Option<std::net::IpAddr>> = e
        .handler
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|(p, _)| p.forwarded_for)
        .collect();
    assert_eq!(
        seen,
        vec![Some(from.ip()), None, Some(v6.ip())],
        "streams on one pooled connection carry their own source"
    );
    drop((s, plain, s6));
}

#[test]
fn forwarded_for_is_read_as_rfc_7239_writes_it() {
    let parse = |v: &str| {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::FORWARDED, v.parse().unwrap());
        parse_forwarded_for(&h)
    };
    let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().unwrap());
    assert_eq!(parse(r#"for="10.0.0.1:4000""#), ip("10.0.0.1"));
    assert_eq!(parse("for=10.0.0.1"), ip("10.0.0.1"));
    assert_eq!(parse(r#"For="[fd00::1]:80";proto=http"#), ip("fd00::1"));
    assert_eq!(parse(r#"proto=http; for="[fd00::1]""#), ip("fd00::1"));
    // The first element is the original client.
    assert_eq!(parse("for=10.0.0.1, for=10.0.0.2"), ip("10.0.0.1"));
    for junk in [
        "for=_hidden",
        "for=unknown",
        "by=10.0.0.1",
        "for=",
        "for=\"10.0.0.1",
        "for=300.1.1.1",
    ] {
        assert_eq!(parse(junk), None, "{junk}");
    }
    assert_eq!(parse_forwarded_for(&http::HeaderMap::new()), None);
    assert_eq!(
        super::client::forwarded_for("10.0.0.1:4000".parse().unwrap()),
        r#"for="10.0.0.1:4000""#
    );
}

/// The relay at both ends: a TCP client relayed into a stream (`TcpSide::Source`, the
/// outbound side) whose server relays into an echo. On this one-thread runtime the server
/// drives its streams from the connection's task.
#[tokio::test]
async fn a_relayed_tcp_client_gets_sixteen_mib_back_intact_on_one_thread() {
    assert_eq!(tokio::runtime::Handle::current().metrics().num_workers(), 1);
    let e = env().await;
    let stream = e.connect(echo().await).await.unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut app = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (near, _) = l.accept().await.unwrap();
    let counters = Arc::new(crate::metrics::FlowCounters::default());
    let c = counters.clone();
    let relay =
        tokio::spawn(
            async move { relay_tunnel_counted(near, stream, &c, TcpSide::Source, None).await },
        );
    let out = data(MIB16, 11);
    let (mut r, mut w) = app.split();
    let writer = async {
        // Uneven chunks: frames of every size, small ones among them.
        let mut rest = &out[..];
        let mut n = 1;
        while !rest.is_empty() {
            let k = n.min(rest.len());
            w.write_all(&rest[..k]).await?;
            rest = &rest[k..];
            n = (n * 7 + 13) % 200_000 + 1;
        }
        w.shutdown().await
    };
    let reader = async {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await?;
        Ok::<_, io::Error>(got)
    };
    let ((), got) = tokio::try_join!(writer, reader).unwrap();
    assert_eq!(got.len(), MIB16);
    assert_eq!(hash(&got), hash(&out));
    let end = relay.await.unwrap();
    end.result.unwrap();
    assert_eq!(
        (end.from_tcp, end.from_tunnel),
        (MIB16 as u64, MIB16 as u64)
    );
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(counters.received.load(Relaxed), MIB16 as u64);
    assert_eq!(counters.sent.load(Relaxed), MIB16 as u64);
}

/// A reader that stops reading holds the sender back (flow control through the relays)
/// instead of letting the relays queue without bound; once it reads again every byte
/// arrives.
#[tokio::test]
async fn a_stalled_reader_holds_the_sender_back_and_then_gets_everything() {
    let out = data(96 * 1024 * 1024, 3);
    let e = env().await;
    // The upstream reads nothing until told to, then everything.
    let go = Arc::new(tokio::sync::Notify::new());
    let (tx, rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    let tx = Arc::new(Mutex::new(Some(tx)));
    let upstream_addr = {
        let go = go.clone();
        upstream(move |mut s| {
            let (tx, go) = (tx.lock().unwrap().take(), go.clone());
            async move {
                go.notified().await;
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got).await;
                let _ = s.shutdown().await;
                if let Some(tx) = tx {
                    let _ = tx.send(got);
                }
            }
        })
        .await
    };
    let stream = e.connect(upstream_addr).await.unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut app = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (near, _) = l.accept().await.unwrap();
    let counters = Arc::new(crate::metrics::FlowCounters::default());
    let c = counters.clone();
    let relay = tokio::spawn(async move { relay_tunnel(near, stream, &c, TcpSide::Source).await });
    let sent = {
        let out = out.clone();
        tokio::spawn(async move {
            app.write_all(&out).await.unwrap();
            app.shutdown().await.unwrap();
            let mut rest = Vec::new();
            app.read_to_end(&mut rest).await.unwrap();
        })
    };
    // While the upstream stalls, the bytes in flight stop growing once the windows and
    // the sockets' buffers are full (the kernel's may hold tens of MiB): the sender is
    // held back, short of what the app wants to send.
    use std::sync::atomic::Ordering::Relaxed;
    let mut held = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = counters.received.load(Relaxed);
        if now == held && now > 0 {
            break;
        }
        held = now;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        counters.received.load(Relaxed),
        held,
        "bytes kept going into the tunnel while nobody read"
    );
    assert!(
        held < out.len() as u64,
        "{held} bytes went in while nobody read"
    );
    go.notify_one();
    sent.await.unwrap();
    relay.await.unwrap().unwrap();
    let got = tokio::time::timeout(Duration::from_secs(60), rx)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), out.len());
    assert_eq!(hash(&got), hash(&out));
}

/// One HBONE listener served by every proxy worker (`WorkerSet::serve_everywhere` and
/// `serve_shared`, as the in-pod listeners are): while one worker is stuck, the other
/// accepts, completes the handshakes and relays new tunnels on its own, and the next
/// connections go to whichever worker is free. Each tunnel is a new client (a pool of its
/// own: a new connection).
#[test]
fn every_worker_serves_tunnels_of_a_shared_listener() {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    let workers = crate::proxy::workers::Workers::start(2).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ca = TestCa::new("a");
    let certs = TestCerts::new(vec![ca.root.clone()]);
    certs.put(ca.leaf(&id("client")));
    certs.put(ca.leaf(&id("server")));
    let tls = MeshTls::new(certs.clone());
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = l.local_addr().unwrap();
    let handler: Arc<dyn ConnectHandler> = Arc::new(TestHandler {
        refuse_port: 9,
        seen: Mutex::new(Vec::new()),
    });
    let (trigger, watch) = drain::new();
    let opts = ServerOptions::default();
    let slots = connection_slots(&opts);
    let accepted: Arc<[AtomicU64; 2]> = Arc::default();
    let config = tls.server_config(&id("server")).unwrap();
    let tasks = {
        let accepted = accepted.clone();
        workers
            .set()
            .serve_everywhere(l, move |worker, l| {
                let accepted = accepted.clone();
                serve_shared(
                    l,
                    config.clone(),
                    handler.clone(),
                    watch.clone(),
                    opts,
                    slots.clone(),
                    move || {
                        accepted[worker].fetch_add(1, Relaxed);
                    },
                )
            })
            .unwrap()
    };
    let up = rt.block_on(echo());
    for (round, busy) in [0usize, 1, 0, 1].into_iter().enumerate() {
        let before: Vec<u64> = accepted.iter().map(|a| a.load(Relaxed)).collect();
        workers
            .handle(busy)
            .spawn(async { std::thread::sleep(Duration::from_millis(1500)) });
        std::thread::sleep(Duration::from_millis(50));
        let sent = data(64 << 10, round as u64 + 1);
        let back = rt.block_on(async {
            let client = HboneClient::new(tls.clone(), ClientOptions::default());
            let mut s = client
                .connect(&id("client"), server, &id("server"), up)
                .await
                .unwrap();
            s.write_all(&sent).await.unwrap();
            s.shutdown().await.unwrap();
            let mut back = Vec::new();
            s.read_to_end(&mut back).await.unwrap();
            back
        });
        assert!(back == sent, "round {round}: the echo differs");
        let other = 1 - busy;
        let now: Vec<u64> = accepted.iter().map(|a| a.load(Relaxed)).collect();
        assert_eq!(now[other], before[other] + 1, "round {round}: {now:?}");
        assert_eq!(now[busy], before[busy], "round {round}: {now:?}");
        // Until the stuck worker is free again.
        std::thread::sleep(Duration::from_millis(1500));
    }
    drop(trigger);
    for t in tasks {
        t.abort();
    }
    workers.shutdown();
}
