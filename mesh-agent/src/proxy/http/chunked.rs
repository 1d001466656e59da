//! The HTTP/1.1 wire pieces both own codecs use: the read buffer, a header field map
//! sharing one copy of its section, the chunked body decoder and the chunk encoding (RFC
//! 9112 section 7.1). The upstream client (`h1`) reads response bodies and writes request
//! bodies with them, the downstream server (`server`) the other way round; what differs
//! between the two (which messages have which framing, what a failure does to the
//! connection, the field count limit, whether trailers go out) stays with each.

use std::{
    cell::RefCell,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::Frame;
use tokio::io::{AsyncRead, ReadBuf};

use super::BoxIo;

/// The read buffer's usual size (it grows for a large head, up to the head limit, and
/// shrinks back once that has gone).
pub(super) const READ_BUF: usize = 8 * 1024;
/// Longest chunk-size line, extensions included.
pub(super) const MAX_CHUNK_LINE: usize = 4 * 1024;

/// A byte buffer read into at the back and consumed from the front; zero-initialised once
/// (the crate has no `unsafe` to read into spare capacity).
pub(super) struct ReadBuffer {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl ReadBuffer {
    pub(super) fn new() -> ReadBuffer {
        ReadBuffer {
            buf: vec![0; READ_BUF],
            start: 0,
            end: 0,
        }
    }

    pub(super) fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub(super) fn len(&self) -> usize {
        self.end - self.start
    }

    pub(super) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub(super) fn consume(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Takes `n` bytes off the front as a body frame's data.
    pub(super) fn take(&mut self, n: usize) -> Bytes {
        let b = Bytes::copy_from_slice(&self.buf[self.start..self.start + n]);
        self.consume(n);
        b
    }

    /// Reads what the IO has: `Some(n)` (0 at its end), or None without reading when
    /// `limit` bytes are buffered unconsumed (the peer sent more than a bounded element
    /// may hold).
    pub(super) fn poll_fill(
        &mut self,
        io: &mut BoxIo,
        cx: &mut Context<'_>,
        limit: usize,
    ) -> Poll<std::io::Result<Option<usize>>> {
        if self.len() >= limit {
            return Poll::Ready(Ok(None));
        }
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let grown = (self.buf.len() * 2).min(limit.max(READ_BUF));
                self.buf.resize(grown, 0);
            }
        }
        // Never hold more than `limit` unconsumed bytes.
        let room = (limit - self.len()).min(self.buf.len() - self.end);
        let mut rb = ReadBuf::new(&mut self.buf[self.end..self.end + room]);
        ready!(Pin::new(io).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        self.end += n;
        Poll::Ready(Ok(Some(n)))
    }

    /// The buffer's size (its bound, for tests).
    #[cfg(test)]
    pub(super) fn size(&self) -> usize {
        self.buf.len()
    }

    /// Back to the usual size once a large head has gone.
    pub(super) fn shrink(&mut self) {
        if self.buf.len() > READ_BUF && self.is_empty() {
            self.buf = vec![0; READ_BUF];
        }
    }
}

/// A head's (or trailer section's) fields as a map. The values share `shared`, one copy of
/// `head` (the bytes `fields` point into), instead of a copy and an allocation each.
pub(super) fn header_map(
    head: &[u8],
    shared: &Bytes,
    fields: &[httparse::Header<'_>],
) -> Result<HeaderMap, &'static str> {
    header_map_except(head, shared, fields, |_| false)
}

/// [`header_map`] without the fields `skip` names (by their name as it came). A field left
/// out is not checked as a `HeaderName` and `HeaderValue`: `httparse` accepts no name or
/// value byte those checks refuse, so nothing refused before is taken now.
pub(super) fn header_map_except(
    head: &[u8],
    shared: &Bytes,
    fields: &[httparse::Header<'_>],
    skip: impl Fn(&[u8]) -> bool,
) -> Result<HeaderMap, &'static str> {
    let mut map = spare_map(fields.len());
    for h in fields {
        if skip(h.name.as_bytes()) {
            continue;
        }
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| "invalid header name")?;
        // `h.value` lies inside `head`, whose copy `shared` is: the same bytes by offset.
        let at = (h.value.as_ptr() as usize).wrapping_sub(head.as_ptr() as usize);
        let value = if at <= head.len() && h.value.len() <= head.len() - at {
            HeaderValue::from_maybe_shared(shared.slice(at..at + h.value.len()))
        } else {
            HeaderValue::from_bytes(h.value)
        }
        .map_err(|_| "invalid header value")?;
        map.append(name, value);
    }
    Ok(map)
}

/// Spare header maps kept per thread: a request's and its response's maps are emptied
/// once written (`recycle`) and filled again by the next heads parsed, so a request costs
/// no map allocation and no free (four of each).
const SPARE_MAPS: usize = 4;
/// Largest map kept (by its capacity): one a big head grew is freed as before.
const SPARE_MAP_CAPACITY: usize = 32;

thread_local! {
    static SPARE: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// An empty map for `n` fields: a spare one if the thread has one.
fn spare_map(n: usize) -> HeaderMap {
    let spare = SPARE
        .try_with(|s| s.try_borrow_mut().ok()?.pop())
        .ok()
        .flatten();
    match spare {
        Some(mut m) => {
            m.reserve(n);
            m
        }
        None => HeaderMap::with_capacity(n),
    }
}

/// Gives a map that has been written out back for `spare_map` to reuse (emptied; its
/// values' shared bytes are released now, as dropping it would).
pub(super) fn recycle(mut map: HeaderMap) {
    if map.capacity() == 0 || map.capacity() > SPARE_MAP_CAPACITY {
        return;
    }
    map.clear();
    let _ = SPARE.try_with(|s| {
        if let Ok(mut s) = s.try_borrow_mut() {
            if s.len() < SPARE_MAPS {
                s.push(map);
            }
        }
    });
}

fn find_crlf(data: &[u8]) -> Option<usize> {
    data.windows(2).position(|w| w == b"\r\n")
}

/// A chunk-size line's size (hex digits, then optional whitespace and extensions).
fn chunk_size(line: &[u8]) -> Result<u64, &'static str> {
    if line.len() > MAX_CHUNK_LINE {
        return Err("chunk-size line too long");
    }
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits == 0 || digits > 16 {
        return Err("invalid chunk size");
    }
    let rest = line[digits..].trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return Err("invalid chunk size");
    }
    let mut n = 0u64;
    for d in &line[..digits] {
        let v = (*d as char).to_digit(16).unwrap_or(0);
        n = n
            .checked_mul(16)
            .and_then(|n| n.checked_add(u64::from(v)))
            .ok_or("chunk size overflows")?;
    }
    Ok(n)
}

