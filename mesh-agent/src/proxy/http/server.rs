//! The downstream HTTP/1.1 server: a small, bounded codec driven inline by the connection's
//! task (`--l7-h1-server own`), instead of hyper's server dispatcher. hyper stays for
//! HTTP/2 (and `--l7-h1-server hyper` keeps it for HTTP/1.1 too).
//!
//! Why: hyper's server side was ~7,500 instructions of a proxied request (head parse into
//! its own structures, a header map, its dispatch state machine, encoding and buffer
//! management). Here a request head is one `read` parsed by `httparse` (hyper's own
//! parser) into a header map whose values share one copy of the head, and a response is
//! one `write` (the head, with as much of a ready body as fits [`COALESCE`]), as the
//! upstream codec (`h1`) does.
//!
//! What it speaks (RFC 9112, server side):
//!
//! - Heads: at most `max_request_headers_bytes` (431 and close past it) and
//!   [`MAX_HEADERS`] fields (431); anything `httparse` rejects, an unknown method, a bad
//!   request-target (origin form, absolute form, authority form for `CONNECT`, `*` for
//!   `OPTIONS` only) or a `Host` missing (HTTP/1.1) or repeated gets 400 and close.
//! - Request bodies (section 6): `Transfer-Encoding` with `chunked` last is chunked (with
//!   trailers); any other `Transfer-Encoding`, one on HTTP/1.0, or one with
//!   `Content-Length` is 400 and close; differing or invalid `Content-Length` values are
//!   400 and close; neither: no body. A body cut short (EOF before its length or its last
//!   chunk) or malformed is an error frame (`Source` turns it into the client's fault and
//!   the upstream request is reset, never ended cleanly), and the connection closes after
//!   the answer. `Expect: 100-continue` is answered when the engine first reads the body,
//!   never if it answers first.
//! - Keep-alive: HTTP/1.1 unless `Connection: close`; HTTP/1.0 only with `keep-alive`.
//!   After an answer, an unread request body is read and dropped up to [`DRAIN_LIMIT`]
//!   bytes, or the connection closes (at once when the body is known to be longer, or
//!   its `100 Continue` was never sent). Pipelined requests wait in the read buffer
//!   (bounded by it) and the next head is parsed once the answer is written.
//! - Responses: status line, header fields, the cached `Date`, the body framed by
//!   `Content-Length` (its exact size hint), chunked (trailers only to a client that sent
//!   `TE: trailers`) or, for an HTTP/1.0 client, the connection's close; none after
//!   `HEAD`, `1xx`, `204` or `304`. A response body that fails or ends short of its length
//!   closes the connection mid-body (the client sees it cut, never a clean end).
//! - Upgrades: a `101` is written, then the connection and the bytes read past the
//!   request's head are handed back ([`End::Upgraded`]) for `upgrade` to splice.
//! - Drain: an idle connection closes at once; one with a request in flight answers it
//!   with `Connection: close`, then closes.
//! - Timeouts: [`HEADER_READ_TIMEOUT`] to receive a whole head (counted from when the
//!   connection starts waiting for it, idle keep-alive time included, as hyper's), on
//!   the connection's shared `Timer`.

