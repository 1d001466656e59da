//! HTTP/1.1 upgrades through the engine (`Connection: upgrade` with `Upgrade: <protocol>`,
//! WebSocket being the common one). The request is routed, rate limited and judged like
//! any other, without retries, and goes out on a connection opened for it alone
//! (`pool::checkout`'s `fresh`) with its `Upgrade` headers kept (`route::upgrade_offered`;
//! `h2c` is never offered: the requests after it would skip routing). A `101` that names
//! an offered protocol goes back to the client with its `Upgrade` headers, and once the
//! downstream codec has written it (the own `server`, which hands back the connection and
//! the bytes read past the request, or hyper's, through `OnUpgrade`) the two connections
//! are spliced here, in the downstream connection's task (`L7::serve_sniffed`), until both
//! directions ended. Any other answer is an
//! ordinary response, and its connection is closed after it, never pooled.
//!
//! - No loss, and a failure is a reset, as on the L4 path: a FIN on one side is a
//!   half-close on the other; an error on either side, or the idle timeout, resets both
//!   (TCP RST via `SO_LINGER 0`; a tunnel stream dropped before both its directions ended
//!   sends RST_STREAM). Bytes either side sent early (behind its request, or behind its
//!   `101` in the same segment) go first.
//! - Timeouts: the route's timeout (and a retry policy's per-try timeout) bounds the
//!   handshake, up to the `101`; the stream after it is bounded by [`IDLE_TIMEOUT`] (no
//!   byte either way for that long), Envoy's default `stream_idle_timeout`, which Envoy
//!   applies to upgraded streams too.
//! - Accounting: the stream is one request of the engine: it holds its circuit-breaker
//!   slots (a request and a connection) and counts as in flight at its endpoint until it
//!   ends; then its metrics and access-log line are written with response code `101`, its
//!   duration, and the bytes each way (after the switch; the log's `bytes_received` is
//!   what the client sent, `bytes_sent` what it got).
//! - A drain leaves a running splice alone until the drain's deadline cuts it (a reset,
//!   both ways): an upgraded stream has no graceful end the proxy could ask for.

use std::{
    any::Any,
    io,
    os::fd::AsFd,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite},
    net::TcpStream,
    time::Instant,
};
use tracing::debug;

use super::{body::Finish, sniff::Prefixed, BoxIo, UpstreamIo};
use crate::{proxy::accesslog::Flags, sys};

/// How long an upgraded stream may carry no byte either way before it is reset (Envoy's
/// default `stream_idle_timeout`).
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// Where the client's side of an upgrade comes from once its `101` is written.
pub(super) enum ClientSide {
    /// hyper's server hands it over.
    Hyper(OnUpgrade),
    /// The own codec (`server`) returns it from its loop (`server::End::Upgraded`).
    Own,
}

/// An upgrade the upstream accepted, waiting for its `101` to reach the client.
pub(super) struct Pending {
    /// The client's side, once the `101` is written.
    pub client: ClientSide,
    /// The upstream's connection and the bytes it sent after its `101`.
    pub upstream: BoxIo,
    pub upstream_early: Bytes,
    /// The request's slots, endpoint count and recorder, released when the stream ends.
    pub finish: Finish,
    /// The request's count of bytes from the client (the access log's and Istio's).
    pub received: Arc<AtomicU64>,
}

/// The TCP socket behind `io`, if it is one (a tunnel stream resets on its own).
fn tcp(io: &dyn Any) -> Option<&TcpStream> {
    io.downcast_ref::<TcpStream>()
}

/// `true`: dropping the socket now resets it; `false`: a normal close again.
fn reset_on_drop(io: Option<&TcpStream>, on: bool) {
    if let Some(s) = io {
        let _ = if on {
            sys::set_linger_zero(s.as_fd())
        } else {
            sys::clear_linger(s.as_fd())
        };
    }
}

