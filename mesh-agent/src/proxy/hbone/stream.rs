//! One CONNECT stream as `AsyncRead + AsyncWrite`.
//!
//! - Reading: DATA frames in order; END_STREAM reads as EOF; a RST_STREAM of any reason
//!   (CANCEL and NO_ERROR included: a tunnel that is reset before its END_STREAM is cut
//!   short) or a connection error reads as `ConnectionReset`. Flow-control capacity is
//!   released as the bytes are read, so a slow reader slows the sender.
//! - Writing: waits for HTTP/2 send capacity (bounded by `MAX_SEND_BUFFER`); `shutdown`
//!   sends END_STREAM.
//! - Dropping the stream before both directions ended cleanly resets it
//!   (RST_STREAM(CONNECT_ERROR), RFC 9113 section 8.5: the tunnel did not end cleanly).

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Something dropped with the stream (the pool's count of a connection's streams).
pub(crate) type Guard = Option<Arc<dyn Send + Sync>>;

pub struct HboneStream {
    // The tunnel relay (`tunnel::relay_tunnel`) drives these itself.
    pub(super) send: SendStream<Bytes>,
    pub(super) recv: RecvStream,
    /// Received and not yet read.
    pub(super) buf: Bytes,
    /// END_STREAM sent.
    pub(super) write_closed: bool,
    /// END_STREAM received and every byte read.
    pub(super) read_eof: bool,
    _guard: Guard,
}

impl std::fmt::Debug for HboneStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneStream")
            .field("write_closed", &self.write_closed)
            .field("read_eof", &self.read_eof)
            .finish_non_exhaustive()
    }
}

pub(super) fn reset_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::ErrorKind::ConnectionReset.into());
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

impl HboneStream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream, guard: Guard) -> HboneStream {
        HboneStream {
            send,
            recv,
            buf: Bytes::new(),
            write_closed: false,
            read_eof: false,
            _guard: guard,
        }
    }

    /// Resets the stream now (RST_STREAM(CONNECT_ERROR)), whatever its state.
    pub fn reset(mut self) {
        self.send.send_reset(Reason::CONNECT_ERROR);
        self.write_closed = true;
        self.read_eof = true;
    }
}

impl Drop for HboneStream {
    fn drop(&mut self) {
        if !(self.write_closed && self.read_eof) {
            self.send.send_reset(Reason::CONNECT_ERROR);
        }
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.buf.is_empty() {
            if self.read_eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(b)) => self.buf = b,
                Some(Err(e)) => return Poll::Ready(Err(reset_error(e))),
                None => self.read_eof = true,
            }
        }
        let n = self.buf.len().min(out.remaining());
        let chunk = self.buf.split_to(n);
        out.put_slice(&chunk);
        let _ = self.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // A reset from the peer ends the wait for capacity as an error.
        if let Poll::Ready(r) = self.send.poll_reset(cx) {
            return Poll::Ready(Err(match r {
                Ok(reason) => {
                    io::Error::new(io::ErrorKind::ConnectionReset, h2::Error::from(reason))
                }
                Err(e) => reset_error(e),
            }));
        }
        let want = data.len().min(super::MAX_SEND_BUFFER);
        self.send.reserve_capacity(want);
        loop {
            let have = self.send.capacity();
            if have > 0 {
                let n = have.min(data.len());
                return Poll::Ready(
                    self.send
                        .send_data(Bytes::copy_from_slice(&data[..n]), false)
                        .map(|()| n)
                        .map_err(reset_error),
                );
            }
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(reset_error(e))),
                None => return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes what `send_data` queued, bounded by the capacity.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.write_closed {
            return Poll::Ready(Ok(()));
        }
        self.send.reserve_capacity(0);
        let r = self.send.send_data(Bytes::new(), true).map_err(reset_error);
        self.write_closed = true;
        Poll::Ready(r)
    }
}
