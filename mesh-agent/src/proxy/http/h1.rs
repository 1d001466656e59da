//! The upstream HTTP/1.1 client: a small, bounded codec driven inline by whoever holds the
//! connection (`pool::H1`), instead of hyper's client dispatcher.
//!
//! Why not hyper's client: its HTTP/1.1 connection is a request channel, a response
//! oneshot and a dispatcher, so every request crosses them twice and wakes the holder's
//! task through two wakers even when the connection is polled in the same task. Here a
//! request is one `write` (the head, with as much of a ready body as fits
//! [`COALESCE`]), the response head one `read` parsed by `httparse` (hyper's own parser),
//! and the body is read from the same buffer as the downstream codec asks for it.
//!
//! What it speaks (RFC 9112, client side): request bodies framed by `Content-Length` or
//! chunked (with trailers); response bodies framed by `Content-Length`, chunked (trailers
//! passed on) or the connection's close; no body after `HEAD`, `204`, `304` or a `2xx` to
//! `CONNECT`; interim `1xx` answers skipped (at most [`MAX_INTERIM`]); a `101` handed back
//! with the connection's IO when the request asked for an upgrade ([`Upgraded`]), an
//! unsolicited one is malformed. Keep-alive unless either side says `close` (or the answer
//! is HTTP/1.0 without `keep-alive`, or close-delimited, or the request body was cut off
//! by an early answer).
//!
//! Bounds: a response head (and a chunked trailer section) at most [`MAX_HEAD`] bytes and
//! [`MAX_HEADERS`] fields, a chunk-size line [`MAX_CHUNK_LINE`](chunked::MAX_CHUNK_LINE)
//! bytes; the read buffer never grows past `MAX_HEAD` and body bytes leave it as they are
//! asked for. Anything malformed (a bad status line, conflicting or invalid lengths,
//! `Transfer-Encoding` with `Content-Length` or on HTTP/1.0, a bad chunk) is an error of
//! the try (a 502 for the client), and such a connection is never used again. A body cut short (EOF or a reset
//! before its length, or before the last chunk) is an error frame, which the downstream
//! codec turns into a reset of the client's stream, never into a clean short end.

use std::{
    io,
    mem::MaybeUninit,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use http::{header, request, HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;

use super::{
    chunked::{
        self, add_length, decimal, header_map_except, last_coding_is_chunked, put, put_chunk,
        put_last, Chunk, ReadBuffer, Step, READ_BUF,
    },
    route, BoxError, BoxIo, ProxyBody,
};

/// Largest response head (status line and header fields), and largest chunked trailer
/// section, in bytes.
pub(super) const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head or a trailer section.
pub(super) const MAX_HEADERS: usize = 128;
/// Interim (`1xx`) answers skipped before the final one.
pub(super) const MAX_INTERIM: usize = 16;
/// Request body bytes gathered behind the head (or each other) before a write.
const COALESCE: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("upstream connection: {0}")]
    Io(#[from] io::Error),
    #[error("upstream closed the connection before a response")]
    ClosedBeforeResponse,
    #[error("upstream closed the connection before the response's end (body cut short)")]
    Incomplete,
    #[error("malformed response from upstream: {0}")]
    Malformed(&'static str),
    #[error("the request body failed: {0}")]
    RequestBody(BoxError),
    /// An HTTP/2 upstream's failure (the same `SendFail` serves both).
    #[error("{0}")]
    H2(hyper::Error),
}

impl H1Error {
    /// The upstream broke the protocol (Envoy's `UPE`, a 502), as opposed to a closed or
    /// reset connection.
    pub fn is_protocol(&self) -> bool {
        matches!(self, H1Error::Malformed(_))
    }
}

/// A try that got no response: why, and the request when it never reached the upstream
/// (so it may go again on another connection).
pub(super) struct SendFail {
    pub request: Option<Request<ProxyBody>>,
    pub error: H1Error,
}

/// A `101 Switching Protocols` answer's connection, in the response's extensions: the IO
/// and the bytes already read past the head. The connection is no longer HTTP and is not
/// pooled (its circuit-breaker slot is freed).
#[derive(Clone)]
pub(crate) struct Upgraded(pub Arc<Mutex<Option<(BoxIo, Bytes)>>>);

/// How the response body is delimited, and where its reading stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// No response in progress, or its body has ended.
    Done,
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    Close,
}

/// Request body framing on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sending {
    Length(u64),
    Chunked,
}

