//! The downstream HTTP/2 server (`--l7-h2-server own`, the default; `hyper` is the
//! fallback): the `h2` crate's server connection driven by the downstream connection's own
//! task, each stream's request a future polled by that task (a `FuturesUnordered`),
//! instead of hyper's server, which spawns a task per stream (and a copy of its
//! multi-kilobyte future into the task's cell).
//!
//! What hyper's HTTP/2 server gave, kept (same crate underneath, same settings):
//!
//! - Settings: hyper's defaults (1 MiB stream and connection windows, 16 KiB frames, 200
//!   concurrent streams, a 400 KiB send buffer per stream, 1,024 locally caused resets)
//!   and the listener's `max_request_headers_bytes` as the header list size (the `h2`
//!   crate answers a larger header list with `431` and a reset). No keep-alive pings and
//!   no extended CONNECT (RFC 8441), as hyper's was configured.
//! - Requests: the `h2` crate's `http::Request` (version HTTP/2, absolute URI), the body
//!   streamed as the engine reads it, its flow-control capacity released as each `DATA`
//!   frame is handed over, then its trailers. A stream reset by the client before its
//!   `END_STREAM` fails the body (the upstream request is reset, never ended cleanly),
//!   whatever the reset's code: `NO_ERROR` too, unless the response has gone out in full
//!   (RFC 9113 section 8.1 allows a `NO_ERROR` stop only then; the body then just stops).
//!   hyper ends the body cleanly on any `NO_ERROR` reset; the engine does not (`HyperBody`
//!   does the same for hyper's server and for HTTP/2 upstreams' responses). A client's
//!   reset before the response drops the engine's future (the upstream request is
//!   cancelled).
//! - CONNECT: given to the engine with an empty body (it answers 404); one announcing a
//!   body is reset (`INTERNAL_ERROR`), as hyper's.
//! - Responses: connection-specific fields dropped (RFC 9113 section 8.2.2), a `Date`, a
//!   `Content-Length` from the body's exact size when missing, `END_STREAM` on the head when
//!   the body is empty; the body sent as the peer's flow control allows, then trailers
//!   (gRPC). A body that fails resets the stream (the reason from the cause if it is an
//!   HTTP/2 reset other than `NO_ERROR`, `INTERNAL_ERROR` otherwise): the client never sees
//!   a clean end short of bytes, nor a `NO_ERROR` reset that hyper would take for one.
//! - Drain: `GOAWAY` (the `h2` crate's graceful shutdown), streams in flight finish, then
//!   the connection closes.
//!
//! One task for all the streams:
//!
//! - A stream that waits (for its upstream, for the client's window, for more of its
//!   request body) holds up no other; one always ready starves none: the
//!   `FuturesUnordered` yields after a round of its ready streams and the connection is
//!   driven (reads, new streams, the flush) before the next.
//! - The drain's flag is read at the connection's next poll, which `until_drained`
//!   makes at once (its wake-up is the task's): an idle connection's `GOAWAY` goes out
//!   when the drain begins.
//! - A connection error ends every stream with it: the `h2` crate fails their bodies
//!   (never a clean end) and `serve` returns, dropping their futures, so their upstream
//!   requests are cancelled at once (the client can no longer get the answers; Envoy
//!   resets the upstream streams of a closed downstream connection likewise).
//!
//! Tests: `proxy::http::tests` (`h2_*`, on either server with `MESH_TEST_L7_H2_SERVER`);
//! `proxy::http::h2tests` (streams cut short by either side, on both servers).

use std::{
    cell::RefCell,
    future::{poll_fn, Future},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc,
    },
    task::{ready, Context, Poll},
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::{
    server::{Builder, SendResponse},
    Reason, RecvStream, SendStream,
};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{body::ReqBody, server::http_date, BoxError, ProxyBody};

/// hyper's HTTP/2 server defaults, kept.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONN_WINDOW: u32 = 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 16 * 1024;
pub(super) const MAX_CONCURRENT_STREAMS: u32 = 200;
const MAX_SEND_BUFFER: usize = 400 * 1024;
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// What one connection is served with.
pub(super) struct Settings<'a> {
    /// The header list size announced (`SETTINGS_MAX_HEADER_LIST_SIZE`).
    pub max_header_list: u32,
    /// Set when the connection should wind down: `GOAWAY` at its next poll.
    pub draining: &'a AtomicBool,
}

