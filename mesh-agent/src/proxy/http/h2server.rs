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
//!   frame is handed over, then its trailers. A stream reset by the client fails the body
//!   (the upstream request is reset, never ended cleanly); a reset with `NO_ERROR` (an
//!   early response, RFC 9113 section 8.1) ends it, as hyper's. A client's reset before the
//!   response drops the engine's future (the upstream request is cancelled).
//! - CONNECT: given to the engine with an empty body (it answers 404); one announcing a
//!   body is reset (`INTERNAL_ERROR`), as hyper's.
//! - Responses: connection-specific fields dropped (RFC 9113 section 8.2.2), a `Date`, a
//!   `Content-Length` from the body's exact size when missing, `END_STREAM` on the head when
//!   the body is empty; the body sent as the peer's flow control allows, then trailers
//!   (gRPC). A body that fails resets the stream (the reason from the cause if it is an
//!   HTTP/2 reset, `INTERNAL_ERROR` otherwise): the client never sees a clean end short of
//!   bytes.
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
//! Tests: `proxy::http::tests` (`h2_*`, on either server with `MESH_TEST_L7_H2_SERVER`).

use std::{
    cell::RefCell,
    future::{poll_fn, Future},
    pin::Pin,
    sync::atomic::{AtomicBool, Ordering::Relaxed},
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
use tokio::io::{AsyncRead, AsyncWrite};

use super::{body::ReqBody, server::http_date, ProxyBody};

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
                let body = if parts.method == Method::CONNECT {
                    if content_length(&parts.headers).is_some_and(|n| n != 0) {
                        respond.send_reset(Reason::INTERNAL_ERROR);
                        continue;
                    }
                    Body::empty()
                } else {
                    Body::new(recv, content_length(&parts.headers))
                };
                let fut = handle(Request::from_parts(parts, ReqBody::H2(body)));
                streams.push(Stream::new(fut, respond));
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
    fn new(fut: Fut, respond: SendResponse<Bytes>) -> Stream<Fut> {
        Stream {
            respond,
            state: State::Answer(Box::pin(fut)),
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
            Ok(tx) => (!end).then_some((body, tx)),
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
                    if let Err(e) = ready!(pipe(body, tx, held, cx)) {
                        tracing::debug!("sending a response body: {e}");
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
/// the stream if the body fails, stops if the client resets it.
fn pipe(
    body: &mut ProxyBody,
    tx: &mut SendStream<Bytes>,
    held: &mut Option<(Bytes, bool)>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), h2::Error>> {
    loop {
        if let Poll::Ready(r) = tx.poll_reset(cx) {
            tracing::debug!("response stream reset by the client: {r:?}");
            return Poll::Ready(Ok(()));
        }
        if held.is_some() {
            while tx.capacity() == 0 {
                match ready!(tx.poll_capacity(cx)) {
                    Some(Ok(0)) => {}
                    Some(Ok(_)) => break,
                    Some(Err(e)) => return Poll::Ready(Err(e)),
                    None => return Poll::Ready(Ok(())),
                }
            }
            let Some((data, eos)) = held.take() else {
                continue;
            };
            tx.send_data(data, eos)?;
            if eos {
                return Poll::Ready(Ok(()));
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
                            return Poll::Ready(Ok(()));
                        }
                        continue;
                    }
                    tx.reserve_capacity(1);
                    *held = Some((data, eos));
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        tx.reserve_capacity(0);
                        return Poll::Ready(tx.send_trailers(trailers));
                    }
                }
            },
            Some(Err(e)) => {
                let reason = reset_reason(&*e);
                tracing::debug!("response body failed: {e}; resetting the stream ({reason:?})");
                tx.send_reset(reason);
                return Poll::Ready(Ok(()));
            }
            None => return Poll::Ready(tx.send_data(Bytes::new(), true)),
        }
    }
}

/// The HTTP/2 reset in an error's causes (an upstream stream's reset passed on), or
/// `INTERNAL_ERROR`.
fn reset_reason(e: &(dyn std::error::Error + 'static)) -> Reason {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(r) = c.downcast_ref::<h2::Error>().and_then(h2::Error::reason) {
            return r;
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

/// A request body as the engine reads it: the stream's `DATA` frames (their capacity
/// released as each is handed over), then its trailers.
pub(super) struct Body {
    /// None: no body (CONNECT), or it has ended.
    recv: Option<RecvStream>,
    data_done: bool,
    /// Bytes left by `Content-Length` (None: not announced).
    left: Option<u64>,
}

impl Body {
    fn new(recv: RecvStream, len: Option<u64>) -> Body {
        let left = if len.is_none() && recv.is_end_stream() {
            Some(0)
        } else {
            len
        };
        Body {
            recv: Some(recv),
            data_done: false,
            left,
        }
    }

    fn empty() -> Body {
        Body {
            recv: None,
            data_done: true,
            left: Some(0),
        }
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let me = &mut *self;
        let Some(recv) = me.recv.as_mut() else {
            return Poll::Ready(None);
        };
        if !me.data_done {
            match ready!(recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = recv.flow_control().release_capacity(data.len());
                    if let Some(l) = me.left.as_mut() {
                        *l = l.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                // An early response (RFC 9113 section 8.1): the body stops, not failed.
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => {
                    me.recv = None;
                    return Poll::Ready(None);
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => me.data_done = true,
            }
        }
        let r = ready!(recv.poll_trailers(cx));
        me.recv = None;
        Poll::Ready(match r {
            Ok(Some(t)) => Some(Ok(Frame::trailers(t))),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.recv.as_ref().is_none_or(RecvStream::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
