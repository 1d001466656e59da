//! Telling HTTP/2 prior knowledge from HTTP/1.x on a fresh connection: read until the
//! bytes either are the HTTP/2 connection preface or stop looking like it, then hand the
//! codec a stream that replays what was read.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface (RFC 9113 section 3.4).
pub(super) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads the start of the connection: all of the preface, or up to the first byte that
/// differs from it (HTTP/1 methods differ within three bytes), or up to EOF.
pub(super) async fn sniff<IO: AsyncRead + Unpin>(io: &mut IO) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(H2_PREFACE.len());
    let mut chunk = [0u8; H2_PREFACE.len()];
    while buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&buf) {
        let n = io.read(&mut chunk[..H2_PREFACE.len() - buf.len()]).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(buf)
}

/// What a connection's first bytes say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    Http1,
    /// HTTP/2 with prior knowledge (h2c): the connection preface.
    Http2,
    /// Neither: a listener's TCP fallback takes it.
    Opaque,
}

/// Longest HTTP/1 request line waited for before calling the bytes opaque (hyper's own
/// URI limit is about this).
const MAX_REQUEST_LINE: usize = 16 * 1024;

/// The verdict on `buf` so far, or `None` if more bytes are needed to tell.
fn classify(buf: &[u8]) -> Option<Sniffed> {
    if buf.len() >= H2_PREFACE.len() && buf.starts_with(H2_PREFACE) {
        return Some(Sniffed::Http2);
    }
    if buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(buf) {
        return None;
    }
    // `METHOD SP target SP HTTP/1.x CRLF`; a method is an upper-case token.
    let method_len = buf
        .iter()
        .position(|b| !(b.is_ascii_uppercase() || *b == b'-' || *b == b'_'));
    let looks_http1 = match method_len {
        None => true,
        Some(0) => false,
        Some(n) => buf[n] == b' ',
    };
    if !looks_http1 {
        return Some(Sniffed::Opaque);
    }
    if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
        let line = &buf[..end];
        let http1 = line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0");
        return Some(if http1 {
            Sniffed::Http1
        } else {
            Sniffed::Opaque
        });
    }
    if buf.len() < MAX_REQUEST_LINE {
        None
    } else {
        Some(Sniffed::Opaque)
    }
}

/// Reads the start of a connection until it can tell HTTP/1.x, h2c prior knowledge or
/// something else. A client that sends nothing within `wait` (server-first protocols)
/// is opaque, as is one that closes first. Returns the bytes read, to be replayed.
pub async fn detect<IO: AsyncRead + Unpin>(
    io: &mut IO,
    wait: std::time::Duration,
) -> io::Result<(Vec<u8>, Sniffed)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(wait, io.read(&mut chunk)).await;
        let n = match read {
            Err(_) => return Ok((buf, Sniffed::Opaque)),
            Ok(r) => r?,
        };
        if n == 0 {
            return Ok((buf, Sniffed::Opaque));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(v) = classify(&buf) {
            return Ok((buf, v));
        }
    }
}

/// `io` with `prefix` read back first.
pub(crate) struct Prefixed<IO> {
    prefix: Vec<u8>,
    pos: usize,
    io: IO,
}

impl<IO> Prefixed<IO> {
    pub fn new(prefix: Vec<u8>, io: IO) -> Self {
        Prefixed { prefix, pos: 0, io }
    }

    /// The connection underneath (its prefix may not be read back yet).
    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let pos = self.pos;
            buf.put_slice(&self.prefix[pos..pos + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[test]
    fn classifies_http1_h2_and_opaque() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: a\r\n"),
            Some(Sniffed::Http1)
        );
        assert_eq!(classify(b"M-SEARCH * HTTP/1.0\r\n"), Some(Sniffed::Http1));
        assert_eq!(classify(b"GET /index"), None, "needs the rest of the line");
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n"),
            None,
            "a preface in progress"
        );
        assert_eq!(classify(H2_PREFACE), Some(Sniffed::Http2));
        assert_eq!(
            classify(b"\x16\x03\x01\x02\x00"),
            Some(Sniffed::Opaque),
            "TLS"
        );
        assert_eq!(classify(b"get / HTTP/1.1\r\n"), Some(Sniffed::Opaque));
        assert_eq!(classify(b"HELLO world\r\n"), Some(Sniffed::Opaque));
        assert_eq!(classify(&[b'A'; MAX_REQUEST_LINE]), Some(Sniffed::Opaque));
    }

    #[tokio::test(start_paused = true)]
    async fn silent_clients_are_opaque_after_the_wait() {
        let (_a, mut b) = tokio::io::duplex(64);
        let (got, v) = detect(&mut b, std::time::Duration::from_secs(5))
            .await
            .unwrap();
        assert!(got.is_empty());
        assert_eq!(v, Sniffed::Opaque);
    }

    #[tokio::test]
    async fn sniffs_and_replays() {
        for (input, h2) in [
            (&b"GET / HTTP/1.1\r\n\r\n"[..], false),
            (b"PRI", false),
            (H2_PREFACE, true),
        ] {
            let (mut a, mut b) = tokio::io::duplex(1024);
            a.write_all(input).await.unwrap();
            a.write_all(b"rest").await.unwrap();
            drop(a);
            let got = sniff(&mut b).await.unwrap();
            assert_eq!(got == H2_PREFACE, h2);
            let mut all = Vec::new();
            Prefixed::new(got, b).read_to_end(&mut all).await.unwrap();
            assert_eq!(all, [input, b"rest"].concat());
        }
    }
}
