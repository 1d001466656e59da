use std::sync::atomic::AtomicUsize;

use http::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, DuplexStream},
    sync::mpsc,
    task::JoinHandle,
};

use super::*;
use crate::proxy::http::BoxError;
use crate::{
    lifecycle::drain::{self, DrainTrigger},
    proxy::http::drained::until_drained,
};

/// A connection served by `service` over an in-memory pipe, with a drain to pull.
struct Served {
    client: DuplexStream,
    buf: Vec<u8>,
    drain: DrainTrigger,
    task: JoinHandle<io::Result<End>>,
}

fn start<S, F>(max_head: usize, service: S) -> Served
where
    S: FnMut(Request<ReqBody>) -> F + Send + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let (client, server) = tokio::io::duplex(256 * 1024);
    let (trigger, watch) = drain::new();
    let task = tokio::spawn(async move {
        let timer = Timer::default();
        let draining = AtomicBool::new(false);
        let mut end = None;
        let s = Settings {
            max_head,
            timer: &timer,
            draining: &draining,
        };
        let codec = async {
            end = Some(serve(Box::new(server), s, service).await?);
            Ok::<(), io::Error>(())
        };
        until_drained(codec, &watch, |_| draining.store(true, Relaxed)).await?;
        Ok(end.unwrap_or(End::Closed))
    });
    Served {
        client,
        buf: Vec::new(),
        drain: trigger,
        task,
    }
}

fn text(s: impl Into<Bytes>) -> ProxyBody {
    Full::new(s.into()).map_err(|n| match n {}).boxed_unsync()
}

/// Answers `method path` and what it read of the body (or the body's error).
async fn echo(req: Request<ReqBody>) -> Response<ProxyBody> {
    let line = format!("{} {}", req.method(), req.uri());
    let (parts, body) = req.into_parts();
    let mut out = line;
    match body.collect().await {
        Ok(b) => {
            let trailers = b.trailers().cloned();
            out.push_str(&format!(" body={}", String::from_utf8_lossy(&b.to_bytes())));
            if let Some(t) = trailers {
                for (k, v) in &t {
                    out.push_str(&format!(" {k}={}", v.to_str().unwrap()));
                }
            }
        }
        Err(e) => out.push_str(&format!(" error={e}")),
    }
    let _ = parts;
    Response::new(text(out))
}

struct Got {
    head: String,
    body: String,
}

impl Served {
    async fn send(&mut self, bytes: &[u8]) {
        self.client.write_all(bytes).await.unwrap();
    }

