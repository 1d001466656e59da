//! Behaviour tests of the L7 engine over real loopback sockets: hyper upstreams, the engine
//! serving accepted connections, hyper (or raw TCP) clients.

use std::{
    net::Ipv4Addr,
    pin::Pin,
    sync::atomic::{AtomicUsize, Ordering},
    task::{Context, Poll},
};

use http::HeaderMap;
use http_body::Frame;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot, Notify},
};

use super::*;
use crate::proxy::config::{
    CircuitBreaker, Cluster, Endpoint, Fault, HeaderMutation, Health, LbPolicy, OutlierDetection,
    PathMatch, RateLimit, RetryOn, RetryPolicy, RouteConfig, RouteMatch, UpstreamProtocol,
    WeightedCluster,
};

/// The original destination every test connection claims.
const VIP: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)),
    80,
);

/// A body fed by a channel, for streaming in both directions.
struct ChanBody(mpsc::Receiver<Frame<Bytes>>);

impl http_body::Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

fn text(s: impl Into<Bytes>) -> ProxyBody {
    Full::new(s.into()).map_err(|n| match n {}).boxed_unsync()
}

fn reply(status: u16, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut r = Response::new(text(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r
}

/// A body of the frames sent on `rx`'s channel, ended when the channel closes.
fn chan(rx: mpsc::Receiver<Frame<Bytes>>) -> ProxyBody {
    ChanBody(rx).map_err(|n| match n {}).boxed_unsync()
}

/// A gRPC answer (`content-type: application/grpc`, status 200) with `body`: messages,
/// then trailers with the `grpc-status`.
fn grpc_reply(body: ProxyBody) -> Response<ProxyBody> {
    let mut r = Response::new(body);
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    r
}

/// An upstream on a loopback port; counts the connections it accepted.
struct Upstream {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

async fn upstream<F, Fut>(h2: bool, f: F) -> Upstream
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let (c, d) = (conns.clone(), closed.clone());
    tokio::spawn(
        async move {
            while let Ok((s, _)) = l.accept().await {
                c.fetch_add(1, Ordering::Relaxed);
                let f = f.clone();
                let svc = service_fn(move |r| {
                    let fut = f(r);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let io = TokioIo::new(s);
                let d = d.clone();
                tokio::spawn(async move {
                    let _ = if h2 {
                        http2::Builder::new(SpanExec)
                            .serve_connection(io, svc)
                            .await
                    } else {
                        http1::Builder::new().serve_connection(io, svc).await
                    };
                    d.fetch_add(1, Ordering::Relaxed);
                });
            }
        }
        .instrument(tracing::debug_span!("test_upstream")),
    );
    Upstream {
        addr,
        conns,
        closed,
    }
}

/// A proxy forwarding everything to the HTTP/2 cluster `grpc` of `eps` (with `retry`).
async fn h2_cluster_proxy(eps: &[SocketAddr], retry: Option<RetryPolicy>) -> Proxy {
    let mut cl = cluster("grpc", eps);
    cl.protocol = UpstreamProtocol::Http2;
    let mut fwd = to(&[("grpc", 1)]);
    fwd.retry_policy = retry.map(Arc::new);
    proxy(simple(vec![cl], fwd)).await
}

/// An HTTP/2 (gRPC) upstream answering with `f`, and a proxy forwarding everything to it.
async fn h2_grpc_upstream<F, Fut>(f: F) -> (Upstream, Proxy)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let up = upstream(true, f).await;
    let p = h2_cluster_proxy(&[up.addr], None).await;
    (up, p)
}

/// Answers with its name (body and `x-upstream`).
async fn named(name: &'static str) -> Upstream {
    upstream(false, move |_| async move {
        let mut r = reply(200, name);
        r.headers_mut()
            .insert("x-upstream", HeaderValue::from_static(name));
        r
    })
    .await
}

/// Answers with the request it saw: `path`, then `name: value` lines.
async fn echo() -> Upstream {
    upstream(false, |req: Request<Incoming>| async move {
        let mut s = format!("path={}\n", req.uri());
        for (k, v) in req.headers() {
            s.push_str(&format!("{k}={}\n", v.to_str().unwrap_or("?")));
        }
        let body = req.into_body().collect().await.unwrap().to_bytes();
        s.push_str(&format!("body={}\n", String::from_utf8_lossy(&body)));
        reply(200, s)
    })
    .await
}

struct Proxy {
    addr: SocketAddr,
    config: watch::Sender<Arc<ProxyConfig>>,
    metrics: Arc<L7Metrics>,
    l7: Arc<L7>,
    /// Drains the connections the proxy serves.
    drain: crate::lifecycle::drain::DrainTrigger,
}

async fn proxy(cfg: ProxyConfig) -> Proxy {
    let (config, rx) = watch::channel(Arc::new(cfg));
    let metrics = Arc::new(L7Metrics::default());
    let l7 = L7::new(rx, metrics.clone());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let engine = l7.clone();
    let (drain, watch) = crate::lifecycle::drain::new();
    tokio::spawn(
        async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(
                    engine
                        .clone()
                        .serve(s, VIP, "test/client".into(), watch.clone()),
                );
            }
        }
        .instrument(tracing::debug_span!("test_proxy")),
    );
    Proxy {
        addr,
        config,
        metrics,
        l7,
        drain,
    }
}

fn cluster(name: &str, eps: &[SocketAddr]) -> Cluster {
    Cluster {
        name: name.into(),
        lb: LbPolicy::RoundRobin,
        protocol: UpstreamProtocol::Http1,
        connect_timeout: Duration::from_secs(1),
        circuit_breaker: CircuitBreaker::default(),
        outlier: None,
        endpoints: eps
            .iter()
            .map(|a| Endpoint {
                address: *a,
                weight: 1,
                health: Health::Healthy,
            })
            .collect(),
        endpoints_known: true,
    }
}

fn to(clusters: &[(&str, u32)]) -> Forward {
    Forward {
        clusters: clusters
            .iter()
            .map(|(n, w)| WeightedCluster {
                name: (*n).into(),
                weight: *w,
                request_headers: HeaderMutation::default(),
                response_headers: HeaderMutation::default(),
            })
            .collect(),
        total_weight: clusters.iter().map(|c| c.1).sum(),
        timeout: Some(Duration::from_secs(5)),
        retry_policy: None,
        hash_headers: vec![],
        prefix_rewrite: None,
        host_rewrite: None,
    }
}

fn route(prefix: &str, action: RouteAction) -> Route {
    Route {
        name: format!("route{prefix}"),
        matcher: RouteMatch {
            path: PathMatch::Prefix(prefix.into()),
            case_sensitive: true,
            headers: vec![],
            query: vec![],
            grpc: false,
        },
        action,
        request_headers: HeaderMutation::default(),
        response_headers: HeaderMutation::default(),
        rate_limit: None,
        fault: None,
    }
}

fn vhost(routes: Vec<Route>) -> VirtualHost {
    VirtualHost {
        name: "vh".into(),
        domains: vec!["*".into()],
        routes,
        request_headers: HeaderMutation::default(),
        response_headers: HeaderMutation::default(),
        retry_policy: None,
        rate_limit: None,
    }
}

fn http_listener(vh: VirtualHost) -> HttpListener {
    HttpListener {
        stat_prefix: "test".into(),
        codec: Codec::Auto,
        route_config: Arc::new(RouteConfig {
            name: "rc".into(),
            virtual_hosts: vec![vh],
            request_headers: HeaderMutation::default(),
            response_headers: HeaderMutation::default(),
        }),
        max_request_headers_bytes: 60 * 1024,
        request_timeout: None,
        rate_limit: None,
        fault: None,
    }
}

fn config(http: HttpListener, clusters: Vec<Cluster>) -> ProxyConfig {
    ProxyConfig {
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
        clusters: clusters
            .into_iter()
            .map(|c| (c.name.clone(), Arc::new(c)))
            .collect(),
        // Numbered as the xDS client numbers what it publishes.
        version: {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        },
    }
}

/// A simple proxy: everything under `/` to `cluster`.
fn simple(clusters: Vec<Cluster>, fwd: Forward) -> ProxyConfig {
    config(
        http_listener(vhost(vec![route("/", RouteAction::Forward(fwd))])),
        clusters,
    )
}

fn retry(retry_on: RetryOn, n: u32) -> RetryPolicy {
    RetryPolicy {
        retry_on,
        num_retries: n,
        per_try_timeout: None,
        retriable_status_codes: vec![],
        backoff_base: Duration::from_millis(1),
        backoff_max: Duration::from_millis(5),
    }
}

fn retry_5xx(n: u32) -> RetryPolicy {
    retry(
        RetryOn {
            server_error: true,
            ..RetryOn::default()
        },
        n,
    )
}

type H1 = hyper::client::conn::http1::SendRequest<ProxyBody>;

async fn client(addr: SocketAddr) -> H1 {
    let s = TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn.instrument(tracing::debug_span!("test_client")));
    tx
}

struct Got {
    status: u16,
    headers: HeaderMap,
    body: String,
}

async fn call(c: &mut H1, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Got {
    c.ready().await.unwrap();
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "svc.test");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = c
        .send_request(b.body(text(body.to_owned())).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Got {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn get(c: &mut H1, path: &str) -> Got {
    call(c, "GET", path, &[], "").await
}

#[tokio::test]
async fn weighted_split_90_10_within_3_points_over_2000_requests() {
    let (a, b) = (named("a").await, named("b").await);
    let p = proxy(simple(
        vec![cluster("a", &[a.addr]), cluster("b", &[b.addr])],
        to(&[("a", 90), ("b", 10)]),
    ))
    .await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let addr = p.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = client(addr).await;
            let mut to_b = 0;
            for _ in 0..500 {
                let g = get(&mut c, "/").await;
                assert_eq!(g.status, 200);
                to_b += usize::from(g.body == "b");
            }
            to_b
        }));
    }
    let mut to_b = 0;
    for t in tasks {
        to_b += t.await.unwrap();
    }
    // 10% of 2,000 is 200 (binomial sd 13.4): 7%..13% is beyond 4 sd.
    assert!((140..=260).contains(&to_b), "{to_b} of 2000 went to b");
    // Keep-alive on both legs: four upstream connections at most per cluster.
    assert!(a.conns.load(Ordering::Relaxed) <= 4);
    assert_eq!(
        p.metrics
            .requests_where(|l| l.response_code == 200 && l.route == "route/"),
        2000
    );
}

#[tokio::test]
async fn retries_recover_from_an_endpoint_answering_503() {
    let bad = upstream(false, |req: Request<Incoming>| async move {
        let _ = req.into_body().collect().await;
        reply(503, "overloaded")
    })
    .await;
    let good = echo().await;
    let mut fwd = to(&[("c", 1)]);
    fwd.retry_policy = Some(Arc::new(retry_5xx(2)));
    let p = proxy(simple(vec![cluster("c", &[bad.addr, good.addr])], fwd)).await;
    let mut c = client(p.addr).await;
    for i in 0..10 {
        let body = format!("payload-{i}");
        let g = call(&mut c, "POST", "/submit", &[], &body).await;
        assert_eq!(g.status, 200, "{}", g.body);
        assert!(
            g.body.contains(&format!("body={body}")),
            "replayed body: {}",
            g.body
        );
    }
    let mut out = String::new();
    p.metrics.render(&mut out);
    // Round robin alternates and every request takes two picks: each first try is the 503.
    assert!(
        out.contains("mesh_upstream_retries_total{cluster=\"c\"} 10"),
        "{out}"
    );
}

#[tokio::test]
async fn no_retry_without_a_policy_and_connect_failures_retry() {
    // A port nobody listens on: refused at once.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let good = named("good").await;
    let p = proxy(simple(
        vec![cluster("c", &[dead, good.addr])],
        to(&[("c", 1)]),
    ))
    .await;
    let mut c = client(p.addr).await;
    let codes: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(get(&mut c, "/").await.status);
        }
        v
    };
    assert_eq!(codes.iter().filter(|s| **s == 503).count(), 2, "{codes:?}");
    let mut fwd = to(&[("c", 1)]);
    fwd.retry_policy = Some(Arc::new(retry(
        RetryOn {
            connect_failure: true,
            ..RetryOn::default()
        },
        1,
    )));
    p.config.send_replace(Arc::new(simple(
        vec![cluster("c", &[dead, good.addr])],
        fwd,
    )));
    for _ in 0..4 {
        assert_eq!(get(&mut c, "/").await.status, 200);
    }
}