use std::{
    cell::RefCell,
    future::{poll_fn, Future},
    io,
    mem::MaybeUninit,
    pin::{pin, Pin},
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc, Mutex, MutexGuard,
    },
    task::{ready, Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{header, request, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::{io::AsyncWrite, time::Instant};

use super::{
    body::ReqBody,
    chunked::{
        self, add_length, decimal, header_map, last_coding_is_chunked, put, put_chunk, put_last,
        Chunk, ReadBuffer, Step, READ_BUF,
    },
    timer::Timer,
    BoxIo, ProxyBody,
};

/// How long a request head may take to arrive in full, from when the connection starts
/// waiting for it (hyper's default header read timeout).
pub(super) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Most header fields in a request head (hyper's default); more: 431.
pub(super) const MAX_HEADERS: usize = 100;
/// Unread request body bytes read and dropped after an answer before the connection is
/// closed instead.
pub(super) const DRAIN_LIMIT: u64 = 64 * 1024;
/// Response bytes gathered behind the head (or each other) before a write.
const COALESCE: usize = 16 * 1024;
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// In a request's extensions: it asked for an upgrade on a connection of this codec, so a
/// `101` answer hands the connection over (hyper's `OnUpgrade` on the hyper path).
#[derive(Debug, Clone, Copy)]
pub(super) struct Upgradable;

/// How a served connection ended.
pub(super) enum End {
    /// Closed (by either side, an error, the drain, or a timeout).
    Closed,
    /// A `101` went out: the connection and the bytes the client sent past its request.
    Upgraded(BoxIo, Bytes),
}

/// A request body's failure, the client's.
#[derive(Debug, thiserror::Error)]
pub(super) enum BodyError {
    #[error("the client closed the connection before the request body's end (body cut short)")]
    Cut,
    #[error("malformed request body: {0}")]
    Malformed(&'static str),
    #[error("reading the request body: {0}")]
    Io(#[from] io::Error),
    #[error("the request body was not read before its connection moved on")]
    Gone,
}

/// How the request body is delimited, and where its reading stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// No body, or it has ended.
    Done,
    Length(u64),
    Chunked(Chunk),
    /// Malformed or cut short: the connection closes after the answer.
    Failed,
}

/// The connection's state the request body reads through (it may be read from another
/// task: an HTTP/2 upstream's request stream).
struct Inner {
    io: BoxIo,
    rbuf: ReadBuffer,
    reading: Reading,
    /// `100 Continue` owed: how much of it is written.
    cont: Option<usize>,
    /// The request whose body `reading` is; a body handle of an older one gets `Gone`.
    seq: u64,
    /// Largest trailer section (the head limit).
    max_head: usize,
}

type Shared = Arc<Mutex<Inner>>;

fn lock(s: &Shared) -> MutexGuard<'_, Inner> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn fail(&mut self, e: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.reading = Reading::Failed;
        Poll::Ready(Some(Err(e)))
    }

    /// Writes what is left of an owed `100 Continue`.
    fn poll_continue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(at) = self.cont {
            if at == CONTINUE.len() {
                self.cont = None;
                // TCP's flush is free; a tunnel stream buffers.
                ready!(Pin::new(&mut self.io).poll_flush(cx))?;
                break;
            }
            match ready!(Pin::new(&mut self.io).poll_write(cx, &CONTINUE[at..])) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.cont = Some(at + n),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// The request body's next frame.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if !matches!(self.reading, Reading::Done | Reading::Failed) && self.cont.is_some() {
            if let Err(e) = ready!(self.poll_continue(cx)) {
                return self.fail(e.into());
            }
        }
        loop {
            let avail = self.rbuf.len();
            match self.reading {
                Reading::Done => return Poll::Ready(None),
                Reading::Failed => return Poll::Ready(Some(Err(BodyError::Cut))),
                Reading::Length(left) if avail > 0 => {
                    let n = usize::try_from(left).map_or(avail, |l| l.min(avail));
                    let d = self.rbuf.take(n);
                    let left = left - n as u64;
                    self.reading = if left == 0 {
                        Reading::Done
                    } else {
                        Reading::Length(left)
                    };
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Reading::Chunked(c) => match chunked::decode::<MAX_HEADERS>(&mut self.rbuf, c) {
                    Step::Frame(frame, next) => {
                        self.reading = next.map_or(Reading::Done, Reading::Chunked);
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    Step::End => {
                        self.reading = Reading::Done;
                        return Poll::Ready(None);
                    }
                    Step::More(c) => self.reading = Reading::Chunked(c),
                    Step::Malformed(why) => return self.fail(BodyError::Malformed(why)),
                    Step::BadTrailers(_) => {
                        return self.fail(BodyError::Malformed("invalid trailers"));
                    }
                },
                _ => {}
            }
            let limit = match self.reading {
                Reading::Chunked(c) => c.fill_limit(self.max_head).0,
                _ => READ_BUF,
            };
            match ready!(self.rbuf.poll_fill(&mut self.io, cx, limit)) {
                Ok(Some(0)) => return self.fail(BodyError::Cut),
                Ok(Some(_)) => {}
                Ok(None) => return self.fail(BodyError::Malformed("trailer section too large")),
                Err(e) => return self.fail(e.into()),
            }
        }
    }
}

/// A request body read from the connection as the engine asks for it.
pub(super) struct Body {
    /// None: a request without a body.
    shared: Option<Shared>,
    seq: u64,
    ended: bool,
    /// Bytes left by `Content-Length` (None: chunked).
    left: Option<u64>,
}

impl Body {
    fn empty() -> Body {
        Body {
            shared: None,
            seq: 0,
            ended: true,
            left: Some(0),
        }
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let Some(shared) = self.shared.clone() else {
            return Poll::Ready(None);
        };
        let mut g = lock(&shared);
        if g.seq != self.seq {
            self.ended = true;
            return Poll::Ready(Some(Err(BodyError::Gone)));
        }
        let frame = ready!(g.poll_body(cx));
        match &frame {
            Some(Ok(f)) => {
                if let (Some(d), Some(l)) = (f.data_ref(), self.left.as_mut()) {
                    *l -= d.len() as u64;
                }
                self.ended = g.reading == Reading::Done;
            }
            _ => self.ended = true,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Some(n) if !self.ended => SizeHint::with_exact(n),
            _ if self.ended => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// Why a head is refused: the status, and a word for the debug log.
#[derive(Debug, PartialEq, Eq)]
struct Refused(StatusCode, &'static str);

fn bad(why: &'static str) -> Refused {
    Refused(StatusCode::BAD_REQUEST, why)
}

/// A parsed request head: its length in the buffer, the request's parts, and what the
/// exchange needs.
struct Head {
    len: usize,
    parts: request::Parts,
    reading: Reading,
    x: Exchange,
    expect_continue: bool,
}

/// What answering a request needs to know of it.
#[derive(Debug, Clone, Copy)]
struct Exchange {
    head: bool,
    http10: bool,
    keep_alive: bool,
    trailers: bool,
}

/// The request-target as a URI: origin form, absolute form, authority form (`CONNECT`
/// only) or `*` (`OPTIONS` only).
fn target(method: &Method, raw: Bytes) -> Result<Uri, Refused> {
    let first = raw.first().copied();
    let ok = match first {
        Some(b'/') => *method != Method::CONNECT,
        Some(b'*') => raw.len() == 1 && *method == Method::OPTIONS,
        Some(_) => true,
        None => false,
    };
    if !ok {
        return Err(bad("invalid request-target"));
    }
    let uri = Uri::from_maybe_shared(raw).map_err(|_| bad("invalid request-target"))?;
    let form_ok = match (first, method == Method::CONNECT) {
        (Some(b'/' | b'*'), _) => true,
        // Authority form: nothing but the authority.
        (_, true) => {
            uri.scheme().is_none()
                && uri.authority().is_some()
                && uri
                    .path_and_query()
                    .is_none_or(|p| p.as_str().is_empty() || p.as_str() == "/")
        }
        // Absolute form.
        (_, false) => uri.scheme().is_some() && uri.authority().is_some(),
    };
    if !form_ok {
        return Err(bad("invalid request-target"));
    }
    Ok(uri)
}

/// Whether a comma-separated list holds `token`, in any case.
fn list_has(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// What the fields the codec acts on say, read in one pass over the parsed head (the
/// header map is then built once, and never searched by name).
#[derive(Default)]
struct Fields {
    hosts: usize,
    /// `Content-Length`: the value all its values and list elements agree on.
    length: Option<u64>,
    /// `Transfer-Encoding` was given; its last coding is `chunked`.
    te: bool,
    chunked_last: bool,
    close: bool,
    keep_alive: bool,
    trailers: bool,
    expect_continue: bool,
    upgrade: bool,
}

impl Fields {
    fn scan(fields: &[httparse::Header<'_>]) -> Result<Fields, Refused> {
        let mut f = Fields::default();
        for h in fields {
            let (n, v) = (h.name.as_bytes(), h.value);
            match n.len() {
                2 if n.eq_ignore_ascii_case(b"te") => f.trailers |= list_has(v, b"trailers"),
                4 if n.eq_ignore_ascii_case(b"host") => f.hosts += 1,
                6 if n.eq_ignore_ascii_case(b"expect") => {
                    f.expect_continue = v.trim_ascii().eq_ignore_ascii_case(b"100-continue");
                }
                7 if n.eq_ignore_ascii_case(b"upgrade") => f.upgrade = true,
                10 if n.eq_ignore_ascii_case(b"connection") => {
                    f.close |= list_has(v, b"close");
                    f.keep_alive |= list_has(v, b"keep-alive");
                }
                14 if n.eq_ignore_ascii_case(b"content-length") => {
                    add_length(&mut f.length, v).map_err(bad)?;
                }
                17 if n.eq_ignore_ascii_case(b"transfer-encoding") => {
                    f.te = true;
                    if let Some(c) = last_coding_is_chunked(v) {
                        f.chunked_last = c;
                    }
                }
                _ => {}
            }
        }
        Ok(f)
    }

    /// How the request body is delimited (RFC 9112, section 6).
    fn framing(&self, version: Version) -> Result<Reading, Refused> {
        if self.te {
            if self.length.is_some() {
                return Err(bad("both transfer-encoding and content-length"));
            }
            if version != Version::HTTP_11 {
                return Err(bad("transfer-encoding on HTTP/1.0"));
            }
            if !self.chunked_last {
                return Err(bad("transfer-encoding without chunked last"));
            }
            return Ok(Reading::Chunked(Chunk::Size));
        }
        Ok(match self.length {
            Some(0) | None => Reading::Done,
            Some(n) => Reading::Length(n),
        })
    }
}

fn parse_head(data: &[u8], max_head: usize) -> Result<Option<Head>, Refused> {
    const TOO_LARGE: Refused = Refused(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "request head too large",
    );
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut r = httparse::Request::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut r,
        data,
        &mut fields,
    );
    let len = match parsed {
        Ok(httparse::Status::Partial) if data.len() >= max_head => return Err(TOO_LARGE),
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(n)) if n > max_head => return Err(TOO_LARGE),
        Ok(httparse::Status::Complete(n)) => n,
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refused(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "too many header fields",
            ))
        }
        Err(httparse::Error::Version) => return Err(bad("not HTTP/1.x")),
        Err(_) => return Err(bad("malformed request head")),
    };
    let version = match r.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Err(bad("not HTTP/1.x")),
    };
    let method =
        Method::from_bytes(r.method.unwrap_or("").as_bytes()).map_err(|_| bad("invalid method"))?;
    let f = Fields::scan(r.headers)?;
    if f.hosts > 1 || (f.hosts == 0 && version == Version::HTTP_11) {
        return Err(bad("a request needs one Host"));
    }
    let reading = f.framing(version)?;
    let head = &data[..len];
    // One copy of the head: the field values and the request-target share it.
    let shared = Bytes::copy_from_slice(head);
    let headers = header_map(head, &shared, r.headers).map_err(|_| bad("invalid header field"))?;
    let path = r.path.unwrap_or("");
    let at = (path.as_ptr() as usize).wrapping_sub(head.as_ptr() as usize);
    let raw = if at <= head.len() && path.len() <= head.len() - at {
        shared.slice(at..at + path.len())
    } else {
        Bytes::copy_from_slice(path.as_bytes())
    };
    let uri = target(&method, raw)?;
    let keep_alive = if version == Version::HTTP_11 {
        !f.close
    } else {
        f.keep_alive && !f.close
    };
    let x = Exchange {
        head: method == Method::HEAD,
        http10: version == Version::HTTP_10,
        keep_alive,
        trailers: f.trailers,
    };
    let expect_continue =
        version == Version::HTTP_11 && reading != Reading::Done && f.expect_continue;
    let upgrade = version == Version::HTTP_11 && f.upgrade;
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    if upgrade {
        parts.extensions.insert(Upgradable);
    }
    Ok(Some(Head {
        len,
        parts,
        reading,
        x,
        expect_continue,
    }))
}

const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `Sun, 06 Nov 1994 08:49:37 GMT` (RFC 9110's IMF-fixdate) of `secs` since the epoch.
pub(super) fn http_date(secs: u64) -> String {
    let days = secs / 86_400;
    let (y, m, d) = crate::identity::certs::civil_from_days(days as i64);
    let s = secs % 86_400;
    format!(
        "{}, {d:02} {} {y:04} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        MONTHS[(m - 1) as usize],
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

thread_local! {
    /// The `Date` value, formatted once a second per thread.
    static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

fn put_date(w: &mut Vec<u8>) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != now {
            *c = (now, http_date(now));
        }
        w.extend_from_slice(b"date: ");
        w.extend_from_slice(c.1.as_bytes());
        w.extend_from_slice(b"\r\n");
    });
}

/// How the response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writing {
    /// Nothing (no body, or it has all gone).
    Empty,
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, a body of unknown length).
    Eof,
}

/// The response's framing, and whether the connection must close after it.
fn response_framing(status: StatusCode, body: &ProxyBody, x: &Exchange) -> Writing {
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    if bodiless || x.head {
        Writing::Empty
    } else if body.is_end_stream() {
        Writing::Length(0)
    } else if let Some(n) = body.size_hint().exact() {
        Writing::Length(n)
    } else if x.http10 {
        Writing::Eof
    } else {
        Writing::Chunked
    }
}

/// Writes the response head into `w`.
fn encode_head(
    w: &mut Vec<u8>,
    parts: &http::response::Parts,
    writing: Writing,
    x: &Exchange,
    close: bool,
) {
    let status = parts.status;
    put(
        w,
        &[
            if x.http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " },
            status.as_str().as_bytes(),
            b" ",
            status.canonical_reason().unwrap_or("").as_bytes(),
            b"\r\n",
        ],
    );
    // `HEAD` and `304` pass the length of the body they stand for on as it is.
    let keep_length = x.head || status == StatusCode::NOT_MODIFIED;
    // Seen in the same pass, not looked up in the map.
    let mut dated = false;
    for (name, value) in &parts.headers {
        dated |= name == header::DATE;
        if (name == header::CONTENT_LENGTH && !keep_length)
            || (name == header::TRANSFER_ENCODING && !x.head)
            || (name == header::CONNECTION && close)
        {
            continue;
        }
        put(
            w,
            &[name.as_str().as_bytes(), b": ", value.as_bytes(), b"\r\n"],
        );
    }
    if !dated {
        put_date(w);
    }
    match writing {
        Writing::Length(n) => {
            let mut b = [0; 20];
            put(w, &[b"content-length: ", decimal(n, &mut b), b"\r\n"]);
        }
        Writing::Chunked => put(w, &[b"transfer-encoding: chunked\r\n"]),
        Writing::Empty | Writing::Eof => {}
    }
    if close {
        w.extend_from_slice(b"connection: close\r\n");
    } else if x.http10 {
        w.extend_from_slice(b"connection: keep-alive\r\n");
    }
    w.extend_from_slice(b"\r\n");
}

/// Moves what `body` has ready into `w`, framed by `writing`. `Ok(true)`: the body ended
/// (its last framing is in `w`); `Ok(false)`: nothing more is ready, or `w` is full.
fn gather(
    w: &mut Vec<u8>,
    body: &mut ProxyBody,
    writing: &mut Writing,
    trailers: bool,
    cx: &mut Context<'_>,
) -> io::Result<bool> {
    while w.len() < COALESCE {
        if *writing == Writing::Empty || (*writing == Writing::Length(0) && body.is_end_stream()) {
            *writing = Writing::Empty;
            return Ok(true);
        }
        let frame = match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Pending => return Ok(false),
            Poll::Ready(Some(Err(e))) => return Err(io::Error::other(e)),
            Poll::Ready(None) => {
                match *writing {
                    Writing::Length(0) | Writing::Eof | Writing::Empty => {}
                    Writing::Length(_) => {
                        return Err(io::Error::other(
                            "the response body ended short of its content-length",
                        ))
                    }
                    Writing::Chunked => put_last(w, None),
                }
                *writing = Writing::Empty;
                return Ok(true);
            }
            Poll::Ready(Some(Ok(f))) => f,
        };
        match frame.into_data() {
            Ok(d) if d.is_empty() => {}
            Ok(d) => match writing {
                Writing::Length(left) => {
                    let n = d.len() as u64;
                    if n > *left {
                        return Err(io::Error::other(
                            "the response body is longer than its content-length",
                        ));
                    }
                    *left -= n;
                    w.extend_from_slice(&d);
                }
                Writing::Chunked => put_chunk(w, &d),
                Writing::Eof => w.extend_from_slice(&d),
                Writing::Empty => {}
            },
            Err(frame) => {
                if let (Ok(t), Writing::Chunked) = (frame.into_trailers(), *writing) {
                    // Trailers only to a client that said it takes them (`TE: trailers`).
                    put_last(w, trailers.then_some(&t));
                    *writing = Writing::Empty;
                    return Ok(true);
                }
            }
        }
    }
    Ok(false)
}

/// Writes `w[*at..]`; Ready(Ok) once all of it is written.
fn poll_write_all(
    io: &mut BoxIo,
    w: &[u8],
    at: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    while *at < w.len() {
        match ready!(Pin::new(&mut *io).poll_write(cx, &w[*at..])) {
            Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Ok(n) => *at += n,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
    Poll::Ready(Ok(()))
}

/// What waiting for a head gave.
#[expect(
    clippy::large_enum_variant,
    reason = "one per request, moved once; boxing the head would cost an allocation"
)]
enum Next {
    Head(Head),
    /// The client closed, went quiet past the timeout, or the drain began while idle.
    Close,
    Refuse(Refused),
}

/// The connection's limits and signals.
pub(super) struct Settings<'a> {
    pub max_head: usize,
    /// The connection's shared `Timer` (`timer`): the head's timeout.
    pub timer: &'a Timer,
    /// Set once the drain began.
    pub draining: &'a AtomicBool,
}

/// Serves one downstream HTTP/1.1 connection, `service` answering each request, until
/// either side closes it or a `101` hands it over.
pub(super) async fn serve<S, F>(io: BoxIo, s: Settings<'_>, mut service: S) -> io::Result<End>
where
    S: FnMut(Request<ReqBody>) -> F,
    F: Future<Output = Response<ProxyBody>>,
{
    let max_head = s.max_head.max(1);
    let shared: Shared = Arc::new(Mutex::new(Inner {
        io,
        rbuf: ReadBuffer::new(),
        reading: Reading::Done,
        cont: None,
        seq: 0,
        max_head,
    }));
    let mut wbuf = Vec::with_capacity(READ_BUF);
    loop {
        let deadline = Instant::now() + HEADER_READ_TIMEOUT;
        // How much of the buffer the last parse saw without a complete head.
        let mut parsed = 0usize;
        let next = poll_fn(|cx| {
            let mut g = lock(&shared);
            let g = &mut *g;
            loop {
                if g.rbuf.len() > parsed {
                    parsed = g.rbuf.len();
                    match parse_head(g.rbuf.data(), max_head) {
                        Ok(Some(h)) => return Poll::Ready(Next::Head(h)),
                        Ok(None) => {}
                        Err(r) => return Poll::Ready(Next::Refuse(r)),
                    }
                }
                if g.rbuf.is_empty() && s.draining.load(Relaxed) {
                    return Poll::Ready(Next::Close);
                }
                match g.rbuf.poll_fill(&mut g.io, cx, max_head) {
                    Poll::Pending => break,
                    Poll::Ready(Ok(Some(0)) | Err(_)) => return Poll::Ready(Next::Close),
                    Poll::Ready(Ok(Some(_))) => {}
                    Poll::Ready(Ok(None)) => {
                        return Poll::Ready(Next::Refuse(Refused(
                            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                            "request head too large",
                        )))
                    }
                }
            }
            s.timer.poll_expired(deadline, cx).map(|()| Next::Close)
        })
        .await;
        let head = match next {
            Next::Head(h) => h,
            Next::Close => return close(&shared).await,
            Next::Refuse(Refused(status, why)) => {
                tracing::debug!(%status, "refusing a request: {why}");
                wbuf.clear();
                let x = Exchange {
                    head: false,
                    http10: false,
                    keep_alive: false,
                    trailers: false,
                };
                let (mut parts, ()) = Response::new(()).into_parts();
                parts.status = status;
                encode_head(&mut wbuf, &parts, Writing::Length(0), &x, true);
                let mut at = 0;
                let _ = poll_fn(|cx| {
                    let mut g = lock(&shared);
                    ready!(poll_write_all(&mut g.io, &wbuf, &mut at, cx))?;
                    Pin::new(&mut g.io).poll_flush(cx)
                })
                .await;
                return close(&shared).await;
            }
        };
        let Head {
            len,
            parts,
            reading,
            x,
            expect_continue,
        } = head;
        let seq = {
            let mut g = lock(&shared);
            g.rbuf.consume(len);
            g.rbuf.shrink();
            g.seq += 1;
            g.reading = reading;
            g.cont = expect_continue.then_some(0);
            g.seq
        };
        let body = match reading {
            Reading::Done => Body::empty(),
            _ => Body {
                shared: Some(shared.clone()),
                seq,
                ended: false,
                left: match reading {
                    Reading::Length(n) => Some(n),
                    _ => None,
                },
            },
        };
        let mut answer = pin!(service(Request::from_parts(parts, ReqBody::Own(body))));
        // While the answer is awaited and the request has been read whole, the client's
        // close is watched for (hyper's `mid_message_detect_eof`): it ends the exchange.
        // Bytes that come instead (a pipelined request) stay buffered, and the watch stops.
        let mut watch = true;
        let resp = poll_fn(|cx| {
            if let Poll::Ready(r) = answer.as_mut().poll(cx) {
                return Poll::Ready(Some(r));
            }
            if watch {
                let mut g = lock(&shared);
                let g = &mut *g;
                if g.reading == Reading::Done && g.rbuf.is_empty() {
                    match g.rbuf.poll_fill(&mut g.io, cx, max_head) {
                        Poll::Pending => {}
                        Poll::Ready(Ok(Some(0)) | Err(_)) => return Poll::Ready(None),
                        Poll::Ready(Ok(_)) => watch = false,
                    }
                }
            }
            Poll::Pending
        })
        .await;
        let Some(resp) = resp else {
            tracing::debug!("the client closed the connection with a request in flight");
            return close(&shared).await;
        };
        let (parts, mut body) = resp.into_parts();
        let upgrade = parts.status == StatusCode::SWITCHING_PROTOCOLS;
        let mut writing = response_framing(parts.status, &body, &x);
        let (must_close, unread) = {
            let mut g = lock(&shared);
            // A `100 Continue` not begun is owed no more; one half written cannot be
            // finished.
            let cont = g.cont.take();
            let close = match g.reading {
                Reading::Done => false,
                Reading::Failed => true,
                Reading::Length(n) => cont.is_some() || n > DRAIN_LIMIT,
                Reading::Chunked(_) => cont.is_some(),
            };
            (close, g.reading != Reading::Done)
        };
        let closing = !upgrade
            && (must_close || !x.keep_alive || writing == Writing::Eof || s.draining.load(Relaxed));
        wbuf.clear();
        encode_head(&mut wbuf, &parts, writing, &x, closing);
        // Written out: the map is the next head's (`chunked::recycle`).
        chunked::recycle(parts.headers);
        let mut at = 0;
        let mut ended = false;
        // A failed body: what was gathered before it goes out, then the connection ends.
        let mut failed = None;
        let written = poll_fn(|cx| loop {
            if !ended {
                match gather(&mut wbuf, &mut body, &mut writing, x.trailers, cx) {
                    Ok(e) => ended = e,
                    Err(e) => {
                        ended = true;
                        failed = Some(e);
                    }
                }
            }
            if wbuf.is_empty() && !ended {
                // The body has nothing ready: it wakes the task.
                return Poll::Pending;
            }
            let mut g = lock(&shared);
            ready!(poll_write_all(&mut g.io, &wbuf, &mut at, cx))?;
            wbuf.clear();
            at = 0;
            // TCP's flush is free; a tunnel stream buffers.
            ready!(Pin::new(&mut g.io).poll_flush(cx))?;
            if ended {
                return Poll::Ready(failed.take().map_or(Ok(()), Err));
            }
        })
        .await;
        drop(body);
        if let Err(e) = written {
            tracing::debug!("writing the response: {e}");
            return Err(e);
        }
        if upgrade {
            let mut g = lock(&shared);
            g.seq += 1;
            let io = std::mem::replace(&mut g.io, Box::new(tokio::io::empty()) as BoxIo);
            let n = g.rbuf.len();
            let early = g.rbuf.take(n);
            return Ok(End::Upgraded(io, early));
        }
        if closing {
            return close(&shared).await;
        }
        if unread {
            // An unread body within the bound: read and dropped before the next head.
            let mut budget = DRAIN_LIMIT;
            let deadline = Instant::now() + HEADER_READ_TIMEOUT;
            let drained = poll_fn(|cx| {
                let mut g = lock(&shared);
                loop {
                    match g.poll_body(cx) {
                        Poll::Ready(Some(Ok(f))) => {
                            let n = f.data_ref().map_or(0, |d| d.len() as u64);
                            if n > budget {
                                return Poll::Ready(false);
                            }
                            budget -= n;
                        }
                        Poll::Ready(None) => return Poll::Ready(true),
                        Poll::Ready(Some(Err(_))) => return Poll::Ready(false),
                        Poll::Pending => break,
                    }
                }
                drop(g);
                s.timer.poll_expired(deadline, cx).map(|()| false)
            })
            .await;
            // A handle on the body still held elsewhere reads no more of the connection.
            lock(&shared).seq += 1;
            if !drained {
                return close(&shared).await;
            }
        }
    }
}

/// Closes the connection: a FIN after what was written.
async fn close(shared: &Shared) -> io::Result<End> {
    let _ = poll_fn(|cx| {
        let mut g = lock(shared);
        Pin::new(&mut g.io).poll_shutdown(cx)
    })
    .await;
    Ok(End::Closed)
}

#[cfg(test)]
mod tests;