    async fn fill(&mut self) -> usize {
        let mut b = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), self.client.read(&mut b))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        self.buf.extend_from_slice(&b[..n]);
        n
    }

    /// The next response: its head, and its body by `content-length`, chunked, or to EOF.
    async fn response(&mut self) -> Got {
        let end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            assert!(
                self.fill().await > 0,
                "EOF before a head: {:?}",
                self.text()
            );
        };
        let head = String::from_utf8(self.buf.drain(..end).collect()).unwrap();
        let lower = head.to_ascii_lowercase();
        let mut body = Vec::new();
        let informational = head.starts_with("HTTP/1.1 1");
        if let Some(l) = lower
            .split("\r\n")
            .find_map(|l| l.strip_prefix("content-length: "))
        {
            let n: usize = l.parse().unwrap();
            while self.buf.len() < n {
                assert!(self.fill().await > 0, "EOF in a body");
            }
            body = self.buf.drain(..n).collect();
        } else if lower.contains("transfer-encoding: chunked") {
            loop {
                let i = loop {
                    if let Some(i) = find(&self.buf, b"\r\n") {
                        break i;
                    }
                    assert!(self.fill().await > 0, "EOF in a chunked body");
                };
                let size = usize::from_str_radix(std::str::from_utf8(&self.buf[..i]).unwrap(), 16)
                    .unwrap();
                self.buf.drain(..i + 2);
                while self.buf.len() < size + 2 {
                    assert!(self.fill().await > 0, "EOF in a chunk");
                }
                body.extend(self.buf.drain(..size));
                self.buf.drain(..2);
                if size == 0 {
                    break;
                }
            }
        } else if !informational && !head.contains(" 101 ") && !head.contains(" 204 ") {
            while self.fill().await > 0 {}
            body = std::mem::take(&mut self.buf);
        }
        Got {
            head,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }

    /// Reads to EOF: the server closed.
    async fn closed(&mut self) -> String {
        while self.fill().await > 0 {}
        self.text()
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

#[tokio::test]
async fn keep_alive_requests_get_length_framed_answers_with_a_date() {
    let mut s = start(8192, echo);
    for i in 0..3 {
        s.send(format!("GET /a?{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await;
        let g = s.response().await;
        assert!(g.head.starts_with("HTTP/1.1 200 OK\r\n"), "{}", g.head);
        assert!(g.head.contains("\r\ndate: "), "{}", g.head);
        assert!(!g.head.contains("connection: close"), "{}", g.head);
        assert_eq!(g.body, format!("GET /a?{i} body="));
    }
    drop(s.client);
    assert!(matches!(s.task.await.unwrap(), Ok(End::Closed)));
}

#[tokio::test]
async fn malformed_heads_get_400_and_close() {
    let heads: &[&[u8]] = &[
        b"GET /\x01bad HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
        b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
        b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n",
        // Host: none on HTTP/1.1, or two.
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        // Request-target forms.
        b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET x/y HTTP/1.1\r\nHost: x\r\n\r\n",
        b"CONNECT /x HTTP/1.1\r\nHost: x\r\n\r\n",
        // Framing conflicts (RFC 9112, section 6).
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3,4\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -3\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x3\r\n\r\nabc",
    ];
    let calls = Arc::new(AtomicUsize::new(0));
    for h in heads {
        let c = calls.clone();
        let mut s = start(8192, move |r| {
            c.fetch_add(1, Relaxed);
            echo(r)
        });
        s.send(h).await;
        let out = s.closed().await;
        assert!(
            out.starts_with("HTTP/1.1 400 Bad Request\r\n") && out.contains("connection: close"),
            "{:?}: {out}",
            String::from_utf8_lossy(h)
        );
    }
    assert_eq!(calls.load(Relaxed), 0, "none reached the service");
}

#[tokio::test]
async fn accepted_forms_and_equal_content_lengths() {
    let mut s = start(8192, echo);
    s.send(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(s.response().await.body, "OPTIONS * body=");
    s.send(b"GET http://svc.test/p?q HTTP/1.1\r\nHost: svc.test\r\n\r\n")
        .await;
    assert_eq!(s.response().await.body, "GET http://svc.test/p?q body=");
    s.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n\r\nabc")
        .await;
    assert_eq!(s.response().await.body, "POST / body=abc");
    s.send(b"CONNECT svc.test:443 HTTP/1.1\r\nHost: svc.test:443\r\n\r\n")
        .await;
    assert_eq!(s.response().await.body, "CONNECT svc.test:443 body=");
}

#[tokio::test]
async fn heads_over_the_limit_get_431_and_close() {
    let big = "a".repeat(2000);
    let mut s = start(1024, echo);
    s.send(format!("GET / HTTP/1.1\r\nHost: x\r\nx-big: {big}\r\n\r\n").as_bytes())
        .await;
    let out = s.closed().await;
    assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
    // Too many fields.
    let many: String = (0..MAX_HEADERS + 1)
        .map(|i| format!("x-{i}: v\r\n"))
        .collect();
    let mut s = start(64 * 1024, echo);
    s.send(format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes())
        .await;
    let out = s.closed().await;
    assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
    // Just under the limit: served.
    let fits = "a".repeat(900);
    let mut s = start(1024, echo);
    s.send(format!("GET / HTTP/1.1\r\nHost: x\r\nx-big: {fits}\r\n\r\n").as_bytes())
        .await;
    assert!(s.response().await.head.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn chunked_bodies_with_trailers_and_cut_short_bodies() {
    let mut s = start(8192, echo);
    s.send(b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n")
        .await;
    assert_eq!(s.response().await.body, "POST /c body=hello world x-sum=11");
    // Cut short by content-length: the service sees an error, and the connection closes.
    let mut s = start(8192, echo);
    s.send(b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nshort")
        .await;
    s.client.shutdown().await.unwrap();
    let g = s.response().await;
    assert!(g.head.contains("connection: close"), "{}", g.head);
    assert!(
        g.body.contains("error=") && g.body.contains("cut short"),
        "{}",
        g.body
    );
    // Cut short before the last chunk.
    let mut s = start(8192, echo);
    s.send(b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await;
    s.client.shutdown().await.unwrap();
    let g = s.response().await;
    assert!(g.body.contains("cut short"), "{}", g.body);
    // A malformed chunk.
    let mut s = start(8192, echo);
    s.send(
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
    )
    .await;
    let g = s.response().await;
    assert!(g.body.contains("invalid chunk size"), "{}", g.body);
    assert!(g.head.contains("connection: close"), "{}", g.head);
    assert_eq!(s.closed().await, "");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_one_at_a_time() {
    let (go_tx, go_rx) = mpsc::unbounded_channel::<()>();
    let go_rx = Arc::new(tokio::sync::Mutex::new(go_rx));
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let mut s = start(8192, move |req: Request<ReqBody>| {
        let go_rx = go_rx.clone();
        let c = c.clone();
        async move {
            c.fetch_add(1, Relaxed);
            if req.uri().path() == "/slow" {
                go_rx.lock().await.recv().await;
            }
            echo(req).await
        }
    });
    s.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nokGET /c HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(calls.load(Relaxed), 1, "the next head waits for the answer");
    go_tx.send(()).unwrap();
    assert_eq!(s.response().await.body, "GET /slow body=");
    assert_eq!(s.response().await.body, "POST /b body=ok");
    assert_eq!(s.response().await.body, "GET /c body=");
}

#[tokio::test]
async fn unread_bodies_are_drained_within_the_bound_else_the_connection_closes() {
    let ignore = |req: Request<ReqBody>| async move {
        Response::new(text(format!("ignored {}", req.uri())))
    };
    let mut s = start(8192, ignore);
    s.send(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let g = s.response().await;
    assert!(!g.head.contains("connection: close"), "{}", g.head);
    assert_eq!(g.body, "ignored /a");
    assert_eq!(s.response().await.body, "ignored /b");
    // Over the bound: closed after the answer.
    let mut s = start(8192, ignore);
    s.send(
        format!(
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            DRAIN_LIMIT + 1
        )
        .as_bytes(),
    )
    .await;
    let g = s.response().await;
    assert!(g.head.contains("connection: close"), "{}", g.head);
    // A chunked body past the bound: answered, then closed while draining.
    let mut s = start(8192, ignore);
    s.send(b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await;
    let g = s.response().await;
    assert_eq!(g.body, "ignored /a");
    let chunk = format!("{:x}\r\n{}\r\n", 40_000, "z".repeat(40_000));
    s.send(chunk.as_bytes()).await;
    s.send(chunk.as_bytes()).await;
    assert_eq!(s.closed().await, "");
}

#[tokio::test]
async fn expect_100_continue_is_sent_when_the_body_is_read_and_never_otherwise() {
    let mut s = start(8192, echo);
    s.send(b"POST /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        .await;
    let g = s.response().await;
    assert_eq!(g.head, "HTTP/1.1 100 Continue\r\n\r\n");
    s.send(b"ok").await;
    assert_eq!(s.response().await.body, "POST /e body=ok");
    // Answered without reading: no 100, and the connection closes after the answer.
    let mut s = start(8192, |_req: Request<ReqBody>| async move {
        let mut r = Response::new(text("no"));
        *r.status_mut() = StatusCode::FORBIDDEN;
        r
    });
    s.send(b"POST /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        .await;
    let g = s.response().await;
    assert!(
        g.head.starts_with("HTTP/1.1 403 Forbidden\r\n"),
        "{}",
        g.head
    );
    assert!(g.head.contains("connection: close"), "{}", g.head);
}

#[tokio::test]
async fn http10_answers_and_keep_alive_rules() {
    let mut s = start(8192, echo);
    s.send(b"GET /a HTTP/1.0\r\n\r\n").await;
    let g = s.response().await;
    assert!(g.head.starts_with("HTTP/1.0 200 OK\r\n"), "{}", g.head);
    assert!(g.head.contains("connection: close"), "{}", g.head);
    assert_eq!(s.closed().await, "");
    let mut s = start(8192, echo);
    s.send(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let g = s.response().await;
    assert!(g.head.contains("connection: keep-alive"), "{}", g.head);
    let g = s.response().await;
    assert!(g.head.contains("connection: close"), "{}", g.head);
    assert_eq!(s.closed().await, "");
    // A body of unknown length to an HTTP/1.0 client: delimited by the close.
    let mut s = start(8192, |_req: Request<ReqBody>| async move {
        let frames =
            futures_util::stream::iter([Ok::<_, BoxError>(Frame::data(Bytes::from("streamed")))]);
        Response::new(StreamBody::new(frames).boxed_unsync())
    });
    s.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await;
    let g = s.response().await;
    assert!(g.head.contains("connection: close"), "{}", g.head);
    assert!(!g.head.contains("content-length"), "{}", g.head);
    assert_eq!(g.body, "streamed");
}

#[tokio::test]
async fn streamed_answers_are_chunked_and_a_failed_body_cuts_the_connection() {
    let mut s = start(8192, |req: Request<ReqBody>| async move {
        let fail = req.uri().path() == "/fail";
        let frames = futures_util::stream::iter([
            Ok::<_, BoxError>(Frame::data(Bytes::from("one,"))),
            Ok(Frame::data(Bytes::from("two"))),
            if fail {
                Err("upstream cut".into())
            } else {
                Ok(Frame::trailers(HeaderMap::from_iter([(
                    HeaderName::from_static("x-t"),
                    HeaderValue::from_static("1"),
                )])))
            },
        ]);
        Response::new(StreamBody::new(frames).boxed_unsync())
    });
    s.send(b"GET /ok HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n")
        .await;
    let g = s.response().await;
    assert!(g.head.contains("transfer-encoding: chunked"), "{}", g.head);
    assert_eq!(g.body, "one,two");
    s.send(b"GET /fail HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let out = s.closed().await;
    assert!(out.contains("one,") && !out.ends_with("0\r\n\r\n"), "{out}");
    let end = s.task.await.unwrap();
    assert!(
        end.is_err(),
        "the failure ends the connection: {:?}",
        end.map(|_| ())
    );
}

#[tokio::test]
async fn head_and_bodiless_statuses_carry_no_body() {
    let mut s = start(8192, |req: Request<ReqBody>| async move {
        let mut r = Response::new(text("ignored"));
        if req.uri().path() == "/204" {
            *r.status_mut() = StatusCode::NO_CONTENT;
        } else {
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from_static("7"));
        }
        r
    });
    s.send(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    while find(&s.buf, b"\r\n\r\n").is_none() {
        s.fill().await;
    }
    let head = s.text();
    assert!(
        head.ends_with("\r\n\r\n") && head.contains("content-length: 7"),
        "{head}"
    );
    s.buf.clear();
    s.send(b"GET /204 HTTP/1.1\r\nHost: x\r\n\r\nGET /204 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let g = s.response().await;
    assert!(g.head.starts_with("HTTP/1.1 204"), "{}", g.head);
    assert!(!g.head.contains("content-length"), "{}", g.head);
    let g = s.response().await;
    assert!(
        g.head.starts_with("HTTP/1.1 204"),
        "no stray body bytes: {}",
        g.head
    );
}

#[tokio::test]
async fn a_101_hands_the_connection_and_the_early_bytes_over() {
    let mut s = start(8192, |_req: Request<ReqBody>| async move {
        let mut r = Response::new(text(""));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        r.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        r
    });
    s.send(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nearly",
    )
    .await;
    let g = s.response().await;
    assert!(
        g.head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{}",
        g.head
    );
    assert!(g.head.contains("upgrade: websocket"), "{}", g.head);
    let Ok(End::Upgraded(mut io, early)) = s.task.await.unwrap() else {
        panic!("handed over");
    };
    assert_eq!(&early[..], b"early");
    s.client.write_all(b"-more").await.unwrap();
    let mut b = [0u8; 5];
    io.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"-more");
    io.write_all(b"back").await.unwrap();
    let mut b = [0u8; 4];
    s.client.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"back");
}

#[tokio::test]
async fn upgrade_requests_are_marked_for_the_engine() {
    let mut s = start(8192, |req: Request<ReqBody>| async move {
        let marked = req.extensions().get::<Upgradable>().is_some();
        Response::new(text(format!("{marked}")))
    });
    s.send(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await;
    assert_eq!(s.response().await.body, "true");
    s.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(s.response().await.body, "false");
}

#[tokio::test]
async fn a_drain_closes_an_idle_connection_and_marks_the_answer_in_flight() {
    let mut s = start(8192, echo);
    s.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    s.response().await;
    s.drain.start();
    assert_eq!(s.closed().await, "", "idle: closed at once");
    // In flight: answered with `connection: close`, then closed.
    let go = Arc::new(tokio::sync::Mutex::new(None));
    let g2 = go.clone();
    let mut s = start(8192, move |req: Request<ReqBody>| {
        let g2 = g2.clone();
        async move {
            let rx: Option<mpsc::UnboundedReceiver<()>> = g2.lock().await.take();
            if let Some(mut rx) = rx {
                rx.recv().await;
            }
            echo(req).await
        }
    });
    let (tx2, rx2) = mpsc::unbounded_channel::<()>();
    *go.lock().await = Some(rx2);
    s.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.drain.start();
    tokio::time::sleep(Duration::from_millis(50)).await;
    tx2.send(()).unwrap();
    let g = s.response().await;
    assert!(g.head.contains("connection: close"), "{}", g.head);
    assert_eq!(g.body, "GET /slow body=");
    assert_eq!(s.closed().await, "");
}

#[tokio::test(start_paused = true)]
async fn a_head_must_arrive_within_the_timeout() {
    let mut s = start(8192, echo);
    s.send(b"GET / HTTP/1.1\r\nHost: x\r\n").await;
    let t = Instant::now();
    let mut b = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.client.read_to_end(&mut b))
        .await
        .expect("closed by the timeout")
        .unwrap();
    assert!(t.elapsed() >= HEADER_READ_TIMEOUT, "{:?}", t.elapsed());
    assert!(b.is_empty());
}

#[test]
fn dates_and_numbers_format() {
    assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
    assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
    let mut b = [0; 20];
    assert_eq!(decimal(0, &mut b), b"0");
    assert_eq!(decimal(u64::MAX, &mut b), u64::MAX.to_string().as_bytes());
    let mut h = [0; 16];
    assert_eq!(chunked::hex(0x1f3a, &mut h), b"1f3a");
    assert_eq!(chunked::hex(0, &mut h), b"0");
}

#[tokio::test]
async fn a_client_that_closes_with_a_request_in_flight_ends_the_exchange() {
    let (tx, mut rx) = mpsc::unbounded_channel::<&'static str>();
    let mut s = start(8192, move |_req: Request<ReqBody>| {
        let tx = tx.clone();
        async move {
            // Dropped unanswered when the client goes away.
            struct Dropped(mpsc::UnboundedSender<&'static str>);
            impl Drop for Dropped {
                fn drop(&mut self) {
                    let _ = self.0.send("dropped");
                }
            }
            let _d = Dropped(tx);
            std::future::pending::<()>().await;
            Response::new(text("never"))
        }
    });
    s.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.client.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
    assert_eq!(got.unwrap(), Some("dropped"));
    assert_eq!(s.closed().await, "");
}