#[tokio::test]
async fn route_timeout_gives_504_and_per_try_timeout_retries() {
    let slow = upstream(false, |_| async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        reply(200, "late")
    })
    .await;
    let fast = named("fast").await;
    let mut fwd = to(&[("slow", 1)]);
    fwd.timeout = Some(Duration::from_millis(200));
    let p = proxy(simple(vec![cluster("slow", &[slow.addr])], fwd)).await;
    let mut c = client(p.addr).await;
    let t = std::time::Instant::now();
    let g = get(&mut c, "/").await;
    assert_eq!(g.status, 504);
    assert_eq!(g.body, "upstream request timeout");
    assert!(t.elapsed() < Duration::from_secs(2));

    // Per-try timeout: the slow endpoint's try is cut short and the retry lands on the
    // fast one, well within the route timeout.
    let mut fwd = to(&[("both", 1)]);
    let mut rp = retry_5xx(2);
    rp.per_try_timeout = Some(Duration::from_millis(100));
    fwd.retry_policy = Some(Arc::new(rp));
    fwd.timeout = Some(Duration::from_secs(2));
    p.config.send_replace(Arc::new(simple(
        vec![cluster("both", &[slow.addr, fast.addr])],
        fwd,
    )));
    for _ in 0..4 {
        assert_eq!(get(&mut c, "/").await.body, "fast");
    }
}

#[tokio::test]
async fn rate_limit_gives_429_with_headers_and_route_override() {
    let up = named("up").await;
    let mut vh = vhost(vec![
        route("/free", RouteAction::Forward(to(&[("c", 1)]))),
        route("/", RouteAction::Forward(to(&[("c", 1)]))),
    ]);
    vh.routes[0].rate_limit = Some(Arc::new(RateLimit {
        key: "free".into(),
        max_tokens: 100,
        tokens_per_fill: 100,
        fill_interval: Duration::from_secs(60),
        x_ratelimit_headers: false,
        status: 429,
    }));
    let mut http = http_listener(vh);
    http.rate_limit = Some(Arc::new(RateLimit {
        key: "listener".into(),
        max_tokens: 3,
        tokens_per_fill: 1,
        fill_interval: Duration::from_secs(60),
        x_ratelimit_headers: true,
        status: 429,
    }));
    let p = proxy(config(http, vec![cluster("c", &[up.addr])])).await;
    let mut c = client(p.addr).await;
    for left in ["2", "1", "0"] {
        let g = get(&mut c, "/").await;
        assert_eq!(g.status, 200);
        assert_eq!(g.headers["x-ratelimit-remaining"], left);
    }
    let g = get(&mut c, "/").await;
    assert_eq!(g.status, 429);
    assert_eq!(g.headers["x-ratelimit-limit"], "3");
    assert_eq!(g.headers["x-ratelimit-remaining"], "0");
    assert!(
        g.headers["x-ratelimit-reset"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            <= 60
    );
    // The route's own limit replaces the listener's.
    for _ in 0..5 {
        let g = get(&mut c, "/free").await;
        assert_eq!(g.status, 200);
        assert!(g.headers.get("x-ratelimit-limit").is_none());
    }
    let mut out = String::new();
    p.metrics.render(&mut out);
    assert!(
        out.contains("mesh_rate_limited_total{key=\"listener\"} 1"),
        "{out}"
    );
}

#[tokio::test]
async fn circuit_breaker_trips_with_503_and_recovers() {
    let (got_tx, mut got_rx) = mpsc::channel::<()>(4);
    let release = Arc::new(Notify::new());
    let r = release.clone();
    let up = upstream(false, move |req: Request<Incoming>| {
        let (got_tx, r) = (got_tx.clone(), r.clone());
        async move {
            if req.uri().path() == "/hold" {
                let _ = got_tx.send(()).await;
                r.notified().await;
            }
            reply(200, "ok")
        }
    })
    .await;
    let mut cl = cluster("c", &[up.addr]);
    cl.circuit_breaker.max_requests = 1;
    let p = proxy(simple(vec![cl], to(&[("c", 1)]))).await;
    let addr = p.addr;
    let held = tokio::spawn(async move { get(&mut client(addr).await, "/hold").await.status });
    got_rx.recv().await.unwrap();
    let mut c = client(p.addr).await;
    let g = get(&mut c, "/").await;
    assert_eq!(g.status, 503);
    assert_eq!(g.headers["x-envoy-overloaded"], "true");
    release.notify_one();
    assert_eq!(held.await.unwrap(), 200);
    assert_eq!(get(&mut c, "/").await.status, 200);
    let mut out = String::new();
    p.metrics.render(&mut out);
    assert!(
        out.contains("mesh_circuit_open_total{cluster=\"c\"} 1"),
        "{out}"
    );
}

#[tokio::test]
async fn pending_requests_overflow_when_connections_are_capped() {
    let (got_tx, mut got_rx) = mpsc::channel::<()>(4);
    let release = Arc::new(Notify::new());
    let r = release.clone();
    let up = upstream(false, move |_| {
        let (got_tx, r) = (got_tx.clone(), r.clone());
        async move {
            let _ = got_tx.send(()).await;
            r.notified().await;
            reply(200, "ok")
        }
    })
    .await;
    let mut cl = cluster("c", &[up.addr]);
    cl.circuit_breaker.max_connections = 1;
    cl.circuit_breaker.max_pending_requests = 1;
    let p = proxy(simple(vec![cl], to(&[("c", 1)]))).await;
    let addr = p.addr;
    let first = tokio::spawn(async move { get(&mut client(addr).await, "/").await.status });
    got_rx.recv().await.unwrap();
    // The second waits for the one connection; the third overflows the pending queue.
    let second = tokio::spawn(async move { get(&mut client(addr).await, "/").await.status });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let g = get(&mut client(addr).await, "/").await;
    assert_eq!(g.status, 503);
    assert_eq!(g.headers["x-envoy-overloaded"], "true");
    release.notify_one();
    assert_eq!(first.await.unwrap(), 200);
    got_rx.recv().await.unwrap();
    release.notify_one();
    assert_eq!(second.await.unwrap(), 200);
    assert_eq!(
        up.conns.load(Ordering::Relaxed),
        1,
        "the waiter reused the connection"
    );
}

#[tokio::test]
async fn outlier_ejection_kicks_in_and_the_endpoint_returns() {
    let bad = upstream(false, |_| async { reply(500, "bad") }).await;
    let good = named("good").await;
    let mut cl = cluster("c", &[bad.addr, good.addr]);
    cl.outlier = Some(OutlierDetection {
        consecutive_5xx: 3,
        base_ejection_time: Duration::from_millis(400),
        max_ejection_percent: 50,
        interval: Duration::from_secs(10),
    });
    let p = proxy(simple(vec![cl], to(&[("c", 1)]))).await;
    let mut c = client(p.addr).await;
    let mut errors = 0;
    for _ in 0..20 {
        errors += usize::from(get(&mut c, "/").await.status == 500);
    }
    assert_eq!(errors, 3, "ejected after three consecutive 5xx");
    tokio::time::sleep(Duration::from_millis(450)).await;
    let mut back = 0;
    for _ in 0..4 {
        back += usize::from(get(&mut c, "/").await.status == 500);
    }
    assert!(back >= 1, "the endpoint is back after the ejection time");
    let mut out = String::new();
    p.metrics.render(&mut out);
    assert!(
        out.contains("mesh_outlier_ejections_total{cluster=\"c\"} 1"),
        "{out}"
    );
}

/// Whether `k` of `n` tries of chance `p` is within `sds` standard deviations of the mean:
/// a bound from the binomial spread (five: a false failure about once in 1.7 million runs).
fn within_binomial(k: usize, n: usize, p: f64, sds: f64) -> bool {
    let (n, k) = (n as f64, k as f64);
    let sd = (n * p * (1.0 - p)).sqrt();
    (k - n * p).abs() <= sds * sd
}

/// Rates are checked by what the engine decided, never by how long a request took: a
/// loaded machine makes an undelayed request slow, not a delayed one fast. The access
/// log's `DI`/`FI` flags say which requests were delayed or aborted; each delayed one
/// must have taken the delay (a lower bound no load can break); 0% and 100% are exact, and
/// 50% is held to five standard deviations of its binomial spread.
#[tokio::test]
async fn fault_injection_delays_and_aborts_at_the_configured_rates() {
    const DELAY: Duration = Duration::from_millis(50);
    let up = named("up").await;
    let fwd = || RouteAction::Forward(to(&[("c", 1)]));
    let mut vh = vhost(vec![
        route("/abort0", fwd()),
        route("/abort100", fwd()),
        route("/abort", fwd()),
        route("/delay0", fwd()),
        route("/delay100", fwd()),
        route("/delay", fwd()),
        route("/grpc", fwd()),
    ]);
    let abort = |ppm| Fault {
        delay: None,
        abort: Some((FaultAbort::Http(503), ppm)),
    };
    let delay = |ppm| Fault {
        delay: Some((DELAY, ppm)),
        abort: None,
    };
    for (i, f) in [
        abort(0),
        abort(1_000_000),
        abort(500_000),
        delay(0),
        delay(1_000_000),
        delay(500_000),
    ]
    .into_iter()
    .enumerate()
    {
        vh.routes[i].fault = Some(Arc::new(f));
    }
    vh.routes[6].fault = Some(Arc::new(Fault {
        delay: None,
        abort: Some((FaultAbort::Grpc(14), 1_000_000)),
    }));
    let p = proxy(config(http_listener(vh), vec![cluster("c", &[up.addr])])).await;
    let (log, lines) = AccessLog::for_tests();
    p.l7.set_access_log(log);
    let mut c = client(p.addr).await;

    let mut aborted = HashMap::<&str, usize>::new();
    for (path, n) in [("/abort0", 50), ("/abort100", 50), ("/abort", 400)] {
        for _ in 0..n {
            let g = get(&mut c, path).await;
            if g.status == 503 {
                assert_eq!(g.body, "fault filter abort");
                *aborted.entry(path).or_default() += 1;
            } else {
                assert_eq!(g.status, 200, "{path}");
            }
        }
    }
    assert_eq!(aborted.get("/abort0"), None);
    assert_eq!(aborted["/abort100"], 50);
    let half = aborted.get("/abort").copied().unwrap_or(0);
    assert!(
        within_binomial(half, 400, 0.5, 5.0),
        "{half} of 400 aborted"
    );
    // Every abort is flagged FI, and nothing else is.
    let mut flagged = 0;
    while let Ok(e) = lines.try_recv() {
        flagged += usize::from(e.response_flags.contains(Flags::FI));
    }
    assert_eq!(flagged, 50 + half);

    // Delays: 20 clients at once, 10 requests each, every request named by its index.
    let mut tasks = Vec::new();
    for t in 0..20usize {
        let addr = p.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = client(addr).await;
            let mut took = Vec::new();
            for r in 0..10usize {
                let i = t * 10 + r;
                let path = match i % 10 {
                    0 => format!("/delay0?i={i}"),
                    1 => format!("/delay100?i={i}"),
                    _ => format!("/delay?i={i}"),
                };
                let start = std::time::Instant::now();
                assert_eq!(get(&mut c, &path).await.status, 200);
                took.push((path, start.elapsed()));
            }
            took
        }));
    }
    let mut took = HashMap::new();
    for t in tasks {
        took.extend(t.await.unwrap());
    }
    let mut delayed = HashMap::<&str, usize>::new();
    let mut seen = 0;
    while seen < took.len() {
        let e = lines
            .recv_timeout(Duration::from_secs(10))
            .expect("a line per request");
        let path = e.http.as_ref().unwrap().path.clone();
        // (A line of the abort requests may come late.)
        if !path.starts_with("/delay") {
            continue;
        }
        seen += 1;
        if e.response_flags.contains(Flags::DI) {
            let elapsed = took[&path];
            assert!(elapsed >= DELAY, "{path} was delayed yet took {elapsed:?}");
            let route = path.split('?').next().unwrap();
            let route = ["/delay0", "/delay100", "/delay"]
                .into_iter()
                .find(|r| *r == route)
                .unwrap();
            *delayed.entry(route).or_default() += 1;
        }
    }
    assert_eq!(delayed.get("/delay0"), None, "{delayed:?}");
    assert_eq!(delayed["/delay100"], 20, "{delayed:?}");
    let half = delayed.get("/delay").copied().unwrap_or(0);
    assert!(
        within_binomial(half, 160, 0.5, 5.0),
        "{half} of 160 delayed"
    );

    let g = get(&mut c, "/grpc").await;
    assert_eq!(g.status, 200);
    assert_eq!(g.headers["grpc-status"], "14");
    assert_eq!(g.headers["content-type"], "application/grpc");
}

#[test]
fn the_binomial_bound_fails_what_it_should() {
    assert!(within_binomial(200, 400, 0.5, 5.0));
    assert!(within_binomial(150, 400, 0.5, 5.0));
    assert!(!within_binomial(149, 400, 0.5, 5.0));
    assert!(!within_binomial(0, 160, 0.5, 5.0));
    assert!(!within_binomial(160, 160, 0.5, 5.0));
}

