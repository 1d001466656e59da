//! L7 authorization at the destination: where a policy with HTTP attributes (methods,
//! paths, hosts, `request.headers`) applies to a pod's port (`authz::needs_http`), the
//! inbound connection (plain text, or a tunnel's stream) is served as HTTP here instead
//! of relayed: every request is judged with `authz::authorize_request` against the
//! configuration in force when it arrives. A denied request gets Envoy's answer (`403`,
//! `RBAC: access denied`); an allowed one goes to the pod over a connection made inside
//! it, and its response streams back.
//!
//! - HTTP/1.1, or HTTP/2 with prior knowledge (the connection preface, sniffed with
//!   `proxy::http::detect`). The pod is spoken to in the same version, as Istio's inbound
//!   clusters do (`useDownstreamProtocol`).
//! - One upstream connection per downstream connection, opened at the first allowed
//!   request (a client denied everything never reaches the pod), reopened if the pod
//!   closed it; an HTTP/2 one carries the streams of its downstream connection.
//! - Bounded: header blocks (`MAX_HEADER_BYTES`), streams per HTTP/2 connection, time to
//!   send a request head; bodies stream both ways with the codecs' flow control, nothing
//!   is buffered whole. A malformed request gets `400` from the codec (`431` for headers
//!   too large).
//! - The path is normalized before it is judged, and forwarded normalized, as Envoy's
//!   `normalize_path` (Istio's default) does: `/x/../admin` is `/admin` for the policy
//!   and for the application alike.
//! - An HTTP/1 connection the server ends (`connection: close`) closes as a TCP server
//!   would, our end of stream first (`lingering_close`): on a tunnel, dropping the stream
//!   early would reset it, and the reset could overtake the last response.
//! - WebSocket upgrades pass once the upgrade request did (`upgrade`): the connection
//!   is then spliced to the pod, bytes both ways, a failure a reset.
//! - The pod sees the source the request was judged by in `x-forwarded-for`, one
//!   address set by the agent (`set_forwarded_for`): whatever the client sent under that
//!   name is replaced, never appended to, since any client can write it.

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::{
    body::Incoming,
    client::conn::{http1 as client1, http2 as client2},
    server::conn::{http1, http2},
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tracing::{debug, info, Instrument};

use crate::{
    identity::SpiffeId,
    metrics::Metrics,
    proxy::{
        accesslog::{self, AccessLog, Entry, Flags, PathTaken, Protocol},
        authz::{self, ConnCtx, Verdict},
        config::policy::MeshConfig,
        http::{detect, strip_hop_by_hop, Prefixed, Sniffed, SpanExec},
        inbound::telemetry::{Counted, HttpReport, RequestReport},
        trace::Tracer,
    },
};

mod upgrade;
pub use self::upgrade::Downstream;

/// Largest request header block accepted (bytes): Envoy's default
/// `max_request_headers_kb` is 60.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Longest wait for a connection's first bytes, and for a request head after them.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Streams one HTTP/2 downstream connection may have open (the HBONE server's figure).
pub const MAX_STREAMS: u32 = 100;
/// How long opening the connection into the pod may take.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What Envoy's RBAC filter answers a denied request with.
pub const DENIED_BODY: &str = "RBAC: access denied";

type Body = UnsyncBoxBody<Bytes, hyper::Error>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The configuration in force now (read at each request).
pub type MeshNow = Arc<dyn Fn() -> Arc<MeshConfig> + Send + Sync>;
/// Opens a connection to the destination, from inside its pod.
pub type Dial = Arc<dyn Fn() -> BoxFuture<io::Result<TcpStream>> + Send + Sync>;

/// One inbound connection whose HTTP the agent terminates.
pub struct Terminate {
    pub mesh: MeshNow,
    pub dial: Dial,
    pub metrics: Arc<Metrics>,
    /// The source's address (the client, or the peer node for a tunnel).
    pub src_ip: IpAddr,
    /// The tunnel peer's verified identity; `None`: plain text.
    pub src_identity: Option<SpiffeId>,
    /// The pod's address and port dialled.
    pub dst: SocketAddr,
    /// For logs: `inbound-plain` or `inbound-tunnel`.
    pub path: &'static str,
    /// A line per request when set (`proxy::accesslog`).
    pub access_log: Option<AccessLog>,
    /// A span per request when set and sampled (`proxy::trace`).
    pub tracer: Option<Tracer>,
}

/// Serves `io` as HTTP until the client or the codec ends it (or, after an upgrade, until
/// the spliced connection ends).
pub async fn serve<IO>(mut io: IO, t: Terminate)
where
    IO: Downstream,
{
    let (prefix, sniffed) = match detect(&mut io, HEADER_TIMEOUT).await {
        Ok(x) => x,
        Err(e) => {
            debug!(error = %e, "reading the first bytes failed");
            return;
        }
    };
    if prefix.is_empty() {
        // Nothing sent within the wait, or closed at once: nothing to answer.
        return;
    }
    let http2 = sniffed == Sniffed::Http2;
    let io = TokioIo::new(Prefixed::new(prefix, io));
    let conn = Arc::new(Conn {
        report: Arc::new(HttpReport::of(&t)),
        t,
        http2,
        h1: std::sync::Mutex::new(None),
        h2: tokio::sync::Mutex::new(None),
        upgraded: std::sync::Mutex::new(None),
    });
    let served = conn.clone();
    let svc = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(conn.handle_logged(req).await) }
    });
    let r = if http2 {
        http2::Builder::new(SpanExec)
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .max_concurrent_streams(MAX_STREAMS)
            .serve_connection(io, svc)
            .await
    } else {
        // Anything that is not the HTTP/2 preface goes to the HTTP/1 codec, which
        // answers 400 to what does not parse.
        let done = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(MAX_HEADER_BYTES)
            .half_close(true)
            .serve_connection(io, svc)
            .without_shutdown()
            .await;
        // Set when the last answer was a `101` the pod gave (`upgrade`).
        let upgraded = served
            .upgraded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match (done, upgraded) {
            (Ok(parts), Some(up)) => {
                upgrade::splice(parts.io.into_inner(), parts.read_buf, up).await;
                Ok(())
            }
            (Ok(parts), None) => {
                lingering_close(parts.io.into_inner()).await;
                Ok(())
            }
            (Err(e), up) => {
                if let Some(up) = up {
                    up.abandon();
                }
                Err(e)
            }
        }
    };
    if let Err(e) = r {
        debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// How long a closed HTTP/1 connection waits for the client's end of stream.
const LINGER: Duration = Duration::from_secs(2);
/// Bytes a closed HTTP/1 connection reads and discards meanwhile.
const LINGER_BYTES: usize = 64 * 1024;

/// Closes an HTTP/1 connection the server ended (`connection: close`) as a TCP server
/// would: our end of stream first, then read what the client still sends until its own
/// end. A tunnel stream dropped before both directions ended is reset (`HboneStream`),
/// and the reset could overtake the last response on its way to the client.
async fn lingering_close<IO: AsyncRead + AsyncWrite + Unpin>(mut io: IO) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if io.shutdown().await.is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    let mut left = LINGER_BYTES;
    let _ = tokio::time::timeout(LINGER, async {
        while left > 0 {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// The upstream connection of an HTTP/1 downstream connection: its requests come one at
/// a time, so the sender is taken for a request and put back with its response.
type H1Sender = client1::SendRequest<Incoming>;
type H2Sender = client2::SendRequest<Incoming>;

struct Conn {
    /// Istio's destination series and spans of its requests (`inbound::telemetry`).
    report: Arc<HttpReport>,
    t: Terminate,
    http2: bool,
    h1: std::sync::Mutex<Option<H1Sender>>,
    h2: tokio::sync::Mutex<Option<H2Sender>>,
    /// The pod's side of an upgrade it switched to, for `serve` to splice.
    upgraded: std::sync::Mutex<Option<upgrade::Accepted>>,
}

#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("connecting into the pod: {0}")]
    Connect(io::Error),
    #[error("connecting into the pod timed out after {0:?}")]
    Timeout(Duration),
    #[error("HTTP handshake with the pod: {0}")]
    Handshake(hyper::Error),
    #[error("the pod reset or closed the connection before a response: {0}")]
    Reset(hyper::Error),
    #[error("the pod switched to a protocol that was not asked for, or is not spliced")]
    BadSwitch,
}

impl Conn {
    /// `handle`, with the request's access-log line (when the log is on), Istio's
    /// destination series and its span counted once the response body has gone out (or
    /// was dropped).
    async fn handle_logged(&self, mut req: Request<Incoming>) -> Response<Body> {
        // Starts the span (sampled) and names it the parent on the request forwarded.
        let report = self.report.request(&mut req);
        let log = self.t.access_log.clone().filter(|l| l.on());
        let t = &self.t;
        let path = if t.src_identity.is_some() {
            PathTaken::InboundTunnel
        } else {
            PathTaken::Inbound
        };
        // Always made: `handle` notes the verdict and the flags in it.
        let mut e = Entry::new(Protocol::of(req.version()), path);
        if log.is_some() {
            fill_request(&mut e, t, &req);
        }
        let mut entry = Some(Box::new(e));
        let resp = self.handle(req, &mut entry).await;
        let Some(mut e) = entry else {
            return resp;
        };
        let code = resp.status().as_u16();
        if let Some(h) = e.http.as_mut() {
            h.response_code = code;
        }
        // Sent when the body is dropped: after its last frame, or when the client left.
        let mut line = LineOnDrop {
            log,
            entry: Some(e),
            sent: 0,
            report: Some((self.report.clone(), report)),
            code,
        };
        let (parts, body) = resp.into_parts();
        // (Its length kept: a sized answer keeps its `content-length`.)
        let body = Counted::new(body, move |n| line.count(n));
        Response::from_parts(parts, body.boxed_unsync())
    }
}

/// The request's fields of its access-log line.
fn fill_request(e: &mut Entry, t: &Terminate, req: &Request<Incoming>) {
    e.source_address = Some(accesslog::Addr::Ip(t.src_ip));
    e.source_principal = t.src_identity.as_ref().map(ToString::to_string);
    e.destination_address = Some(t.dst);
    e.http = Some(accesslog::HttpFields {
        method: req.method().as_str().to_owned(),
        authority: req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
            .map(str::to_owned),
        path: accesslog::bounded_path(req.uri().path_and_query().map_or("/", |p| p.as_str())),
        response_code: 0,
        attempts: 0,
    });
}

impl Conn {
    async fn handle(&self, req: Request<Incoming>, log: &mut Option<Box<Entry>>) -> Response<Body> {
        let t = &self.t;
        let mesh = (t.mesh)();
        let Some(dst) = mesh.workloads.by_ip(t.dst.ip()) else {
            // The pod left the configuration while the connection lasted: nothing to
            // judge against, and it is on its way out.
            t.metrics
                .authz
                .unknown
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "destination workload not in the configuration",
            );
        };
        let (mut parts, body) = req.into_parts();
        // Policies and the application must see the same path: `/x/../admin` is judged
        // as `/admin`, and forwarded so.
        match normalize_uri(&parts.uri) {
            Ok(Some(uri)) => parts.uri = uri,
            Ok(None) => {}
            Err(()) => return text(StatusCode::BAD_REQUEST, "Bad Request"),
        }
        let ctx = ConnCtx {
            src_ip: t.src_ip,
            src_identity: t.src_identity.as_ref(),
            dst,
            dst_ip: t.dst.ip(),
            dst_port: t.dst.port(),
            tls: t.src_identity.is_some(),
        };
        let v = authz::authorize_request(&mesh.policies, &ctx, &parts);
        t.metrics
            .authz
            .count_request("inbound", v.allowed, v.policy_name.as_deref());
        if let Some(e) = log.as_mut() {
            e.destination_workload = Some(format!("{}/{}", dst.namespace, dst.name));
            e.destination_principal = Some(dst.identity.to_string());
            e.policy_verdict = Some(if v.allowed {
                accesslog::Verdict::Allow
            } else {
                accesslog::Verdict::Deny
            });
            e.policy_name = v.policy_name.as_deref().map(str::to_owned);
        }
        if !v.allowed {
            log_denial(t.path, &ctx, &parts, &v);
            if let Some(e) = log.as_mut() {
                e.flag(Flags::RBAC);
            }
            return text(StatusCode::FORBIDDEN, DENIED_BODY);
        }
        if let Some(e) = log.as_mut() {
            e.upstream_host = Some(t.dst);
            if let Some(h) = e.http.as_mut() {
                h.attempts = 1;
            }
        }
        drop(mesh);
        set_forwarded_for(&mut parts.headers, t.src_ip);
        let upgrade = if self.http2 {
            None
        } else {
            upgrade::requested(&parts)
        };
        let forwarded = match upgrade {
            Some(proto) => self.forward_upgrade(parts, body, proto).await,
            None => {
                strip_hop_by_hop(&mut parts.headers, self.http2);
                let req = Request::from_parts(parts, body);
                self.forward(req).await.map(|resp| {
                    let (mut parts, body) = resp.into_parts();
                    strip_hop_by_hop(&mut parts.headers, self.http2);
                    Response::from_parts(parts, body.boxed_unsync())
                })
            }
        };
        match forwarded {
            Ok(resp) => resp,
            Err(e) => {
                debug!(dst = %t.dst, error = %e, "forwarding into the pod failed");
                if let Some(l) = log.as_mut() {
                    l.flag(match e {
                        UpstreamError::Reset(_) => Flags::UC,
                        _ => Flags::UF,
                    });
                    l.connection_termination_details = Some(e.to_string());
                }
                // Envoy's answer when the upstream cannot be reached or resets first.
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers",
                )
            }
        }
    }

    async fn connect(&self) -> Result<TokioIo<TcpStream>, UpstreamError> {
        let s = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, (self.t.dial)())
            .await
            .map_err(|_| UpstreamError::Timeout(UPSTREAM_CONNECT_TIMEOUT))?
            .map_err(UpstreamError::Connect)?;
        let _ = s.set_nodelay(true);
        Ok(TokioIo::new(s))
    }

    async fn forward(&self, req: Request<Incoming>) -> Result<Response<Incoming>, UpstreamError> {
        let span = || tracing::debug_span!("inbound_upstream", dst = %self.t.dst);
        if self.http2 {
            let sender = {
                let mut slot = self.h2.lock().await;
                match slot.as_ref().filter(|s| !s.is_closed()) {
                    Some(s) => s.clone(),
                    None => {
                        let (s, conn) = client2::Builder::new(SpanExec)
                            .timer(TokioTimer::new())
                            .handshake(self.connect().await?)
                            .await
                            .map_err(UpstreamError::Handshake)?;
                        tokio::spawn(conn.instrument(span()));
                        *slot = Some(s.clone());
                        s
                    }
                }
            };
            let mut sender = sender;
            return sender.send_request(req).await.map_err(UpstreamError::Reset);
        }
        let taken = self.h1.lock().unwrap_or_else(|e| e.into_inner()).take();
        // Ready once the previous response was read to its end; an error: the pod closed.
        let reusable = match taken {
            Some(mut s) => s.ready().await.is_ok().then_some(s),
            None => None,
        };
        let mut sender = match reusable {
            Some(s) => s,
            None => {
                let (s, conn) = client1::Builder::new()
                    .handshake(self.connect().await?)
                    .await
                    .map_err(UpstreamError::Handshake)?;
                tokio::spawn(
                    async move {
                        if let Err(e) = conn.await {
                            debug!(error = %e, "upstream connection ended");
                        }
                    }
                    .instrument(span()),
                );
                s
            }
        };
        let r = sender.send_request(req).await;
        *self.h1.lock().unwrap_or_else(|e| e.into_inner()) = Some(sender);
        r.map_err(UpstreamError::Reset)
    }
}

