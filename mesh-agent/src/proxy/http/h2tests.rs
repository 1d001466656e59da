//! HTTP/2 streams cut short, on both downstream servers (the own, `h2server`, and hyper's,
//! `--l7-h2-server hyper`): a client's `RST_STREAM` before the response's end fails the
//! upstream request whatever its code (`NO_ERROR` included: RFC 9113 section 8.1 allows it
//! only after a complete response), so an upstream never sees a request body end cleanly
//! short of its bytes; an upstream that resets its stream (`NO_ERROR` included) or closes
//! its connection mid-response resets the client's stream (never with `NO_ERROR`); a
//! trailers-only gRPC answer and a client's `NO_ERROR` stop after a complete response
//! stay clean.
//!
//! The client is the `h2` crate's (its frames and reset codes are its own); HTTP/2
//! upstreams are the `h2` crate's too (a reset's code is visible there, where hyper ends a
//! body cleanly on `NO_ERROR`), HTTP/1.1 upstreams raw sockets (the chunked body's last
//! chunk, or the connection's end, is what they see).

use std::{future::Future, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, Notify},
};

use http::HeaderMap;

use super::*;
use crate::proxy::config::{
    CircuitBreaker, Endpoint, HeaderMutation, Health, LbPolicy, PathMatch, RouteConfig, RouteMatch,
    WeightedCluster,
};

const VIP: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)), 80);

const SERVERS: [H2Server; 2] = [H2Server::Own, H2Server::Hyper];

/// A proxy on `server` forwarding everything to `up` over `protocol`.
async fn proxy(server: H2Server, up: SocketAddr, protocol: UpstreamProtocol) -> ProxyUnderTest {
    let cluster = Cluster {
        name: "c".into(),
        lb: LbPolicy::RoundRobin,
        protocol,
        connect_timeout: Duration::from_secs(1),
        circuit_breaker: CircuitBreaker::default(),
        outlier: None,
        endpoints: vec![Endpoint {
            address: up,
            weight: 1,
            health: Health::Healthy,
        }],
        endpoints_known: true,
    };
    let fwd = Forward {
        clusters: vec![WeightedCluster {
            name: "c".into(),
            weight: 1,
            request_headers: HeaderMutation::default(),
            response_headers: HeaderMutation::default(),
        }],
        total_weight: 1,
        timeout: None,
        retry_policy: None,
        hash_headers: vec![],
        prefix_rewrite: None,
        host_rewrite: None,
    };
    let route = Route {
        name: "all".into(),
        matcher: RouteMatch {
            path: PathMatch::Prefix("/".into()),
            case_sensitive: true,
            headers: vec![],
            query: vec![],
            grpc: false,
        },
        action: RouteAction::Forward(fwd),
        request_headers: HeaderMutation::default(),
        response_headers: HeaderMutation::default(),
        rate_limit: None,
        fault: None,
    };
    let http = HttpListener {
        stat_prefix: "test".into(),
        codec: Codec::Auto,
        route_config: Arc::new(RouteConfig {
            name: "rc".into(),
            virtual_hosts: vec![VirtualHost {
                name: "vh".into(),
                domains: vec!["*".into()],
                routes: vec![route],
                request_headers: HeaderMutation::default(),
                response_headers: HeaderMutation::default(),
                retry_policy: None,
                rate_limit: None,
            }],
            request_headers: HeaderMutation::default(),
            response_headers: HeaderMutation::default(),
        }),
        max_request_headers_bytes: 60 * 1024,
        request_timeout: None,
        rate_limit: None,
        fault: None,
    };
    let cfg = ProxyConfig {
        listeners: [(
            VIP,
            Arc::new(Listener {
                name: "svc.test:80".into(),
                address: VIP,
                kind: ListenerKind::Http(http),
                tcp_fallback: None,
            }),
        )]
        .into(),
        clusters: [("c".to_string(), Arc::new(cluster))].into(),
        version: 1,
    };
    let (config, rx) = watch::channel(Arc::new(cfg));
    let l7 = L7::new(rx, Arc::new(crate::metrics::L7Metrics::default()));
    l7.set_h2_server(server);
    let (log, lines) = AccessLog::for_tests();
    l7.set_access_log(log);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let engine = l7.clone();
    let (drain, watch) = crate::lifecycle::drain::new();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(
                engine
                    .clone()
                    .serve(s, VIP, "test/client".into(), watch.clone()),
            );
        }
    });
    ProxyUnderTest {
        addr,
        lines,
        _keep: (config, drain),
    }
}