fn upstream_tcp(io: &dyn UpstreamIo) -> Option<&TcpStream> {
    tcp(io.as_any())
}

/// The client's TCP socket behind its boxed `Prefixed<IO>`, if it is one.
fn client_tcp<IO: 'static>(io: &dyn UpstreamIo) -> Option<&TcpStream> {
    let p = io.as_any().downcast_ref::<Prefixed<IO>>()?;
    tcp(p.get_ref())
}

/// Drops an upstream connection that switched with a reset: nothing will speak its new
/// protocol.
pub(super) fn reset(io: BoxIo) {
    reset_on_drop(upstream_tcp(&*io), true);
}

impl Pending {
    /// The client never got its `101` (it went away, or hyper failed to write it): the
    /// upstream, which switched, is reset rather than closed as if the exchange had ended.
    pub fn abandon(mut self) {
        reset_on_drop(upstream_tcp(&*self.upstream), true);
        mark(
            &mut self.finish,
            Flags::DC,
            "the client went away before its 101",
        );
        debug!("the client went away before its 101; upstream reset");
    }

    /// Splices the client's connection to the upstream's until both directions ended (or
    /// either failed, or the stream sat idle for `idle`: then both are reset). `own`: the
    /// connection and the bytes read past the request's head, when the own codec wrote
    /// the `101` (hyper's side is awaited otherwise).
    pub async fn splice<IO>(self, idle: Duration, own: Option<(BoxIo, Bytes)>)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Pending {
            client,
            mut upstream,
            upstream_early,
            mut finish,
            received,
        } = self;
        reset_on_drop(upstream_tcp(&*upstream), true);
        let down = match (client, own) {
            (_, Some((io, early))) => Ok((io, early)),
            (ClientSide::Hyper(client), None) => {
                client.await.map_err(io::Error::other).and_then(|u| {
                    u.downcast::<TokioIo<Prefixed<IO>>>()
                        .map(|p| (Box::new(p.io.into_inner()) as BoxIo, p.read_buf))
                        .map_err(|_| {
                            io::Error::other("the client's upgraded connection is not ours")
                        })
                })
            }
            (ClientSide::Own, None) => Err(io::Error::other("the codec kept the connection")),
        };
        let (mut down, down_early) = match down {
            Ok(d) => d,
            Err(e) => {
                debug!(error = %e, "the client's side of the upgrade is gone; upstream reset");
                return;
            }
        };
        reset_on_drop(client_tcp::<IO>(&*down), true);
        let sent = AtomicU64::new(0);
        let res = {
            let (dr, dw) = tokio::io::split(&mut down);
            let (ur, uw) = tokio::io::split(&mut upstream);
            relay(
                pipe(down_early, dr, uw, &received),
                pipe(upstream_early, ur, dw, &sent),
                [&received, &sent],
                idle,
            )
            .await
        };
        let (up, sent) = (received.load(Relaxed), sent.load(Relaxed));
        if let Some(r) = finish.recorder.as_mut() {
            if let Some(l) = r.log.as_mut() {
                *l.entry.bytes_sent.get_or_insert(0) += sent;
            }
            if let Some(t) = r.istio.as_mut() {
                t.sent += sent;
            }
        }
        if let Err(e) = &res {
            mark(&mut finish, Flags::UC, &format!("upgraded stream cut: {e}"));
        }
        match res {
            Ok(()) => {
                reset_on_drop(client_tcp::<IO>(&*down), false);
                reset_on_drop(upstream_tcp(&*upstream), false);
                debug!(up, down = sent, "upgraded stream ended");
            }
            // Both dropped still armed: a reset each way.
            Err(e) => debug!(up, down = sent, error = %e, "upgraded stream cut; reset both ways"),
        }
        drop(finish);
    }
}

/// Marks the stream's metrics and access-log line with `flag` and why it ended.
fn mark(finish: &mut Finish, flag: Flags, why: &str) {
    let Some(r) = finish.recorder.as_mut() else {
        return;
    };
    r.flags.insert(flag);
    if let Some(l) = r.log.as_mut() {
        l.entry.flag(flag);
        l.entry.connection_termination_details = Some(why.to_owned());
    }
}