#[tokio::test]
async fn grpc_bidi_streaming_over_h2_passes_frames_and_trailers_intact() {
    // An echo service: each request frame comes back as a response frame, then trailers.
    let (up, p) = h2_grpc_upstream(|req: Request<Incoming>| async move {
        let (tx, rx) = mpsc::channel(4);
        let mut body = req.into_body();
        tokio::spawn(async move {
            while let Some(Ok(f)) = body.frame().await {
                if let Ok(d) = f.into_data() {
                    let _ = tx.send(Frame::data(d)).await;
                }
            }
            let mut t = HeaderMap::new();
            t.insert("grpc-status", HeaderValue::from_static("0"));
            t.insert("x-trailer", HeaderValue::from_static("kept"));
            let _ = tx.send(Frame::trailers(t)).await;
        });
        grpc_reply(chan(rx))
    })
    .await;
    let s = TcpStream::connect(p.addr).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::Builder::new(SpanExec)
        .handshake::<_, ChanBody>(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn.instrument(tracing::debug_span!("test_h2_client")));
    let (tx, rx) = mpsc::channel(4);
    let req = Request::builder()
        .method("POST")
        .uri("http://svc.test/echo.Echo/Chat")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(ChanBody(rx))
        .unwrap();
    tx.send(Frame::data(Bytes::from_static(b"one")))
        .await
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // Each message comes back before the next is sent: nothing is buffered.
    for msg in ["one", "two", "three"] {
        if msg != "one" {
            tx.send(Frame::data(Bytes::from(msg))).await.unwrap();
        }
        let f = tokio::time::timeout(Duration::from_secs(2), body.frame())
            .await
            .expect("streamed frame")
            .unwrap()
            .unwrap();
        assert_eq!(f.into_data().unwrap(), msg);
    }
    drop(tx);
    let f = body.frame().await.unwrap().unwrap();
    let t = f.into_trailers().unwrap();
    assert_eq!(t["grpc-status"], "0");
    assert_eq!(t["x-trailer"], "kept");
    assert!(body.frame().await.is_none());
    // One multiplexed upstream connection for several concurrent calls.
    let mut calls = Vec::new();
    for _ in 0..5 {
        let (tx, rx) = mpsc::channel(1);
        tx.send(Frame::data(Bytes::from_static(b"x")))
            .await
            .unwrap();
        drop(tx);
        let req = Request::post("http://svc.test/echo.Echo/Unary")
            .header("content-type", "application/grpc")
            .body(ChanBody(rx))
            .unwrap();
        let f = h2.send_request(req);
        calls.push(async move { f.await.unwrap().into_body().collect().await.unwrap() });
    }
    for c in futures_util::future::join_all(calls).await {
        assert_eq!(c.trailers().unwrap()["grpc-status"], "0");
    }
    assert_eq!(up.conns.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn config_push_mid_flight_keeps_the_request_and_reroutes_new_ones() {
    let (got_tx, mut got_rx) = mpsc::channel::<()>(1);
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let go_rx = Arc::new(tokio::sync::Mutex::new(Some(go_rx)));
    let old = upstream(false, move |_| {
        let (got_tx, go_rx) = (got_tx.clone(), go_rx.clone());
        async move {
            let _ = got_tx.send(()).await;
            if let Some(rx) = go_rx.lock().await.take() {
                let _ = rx.await;
            }
            reply(200, "old")
        }
    })
    .await;
    let new = named("new").await;
    let p = proxy(simple(vec![cluster("old", &[old.addr])], to(&[("old", 1)]))).await;
    let addr = p.addr;
    let in_flight = tokio::spawn(async move { get(&mut client(addr).await, "/").await });
    got_rx.recv().await.unwrap();
    // The push drops the old cluster altogether.
    p.config.send_replace(Arc::new(simple(
        vec![cluster("new", &[new.addr])],
        to(&[("new", 1)]),
    )));
    let mut c = client(p.addr).await;
    assert_eq!(get(&mut c, "/").await.body, "new");
    go_tx.send(()).unwrap();
    let g = in_flight.await.unwrap();
    assert_eq!((g.status, g.body.as_str()), (200, "old"));
}

async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    // EOF proves the proxy closed the connection.
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the proxy closes the connection")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn malformed_http_gets_400_and_a_clean_close() {
    let up = named("up").await;
    let p = proxy(simple(vec![cluster("c", &[up.addr])], to(&[("c", 1)]))).await;
    let out = raw(p.addr, b"GET /\x01bad HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    let out = raw(p.addr, b"GET / HTTP/1.1\r\nHost x\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert_eq!(up.conns.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn oversized_headers_get_431_on_http1_and_h2() {
    let up = named("up").await;
    let mut http = http_listener(vhost(vec![route(
        "/",
        RouteAction::Forward(to(&[("c", 1)])),
    )]));
    http.max_request_headers_bytes = 4096;
    let p = proxy(config(http, vec![cluster("c", &[up.addr])])).await;
    let big = "v".repeat(5000);
    let out = raw(
        p.addr,
        format!("GET / HTTP/1.1\r\nHost: x\r\nx-big: {big}\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    let mut c = client(p.addr).await;
    let ok = "v".repeat(3000);
    assert_eq!(
        call(&mut c, "GET", "/", &[("x-ok", &ok)], "").await.status,
        200
    );

    let s = TcpStream::connect(p.addr).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::Builder::new(SpanExec)
        .handshake::<_, ProxyBody>(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn.instrument(tracing::debug_span!("test_h2_client")));
    let req = Request::get("http://svc.test/")
        .header("x-big", big.as_str())
        .body(text(""))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 431);
    let req = Request::get("http://svc.test/").body(text("")).unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 200);
}

#[tokio::test]
async fn ring_hash_keeps_each_user_on_one_endpoint() {
    let ups = [named("a").await, named("b").await, named("c").await];
    let mut cl = cluster("c", &ups.iter().map(|u| u.addr).collect::<Vec<_>>());
    cl.lb = LbPolicy::RingHash {
        minimum_ring_size: 1024,
    };
    let mut fwd = to(&[("c", 1)]);
    fwd.hash_headers = vec!["x-user".into()];
    let p = proxy(simple(vec![cl], fwd)).await;
    let mut c = client(p.addr).await;
    let mut seen = std::collections::HashSet::new();
    for u in 0..20 {
        let user = format!("user-{u}");
        let first = call(&mut c, "GET", "/", &[("x-user", &user)], "")
            .await
            .body;
        for _ in 0..3 {
            assert_eq!(
                call(&mut c, "GET", "/", &[("x-user", &user)], "")
                    .await
                    .body,
                first
            );
        }
        seen.insert(first);
    }
    assert!(seen.len() >= 2, "users spread over endpoints: {seen:?}");
}

fn mutation(add: &[(&str, &str, bool)], remove: &[&str]) -> HeaderMutation {
    HeaderMutation {
        add: add
            .iter()
            .map(|(k, v, a)| ((*k).into(), (*v).into(), *a))
            .collect(),
        remove: remove.iter().map(|r| (*r).into()).collect(),
    }
}

#[tokio::test]
async fn header_mutations_at_every_level_and_rewrites() {
    let up = echo().await;
    let mut fwd = to(&[("c", 1)]);
    fwd.prefix_rewrite = Some("/v2/".into());
    fwd.host_rewrite = Some("backend.internal".into());
    fwd.clusters[0].request_headers = mutation(&[("x-cluster", "wc", false)], &[]);
    fwd.clusters[0].response_headers = mutation(&[("x-resp-level", "wc", false)], &[]);
    let mut r = route("/api/", RouteAction::Forward(fwd));
    r.request_headers = mutation(
        &[("x-route", "r", false), ("x-level", "route", false)],
        &["x-secret"],
    );
    r.response_headers = mutation(&[("x-resp-route", "r", false)], &["x-drop-me"]);
    let mut vh = vhost(vec![r]);
    vh.request_headers = mutation(&[("x-level", "vhost", false)], &[]);
    vh.response_headers = mutation(&[("x-resp-level", "vhost", false)], &[]);
    let mut http = http_listener(vh);
    let rc = Arc::get_mut(&mut http.route_config).unwrap();
    rc.request_headers = mutation(&[("x-multi", "config", true)], &[]);
    rc.response_headers = mutation(&[("x-resp-config", "rc", false)], &[]);
    let p = proxy(config(http, vec![cluster("c", &[up.addr])])).await;
    let mut c = client(p.addr).await;
    let g = call(
        &mut c,
        "GET",
        "/api/users?id=1",
        &[
            ("x-secret", "s"),
            ("x-multi", "client"),
            ("connection", "x-hop"),
            ("x-hop", "1"),
        ],
        "",
    )
    .await;
    assert_eq!(g.status, 200);
    let b = g.body;
    assert!(b.contains("path=/v2/users?id=1\n"), "{b}");
    assert!(b.contains("host=backend.internal\n"), "{b}");
    assert!(
        b.contains("x-cluster=wc\n") && b.contains("x-route=r\n"),
        "{b}"
    );
    assert!(
        b.contains("x-level=vhost\n"),
        "the less specific level wins: {b}"
    );
    assert!(
        b.contains("x-multi=client\n") && b.contains("x-multi=config\n"),
        "{b}"
    );
    assert!(!b.contains("x-secret") && !b.contains("x-hop"), "{b}");
    assert_eq!(g.headers["x-resp-level"], "vhost");
    assert_eq!(g.headers["x-resp-route"], "r");
    assert_eq!(g.headers["x-resp-config"], "rc");
}

#[tokio::test]
async fn direct_responses_redirects_and_missing_routes_or_clusters() {
    let mut vh = vhost(vec![
        route(
            "/health",
            RouteAction::Respond {
                status: 200,
                body: "fine".into(),
            },
        ),
        route(
            "/old",
            RouteAction::Redirect {
                status: 301,
                host: Some("new.example".into()),
                path: Some("/new".into()),
            },
        ),
        route("/gone", RouteAction::Forward(to(&[("missing", 1)]))),
    ]);
    vh.domains = vec!["svc.test".into()];
    let p = proxy(config(http_listener(vh), vec![])).await;
    let mut c = client(p.addr).await;
    let g = get(&mut c, "/health").await;
    assert_eq!((g.status, g.body.as_str()), (200, "fine"));
    let g = get(&mut c, "/old?x=1").await;
    assert_eq!(g.status, 301);
    assert_eq!(g.headers["location"], "http://new.example/new?x=1");
    assert_eq!(get(&mut c, "/nothing").await.status, 404, "no route: NR");
    assert_eq!(get(&mut c, "/gone").await.status, 503, "no cluster: NC");
    c.ready().await.unwrap();
    let req = Request::get("/health")
        .header("host", "other")
        .body(text(""))
        .unwrap();
    assert_eq!(
        c.send_request(req).await.unwrap().status(),
        404,
        "no virtual host"
    );
}

#[tokio::test]
async fn http1_upstream_connections_are_kept_alive_and_reused() {
    let up = named("up").await;
    let p = proxy(simple(vec![cluster("c", &[up.addr])], to(&[("c", 1)]))).await;
    for _ in 0..3 {
        let mut c = client(p.addr).await;
        for _ in 0..10 {
            assert_eq!(get(&mut c, "/").await.status, 200);
        }
    }
    assert_eq!(up.conns.load(Ordering::Relaxed), 1);
    assert_eq!(
        p.metrics.requests_where(|l| l.destination_cluster == "c"),
        30
    );
}

#[tokio::test]
async fn pick_endpoint_balances_l4_clusters() {
    let a: SocketAddr = "10.1.0.1:80".parse().unwrap();
    let b: SocketAddr = "10.1.0.2:80".parse().unwrap();
    let p = {
        let (tx, rx) = watch::channel(Arc::new(simple(vec![cluster("tcp", &[a, b])], to(&[]))));
        (L7::new(rx, Arc::new(L7Metrics::default())), tx)
    };
    let picks: Vec<_> = (0..4).map(|_| p.0.pick_endpoint("tcp").unwrap()).collect();
    assert_eq!(picks.iter().filter(|x| **x == a).count(), 2);
    assert!(p.0.pick_endpoint("nope").is_none());
}

#[tokio::test]
async fn h2c_upgrade_is_answered_over_http1_without_the_upgrade() {
    let up = echo().await;
    let p = proxy(simple(vec![cluster("c", &[up.addr])], to(&[("c", 1)]))).await;
    let out = raw(
        p.addr,
        b"GET /x HTTP/1.1\r\nHost: svc.test\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("path=/x"), "{out}");
    assert!(
        !out.contains("upgrade=") && !out.contains("http2-settings="),
        "{out}"
    );
}

/// An endpoint speaking `echo-proto` after a `101`: `/echo` switches, sends
/// `server-early`, echoes until the client's end and then sends `bye`; `/cut` switches and
/// resets after a few bytes; `/decline` answers 426; anything else 200 with `x-conn`, the
/// connection's number. Counts connections, and declined ones the proxy then closed.
async fn proto_endpoint() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (conns, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (c, d) = (conns.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let id = c.fetch_add(1, Ordering::Relaxed) + 1;
            let closed = d.clone();
            tokio::spawn(async move {
                loop {
                    let head = read_head(&mut s).await.to_ascii_lowercase();
                    if head.is_empty() {
                        return;
                    }
                    let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                    let asked = head.contains("\r\nupgrade: echo-proto\r\n")
                        && head.contains("\r\nconnection: upgrade\r\n");
                    match path.as_str() {
                        "/echo" | "/cut" if asked => {
                            s.write_all(
                                b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n\
                                  upgrade: echo-proto\r\n\r\nserver-early",
                            )
                            .await
                            .unwrap();
                            if path == "/cut" {
                                let mut b = [0u8; 16];
                                let _ = s.read_exact(&mut b).await;
                                let _ = crate::sys::set_linger_zero(std::os::fd::AsFd::as_fd(&s));
                                return;
                            }
                            crate::proxy::testing::echo_then_bye(&mut s).await;
                            let _ = s.read(&mut [0u8; 1]).await;
                            return;
                        }
                        "/decline" => {
                            s.write_all(
                                b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 2\r\n\r\nno",
                            )
                            .await
                            .unwrap();
                            if matches!(s.read(&mut [0u8; 1]).await, Ok(0)) {
                                closed.fetch_add(1, Ordering::Relaxed);
                            }
                            return;
                        }
                        _ => {
                            let body = format!("conn {id}");
                            let r = format!(
                                "HTTP/1.1 200 OK\r\nx-conn: {id}\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            s.write_all(r.as_bytes()).await.unwrap();
                        }
                    }
                }
            });
        }
    });
    (addr, conns, closed)
}

/// A head up to its empty line, byte by byte (nothing read past it); empty at EOF.
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b).await {
            Ok(1) => head.push(b[0]),
            _ => return String::new(),
        }
    }
    String::from_utf8(head).unwrap()
}

/// A response's head and `content-length` body, read from `s`.
async fn read_response(s: &mut TcpStream) -> (String, String) {
    let head = read_head(s).await.to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |l| l.parse().unwrap());
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    (head, String::from_utf8(body).unwrap())
}