/// Serves one HTTP/2 connection (its preface not yet read, or replayed by `io`): each
/// request is `handle`'s future, polled by this one. Ends when the connection closes
/// (after a drain's `GOAWAY`, once the streams in flight are done).
pub(super) async fn serve<IO, F, Fut>(
    io: IO,
    settings: Settings<'_>,
    mut handle: F,
) -> Result<(), h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(Request<ReqBody>) -> Fut,
    Fut: Future<Output = Response<ProxyBody>>,
{
    let mut b = Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(settings.max_header_list)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    let mut conn = b.handshake::<_, Bytes>(io).await?;
    let mut streams = FuturesUnordered::new();
    let mut closing = false;
    poll_fn(|cx| loop {
        if !closing && settings.draining.load(Relaxed) {
            closing = true;
            conn.graceful_shutdown();
        }
        // The streams first: the frames they queue go out with the connection's flush in
        // `poll_accept` below, one write for all of them.
        while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {}
        match conn.poll_accept(cx) {
            Poll::Ready(Some(Ok((req, mut respond)))) => {
                let (parts, recv) = req.into_parts();
                let (body, answered) = if parts.method == Method::CONNECT {
                    if content_length(&parts.headers).is_some_and(|n| n != 0) {
                        respond.send_reset(Reason::INTERNAL_ERROR);
                        continue;
                    }
                    (Body::empty(), None)
                } else {
                    Body::new(recv, content_length(&parts.headers))
                };
                let fut = handle(Request::from_parts(parts, ReqBody::H2(body)));
                streams.push(Stream::new(fut, respond, answered));
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
            // The connection is closed (and, after a `GOAWAY`, its streams done).
            Poll::Ready(None) => return Poll::Ready(Ok(())),
            Poll::Pending => return Poll::Pending,
        }
    })
    .await
}

/// The first `Content-Length` value, if it parses (the `h2` crate has checked it).
fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// One stream: the engine's answer, then its body. The engine's future is boxed where it
/// is made and never moved after (the stream itself is small, so the `FuturesUnordered`
/// takes it without copying the request's multi-kilobyte future again), and it is
/// dropped as soon as the response head is in hand.
struct Stream<Fut> {
    respond: SendResponse<Bytes>,
    state: State<Fut>,
    /// Shared with the request body while it may still come: set once the response has
    /// gone out in full.
    answered: Option<Answered>,
}

/// Set once a stream's response has gone out in full (its `END_STREAM` queued): a client's
/// `NO_ERROR` reset after that only stops the request body (RFC 9113 section 8.1).
type Answered = Arc<AtomicBool>;

fn answered(a: &Option<Answered>) {
    if let Some(a) = a {
        a.store(true, Relaxed);
    }
}

enum State<Fut> {
    Answer(Pin<Box<Fut>>),
    Body {
        body: ProxyBody,
        tx: SendStream<Bytes>,
        /// A chunk waiting for stream capacity, and whether it ends the body.
        held: Option<(Bytes, bool)>,
    },
    Done,
}

impl<Fut> Stream<Fut>
where
    Fut: Future<Output = Response<ProxyBody>>,
{
    fn new(fut: Fut, respond: SendResponse<Bytes>, answered: Option<Answered>) -> Stream<Fut> {
        Stream {
            respond,
            state: State::Answer(Box::pin(fut)),
            answered,
        }
    }

    /// Sends the response head; the body and its stream if there is a body to send.
    fn head(&mut self, resp: Response<ProxyBody>) -> Option<(ProxyBody, SendStream<Bytes>)> {
        let (mut parts, body) = resp.into_parts();
        strip_connection_headers(&mut parts.headers);
        if !parts.headers.contains_key(header::DATE) {
            parts.headers.insert(header::DATE, date());
        }
        let end = body.is_end_stream();
        if !end && !parts.headers.contains_key(header::CONTENT_LENGTH) {
            if let Some(n) = body.size_hint().exact() {
                parts
                    .headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            }
        }
        match self
            .respond
            .send_response(Response::from_parts(parts, ()), end)
        {
            Ok(tx) => {
                if end {
                    answered(&self.answered);
                }
                (!end).then_some((body, tx))
            }
            Err(e) => {
                tracing::debug!("sending a response head: {e}");
                self.respond.send_reset(Reason::INTERNAL_ERROR);
                None
            }
        }
    }
}

impl<Fut> Future for Stream<Fut>
where
    Fut: Future<Output = Response<ProxyBody>>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let me = self.get_mut();
        loop {
            match &mut me.state {
                State::Answer(fut) => {
                    let resp = match fut.as_mut().poll(cx) {
                        Poll::Ready(r) => r,
                        Poll::Pending => {
                            // Reset by the client: the engine's future is dropped (its
                            // upstream request with it).
                            if me.respond.poll_reset(cx).is_ready() {
                                me.state = State::Done;
                                return Poll::Ready(());
                            }
                            return Poll::Pending;
                        }
                    };
                    me.state = State::Done;
                    match me.head(resp) {
                        Some((body, tx)) => {
                            me.state = State::Body {
                                body,
                                tx,
                                held: None,
                            }
                        }
                        None => return Poll::Ready(()),
                    }
                }
                State::Body { body, tx, held } => {
                    match ready!(pipe(body, tx, held, cx)) {
                        Ok(true) => answered(&me.answered),
                        Ok(false) => {}
                        Err(e) => tracing::debug!("sending a response body: {e}"),
                    }
                    me.state = State::Done;
                    return Poll::Ready(());
                }
                State::Done => return Poll::Ready(()),
            }
        }
    }
}

