//! Workload identity: SPIFFE IDs (`spiffe://<trust-domain>/ns/<namespace>/sa/<account>`),
//! the workload certificates the agent holds for its node's identities, and the trust
//! roots peers are checked against.
//!
//! - `certs`: the agent's certificate manager: keys generated in memory, CSRs sent to the
//!   CA (embedded, or any `IstioCertificateService`), on-demand per identity, rotation at
//!   half of a certificate's life.
//! - `tls`: rustls configurations for mutual TLS 1.3 between nodes: the server asks for
//!   and verifies a client certificate, the client checks the server against the SPIFFE
//!   ID it *expects*, not only against the trust roots.
//!
//! Trait objects meet here: the HBONE tunnel (`proxy::hbone`) asks `Certificates` for the
//! certificate of a local identity; it never knows where the certificate came from.

pub mod certs;
pub mod tls;

use std::{fmt, future::Future, pin::Pin, str::FromStr, sync::Arc, time::SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The longest identity accepted (a URI SAN; bounds what a peer's certificate can make
/// us hold).
pub const MAX_ID_LEN: usize = 512;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum IdentityError {
    #[error("invalid SPIFFE ID {0:?}: {1}")]
    BadId(String, &'static str),
    #[error("certificate authority: {0}")]
    Ca(String),
    #[error("certificate: {0}")]
    Cert(String),
    #[error("refused: {0}")]
    Denied(String),
}

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

fn check_segment(s: &str, what: &'static str, full: &str) -> Result<(), IdentityError> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadId(full.to_string(), what))
    }
}

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<SpiffeId, IdentityError> {
        let full = format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}");
        check_segment(trust_domain, "bad trust domain", &full)?;
        check_segment(namespace, "bad namespace", &full)?;
        check_segment(service_account, "bad service account", &full)?;
        if full.len() > MAX_ID_LEN {
            return Err(IdentityError::BadId(full, "too long"));
        }
        Ok(SpiffeId {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<SpiffeId, IdentityError> {
        let bad = |why| IdentityError::BadId(s.to_string(), why);
        if s.len() > MAX_ID_LEN {
            return Err(bad("too long"));
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or(bad("not a spiffe:// URI"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => SpiffeId::new(td, ns, sa),
            _ => Err(bad(
                "expected spiffe://<trust-domain>/ns/<namespace>/sa/<account>",
            )),
        }
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A certificate the agent holds for one of its node's identities. The key lives in
/// memory only.
pub struct WorkloadCert {
    pub id: SpiffeId,
    /// Leaf first, then the intermediates up to (not including) the root.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The roots the CA returned with the chain (peers' chains end at one of these).
    pub roots: Vec<CertificateDer<'static>>,
    /// Hex, as `openssl x509 -serial` prints it.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("id", &self.id.to_string())
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where the proxy gets the certificates of local identities and the trust roots.
pub trait Certificates: Send + Sync + 'static {
    /// The certificate in force for `id`, if one is held and not expired.
    fn current(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>>;
    /// The certificate for `id`, asking the CA first if none is held (on demand); later
    /// calls get the held one, renewed in the background at half of its life.
    fn get<'a>(
        &'a self,
        id: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<Arc<WorkloadCert>, IdentityError>>;
    /// The trust roots peers' chains must end at.
    fn roots(&self) -> Vec<CertificateDer<'static>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_round_trip_and_reject_junk() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a b/sa/b",
            "spiffe:///ns/a/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }
}
