//! HTTP/1.1 upgrades (`Upgrade: websocket`) on connections whose HTTP the agent
//! terminates for L7 policy. The upgrade request is judged like any request; once it
//! passed, it goes to the pod on a connection of its own, and if the pod switches
//! protocols (`101`) both connections are spliced: the client's bytes after its request
//! to the pod, the pod's after its `101` to the client, until both directions ended.
//!
//! - Only protocols whose bytes after the switch are not HTTP requests are spliced
//!   (`SPLICED`: `websocket`, the one Istio's inbound listeners enable). `h2c` would
//!   carry requests past per-request judgement, so it (and any other protocol) is not
//!   offered: the `Upgrade` header is dropped and the request answered over HTTP/1.1,
//!   which a server may always do (RFC 9110 7.8).
//! - No loss, and a failure is a reset, as on the L4 path (`hbone::relay_tunnel`): a
//!   FIN on one side is a half-close on the other; an error on either side resets both
//!   (TCP RST via `SO_LINGER 0`, RST_STREAM for a tunnel stream dropped before both its
//!   directions ended). Bytes either side sent early (after its request or its `101`, in
//!   the same segment) are passed on first.
//! - HTTP/2 has no `Upgrade` (RFC 9113 8.2.2); WebSocket over HTTP/2 (extended CONNECT,
//!   RFC 8441) is not offered.

use std::{
    io,
    os::fd::AsFd,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::{body::Incoming, client::conn::http1 as client1};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use tracing::{debug, Instrument};

use super::{Body, Conn, UpstreamError};
use crate::{
    proxy::{hbone::HboneStream, http::strip_hop_by_hop},
    sys,
};

/// Upgrade protocols spliced once the request passed policy (compared without case).
pub const SPLICED: &[&str] = &["websocket"];

/// A downstream connection an upgrade may be spliced to: how to make its end a reset.
pub trait Downstream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// `true`: dropping the connection resets it (the splice is running, and a drop now
    /// means it was cut); `false`: a normal close again (both directions ended).
    fn reset_on_drop(&self, on: bool);
}

impl Downstream for TcpStream {
    fn reset_on_drop(&self, on: bool) {
        let _ = if on {
            sys::set_linger_zero(self.as_fd())
        } else {
            sys::clear_linger(self.as_fd())
        };
    }
}

impl Downstream for HboneStream {
    /// A tunnel stream dropped before both its directions ended is reset already.
    fn reset_on_drop(&self, _on: bool) {}
}

/// The protocol an HTTP/1.1 request asks to switch to, if it is one spliced here:
/// `Connection` names `upgrade` and `Upgrade` is one protocol of `SPLICED`.
pub(super) fn requested(parts: &http::request::Parts) -> Option<HeaderValue> {
    if parts.version != http::Version::HTTP_11 {
        return None;
    }
    let names_upgrade = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let mut upgrades = parts.headers.get_all(header::UPGRADE).iter();
    let (Some(proto), None) = (upgrades.next(), upgrades.next()) else {
        return None;
    };
    (names_upgrade && spliced(proto)).then(|| proto.clone())
}

/// One protocol (`name` or `name/version`) of `SPLICED`.
fn spliced(proto: &HeaderValue) -> bool {
    let Ok(p) = proto.to_str() else {
        return false;
    };
    let name = p.trim().split('/').next().unwrap_or_default();
    !p.contains(',') && SPLICED.iter().any(|s| s.eq_ignore_ascii_case(name))
}

/// The pod's side of an upgrade it switched to, taken by `serve` once the `101` went
/// out to the client.
pub(super) struct Accepted {
    pod: hyper::upgrade::OnUpgrade,
}

impl Accepted {
    /// The pod's connection, with the bytes it sent after its `101`.
    async fn pod(self) -> io::Result<(TcpStream, Bytes)> {
        let up = self.pod.await.map_err(io::Error::other)?;
        match up.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => Ok((parts.io.into_inner(), parts.read_buf)),
            Err(_) => Err(io::Error::other("the pod's upgraded connection is not TCP")),
        }
    }

    /// The client never got the `101`: the pod's side is reset, not closed as if the
    /// exchange had ended.
    pub(super) fn abandon(self) {
        tokio::spawn(
            async move {
                if let Ok((pod, _)) = self.pod().await {
                    let _ = sys::set_linger_zero(pod.as_fd());
                }
            }
            .instrument(tracing::debug_span!("upgrade_abandoned")),
        );
    }
}