/// Sends a response body as the peer's flow control allows, then its trailers; resets
/// the stream if the body fails, stops if the client resets it. True: sent in full.
fn pipe(
    body: &mut ProxyBody,
    tx: &mut SendStream<Bytes>,
    held: &mut Option<(Bytes, bool)>,
    cx: &mut Context<'_>,
) -> Poll<Result<bool, h2::Error>> {
    loop {
        if let Poll::Ready(r) = tx.poll_reset(cx) {
            tracing::debug!("response stream reset by the client: {r:?}");
            return Poll::Ready(Ok(false));
        }
        if held.is_some() {
            while tx.capacity() == 0 {
                match ready!(tx.poll_capacity(cx)) {
                    Some(Ok(0)) => {}
                    Some(Ok(_)) => break,
                    Some(Err(e)) => return Poll::Ready(Err(e)),
                    None => return Poll::Ready(Ok(false)),
                }
            }
            let Some((data, eos)) = held.take() else {
                continue;
            };
            tx.send_data(data, eos)?;
            if eos {
                return Poll::Ready(Ok(true));
            }
            continue;
        }
        // The next frame before any capacity is claimed: a claim pinned on the connection
        // window while the body has nothing could hold up the other streams (as hyper).
        match ready!(Pin::new(&mut *body).poll_frame(cx)) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let eos = body.is_end_stream();
                    if data.is_empty() {
                        tx.send_data(data, eos)?;
                        if eos {
                            return Poll::Ready(Ok(true));
                        }
                        continue;
                    }
                    tx.reserve_capacity(1);
                    *held = Some((data, eos));
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        tx.reserve_capacity(0);
                        return Poll::Ready(tx.send_trailers(trailers).map(|()| true));
                    }
                }
            },
            Some(Err(e)) => {
                let reason = reset_reason(&*e);
                tracing::debug!("response body failed: {e}; resetting the stream ({reason:?})");
                tx.send_reset(reason);
                return Poll::Ready(Ok(false));
            }
            None => return Poll::Ready(tx.send_data(Bytes::new(), true).map(|()| true)),
        }
    }
}

/// The HTTP/2 reset in an error's causes (an upstream stream's reset passed on), or
/// `INTERNAL_ERROR`. Never `NO_ERROR`: the body was not finished, and hyper (and others)
/// would take a `NO_ERROR` reset for a clean end.
pub(super) fn reset_reason(e: &(dyn std::error::Error + 'static)) -> Reason {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(r) = c.downcast_ref::<h2::Error>().and_then(h2::Error::reason) {
            if r != Reason::NO_ERROR {
                return r;
            }
        }
        cause = c.source();
    }
    Reason::INTERNAL_ERROR
}

/// Drops the fields HTTP/2 forbids in a response (RFC 9113 section 8.2.2): the
/// connection-specific ones and those the `Connection` field names.
fn strip_connection_headers(h: &mut HeaderMap) {
    if let Some(c) = h.remove(header::CONNECTION) {
        if let Ok(list) = c.to_str() {
            for name in list.split(',') {
                h.remove(name.trim());
            }
        }
    }
    for name in [
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
        header::HeaderName::from_static("keep-alive"),
        header::HeaderName::from_static("proxy-connection"),
    ] {
        h.remove(name);
    }
}