/// Where reading a chunked body stands (its end is the codec's own `Reading::Done`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
}

impl Chunk {
    /// How many unconsumed bytes the read buffer may hold while more are read in this
    /// state (`max_head`: the largest trailer section), and what passing it means.
    pub(super) fn fill_limit(self, max_head: usize) -> (usize, &'static str) {
        match self {
            Chunk::Trailers => (max_head, "trailer section too large"),
            Chunk::Size => (MAX_CHUNK_LINE + 2, "chunk-size line too long"),
            Chunk::Data(_) | Chunk::DataEnd => (READ_BUF, "body buffer full"),
        }
    }
}

/// Steps through chunk framing already buffered that carries no data (a chunk's CRLF, the
/// last chunk, an empty trailer section), so the body's end shows as soon as its bytes are
/// in: the state after it, None when the body has ended. Errors wait for [`decode`].
pub(super) fn advance(rbuf: &mut ReadBuffer, mut chunk: Chunk) -> Option<Chunk> {
    loop {
        let data = rbuf.data();
        match chunk {
            Chunk::DataEnd if data.starts_with(b"\r\n") => {
                rbuf.consume(2);
                chunk = Chunk::Size;
            }
            Chunk::Size => match find_crlf(data) {
                Some(i) => match chunk_size(&data[..i]) {
                    Ok(0) => {
                        rbuf.consume(i + 2);
                        chunk = Chunk::Trailers;
                    }
                    Ok(n) => {
                        rbuf.consume(i + 2);
                        return Some(Chunk::Data(n));
                    }
                    Err(_) => return Some(chunk),
                },
                None => return Some(chunk),
            },
            Chunk::Trailers if data.starts_with(b"\r\n") => {
                rbuf.consume(2);
                return None;
            }
            _ => return Some(chunk),
        }
    }
}