const UPGRADE_HEAD: &str = "host: svc.test\r\nconnection: Upgrade\r\nupgrade: echo-proto\r\n\r\n";

#[tokio::test]
async fn an_upgrade_is_spliced_on_a_connection_of_its_own_and_never_pooled() {
    let (up, conns, closed) = proto_endpoint().await;
    let p = proxy(simple(vec![cluster("c", &[up])], to(&[("c", 1)]))).await;
    let plain = |mut s: TcpStream| async move {
        s.write_all(b"GET /plain HTTP/1.1\r\nhost: svc.test\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = read_response(&mut s).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        (body, s)
    };
    // A plain request: upstream connection 1, pooled.
    let (body, _keep) = plain(TcpStream::connect(p.addr).await.unwrap()).await;
    assert_eq!(body, "conn 1");

    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(format!("GET /echo HTTP/1.1\r\n{UPGRADE_HEAD}client-early").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("\r\nupgrade: echo-proto\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
    let mut early = [0u8; 12];
    s.read_exact(&mut early).await.unwrap();
    assert_eq!(&early, b"server-early");
    // 2 MiB each way at once, then the client's half-close, then the endpoint's `bye`.
    crate::proxy::testing::echo_through_splice(s, b"client-early", 2 << 20).await;
    assert_eq!(conns.load(Ordering::Relaxed), 2, "an upgrade opens its own");

    // A plain request after it uses the pooled connection, not the upgraded one.
    let (body, _) = plain(TcpStream::connect(p.addr).await.unwrap()).await;
    assert_eq!(body, "conn 1");

    // Declined: the 426 is relayed, the client's connection stays HTTP, and the upstream
    // connection is closed instead of pooled.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(format!("GET /decline HTTP/1.1\r\n{UPGRADE_HEAD}").as_bytes())
        .await
        .unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("http/1.1 426"), "{head}");
    assert_eq!(body, "no");
    assert!(!head.contains("\r\nupgrade:"), "{head}");
    let (body, _) = plain(s).await;
    assert_eq!(body, "conn 1");
    for _ in 0..100 {
        if closed.load(Ordering::Relaxed) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        closed.load(Ordering::Relaxed),
        1,
        "the declined connection closed"
    );
    assert_eq!(conns.load(Ordering::Relaxed), 3);

    // The endpoint resets the upgraded stream: the client sees a reset, not a clean end.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(format!("GET /cut HTTP/1.1\r\n{UPGRADE_HEAD}").as_bytes())
        .await
        .unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 101"));
    s.write_all(&[7u8; 64]).await.unwrap();
    let mut got = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .expect("the stream ended");
    let e = end.expect_err("a reset, not a clean end");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");

    // Each stream counted as a request answered 101 when it ended.
    let mut counted = 0;
    for _ in 0..100 {
        counted = p.metrics.requests_where(|l| l.response_code == 101);
        if counted == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(counted, 2);
}

#[tokio::test]
async fn connect_is_answered_404_and_never_reaches_the_endpoint() {
    let (up, conns, _) = proto_endpoint().await;
    // A catch-all regex route: even it does not take a CONNECT.
    let mut vh = vhost(vec![route("/", RouteAction::Forward(to(&[("c", 1)])))]);
    vh.routes[0].matcher.path = PathMatch::Regex(regex_lite::Regex::new(".*").unwrap());
    let p = proxy(config(http_listener(vh), vec![cluster("c", &[up])])).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"CONNECT svc.test:443 HTTP/1.1\r\nhost: svc.test:443\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("http/1.1 404"), "{head}");
    // The connection stays HTTP.
    s.write_all(b"GET /plain HTTP/1.1\r\nhost: svc.test\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, "conn 1");
    assert_eq!(conns.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_switch_to_a_protocol_not_offered_is_a_502() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        read_head(&mut s).await;
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: other\r\n\r\n",
        )
        .await
        .unwrap();
        let _ = s.read(&mut [0u8; 1]).await;
    });
    let p = proxy(simple(vec![cluster("c", &[up])], to(&[("c", 1)]))).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(format!("GET /x HTTP/1.1\r\n{UPGRADE_HEAD}").as_bytes())
        .await
        .unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("http/1.1 502"), "{head}");
    assert_eq!(body, "upstream switched to a protocol not offered");
}

#[tokio::test]
async fn detect_then_serve_sniffed_for_listeners_with_a_tcp_fallback() {
    let up = named("up").await;
    let (_config, rx) = watch::channel(Arc::new(simple(
        vec![cluster("c", &[up.addr])],
        to(&[("c", 1)]),
    )));
    let l7 = L7::new(rx, Arc::new(L7Metrics::default()));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (_drain, watch) = crate::lifecycle::drain::new();
    tokio::spawn(
        async move {
            while let Ok((mut s, _)) = l.accept().await {
                let l7 = l7.clone();
                let watch = watch.clone();
                tokio::spawn(async move {
                    let (prefix, v) = detect(&mut s, Duration::from_secs(1)).await.unwrap();
                    if v == Sniffed::Opaque {
                        // Stands in for the caller's TCP relay to the fallback cluster.
                        s.write_all(b"opaque:").await.unwrap();
                        s.write_all(&prefix).await.unwrap();
                        return;
                    }
                    l7.serve_sniffed(s, prefix, v, VIP, "test/client".into(), watch)
                        .await;
                });
            }
        }
        .instrument(tracing::debug_span!("test_fallback_listener")),
    );
    let mut c = client(addr).await;
    assert_eq!(get(&mut c, "/").await.body, "up");
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::Builder::new(SpanExec)
        .handshake::<_, ProxyBody>(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn.instrument(tracing::debug_span!("test_h2_client")));
    let req = Request::get("http://svc.test/").body(text("")).unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "up");
    let out = raw(addr, b"\x16\x03\x01\x00\x05hello").await;
    assert!(out.starts_with("opaque:\u{16}\u{3}"), "{out:?}");
}

