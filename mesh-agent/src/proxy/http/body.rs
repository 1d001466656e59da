//! Bodies: request bodies recorded (up to a cap) so a retry can replay them, their failures
//! kept as the client's (never held against the upstream), and response bodies that keep
//! the request's resources (circuit-breaker slot, pooled connection, metrics) until their
//! last frame, and enforce the route timeout while streaming.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex, OnceLock, Weak,
    },
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::{
    h2server,
    lb::EndpointState,
    policy::Slot,
    pool::{EndpointPool, Sender, UpBody},
    server,
    timer::Timer,
    BoxError, ProxyBody,
};
use crate::{
    metrics::{istio::RequestTelemetry, L7Metrics, RequestLabels, RequestSeries},
    proxy::{
        accesslog::{AccessLog, Entry, Flags},
        config::{Cluster, Listener, ListenerKind},
    },
};

/// Largest request body kept for replay; bigger requests are streamed and never retried.
pub(super) const REPLAY_LIMIT: usize = 64 * 1024;

#[derive(Debug, Default)]
struct Recording {
    data: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    len: usize,
    complete: bool,
    overflow: bool,
}

/// A downstream request body: hyper's (HTTP/2 with `--l7-h2-server hyper`, HTTP/1.1 with
/// `--l7-h1-server hyper`), the own HTTP/1.1 codec's (`server`) or the own HTTP/2
/// server's (`h2server`).
pub(super) enum ReqBody {
    Hyper(Incoming),
    Own(server::Body),
    H2(h2server::Body),
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            ReqBody::Own(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            ReqBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Hyper(b) => b.is_end_stream(),
            ReqBody::Own(b) => b.is_end_stream(),
            ReqBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Hyper(b) => b.size_hint(),
            ReqBody::Own(b) => b.size_hint(),
            ReqBody::H2(b) => b.size_hint(),
        }
    }
}

/// The downstream request body on its first try: copied for replay when a retry may need
/// it, and its failures marked as the client's. hyper reports a request body's error as
/// the upstream request's failure (and over HTTP/2 only as a stream reset), so the source
/// of the body, not the error hyper returns, says whose fault it was.
struct Downstream {
    inner: ReqBody,
    rec: Option<Arc<Mutex<Recording>>>,
    failed: Arc<OnceLock<String>>,
    /// Body bytes received from the client (the access log's `bytes_received`).
    received: Arc<AtomicU64>,
}