/// Sends its access-log line (if the log is on) when dropped, with the response bytes
/// counted, and counts the request in Istio's series and ends its span.
struct LineOnDrop {
    log: Option<AccessLog>,
    entry: Option<Box<Entry>>,
    sent: u64,
    report: Option<(Arc<HttpReport>, RequestReport)>,
    /// The status sent.
    code: u16,
}

impl LineOnDrop {
    /// A method, so the body's closure owns the whole line (and sends it when dropped),
    /// not a copy of the count.
    fn count(&mut self, bytes: usize) {
        self.sent += bytes as u64;
    }
}

impl Drop for LineOnDrop {
    fn drop(&mut self) {
        if let Some(mut e) = self.entry.take() {
            e.bytes_sent = Some(self.sent);
            if let Some((conn, request)) = self.report.take() {
                request.finish(&conn, &e, self.code, self.sent);
            }
            if let Some(log) = &self.log {
                e.finish();
                log.send(e);
            }
        }
    }
}

/// `x-forwarded-for: <the source the request was judged by>`, replacing what the client
/// sent under that name: one address, never a chain a client could have started.
fn set_forwarded_for(headers: &mut http::HeaderMap, src: IpAddr) {
    headers.insert(
        header::HeaderName::from_static("x-forwarded-for"),
        HeaderValue::try_from(src.to_string()).expect("an IP address is a valid header value"),
    );
}

fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never: Infallible| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn log_denial(path: &'static str, ctx: &ConnCtx<'_>, req: &http::request::Parts, v: &Verdict) {
    info!(
        target: "mesh_agent::authz",
        direction = path,
        source = %ctx.src_ip,
        principal = ctx.src_identity.map(|i| i.to_string()).unwrap_or_default(),
        destination = %ctx.dst.name,
        namespace = %ctx.dst.namespace,
        port = ctx.dst_port,
        method = %req.method,
        path = req.uri.path(),
        policy = v.policy_name.as_deref().unwrap_or("-"),
        reason = v.reason.as_str(),
        "request denied"
    );
}

/// The URI with its path normalized as Envoy's `normalize_path` (Istio's default, `BASE`)
/// does, RFC 3986: percent-encoded unreserved characters decoded (`%61` is `a`, `%2E`
/// is `.`), dot segments removed (section 5.2.4). `%2F` stays encoded and slashes are not
/// merged, as with `BASE`; `..` at the root stays at the root. `None`: already normal;
/// an error: not a valid URI once normalized (Envoy answers 400 then too).
fn normalize_uri(uri: &http::Uri) -> Result<Option<http::Uri>, ()> {
    let path = uri.path();
    if !path.starts_with('/') {
        // `*` (OPTIONS), or an empty path: nothing to normalize.
        return Ok(None);
    }
    let decoded = decode_unreserved(path);
    let normal = remove_dot_segments(&decoded);
    if normal == path {
        return Ok(None);
    }
    let pq = match uri.query() {
        Some(q) => format!("{normal}?{q}"),
        None => normal,
    };
    let mut b = http::Uri::builder().path_and_query(pq);
    if let Some(s) = uri.scheme() {
        b = b.scheme(s.clone());
    }
    if let Some(a) = uri.authority() {
        b = b.authority(a.clone());
    }
    b.build().map(Some).map_err(|_| ())
}