#[tokio::test]
async fn grpc_unavailable_is_retried_with_the_request_replayed() {
    let unavailable = upstream(true, |req: Request<Incoming>| async move {
        let _ = req.into_body().collect().await;
        // Trailers-only: the status in the head, no body.
        let mut r = grpc_reply(text(""));
        r.headers_mut()
            .insert("grpc-status", HeaderValue::from_static("14"));
        r
    })
    .await;
    let ok = upstream(true, |req: Request<Incoming>| async move {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let (tx, rx) = mpsc::channel(2);
        tx.send(Frame::data(body)).await.unwrap();
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        tx.send(Frame::trailers(t)).await.unwrap();
        grpc_reply(chan(rx))
    })
    .await;
    let policy = retry(
        RetryOn {
            grpc_unavailable: true,
            ..RetryOn::default()
        },
        2,
    );
    let p = h2_cluster_proxy(&[unavailable.addr, ok.addr], Some(policy)).await;
    let s = TcpStream::connect(p.addr).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::Builder::new(SpanExec)
        .handshake::<_, ChanBody>(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn.instrument(tracing::debug_span!("test_h2_client")));
    for i in 0..6 {
        // No content-length, as gRPC clients send: the body is recorded as it streams.
        let (tx, rx) = mpsc::channel(1);
        tx.send(Frame::data(Bytes::from(format!("msg-{i}"))))
            .await
            .unwrap();
        drop(tx);
        let req = Request::post("http://svc.test/pkg.Svc/Call")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(ChanBody(rx))
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert!(resp.headers().get("grpc-status").is_none(), "not the 14");
        let got = resp.into_body().collect().await.unwrap();
        assert_eq!(got.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(got.to_bytes(), format!("msg-{i}"));
    }
}

#[tokio::test]
async fn a_push_that_removes_a_cluster_drops_its_runtime_state() {
    let up = named("up").await;
    let p = proxy(simple(
        vec![cluster("gone", &[up.addr])],
        to(&[("gone", 1)]),
    ))
    .await;
    let mut c = client(p.addr).await;
    assert_eq!(get(&mut c, "/").await.status, 200);
    let kept = named("kept").await;
    p.config.send_replace(Arc::new(simple(
        vec![cluster("kept", &[kept.addr])],
        to(&[("kept", 1)]),
    )));
    assert_eq!(get(&mut c, "/").await.body, "kept");
    // The removed cluster's pooled connection is closed, not kept forever.
    tokio::time::timeout(Duration::from_secs(2), async {
        while up.closed.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the idle upstream connection is closed");
}

/// Sends `bytes`, closes the write half (a client gone mid-body), returns all the proxy
/// answered.
async fn raw_then_close(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the proxy closes the connection")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn eject_after(consecutive_5xx: u32) -> OutlierDetection {
    OutlierDetection {
        consecutive_5xx,
        base_ejection_time: Duration::from_secs(60),
        max_ejection_percent: 100,
        interval: Duration::from_secs(10),
    }
}

#[tokio::test]
async fn a_malformed_request_body_gets_400_and_is_not_held_against_the_endpoint() {
    // hyper reports a failed request body differently per upstream codec (the request's
    // error over HTTP/1.1, a bare stream reset over HTTP/2): both are the client's.
    for (h2, protocol) in [
        (false, UpstreamProtocol::Http1),
        (true, UpstreamProtocol::Http2),
    ] {
        let up = upstream(h2, |req: Request<Incoming>| async move {
            match req.into_body().collect().await {
                Ok(b) => reply(200, b.to_bytes()),
                Err(_) => reply(500, "body failed"),
            }
        })
        .await;
        let mut cl = cluster("c", &[up.addr]);
        cl.protocol = protocol;
        cl.outlier = Some(eject_after(2));
        let mut fwd = to(&[("c", 1)]);
        // Retrying would not help: the body is broken for every try.
        fwd.retry_policy = Some(Arc::new(retry(
            RetryOn {
                reset: true,
                ..RetryOn::default()
            },
            2,
        )));
        let p = proxy(simple(vec![cl], fwd)).await;
        for _ in 0..6 {
            let out = raw(
                p.addr,
                b"POST / HTTP/1.1\r\nHost: svc.test\r\nTransfer-Encoding: chunked\r\n\r\n\
                  5\r\nhello\r\nzz\r\n",
            )
            .await;
            assert!(out.starts_with("HTTP/1.1 400"), "{protocol:?}: {out}");
        }
        // Shorter than its content-length: the client went away mid-body.
        for _ in 0..3 {
            let out = raw_then_close(
                p.addr,
                b"POST / HTTP/1.1\r\nHost: svc.test\r\nContent-Length: 100\r\n\r\nshort",
            )
            .await;
            assert!(out.starts_with("HTTP/1.1 400"), "{protocol:?}: {out}");
        }
        let mut c = client(p.addr).await;
        let g = call(&mut c, "POST", "/", &[], "fine").await;
        assert_eq!(
            (g.status, g.body.as_str()),
            (200, "fine"),
            "{protocol:?}: the endpoint is still in rotation"
        );
        let mut out = String::new();
        p.metrics.render(&mut out);
        assert!(
            !out.contains("mesh_outlier_ejections_total{cluster=\"c\"}"),
            "{protocol:?}: {out}"
        );
        assert!(
            !out.contains("mesh_retries_total{cluster=\"c\"}"),
            "{protocol:?}: {out}"
        );
    }
}

#[tokio::test]
async fn ejections_end_when_the_outlier_policy_changes_or_goes() {
    let bad = upstream(false, |_| async { reply(500, "bad") }).await;
    let with = |od: Option<OutlierDetection>| {
        let mut cl = cluster("c", &[bad.addr]);
        cl.outlier = od;
        Arc::new(simple(vec![cl], to(&[("c", 1)])))
    };
    let p = proxy(ProxyConfig::default()).await;
    p.config.send_replace(with(Some(eject_after(2))));
    let mut c = client(p.addr).await;
    for _ in 0..2 {
        assert_eq!(get(&mut c, "/").await.body, "bad");
    }
    assert_eq!(get(&mut c, "/").await.body, "no healthy upstream");
    // A different policy: the old one's ejection ends, the new one's threshold applies.
    p.config.send_replace(with(Some(eject_after(3))));
    for _ in 0..3 {
        assert_eq!(get(&mut c, "/").await.body, "bad");
    }
    assert_eq!(get(&mut c, "/").await.body, "no healthy upstream");
    // No policy: nothing keeps the endpoint out.
    p.config.send_replace(with(None));
    for _ in 0..5 {
        assert_eq!(get(&mut c, "/").await.body, "bad");
    }
}

#[tokio::test]
async fn the_config_dump_shows_ejected_endpoints() {
    let bad = upstream(false, |_| async { reply(500, "bad") }).await;
    let good = named("good").await;
    let mut cl = cluster("c", &[bad.addr, good.addr]);
    cl.outlier = Some(eject_after(1));
    let p = proxy(simple(vec![cl], to(&[("c", 1)]))).await;
    let endpoints = |p: &Proxy| -> Vec<serde_json::Value> {
        let dump = p.l7.config_dump();
        let c = &dump["clusters"][0];
        assert_eq!(c["name"], "c");
        c["endpoints"].as_array().unwrap().clone()
    };
    for e in endpoints(&p) {
        assert_eq!(e["health"], "Healthy", "{e}");
    }
    let mut c = client(p.addr).await;
    for _ in 0..4 {
        get(&mut c, "/").await;
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let eps = endpoints(&p);
    let (ejected, healthy): (Vec<_>, Vec<_>) = eps
        .iter()
        .partition(|e| e["address"] == bad.addr.to_string());
    assert_eq!(ejected[0]["health"], "Ejected", "{eps:?}");
    assert_eq!(ejected[0]["configured_health"], "Healthy", "{eps:?}");
    let until = ejected[0]["ejected_until_unix_ms"].as_u64().unwrap();
    assert!(
        (now_ms + 50_000..=now_ms + 61_000).contains(&until),
        "{until} vs now {now_ms}"
    );
    assert_eq!(healthy[0]["health"], "Healthy", "{eps:?}");
    assert!(healthy[0].get("ejected_until_unix_ms").is_none(), "{eps:?}");
    // Without a policy, the dump says so at once, not after the next request.
    let mut cl = cluster("c", &[bad.addr, good.addr]);
    cl.outlier = None;
    p.config
        .send_replace(Arc::new(simple(vec![cl], to(&[("c", 1)]))));
    for e in endpoints(&p) {
        assert_eq!(e["health"], "Healthy", "{e}");
    }
}

/// An upstream that answers `/slow` only when the test says so.
async fn gated() -> (Upstream, mpsc::Sender<()>, mpsc::Receiver<()>) {
    let (arrived_tx, arrived_rx) = mpsc::channel::<()>(4);
    let (go_tx, go_rx) = mpsc::channel::<()>(4);
    let go_rx = Arc::new(tokio::sync::Mutex::new(go_rx));
    let up = upstream(false, move |req: Request<Incoming>| {
        let (arrived, go) = (arrived_tx.clone(), go_rx.clone());
        async move {
            if req.uri().path() == "/slow" {
                let _ = arrived.send(()).await;
                go.lock().await.recv().await;
            }
            reply(200, "done")
        }
    })
    .await;
    (up, go_tx, arrived_rx)
}

#[tokio::test]
async fn a_drain_closes_http1_after_the_response_in_flight() {
    let (up, go, mut arrived) = gated().await;
    let p = proxy(simple(vec![cluster("c", &[up.addr])], to(&[("c", 1)]))).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut buf = vec![0u8; 4096];
    s.write_all(b"GET /fast HTTP/1.1\r\nhost: svc.test\r\n\r\n")
        .await
        .unwrap();
    let n = s.read(&mut buf).await.unwrap();
    let first = String::from_utf8_lossy(&buf[..n]).to_lowercase();
    assert!(first.starts_with("http/1.1 200"), "{first}");
    assert!(!first.contains("connection: close"), "kept alive: {first}");
    // The next request is in flight when the drain begins.
    s.write_all(b"GET /slow HTTP/1.1\r\nhost: svc.test\r\n\r\n")
        .await
        .unwrap();
    arrived.recv().await.unwrap();
    p.drain.start();
    tokio::time::sleep(Duration::from_millis(50)).await;
    go.send(()).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the proxy closes the connection after the response")
        .expect("a clean close, not a reset");
    let second = String::from_utf8_lossy(&rest).to_lowercase();
    assert!(second.starts_with("http/1.1 200"), "{second}");
    assert!(second.contains("connection: close"), "{second}");
    assert!(second.ends_with("done"), "the whole response: {second}");
}

#[tokio::test]
async fn a_drain_sends_goaway_on_h2_and_finishes_the_open_stream() {
    let (up, go, mut arrived) = gated().await;
    let p = proxy(simple(vec![cluster("c", &[up.addr])], to(&[("c", 1)]))).await;
    let s = TcpStream::connect(p.addr).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::Builder::new(SpanExec)
        .handshake::<_, ProxyBody>(TokioIo::new(s))
        .await
        .unwrap();
    let conn = tokio::spawn(conn.instrument(tracing::debug_span!("test_h2_client")));
    let req = |path: &str| {
        Request::get(format!("http://svc.test{path}"))
            .body(empty())
            .unwrap()
    };
    let slow = h2.send_request(req("/slow"));
    let slow = tokio::spawn(async move { slow.await.map(|r| r.status().as_u16()) });
    arrived.recv().await.unwrap();
    p.drain.start();
    // The GOAWAY reaches the client while the stream is open: new streams are refused.
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if h2.ready().await.is_err() || h2.send_request(req("/fast")).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("no new stream after the GOAWAY");
    assert!(!slow.is_finished(), "the open stream is not cut");
    go.send(()).await.unwrap();
    assert_eq!(slow.await.unwrap().unwrap(), 200);
    // Then the connection ends cleanly.
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the connection closes")
        .unwrap()
        .expect("without error");
}

/// Stands in for `Secure`: every endpoint is a mesh workload of another node; clients are
/// known by address (`ids`: an identity to tunnel as, or `None` to be denied); `open`
/// dials the endpoint over loopback (no TLS) and records who asked.
struct FakeMesh {
    mesh: Arc<MeshConfig>,
    ids: HashMap<Ipv4Addr, Option<&'static str>>,
    /// (source service account, authority) of every tunnel opened.
    opened: Mutex<Vec<(String, SocketAddr)>>,
    /// Endpoints whose tunnel cannot be opened.
    broken: Vec<SocketAddr>,
}

impl FakeMesh {
    fn new(endpoints: &[SocketAddr], ids: &[(Ipv4Addr, Option<&'static str>)]) -> Arc<FakeMesh> {
        use crate::proxy::config::workloads::{WorkloadIndex, WorkloadInfo};
        let workloads: Vec<Arc<WorkloadInfo>> = endpoints
            .iter()
            .enumerate()
            .map(|(i, a)| {
                Arc::new(WorkloadInfo {
                    uid: format!("server-{i}"),
                    name: format!("server-{i}"),
                    namespace: "backend".into(),
                    ips: vec![a.ip()],
                    identity: crate::identity::SpiffeId::new("cluster.local", "backend", "echo")
                        .unwrap(),
                    node: "node-1".into(),
                    hbone: true,
                    authorization_policies: vec![],
                    peer_authentications: vec![],
                    telemetry: Default::default(),
                })
            })
            .collect();
        Arc::new(FakeMesh {
            mesh: Arc::new(MeshConfig {
                workloads: WorkloadIndex::new(&workloads),
                policies: Default::default(),
                version: 1,
            }),
            ids: ids.iter().copied().collect(),
            opened: Mutex::default(),
            broken: vec![],
        })
    }

    fn opened(&self) -> Vec<(String, SocketAddr)> {
        self.opened.lock().unwrap().clone()
    }
}

impl MeshPaths for FakeMesh {
    fn mesh_now(&self) -> Arc<MeshConfig> {
        self.mesh.clone()
    }

    fn path(&self, client: IpAddr, target: SocketAddr) -> Path {
        let Some(dst) = self.mesh.workloads.by_ip(target.ip()) else {
            return Path::Plain;
        };
        let IpAddr::V4(client) = client else {
            return Path::Plain;
        };
        match self.ids.get(&client) {
            None => Path::Plain,
            Some(None) => Path::Denied(crate::proxy::authz::Verdict {
                allowed: false,
                policy_name: Some("backend/deny".into()),
                reason: crate::proxy::authz::Reason::Denied,
            }),
            Some(Some(sa)) => Path::Tunnel {
                src: crate::identity::SpiffeId::new("cluster.local", "shop", sa).unwrap(),
                dst: dst.clone(),
                hbone: SocketAddr::new(target.ip(), 15008),
            },
        }
    }

    fn open<'a>(&'a self, t: &'a Tunnel, authority: SocketAddr) -> OpenFuture<'a> {
        Box::pin(async move {
            // Who the tunnel speaks as and the source address its CONNECT names.
            self.opened.lock().unwrap().push((
                format!("{}@{}", t.src.service_account(), t.source),
                authority,
            ));
            if self.broken.contains(&authority) {
                return Err(HboneError::Connect {
                    addr: t.hbone,
                    source: io::ErrorKind::ConnectionRefused.into(),
                });
            }
            let s = TcpStream::connect(authority)
                .await
                .map_err(|source| HboneError::Connect {
                    addr: t.hbone,
                    source,
                })?;
            Ok(Box::new(s) as BoxIo)
        })
    }
}

/// The engine with `mesh` as its zero-trust path; one listener per client address given,
/// each serving its connections as coming from that address.
async fn mesh_proxy(
    cfg: ProxyConfig,
    mesh: Arc<FakeMesh>,
    clients: &[Ipv4Addr],
) -> (
    Vec<SocketAddr>,
    watch::Sender<Arc<ProxyConfig>>,
    crate::lifecycle::drain::DrainTrigger,
) {
    let (config, rx) = watch::channel(Arc::new(cfg));
    let l7 = L7::new(rx, Arc::new(L7Metrics::default()));
    l7.set_paths(mesh);
    let (drain, watch) = crate::lifecycle::drain::new();
    let mut addrs = Vec::new();
    for ip in clients {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(l.local_addr().unwrap());
        let (l7, watch, ip) = (l7.clone(), watch.clone(), *ip);
        tokio::spawn(
            async move {
                while let Ok((s, _)) = l.accept().await {
                    let client = Client {
                        name: format!("test/{ip}"),
                        ip: Some(ip.into()),
                        peer: None,
                        skmsg: false,
                    };
                    tokio::spawn(l7.clone().serve(s, VIP, client, watch.clone()));
                }
            }
            .instrument(tracing::debug_span!("test_mesh_proxy", %ip)),
        );
    }
    (addrs, config, drain)
}

const WEB_1: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const BATCH: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// Another pod of `web`'s service account.
const WEB_2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
const DENIED: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 4);
/// Not a mesh workload.
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);

#[tokio::test]
async fn mesh_endpoints_are_reached_through_tunnels_pooled_per_source_workload() {
    for h2 in [false, true] {
        let up = upstream(h2, |_| async { reply(200, "up") }).await;
        let mesh = FakeMesh::new(
            &[up.addr],
            &[
                (WEB_1, Some("web")),
                (BATCH, Some("batch")),
                (WEB_2, Some("web")),
                (DENIED, None),
            ],
        );
        let mut c = cluster("c", &[up.addr]);
        if h2 {
            c.protocol = UpstreamProtocol::Http2;
        }
        let (addrs, _config, _drain) = mesh_proxy(
            simple(vec![c], to(&[("c", 1)])),
            mesh.clone(),
            &[WEB_1, BATCH, WEB_2, DENIED, OUTSIDE],
        )
        .await;
        // web, then batch, then web's other pod: sequential, so web's connection is idle
        // again when its second pod asks, and still not given to it: its tunnel names
        // the first pod's address as the source (`Forwarded: for=`).
        for addr in &addrs[..3] {
            let mut c = client(*addr).await;
            for _ in 0..5 {
                assert_eq!(get(&mut c, "/").await.status, 200, "h2: {h2}");
            }
        }
        // Five requests of each client again, on new downstream connections: the pools
        // hold, nothing new is opened.
        for addr in &addrs[..3] {
            let mut c = client(*addr).await;
            assert_eq!(get(&mut c, "/").await.status, 200, "h2: {h2}");
        }
        assert_eq!(
            mesh.opened(),
            vec![
                (format!("web@{WEB_1}"), up.addr),
                (format!("batch@{BATCH}"), up.addr),
                (format!("web@{WEB_2}"), up.addr)
            ],
            "one tunnel per source workload, naming its address (h2: {h2})"
        );
        assert_eq!(up.conns.load(Ordering::Relaxed), 3, "h2: {h2}");
        // Policy refuses this client: 403, and nothing is dialled.
        let mut c = client(addrs[3]).await;
        let got = get(&mut c, "/").await;
        assert_eq!(
            (got.status, got.body.as_str()),
            (403, "RBAC: access denied")
        );
        // A client the mesh does not know goes plain, on a connection of its own.
        let mut c = client(addrs[4]).await;
        assert_eq!(get(&mut c, "/").await.status, 200);
        assert_eq!(mesh.opened().len(), 3, "h2: {h2}");
        assert_eq!(up.conns.load(Ordering::Relaxed), 4, "h2: {h2}");
    }
}

#[tokio::test]
async fn a_tunnel_that_cannot_open_is_a_connect_failure_and_is_retried() {
    let broken = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let good = named("good").await;
    let mut mesh = FakeMesh::new(&[broken, good.addr], &[(WEB_1, Some("web"))]);
    Arc::get_mut(&mut mesh).unwrap().broken = vec![broken];
    let mut fwd = to(&[("c", 1)]);
    fwd.retry_policy = Some(Arc::new(retry(
        RetryOn {
            connect_failure: true,
            ..RetryOn::default()
        },
        1,
    )));
    let (addrs, config, _drain) = mesh_proxy(
        simple(vec![cluster("c", &[broken, good.addr])], fwd),
        mesh.clone(),
        &[WEB_1],
    )
    .await;
    let mut c = client(addrs[0]).await;
    for _ in 0..4 {
        assert_eq!(get(&mut c, "/").await.body, "good");
    }
    assert!(mesh.opened().iter().any(|(_, a)| *a == broken));
    // Without retries, the failure reaches the client as Envoy's connection failure.
    config.send_replace(Arc::new(simple(
        vec![cluster("c", &[broken])],
        to(&[("c", 1)]),
    )));
    let got = get(&mut c, "/").await;
    assert_eq!(got.status, 503);
    assert!(got.body.contains("connection failure"), "{}", got.body);
}

#[tokio::test]
async fn at_the_connection_limit_another_identitys_idle_connection_makes_room() {
    let up = named("up").await;
    let mesh = FakeMesh::new(&[up.addr], &[(WEB_1, Some("web")), (BATCH, Some("batch"))]);
    let mut c = cluster("c", &[up.addr]);
    c.circuit_breaker.max_connections = 1;
    let (addrs, _config, _drain) = mesh_proxy(
        simple(vec![c], to(&[("c", 1)])),
        mesh.clone(),
        &[WEB_1, BATCH],
    )
    .await;
    for round in 0..2 {
        for addr in &addrs {
            let mut c = client(*addr).await;
            let got = tokio::time::timeout(Duration::from_secs(5), get(&mut c, "/"))
                .await
                .unwrap_or_else(|_| {
                    panic!("round {round}: waited on the other identity's idle connection")
                });
            assert_eq!(got.body, "up");
        }
    }
    assert_eq!(mesh.opened().len(), 4, "{:?}", mesh.opened());
    assert_eq!(up.conns.load(Ordering::Relaxed), 4);
}

/// The access log's view of requests: what ran, what it tried, why it failed.
#[tokio::test]
async fn access_log_lines_carry_route_attempts_bytes_and_flags() {
    use crate::proxy::accesslog::{AccessLog, Flags};
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let good = echo().await;
    let fwd = || {
        let mut f = to(&[("c", 1)]);
        f.retry_policy = Some(Arc::new(retry(
            RetryOn {
                connect_failure: true,
                ..RetryOn::default()
            },
            1,
        )));
        f
    };
    let p = proxy(simple(vec![cluster("c", &[good.addr])], fwd())).await;
    let (log, rx) = AccessLog::for_tests();
    p.l7.set_access_log(log);
    let next = || rx.recv_timeout(Duration::from_secs(5)).expect("a line");
    let mut c = client(p.addr).await;

    let g = call(&mut c, "POST", "/items?id=7", &[], "0123456789").await;
    assert_eq!(g.status, 200);
    let e = next();
    let h = e.http.as_ref().unwrap();
    assert_eq!(
        (
            h.method.as_str(),
            h.path.as_str(),
            h.response_code,
            h.attempts
        ),
        ("POST", "/items?id=7", 200, 1)
    );
    assert_eq!(e.upstream_host, Some(good.addr));
    assert_eq!(e.upstream_cluster.as_deref(), Some("c"));
    assert!(e.route_name.is_some(), "{e:?}");
    assert_eq!(e.source_workload.as_deref(), Some("test/client"));
    assert_eq!(e.destination_address, Some(VIP));
    assert_eq!(e.bytes_received, Some(10));
    assert_eq!(e.bytes_sent, Some(g.body.len() as u64));
    assert!(e.response_flags.is_empty(), "{e:?}");

    // Every try refused: two attempts, then 503 UF with the retries exhausted.
    p.config
        .send_replace(Arc::new(simple(vec![cluster("c", &[dead])], fwd())));
    assert_eq!(get(&mut c, "/").await.status, 503);
    let e = next();
    assert_eq!(e.http.as_ref().unwrap().attempts, 2, "{e:?}");
    assert_eq!(e.upstream_host, Some(dead));
    assert!(e.response_flags.contains(Flags::UF), "{e:?}");
    assert!(e.response_flags.contains(Flags::URX), "{e:?}");
    assert!(e.connection_termination_details.is_some(), "{e:?}");

    // No endpoint at all: UH, nothing tried.
    p.config
        .send_replace(Arc::new(simple(vec![cluster("c", &[])], to(&[("c", 1)]))));
    assert_eq!(get(&mut c, "/").await.status, 503);
    let e = next();
    assert_eq!(e.response_flags, Flags::UH, "{e:?}");
    assert_eq!(e.http.as_ref().unwrap().attempts, 0, "{e:?}");
    assert_eq!(e.upstream_host, None);
    assert!(rx.try_recv().is_err(), "one line per request");
}

/// Traces (`proxy::trace`): the engine's hooks make a server span per request and a client
/// span per try, and the upstream gets the answering try as its parent.
#[tokio::test]
async fn spans_per_request_and_try_with_the_context_sent_upstream() {
    use opentelemetry::trace::SpanKind;

    use crate::proxy::trace::Tracer;
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let good = echo().await;
    let fwd = || {
        let mut f = to(&[("c", 1)]);
        f.retry_policy = Some(Arc::new(retry(
            RetryOn {
                connect_failure: true,
                ..RetryOn::default()
            },
            1,
        )));
        f
    };
    let p = proxy(simple(vec![cluster("c", &[good.addr])], fwd())).await;
    let (tracer, rx) = Tracer::for_tests(0.0);
    p.l7.set_tracer(tracer);
    let next = || rx.recv_timeout(Duration::from_secs(5)).expect("a span");
    let mut c = client(p.addr).await;
    let tid = "4bf92f3577b34da6a3ce929d0e0e4736";
    let tp = format!("00-{tid}-00f067aa0ba902b7-01");

    // Sampled by the caller (the ratio is 0): one try, its context upstream.
    let g = call(&mut c, "GET", "/a", &[("traceparent", &tp)], "").await;
    assert_eq!(g.status, 200);
    let (t, s) = (next(), next());
    assert_eq!(
        (t.span_kind.clone(), s.span_kind.clone()),
        (SpanKind::Client, SpanKind::Server)
    );
    assert_eq!(t.parent_span_id, s.span_context.span_id());
    assert_eq!(format!("{:032x}", s.span_context.trace_id()), tid);
    assert!(
        g.body.contains(&format!(
            "traceparent=00-{tid}-{}-01",
            t.span_context.span_id()
        )),
        "{}",
        g.body
    );

    // Both tries refused: two client spans in error, the request's span a 503.
    p.config
        .send_replace(Arc::new(simple(vec![cluster("c", &[dead])], fwd())));
    assert_eq!(
        call(&mut c, "GET", "/b", &[("traceparent", &tp)], "")
            .await
            .status,
        503
    );
    let spans = [next(), next(), next()];
    let kinds: Vec<SpanKind> = spans.iter().map(|s| s.span_kind.clone()).collect();
    assert_eq!(
        kinds,
        [SpanKind::Client, SpanKind::Client, SpanKind::Server]
    );
    for t in &spans[..2] {
        assert_eq!(t.parent_span_id, spans[2].span_context.span_id());
        assert!(
            matches!(t.status, opentelemetry::trace::Status::Error { .. }),
            "{t:?}"
        );
    }

    // Not sampled by the caller: nothing recorded, the header passes as it came.
    p.config
        .send_replace(Arc::new(simple(vec![cluster("c", &[good.addr])], fwd())));
    let quiet = format!("00-{tid}-00f067aa0ba902b7-00");
    let g = call(&mut c, "GET", "/c", &[("traceparent", &quiet)], "").await;
    assert!(
        g.body.contains(&format!("traceparent={quiet}")),
        "{}",
        g.body
    );
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
}

/// An upstream speaking raw bytes: on every connection it reads request heads and answers
/// each with the next of `answers` (shared by its connections, in order), closing the
/// connection after an answer when `close` says so. Counts the connections it accepted.
async fn raw_upstream(answers: Vec<&'static [u8]>, close: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let answers = Arc::new(Mutex::new(std::collections::VecDeque::from(answers)));
    let c = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            c.fetch_add(1, Ordering::Relaxed);
            let answers = answers.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        let mut b = [0u8; 1024];
                        match s.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&b[..n]),
                        }
                    }
                    buf.clear();
                    let Some(a) = answers.lock().unwrap().pop_front() else {
                        return;
                    };
                    if s.write_all(a).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    (addr, conns)
}

#[tokio::test]
async fn a_malformed_upstream_response_is_a_502_and_its_connection_is_not_reused() {
    let (addr, conns) = raw_upstream(
        vec![
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n"[..],
            &b"HTTP/1.1 2xx Nope\r\n\r\n"[..],
            // Interim answers are skipped; the final one comes through.
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"[..],
            &b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nyes"[..],
        ],
        false,
    )
    .await;
    let p = proxy(simple(vec![cluster("c", &[addr])], to(&[("c", 1)]))).await;
    let mut c = client(p.addr).await;
    let g = get(&mut c, "/").await;
    assert_eq!(g.status, 502, "{}", g.body);
    assert!(g.body.contains("protocol error"), "{}", g.body);
    assert_eq!(get(&mut c, "/").await.status, 502);
    let g = get(&mut c, "/").await;
    assert_eq!((g.status, g.body.as_str()), (200, "ok"));
    let g = get(&mut c, "/").await;
    assert_eq!((g.status, g.body.as_str()), (200, "yes"));
    // Each malformed answer cost its connection; the good ones shared the third.
    assert_eq!(conns.load(Ordering::Relaxed), 3);
}

#[tokio::test]
async fn an_upstream_body_cut_short_fails_the_downstream_response() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this"[..],
        &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nonly\r\n"[..],
    ] {
        let (addr, _) = raw_upstream(vec![answer], true).await;
        let p = proxy(simple(vec![cluster("c", &[addr])], to(&[("c", 1)]))).await;
        let mut c = client(p.addr).await;
        c.ready().await.unwrap();
        let req = Request::builder()
            .uri("/")
            .header("host", "svc.test")
            .body(text(""))
            .unwrap();
        // The head may not even have left the proxy when the body failed: then the
        // client sees the connection end before a response. Either way, an error.
        let Ok(resp) = c.send_request(req).await else {
            continue;
        };
        assert_eq!(resp.status(), 200);
        let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
            .await
            .expect("the response ends");
        assert!(
            body.is_err(),
            "a clean end short of the body: {:?}",
            body.map(|b| b.to_bytes())
        );
    }
}