struct ProxyUnderTest {
    addr: SocketAddr,
    lines: std::sync::mpsc::Receiver<Box<Entry>>,
    _keep: (
        watch::Sender<Arc<ProxyConfig>>,
        crate::lifecycle::drain::DrainTrigger,
    ),
}

/// An `h2` crate client on `addr`.
async fn client(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(s).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send.ready().await.unwrap()
}

/// How a request body ended at the upstream.
#[derive(Debug, PartialEq)]
enum End {
    /// Cleanly: the last chunk (HTTP/1.1) or `END_STREAM` (HTTP/2).
    Clean,
    /// Failed: the connection closed or reset mid-body (HTTP/1.1), or the stream was
    /// reset, with its code (HTTP/2).
    Cut(Option<h2::Reason>),
}

/// An HTTP/1.1 upstream that never answers: it reports when a request body's first bytes
/// have come, then how the body ended.
async fn h1_upstream() -> (SocketAddr, mpsc::Receiver<()>, mpsc::Receiver<End>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (first_tx, first) = mpsc::channel(4);
    let (end_tx, end) = mpsc::channel(4);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (first_tx, end_tx) = (first_tx.clone(), end_tx.clone());
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let mut told = false;
                let end = loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break End::Cut(None),
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                    let Some(at) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let body = &got[at + 4..];
                    if !told && body.windows(4).any(|w| w == b"part") {
                        told = true;
                        let _ = first_tx.send(()).await;
                    }
                    if body.windows(5).any(|w| w == b"0\r\n\r\n") {
                        break End::Clean;
                    }
                };
                let _ = end_tx.send(end).await;
                // Held open (never answered) until the proxy lets it go.
                let _ = s.read(&mut buf).await;
            });
        }
    });
    (addr, first, end)
}

/// An HTTP/2 upstream of the `h2` crate: each stream is given to `f`; a message on the
/// returned channel closes the connections (their TCP connection, no `GOAWAY`).
async fn h2_upstream<F, Fut>(f: F) -> (SocketAddr, Arc<Notify>)
where
    F: Fn(Request<h2::RecvStream>, h2::server::SendResponse<Bytes>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let kill = Arc::new(Notify::new());
    let k = kill.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (f, kill) = (f.clone(), k.clone());
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                loop {
                    tokio::select! {
                        next = conn.accept() => match next {
                            Some(Ok((req, respond))) => {
                                tokio::spawn(f.clone()(req, respond));
                            }
                            _ => break,
                        },
                        () = kill.notified() => break,
                    }
                }
            });
        }
    });
    (addr, kill)
}

/// Reads a request body at the upstream to its end: the first bytes reported on `first`.
async fn h2_body_end(mut body: h2::RecvStream, first: &mpsc::Sender<()>) -> End {
    let mut told = false;
    loop {
        match body.data().await {
            Some(Ok(d)) => {
                let _ = body.flow_control().release_capacity(d.len());
                if !told {
                    told = true;
                    let _ = first.send(()).await;
                }
            }
            Some(Err(e)) => return End::Cut(e.reason()),
            None => {
                return match body.trailers().await {
                    Ok(_) => End::Clean,
                    Err(e) => End::Cut(e.reason()),
                }
            }
        }
    }
}

/// A response body read to its end at the client: the data, then how it ended.
async fn read_all(mut b: h2::RecvStream) -> (Vec<u8>, Result<Option<HeaderMap>, h2::Error>) {
    let mut out = Vec::new();
    while let Some(d) = b.data().await {
        match d {
            Ok(d) => {
                let _ = b.flow_control().release_capacity(d.len());
                out.extend_from_slice(&d);
            }
            Err(e) => return (out, Err(e)),
        }
    }
    let t = b.trailers().await;
    (out, t)
}

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .unwrap_or_else(|_| panic!("{what} within 5 s"))
}