thread_local! {
    /// The `Date` value, formatted once a second per thread.
    static DATE: RefCell<(u64, Option<HeaderValue>)> = const { RefCell::new((u64::MAX, None)) };
}

fn date() -> HeaderValue {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != now || c.1.is_none() {
            let v = HeaderValue::from_str(&http_date(now))
                .unwrap_or_else(|_| HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"));
            *c = (now, Some(v));
        }
        c.1.clone().unwrap_or_else(|| HeaderValue::from_static(""))
    })
}

/// A stream reset with `NO_ERROR` before its `END_STREAM`: an unfinished body, failed.
/// A request's carries `CANCEL` as its cause (hyper's client resets the upstream stream
/// with the first HTTP/2 reason in the causes: the client cancelled its request); a
/// response's none (`reset_reason`, and hyper's server, reset the client's stream with
/// `INTERNAL_ERROR`).
///
/// A request body's errors are `BoxError`s holding an `h2::Error`, a `hyper::Error` or a
/// `ResetShort` as they are, not an enum of them: an `h2::Error` must stay in the causes
/// as itself (for hyper's `h2_reason`: a client's `CANCEL` passed on upstream), which a
/// `#[error(transparent)]` variant would hide.
#[derive(Debug, thiserror::Error)]
#[error("{what} was reset (NO_ERROR) before its end")]
pub(super) struct ResetShort {
    what: &'static str,
    #[source]
    cause: Option<h2::Error>,
}

impl ResetShort {
    fn request() -> ResetShort {
        ResetShort {
            what: "the client's request stream",
            cause: Some(h2::Error::from(Reason::CANCEL)),
        }
    }

    fn response() -> ResetShort {
        ResetShort {
            what: "the upstream's response stream",
            cause: None,
        }
    }
}

/// Why a `HyperBody` failed. Transparent: a `hyper::Error`'s next cause is the
/// `h2::Error` of a reset, for `reset_reason` and hyper's `h2_reason` to find (an
/// upstream's `CANCEL` passed on to the client).
#[derive(Debug, thiserror::Error)]
pub(super) enum HyperBodyError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error(transparent)]
    ResetShort(#[from] ResetShort),
}

impl HyperBodyError {
    /// As a request body's error: the error itself, unwrapped.
    fn into_box(self) -> BoxError {
        match self {
            HyperBodyError::Hyper(e) => Box::new(e),
            HyperBodyError::ResetShort(e) => Box::new(e),
        }
    }
}

/// A request's `NO_ERROR` reset before its `END_STREAM`: the body stops if the response
/// has gone out in full (RFC 9113 section 8.1), fails otherwise.
fn stopped<E: From<ResetShort>>(answered: Option<&Answered>) -> Option<Result<Frame<Bytes>, E>> {
    match answered {
        Some(a) if a.load(Relaxed) => None,
        _ => Some(Err(ResetShort::request().into())),
    }
}

/// A request body as the engine reads it: the own server's (the stream's `DATA` frames,
/// their capacity released as each is handed over, then its trailers), or hyper's server's
/// (`--l7-h2-server hyper`) made to fail on a `NO_ERROR` reset before the response's end.
pub(super) enum Body {
    Own(OwnBody),
    Hyper(HyperBody),
}

pub(super) struct OwnBody {
    /// None: no body (CONNECT), or it has ended.
    recv: Option<RecvStream>,
    data_done: bool,
    /// Bytes left by `Content-Length` (None: not announced).
    left: Option<u64>,
    /// Set once the response has gone out in full (None: the body had ended at arrival).
    answered: Option<Answered>,
}

impl Body {
    /// The body and, if it may still come, the flag its response sets once sent in full.
    fn new(recv: RecvStream, len: Option<u64>) -> (Body, Option<Answered>) {
        let ended = recv.is_end_stream();
        let left = if len.is_none() && ended { Some(0) } else { len };
        let answered = (!ended).then(Answered::default);
        let body = OwnBody {
            recv: Some(recv),
            data_done: false,
            left,
            answered: answered.clone(),
        };
        (Body::Own(body), answered)
    }

    fn empty() -> Body {
        Body::Own(OwnBody {
            recv: None,
            data_done: true,
            left: Some(0),
            answered: None,
        })
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Own(b) => b.poll_frame(cx),
            Body::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(HyperBodyError::into_box),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Own(b) => b.recv.as_ref().is_none_or(RecvStream::is_end_stream),
            Body::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Own(OwnBody { left: Some(n), .. }) => SizeHint::with_exact(*n),
            Body::Own(_) => SizeHint::default(),
            Body::Hyper(b) => b.size_hint(),
        }
    }
}