#[tokio::test]
async fn an_upstream_that_closes_idle_connections_costs_no_request() {
    // The upstream closes after every answer without saying so: the next request must
    // find that out (at checkout, or by the request coming back) and use a new connection.
    let (addr, conns) = raw_upstream(
        vec![&b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na"[..]; 5],
        true,
    )
    .await;
    let p = proxy(simple(vec![cluster("c", &[addr])], to(&[("c", 1)]))).await;
    let mut c = client(p.addr).await;
    for i in 0..5 {
        let g = get(&mut c, "/").await;
        assert_eq!((g.status, g.body.as_str()), (200, "a"), "request {i}");
    }
    assert_eq!(conns.load(Ordering::Relaxed), 5);
}

/// Stands in for `Secure` with the real policy engine: a client and an endpoint both
/// mesh workloads of this node are judged by `authz::authorize` with the client's address
/// as `source.ip`, as `Secure::outbound` judges same-node paths.
struct PolicyMesh(Arc<MeshConfig>);

impl MeshPaths for PolicyMesh {
    fn mesh_now(&self) -> Arc<MeshConfig> {
        self.0.clone()
    }

    fn path(&self, client: IpAddr, target: SocketAddr) -> Path {
        let m = &self.0;
        let (Some(dst), Some(src)) = (m.workloads.by_ip(target.ip()), m.workloads.by_ip(client))
        else {
            return Path::Plain;
        };
        let ctx = crate::proxy::authz::ConnCtx::new(client, Some(&src.identity), dst, target);
        let v = crate::proxy::authz::authorize(&m.policies, &ctx);
        if v.allowed {
            Path::Plain
        } else {
            Path::Denied(v)
        }
    }

    fn open<'a>(&'a self, _: &'a Tunnel, _: SocketAddr) -> OpenFuture<'a> {
        unreachable!("no tunnels: every workload is on this node")
    }
}

/// (Added by the IPv6 work; the engine names clients by `IpAddr`.) An IPv6 client's
/// requests are judged by ipBlocks with its IPv6 address, ALLOW and DENY, and Istio's
/// series name its workload (found by the IPv6 address: principal, app label).
#[tokio::test]
async fn ipv6_clients_are_judged_and_named_by_their_ipv6_address() {
    use crate::proxy::config::workloads::{WorkloadIndex, WorkloadInfo};
    let up = named("db").await;
    let web6: IpAddr = "fd00::2".parse().unwrap();
    let client6: IpAddr = "fd00:1::2".parse().unwrap();
    for (policy, allowed) in [
        (
            "action: ALLOW, rules: [ { from: [ { source: { ipBlocks: [ \"fd00::/64\" ] } } ] } ]",
            [(web6, true), (client6, false)],
        ),
        (
            "action: DENY, rules: [ { from: [ { source: { ipBlocks: [ \"fd00:1::/64\" ] } } ] } ]",
            [(web6, true), (client6, false)],
        ),
    ] {
        let m = crate::proxy::authz::tests::mesh(&format!(
            "authorization_policies:\n  - metadata: {{ name: db-v6, namespace: shop }}\n    \
             spec: {{ selector: {{ matchLabels: {{ app: db }} }}, {policy} }}\n"
        ));
        // shop/db answers at the test upstream's address.
        let workloads: Vec<Arc<WorkloadInfo>> = m
            .workloads
            .iter()
            .map(|w| {
                if w.name == "db" {
                    Arc::new(WorkloadInfo {
                        ips: vec![up.addr.ip()],
                        ..(**w).clone()
                    })
                } else {
                    w.clone()
                }
            })
            .collect();
        let mesh = Arc::new(PolicyMesh(Arc::new(MeshConfig {
            workloads: WorkloadIndex::new(&workloads),
            policies: m.policies,
            version: 1,
        })));
        let (_config, rx) = watch::channel(Arc::new(simple(
            vec![cluster("c", &[up.addr])],
            to(&[("c", 1)]),
        )));
        let metrics = Arc::new(L7Metrics::default());
        let l7 = L7::new(rx, metrics.clone());
        l7.set_paths(mesh);
        let (_drain, watch) = crate::lifecycle::drain::new();
        for (ip, want) in allowed {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let (l7, watch) = (l7.clone(), watch.clone());
            let name = if ip == web6 {
                "shop/web"
            } else {
                "other/client"
            };
            tokio::spawn(async move {
                let (s, _) = l.accept().await.unwrap();
                let client = Client {
                    name: name.into(),
                    ip: Some(ip),
                    peer: Some(SocketAddr::new(ip, 40000)),
                    skmsg: false,
                };
                l7.serve(s, VIP, client, watch).await;
            });
            let mut c = client(addr).await;
            let got = get(&mut c, "/").await;
            let want = if want {
                (200, "db")
            } else {
                (403, "RBAC: access denied")
            };
            assert_eq!((got.status, got.body.as_str()), want, "{policy}: {ip}");
        }
        let mut t = String::new();
        metrics.istio.encode(&mut t);
        // The source found by its IPv6 address: principal and app label (`unknown`: the
        // workload has none); the allowed request's destination too.
        let has = |code: u16, source: &str, dst: &str| {
            t.lines().any(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains(source)
                    && l.contains(dst)
                    && l.contains(&format!("response_code=\"{code}\""))
            })
        };
        let web = "source_principal=\"spiffe://cluster.local/ns/shop/sa/web\",source_app=\"web\"";
        let other =
            "source_principal=\"spiffe://cluster.local/ns/other/sa/client\",source_app=\"unknown\"";
        assert!(
            has(
                200,
                web,
                "destination_workload=\"db\",destination_workload_namespace=\"shop\""
            ),
            "{policy}:\n{t}"
        );
        assert!(has(403, other, ""), "{policy}:\n{t}");
    }
}

