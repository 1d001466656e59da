//! The CA's endpoint in TLS (`--ca-listen`), as istiod serves its CA on 15012: callers'
//! bearer tokens (node credentials, projected ServiceAccount tokens) never cross the
//! network in the clear.
//!
//! The server certificate is issued by the CA itself for the names the callers dial
//! (`--ca-server-names`: DNS names and IP addresses), so a caller checks it against the
//! mesh root it is configured with (`--ca-root-cert`), as ztunnel checks istiod's against
//! `istio-ca-root-cert`. It lives `SERVER_CERT_TTL` and is reissued at half of it on the
//! next handshake; the key is generated in memory for each one.
//!
//! TLS 1.3 only (our callers are agents), ALPN `h2`, no client certificate: callers
//! authenticate with their bearer token, as with istiod. Handshakes run in their own
//! tasks with a deadline, at most `MAX_HANDSHAKES` at once, so a slow or silent client
//! holds up no other.

use std::{
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use rustls::{server::ResolvesServerCert, sign::CertifiedKey};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{debug, info, warn, Instrument as _};

use super::{Ca, CaError};

/// Life of the endpoint's certificate (reissued at half of it).
pub const SERVER_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more connections wait in the accept queue.
pub const MAX_HANDSHAKES: usize = 128;

/// One subject alternative name of the endpoint's certificate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum ServerNameSan {
    Dns(String),
    Ip(IpAddr),
}

impl std::str::FromStr for ServerNameSan {
    type Err = String;

    /// An IP address, or a DNS name (letters, digits, `-`, `.`; a leading `*.` allowed).
    fn from_str(s: &str) -> Result<ServerNameSan, String> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(ServerNameSan::Ip(ip));
        }
        let name = s.strip_prefix("*.").unwrap_or(s);
        let ok = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if ok {
            Ok(ServerNameSan::Dns(s.to_ascii_lowercase()))
        } else {
            Err(format!(
                "{s:?} is neither an IP address nor a DNS name for the CA's certificate"
            ))
        }
    }
}

impl std::fmt::Display for ServerNameSan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerNameSan::Dns(d) => f.write_str(d),
            ServerNameSan::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// The endpoint's names when none are configured: the node name, `localhost`, loopback,
/// and the listen address if it is a specific one.
pub fn default_names(node: &str, listen: SocketAddr) -> Vec<ServerNameSan> {
    let mut names = Vec::new();
    if let Ok(n) = node.parse::<ServerNameSan>() {
        names.push(n);
    }
    names.push(ServerNameSan::Dns("localhost".into()));
    names.push(ServerNameSan::Ip(IpAddr::from([127, 0, 0, 1])));
    if !listen.ip().is_unspecified() && !names.contains(&ServerNameSan::Ip(listen.ip())) {
        names.push(ServerNameSan::Ip(listen.ip()));
    }
    names
}

struct Current {
    key: Arc<CertifiedKey>,
    refresh_at: SystemTime,
    not_after: SystemTime,
}

/// Hands out the endpoint's certificate, reissued by the CA at half of its life.
pub struct ServerCert {
    ca: Arc<Ca>,
    names: Vec<ServerNameSan>,
    ttl: Duration,
    current: Mutex<Option<Current>>,
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCert")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl ServerCert {
    /// Issues the first certificate now: a CA that cannot sign fails at start.
    pub fn new(
        ca: Arc<Ca>,
        names: Vec<ServerNameSan>,
        ttl: Duration,
    ) -> Result<ServerCert, CaError> {
        if names.is_empty() {
            return Err(CaError::Invalid(
                "the CA endpoint's certificate needs at least one name".into(),
            ));
        }
        let s = ServerCert {
            ca,
            names,
            ttl,
            current: Mutex::new(None),
        };
        let first = s.issue()?;
        *s.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(first);
        Ok(s)
    }

    fn issue(&self) -> Result<Current, CaError> {
        let (chain, key) = self.ca.issue_server_cert(&self.names, self.ttl)?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| CaError::Sign(format!("the endpoint key: {e}")))?;
        let now = SystemTime::now();
        info!(names = ?self.names.iter().map(ToString::to_string).collect::<Vec<_>>(), ttl = ?self.ttl, "CA endpoint certificate issued");
        Ok(Current {
            key: Arc::new(CertifiedKey::new(chain, signer)),
            refresh_at: now + self.ttl / 2,
            not_after: now + self.ttl,
        })
    }

    /// The certificate for the next handshake (reissued first if half-spent).
    pub fn get(&self) -> Option<Arc<CertifiedKey>> {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let now = SystemTime::now();
        if cur.as_ref().is_none_or(|c| now >= c.refresh_at) {
            match self.issue() {
                Ok(c) => *cur = Some(c),
                Err(e) => warn!(error = %e, "could not reissue the CA endpoint's certificate"),
            }
        }
        cur.as_ref()
            .filter(|c| now < c.not_after)
            .map(|c| c.key.clone())
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

/// The endpoint's rustls configuration: TLS 1.3, ALPN `h2`, no client certificate.
pub fn server_config(cert: Arc<ServerCert>) -> Result<rustls::ServerConfig, CaError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CaError::Serve(format!("TLS versions: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A TLS connection the gRPC server reads (its peer address known to the CA's logs).
pub struct TlsIo {
    inner: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    info: tonic::transport::server::TcpConnectInfo,
}

impl tonic::transport::server::Connected for TlsIo {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepted and handshaken connections of `listener`, for `serve_with_incoming`. A failed
/// handshake is logged (debug) and dropped, never ends the stream.
pub fn incoming(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsIo>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(
        async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let (tcp, peer) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(c) => c,
                        Err(e) => {
                            warn!(error = %e, "CA endpoint: accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                    () = tx.closed() => return,
                };
                let _ = tcp.set_nodelay(true);
                let info = tonic::transport::server::TcpConnectInfo {
                    local_addr: tcp.local_addr().ok(),
                    remote_addr: Some(peer),
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(
                    async move {
                        let _permit = permit;
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(inner)) => {
                                let _ = tx.send(Ok(TlsIo { inner, info })).await;
                            }
                            Ok(Err(e)) => {
                                debug!(%peer, error = %e, "CA endpoint: TLS handshake failed")
                            }
                            Err(_) => debug!(%peer, "CA endpoint: TLS handshake timed out"),
                        }
                    }
                    .instrument(tracing::debug_span!("ca_tls_handshake")),
                );
            }
        }
        .instrument(tracing::info_span!("ca_tls_accept")),
    );
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Serves `ca`'s `IstioCertificateService` on `listener` in TLS until the server fails.
pub async fn serve(
    ca: Arc<Ca>,
    listener: tokio::net::TcpListener,
    names: Vec<ServerNameSan>,
) -> Result<(), CaError> {
    let cert = Arc::new(ServerCert::new(ca.clone(), names, SERVER_CERT_TTL)?);
    let config = Arc::new(server_config(cert)?);
    let addr = listener.local_addr().ok();
    info!(addr = ?addr, "CA serving IstioCertificateService in TLS");
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(16))
        .timeout(Duration::from_secs(30))
        .add_service(ca.into_service())
        .serve_with_incoming(incoming(listener, config))
        .await
        .map_err(|e| CaError::Serve(format!("stopped: {e}")))
}