/// The client's request body failed: malformed framing (a bad chunk), a reset stream, or
/// a connection closed before the body's end.
#[derive(Debug, thiserror::Error)]
#[error("downstream request body: {0}")]
struct ClientBodyError(#[source] BoxError);

/// An error with its causes (hyper's own message is only "error reading a body").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

fn record(rec: &Mutex<Recording>, frame: &Option<Result<Frame<Bytes>, BoxError>>, end: bool) {
    let mut rec = rec.lock().unwrap_or_else(|e| e.into_inner());
    match frame {
        Some(Ok(f)) => {
            if let Some(d) = f.data_ref() {
                if !rec.overflow {
                    rec.len += d.len();
                    if rec.len > REPLAY_LIMIT {
                        rec.overflow = true;
                        rec.data = Vec::new();
                    } else {
                        rec.data.push(d.clone());
                    }
                }
            } else if let Some(t) = f.trailers_ref() {
                rec.trailers = Some(t.clone());
            }
            rec.complete |= end;
        }
        None => rec.complete = true,
        Some(Err(_)) => {}
    }
}

impl Body for Downstream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(rec) = &self.rec {
            record(rec, &frame, self.inner.is_end_stream());
        }
        if let Some(d) = frame.as_ref().and_then(|f| f.as_ref().ok()?.data_ref()) {
            self.received.fetch_add(d.len() as u64, Relaxed);
        }
        Poll::Ready(frame.map(|r| {
            r.map_err(|e| {
                let _ = self.failed.set(chain(&*e));
                BoxError::from(ClientBodyError(e))
            })
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A recorded body played again.
struct Replay {
    data: std::vec::IntoIter<Bytes>,
    trailers: Option<HeaderMap>,
    remaining: u64,
}

impl Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(d) = self.data.next() {
            self.remaining -= d.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.len() == 0 && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Where each try's request body comes from.
pub(super) struct Source {
    first: Option<ReqBody>,
    rec: Option<Arc<Mutex<Recording>>>,
    /// Why the downstream body failed, once it has; made with the first try's body (a
    /// bodiless request, the common case, allocates neither this nor `received`).
    failed: Option<Arc<OnceLock<String>>>,
    received: Option<Arc<AtomicU64>>,
}

impl Source {
    /// `replayable`: a retry policy applies, so record bodies that fit the cap.
    pub fn new(body: ReqBody, replayable: bool) -> Source {
        let fits = body
            .size_hint()
            .upper()
            .is_none_or(|u| u <= REPLAY_LIMIT as u64)
            && body.size_hint().lower() <= REPLAY_LIMIT as u64;
        let rec = (replayable && fits).then(|| {
            Arc::new(Mutex::new(Recording {
                complete: body.is_end_stream(),
                ..Recording::default()
            }))
        });
        Source {
            first: Some(body),
            rec,
            failed: None,
            received: None,
        }
    }

    /// Whether the request has a body still to come (before the first try takes it).
    pub fn has_body(&self) -> bool {
        self.first.as_ref().is_some_and(|b| !b.is_end_stream())
    }

    /// The count of body bytes received from the client so far.
    pub fn received(&mut self) -> Arc<AtomicU64> {
        self.received.get_or_insert_with(Arc::default).clone()
    }

    /// Why the client's body failed, if it did: a try that failed then failed because of
    /// the client, whatever the upstream connection reported.
    pub fn client_error(&self) -> Option<&str> {
        self.failed.as_ref()?.get().map(String::as_str)
    }

    /// Whether another try can get the whole body.
    pub fn can_replay(&self) -> bool {
        self.first.is_some()
            || self.rec.as_ref().is_some_and(|r| {
                let r = r.lock().unwrap_or_else(|e| e.into_inner());
                r.complete && !r.overflow
            })
    }

    /// The body for the next try (`can_replay` said yes).
    pub fn next(&mut self) -> ProxyBody {
        if let Some(b) = self.first.take() {
            if b.is_end_stream() {
                // Nothing to read, count or fail: no wrapper (an empty body boxes nothing).
                return super::empty();
            }
            return Downstream {
                inner: b,
                rec: self.rec.clone(),
                failed: self.failed.get_or_insert_with(Arc::default).clone(),
                received: self.received(),
            }
            .boxed_unsync();
        }
        let r = self
            .rec
            .as_ref()
            .map(|r| {
                let r = r.lock().unwrap_or_else(|e| e.into_inner());
                (r.data.clone(), r.trailers.clone(), r.len as u64)
            })
            .unwrap_or_default();
        Replay {
            data: r.0.into_iter(),
            trailers: r.1,
            remaining: r.2,
        }
        .boxed_unsync()
    }
}

/// A label a request takes from the configuration in force, borrowed through the `Arc`
/// that holds it rather than copied per request.
#[derive(Clone)]
pub(super) enum Name {
    Static(&'static str),
    /// A listener's name (the `destination_service` label).
    Listener(Arc<Listener>),
    Cluster(Arc<Cluster>),
    /// A route's name: the listener, the virtual host's and the route's index in it.
    Route(Arc<Listener>, usize, usize),
}

impl std::ops::Deref for Name {
    type Target = str;

    fn deref(&self) -> &str {
        match self {
            Name::Static(s) => s,
            Name::Listener(l) => &l.name,
            Name::Cluster(c) => &c.name,
            Name::Route(l, v, r) => match &l.kind {
                ListenerKind::Http(h) => h
                    .route_config
                    .virtual_hosts
                    .get(*v)
                    .and_then(|v| v.routes.get(*r))
                    .map_or("", |r| &r.name),
                ListenerKind::Tcp { .. } => "",
            },
        }
    }
}

/// A name's identity, as a series found once remembers it: a `Weak`, which keeps the
/// allocation (so its address is not reused while kept) but not the configuration it
/// names (an old listener or cluster is freed when nothing else holds it).
enum Seen {
    Static(&'static str),
    Listener(Weak<Listener>),
    Cluster(Weak<Cluster>),
    Route(Weak<Listener>, usize, usize),
}

impl Seen {
    fn of(n: &Name) -> Seen {
        match n {
            Name::Static(s) => Seen::Static(s),
            Name::Listener(a) => Seen::Listener(Arc::downgrade(a)),
            Name::Cluster(a) => Seen::Cluster(Arc::downgrade(a)),
            Name::Route(a, v, r) => Seen::Route(Arc::downgrade(a), *v, *r),
        }
    }

    /// Whether `n` names through the same `Arc` (and indices), so it is the same string
    /// without reading it. `false` says nothing: the strings may still match.
    fn is(&self, n: &Name) -> bool {
        match (self, n) {
            (Seen::Static(a), Name::Static(b)) => std::ptr::eq(*a, *b),
            (Seen::Listener(a), Name::Listener(b)) => std::ptr::eq(a.as_ptr(), Arc::as_ptr(b)),
            (Seen::Cluster(a), Name::Cluster(b)) => std::ptr::eq(a.as_ptr(), Arc::as_ptr(b)),
            (Seen::Route(a, v, r), Name::Route(b, w, q)) => {
                std::ptr::eq(a.as_ptr(), Arc::as_ptr(b)) && v == w && r == q
            }
            _ => false,
        }
    }
}

/// A request's `mesh_requests_total` labels beyond its connection's.
pub(super) struct Labels {
    /// The cluster the route chose (`unknown` for local replies).
    pub destination_cluster: Name,
    /// The listener (service) the request was sent to.
    pub destination_service: Name,
    /// The route's name; empty when no route matched.
    pub route: Name,
    pub response_code: u16,
}

/// Entries of one connection's cache of request series; past it, the oldest goes.
const SERIES_CACHE: usize = 16;

/// One downstream connection's `mesh_requests_total` series: its source resolved once,
/// and a small cache of handles by (service, cluster, route, code), so a request is
/// counted with a short scan and three atomic adds, never a label string or a hash.
pub(super) struct ConnSeries {
    metrics: Arc<L7Metrics>,
    source: String,
    cache: Mutex<Vec<(SeriesKey, Arc<RequestSeries>)>>,
}

struct SeriesKey {
    service: String,
    cluster: String,
    route: String,
    code: u16,
    /// The names the last request counted here had (service, cluster, route): a request
    /// whose names come through the same `Arc`s finds its series without a string compare.
    seen: [Seen; 3],
}

impl SeriesKey {
    fn same(&self, l: &Labels) -> bool {
        self.code == l.response_code
            && self.seen[1].is(&l.destination_cluster)
            && self.seen[2].is(&l.route)
            && self.seen[0].is(&l.destination_service)
    }
}

impl ConnSeries {
    pub fn new(metrics: Arc<L7Metrics>, source: String) -> ConnSeries {
        ConnSeries {
            metrics,
            source,
            cache: Mutex::default(),
        }
    }

    fn record(&self, l: &Labels, elapsed: std::time::Duration) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        // The usual case: the names come through the same `Arc`s as last time.
        if let Some((_, s)) = cache.iter().find(|(k, _)| k.same(l)) {
            s.observe(elapsed);
            return;
        }
        let (service, cluster, route) =
            (&*l.destination_service, &*l.destination_cluster, &*l.route);
        let series = {
            let hit = cache.iter_mut().find(|(k, _)| {
                k.code == l.response_code
                    && k.cluster == cluster
                    && k.route == route
                    && k.service == service
            });
            match hit {
                Some((k, s)) => {
                    // Found by the strings (a push since): the next finds it by identity.
                    k.seen = [
                        Seen::of(&l.destination_service),
                        Seen::of(&l.destination_cluster),
                        Seen::of(&l.route),
                    ];
                    s.clone()
                }
                None => {
                    let s = self.metrics.series(RequestLabels {
                        source_workload: self.source.clone(),
                        destination_cluster: cluster.to_owned(),
                        destination_service: service.to_owned(),
                        response_code: l.response_code,
                        route: route.to_owned(),
                    });
                    if cache.len() >= SERIES_CACHE {
                        cache.remove(0);
                    }
                    let key = SeriesKey {
                        service: service.to_owned(),
                        cluster: cluster.to_owned(),
                        route: route.to_owned(),
                        code: l.response_code,
                        seen: [
                            Seen::of(&l.destination_service),
                            Seen::of(&l.destination_cluster),
                            Seen::of(&l.route),
                        ],
                    };
                    cache.push((key, s.clone()));
                    s
                }
            }
        };
        series.observe(elapsed);
    }
}

/// Counts one request in the metrics when dropped (after its response's last frame).
pub(super) struct Recorder {
    pub series: Arc<ConnSeries>,
    pub labels: Labels,
    pub start: Instant,
    /// The request's access-log line, sent on drop too (None: the log is off).
    pub log: Option<RequestLog>,
    /// Istio's series of the request (`metrics::istio`), counted on drop, and Envoy's
    /// flags for its `response_flags` (kept whether the log is on or not).
    pub istio: Option<RequestTelemetry>,
    pub flags: Flags,
    /// The request's span and its tries (`proxy::trace`), ended on drop (None: tracing is
    /// off or the trace is not sampled). Boxed: the recorder moves with the request and
    /// into its response body, and the span is most of its size.
    pub trace: Option<Box<crate::proxy::trace::RequestSpan>>,
}

/// An access-log line on its way, with what completes it when the request ends.
pub(super) struct RequestLog {
    pub sink: AccessLog,
    pub entry: Box<Entry>,
    /// Request body bytes, counted by the body as it streams.
    pub received: Option<Arc<AtomicU64>>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // One clock read for every series the request is counted in.
        let elapsed = self.start.elapsed();
        if let Some(t) = self.trace.take() {
            let (l, istio) = (&self.labels, self.istio.as_ref());
            t.finish(crate::proxy::trace::RequestEnd {
                status: l.response_code,
                route: &l.route,
                cluster: &l.destination_cluster,
                flags: self.flags,
                received: istio
                    .and_then(|i| i.received.as_ref())
                    .map_or(0, |r| r.load(Relaxed)),
                sent: istio.map_or(0, |i| i.sent),
            });
        }
        if let Some(RequestLog {
            sink,
            mut entry,
            received,
        }) = self.log.take()
        {
            let l = &self.labels;
            if let Some(h) = entry.http.as_mut() {
                h.response_code = l.response_code;
            }
            entry.route_name = Some(l.route.to_string()).filter(|r| !r.is_empty());
            entry.upstream_cluster =
                Some(l.destination_cluster.to_string()).filter(|c| c != "unknown");
            if let Some(r) = received {
                entry.bytes_received = Some(r.load(Relaxed));
            }
            entry.finish();
            sink.send(entry);
        }
        if let Some(t) = &self.istio {
            let flags = if self.flags.is_empty() {
                std::borrow::Cow::Borrowed("-")
            } else {
                // Rare (a failed or refused request): Envoy's comma-separated codes.
                serde_json::to_value(self.flags)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .map_or(std::borrow::Cow::Borrowed("-"), std::borrow::Cow::Owned)
            };
            let l = &self.labels;
            t.finish(&l.destination_cluster, l.response_code, &flags, elapsed);
        }
        self.series.record(&self.labels, elapsed);
    }
}

/// Decrements an endpoint's in-flight count on drop.
pub(super) struct Active(pub Arc<EndpointState>);

impl Active {
    pub fn new(ep: Arc<EndpointState>) -> Active {
        ep.active.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Active(ep)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What a forwarded response holds on to until it ends.
pub(super) struct Finish {
    /// Dropping it counts the request (and sends its access-log line) when the response
    /// ends; until then the access log counts the response's bytes in it.
    pub recorder: Option<Recorder>,
    /// Held, not read: dropping it frees the circuit-breaker request slot when the
    /// response ends.
    #[expect(dead_code, reason = "held for their Drop")]
    pub request_slot: Option<Slot>,
    pub active: Active,
    /// The HTTP/1.1 connection, driven by the body while it streams and pooled again when
    /// the response was read to the end...
    pub sender: Option<Sender>,
    /// ...in this tunnel pool, or the endpoint's own when None.
    pub home: Option<Arc<EndpointPool>>,
    pub counters: Arc<super::policy::Counters>,
}

impl Finish {
    /// The request's access-log line, if the log is on.
    fn log(&mut self) -> Option<&mut Entry> {
        self.recorder.as_mut()?.log.as_mut().map(|l| &mut *l.entry)
    }

    fn complete(mut self) {
        if let Some(Sender::H1(s)) = self.sender.take() {
            let pool = self.home.as_deref().unwrap_or(&self.active.0.pool);
            pool.put(s, &self.counters);
        }
    }
}

/// The upstream response body on its way downstream.
pub(super) struct Tracked {
    inner: UpBody,
    finish: Option<Finish>,
    /// The route's deadline, on the request's timer (`timer`: no `Sleep` of its own).
    deadline: Option<(Instant, Arc<Timer>)>,
}

#[derive(Debug, thiserror::Error)]
#[error("the route timeout passed while the response was streaming")]
pub(super) struct StreamTimeout;

impl Tracked {
    pub fn new(inner: UpBody, finish: Finish, deadline: Option<(Instant, Arc<Timer>)>) -> Tracked {
        let mut t = Tracked {
            finish: Some(finish),
            deadline,
            inner,
        };
        if t.ended() {
            if let Some(f) = t.finish.take() {
                f.complete();
            }
        }
        t
    }

    /// The HTTP/1.1 connection the body is read from.
    fn h1(&self) -> Option<&super::pool::H1> {
        match self.finish.as_ref()?.sender.as_ref()? {
            Sender::H1(h) => Some(h),
            Sender::H2(_) => None,
        }
    }

    /// No frame is left. An HTTP/1.1 body whose connection went (its end reached, or
    /// failed) has none left either.
    fn ended(&self) -> bool {
        match &self.inner {
            UpBody::H2(b) => b.is_end_stream(),
            UpBody::H1 => self.h1().is_none_or(|h| h.conn.body_done()),
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        // The body first; the deadline while it waits or streams on (a frame that ends
        // it, the common case of a small response, costs no timer poll).
        let polled = match &mut this.inner {
            UpBody::H2(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BoxError::from))),
            // An HTTP/1.1 upstream connection has no task of its own: the body reads it.
            UpBody::H1 => match this.finish.as_mut().and_then(|f| f.sender.as_mut()) {
                Some(Sender::H1(h1)) => h1
                    .conn
                    .poll_frame(cx)
                    .map(|f| f.map(|r| r.map_err(BoxError::from))),
                // Ended (the connection went back to its pool) or failed before.
                _ => Poll::Ready(None),
            },
        };
        let more = match &polled {
            Poll::Pending => true,
            Poll::Ready(Some(Ok(_))) => !this.ended(),
            Poll::Ready(_) => false,
        };
        if more {
            if let Some((at, timer)) = &this.deadline {
                if timer.poll_expired(*at, cx).is_ready() {
                    // Headers went out already: the only way to report it is a reset.
                    if let Some(e) = this.finish.as_mut().and_then(Finish::log) {
                        e.flag(Flags::UT);
                    }
                    this.finish = None;
                    this.deadline = None;
                    return Poll::Ready(Some(Err(Box::new(StreamTimeout))));
                }
            }
        }
        let frame: Option<Result<Frame<Bytes>, BoxError>> = ready!(polled);
        if let Some(d) = frame.as_ref().and_then(|f| f.as_ref().ok()?.data_ref()) {
            if let Some(e) = this.finish.as_mut().and_then(Finish::log) {
                *e.bytes_sent.get_or_insert(0) += d.len() as u64;
            }
            if let Some(t) = this
                .finish
                .as_mut()
                .and_then(|f| f.recorder.as_mut()?.istio.as_mut())
            {
                t.sent += d.len() as u64;
            }
        }
        match &frame {
            Some(Ok(_)) if !this.ended() => {}
            Some(Ok(_)) | None => {
                if let Some(f) = this.finish.take() {
                    f.complete();
                }
                this.deadline = None;
            }
            Some(Err(_)) => {
                if let Some(e) = this.finish.as_mut().and_then(Finish::log) {
                    e.flag(Flags::UC);
                }
                this.finish = None;
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.ended()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            UpBody::H2(b) => b.size_hint(),
            UpBody::H1 => self
                .h1()
                .map_or(SizeHint::with_exact(0), |h| h.conn.size_hint()),
        }
    }
}

impl Drop for Tracked {
    /// Dropped before its last frame: the client went away (or reset its stream).
    fn drop(&mut self) {
        if let Some(e) = self.finish.as_mut().and_then(Finish::log) {
            e.flag(Flags::DC);
        }
    }
}