/// The client's part of a reset mid-body: a POST (with a `Content-Length` past what it
/// sends if `length`), `part` of its body, then (once the upstream has it, and the
/// response head if `head_first`) `RST_STREAM` with `reason`.
async fn post_then_reset(
    addr: SocketAddr,
    length: bool,
    head_first: bool,
    first: &mut mpsc::Receiver<()>,
    reason: h2::Reason,
) {
    let mut h2 = client(addr).await;
    let mut req = Request::post("http://svc.test/upload");
    if length {
        req = req.header("content-length", "100");
    }
    let (resp, mut tx) = h2.send_request(req.body(()).unwrap(), false).unwrap();
    tx.send_data(Bytes::from_static(b"part"), false).unwrap();
    within("the first bytes at the upstream", first.recv())
        .await
        .unwrap();
    if head_first {
        let resp = within("the response head", resp).await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    tx.send_reset(reason);
    // The connection (and its other streams) outlives the reset.
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(h2);
}

#[tokio::test]
async fn a_client_reset_before_the_responses_end_fails_the_http1_upstream_request() {
    let mut failed = Vec::new();
    for server in SERVERS {
        for reason in [h2::Reason::NO_ERROR, h2::Reason::CANCEL] {
            for length in [false, true] {
                let (up, mut first, mut end) = h1_upstream().await;
                let p = proxy(server, up, UpstreamProtocol::Http1).await;
                post_then_reset(p.addr, length, false, &mut first, reason).await;
                let how = within("the upstream's view", end.recv()).await.unwrap();
                if how != End::Cut(None) {
                    failed.push(format!("{server:?}, {reason:?}, content-length: {length}"));
                }
            }
        }
    }
    assert!(
        failed.is_empty(),
        "a clean end short of the body: {failed:#?}"
    );
}

#[tokio::test]
async fn a_client_reset_before_the_responses_end_resets_the_http2_upstream_stream() {
    let mut failed = Vec::new();
    for server in SERVERS {
        for reason in [h2::Reason::NO_ERROR, h2::Reason::CANCEL] {
            for head_first in [false, true] {
                let (first_tx, mut first) = mpsc::channel(4);
                let (end_tx, mut end) = mpsc::channel(4);
                let (up, _) = h2_upstream(move |req, mut respond| {
                    let (first_tx, end_tx) = (first_tx.clone(), end_tx.clone());
                    async move {
                        // `head_first`: the answer's head (and a first chunk) goes out at
                        // once, as a gRPC bidi stream's would; its end never comes.
                        let _tx = head_first.then(|| {
                            let mut tx = respond.send_response(Response::new(()), false).unwrap();
                            tx.send_data(Bytes::from_static(b"hello"), false).unwrap();
                            tx
                        });
                        let how = h2_body_end(req.into_body(), &first_tx).await;
                        let _ = end_tx.send(how).await;
                    }
                })
                .await;
                let p = proxy(server, up, UpstreamProtocol::Http2).await;
                post_then_reset(p.addr, false, head_first, &mut first, reason).await;
                let how = within("the upstream's view", end.recv()).await.unwrap();
                // Reset, never ended (a reset with NO_ERROR would read as a clean end to
                // hyper, and to the engine's own server after a complete answer), and with
                // CANCEL: the client cancelled its request, whatever its reset's code.
                if how != End::Cut(Some(h2::Reason::CANCEL)) {
                    failed.push(format!(
                        "{server:?}, {reason:?}, head first: {head_first}: {how:?}"
                    ));
                }
            }
        }
    }
    assert!(failed.is_empty(), "the upload not failed: {failed:#?}");
}

#[tokio::test]
async fn a_clients_no_error_stop_after_a_complete_response_is_no_failure() {
    for server in SERVERS {
        // Answers in full at once, then reads the upload on.
        let (first_tx, mut first) = mpsc::channel(4);
        let (end_tx, mut end) = mpsc::channel(4);
        let (up, _) = h2_upstream(move |req, mut respond| {
            let (first_tx, end_tx) = (first_tx.clone(), end_tx.clone());
            async move {
                let mut tx = respond.send_response(Response::new(()), false).unwrap();
                tx.send_data(Bytes::from_static(b"done"), true).unwrap();
                let how = h2_body_end(req.into_body(), &first_tx).await;
                let _ = end_tx.send(how).await;
            }
        })
        .await;
        let p = proxy(server, up, UpstreamProtocol::Http2).await;
        let mut h2 = client(p.addr).await;
        let req = Request::post("http://svc.test/upload").body(()).unwrap();
        let (resp, mut tx) = h2.send_request(req, false).unwrap();
        tx.send_data(Bytes::from_static(b"part"), false).unwrap();
        within("the first bytes at the upstream", first.recv())
            .await
            .unwrap();
        let resp = within("the response", resp).await.unwrap();
        let (data, how) = within("the response's end", read_all(resp.into_body())).await;
        assert_eq!((&data[..], how.is_ok()), (&b"done"[..], true), "{server:?}");
        // The exchange is complete: the client stops its upload (RFC 9113 section 8.1).
        tx.send_reset(h2::Reason::NO_ERROR);
        let how = within("the upstream's view", end.recv()).await.unwrap();
        // Passed on as the stop it is: the upload ends, no failure.
        assert_eq!(how, End::Clean, "{server:?}");
        let e = within("the access log line", async {
            tokio::task::spawn_blocking(move || p.lines.recv_timeout(Duration::from_secs(5)))
                .await
                .unwrap()
        })
        .await
        .expect("a line");
        assert_eq!(e.http.as_ref().map(|h| h.response_code), Some(200), "{e:?}");
        assert!(e.response_flags.is_empty(), "{server:?}: {e:?}");
    }
}

/// An answer at the client: status, head, body, and how the body ended.
type Got = (
    u16,
    HeaderMap,
    Vec<u8>,
    Result<Option<HeaderMap>, h2::Error>,
);

/// A GET through a proxy on `server`; the response head's status and how its body ended
/// at the client.
async fn get(
    server: H2Server,
    up: SocketAddr,
    protocol: UpstreamProtocol,
) -> Result<Got, h2::Error> {
    let p = proxy(server, up, protocol).await;
    let mut h2 = client(p.addr).await;
    let (resp, _) = h2
        .send_request(Request::get("http://svc.test/").body(()).unwrap(), true)
        .unwrap();
    // The head may be reset before it left the proxy: a reset too.
    let resp = within("an answer", resp).await?;
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    let (data, end) = within("the body's end", read_all(resp.into_body())).await;
    Ok((status, headers, data, end))
}

/// The client's stream ended in a reset, never `END_STREAM`, and not with `NO_ERROR`.
fn assert_reset(what: &str, got: Result<Got, h2::Error>) {
    let e = match got {
        Ok((_, _, data, end)) => end.map(|t| (data, t)).expect_err(what),
        Err(e) => e,
    };
    assert!(e.is_reset(), "{what}: a RST_STREAM: {e}");
    assert_ne!(e.reason(), Some(h2::Reason::NO_ERROR), "{what}: {e}");
}

#[tokio::test]
async fn an_http1_upstream_closing_mid_response_resets_the_clients_stream() {
    let heads: [&[u8]; 2] = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n9\r\nonly this\r\n",
    ];
    for server in SERVERS {
        for answer in heads {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let up = l.local_addr().unwrap();
            tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                s.write_all(answer).await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            });
            let got = get(server, up, UpstreamProtocol::Http1).await;
            let what = format!("{server:?}, {}", String::from_utf8_lossy(answer));
            assert_reset(&what, got);
        }
    }
}