/// One upstream HTTP/1.1 connection.
pub(super) struct Conn {
    io: BoxIo,
    rbuf: ReadBuffer,
    wbuf: Vec<u8>,
    reading: Reading,
    /// Both sides allow another request after this one.
    keep_alive: bool,
    /// An error happened or the connection was handed away: never used again.
    broken: bool,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("h1::Conn")
            .field("reading", &self.reading)
            .field("keep_alive", &self.keep_alive)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

/// Whether `name`'s values (comma-separated tokens) contain `token`, in any case (the map
/// lookups the one-pass scans replace, kept as their tests' reference).
#[cfg(test)]
fn has_token(headers: &HeaderMap, name: http::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// A `Content-Length` value: every value and list element the same run of digits.
#[cfg(test)]
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, H1Error> {
    let mut len = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        add_length(&mut len, v.as_bytes()).map_err(H1Error::Malformed)?;
    }
    Ok(len)
}

/// A value `HeaderValue::to_str` takes (visible ASCII and tabs): `has_token` reads only
/// those.
fn visible(v: &[u8]) -> bool {
    v.iter().all(|&b| b == b'\t' || (32..127).contains(&b))
}

/// What a response head's framing fields say, read in one pass over the parsed fields (no
/// map lookups), with `has_token`'s and `content_length`'s reading of them.
#[derive(Debug)]
struct Fields {
    /// `Connection` lists `close` / `keep-alive`.
    close: bool,
    keep_alive: bool,
    /// `Transfer-Encoding` and `Content-Length` were given.
    te: bool,
    cl: bool,
    /// The last coding of `Transfer-Encoding` is `chunked`.
    chunked_last: bool,
    /// `Content-Length`'s value, or the first fault found in it.
    length: Result<Option<u64>, &'static str>,
    /// `Connection` lists a name besides the hop-by-hop ones.
    lists_others: bool,
}

/// One of the hop-by-hop names (`route::HOP_BY_HOP`), in any case: picked by length
/// first, so a field of none of their lengths costs no comparison.
fn is_hop_by_hop(name: &[u8]) -> bool {
    let hop = match name.len() {
        2 => name.eq_ignore_ascii_case(b"te"),
        7 => name.eq_ignore_ascii_case(b"upgrade") || name.eq_ignore_ascii_case(b"trailer"),
        10 => name.eq_ignore_ascii_case(b"connection") || name.eq_ignore_ascii_case(b"keep-alive"),
        14 => name.eq_ignore_ascii_case(b"http2-settings"),
        16 => name.eq_ignore_ascii_case(b"proxy-connection"),
        17 => name.eq_ignore_ascii_case(b"transfer-encoding"),
        _ => false,
    };
    debug_assert_eq!(
        hop,
        route::HOP_BY_HOP
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
    );
    hop
}

/// Whether a response field goes no further than this connection: what
/// `route::strip_hop_by_hop(_, false)` removes (a hop-by-hop name, or one a `Connection`
/// value of visible ASCII lists).
fn hop_field(name: &[u8], f: &Fields, fields: &[httparse::Header<'_>]) -> bool {
    is_hop_by_hop(name)
        || (f.lists_others
            && fields.iter().any(|h| {
                h.name.eq_ignore_ascii_case("connection")
                    && visible(h.value)
                    && h.value
                        .split(|b| *b == b',')
                        .any(|t| t.trim_ascii().eq_ignore_ascii_case(name))
            }))
}

impl Fields {
    fn scan(fields: &[httparse::Header<'_>]) -> Fields {
        let mut f = Fields {
            close: false,
            keep_alive: false,
            te: false,
            cl: false,
            chunked_last: false,
            length: Ok(None),
            lists_others: false,
        };
        for h in fields {
            let (n, v) = (h.name.as_bytes(), h.value);
            match n.len() {
                10 if n.eq_ignore_ascii_case(b"connection") && visible(v) => {
                    for t in v.split(|b| *b == b',') {
                        let t = t.trim_ascii();
                        f.close |= t.eq_ignore_ascii_case(b"close");
                        f.keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
                        f.lists_others |= !t.is_empty() && !is_hop_by_hop(t);
                    }
                }
                14 if n.eq_ignore_ascii_case(b"content-length") => {
                    f.cl = true;
                    if let Ok(len) = &mut f.length {
                        if let Err(why) = add_length(len, v) {
                            f.length = Err(why);
                        }
                    }
                }
                17 if n.eq_ignore_ascii_case(b"transfer-encoding") => {
                    f.te = true;
                    if visible(v) {
                        if let Some(c) = last_coding_is_chunked(v) {
                            f.chunked_last = c;
                        }
                    }
                }
                _ => {}
            }
        }
        f
    }
}

/// What a request's fields say to the codec, read in one pass over the map (iterating
/// it costs less than the four lookups it replaces).
#[derive(Debug, PartialEq, Eq)]
struct RequestFields {
    host: bool,
    /// A valid `Content-Length` (`content_length`'s value; None when invalid).
    length: Option<u64>,
    upgrade: bool,
    /// `Connection` lists `close` (`has_token`'s reading).
    close: bool,
}

impl RequestFields {
    fn scan(headers: &HeaderMap) -> RequestFields {
        let mut f = RequestFields {
            host: false,
            length: None,
            upgrade: false,
            close: false,
        };
        let mut length = Ok(None);
        for (name, value) in headers {
            if name == header::HOST {
                f.host = true;
            } else if name == header::CONTENT_LENGTH {
                if let Ok(len) = &mut length {
                    if add_length(len, value.as_bytes()).is_err() {
                        length = Err(());
                    }
                }
            } else if name == header::UPGRADE {
                f.upgrade = true;
            } else if name == header::CONNECTION {
                f.close |= value
                    .to_str()
                    .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
            }
        }
        f.length = length.ok().flatten();
        f
    }
}

/// How a final response's body is delimited (RFC 9112, section 6.3), and whether the
/// connection may carry another request after it.
fn framing(
    method: &Method,
    status: StatusCode,
    version: Version,
    f: &Fields,
) -> Result<(Reading, bool), H1Error> {
    let keep_alive = if version == Version::HTTP_11 {
        !f.close
    } else {
        f.keep_alive
    };
    if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Reading::Done, keep_alive));
    }
    if *method == Method::CONNECT && status.is_success() {
        // A tunnel the engine does not relay: nothing more is HTTP on this connection.
        return Ok((Reading::Done, false));
    }
    if f.te {
        if f.cl {
            return Err(H1Error::Malformed(
                "both transfer-encoding and content-length",
            ));
        }
        if version != Version::HTTP_11 {
            return Err(H1Error::Malformed("transfer-encoding on HTTP/1.0"));
        }
        return Ok(if f.chunked_last {
            (Reading::Chunked(Chunk::Size), keep_alive)
        } else {
            // Another final coding: the body runs to the connection's close.
            (Reading::Close, false)
        });
    }
    Ok(match f.length.map_err(H1Error::Malformed)? {
        Some(0) => (Reading::Done, keep_alive),
        Some(n) => (Reading::Length(n), keep_alive),
        None => (Reading::Close, false),
    })
}

/// A parsed response head and its length in the buffer.
struct Head {
    len: usize,
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    fields: Fields,
}

fn parse_head(data: &[u8]) -> Result<Option<Head>, H1Error> {
    // Not zero-initialised: the parser writes the fields it returns.
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut r,
        data,
        &mut fields,
    );
    let len = match parsed {
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(n)) => n,
        Err(httparse::Error::TooManyHeaders) => {
            return Err(H1Error::Malformed("too many header fields"))
        }
        Err(httparse::Error::Version) => return Err(H1Error::Malformed("not HTTP/1.x")),
        Err(httparse::Error::Status) => return Err(H1Error::Malformed("invalid status code")),
        Err(_) => return Err(H1Error::Malformed("invalid response head")),
    };
    let version = match r.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Err(H1Error::Malformed("not HTTP/1.x")),
    };
    let status = r
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(H1Error::Malformed("invalid status code"))?;
    let fields = Fields::scan(r.headers);
    // The hop-by-hop fields go no further than this connection: left out of the map here
    // (the engine's `strip_hop_by_hop` then finds none), except in a `101`, whose switch
    // reads `Connection` and `Upgrade`.
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    let headers = header_map_except(
        &data[..len],
        &Bytes::copy_from_slice(&data[..len]),
        r.headers,
        |name| !switching && hop_field(name, &fields, r.headers),
    )
    .map_err(H1Error::Malformed)?;
    Ok(Some(Head {
        len,
        status,
        version,
        headers,
        fields,
    }))
}