/// Runs both directions to their ends; the first error (or `idle` without a byte counted
/// in `counts`) ends it.
async fn relay(
    to_up: impl std::future::Future<Output = io::Result<()>>,
    to_down: impl std::future::Future<Output = io::Result<()>>,
    counts: [&AtomicU64; 2],
    idle: Duration,
) -> io::Result<()> {
    tokio::pin!(to_up, to_down);
    let total = || counts[0].load(Relaxed) + counts[1].load(Relaxed);
    // Checked a few times per `idle`: a stream counts as active from its last byte seen
    // at a check, so it is cut between `idle` and `idle * 5 / 4` after that byte.
    let check = idle / 4;
    let (mut seen, mut active_at) = (total(), Instant::now());
    let tick = tokio::time::sleep(check);
    tokio::pin!(tick);
    let (mut a, mut b) = (false, false);
    while !(a && b) {
        tokio::select! {
            x = &mut to_up, if !a => { a = true; x? }
            x = &mut to_down, if !b => { b = true; x? }
            () = &mut tick => {
                let now = Instant::now();
                let t = total();
                if t != seen {
                    (seen, active_at) = (t, now);
                } else if now.duration_since(active_at) >= idle {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no byte either way for {idle:?}"),
                    ));
                }
                tick.as_mut().reset(now + check);
            }
        }
    }
    Ok(())
}

/// Copies `early`, then `r`, to `w`; `w`'s end of stream when `r` ended.
async fn pipe<R, W>(early: Bytes, r: R, w: W, count: &AtomicU64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    crate::proxy::hbone::pipe(early.as_ref().chain(r), w, count, None).await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn counted(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_stream_is_cut_and_an_active_one_is_not() {
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        // Bytes every 40 s for 10 minutes: never idle for 60 s.
        let busy = async {
            for _ in 0..15 {
                tokio::time::sleep(Duration::from_secs(40)).await;
                counted(&up, 1);
            }
            Ok(())
        };
        let start = Instant::now();
        relay(
            busy,
            async { Ok(()) },
            [&up, &down],
            Duration::from_secs(60),
        )
        .await
        .expect("an active stream runs to its end");
        assert!(start.elapsed() >= Duration::from_secs(600));
        // Silent after one byte: cut within 60..75 s of it.
        let start = Instant::now();
        let quiet = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            counted(&down, 1);
            std::future::pending::<io::Result<()>>().await
        };
        let e = relay(
            quiet,
            std::future::pending(),
            [&up, &down],
            Duration::from_secs(60),
        )
        .await
        .expect_err("idle");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let t = start.elapsed();
        assert!(
            (Duration::from_secs(65)..=Duration::from_secs(81)).contains(&t),
            "{t:?}"
        );
    }

    #[tokio::test]
    async fn either_directions_error_ends_the_relay_at_once() {
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let failing = async { Err(io::Error::from(io::ErrorKind::ConnectionReset)) };
        let e = relay(std::future::pending(), failing, [&up, &down], IDLE_TIMEOUT)
            .await
            .expect_err("the error");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn pipe_sends_the_early_bytes_first_then_half_closes() {
        let (mut a, b) = tokio::io::duplex(64);
        let (c, mut d) = tokio::io::duplex(64);
        let n = AtomicU64::new(0);
        a.write_all(b"-rest").await.unwrap();
        a.shutdown().await.unwrap();
        let (br, _bw) = tokio::io::split(b);
        let (_cr, cw) = tokio::io::split(c);
        pipe(Bytes::from_static(b"early"), br, cw, &n)
            .await
            .unwrap();
        let mut got = Vec::new();
        d.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"early-rest");
        assert_eq!(n.load(Relaxed), 10);
    }
}