/// How an HTTP/2 upstream cuts its answer short.
#[derive(Debug, Clone, Copy)]
enum Cut {
    Reset(h2::Reason),
    Close,
}

#[tokio::test]
async fn an_http2_upstream_resetting_or_closing_mid_response_resets_the_clients_stream() {
    let mut failed = Vec::new();
    for server in SERVERS {
        for cut in [
            Cut::Reset(h2::Reason::NO_ERROR),
            Cut::Reset(h2::Reason::CANCEL),
            Cut::Reset(h2::Reason::INTERNAL_ERROR),
            Cut::Close,
        ] {
            let go = Arc::new(Notify::new());
            let g = go.clone();
            let (up, kill) = h2_upstream(move |_req, mut respond| {
                let go = g.clone();
                async move {
                    let mut tx = respond.send_response(Response::new(()), false).unwrap();
                    tx.send_data(Bytes::from_static(b"some"), false).unwrap();
                    // Cut once the first chunk has gone (a reset drops what is queued).
                    go.notified().await;
                    if let Cut::Reset(r) = cut {
                        tx.send_reset(r);
                    }
                    std::future::pending::<()>().await;
                }
            })
            .await;
            let p = proxy(server, up, UpstreamProtocol::Http2).await;
            let mut h2 = client(p.addr).await;
            let (resp, _) = h2
                .send_request(Request::get("http://svc.test/").body(()).unwrap(), true)
                .unwrap();
            let resp = within("the answer's head", resp).await.unwrap();
            let mut body = resp.into_body();
            let d = within("the first chunk", body.data()).await;
            assert_eq!(d.unwrap().unwrap(), "some");
            go.notify_one();
            if let Cut::Close = cut {
                kill.notify_one();
            }
            let (rest, end) = within("the body's end", read_all(body)).await;
            assert!(rest.is_empty(), "{server:?}, {cut:?}: {rest:?}");
            // An upstream's reset code passed on, but never NO_ERROR (a clean end to
            // hyper): INTERNAL_ERROR for it, as for a closed connection.
            let want = match cut {
                Cut::Reset(h2::Reason::NO_ERROR) | Cut::Close => h2::Reason::INTERNAL_ERROR,
                Cut::Reset(r) => r,
            };
            match end {
                Err(e) if e.is_reset() && e.reason() == Some(want) => {}
                end => failed.push(format!("{server:?}, {cut:?}: {end:?}")),
            }
        }
    }
    assert!(failed.is_empty(), "not a reset: {failed:#?}");
}

