//! A read buffer between TLS and the socket of an HBONE connection.
//!
//! rustls reads at most 4 KiB per call into its deframer (`read_tls`), so without a
//! buffer a bulk transfer costs a `read` per 4 KiB and then one more that finds the
//! socket empty. Here one read takes up to a relay buffer (32 KiB) and rustls is served
//! from it. The buffer comes from the L4 relay's pool (`proxy::relay_buffers`) when the
//! socket has bytes and goes back as soon as they are consumed: an idle HBONE connection
//! holds none.

use std::{
    io::{self, IoSlice},
    pin::Pin,
    task::{ready, Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proxy::relay_buffers::Buffer;

/// Reads at least this large go to the socket directly (bytes).
const DIRECT_READ: usize = 16 * 1024;

pub struct ReadBuffered<T> {
    io: T,
    /// Bytes read and not yet consumed: `buf[start..end]`.
    buf: Option<Buffer>,
    start: usize,
    end: usize,
}

impl<T: std::fmt::Debug> std::fmt::Debug for ReadBuffered<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadBuffered")
            .field("io", &self.io)
            .field("buffered", &(self.end - self.start))
            .finish()
    }
}

impl<T> ReadBuffered<T> {
    pub fn new(io: T) -> ReadBuffered<T> {
        ReadBuffered {
            io,
            buf: None,
            start: 0,
            end: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadBuffered<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.start == this.end {
            if out.remaining() >= DIRECT_READ {
                return Pin::new(&mut this.io).poll_read(cx, out);
            }
            // Dropped (back to the pool) if the socket has nothing.
            let mut b = Buffer::take();
            let mut rb = ReadBuf::new(&mut b);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(()));
            }
            this.buf = Some(b);
            this.start = 0;
            this.end = n;
        }
        let b = this.buf.as_ref().expect("bytes buffered");
        let n = (this.end - this.start).min(out.remaining());
        out.put_slice(&b[this.start..this.start + n]);
        this.start += n;
        if this.start == this.end {
            this.buf = None;
            (this.start, this.end) = (0, 0);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadBuffered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn small_reads_are_served_from_one_socket_read_in_order() {
        let (mut far, near) = tokio::io::duplex(1 << 20);
        let mut r = ReadBuffered::new(near);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        far.write_all(&data).await.unwrap();
        far.shutdown().await.unwrap();
        let mut got = Vec::new();
        let mut small = [0u8; 4096];
        loop {
            let n = r.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&small[..n]);
            // A large read goes straight through once the buffer is drained.
            if got.len() == 4096 * 8 {
                let mut big = vec![0u8; 20_000];
                let n = r.read(&mut big).await.unwrap();
                got.extend_from_slice(&big[..n]);
            }
        }
        assert_eq!(got, data);
        // Nothing held once everything was consumed.
        assert!(r.buf.is_none());
    }
}
