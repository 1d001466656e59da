//! Who may open an ADS stream on the control plane, and how a client proves it.
//!
//! The configuration the control plane serves is the mesh's map (every service, endpoint
//! and route), and soon its policy: it is not for pods to read. Three ways in:
//! - **Unix socket** (the agent's own proxy): the socket file is `0600` in a `0700` folder,
//!   so only root on the node can connect; the peer's credentials are checked once more.
//! - **TCP with a bearer token** (`--xds-token-file`): remote clients (another node, Envoy,
//!   a standalone control plane's clients) send `authorization: Bearer <token>` with each
//!   stream; a missing or wrong token is `UNAUTHENTICATED`.
//! - **TCP without a token**: only loopback peers (processes of the node itself; pods
//!   cannot reach the node's loopback, see `local_scope_ipv4`), and such a listener must be
//!   bound to a loopback address (`check_listen`).
//!
//! Every refusal is logged and counted (`ServerStats::rejected`).

use std::{
    net::SocketAddr,
    path::Path,
    sync::{atomic::Ordering::Relaxed, Arc},
};

use tonic::{service::Interceptor, transport::server::UdsConnectInfo, Request, Status};
use tracing::warn;

use super::server::ServerStats;
pub use crate::wire::{AuthError, Token};

/// A TCP listener without a token must be on loopback.
pub fn check_listen(addr: SocketAddr, token: Option<&Token>) -> Result<(), AuthError> {
    if token.is_none() && !addr.ip().is_loopback() {
        return Err(AuthError::OpenListener(addr));
    }
    Ok(())
}

/// The server side: admits or refuses each stream before it reaches the ADS service.
#[derive(Clone)]
pub struct Access {
    token: Option<Token>,
    stats: Arc<ServerStats>,
}

impl Access {
    pub fn new(token: Option<Token>, stats: Arc<ServerStats>) -> Access {
        Access { token, stats }
    }

    fn judge(&self, req: &Request<()>) -> Result<(), Status> {
        if let Some(uds) = req.extensions().get::<UdsConnectInfo>() {
            // The file mode already keeps others out; a peer of another user would mean a
            // socket file with the wrong mode.
            let me = crate::sys::effective_uid();
            return match uds.peer_cred.map(|c| c.uid()) {
                Some(uid) if uid == 0 || uid == me => Ok(()),
                other => Err(Status::permission_denied(format!(
                    "ADS over the Unix socket is for the agent (uid {me}); peer uid {other:?}"
                ))),
            };
        }
        let peer = req.remote_addr();
        match &self.token {
            Some(token) => {
                let presented = req
                    .metadata()
                    .get("authorization")
                    .map(|v| v.as_bytes())
                    .and_then(|v| v.strip_prefix(b"Bearer "));
                match presented {
                    Some(t) if token.matches(t) => Ok(()),
                    Some(_) => Err(Status::unauthenticated("wrong ADS bearer token")),
                    None => Err(Status::unauthenticated(
                        "ADS needs `authorization: Bearer <token>` (the control plane's --xds-token-file)",
                    )),
                }
            }
            None => match peer {
                Some(p) if p.ip().is_loopback() => Ok(()),
                _ => Err(Status::permission_denied(
                    "ADS without a token is served to the node's own processes only",
                )),
            },
        }
    }
}

impl Interceptor for Access {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        match self.judge(&req) {
            Ok(()) => Ok(req),
            Err(status) => {
                self.stats.rejected.fetch_add(1, Relaxed);
                warn!(peer = ?req.remote_addr(), reason = status.message(), "ADS stream refused");
                Err(status)
            }
        }
    }
}

/// Binds the Unix socket the agent's proxy uses: folder `0700`, socket `0600`; a stale
/// socket file of an earlier run is replaced (the node lock, taken before, says no other
/// agent uses it).
pub fn bind_unix(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let l = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Credentials;

    fn access(token: Option<&str>) -> Access {
        Access::new(token.map(|t| Token::new(t, "t").unwrap()), Arc::default())
    }

    fn tcp_request(peer: &str, auth: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        r.extensions_mut()
            .insert(tonic::transport::server::TcpConnectInfo {
                local_addr: None,
                remote_addr: Some(peer.parse().unwrap()),
            });
        if let Some(a) = auth {
            r.metadata_mut().insert("authorization", a.parse().unwrap());
        }
        r
    }

    const TOKEN: &str = "0123456789abcdef-token";

    #[test]
    fn token_listener_wants_the_exact_bearer_token_from_anywhere() {
        let mut a = access(Some(TOKEN));
        let ok = format!("Bearer {TOKEN}");
        assert!(a.call(tcp_request("10.0.0.9:5000", Some(&ok))).is_ok());
        assert!(a.call(tcp_request("127.0.0.1:5000", Some(&ok))).is_ok());
        for bad in [
            None,
            Some("Bearer 0123456789abcdef-tokeN"),
            Some("Bearer 0123456789abcdef-token-and-more"),
            Some(TOKEN),
            Some("Basic 0123456789abcdef-token"),
        ] {
            let e = a.call(tcp_request("127.0.0.1:5000", bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        assert_eq!(a.stats.rejected.load(Relaxed), 5);
    }

    #[test]
    fn tokenless_listener_serves_loopback_peers_only() {
        let mut a = access(None);
        assert!(a.call(tcp_request("127.0.0.1:5000", None)).is_ok());
        assert!(a.call(tcp_request("[::1]:5000", None)).is_ok());
        for peer in ["10.201.0.2:5000", "[::ffff:10.0.0.1]:5000"] {
            let e = a.call(tcp_request(peer, None)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{peer}");
        }
        // No connection information at all is not a loopback peer either.
        assert!(a.call(Request::new(())).is_err());
    }

    #[test]
    fn open_listeners_need_a_token_and_tokens_must_be_strong() {
        let t = Token::new(TOKEN, "t").unwrap();
        assert!(check_listen("127.0.0.1:15010".parse().unwrap(), None).is_ok());
        assert!(check_listen("0.0.0.0:15010".parse().unwrap(), None).is_err());
        assert!(check_listen("10.0.0.1:15010".parse().unwrap(), None).is_err());
        assert!(check_listen("0.0.0.0:15010".parse().unwrap(), Some(&t)).is_ok());
        assert!(matches!(
            Token::new("short", "t"),
            Err(AuthError::Weak { len: 5, .. })
        ));
        assert!(matches!(
            Token::new("with a space in it!", "t"),
            Err(AuthError::NotAscii(_))
        ));
    }

    #[test]
    fn client_credentials_carry_the_token() {
        let t = Token::new(TOKEN, "t").unwrap();
        let mut c = Credentials::bearer(Some(&t));
        let r = c.call(Request::new(())).unwrap();
        let mut a = access(Some(TOKEN));
        let mut r2 = tcp_request("10.0.0.9:1", None);
        *r2.metadata_mut() = r.metadata().clone();
        assert!(a.call(r2).is_ok());
        let r = Credentials::default().call(Request::new(())).unwrap();
        assert!(r.metadata().get("authorization").is_none());
    }
}