#[tokio::test]
async fn a_trailers_only_grpc_answer_and_an_upstreams_stop_after_its_answer_stay_clean() {
    for server in SERVERS {
        // Trailers-only (`grpc-status` in the head, END_STREAM on it), then a full answer
        // whose upstream stops the rest of the upload with NO_ERROR (RFC 9113 section 8.1).
        let (up, _) = h2_upstream(|req, mut respond| async move {
            if req.uri().path() == "/trailers-only" {
                let r = Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "7")
                    .body(())
                    .unwrap();
                respond.send_response(r, true).unwrap();
                return;
            }
            let mut tx = respond.send_response(Response::new(()), false).unwrap();
            tx.send_data(Bytes::from_static(b"whole"), true).unwrap();
            // The request body dropped unread: the `h2` crate stops it with NO_ERROR.
            drop(req);
        })
        .await;
        let p = proxy(server, up, UpstreamProtocol::Http2).await;
        let mut h2 = client(p.addr).await;
        let req = Request::post("http://svc.test/trailers-only")
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        let (resp, mut tx) = h2.send_request(req, false).unwrap();
        tx.send_data(Bytes::from_static(b"\0\0\0\0\0"), true)
            .unwrap();
        let resp = within("the trailers-only answer", resp).await.unwrap();
        assert_eq!(resp.status(), 200, "{server:?}");
        assert_eq!(resp.headers()["grpc-status"], "7", "{server:?}");
        let (data, end) = within("its end", read_all(resp.into_body())).await;
        assert!(data.is_empty() && end.is_ok(), "{server:?}: {end:?}");

        h2 = h2.ready().await.unwrap();
        let req = Request::post("http://svc.test/early").body(()).unwrap();
        let (resp, mut tx) = h2.send_request(req, false).unwrap();
        tx.send_data(Bytes::from_static(b"part"), false).unwrap();
        let resp = within("the early answer", resp).await.unwrap();
        let (data, end) = within("its end", read_all(resp.into_body())).await;
        assert_eq!(&data[..], b"whole", "{server:?}");
        assert!(end.is_ok(), "{server:?}: {end:?}");
    }
}

/// An error with a cause, as the engine's wrappers are.
#[derive(Debug, thiserror::Error)]
#[error("wrapped")]
struct Wrapped(#[source] BoxError);

#[test]
fn a_reset_passed_on_is_never_no_error() {
    use h2::Reason;
    let reason = |e: BoxError| h2server::reset_reason(&Wrapped(e));
    assert_eq!(
        reason(Box::new(h2::Error::from(Reason::CANCEL))),
        Reason::CANCEL
    );
    assert_eq!(
        reason(Box::new(h2::Error::from(Reason::NO_ERROR))),
        Reason::INTERNAL_ERROR
    );
    assert_eq!(
        reason(Box::new(std::io::Error::other("gone"))),
        Reason::INTERNAL_ERROR
    );
}
