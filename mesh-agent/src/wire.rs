//! The xDS wire contract the control plane and the proxy's xDS client share, owned by
//! neither: the well-known Envoy filter names both speak, and the ADS bearer token (the
//! control plane's secret, checked by `control::auth`; what the client presents).

pub mod ca;
pub mod istio;

use std::{net::SocketAddr, path::Path, sync::Arc};

use tonic::{
    metadata::{Ascii, MetadataValue},
    service::Interceptor,
    Request, Status,
};

/// Envoy's well-known filter names (the `name` of a filter; its config is a typed `Any`).
pub const FAULT_FILTER: &str = "envoy.filters.http.fault";
pub const RATE_LIMIT_FILTER: &str = "envoy.filters.http.local_ratelimit";
pub const ROUTER_FILTER: &str = "envoy.filters.http.router";
pub const HCM_FILTER: &str = "envoy.filters.network.http_connection_manager";
pub const TCP_PROXY_FILTER: &str = "envoy.filters.network.tcp_proxy";
pub const HTTP_INSPECTOR: &str = "envoy.filters.listener.http_inspector";

/// A shorter token is refused: it could be guessed.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading the xDS token file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the xDS token in {path} is {len} bytes; use at least {MIN_TOKEN_LEN} random printable ASCII characters (e.g. `head -c 24 /dev/urandom | base64`)")]
    Weak { path: String, len: usize },
    #[error("the xDS token in {0} must be printable ASCII (it travels in a gRPC header)")]
    NotAscii(String),
    #[error("ADS on {0} would serve the mesh's configuration to anyone who reaches that address: keep it on loopback, or give --xds-token-file so clients must authenticate")]
    OpenListener(SocketAddr),
}

/// A bearer token for ADS: the server's secret, or what a client presents.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    pub fn from_file(path: &Path) -> Result<Token, AuthError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: shown.clone(),
            source,
        })?;
        Token::new(text.trim(), &shown)
    }

    pub(crate) fn new(text: &str, path: &str) -> Result<Token, AuthError> {
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AuthError::NotAscii(path.into()));
        }
        if text.len() < MIN_TOKEN_LEN {
            return Err(AuthError::Weak {
                path: path.into(),
                len: text.len(),
            });
        }
        Ok(Token(text.into()))
    }

    /// Compares in time independent of where the first difference is.
    pub(crate) fn matches(&self, presented: &[u8]) -> bool {
        let mine = self.0.as_bytes();
        if mine.len() != presented.len() {
            return false;
        }
        mine.iter()
            .zip(presented)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    fn header(&self) -> MetadataValue<Ascii> {
        // Checked printable ASCII at construction, so this parse cannot fail.
        format!("Bearer {}", self.0)
            .parse()
            .unwrap_or_else(|_| MetadataValue::from_static(""))
    }
}

/// The client side: adds the bearer token (when there is one) to every call.
#[derive(Clone, Default)]
pub struct Credentials(Option<MetadataValue<Ascii>>);

impl Credentials {
    pub fn bearer(token: Option<&Token>) -> Credentials {
        Credentials(token.map(Token::header))
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}