impl Conn {
    /// Sends an allowed upgrade request to the pod on a connection of its own. A `101`
    /// is answered to the client and the pod's side kept for `serve` to splice; any other
    /// answer goes back as usual (the downstream connection stays HTTP).
    pub(super) async fn forward_upgrade(
        &self,
        mut parts: http::request::Parts,
        body: Incoming,
        proto: HeaderValue,
    ) -> Result<Response<Body>, UpstreamError> {
        strip_hop_by_hop(&mut parts.headers, false);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, proto);
        let (mut sender, conn) = client1::Builder::new()
            .handshake(self.connect().await?)
            .await
            .map_err(UpstreamError::Handshake)?;
        // Driven until the pod switches (then it hands the connection to `OnUpgrade`) or
        // the exchange ends.
        tokio::spawn(
            async move {
                if let Err(e) = conn.with_upgrades().await {
                    debug!(error = %e, "upstream upgrade connection ended");
                }
            }
            .instrument(tracing::debug_span!("inbound_upgrade", dst = %self.t.dst)),
        );
        let mut resp = sender
            .send_request(Request::from_parts(parts, body))
            .await
            .map_err(UpstreamError::Reset)?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers, false);
            return Ok(Response::from_parts(parts, body.boxed_unsync()));
        }
        let switched = match resp.headers().get(header::UPGRADE) {
            Some(p) if spliced(p) => p.clone(),
            // A switch to something not asked for, or not spliceable: not passed on.
            _ => return Err(UpstreamError::BadSwitch),
        };
        let pod = hyper::upgrade::on(&mut resp);
        *self.upgraded.lock().unwrap_or_else(|e| e.into_inner()) = Some(Accepted { pod });
        let (mut parts, _) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, switched);
        Ok(Response::from_parts(parts, super::empty()))
    }
}

/// Splices the client's connection (with `early`, what it sent after its request) to the
/// pod's until both directions ended; an error on either resets both.
pub(super) async fn splice<IO: Downstream>(
    client: super::Prefixed<IO>,
    early: Bytes,
    accepted: Accepted,
) {
    client.get_ref().reset_on_drop(true);
    let (mut pod, pod_early) = match accepted.pod().await {
        Ok(x) => x,
        Err(e) => {
            debug!(error = %e, "the pod's side of the upgrade is gone; resetting the client");
            return;
        }
    };
    let _ = sys::set_linger_zero(pod.as_fd());
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut client = client;
    let r = {
        let (cr, cw) = tokio::io::split(&mut client);
        let (pr, pw) = pod.split();
        let to_pod = pipe(early, cr, pw, &up);
        let to_client = pipe(pod_early, pr, cw, &down);
        tokio::pin!(to_pod, to_client);
        let (mut a, mut b) = (false, false);
        let mut r = Ok(());
        while !(a && b) {
            // On an error both sides are dropped still armed: a reset each way.
            let step = tokio::select! {
                x = &mut to_pod, if !a => { a = true; x }
                x = &mut to_client, if !b => { b = true; x }
            };
            if let Err(e) = step {
                r = Err(e);
                break;
            }
        }
        r
    };
    let (up, down) = (up.load(Relaxed), down.load(Relaxed));
    match r {
        Ok(()) => {
            let _ = sys::clear_linger(pod.as_fd());
            client.get_ref().reset_on_drop(false);
            debug!(up, down, "upgraded connection ended");
        }
        Err(e) => debug!(up, down, error = %e, "upgraded connection cut; reset both ways"),
    }
}