impl OwnBody {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(recv) = self.recv.as_mut() else {
            return Poll::Ready(None);
        };
        if !self.data_done {
            match ready!(recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = recv.flow_control().release_capacity(data.len());
                    if let Some(l) = self.left.as_mut() {
                        *l = l.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                // A reset after END_STREAM reads as the end (the `h2` crate keeps it since
                // 0.4.16), so this one came first: a stop after the whole response (RFC
                // 9113 section 8.1), a failure before it.
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => {
                    self.recv = None;
                    return Poll::Ready(stopped(self.answered.as_ref()));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(Box::new(e)))),
                None => self.data_done = true,
            }
        }
        let r = ready!(recv.poll_trailers(cx));
        self.recv = None;
        Poll::Ready(match r {
            Ok(Some(t)) => Some(Ok(Frame::trailers(t))),
            Ok(None) => None,
            Err(e) if e.reason() == Some(Reason::NO_ERROR) => stopped(self.answered.as_ref()),
            Err(e) => Some(Err(Box::new(e))),
        })
    }
}

/// hyper's body of an HTTP/2 stream (a request to hyper's server, a response from an
/// upstream), made to fail where hyper ends it cleanly: on a `NO_ERROR` reset before the
/// stream's `END_STREAM` (hyper 1.x stops the body on any `NO_ERROR` reset; the `h2`
/// crate tells the two apart: since 0.4.16 a stream reset after its `END_STREAM` still
/// reads as ended, `is_end_stream` included).
/// A request's `NO_ERROR` reset after the response went out in full stops it (RFC 9113
/// section 8.1).
pub(super) struct HyperBody {
    inner: Incoming,
    /// A request's: set once its response has gone out in full. None: a response's.
    answered: Option<Answered>,
}

impl HyperBody {
    /// An HTTP/2 upstream's response body.
    pub(super) fn response(inner: Incoming) -> HyperBody {
        HyperBody {
            inner,
            answered: None,
        }
    }
}

impl HttpBody for HyperBody {
    type Data = Bytes;
    type Error = HyperBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HyperBodyError>>> {
        let me = &mut *self;
        match ready!(Pin::new(&mut me.inner).poll_frame(cx)) {
            Some(r) => Poll::Ready(Some(r.map_err(HyperBodyError::from))),
            // Not ended, yet no more: a NO_ERROR reset (or GOAWAY) came before END_STREAM.
            None if !me.inner.is_end_stream() => Poll::Ready(match &me.answered {
                Some(a) => stopped(Some(a)),
                None => Some(Err(ResetShort::response().into())),
            }),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request to hyper's server for the engine: an HTTP/2 one with a body still to come
/// gets `HyperBody` (and the flag `hyper_response` sets); others hyper's body as it is.
pub(super) fn hyper_request(req: Request<Incoming>) -> (Request<ReqBody>, Option<Answered>) {
    if req.version() != http::Version::HTTP_2 || req.body().is_end_stream() {
        return (req.map(ReqBody::Hyper), None);
    }
    let answered = Answered::default();
    let flag = answered.clone();
    let req = req.map(|inner| {
        ReqBody::H2(Body::Hyper(HyperBody {
            inner,
            answered: Some(flag),
        }))
    });
    (req, Some(answered))
}

/// The engine's response to a `hyper_request`: its request's flag set once the body has
/// given its last frame (hyper sends `END_STREAM` with it).
pub(super) fn hyper_response(
    resp: Response<ProxyBody>,
    answered: Option<Answered>,
) -> Response<ProxyBody> {
    let Some(answered) = answered else {
        return resp;
    };
    if resp.body().is_end_stream() {
        answered.store(true, Relaxed);
        return resp;
    }
    resp.map(|body| Answering { body, answered }.boxed_unsync())
}

/// A response body that sets its request's flag at its last frame.
struct Answering {
    body: ProxyBody,
    answered: Answered,
}

impl HttpBody for Answering {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let f = ready!(Pin::new(&mut self.body).poll_frame(cx));
        let last = match &f {
            None => true,
            Some(Ok(f)) => f.is_trailers() || self.body.is_end_stream(),
            Some(Err(_)) => false,
        };
        if last {
            self.answered.store(true, Relaxed);
        }
        Poll::Ready(f)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