/// A client of the `h2` crate on the proxy (its resets and their reasons are visible).
async fn h2_client(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(s).await.unwrap();
    tokio::spawn(
        async move {
            let _ = conn.await;
        }
        .instrument(tracing::debug_span!("test_h2_client")),
    );
    send
}

/// A response body read to its end: the data, then how it ended (`Err`: a reset).
async fn h2_read(mut b: h2::RecvStream) -> (Vec<u8>, Result<Option<HeaderMap>, h2::Error>) {
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

#[tokio::test]
async fn h2_many_concurrent_streams_share_one_connection() {
    // Every request waits at the upstream until all have arrived: streams served one at a
    // time would never get there.
    const N: usize = 100;
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let up = upstream(false, move |req: Request<Incoming>| {
        let barrier = barrier.clone();
        async move {
            let path = req.uri().path().to_string();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            barrier.wait().await;
            reply(200, format!("{path} {}", String::from_utf8_lossy(&body)))
        }
    })
    .await;
    let p = proxy(simple(vec![cluster("c", &[up.addr])], to(&[("c", 1)]))).await;
    let mut h2 = h2_client(p.addr).await;
    let mut calls = Vec::new();
    for i in 0..N {
        h2 = h2.ready().await.unwrap();
        let req = Request::post(format!("http://svc.test/n/{i}"))
            .body(())
            .unwrap();
        let (resp, mut tx) = h2.send_request(req, false).unwrap();
        tx.send_data(Bytes::from(format!("body-{i}")), true)
            .unwrap();
        calls.push(async move {
            let resp = resp.await.unwrap();
            assert_eq!(resp.status(), 200);
            let (data, end) = h2_read(resp.into_body()).await;
            assert!(end.is_ok(), "stream {i}: {end:?}");
            (i, String::from_utf8(data).unwrap())
        });
    }
    let all = tokio::time::timeout(
        Duration::from_secs(10),
        futures_util::future::join_all(calls),
    )
    .await
    .expect("all streams answered together");
    for (i, s) in all {
        assert_eq!(s, format!("/n/{i} body-{i}"));
    }
}

#[tokio::test]
async fn h2_a_client_reset_mid_body_resets_the_upstream_request() {
    let (first_tx, mut first_rx) = mpsc::channel::<()>(1);
    let (seen_tx, mut seen_rx) = mpsc::channel::<(Vec<u8>, Result<(), String>)>(1);
    let up = upstream(true, move |req: Request<Incoming>| {
        let (first, seen) = (first_tx.clone(), seen_tx.clone());
        async move {
            let mut body = req.into_body();
            let mut got = Vec::new();
            let end = loop {
                match body.frame().await {
                    Some(Ok(f)) => {
                        if let Ok(d) = f.into_data() {
                            got.extend_from_slice(&d);
                            let _ = first.try_send(());
                        }
                    }
                    Some(Err(e)) => break Err(e.to_string()),
                    None => break Ok(()),
                }
            };
            let _ = seen.send((got, end)).await;
            reply(200, "")
        }
    })
    .await;
    let p = h2_cluster_proxy(&[up.addr], None).await;
    let mut h2 = h2_client(p.addr).await;
    h2 = h2.ready().await.unwrap();
    let req = Request::post("http://svc.test/upload").body(()).unwrap();
    let (resp, mut tx) = h2.send_request(req, false).unwrap();
    tx.send_data(Bytes::from_static(b"part"), false).unwrap();
    tokio::time::timeout(Duration::from_secs(5), first_rx.recv())
        .await
        .expect("the first bytes reach the upstream");
    tx.send_reset(h2::Reason::CANCEL);
    let (got, end) = tokio::time::timeout(Duration::from_secs(5), seen_rx.recv())
        .await
        .expect("the upstream's body ends")
        .unwrap();
    assert_eq!(got, b"part");
    assert!(end.is_err(), "a clean end of a body the client reset");
    // The client's own stream is gone: no response comes.
    assert!(resp.await.is_err());
}

#[tokio::test]
async fn h2_an_upstream_dying_mid_response_resets_the_stream() {
    let (addr, _) = raw_upstream(
        vec![&b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this"[..]],
        true,
    )
    .await;
    let p = proxy(simple(vec![cluster("c", &[addr])], to(&[("c", 1)]))).await;
    let mut h2 = h2_client(p.addr).await;
    h2 = h2.ready().await.unwrap();
    let (resp, _) = h2
        .send_request(Request::get("http://svc.test/").body(()).unwrap(), true)
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("an answer");
    // The head may be reset before it left the proxy; either way a reset, never an end.
    let end = match resp {
        Ok(resp) => {
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()["content-length"], "100");
            let (data, end) = h2_read(resp.into_body()).await;
            assert!(data.len() < 100, "{data:?}");
            end.map(|_| ())
        }
        Err(e) => Err(e),
    };
    let e = end.expect_err("a clean END_STREAM short of the body");
    assert!(e.is_reset(), "a RST_STREAM: {e}");
}

#[tokio::test]
async fn h2_trailers_round_trip_both_ways() {
    // Echoes the request's body and its trailers (with `grpc-status`) back.
    let (_up, p) = h2_grpc_upstream(|req: Request<Incoming>| async move {
        let got = req.into_body().collect().await.unwrap();
        let mut t = got.trailers().cloned().unwrap_or_default();
        let body = got.to_bytes();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        let (tx, rx) = mpsc::channel(2);
        tx.send(Frame::data(body)).await.unwrap();
        tx.send(Frame::trailers(t)).await.unwrap();
        grpc_reply(chan(rx))
    })
    .await;
    let mut h2 = h2_client(p.addr).await;
    h2 = h2.ready().await.unwrap();
    let req = Request::post("http://svc.test/echo.Echo/Unary")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut tx) = h2.send_request(req, false).unwrap();
    tx.send_data(Bytes::from_static(b"\0\0\0\0\x03msg"), false)
        .unwrap();
    let mut t = HeaderMap::new();
    t.insert("x-request-trailer", HeaderValue::from_static("sent"));
    tx.send_trailers(t).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (data, end) = h2_read(resp.into_body()).await;
    assert_eq!(data, b"\0\0\0\0\x03msg");
    let t = end.unwrap().expect("response trailers");
    assert_eq!(t["grpc-status"], "0");
    assert_eq!(t["x-request-trailer"], "sent");
}

/// An `h2` crate client over `io` announcing `windows` (stream, connection) as its own
/// receive windows; its connection's end (its result) comes on the returned channel.
async fn h2_client_on<T>(
    io: T,
    windows: (u32, u32),
) -> (
    h2::client::SendRequest<Bytes>,
    oneshot::Receiver<Result<(), h2::Error>>,
)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(windows.0)
        .initial_connection_window_size(windows.1)
        .handshake::<_, Bytes>(io)
        .await
        .unwrap();
    let (end_tx, end) = oneshot::channel();
    tokio::spawn(
        async move {
            let _ = end_tx.send(conn.await);
        }
        .instrument(tracing::debug_span!("test_h2_client")),
    );
    (send, end)
}

/// The `h2` crate's default windows (64 KiB - 1), for clients that do not care.
const H2_DEFAULT_WINDOWS: (u32, u32) = (65_535, 65_535);

/// Sends up to 64 KiB on `tx`, no more than the flow-control capacity the proxy has
/// granted (waiting for it); the bytes sent.
async fn h2_send_granted(tx: &mut h2::SendStream<Bytes>) -> usize {
    tx.reserve_capacity(64 * 1024);
    loop {
        let n = std::future::poll_fn(|cx| tx.poll_capacity(cx))
            .await
            .expect("the stream is open")
            .expect("capacity");
        let n = n.min(tx.capacity()).min(64 * 1024);
        if n > 0 {
            tx.send_data(Bytes::from(vec![b'u'; n]), false).unwrap();
            return n;
        }
    }
}