/// Reads what the IO has into `rbuf`; `Ok(0)` at its end. Err(`Malformed(what)`) when
/// `limit` bytes are buffered unconsumed (the upstream sent more than a bounded element
/// may hold).
fn fill(
    rbuf: &mut ReadBuffer,
    io: &mut BoxIo,
    cx: &mut Context<'_>,
    limit: usize,
    what: &'static str,
) -> Poll<Result<usize, H1Error>> {
    Poll::Ready(match ready!(rbuf.poll_fill(io, cx, limit))? {
        Some(n) => Ok(n),
        None => Err(H1Error::Malformed(what)),
    })
}

/// Whether a request may go again after its connection closed with no answer: the
/// methods RFC 9110 calls idempotent.
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Where gathering a request body into the write buffer stopped.
enum Gathered {
    /// All of it is in.
    Ended,
    /// Nothing more is ready (the body will wake the task).
    Waiting,
    /// The buffer has `COALESCE` bytes: write them first.
    Full,
}

/// Moves what `body` has ready into `w`, framed by `sending`.
fn gather(
    w: &mut Vec<u8>,
    body: &mut ProxyBody,
    sending: &mut Sending,
    cx: &mut Context<'_>,
) -> Result<Gathered, H1Error> {
    while w.len() < COALESCE {
        let frame = match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Pending => return Ok(Gathered::Waiting),
            Poll::Ready(Some(Err(e))) => return Err(H1Error::RequestBody(e)),
            Poll::Ready(None) => {
                return match *sending {
                    Sending::Length(0) => Ok(Gathered::Ended),
                    Sending::Length(_) => Err(H1Error::RequestBody(
                        "the request body ended short of its content-length".into(),
                    )),
                    Sending::Chunked => {
                        put_last(w, None);
                        Ok(Gathered::Ended)
                    }
                };
            }
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        match frame.into_data() {
            Ok(d) if d.is_empty() => {}
            Ok(d) => match sending {
                Sending::Length(left) => {
                    let n = d.len() as u64;
                    if n > *left {
                        return Err(H1Error::RequestBody(
                            "the request body is longer than its content-length".into(),
                        ));
                    }
                    *left -= n;
                    w.extend_from_slice(&d);
                    if *left == 0 {
                        // Every declared byte is in: the body is over.
                        return Ok(Gathered::Ended);
                    }
                }
                Sending::Chunked => put_chunk(w, &d),
            },
            // Trailers: sent after a chunked body, dropped after a sized one (no place
            // for them).
            Err(frame) => {
                if let (Ok(t), Sending::Chunked) = (frame.into_trailers(), *sending) {
                    put_last(w, Some(&t));
                    return Ok(Gathered::Ended);
                }
            }
        }
    }
    Ok(Gathered::Full)
}

/// Why an exchange stopped short of a response head.
enum Stop {
    /// The connection failed (`answered`: some of an answer had come); the request may
    /// go again if nothing of it, or of an answer, was lost.
    Conn { answered: bool, error: H1Error },
    /// The request body or the answer's syntax failed: the request never goes again.
    Other(H1Error),
}

impl From<io::Error> for Stop {
    /// A write or flush that failed, before any answer.
    fn from(e: io::Error) -> Stop {
        Stop::Conn {
            answered: false,
            error: e.into(),
        }
    }
}

impl Conn {
    pub fn new(io: BoxIo) -> Conn {
        Conn {
            io,
            rbuf: ReadBuffer::new(),
            wbuf: Vec::new(),
            reading: Reading::Done,
            keep_alive: true,
            broken: false,
        }
    }

    /// Whether it can take no more requests (now or once the response in progress ends).
    pub fn is_closed(&self) -> bool {
        self.broken || !self.keep_alive
    }

    /// Whether it may go back to the pool: its last response ended cleanly, keep-alive,
    /// and nothing unasked for arrived after it.
    pub fn is_reusable(&self) -> bool {
        !self.is_closed() && self.reading == Reading::Done && self.rbuf.is_empty()
    }