fn decode_unreserved(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    out.push(c);
                    i += 3;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    // Only ASCII bytes were replaced by ASCII bytes.
    String::from_utf8(out).unwrap_or_else(|_| path.to_owned())
}

/// RFC 3986 section 5.2.4 on an absolute path (`..` at the root is dropped).
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, path::Path, sync::Mutex};

    use http_body_util::BodyExt;
    use prost::Message;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;
    use crate::{
        control::translate::Translator,
        enrol::file::MeshFile,
        proxy::xds::convert::{self, Accepted, AddressSpec},
        wire::istio,
    };

    const BASE: &str = "\
namespaces:
  - name: shop
    labels: { mesh-agent.io/dataplane-mode: ambient }
workloads:
  - { name: web, namespace: shop, ip: 10.0.0.2, netns: /n/web, service_account: web, labels: { app: web } }
";

    /// The file's policies through the file check, the translation and the conversion
    /// (as `authz`'s tests do).
    pub(super) fn mesh(policies: &str) -> Arc<MeshConfig> {
        let text = format!("{BASE}{policies}");
        let f = MeshFile::parse(Path::new("t.yaml"), &text).unwrap();
        let mut t = Translator::default();
        let d = t.update_mesh(
            &f.services,
            &f.members_on("node-a"),
            &Arc::new(f.security()),
        );
        let mut acc = Accepted::default();
        for (_, any) in d.upserts {
            let v = any.value.as_slice();
            match any.type_url.as_str() {
                istio::ADDRESS_TYPE_URL => {
                    let (n, spec) = convert::address(&istio::Address::decode(v).unwrap()).unwrap();
                    if let AddressSpec::Workload(w) = spec {
                        acc.workloads.insert(n, w);
                    }
                }
                istio::AUTHORIZATION_TYPE_URL => {
                    let (n, p) =
                        convert::authorization(&istio::Authorization::decode(v).unwrap()).unwrap();
                    acc.authorizations.insert(n, Arc::new(p));
                }
                istio::PEER_AUTHENTICATION_TYPE_URL => {
                    let (n, p) = convert::peer_authentication(
                        &istio::PeerAuthentication::decode(v).unwrap(),
                    )
                    .unwrap();
                    acc.peer_authentications.insert(n, Arc::new(p));
                }
                _ => {}
            }
        }
        Arc::new(acc.build_mesh())
    }

    const GET_OK_FROM_CLIENT: &str = "authorization_policies:
  - metadata: { name: get-ok, namespace: shop }
    spec:
      selector: { matchLabels: { app: web } }
      rules:
        - from: [ { source: { principals: [ cluster.local/ns/other/sa/client ] } } ]
          to: [ { operation: { methods: [ GET ], paths: [ \"/ok*\" ] } } ]
";

    pub(super) const DENY_ADMIN: &str = "authorization_policies:
  - metadata: { name: no-admin, namespace: shop }
    spec:
      action: DENY
      rules: [ { to: [ { operation: { paths: [ \"/admin*\" ] } } ] } ]
";

    /// The pod's application: answers `METHOD PATH VERSION` (and the body it read).
    async fn app(http2: bool) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let head = format!("{} {} {:?}", req.method(), req.uri().path(), req.version());
                    let body = req.into_body().collect().await?.to_bytes();
                    let text = format!("{head} {}", String::from_utf8_lossy(&body));
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(text))))
                });
                let io = TokioIo::new(s);
                tokio::spawn(async move {
                    if http2 {
                        let _ = http2::Builder::new(SpanExec)
                            .serve_connection(io, svc)
                            .await;
                    } else {
                        let _ = http1::Builder::new().serve_connection(io, svc).await;
                    }
                });
            }
        });
        addr
    }

    /// An inbound listener terminating HTTP in front of `app`, judged by whatever `policy`
    /// holds at each request. Returns its address, the counters and the upstream dials.
    pub(super) async fn front(
        app: SocketAddr,
        policy: Arc<Mutex<Arc<MeshConfig>>>,
        identity: Option<&str>,
    ) -> (SocketAddr, Arc<Metrics>, Arc<std::sync::atomic::AtomicU64>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        let dials = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (m, d) = (metrics.clone(), dials.clone());
        let identity: Option<SpiffeId> = identity.map(|s| s.parse().unwrap());
        tokio::spawn(async move {
            loop {
                let (s, peer) = l.accept().await.unwrap();
                let policy = policy.clone();
                let d = d.clone();
                let t = Terminate {
                    mesh: Arc::new(move || policy.lock().unwrap().clone()),
                    dial: Arc::new(move || {
                        d.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        Box::pin(TcpStream::connect(app))
                    }),
                    metrics: m.clone(),
                    src_ip: peer.ip(),
                    src_identity: identity.clone(),
                    dst: SocketAddr::from(([10, 0, 0, 2], 80)),
                    path: "test",
                    access_log: None,
                    tracer: None,
                };
                tokio::spawn(serve(s, t));
            }
        });
        (addr, metrics, dials)
    }

    async fn h1(addr: SocketAddr) -> client1::SendRequest<Full<Bytes>> {
        let s = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = client1::handshake(TokioIo::new(s)).await.unwrap();
        tokio::spawn(conn);
        sender
    }

    async fn send<S>(sender: &mut S, method: &str, path: &str, body: &str) -> (u16, String)
    where
        S: Sender,
    {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "web.shop")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let resp = sender.send(req).await;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    trait Sender {
        fn send(
            &mut self,
            req: Request<Full<Bytes>>,
        ) -> impl Future<Output = Response<Incoming>> + Send;
    }

    impl Sender for client1::SendRequest<Full<Bytes>> {
        async fn send(&mut self, req: Request<Full<Bytes>>) -> Response<Incoming> {
            self.ready().await.unwrap();
            self.send_request(req).await.unwrap()
        }
    }

    impl Sender for client2::SendRequest<Full<Bytes>> {
        async fn send(&mut self, mut req: Request<Full<Bytes>>) -> Response<Incoming> {
            *req.uri_mut() = format!("http://web.shop{}", req.uri()).parse().unwrap();
            self.ready().await.unwrap();
            self.send_request(req).await.unwrap()
        }
    }

    fn decisions(m: &Metrics, verdict: &str, policy: &str) -> u64 {
        let text = m.render(&[]);
        let want = format!(
            "mesh_authz_decisions_total{{direction=\"inbound\",level=\"request\",verdict=\"{verdict}\",policy=\"{policy}\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(want.as_str()))
            .map_or(0, |n| n.parse().unwrap())
    }

    const CLIENT: &str = "spiffe://cluster.local/ns/other/sa/client";

    #[tokio::test]
    async fn each_request_is_judged_and_allowed_ones_reach_the_pod_on_one_connection() {
        let policy = Arc::new(Mutex::new(mesh(GET_OK_FROM_CLIENT)));
        let (addr, metrics, dials) = front(app(false).await, policy, Some(CLIENT)).await;
        let mut c = h1(addr).await;
        assert_eq!(
            send(&mut c, "GET", "/nope", "").await,
            (403, DENIED_BODY.into())
        );
        assert_eq!(
            dials.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "a client denied everything never reaches the pod"
        );
        assert_eq!(
            send(&mut c, "GET", "/ok/1?x=1", "").await,
            (200, "GET /ok/1 HTTP/1.1 ".into())
        );
        assert_eq!(send(&mut c, "POST", "/ok", "data").await.0, 403);
        assert_eq!(
            send(&mut c, "GET", "/ok", "").await,
            (200, "GET /ok HTTP/1.1 ".into())
        );
        // Keep-alive both ways: one downstream connection, one upstream.
        assert_eq!(dials.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(decisions(&metrics, "allow", "shop/get-ok"), 2);
        // (A refusal for want of a matching ALLOW is named after an ALLOW that applies.)
        assert_eq!(decisions(&metrics, "deny", "shop/get-ok"), 2);
    }

    #[tokio::test]
    async fn plain_text_matches_no_principal() {
        let policy = Arc::new(Mutex::new(mesh(GET_OK_FROM_CLIENT)));
        let (addr, _, _) = front(app(false).await, policy, None).await;
        let mut c = h1(addr).await;
        assert_eq!(send(&mut c, "GET", "/ok", "").await.0, 403);
    }

    #[tokio::test]
    async fn the_policy_in_force_decides_each_request_of_a_connection() {
        let policy = Arc::new(Mutex::new(mesh(DENY_ADMIN)));
        let (addr, metrics, _) = front(app(false).await, policy.clone(), None).await;
        let mut c = h1(addr).await;
        assert_eq!(send(&mut c, "GET", "/admin/x", "").await.0, 403);
        assert_eq!(
            send(&mut c, "POST", "/other", "body").await,
            (200, "POST /other HTTP/1.1 body".into())
        );
        assert_eq!(decisions(&metrics, "deny", "shop/no-admin"), 1);
        // The DENY goes: the next request on the same connection passes.
        *policy.lock().unwrap() = mesh("");
        assert_eq!(send(&mut c, "GET", "/admin/x", "").await.0, 200);
    }

    #[tokio::test]
    async fn http2_prior_knowledge_is_judged_per_stream_and_spoken_to_the_pod() {
        let policy = Arc::new(Mutex::new(mesh(DENY_ADMIN)));
        let (addr, _, dials) = front(app(true).await, policy, None).await;
        let s = TcpStream::connect(addr).await.unwrap();
        let (mut c, conn) = client2::Builder::new(SpanExec)
            .handshake::<_, Full<Bytes>>(TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        assert_eq!(
            send(&mut c, "GET", "/admin", "").await,
            (403, DENIED_BODY.into())
        );
        assert_eq!(
            send(&mut c, "GET", "/a", "").await,
            (200, "GET /a HTTP/2.0 ".into())
        );
        assert_eq!(send(&mut c, "GET", "/b", "").await.0, 200);
        assert_eq!(dials.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn malformed_requests_get_400_and_oversized_headers_431() {
        let policy = Arc::new(Mutex::new(mesh(DENY_ADMIN)));
        let (addr, _, dials) = front(app(false).await, policy, None).await;
        async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(bytes).await.unwrap();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            String::from_utf8_lossy(&out)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        }
        let line = raw(addr, b"GET /x HTTP/1.1\r\nbad header\r\n\r\n").await;
        assert!(line.starts_with("HTTP/1.1 400"), "{line}");
        let line = raw(addr, b"NOT HTTP AT ALL\r\n\r\n").await;
        assert!(line.starts_with("HTTP/1.1 400"), "{line}");
        let big = format!(
            "GET / HTTP/1.1\r\nhost: a\r\nx-big: {}\r\n\r\n",
            "a".repeat(MAX_HEADER_BYTES + 1024)
        );
        let line = raw(addr, big.as_bytes()).await;
        assert!(line.starts_with("HTTP/1.1 431"), "{line}");
        assert_eq!(dials.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn an_unreachable_pod_is_a_503() {
        let policy = Arc::new(Mutex::new(mesh("")));
        // Bound then dropped: nothing listens there.
        let gone = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let (addr, _, _) = front(gone, policy, None).await;
        let mut c = h1(addr).await;
        assert_eq!(send(&mut c, "GET", "/", "").await.0, 503);
    }

    #[test]
    fn paths_are_normalized_as_envoy_does_by_default() {
        for (uri, want) in [
            ("/a/b?q=1", None),
            ("/x/../admin", Some("/admin")),
            ("/./admin/./", Some("/admin/")),
            ("/%61dmin/%2e%2E/%61dmin", Some("/admin")),
            ("/a/..", Some("/")),
            ("/a%2Fb//c", None),
            ("/a/b/..?x=/../", Some("/a/?x=/../")),
            ("http://h.example/x/../y", Some("http://h.example/y")),
            ("*", None),
            // Above the root: stays at the root.
            ("/..", Some("/")),
            ("/a/../../b", Some("/b")),
            ("/%2e%2e/etc", Some("/etc")),
        ] {
            let uri: http::Uri = uri.parse().unwrap();
            let got = normalize_uri(&uri).unwrap().map(|u| u.to_string());
            assert_eq!(got.as_deref(), want, "{uri}");
        }
    }

    #[tokio::test]
    async fn dot_segments_do_not_get_around_a_path_rule() {
        let policy = Arc::new(Mutex::new(mesh(DENY_ADMIN)));
        let (addr, _, _) = front(app(false).await, policy, None).await;
        let mut c = h1(addr).await;
        assert_eq!(send(&mut c, "GET", "/x/../admin", "").await.0, 403);
        assert_eq!(send(&mut c, "GET", "/%61dmin", "").await.0, 403);
        // What is allowed reaches the application normalized.
        assert_eq!(
            send(&mut c, "GET", "/x/./../y", "").await,
            (200, "GET /y HTTP/1.1 ".into())
        );
        assert_eq!(send(&mut c, "GET", "/../admin", "").await.0, 403);
    }

    #[test]
    fn hop_by_hop_headers_stay_on_their_hop() {
        let mut h = http::HeaderMap::new();
        for (k, v) in [
            ("connection", "close, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "5"),
            ("te", "trailers"),
            ("x-end", "1"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        let mut h1 = h.clone();
        strip_hop_by_hop(&mut h1, false);
        assert_eq!(h1.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-end"]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("te").unwrap(), "trailers");
        assert!(h.get("x-hop").is_none());
    }
}