/// An upstream (HTTP/1.1) for the flow-control tests: `/count` reads the request body to
/// its end and answers with its length; `/big` answers 1 MiB; `/stuck` never answers;
/// anything else answers with its path and the request body.
async fn counting() -> Upstream {
    upstream(false, |req: Request<Incoming>| async move {
        let path = req.uri().path().to_string();
        match path.as_str() {
            "/big" => reply(200, vec![b'b'; 1 << 20]),
            "/stuck" => std::future::pending().await,
            _ => {
                let mut body = req.into_body();
                let mut got = Vec::new();
                let mut n = 0;
                while let Some(f) = body.frame().await {
                    if let Ok(d) = f.unwrap().into_data() {
                        n += d.len();
                        if path != "/count" {
                            got.extend_from_slice(&d);
                        }
                    }
                }
                match path.as_str() {
                    "/count" => reply(200, n.to_string()),
                    _ => reply(200, format!("{path} {}", String::from_utf8_lossy(&got))),
                }
            }
        }
    })
    .await
}

/// A proxy forwarding everything to `up` without a route timeout (the streams held open
/// here would otherwise end in a 504).
async fn untimed_proxy(up: &Upstream) -> Proxy {
    let mut fwd = to(&[("c", 1)]);
    fwd.timeout = None;
    proxy(simple(vec![cluster("c", &[up.addr])], fwd)).await
}

/// One small request on `h2` and its answer's body, within 5 s; the next `SendRequest`.
async fn h2_small(
    h2: h2::client::SendRequest<Bytes>,
    path: &str,
) -> (h2::client::SendRequest<Bytes>, String) {
    let mut h2 = h2.ready().await.unwrap();
    let req = Request::post(format!("http://svc.test{path}"))
        .body(())
        .unwrap();
    let (resp, mut tx) = h2.send_request(req, false).unwrap();
    tx.send_data(Bytes::from_static(b"small"), true).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), async move {
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        let (data, end) = h2_read(resp.into_body()).await;
        assert!(end.is_ok(), "{path}: {end:?}");
        String::from_utf8(data).unwrap()
    })
    .await
    .unwrap_or_else(|_| panic!("{path} answered within 5 s"));
    (h2, got)
}

#[tokio::test]
async fn h2_an_upload_past_the_windows_runs_beside_the_other_streams() {
    let up = counting().await;
    let p = untimed_proxy(&up).await;
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let (mut h2, _end) = h2_client_on(tcp, H2_DEFAULT_WINDOWS).await;
    h2 = h2.ready().await.unwrap();
    let req = Request::post("http://svc.test/count").body(()).unwrap();
    let (upload, mut tx) = h2.send_request(req, false).unwrap();
    // The upload sends for as long as the proxy grants capacity, until told to stop.
    let sent = Arc::new(AtomicUsize::new(0));
    let (stop, mut stopped) = oneshot::channel::<()>();
    let pump = tokio::spawn({
        let sent = sent.clone();
        async move {
            loop {
                tokio::select! {
                    biased;
                    _ = &mut stopped => break,
                    n = h2_send_granted(&mut tx) => sent.fetch_add(n, Ordering::Relaxed),
                };
            }
            tx.send_data(Bytes::new(), true).unwrap();
        }
    });
    // Past twice the proxy's stream and connection windows (1 MiB each): only capacity
    // the proxy released as the upstream took the bytes lets these through.
    tokio::time::timeout(Duration::from_secs(10), async {
        while sent.load(Ordering::Relaxed) < 2 << 20 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the upload stalled at {} bytes: flow-control capacity not released",
            sent.load(Ordering::Relaxed)
        )
    });
    // Meanwhile the other streams are answered, each in turn, while the upload runs.
    let before = sent.load(Ordering::Relaxed);
    for i in 0..10 {
        let (next, got) = h2_small(h2, &format!("/n/{i}")).await;
        h2 = next;
        assert_eq!(got, format!("/n/{i} small"));
    }
    let during = sent.load(Ordering::Relaxed) - before;
    assert!(!pump.is_finished());
    stop.send(()).unwrap();
    pump.await.unwrap();
    let total = sent.load(Ordering::Relaxed);
    let resp = tokio::time::timeout(Duration::from_secs(10), upload)
        .await
        .expect("the upload's answer")
        .unwrap();
    let (data, end) = h2_read(resp.into_body()).await;
    assert!(end.is_ok(), "{end:?}");
    assert_eq!(
        String::from_utf8(data).unwrap(),
        total.to_string(),
        "every byte of the upload reached the upstream"
    );
    assert!(
        during > 0,
        "the upload moved while the other streams were answered"
    );
}

#[tokio::test]
async fn h2_stalled_streams_hold_up_no_other_stream() {
    let up = counting().await;
    let p = untimed_proxy(&up).await;
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    // A small stream window and a large connection window: a response the client does
    // not read stalls on its own stream's window, not on the connection's.
    let (mut h2, _end) = h2_client_on(tcp, (16 * 1024, 8 << 20)).await;
    let get = |path: &str| {
        Request::get(format!("http://svc.test{path}"))
            .body(())
            .unwrap()
    };
    // A response the client does not read (the proxy waits for the client's window).
    h2 = h2.ready().await.unwrap();
    let (big, _) = h2.send_request(get("/big"), true).unwrap();
    let big = tokio::time::timeout(Duration::from_secs(5), big)
        .await
        .expect("the big response's head")
        .unwrap();
    assert_eq!(big.status(), 200);
    // A response the upstream never sends.
    h2 = h2.ready().await.unwrap();
    let (_stuck, _) = h2.send_request(get("/stuck"), true).unwrap();
    // A request body stopped half way (the upstream waits for the rest).
    h2 = h2.ready().await.unwrap();
    let req = Request::post("http://svc.test/count").body(()).unwrap();
    let (held, mut held_tx) = h2.send_request(req, false).unwrap();
    held_tx
        .send_data(Bytes::from_static(b"half"), false)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Twenty other streams at once: all answered.
    let mut calls = Vec::new();
    for i in 0..20 {
        h2 = h2.ready().await.unwrap();
        let (resp, _) = h2.send_request(get(&format!("/n/{i}")), true).unwrap();
        calls.push(async move {
            let resp = resp.await.unwrap();
            let (data, end) = h2_read(resp.into_body()).await;
            assert!(end.is_ok(), "/n/{i}: {end:?}");
            assert_eq!(String::from_utf8(data).unwrap(), format!("/n/{i} "));
        });
    }
    tokio::time::timeout(
        Duration::from_secs(5),
        futures_util::future::join_all(calls),
    )
    .await
    .expect("the other streams answered beside the stalled ones");
    // The stalled streams were only waiting: read, the big response comes whole; ended,
    // the held upload is answered.
    let (data, end) = tokio::time::timeout(Duration::from_secs(5), h2_read(big.into_body()))
        .await
        .expect("the big response once read");
    assert!(end.is_ok(), "{end:?}");
    assert_eq!(data.len(), 1 << 20);
    held_tx
        .send_data(Bytes::from_static(b"rest"), true)
        .unwrap();
    let held = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("the held upload's answer")
        .unwrap();
    let (data, _) = h2_read(held.into_body()).await;
    assert_eq!(data, b"8");
}

#[tokio::test]
async fn h2_a_drain_sends_goaway_at_once_on_an_idle_connection() {
    let up = named("up").await;
    let p = proxy(simple(vec![cluster("c", &[up.addr])], to(&[("c", 1)]))).await;
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let (mut h2, mut end) = h2_client_on(tcp, H2_DEFAULT_WINDOWS).await;
    h2 = h2.ready().await.unwrap();
    let (resp, _) = h2
        .send_request(Request::get("http://svc.test/").body(()).unwrap(), true)
        .unwrap();
    let (data, _) = h2_read(resp.await.unwrap().into_body()).await;
    assert_eq!(data, b"up");
    // Idle: nothing moves on the connection, which stays open.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        matches!(end.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
        "an idle connection stays open"
    );
    p.drain.start();
    // GOAWAY, then the close, with no stream or client frame to wake the connection.
    let res = tokio::time::timeout(Duration::from_secs(2), &mut end)
        .await
        .expect("the connection closed within 2 s of the drain")
        .unwrap();
    assert!(res.is_ok(), "a graceful close: {res:?}");
    let refused = match h2.ready().await {
        Err(_) => true,
        Ok(mut h2) => h2
            .send_request(Request::get("http://svc.test/").body(()).unwrap(), true)
            .is_err(),
    };
    assert!(refused, "no new stream after the drain");
}

/// A TCP connection to `addr` through the test: the returned end's bytes go to the proxy
/// and the proxy's come back; the bytes sent on the channel go to the proxy between two
/// of the client's writes (send them while the client is quiet, to land between frames).
async fn tapped(addr: SocketAddr) -> (tokio::io::DuplexStream, mpsc::Sender<Vec<u8>>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, relay) = tokio::io::duplex(4 << 20);
    let (inject, mut injected) = mpsc::channel::<Vec<u8>>(1);
    let (mut tcp_rd, mut tcp_wr) = tcp.into_split();
    let (mut relay_rd, mut relay_wr) = tokio::io::split(relay);
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut tcp_rd, &mut relay_wr).await;
        let _ = relay_wr.shutdown().await;
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4 << 20];
        loop {
            let bytes = tokio::select! {
                n = relay_rd.read(&mut buf) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf[..n].to_vec(),
                },
                Some(b) = injected.recv() => b,
            };
            if tcp_wr.write_all(&bytes).await.is_err() {
                break;
            }
        }
    });
    (client, inject)
}

#[tokio::test]
async fn h2_a_connection_error_resets_the_streams_in_flight_both_ways() {
    // An HTTP/2 upstream: `/upload` reports how its request body ended; `/download`
    // sends a first chunk and holds the rest, reporting when the proxy lets it go.
    let (seen_tx, mut seen) = mpsc::channel::<(usize, Result<(), String>)>(1);
    let (let_go_tx, mut let_go) = mpsc::channel::<()>(1);
    let (_up, p) = h2_grpc_upstream(move |req: Request<Incoming>| {
        let (seen, let_go) = (seen_tx.clone(), let_go_tx.clone());
        async move {
            if req.uri().path() == "/upload" {
                let mut body = req.into_body();
                let mut n = 0;
                let end = loop {
                    match body.frame().await {
                        Some(Ok(f)) => n += f.data_ref().map_or(0, Bytes::len),
                        Some(Err(e)) => break Err(e.to_string()),
                        None => break Ok(()),
                    }
                };
                let _ = seen.send((n, end)).await;
                return reply(200, "");
            }
            let (tx, rx) = mpsc::channel(1);
            tx.send(Frame::data(Bytes::from_static(b"first")))
                .await
                .unwrap();
            tokio::spawn(async move {
                tx.closed().await;
                let _ = let_go.send(()).await;
            });
            Response::new(chan(rx))
        }
    })
    .await;
    let (io, inject) = tapped(p.addr).await;
    let (mut h2, end) = h2_client_on(io, H2_DEFAULT_WINDOWS).await;
    h2 = h2.ready().await.unwrap();
    let req = Request::post("http://svc.test/upload").body(()).unwrap();
    let (upload, mut upload_tx) = h2.send_request(req, false).unwrap();
    upload_tx
        .send_data(Bytes::from_static(b"part"), false)
        .unwrap();
    h2 = h2.ready().await.unwrap();
    let (download, _) = h2
        .send_request(
            Request::get("http://svc.test/download").body(()).unwrap(),
            true,
        )
        .unwrap();
    let download = tokio::time::timeout(Duration::from_secs(5), download)
        .await
        .expect("the download's head")
        .unwrap();
    let mut body = download.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.data())
        .await
        .expect("the download's first chunk");
    assert_eq!(first.unwrap().unwrap(), "first");
    // Both streams in flight and the client quiet: a DATA frame on stream 0, a
    // connection error (PROTOCOL_ERROR, RFC 9113 section 6.1).
    tokio::time::sleep(Duration::from_millis(200)).await;
    inject.send(vec![0; 9]).await.unwrap();
    // The client: both streams fail, neither ends cleanly.
    let rest = tokio::time::timeout(Duration::from_secs(5), body.data())
        .await
        .expect("the download ends");
    assert!(matches!(rest, Some(Err(_))), "a failed download: {rest:?}");
    let answer = tokio::time::timeout(Duration::from_secs(5), upload)
        .await
        .expect("the upload ends");
    assert!(answer.is_err(), "a failed upload: {answer:?}");
    let res = tokio::time::timeout(Duration::from_secs(5), end)
        .await
        .expect("the connection ends")
        .unwrap();
    let e = res.expect_err("a connection error");
    assert_eq!(e.reason(), Some(h2::Reason::PROTOCOL_ERROR), "{e}");
    // The upstream, at once: the upload's body fails (a reset, not a clean end short of
    // its bytes) and the download is let go (its stream reset).
    let (n, how) = tokio::time::timeout(Duration::from_secs(2), seen.recv())
        .await
        .expect("the upload's end reached the upstream at once")
        .unwrap();
    assert_eq!(n, 4);
    assert!(
        how.is_err(),
        "a clean end of an upload cut by a connection error"
    );
    tokio::time::timeout(Duration::from_secs(2), let_go.recv())
        .await
        .expect("the download let go at once")
        .unwrap();
}