/// Copies `early`, then `r`, to `w`; `w`'s end of stream when `r` ended.
async fn pipe<R, W>(early: Bytes, r: R, mut w: W, count: &AtomicU64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if !early.is_empty() {
        w.write_all(&early).await?;
        count.fetch_add(early.len() as u64, Relaxed);
    }
    crate::proxy::hbone::pipe(r, w, count, None).await
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        sync::{Arc, Mutex},
    };
    use tokio::io::AsyncReadExt;

    use tokio::net::TcpListener;

    use super::super::tests::{front, mesh, DENY_ADMIN};
    use super::*;

    /// What the pod's application does once it switched.
    #[derive(Clone, Copy)]
    enum After {
        /// Sends `pod-early` with its 101, echoes until the client's end, then `bye`.
        Echo,
        /// Reads a little, then resets.
        Reset,
        /// Answers the upgrade request `426` (declines it).
        Decline,
    }

    /// A WebSocket-like application: the request heads it received go to `heads`.
    async fn ws_app(after: After) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if s.read(&mut b).await.unwrap() == 0 {
                            return;
                        }
                        head.push(b[0]);
                    }
                    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
                    seen.lock().unwrap().push(head.clone());
                    if matches!(after, After::Decline) || !head.contains("upgrade: websocket") {
                        let _ = s
                            .write_all(
                                b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 2\r\n\r\nno",
                            )
                            .await;
                        return;
                    }
                    s.write_all(
                        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n\
                          upgrade: websocket\r\n\r\npod-early",
                    )
                    .await
                    .unwrap();
                    match after {
                        After::Echo => crate::proxy::testing::echo_then_bye(&mut s).await,
                        After::Reset => {
                            let mut buf = [0u8; 1024];
                            let _ = s.read(&mut buf).await;
                            let _ = sys::set_linger_zero(s.as_fd());
                        }
                        After::Decline => unreachable!(),
                    }
                });
            }
        });
        (addr, heads)
    }

    const UPGRADE: &str = "GET /chat HTTP/1.1\r\nhost: web.shop\r\nconnection: Upgrade\r\n\
                           upgrade: websocket\r\nsec-websocket-version: 13\r\n\
                           sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                           x-forwarded-for: 192.0.2.1\r\n\r\n";

    async fn read_head(s: &mut TcpStream) -> String {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut b).await.unwrap(), 1, "closed in the head");
            head.push(b[0]);
        }
        String::from_utf8(head).unwrap().to_ascii_lowercase()
    }

    #[tokio::test]
    async fn an_allowed_websocket_upgrade_is_spliced_and_carries_bytes_both_ways() {
        let (app, heads) = ws_app(After::Echo).await;
        let policy = Arc::new(Mutex::new(mesh(DENY_ADMIN)));
        let (addr, _, dials) = front(app, policy, None).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        // Bytes right behind the request, as a client may send them.
        s.write_all(format!("{UPGRADE}client-early").as_bytes())
            .await
            .unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(head.contains("upgrade: websocket"), "{head}");
        let mut early = [0u8; 9];
        s.read_exact(&mut early).await.unwrap();
        assert_eq!(&early, b"pod-early");
        // 1 MiB each way through the splice, written while the echo comes back.
        crate::proxy::testing::echo_through_splice(s, b"client-early", 1 << 20).await;
        assert_eq!(dials.load(std::sync::atomic::Ordering::Relaxed), 1);
        // The pod was asked to switch, and saw the source the agent judged, not the
        // client's claim.
        let heads = heads.lock().unwrap();
        assert_eq!(heads.len(), 1);
        assert!(heads[0].contains("upgrade: websocket"), "{}", heads[0]);
        assert!(
            heads[0].contains("x-forwarded-for: 127.0.0.1\r\n"),
            "{}",
            heads[0]
        );
        assert!(!heads[0].contains("192.0.2.1"), "{}", heads[0]);
    }

    #[tokio::test]
    async fn a_denied_upgrade_gets_403_and_never_reaches_the_pod() {
        let (app, heads) = ws_app(After::Echo).await;
        let policy = Arc::new(Mutex::new(mesh(DENY_ADMIN)));
        let (addr, _, dials) = front(app, policy, None).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(UPGRADE.replace("/chat", "/admin/ws").as_bytes())
            .await
            .unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("http/1.1 403"), "{head}");
        assert!(!head.contains("upgrade"), "{head}");
        assert_eq!(dials.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert!(heads.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_declined_upgrade_is_an_answer_like_any_other() {
        let (app, _) = ws_app(After::Decline).await;
        let policy = Arc::new(Mutex::new(mesh(DENY_ADMIN)));
        let (addr, _, _) = front(app, policy, None).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(UPGRADE.as_bytes()).await.unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("http/1.1 426"), "{head}");
        let mut body = [0u8; 2];
        s.read_exact(&mut body).await.unwrap();
        assert_eq!(&body, b"no");
    }

    #[tokio::test]
    async fn a_pod_that_resets_the_upgraded_connection_resets_the_client() {
        let (app, _) = ws_app(After::Reset).await;
        let policy = Arc::new(Mutex::new(mesh(DENY_ADMIN)));
        let (addr, _, _) = front(app, policy, None).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(UPGRADE.as_bytes()).await.unwrap();
        assert!(read_head(&mut s).await.starts_with("http/1.1 101"));
        s.write_all(b"some bytes").await.unwrap();
        let mut got = Vec::new();
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut got))
            .await
            .expect("the client's connection ended");
        let e = end.expect_err("a reset, not a clean end");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    }

    #[test]
    fn only_spliced_protocols_are_upgrades() {
        let parts = |conn: &str, up: &[&str], v: http::Version| {
            let mut b = Request::builder().uri("/").version(v);
            if !conn.is_empty() {
                b = b.header(header::CONNECTION, conn);
            }
            for u in up {
                b = b.header(header::UPGRADE, *u);
            }
            b.body(()).unwrap().into_parts().0
        };
        let h11 = http::Version::HTTP_11;
        for (conn, up, v, want) in [
            ("Upgrade", &["websocket"][..], h11, true),
            ("keep-alive, upgrade", &["WebSocket"][..], h11, true),
            ("upgrade", &["websocket/13"][..], h11, true),
            ("", &["websocket"][..], h11, false),
            ("upgrade", &["h2c"][..], h11, false),
            ("upgrade", &["websocket, h2c"][..], h11, false),
            ("upgrade", &["websocket", "h2c"][..], h11, false),
            ("upgrade", &["TLS/1.2"][..], h11, false),
            ("upgrade", &["websocket"][..], http::Version::HTTP_10, false),
        ] {
            assert_eq!(
                requested(&parts(conn, up, v)).is_some(),
                want,
                "{conn:?} {up:?} {v:?}"
            );
        }
    }
}