    /// An idle connection, before a request: Ok while it is quiet. Anything readable now
    /// (the upstream's close, a reset, bytes nobody asked for) ends it.
    pub fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
        if !self.is_reusable() {
            return Poll::Ready(Err(()));
        }
        match fill(
            &mut self.rbuf,
            &mut self.io,
            cx,
            READ_BUF,
            "unsolicited bytes",
        ) {
            Poll::Pending => Poll::Ready(Ok(())),
            Poll::Ready(_) => {
                self.broken = true;
                Poll::Ready(Err(()))
            }
        }
    }

    /// Writes the request head into `wbuf`; the body's framing.
    fn encode_head(
        &mut self,
        parts: &request::Parts,
        body: &ProxyBody,
        f: &RequestFields,
    ) -> Option<Sending> {
        let w = &mut self.wbuf;
        w.clear();
        let target = if parts.method == Method::CONNECT {
            parts.uri.authority().map_or("/", |a| a.as_str())
        } else {
            parts.uri.path_and_query().map_or("/", |p| p.as_str())
        };
        put(
            w,
            &[
                parts.method.as_str().as_bytes(),
                b" ",
                target.as_bytes(),
                b" HTTP/1.1\r\n",
            ],
        );
        if !f.host {
            if let Some(a) = parts.uri.authority() {
                put(w, &[b"host: ", a.as_str().as_bytes(), b"\r\n"]);
            }
        }
        let declared = f.length;
        let sending = match declared {
            Some(n) => Some(Sending::Length(n)),
            None if body.is_end_stream() => None,
            None => match body.size_hint().exact() {
                Some(n) => Some(Sending::Length(n)),
                None => Some(Sending::Chunked),
            },
        };
        for (name, value) in &parts.headers {
            // Framing is this codec's to say.
            if name == header::TRANSFER_ENCODING
                || (name == header::CONTENT_LENGTH && declared.is_none())
            {
                continue;
            }
            put(
                w,
                &[name.as_str().as_bytes(), b": ", value.as_bytes(), b"\r\n"],
            );
        }
        match sending {
            Some(Sending::Length(n)) if declared.is_none() => {
                let mut b = [0; 20];
                put(w, &[b"content-length: ", decimal(n, &mut b), b"\r\n"]);
            }
            Some(Sending::Chunked) => put(w, &[b"transfer-encoding: chunked\r\n"]),
            None if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) => {
                put(w, &[b"content-length: 0\r\n"]);
            }
            _ => {}
        }
        w.extend_from_slice(b"\r\n");
        sending
    }

    /// Sends `req` and reads the response head. The response body is then read with
    /// `poll_frame` (`Tracked` does, as the downstream codec asks for it).
    pub async fn send(&mut self, req: Request<ProxyBody>) -> Result<Response<()>, SendFail> {
        let (parts, body) = req.into_parts();
        if !self.is_reusable() {
            self.broken = true;
            return Err(SendFail {
                request: Some(Request::from_parts(parts, body)),
                error: H1Error::ClosedBeforeResponse,
            });
        }
        let f = RequestFields::scan(&parts.headers);
        let mut sending = self.encode_head(&parts, &body, &f);
        let empty_body = sending.is_none();
        // The body while it is being sent; None once it has all gone into `wbuf`.
        // An empty one is kept (never polled) so the request can be given back whole.
        let mut body = Some(body);
        let mut written = 0usize;
        let mut sent_any = false;
        let mut request_done = false;
        let mut flushed = false;
        let mut interim = 0usize;
        // How much of `rbuf` the last parse saw (it found no complete head in it).
        let mut parsed = 0usize;
        let upgrade_asked = f.upgrade;
        // `body`: the request's body, when the failure may give the request back (a
        // failure of the connection, not of the body or the answer's syntax).
        let fail = |this: &mut Conn,
                    body: &mut Option<ProxyBody>,
                    sent_any: bool,
                    answered: bool,
                    error: H1Error|
         -> SendFail {
            this.broken = true;
            // A request without a body (never polled, so still whole) that got not a byte
            // of answer, and either never reached the upstream or has an idempotent
            // method (a kept-alive connection the upstream had closed takes a request in,
            // then closes): it may go again. One with a body may not (part of it is gone;
            // a retry policy replays it from its recording instead).
            let back = !answered && empty_body && (!sent_any || idempotent(&parts.method));
            let request = match (back, body.take()) {
                (true, Some(b)) => Some(Request::from_parts(parts.clone(), b)),
                _ => None,
            };
            SendFail { request, error }
        };
        let head = std::future::poll_fn(|cx| {
            // One place turns a stop into the try's failure (and gives the request back
            // when it may go again).
            let step = (|| -> Poll<Result<(Head, bool), Stop>> {
                // The request: the head and what body is ready, gathered, then written.
                while !request_done {
                    let mut waiting = false;
                    if let (Some(b), Some(mode)) = (body.as_mut(), sending.as_mut()) {
                        match gather(&mut self.wbuf, b, mode, cx).map_err(Stop::Other)? {
                            Gathered::Ended => sending = None,
                            Gathered::Waiting => waiting = true,
                            Gathered::Full => {}
                        }
                    }
                    while written < self.wbuf.len() {
                        match Pin::new(&mut self.io).poll_write(cx, &self.wbuf[written..]) {
                            Poll::Ready(Ok(0)) => Err(io::Error::from(io::ErrorKind::WriteZero))?,
                            Poll::Ready(Ok(n)) => {
                                written += n;
                                sent_any = true;
                                flushed = false;
                            }
                            Poll::Ready(Err(e)) => Err(e)?,
                            Poll::Pending => break,
                        }
                    }
                    if written < self.wbuf.len() {
                        // The socket is full: wait for room (or for the answer).
                        break;
                    }
                    self.wbuf.clear();
                    written = 0;
                    if !flushed {
                        // A tunnel stream buffers; TCP's flush is free.
                        match Pin::new(&mut self.io).poll_flush(cx) {
                            Poll::Ready(Ok(())) => flushed = true,
                            Poll::Ready(Err(e)) => Err(e)?,
                            Poll::Pending => break,
                        }
                    }
                    if sending.is_none() {
                        request_done = true;
                        if !empty_body {
                            body = None;
                        }
                    } else if waiting {
                        // The body has nothing ready: wait for it (or for the answer).
                        break;
                    }
                }
                // The answer: interim ones skipped, up to the final head. The buffer is
                // parsed only when it holds bytes not parsed yet (not while it is empty,
                // nor again after a read that brought nothing).
                loop {
                    let head = match self.rbuf.data() {
                        d if d.len() > parsed => {
                            parsed = d.len();
                            parse_head(d).map_err(Stop::Other)?
                        }
                        _ => None,
                    };
                    if let Some(h) = head {
                        self.rbuf.consume(h.len);
                        parsed = 0;
                        if h.status == StatusCode::SWITCHING_PROTOCOLS {
                            if !upgrade_asked {
                                Err(Stop::Other(H1Error::Malformed(
                                    "101 without an upgrade asked for",
                                )))?;
                            }
                            return Poll::Ready(Ok((h, true)));
                        }
                        if h.status.is_informational() {
                            interim += 1;
                            if interim > MAX_INTERIM {
                                Err(Stop::Other(H1Error::Malformed(
                                    "too many interim responses",
                                )))?;
                            }
                            continue;
                        }
                        return Poll::Ready(Ok((h, false)));
                    }
                    let answered = !self.rbuf.is_empty() || interim > 0;
                    let filled = ready!(fill(
                        &mut self.rbuf,
                        &mut self.io,
                        cx,
                        MAX_HEAD,
                        "response head too large"
                    ));
                    match filled {
                        Ok(0) => {
                            let error = if answered {
                                H1Error::Incomplete
                            } else {
                                H1Error::ClosedBeforeResponse
                            };
                            Err(Stop::Conn { answered, error })?;
                        }
                        Ok(_) => {}
                        Err(error) => Err(Stop::Conn { answered, error })?,
                    }
                }
            })();
            step.map_err(|stop| match stop {
                Stop::Conn { answered, error } => fail(self, &mut body, sent_any, answered, error),
                Stop::Other(e) => fail(self, &mut None, true, true, e),
            })
        })
        .await;
        let (h, upgraded) = head?;
        let mut resp = Response::new(());
        *resp.status_mut() = h.status;
        *resp.version_mut() = h.version;
        if upgraded {
            self.broken = true;
            self.reading = Reading::Done;
            let io = std::mem::replace(&mut self.io, Box::new(tokio::io::empty()) as BoxIo);
            let rest = Bytes::copy_from_slice(self.rbuf.data());
            self.rbuf.consume(self.rbuf.data().len());
            resp.extensions_mut()
                .insert(Upgraded(Arc::new(Mutex::new(Some((io, rest))))));
            *resp.headers_mut() = h.headers;
            return Ok(resp);
        }
        let (reading, keep_alive) = match framing(&parts.method, h.status, h.version, &h.fields) {
            Ok(f) => f,
            Err(e) => {
                self.broken = true;
                return Err(SendFail {
                    request: None,
                    error: e,
                });
            }
        };
        self.reading = reading;
        // An answer before the request's end: the rest is not sent, so the connection
        // cannot carry another request. Nor can one that asked for an upgrade and was
        // declined: it was opened for that exchange alone (`pool::checkout`'s `fresh`), and
        // an upstream that half-switched is not one to trust with the next request.
        self.keep_alive = keep_alive && request_done && !upgrade_asked && !f.close;
        *resp.headers_mut() = h.headers;
        self.advance();
        // The request's head is written and its map no longer read: it is the next
        // head's (`chunked::recycle`).
        chunked::recycle(parts.headers);
        Ok(resp)
    }

    /// The response body has ended (no more frames).
    pub fn body_done(&self) -> bool {
        self.reading == Reading::Done
    }

    pub fn size_hint(&self) -> SizeHint {
        match self.reading {
            Reading::Done => SizeHint::with_exact(0),
            Reading::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }

    /// Steps through chunk framing already buffered that carries no data, so the body's end
    /// shows as soon as its bytes are in (`chunked::advance`).
    fn advance(&mut self) {
        if let Reading::Chunked(c) = self.reading {
            let next = chunked::advance(&mut self.rbuf, c);
            self.chunked_to(next);
        }
    }

    /// The chunked body's state after a step; None: it has ended (the buffer back to its
    /// usual size for the pool).
    fn chunked_to(&mut self, next: Option<Chunk>) {
        match next {
            Some(c) => self.reading = Reading::Chunked(c),
            None => {
                self.reading = Reading::Done;
                self.rbuf.shrink();
            }
        }
    }

    fn fail_body(&mut self, e: H1Error) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        self.broken = true;
        self.reading = Reading::Done;
        Poll::Ready(Some(Err(e)))
    }

    /// The response body's next frame.
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        loop {
            let avail = self.rbuf.data().len();
            match self.reading {
                Reading::Done => return Poll::Ready(None),
                Reading::Length(left) if avail > 0 => {
                    let n = usize::try_from(left).map_or(avail, |l| l.min(avail));
                    let d = self.rbuf.take(n);
                    let left = left - n as u64;
                    self.reading = if left == 0 {
                        self.rbuf.shrink();
                        Reading::Done
                    } else {
                        Reading::Length(left)
                    };
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Reading::Close if avail > 0 => {
                    let d = self.rbuf.take(avail);
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Reading::Chunked(c) => match chunked::decode::<MAX_HEADERS>(&mut self.rbuf, c) {
                    Step::Frame(frame, next) => {
                        self.chunked_to(next);
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    Step::End => {
                        self.chunked_to(None);
                        return Poll::Ready(None);
                    }
                    Step::More(c) => self.reading = Reading::Chunked(c),
                    Step::Malformed(why) | Step::BadTrailers(why) => {
                        return self.fail_body(H1Error::Malformed(why));
                    }
                },
                _ => {}
            }
            // More bytes needed.
            let (limit, what) = match self.reading {
                Reading::Chunked(c) => c.fill_limit(MAX_HEAD),
                _ => (READ_BUF, "body buffer full"),
            };
            match ready!(fill(&mut self.rbuf, &mut self.io, cx, limit, what)) {
                Ok(0) if self.reading == Reading::Close => {
                    self.reading = Reading::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => return self.fail_body(H1Error::Incomplete),
                Ok(_) => {}
                Err(e) => return self.fail_body(e),
            }
        }
    }
}

/// A response body read from an upstream connection through `poll_frame`; the body type of
/// the codec's own tests (the engine reads it through `body::Tracked`).
#[cfg(test)]
struct ConnBody<'a>(&'a mut Conn);

#[cfg(test)]
impl Body for ConnBody<'_> {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        self.0.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.body_done()
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderName, HeaderValue};
    use http_body_util::{BodyExt, Empty, Full};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    /// A request body fed through a channel.
    struct Chan(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>);

    impl Body for Chan {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.0.poll_recv(cx)
        }
    }

    fn conn() -> (Conn, DuplexStream) {
        let (a, b) = tokio::io::duplex(256 * 1024);
        (Conn::new(Box::new(a)), b)
    }

    fn get(path: &str) -> Request<ProxyBody> {
        Request::builder()
            .uri(path)
            .header("host", "svc")
            .body(Empty::new().map_err(|n| match n {}).boxed_unsync())
            .unwrap()
    }

    /// Reads one request head (up to the empty line) from the peer side.
    async fn read_head(peer: &mut DuplexStream) -> String {
        let mut got = Vec::new();
        let mut b = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            assert_eq!(peer.read(&mut b).await.unwrap(), 1, "request head cut off");
            got.push(b[0]);
        }
        String::from_utf8(got).unwrap()
    }

    /// Sends a GET, answers with `answer`, and collects the response.
    async fn exchange(
        answer: &[u8],
    ) -> (
        Result<(Response<()>, Result<Vec<Frame<Bytes>>, H1Error>), H1Error>,
        Conn,
    ) {
        exchange_req(get("/x"), answer, true).await
    }

    async fn exchange_req(
        req: Request<ProxyBody>,
        answer: &[u8],
        close_after: bool,
    ) -> (
        Result<(Response<()>, Result<Vec<Frame<Bytes>>, H1Error>), H1Error>,
        Conn,
    ) {
        let (mut c, mut peer) = conn();
        let answer = answer.to_vec();
        let server = tokio::spawn(async move {
            let head = read_head(&mut peer).await;
            peer.write_all(&answer).await.unwrap();
            if close_after {
                drop(peer);
                None
            } else {
                Some((head, peer))
            }
        });
        let res = match c.send(req).await {
            Ok(resp) => {
                let mut frames = Vec::new();
                let body = loop {
                    match std::future::poll_fn(|cx| c.poll_frame(cx)).await {
                        None => break Ok(frames),
                        Some(Ok(f)) => frames.push(f),
                        Some(Err(e)) => break Err(e),
                    }
                };
                Ok((resp, body))
            }
            Err(f) => Err(f.error),
        };
        let _ = server.await;
        (res, c)
    }

    fn data(frames: &[Frame<Bytes>]) -> Vec<u8> {
        frames
            .iter()
            .filter_map(|f| f.data_ref())
            .flat_map(|d| d.iter().copied())
            .collect()
    }

    #[tokio::test]
    async fn content_length_body_and_keep_alive_reuse() {
        let (mut c, mut peer) = conn();
        for i in 0..3 {
            let server = async {
                let head = read_head(&mut peer).await;
                assert!(head.starts_with("GET /x HTTP/1.1\r\n"), "{head}");
                assert!(head.contains("host: svc\r\n"), "{head}");
                peer.write_all(
                    format!("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhell{i}").as_bytes(),
                )
                .await
                .unwrap();
            };
            let client = async {
                let r = c.send(get("/x")).await.map_err(|f| f.error).unwrap();
                assert_eq!(r.status(), 200);
                let b = ConnBody(&mut c).collect().await.unwrap().to_bytes();
                assert_eq!(&b[..], format!("hell{i}").as_bytes());
            };
            tokio::join!(server, client);
            assert!(c.is_reusable(), "request {i}");
            assert!(std::future::poll_fn(|cx| c.poll_idle(cx)).await.is_ok());
        }
        // The upstream closes the idle connection: the next checkout sees it.
        drop(peer);
        assert!(std::future::poll_fn(|cx| c.poll_idle(cx)).await.is_err());
    }

    #[tokio::test]
    async fn chunked_body_with_extensions_and_trailers() {
        let (res, c) = exchange(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
              5;ext=1\r\nhello\r\n6 \r\n world\r\n0\r\ngrpc-status: 0\r\n\r\n",
        )
        .await;
        let (resp, frames) = res.unwrap();
        assert_eq!(resp.status(), 200);
        let frames = frames.unwrap();
        assert_eq!(data(&frames), b"hello world");
        let t = frames
            .iter()
            .find_map(|f| f.trailers_ref())
            .expect("trailers");
        assert_eq!(t["grpc-status"], "0");
        assert!(c.is_reusable());
    }

    #[tokio::test]
    async fn chunked_end_shows_without_another_read() {
        let (mut c, mut peer) = conn();
        peer.write_all(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
        let server = tokio::spawn(async move {
            read_head(&mut peer).await;
            peer // kept open: no EOF can end the body
        });
        c.send(get("/")).await.map_err(|f| f.error).unwrap();
        let f = std::future::poll_fn(|cx| c.poll_frame(cx))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(f.data_ref().unwrap(), "abc");
        assert!(
            c.body_done(),
            "the last chunk was buffered: the body is over"
        );
        assert!(c.is_reusable());
        drop(server.await);
    }

    #[tokio::test]
    async fn no_body_after_head_204_304_and_1xx_skipped() {
        for (req, answer) in [
            (
                Request::builder()
                    .method("HEAD")
                    .uri("/")
                    .body(Empty::new().map_err(|n| match n {}).boxed_unsync())
                    .unwrap(),
                &b"HTTP/1.1 200 OK\r\ncontent-length: 14\r\n\r\n"[..],
            ),
            (get("/"), &b"HTTP/1.1 204 No Content\r\ncontent-length: 3\r\n\r\n"[..]),
            (get("/"), &b"HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n"[..]),
            (
                get("/"),
                &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"[..],
            ),
        ] {
            let (res, c) = exchange_req(req, answer, false).await;
            let (resp, frames) = res.unwrap();
            let frames = frames.unwrap();
            if resp.status() == 200 && !frames.is_empty() {
                assert_eq!(data(&frames), b"ok");
            } else {
                assert!(frames.is_empty(), "{}: {frames:?}", resp.status());
            }
            assert!(c.is_reusable(), "{}", resp.status());
        }
    }

    #[tokio::test]
    async fn close_delimited_body_runs_to_eof_and_is_not_reused() {
        let (res, c) = exchange(b"HTTP/1.1 200 OK\r\n\r\nuntil the end").await;
        let (_, frames) = res.unwrap();
        assert_eq!(data(&frames.unwrap()), b"until the end");
        assert!(!c.is_reusable());
        // HTTP/1.0 without keep-alive: not reused either.
        let (res, c) = exchange(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        assert_eq!(data(&res.unwrap().1.unwrap()), b"ok");
        assert!(!c.is_reusable());
        let (res, c) =
            exchange(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok").await;
        assert_eq!(data(&res.unwrap().1.unwrap()), b"ok");
        assert!(!c.is_reusable());
    }

    #[tokio::test]
    async fn bodies_cut_short_are_errors_not_ends() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"[..],
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"[..],
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel"[..],
        ] {
            let (res, c) = exchange(answer).await;
            let (_, body) = res.unwrap();
            assert!(
                matches!(body, Err(H1Error::Incomplete)),
                "{}: {body:?}",
                String::from_utf8_lossy(answer)
            );
            assert!(!c.is_reusable());
        }
    }

    #[tokio::test]
    async fn malformed_responses_are_protocol_errors() {
        let long_line = format!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1;{}\r\n",
            "x".repeat(chunked::MAX_CHUNK_LINE + 10)
        );
        let many = format!(
            "HTTP/1.1 200 OK\r\n{}\r\n",
            "a: b\r\n".repeat(MAX_HEADERS + 1)
        );
        let cases: Vec<(Vec<u8>, bool)> = vec![
            (b"HTTP/1.1 2x0 OK\r\n\r\n".to_vec(), true),
            (b"SSH-2.0-OpenSSH\r\n\r\n".to_vec(), true),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello".to_vec(),
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n".to_vec(),
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n"
                    .to_vec(),
                true,
            ),
            (
                b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec(),
                true,
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n".to_vec(),
                true,
            ),
            (many.into_bytes(), true),
            // Framing errors inside the body: an error frame, the head went out fine.
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n".to_vec(),
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabXX".to_vec(),
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n11111111111111111\r\n"
                    .to_vec(),
                false,
            ),
            (long_line.into_bytes(), false),
        ];
        for (answer, in_head) in cases {
            let (res, c) = exchange(&answer).await;
            let what = String::from_utf8_lossy(&answer[..answer.len().min(60)]).into_owned();
            match (res, in_head) {
                (Err(e), true) => assert!(e.is_protocol(), "{what}: {e}"),
                (Ok((_, Err(e))), false) => assert!(e.is_protocol(), "{what}: {e}"),
                (other, _) => panic!(
                    "{what}: {:?}",
                    other.map(|(r, b)| (r.status(), b.map(|f| f.len())))
                ),
            }
            assert!(!c.is_reusable(), "{what}");
        }
    }

    #[tokio::test]
    async fn an_endless_head_is_cut_at_the_bound() {
        let (mut c, mut peer) = conn();
        let server = tokio::spawn(async move {
            read_head(&mut peer).await;
            let _ = peer.write_all(b"HTTP/1.1 200 OK\r\n").await;
            let line = format!("x-filler: {}\r\n", "y".repeat(1000));
            // Far more than the bound; the client stops reading at it.
            for _ in 0..(MAX_HEAD / 1000 + 10) {
                if peer.write_all(line.as_bytes()).await.is_err() {
                    break;
                }
            }
            peer
        });
        let e = c.send(get("/")).await.expect_err("an error").error;
        assert!(e.is_protocol(), "{e}");
        assert!(c.rbuf.size() <= MAX_HEAD);
        drop(server.await);
    }

    #[tokio::test]
    async fn request_bodies_are_framed_by_length_or_chunks() {
        // Known length: one write with the head.
        let (mut c, mut peer) = conn();
        let req = Request::builder()
            .method("POST")
            .uri("/p?q=1")
            .header("host", "svc")
            .body(
                Full::new(Bytes::from_static(b"abc"))
                    .map_err(|n| match n {})
                    .boxed_unsync(),
            )
            .unwrap();
        let server = async {
            let head = read_head(&mut peer).await;
            assert!(head.starts_with("POST /p?q=1 HTTP/1.1\r\n"), "{head}");
            assert!(head.contains("content-length: 3\r\n"), "{head}");
            let mut b = [0u8; 3];
            peer.read_exact(&mut b).await.unwrap();
            assert_eq!(&b, b"abc");
            peer.write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
        };
        let (_, r) = tokio::join!(server, c.send(req));
        assert_eq!(r.map_err(|f| f.error).unwrap().status(), 201);
        assert!(c.is_reusable());
        // Unknown length: chunked, trailers at the end.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let req = Request::builder()
            .method("POST")
            .uri("/s")
            .header("host", "svc")
            .body(Chan(rx).boxed_unsync())
            .unwrap();
        let server = async {
            let head = read_head(&mut peer).await;
            assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
            tx.send(Ok(Frame::data(Bytes::from_static(b"hello"))))
                .await
                .unwrap();
            let mut t = HeaderMap::new();
            t.insert("x-sum", HeaderValue::from_static("5"));
            tx.send(Ok(Frame::trailers(t))).await.unwrap();
            let want = b"5\r\nhello\r\n0\r\nx-sum: 5\r\n\r\n";
            let mut got = vec![0u8; want.len()];
            peer.read_exact(&mut got).await.unwrap();
            assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
            peer.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
        };
        let (_, r) = tokio::join!(server, c.send(req));
        assert_eq!(r.map_err(|f| f.error).unwrap().status(), 200);
        assert!(c.is_reusable());
    }

    #[tokio::test]
    async fn a_failing_request_body_is_the_requests_error_and_ends_the_connection() {
        let (mut c, mut peer) = conn();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let req = Request::builder()
            .method("POST")
            .uri("/s")
            .body(Chan(rx).boxed_unsync())
            .unwrap();
        let server = async {
            read_head(&mut peer).await;
            tx.send(Err("client went away".into())).await.unwrap();
        };
        let (_, r) = tokio::join!(server, c.send(req));
        let f = r.expect_err("an error");
        assert!(matches!(f.error, H1Error::RequestBody(_)), "{}", f.error);
        assert!(f.request.is_none(), "part of it went out");
        assert!(!c.is_reusable());
    }

    #[tokio::test]
    async fn an_early_answer_stops_the_body_and_the_connection() {
        let (mut c, mut peer) = conn();
        let (_tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let req = Request::builder()
            .method("POST")
            .uri("/big")
            .header("content-length", "1000000")
            .body(Chan(rx).boxed_unsync())
            .unwrap();
        let server = async {
            read_head(&mut peer).await;
            peer.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
        };
        let (_, r) = tokio::join!(server, c.send(req));
        assert_eq!(r.map_err(|f| f.error).unwrap().status(), 413);
        assert!(c.body_done());
        assert!(!c.is_reusable(), "the request body was never finished");
    }

    #[tokio::test]
    async fn a_closed_kept_alive_connection_gives_an_idempotent_request_back() {
        let (res, _) = exchange(b"").await;
        assert!(matches!(res, Err(H1Error::ClosedBeforeResponse)));
        let (mut c, peer) = conn();
        drop(peer);
        let f = c.send(get("/again")).await.err().unwrap();
        let back = f.request.expect("given back");
        assert_eq!(back.uri(), "/again");
        // A POST with a body that went out is not.
        let (mut c, mut peer) = conn();
        let server = async move {
            read_head(&mut peer).await;
            let mut b = [0u8; 2];
            peer.read_exact(&mut b).await.unwrap();
        };
        let req = Request::builder()
            .method("POST")
            .uri("/")
            .body(
                Full::new(Bytes::from_static(b"hi"))
                    .map_err(|n| match n {})
                    .boxed_unsync(),
            )
            .unwrap();
        let (_, r) = tokio::join!(server, c.send(req));
        assert!(r.err().unwrap().request.is_none());
    }

    #[tokio::test]
    async fn an_asked_for_upgrade_hands_the_connection_back() {
        let (mut c, mut peer) = conn();
        let req = Request::builder()
            .uri("/ws")
            .header("host", "svc")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Empty::new().map_err(|n| match n {}).boxed_unsync())
            .unwrap();
        let server = async {
            read_head(&mut peer).await;
            peer.write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\nframe")
                .await
                .unwrap();
        };
        let (_, r) = tokio::join!(server, c.send(req));
        let resp = r.map_err(|f| f.error).unwrap();
        assert_eq!(resp.status(), 101);
        assert!(!c.is_reusable());
        let up = resp
            .extensions()
            .get::<Upgraded>()
            .expect("the connection")
            .clone();
        let (mut io, read) = up.0.lock().unwrap().take().unwrap();
        assert_eq!(&read[..], b"frame");
        io.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        peer.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
    }

    fn upgrade_req() -> Request<ProxyBody> {
        Request::builder()
            .uri("/ws")
            .header("host", "svc")
            .header("connection", "upgrade")
            .header("upgrade", "echo-proto")
            .body(Empty::new().map_err(|n| match n {}).boxed_unsync())
            .unwrap()
    }

    #[tokio::test]
    async fn an_upgrade_request_goes_out_with_its_upgrade_headers() {
        let (res, _) = exchange_req(
            upgrade_req(),
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo-proto\r\n\r\n",
            false,
        )
        .await;
        let (resp, body) = res.unwrap();
        assert_eq!(resp.status(), 101);
        assert_eq!(resp.headers()["upgrade"], "echo-proto");
        assert!(resp.extensions().get::<Upgraded>().is_some());
        // No body: the bytes after a 101 are the new protocol's, not the response's.
        assert!(body.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_declined_upgrade_is_an_ordinary_answer_on_a_connection_not_reused() {
        let (res, c) = exchange_req(
            upgrade_req(),
            b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 2\r\n\r\nno",
            false,
        )
        .await;
        let (resp, body) = res.unwrap();
        assert_eq!(resp.status(), 426);
        assert!(resp.extensions().get::<Upgraded>().is_none());
        assert_eq!(data(&body.unwrap()), b"no");
        // Read to its end and keep-alive as far as the upstream said, yet never pooled.
        assert!(c.body_done());
        assert!(!c.is_reusable());
    }

    #[tokio::test]
    async fn the_head_of_an_upgrade_request_keeps_connection_and_upgrade() {
        let (mut c, mut peer) = conn();
        let server = async {
            let head = read_head(&mut peer).await;
            peer.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            head
        };
        let (head, r) = tokio::join!(server, c.send(upgrade_req()));
        assert_eq!(r.map_err(|f| f.error).unwrap().status(), 400);
        let head = head.to_ascii_lowercase();
        assert!(head.starts_with("get /ws http/1.1\r\n"), "{head}");
        assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
        assert!(head.contains("\r\nupgrade: echo-proto\r\n"), "{head}");
        // A GET without a body gets no framing headers of its own.
        assert!(
            !head.contains("content-length") && !head.contains("transfer-encoding"),
            "{head}"
        );
    }

    /// The framing read in one pass over the parsed fields says what the header map's
    /// lookups said (`has_token` skips values that are not visible ASCII; the first
    /// `Content-Length` fault wins; `Transfer-Encoding`'s last coding of its last value
    /// that has one).
    #[test]
    fn framing_from_the_fields_is_the_maps() {
        fn by_map(
            method: &Method,
            status: StatusCode,
            version: Version,
            h: &HeaderMap,
        ) -> Result<(Reading, bool), String> {
            let keep_alive = if version == Version::HTTP_11 {
                !has_token(h, header::CONNECTION, "close")
            } else {
                has_token(h, header::CONNECTION, "keep-alive")
            };
            if *method == Method::HEAD || status == 204 || status == 304 {
                return Ok((Reading::Done, keep_alive));
            }
            if *method == Method::CONNECT && status.is_success() {
                return Ok((Reading::Done, false));
            }
            if h.contains_key(header::TRANSFER_ENCODING) {
                if h.contains_key(header::CONTENT_LENGTH) {
                    return Err(
                        H1Error::Malformed("both transfer-encoding and content-length").to_string(),
                    );
                }
                if version != Version::HTTP_11 {
                    return Err(H1Error::Malformed("transfer-encoding on HTTP/1.0").to_string());
                }
                let last = h
                    .get_all(header::TRANSFER_ENCODING)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .map(str::trim)
                    .rfind(|t| !t.is_empty());
                return Ok(match last {
                    Some(t) if t.eq_ignore_ascii_case("chunked") => {
                        (Reading::Chunked(Chunk::Size), keep_alive)
                    }
                    _ => (Reading::Close, false),
                });
            }
            Ok(match content_length(h).map_err(|e| e.to_string())? {
                Some(0) => (Reading::Done, keep_alive),
                Some(n) => (Reading::Length(n), keep_alive),
                None => (Reading::Close, false),
            })
        }
        let heads: &[&[u8]] = &[
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nconnection: x, keep-alive\r\ncontent-length: 3\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\xff\r\ncontent-length: 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nconnection: close \xe9\r\ncontent-length: 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\ncontent-length: 7\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\ncontent-length: 8\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: x\r\ncontent-length: 8\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\ncontent-length: ,\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, ,\r\ntransfer-encoding: ,\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: gzip\xff\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: x\r\n\r\n",
            b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\ncontent-length: x\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\ncontent-length: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Foo\r\nx-foo: 1\r\nX-Bar: 2\r\nKeep-Alive: timeout=5\r\nProxy-Connection: x\r\nTE: trailers\r\nTrailer: x\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nconnection: x-foo\xff\r\nx-foo: 1\r\nconnection: ,x-bar ,\r\nx-bar: 2\r\nUpgrade: h2c\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade, x-foo\r\nupgrade: echo\r\nx-foo: 1\r\n\r\n",
        ];
        for head in heads {
            let h = parse_head(head).unwrap().unwrap();
            let mut fields = [httparse::EMPTY_HEADER; 16];
            let mut r = httparse::Response::new(&mut fields);
            let Ok(httparse::Status::Complete(n)) = r.parse(head) else {
                panic!("{}", String::from_utf8_lossy(head));
            };
            let full =
                chunked::header_map(&head[..n], &Bytes::copy_from_slice(&head[..n]), r.headers)
                    .unwrap();
            // The map leaves out what the engine's strip would remove (all of it kept in a
            // `101`).
            let mut stripped = full.clone();
            route::strip_hop_by_hop(&mut stripped, false);
            let kept = if h.status == StatusCode::SWITCHING_PROTOCOLS {
                &full
            } else {
                &stripped
            };
            assert_eq!(&h.headers, kept, "{}", String::from_utf8_lossy(head));
            for method in [Method::GET, Method::HEAD, Method::CONNECT] {
                let want = by_map(&method, h.status, h.version, &full);
                let got = framing(&method, h.status, h.version, &h.fields);
                let what = String::from_utf8_lossy(head);
                match (want, got) {
                    (Ok(w), Ok(g)) => assert_eq!(w, g, "{method} {what}"),
                    (Err(w), Err(g)) => assert_eq!(w, g.to_string(), "{method} {what}"),
                    (w, g) => panic!("{method} {what}: {w:?} against {g:?}"),
                }
            }
        }
    }

    /// The request's fields read in one pass say what the map's lookups said.
    #[test]
    fn request_fields_from_one_pass_are_the_lookups() {
        let cases: &[&[(&str, &[u8])]] = &[
            &[],
            &[("host", b"a"), ("content-length", b"5")],
            &[("content-length", b"5, 5"), ("Content-Length", b"5")],
            &[("content-length", b"5"), ("content-length", b"6")],
            &[("content-length", b"x"), ("content-length", b"6")],
            &[
                ("connection", b"keep-alive, Close"),
                ("upgrade", b"websocket"),
            ],
            &[("connection", b"close\xff"), ("connection", b"upgrade")],
            &[("connection", b"x-close"), ("host", b"h"), ("x-a", b"1")],
        ];
        for fields in cases {
            let mut h = HeaderMap::new();
            for (n, v) in *fields {
                h.append(
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_bytes(v).unwrap(),
                );
            }
            let want = RequestFields {
                host: h.contains_key(header::HOST),
                length: content_length(&h).ok().flatten(),
                upgrade: h.contains_key(header::UPGRADE),
                close: has_token(&h, header::CONNECTION, "close"),
            };
            assert_eq!(RequestFields::scan(&h), want, "{h:?}");
        }
    }
}
