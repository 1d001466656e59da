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

/// `io` with `prefix` read back first.
pub(super) struct Prefixed<IO> {
    prefix: Vec<u8>,
    pos: usize,
    io: IO,
}

impl<IO> Prefixed<IO> {
    pub fn new(prefix: Vec<u8>, io: IO) -> Self {
        Prefixed { prefix, pos: 0, io }
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