/// What decoding a chunked body from the buffered bytes came to.
pub(super) enum Step {
    /// A data frame or the trailers, and the state after it (None: the body has ended).
    Frame(Frame<Bytes>, Option<Chunk>),
    /// The body has ended with no further frame.
    End,
    /// More bytes are needed, in this state.
    More(Chunk),
    /// The chunk framing is malformed.
    Malformed(&'static str),
    /// The trailer section parsed but a field is invalid (`header_map`'s word).
    BadTrailers(&'static str),
}

/// The chunked body's next frame from what `rbuf` holds, at most `N` trailer fields.
pub(super) fn decode<const N: usize>(rbuf: &mut ReadBuffer, mut chunk: Chunk) -> Step {
    loop {
        let avail = rbuf.len();
        match chunk {
            Chunk::Data(left) if avail > 0 => {
                let n = usize::try_from(left).map_or(avail, |l| l.min(avail));
                let d = rbuf.take(n);
                let left = left - n as u64;
                let next = if left == 0 {
                    advance(rbuf, Chunk::DataEnd)
                } else {
                    Some(Chunk::Data(left))
                };
                return Step::Frame(Frame::data(d), next);
            }
            Chunk::DataEnd if avail >= 2 => {
                if !rbuf.data().starts_with(b"\r\n") {
                    return Step::Malformed("no CRLF after chunk data");
                }
                match advance(rbuf, chunk) {
                    Some(c) => chunk = c,
                    None => return Step::End,
                }
            }
            Chunk::Size if avail > 0 => match find_crlf(rbuf.data()) {
                Some(i) => {
                    if let Err(why) = chunk_size(&rbuf.data()[..i]) {
                        return Step::Malformed(why);
                    }
                    match advance(rbuf, chunk) {
                        Some(c) => chunk = c,
                        None => return Step::End,
                    }
                }
                None if avail > MAX_CHUNK_LINE => {
                    return Step::Malformed("chunk-size line too long");
                }
                None => return Step::More(chunk),
            },
            Chunk::Trailers if avail >= 2 => {
                if rbuf.data().starts_with(b"\r\n") {
                    rbuf.consume(2);
                    return Step::End;
                }
                let mut fields = [httparse::EMPTY_HEADER; N];
                return match httparse::parse_headers(rbuf.data(), &mut fields) {
                    Ok(httparse::Status::Complete((n, fields))) => {
                        let head = &rbuf.data()[..n];
                        match header_map(head, &Bytes::copy_from_slice(head), fields) {
                            Ok(map) => {
                                rbuf.consume(n);
                                Step::Frame(Frame::trailers(map), None)
                            }
                            Err(why) => Step::BadTrailers(why),
                        }
                    }
                    Ok(httparse::Status::Partial) => Step::More(chunk),
                    Err(_) => Step::Malformed("invalid trailers"),
                };
            }
            _ => return Step::More(chunk),
        }
    }
}

/// Appends a head field or value in the wire form.
pub(super) fn put(w: &mut Vec<u8>, parts: &[&[u8]]) {
    for p in parts {
        w.extend_from_slice(p);
    }
}

/// Folds one `Content-Length` field value into `len`: every list element a run of at most
/// 19 digits, all of them (and every earlier value) the same number (RFC 9110, section
/// 8.6). The error is the word for the log.
pub(super) fn add_length(len: &mut Option<u64>, value: &[u8]) -> Result<(), &'static str> {
    for part in value.split(|b| *b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return Err("invalid content-length");
        }
        let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        if len.is_some_and(|l| l != n) {
            return Err("conflicting content-length values");
        }
        *len = Some(n);
    }
    Ok(())
}

/// Whether the last transfer coding a `Transfer-Encoding` field value lists is `chunked`
/// (RFC 9112, section 6.1); `None` for a value listing none.
pub(super) fn last_coding_is_chunked(value: &[u8]) -> Option<bool> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .rfind(|t| !t.is_empty())
        .map(|last| last.eq_ignore_ascii_case(b"chunked"))
}

/// `n` in decimal (a `Content-Length` value, without a `String`).
pub(super) fn decimal(n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// `n` in lower-case hex.
pub(super) fn hex(n: usize, buf: &mut [u8; 16]) -> &[u8] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut i = buf.len();
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = DIGITS[n % 16];
        n /= 16;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// Appends `d` (not empty: an empty chunk is the last one) as one chunk.
pub(super) fn put_chunk(w: &mut Vec<u8>, d: &[u8]) {
    let mut b = [0; 16];
    put(w, &[hex(d.len(), &mut b), b"\r\n", d, b"\r\n"]);
}

/// Appends the last chunk and the trailer section (`trailers`, or an empty one).
pub(super) fn put_last(w: &mut Vec<u8>, trailers: Option<&HeaderMap>) {
    w.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        put(
            w,
            &[name.as_str().as_bytes(), b": ", value.as_bytes(), b"\r\n"],
        );
    }
    w.extend_from_slice(b"\r\n");
}
