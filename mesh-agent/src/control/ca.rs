//! The embedded certificate authority: signs workload certificates (SPIFFE URI SAN) for
//! the identities that run on the asking node, over Istio's `IstioCertificateService`
//! (`wire::ca`) for other nodes' agents and in-process (`LocalCa`) for this agent.
//!
//! **Keys.** Either a root generated on first start (ECDSA P-256, 10 years), persisted in
//! `--ca-dir` and reused on later starts, or an operator's CA plugged in with the same
//! files (Istio's plug-in layout; the signing certificate may be an intermediate):
//!
//! | file | what |
//! |---|---|
//! | `ca-cert.pem` | the signing certificate |
//! | `ca-key.pem` | its key (mode 0600) |
//! | `root-cert.pem` | the root peers trust |
//! | `cert-chain.pem` | `ca-cert.pem`, then the intermediates up to the root (the root may be left out) |
//!
//! Without `--ca-dir` the root is generated in memory for this run only (one node). A
//! Kubernetes Secret as the source of these files is not implemented yet.
//!
//! **Where.** Other nodes' agents reach it on `--ca-listen`, in TLS only (`tls`: a server
//! certificate it issues itself, as istiod on 15012); this agent's own requests are
//! in-process (`LocalCa`). `mesh-agent control-plane --ca-listen` serves it alone.
//!
//! **Who gets what.** A remote caller authenticates with `authorization: Bearer <token>`;
//! `--ca-node-tokens` maps tokens to node names. The identity asked for is the CSR's one
//! URI SAN (and Istio's `ImpersonatedIdentity` metadata, when sent, must be the same), and
//! it is signed only if the caller's node runs a workload with that identity
//! (`NodeIdentities`). This agent's own requests go through the same check for its node.
//! Refusals are gRPC statuses (`UNAUTHENTICATED`, `PERMISSION_DENIED`,
//! `INVALID_ARGUMENT`), logged and counted (`CaStats`).
//!
//! **Kubernetes callers** (`k8s`, with `--source kubernetes`): a bearer token that is not a
//! node credential is a projected ServiceAccount token, checked with a `TokenReview`; the
//! node is the one of the pod it is bound to, and what that node runs is read from the API
//! server (its pods' service accounts), not from `NodeIdentities`. The API server
//! unreachable: `UNAVAILABLE`.

pub mod k8s;
pub mod tls;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{atomic::AtomicU64, atomic::Ordering::Relaxed, Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{pem::PemObject as _, CertificateDer};
use tokio::sync::watch;
use tonic::{metadata::MetadataMap, Request, Response, Status};
use tracing::{info, warn};

use crate::{
    identity::{certs::CaClient, BoxFuture, IdentityError, SpiffeId},
    wire::{
        ca::{
            IstioCertificateRequest, IstioCertificateResponse, IstioCertificateService,
            IstioCertificateServiceServer,
        },
        Token,
    },
};

/// Signing certificate.
pub const CA_CERT: &str = "ca-cert.pem";
/// Its private key (PKCS#8 PEM, mode 0600).
pub const CA_KEY: &str = "ca-key.pem";
/// The root of trust.
pub const ROOT_CERT: &str = "root-cert.pem";
/// `ca-cert.pem` and the intermediates up to the root.
pub const CERT_CHAIN: &str = "cert-chain.pem";

/// Lifetime of a generated root (10 years).
pub const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// A leaf's validity when the request names none (24 h).
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// How far back a leaf's `not_before` is set: clocks of nodes differ a little.
pub const BACKDATE: Duration = Duration::from_secs(60);
/// Largest CSR accepted (bytes of PEM); a P-256 CSR with one URI SAN is about 500.
pub const MAX_CSR_BYTES: usize = 8 << 10;
/// Largest node tokens file (bytes).
const MAX_TOKENS_FILE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("CA files in {dir}: {why} (expected Istio's plug-in layout: {CA_CERT}, {CA_KEY}, {ROOT_CERT}, {CERT_CHAIN}; `mesh-agent ca init --dir DIR` writes a fresh root)")]
    Files { dir: String, why: String },
    #[error("node tokens file {path}: {why} (one `<node-name> <token>` per line, tokens of at least {} printable characters)", crate::wire::MIN_TOKEN_LEN)]
    Tokens { path: String, why: String },
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    Invalid(String),
    /// The API server that authenticates Kubernetes callers does not answer.
    #[error("{0}")]
    Unavailable(String),
    #[error("signing: {0}")]
    Sign(String),
    /// The TLS endpoint could not be set up or stopped.
    #[error("CA endpoint: {0}")]
    Serve(String),
}

impl CaError {
    /// The gRPC status a caller gets.
    pub fn to_status(&self) -> Status {
        match self {
            CaError::Unauthenticated(m) => Status::unauthenticated(m.clone()),
            CaError::Denied(m) => Status::permission_denied(m.clone()),
            CaError::Invalid(m) => Status::invalid_argument(m.clone()),
            CaError::Unavailable(m) => Status::unavailable(m.clone()),
            other => Status::internal(other.to_string()),
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Which SPIFFE identities run on which node: the CA signs `id` for node `n` only if `n`'s
/// set holds it. One writer (the wiring, from the enrolment source: this node's enrolled
/// workloads; a cluster-wide source adds the other nodes) publishes it through a
/// `watch::Receiver<Arc<NodeIdentities>>`; the CA reads the latest at each request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeIdentities {
    nodes: BTreeMap<String, BTreeSet<SpiffeId>>,
}

impl NodeIdentities {
    /// Replaces what `node` runs.
    pub fn set_node(&mut self, node: impl Into<String>, ids: BTreeSet<SpiffeId>) {
        let node = node.into();
        if ids.is_empty() {
            self.nodes.remove(&node);
        } else {
            self.nodes.insert(node, ids);
        }
    }

    /// Adds one identity to `node` (builder style).
    pub fn with(mut self, node: &str, id: SpiffeId) -> NodeIdentities {
        self.nodes.entry(node.to_owned()).or_default().insert(id);
        self
    }

    pub fn node(&self, node: &str) -> Option<&BTreeSet<SpiffeId>> {
        self.nodes.get(node)
    }

    pub fn allows(&self, node: &str, id: &SpiffeId) -> bool {
        self.nodes.get(node).is_some_and(|s| s.contains(id))
    }
}

/// Node credentials of remote agents: a file of `<node-name> <token>` lines (`#`
/// comments), checked when loaded and read again when its size or modification time
/// changes (a bad new version is logged and the last good one kept).
pub struct NodeTokens {
    path: PathBuf,
    state: Mutex<TokenState>,
}

struct TokenState {
    stamp: Option<(SystemTime, u64)>,
    tokens: Vec<(String, Token)>,
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl NodeTokens {
    pub fn load(path: &Path) -> Result<NodeTokens, CaError> {
        let st = stamp(path);
        let tokens = Self::read(path)?;
        info!(path = %path.display(), nodes = tokens.len(), "CA node tokens loaded");
        Ok(NodeTokens {
            path: path.to_owned(),
            state: Mutex::new(TokenState { stamp: st, tokens }),
        })
    }

    fn read(path: &Path) -> Result<Vec<(String, Token)>, CaError> {
        let shown = path.display().to_string();
        let bad = |why: String| CaError::Tokens {
            path: shown.clone(),
            why,
        };
        let len = std::fs::metadata(path).map_err(io_err(path))?.len();
        if len > MAX_TOKENS_FILE {
            return Err(bad(format!("{len} bytes, more than {MAX_TOKENS_FILE}")));
        }
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        Self::parse(&text).map_err(bad)
    }

    fn parse(text: &str) -> Result<Vec<(String, Token)>, String> {
        let mut out: Vec<(String, Token)> = Vec::new();
        let mut seen = BTreeSet::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [node, token] = fields.as_slice() else {
                return Err(format!("line {}: expected `<node-name> <token>`", n + 1));
            };
            if token.len() < crate::wire::MIN_TOKEN_LEN {
                return Err(format!(
                    "line {} (node {node}): a token of {} characters; use at least {} random ones",
                    n + 1,
                    token.len(),
                    crate::wire::MIN_TOKEN_LEN
                ));
            }
            let token = Token::new(token, "")
                .map_err(|_| format!("line {} (node {node}): not a printable token", n + 1))?;
            if !seen.insert(fields[1].to_owned()) {
                return Err(format!("line {}: a token given to two nodes", n + 1));
            }
            out.push(((*node).to_owned(), token));
        }
        Ok(out)
    }

    /// The node whose token was presented. Every token is compared (in constant time per
    /// token), so timing does not tell which line matched.
    pub fn node_for(&self, presented: &[u8]) -> Option<String> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = stamp(&self.path);
        if now != st.stamp {
            st.stamp = now;
            match Self::read(&self.path) {
                Ok(t) => {
                    info!(path = %self.path.display(), nodes = t.len(), "CA node tokens reloaded");
                    st.tokens = t;
                }
                Err(e) => warn!(error = %e, "keeping the last good CA node tokens"),
            }
        }
        let mut found = None;
        for (node, token) in &st.tokens {
            if token.matches(presented) {
                found = Some(node.clone());
            }
        }
        found
    }
}

/// The signing key and what goes after a leaf in a chain.
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    /// PEM, what follows a leaf: the signing certificate and the intermediates, then the
    /// root (once: `[root]` when the root signs).
    tail: Vec<String>,
    root: CertificateDer<'static>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("chain_len", &self.tail.len())
            .finish_non_exhaustive()
    }
}

/// Sets `params`' validity (whole seconds, as certificates hold it).
fn set_validity(params: &mut CertificateParams, from: SystemTime, to: SystemTime) {
    let at = |t: SystemTime| {
        let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(secs)
    };
    params.not_before = at(from);
    params.not_after = at(to);
}

/// 16 random bytes, positive as a DER integer.
fn random_serial() -> Result<rcgen::SerialNumber, CaError> {
    let mut b = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut b)
        .map_err(|_| CaError::Sign("no randomness for a serial number".into()))?;
    b[0] = (b[0] & 0x7f) | 0x01;
    Ok(rcgen::SerialNumber::from(b.to_vec()))
}

fn certs_of(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

/// A generated root: (certificate PEM, key PEM).
fn generate_root(trust_domain: &str) -> Result<(String, String), CaError> {
    let sign = |e: rcgen::Error| CaError::Sign(e.to_string());
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, "mesh-agent root CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    set_validity(&mut params, now - BACKDATE, now + ROOT_TTL);
    params.serial_number = Some(random_serial()?);
    let cert = params.self_signed(&key).map_err(sign)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes `text` to `dir/name` through a temporary file and a rename (a crash leaves the
/// old file or the new one, never half of one).
fn write_file(dir: &Path, name: &str, text: &str, mode: u32) -> Result<(), CaError> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))
}

/// `mesh-agent ca init`: writes a fresh root in the plug-in layout into `dir` (created
/// `0700`); refuses if a key is there already. Several nodes given the same files share
/// one root.
pub fn init_dir(dir: &Path, trust_domain: &str) -> Result<(), CaError> {
    check_trust_domain(trust_domain)?;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
    if dir.join(CA_KEY).exists() {
        return Err(CaError::Files {
            dir: dir.display().to_string(),
            why: format!("{CA_KEY} exists already; not overwriting a CA"),
        });
    }
    let (cert, key) = generate_root(trust_domain)?;
    // The key first: the other files appearing mean it is complete.
    write_file(dir, CA_KEY, &key, 0o600)?;
    for name in [CA_CERT, ROOT_CERT, CERT_CHAIN] {
        write_file(dir, name, &cert, 0o644)?;
    }
    Ok(())
}

fn check_trust_domain(td: &str) -> Result<(), CaError> {
    SpiffeId::new(td, "ns", "sa")
        .map(|_| ())
        .map_err(|_| CaError::Invalid(format!("bad trust domain {td:?}")))
}

impl Signer {
    /// A root for this run only (not persisted).
    pub fn generate(trust_domain: &str) -> Result<Signer, CaError> {
        check_trust_domain(trust_domain)?;
        let (cert, key) = generate_root(trust_domain)?;
        Signer::from_pem(&cert, &key, &cert, &cert, "(in memory)")
    }

    /// The CA in `dir`; generated there first if the folder has no key yet.
    pub fn load_or_generate(dir: &Path, trust_domain: &str) -> Result<Signer, CaError> {
        if !dir.join(CA_KEY).exists() {
            init_dir(dir, trust_domain)?;
            info!(dir = %dir.display(), "generated a CA root");
        }
        Signer::load(dir)
    }

    /// An existing CA in the plug-in layout.
    pub fn load(dir: &Path) -> Result<Signer, CaError> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(io_err(&p))
        };
        let key_path = dir.join(CA_KEY);
        let mode = std::fs::metadata(&key_path)
            .map_err(io_err(&key_path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            warn!(path = %key_path.display(), mode = format!("{:o}", mode & 0o777), "the CA key is readable by others; chmod 600 it");
        }
        Signer::from_pem(
            &read(CA_CERT)?,
            &read(CA_KEY)?,
            &read(ROOT_CERT)?,
            &read(CERT_CHAIN)?,
            &dir.display().to_string(),
        )
    }

    fn from_pem(
        ca_cert: &str,
        ca_key: &str,
        root: &str,
        chain: &str,
        dir: &str,
    ) -> Result<Signer, CaError> {
        let bad = |why: String| CaError::Files {
            dir: dir.to_owned(),
            why,
        };
        let one = |pem: &str, name: &str| match certs_of(pem).as_slice() {
            [c] => Ok(c.clone()),
            other => Err(bad(format!(
                "{name}: expected one certificate, found {}",
                other.len()
            ))),
        };
        let ca_der = one(ca_cert, CA_CERT)?;
        let root_der = one(root, ROOT_CERT)?;
        let key = KeyPair::from_pem(ca_key).map_err(|e| bad(format!("{CA_KEY}: {e}")))?;
        let mut links = certs_of(chain);
        if links.is_empty() {
            links.push(ca_der.clone());
        }
        if links[0] != ca_der {
            return Err(bad(format!("{CERT_CHAIN} does not start with {CA_CERT}")));
        }
        links.retain(|c| *c != root_der);
        links.push(root_der.clone());
        // [signing cert, intermediates..., root]; when the signing cert is the root, [root].
        let full: Vec<&CertificateDer> = std::iter::once(&ca_der)
            .chain(links.iter().filter(|c| **c != ca_der))
            .collect();
        let parsed = full
            .iter()
            .map(|d| {
                x509_parser::parse_x509_certificate(d)
                    .map(|(_, c)| c)
                    .map_err(|e| bad(format!("unreadable certificate: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let signing = &parsed[0];
        if !signing.is_ca() {
            return Err(bad(format!("{CA_CERT} is not a CA certificate")));
        }
        if signing.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(bad(format!("{CA_KEY} is not the key of {CA_CERT}")));
        }
        for w in parsed.windows(2) {
            w[0].verify_signature(Some(w[1].public_key()))
                .map_err(|_| {
                    bad(format!(
                        "{} is not signed by {} (the chain must lead to {ROOT_CERT})",
                        w[0].subject(),
                        w[1].subject()
                    ))
                })?;
        }
        let root_parsed = parsed.last().unwrap_or(signing);
        root_parsed
            .verify_signature(None)
            .map_err(|_| bad(format!("{ROOT_CERT} is not self-signed")))?;
        let issuer =
            Issuer::from_ca_cert_der(&ca_der, key).map_err(|e| bad(format!("{CA_CERT}: {e}")))?;
        let tail = full.iter().map(|d| pem_of(d)).collect();
        Ok(Signer {
            issuer,
            tail,
            root: root_der,
        })
    }

    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }
}

/// PEM of one certificate (64-column base64, as openssl writes it).
pub fn pem_of(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Refusals and signatures, by outcome.
#[derive(Debug, Default)]
pub struct CaStats {
    pub issued: AtomicU64,
    pub unauthenticated: AtomicU64,
    pub denied: AtomicU64,
    pub invalid: AtomicU64,
    /// Requests not served because the API server did not answer (Kubernetes callers).
    pub unavailable: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct CaOptions {
    pub trust_domain: String,
    /// Validity of a leaf whose request names none.
    pub default_ttl: Duration,
    /// The longest validity granted.
    pub max_ttl: Duration,
}

impl CaOptions {
    pub fn new(trust_domain: &str) -> CaOptions {
        CaOptions {
            trust_domain: trust_domain.to_owned(),
            default_ttl: DEFAULT_CERT_TTL,
            max_ttl: DEFAULT_CERT_TTL,
        }
    }
}

pub struct Ca {
    signer: Signer,
    opts: CaOptions,
    nodes: watch::Receiver<Arc<NodeIdentities>>,
    /// Remote agents' credentials; `None`: in-process requests only.
    tokens: Option<NodeTokens>,
    /// Kubernetes callers (projected ServiceAccount tokens), set once the kube client is.
    kube: std::sync::OnceLock<k8s::KubeCallers>,
    pub stats: CaStats,
}

/// Who a remote caller is.
enum Caller {
    /// A node credential (`--ca-node-tokens`): the node's identities are `NodeIdentities`'.
    Node(String),
    /// A ServiceAccount token bound to a pod of this node: its identities are the API
    /// server's.
    Kube(String),
}

/// What the caller's node runs.
enum Allowed<'a> {
    /// `NodeIdentities`' entry of the node.
    Nodes,
    /// This set.
    Set(&'a BTreeSet<SpiffeId>),
}

impl Ca {
    pub fn new(
        signer: Signer,
        opts: CaOptions,
        nodes: watch::Receiver<Arc<NodeIdentities>>,
        tokens: Option<NodeTokens>,
    ) -> Result<Ca, CaError> {
        check_trust_domain(&opts.trust_domain)?;
        Ok(Ca {
            signer,
            opts,
            nodes,
            tokens,
            kube: std::sync::OnceLock::new(),
            stats: CaStats::default(),
        })
    }

    /// Serves Kubernetes callers (a no-op if already set).
    pub fn use_kubernetes(&self, callers: k8s::KubeCallers) {
        let _ = self.kube.set(callers);
    }

    pub fn root(&self) -> &CertificateDer<'static> {
        self.signer.root()
    }

    /// The node whose agent sent `metadata`'s bearer token (a node credential).
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<String, CaError> {
        let Some(tokens) = &self.tokens else {
            return Err(CaError::Unauthenticated(
                "this CA serves no remote nodes (no --ca-node-tokens)".into(),
            ));
        };
        tokens
            .node_for(bearer(metadata)?)
            .ok_or_else(|| CaError::Unauthenticated("unknown CA bearer token".into()))
    }

    /// A node credential first; else, with Kubernetes callers, a ServiceAccount token.
    async fn caller(&self, metadata: &MetadataMap) -> Result<Caller, CaError> {
        let Some(kube) = self.kube.get() else {
            return self.authenticate(metadata).map(Caller::Node);
        };
        let presented = bearer(metadata)?;
        if let Some(node) = self.tokens.as_ref().and_then(|t| t.node_for(presented)) {
            return Ok(Caller::Node(node));
        }
        kube.node_of(presented).await.map(Caller::Kube)
    }

    /// Signs `csr_pem` for `node`: the CSR's one URI SAN must be an identity of this trust
    /// domain that runs on `node` (and equal `impersonated` when given). The chain, PEM:
    /// leaf, intermediates, root.
    pub fn sign_for_node(
        &self,
        node: &str,
        csr_pem: &str,
        validity: Option<Duration>,
        impersonated: Option<&str>,
    ) -> Result<Vec<String>, CaError> {
        self.sign_checked(node, Allowed::Nodes, csr_pem, validity, impersonated)
    }

    fn sign_checked(
        &self,
        node: &str,
        allowed: Allowed<'_>,
        csr_pem: &str,
        validity: Option<Duration>,
        impersonated: Option<&str>,
    ) -> Result<Vec<String>, CaError> {
        let r = self.sign_inner(node, allowed, csr_pem, validity, impersonated);
        let counter = match &r {
            Ok(_) => &self.stats.issued,
            Err(CaError::Unauthenticated(_)) => &self.stats.unauthenticated,
            Err(CaError::Denied(_)) => &self.stats.denied,
            Err(_) => &self.stats.invalid,
        };
        counter.fetch_add(1, Relaxed);
        if let Err(e) = &r {
            warn!(node, error = %e, "certificate request refused");
        }
        r
    }

    fn sign_inner(
        &self,
        node: &str,
        allowed: Allowed<'_>,
        csr_pem: &str,
        validity: Option<Duration>,
        impersonated: Option<&str>,
    ) -> Result<Vec<String>, CaError> {
        if csr_pem.len() > MAX_CSR_BYTES {
            return Err(CaError::Invalid(format!(
                "CSR of {} bytes; at most {MAX_CSR_BYTES}",
                csr_pem.len()
            )));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Invalid(format!("unreadable or badly signed CSR: {e}")))?;
        let uri =
            match csr.params.subject_alt_names.as_slice() {
                [SanType::URI(u)] => u.as_str().to_owned(),
                _ => return Err(CaError::Invalid(
                    "the CSR must carry exactly one subject alternative name, the SPIFFE ID (URI)"
                        .into(),
                )),
            };
        let id: SpiffeId = uri
            .parse()
            .map_err(|e: IdentityError| CaError::Invalid(e.to_string()))?;
        if let Some(asked) = impersonated {
            if asked != uri {
                return Err(CaError::Invalid(format!(
                    "ImpersonatedIdentity {asked:?} is not the CSR's SAN {uri:?}"
                )));
            }
        }
        if id.trust_domain() != self.opts.trust_domain {
            return Err(CaError::Denied(format!(
                "{id} is not of this CA's trust domain {}",
                self.opts.trust_domain
            )));
        }
        let runs_there = match allowed {
            Allowed::Nodes => self.nodes.borrow().allows(node, &id),
            Allowed::Set(ids) => ids.contains(&id),
        };
        if !runs_there {
            return Err(CaError::Denied(format!(
                "{id} runs on no workload of node {node}"
            )));
        }
        let ttl = match validity {
            Some(d) if !d.is_zero() => d.min(self.opts.max_ttl),
            _ => self.opts.default_ttl.min(self.opts.max_ttl),
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = csr.params.subject_alt_names.clone();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        let now = SystemTime::now();
        set_validity(&mut params, now - BACKDATE, now + ttl);
        let signed = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        let leaf = signed
            .signed_by(&self.signer.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        info!(node, %id, ttl = ?ttl, "certificate issued");
        Ok(std::iter::once(leaf.pem())
            .chain(self.signer.tail.iter().cloned())
            .collect())
    }

    /// A TLS server certificate for the CA's own endpoint (`tls`), as istiod issues one
    /// for 15012: signed by this CA, the given DNS names and IP addresses as SANs, server
    /// use only, valid `ttl`. The chain (leaf, intermediates, root) and the key.
    pub fn issue_server_cert(
        &self,
        names: &[tls::ServerNameSan],
        ttl: Duration,
    ) -> Result<
        (
            Vec<CertificateDer<'static>>,
            rustls::pki_types::PrivateKeyDer<'static>,
        ),
        CaError,
    > {
        let sign = |e: rcgen::Error| CaError::Sign(e.to_string());
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, self.opts.trust_domain.as_str());
        dn.push(DnType::CommonName, "mesh-agent CA endpoint");
        params.distinguished_name = dn;
        params.subject_alt_names = names
            .iter()
            .map(|n| match n {
                tls::ServerNameSan::Ip(ip) => Ok(SanType::IpAddress(*ip)),
                tls::ServerNameSan::Dns(d) => d.as_str().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()
            .map_err(sign)?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        let now = SystemTime::now();
        set_validity(&mut params, now - BACKDATE, now + ttl);
        let leaf = params.signed_by(&key, &self.signer.issuer).map_err(sign)?;
        let chain = std::iter::once(leaf.der().clone())
            .chain(self.signer.tail.iter().flat_map(|p| certs_of(p)))
            .collect();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        Ok((chain, key))
    }

    /// The gRPC service, served on the CA's TLS endpoint (`tls::serve`).
    pub fn into_service(self: Arc<Self>) -> IstioCertificateServiceServer<Ca> {
        IstioCertificateServiceServer::new(self)
    }

    async fn handle(&self, req: &Request<IstioCertificateRequest>) -> Result<Vec<String>, CaError> {
        let refused = |e: &CaError| {
            let counter = match e {
                CaError::Unavailable(_) => &self.stats.unavailable,
                _ => &self.stats.unauthenticated,
            };
            counter.fetch_add(1, Relaxed);
            warn!(peer = ?req.remote_addr(), error = %e, "certificate request refused");
        };
        let caller = self.caller(req.metadata()).await.inspect_err(refused)?;
        let r = req.get_ref();
        let validity = u64::try_from(r.validity_duration)
            .ok()
            .map(Duration::from_secs);
        match (caller, self.kube.get()) {
            (Caller::Kube(node), Some(kube)) => {
                let ids = kube.identities_on(&node).await.inspect_err(refused)?;
                self.sign_checked(
                    &node,
                    Allowed::Set(&ids),
                    &r.csr,
                    validity,
                    r.impersonated_identity(),
                )
            }
            (Caller::Node(node), _) | (Caller::Kube(node), None) => {
                self.sign_for_node(&node, &r.csr, validity, r.impersonated_identity())
            }
        }
    }
}

/// The presented `authorization: Bearer <token>`.
fn bearer(metadata: &MetadataMap) -> Result<&[u8], CaError> {
    metadata
        .get("authorization")
        .map(|v| v.as_bytes())
        .and_then(|v| v.strip_prefix(b"Bearer "))
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            CaError::Unauthenticated(
                "the CA needs `authorization: Bearer <token>` (the node's --ca-token-file)".into(),
            )
        })
}

impl IstioCertificateService for Ca {
    fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> crate::wire::ca::BoxFuture<'_, Result<Response<IstioCertificateResponse>, Status>> {
        Box::pin(async move {
            self.handle(&request)
                .await
                .map(|cert_chain| Response::new(IstioCertificateResponse { cert_chain }))
                .map_err(|e| e.to_status())
        })
    }
}

/// This agent's own requests, in-process: the same checks as a remote node's, for `node`.
pub struct LocalCa {
    pub ca: Arc<Ca>,
    pub node: String,
}

impl CaClient for LocalCa {
    fn sign<'a>(
        &'a self,
        id: &'a SpiffeId,
        csr_pem: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<String>, IdentityError>> {
        let id = id.to_string();
        let r = self
            .ca
            .sign_for_node(&self.node, csr_pem, Some(ttl), Some(&id))
            .map_err(|e| match e {
                CaError::Unauthenticated(m) | CaError::Denied(m) => IdentityError::Denied(m),
                other => IdentityError::Ca(other.to_string()),
            });
        Box::pin(std::future::ready(r))
    }
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::UnixTime;
    use x509_parser::extensions::GeneralName;

    use super::*;
    use crate::wire::ca::{CaGrpcClient, CaTransport};

    /// A folder under the temp folder, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!("mesh-ca-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const TD: &str = "cluster.local";
    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";
    const TOKEN_N1: &str = "n1-token-0123456789abcdef";
    const TOKEN_N2: &str = "n2-token-0123456789abcdef";

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    /// A CSR with the given SAN URIs, and its key.
    fn csr(uris: &[&str]) -> (KeyPair, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI(rcgen::string::Ia5String::try_from(*u).unwrap()))
            .collect();
        let pem = p.serialize_request(&key).unwrap().pem().unwrap();
        (key, pem)
    }

    /// n1 runs web, n2 runs db.
    fn nodes() -> NodeIdentities {
        NodeIdentities::default()
            .with("n1", id(WEB))
            .with("n2", id(DB))
    }

    fn ca_with(signer: Signer, tokens: Option<NodeTokens>) -> Ca {
        let (_tx, rx) = watch::channel(Arc::new(nodes()));
        let mut opts = CaOptions::new(TD);
        opts.max_ttl = Duration::from_secs(48 * 3600);
        Ca::new(signer, opts, rx, tokens).unwrap()
    }

    fn tokens_file(dir: &TempDir) -> NodeTokens {
        std::fs::create_dir_all(&dir.0).unwrap();
        let p = dir.0.join("tokens");
        std::fs::write(
            &p,
            format!("# node token\nn1 {TOKEN_N1}\n\nn2 {TOKEN_N2}\n"),
        )
        .unwrap();
        NodeTokens::load(&p).unwrap()
    }

    fn der_chain(pem: &[String]) -> Vec<CertificateDer<'static>> {
        pem.iter().flat_map(|p| certs_of(p)).collect()
    }

    /// Verifies `chain` (leaf first, root last) as a client certificate against `root`
    /// with rustls' own verifier.
    fn verify(
        chain: &[CertificateDer<'static>],
        root: &CertificateDer<'static>,
    ) -> Result<(), rustls::Error> {
        let mut store = rustls::RootCertStore::empty();
        store.add(root.clone()).unwrap();
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(store),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        v.verify_client_cert(&chain[0], &chain[1..chain.len() - 1], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn generated_root_is_persisted_and_reloaded_the_same() {
        let dir = TempDir::new("persist");
        let a = Signer::load_or_generate(&dir.0, TD).unwrap();
        let b = Signer::load_or_generate(&dir.0, TD).unwrap();
        assert_eq!(a.root(), b.root(), "the second start reuses the root");
        let mode = std::fs::metadata(dir.0.join(CA_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        for f in [CA_CERT, ROOT_CERT, CERT_CHAIN] {
            assert_eq!(
                certs_of(&std::fs::read_to_string(dir.0.join(f)).unwrap())[0],
                *a.root()
            );
        }
        let (_, root) = x509_parser::parse_x509_certificate(a.root()).unwrap();
        assert!(root.is_ca());
        let life = root.validity().not_after.timestamp() - root.validity().not_before.timestamp();
        assert!(life >= ROOT_TTL.as_secs() as i64, "{life}");
        // `ca init` does not overwrite a CA.
        assert!(matches!(init_dir(&dir.0, TD), Err(CaError::Files { .. })));
        // A CA signs with a key that is not its certificate's: refused at load.
        let other = TempDir::new("persist-other");
        init_dir(&other.0, TD).unwrap();
        std::fs::copy(other.0.join(CA_KEY), dir.0.join(CA_KEY)).unwrap();
        let e = Signer::load(&dir.0).unwrap_err().to_string();
        assert!(e.contains("is not the key of"), "{e}");
    }

    #[test]
    fn plug_in_ca_with_an_intermediate_issues_chains_that_verify_to_the_root() {
        // An operator's root and intermediate.
        let root_key = KeyPair::generate().unwrap();
        let mut rp = CertificateParams::default();
        rp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        rp.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        rp.distinguished_name
            .push(DnType::CommonName, "operator root");
        let root = rcgen::CertifiedIssuer::self_signed(rp, root_key).unwrap();
        let int_key = KeyPair::generate().unwrap();
        let mut ip = CertificateParams::default();
        ip.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ip.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ip.distinguished_name
            .push(DnType::CommonName, "operator intermediate");
        let int_pem_key = int_key.serialize_pem();
        let int_cert = ip.signed_by(&int_key, &root).unwrap();
        let dir = TempDir::new("plugin");
        std::fs::create_dir_all(&dir.0).unwrap();
        std::fs::write(dir.0.join(CA_CERT), int_cert.pem()).unwrap();
        std::fs::write(dir.0.join(CA_KEY), int_pem_key).unwrap();
        std::fs::write(dir.0.join(ROOT_CERT), root.pem()).unwrap();
        std::fs::write(dir.0.join(CERT_CHAIN), int_cert.pem() + &root.pem()).unwrap();
        let signer = Signer::load_or_generate(&dir.0, TD).unwrap();
        assert_eq!(
            signer.root(),
            root.der(),
            "an existing CA is used, not replaced"
        );
        let ca = ca_with(signer, None);
        let (_, req) = csr(&[WEB]);
        let chain = ca.sign_for_node("n1", &req, None, Some(WEB)).unwrap();
        assert_eq!(chain.len(), 3, "leaf, intermediate, root");
        let ders = der_chain(&chain);
        assert_eq!(ders[1], *int_cert.der());
        assert_eq!(ders[2], *root.der());
        verify(&ders, root.der()).unwrap();
        // Another root does not accept it (the check can fail).
        let stranger = Signer::generate(TD).unwrap();
        assert!(verify(&ders, stranger.root()).is_err());
        // A chain file that does not lead to the root is refused at load.
        let rogue = Signer::generate(TD).unwrap();
        std::fs::write(dir.0.join(ROOT_CERT), pem_of(rogue.root())).unwrap();
        std::fs::write(dir.0.join(CERT_CHAIN), int_cert.pem()).unwrap();
        let e = Signer::load(&dir.0).unwrap_err().to_string();
        assert!(e.contains("is not signed by"), "{e}");
    }

    #[test]
    fn leaf_has_the_exact_uri_san_the_ttl_and_workload_usages() {
        let ca = ca_with(Signer::generate(TD).unwrap(), None);
        let (key, req) = csr(&[WEB]);
        let ttl = Duration::from_secs(3600);
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let chain = ca.sign_for_node("n1", &req, Some(ttl), None).unwrap();
        assert_eq!(chain.len(), 2, "leaf and root");
        let ders = der_chain(&chain);
        assert_eq!(ders[1], *ca.root());
        verify(&ders, ca.root()).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&ders[0]).unwrap();
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names, vec![GeneralName::URI(WEB)]);
        assert!(!leaf.is_ca());
        assert_eq!(
            leaf.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        let v = leaf.validity();
        let (nb, na) = (v.not_before.timestamp(), v.not_after.timestamp());
        assert!(
            (na - before - 3600).abs() <= 2,
            "not_after {na}, start {before}"
        );
        assert!(
            (before - BACKDATE.as_secs() as i64 - nb).abs() <= 2,
            "not_before {nb}"
        );
        let ku = leaf.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        // Bounded by the maximum; no validity asked: the default.
        let (_, req) = csr(&[WEB]);
        let long = ca
            .sign_for_node("n1", &req, Some(Duration::from_secs(30 * 24 * 3600)), None)
            .unwrap();
        let long = der_chain(&long);
        let (_, l) = x509_parser::parse_x509_certificate(&long[0]).unwrap();
        assert!((l.validity().not_after.timestamp() - before - 48 * 3600).abs() <= 2);
        let (_, req) = csr(&[WEB]);
        let dflt = ca.sign_for_node("n1", &req, None, None).unwrap();
        let dflt = der_chain(&dflt);
        let (_, l) = x509_parser::parse_x509_certificate(&dflt[0]).unwrap();
        assert!((l.validity().not_after.timestamp() - before - 24 * 3600).abs() <= 2);
        assert_eq!(ca.stats.issued.load(Relaxed), 3);
        // Serials differ.
        assert_ne!(l.raw_serial(), leaf.raw_serial());
    }

    #[test]
    fn requests_are_refused_with_the_right_reason() {
        let ca = ca_with(Signer::generate(TD).unwrap(), None);
        let (_, web) = csr(&[WEB]);
        let code = |r: Result<Vec<String>, CaError>| r.unwrap_err().to_status().code();
        // The impersonated identity must be the CSR's.
        let e = ca.sign_for_node("n1", &web, None, Some(DB)).unwrap_err();
        assert_eq!(e.to_status().code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains("is not the CSR's SAN"), "{e}");
        // An identity that does not run on the caller's node.
        let (_, db) = csr(&[DB]);
        let e = ca.sign_for_node("n1", &db, None, Some(DB)).unwrap_err();
        assert_eq!(e.to_status().code(), tonic::Code::PermissionDenied);
        assert!(
            e.to_string().contains("runs on no workload of node n1"),
            "{e}"
        );
        assert!(ca.sign_for_node("n2", &db, None, Some(DB)).is_ok());
        assert_eq!(
            code(ca.sign_for_node("n3", &web, None, None)),
            tonic::Code::PermissionDenied
        );
        // Another trust domain.
        let (_, foreign) = csr(&["spiffe://other.domain/ns/shop/sa/web"]);
        assert_eq!(
            code(ca.sign_for_node("n1", &foreign, None, None)),
            tonic::Code::PermissionDenied
        );
        // Not exactly one URI SAN.
        let (_, two) = csr(&[WEB, DB]);
        assert_eq!(
            code(ca.sign_for_node("n1", &two, None, None)),
            tonic::Code::InvalidArgument
        );
        let (_, none) = csr(&[]);
        assert_eq!(
            code(ca.sign_for_node("n1", &none, None, None)),
            tonic::Code::InvalidArgument
        );
        let (_, not_spiffe) = csr(&["https://example.com/x"]);
        assert_eq!(
            code(ca.sign_for_node("n1", &not_spiffe, None, None)),
            tonic::Code::InvalidArgument
        );
        // Oversize, garbage, and a CSR whose signature does not match.
        let big = format!("{web}{}", " ".repeat(MAX_CSR_BYTES));
        let e = ca.sign_for_node("n1", &big, None, None).unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
        assert_eq!(e.to_status().code(), tonic::Code::InvalidArgument);
        assert_eq!(
            code(ca.sign_for_node("n1", "not a csr", None, None)),
            tonic::Code::InvalidArgument
        );
        let mut der = CertificateSigningRequestDer::from_pem_slice(web.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        let last = der.len() - 1;
        der[last] ^= 1;
        let tampered = pem_of(&der).replace("CERTIFICATE", "CERTIFICATE REQUEST");
        let e = ca.sign_for_node("n1", &tampered, None, None).unwrap_err();
        assert!(e.to_string().contains("badly signed"), "{e}");
        assert_eq!(ca.stats.denied.load(Relaxed), 3);
        assert_eq!(ca.stats.invalid.load(Relaxed), 7);
    }

    use rustls::pki_types::CertificateSigningRequestDer;

    #[test]
    fn callers_authenticate_with_a_node_token() {
        let dir = TempDir::new("tokens");
        let ca = ca_with(Signer::generate(TD).unwrap(), Some(tokens_file(&dir)));
        let md = |v: Option<&str>| {
            let mut m = MetadataMap::new();
            if let Some(v) = v {
                m.insert("authorization", v.parse().unwrap());
            }
            m
        };
        assert_eq!(
            ca.authenticate(&md(Some(&format!("Bearer {TOKEN_N1}"))))
                .unwrap(),
            "n1"
        );
        assert_eq!(
            ca.authenticate(&md(Some(&format!("Bearer {TOKEN_N2}"))))
                .unwrap(),
            "n2"
        );
        for bad in [
            None,
            Some("Bearer n1-token-0123456789abcdeF"),
            Some(TOKEN_N1),
            Some("Bearer "),
        ] {
            let e = ca.authenticate(&md(bad)).unwrap_err();
            assert_eq!(
                e.to_status().code(),
                tonic::Code::Unauthenticated,
                "{bad:?}"
            );
        }
        // Without a tokens file no remote caller is served.
        let closed = ca_with(Signer::generate(TD).unwrap(), None);
        let e = closed
            .authenticate(&md(Some(&format!("Bearer {TOKEN_N1}"))))
            .unwrap_err();
        assert_eq!(e.to_status().code(), tonic::Code::Unauthenticated);
        // The file is read again when it changes; a bad version keeps the last good one.
        let p = dir.0.join("tokens");
        std::fs::write(&p, "n7 n7-token-0123456789abcdef-longer\n").unwrap();
        let tokens = NodeTokens::load(&p).unwrap();
        assert_eq!(
            tokens
                .node_for(b"n7-token-0123456789abcdef-longer")
                .as_deref(),
            Some("n7")
        );
        std::fs::write(&p, "n8 n8-token-0123456789abcdef-much-longer\n").unwrap();
        assert_eq!(
            tokens
                .node_for(b"n8-token-0123456789abcdef-much-longer")
                .as_deref(),
            Some("n8")
        );
        assert_eq!(tokens.node_for(b"n7-token-0123456789abcdef-longer"), None);
        std::fs::write(&p, "n9 short\n").unwrap();
        assert_eq!(
            tokens
                .node_for(b"n8-token-0123456789abcdef-much-longer")
                .as_deref(),
            Some("n8")
        );
        // Checked at start.
        let e = NodeTokens::load(&p).err().unwrap().to_string();
        assert!(e.contains("line 1 (node n9)"), "{e}");
        std::fs::write(&p, format!("a {TOKEN_N1}\nb {TOKEN_N1}\n")).unwrap();
        assert!(NodeTokens::load(&p).is_err(), "one token, two nodes");
        std::fs::write(&p, "a b c\n").unwrap();
        assert!(NodeTokens::load(&p).is_err());
    }

    /// The CA's TLS endpoint on loopback: its `https://` URL, and a client transport
    /// that trusts the CA's root.
    async fn serve(ca: Arc<Ca>) -> (String, CaTransport) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let names = vec![
            tls::ServerNameSan::Ip(addr.ip()),
            "ca.mesh.svc".parse().unwrap(),
        ];
        let root = ca.root().clone();
        tokio::spawn(tls::serve(ca, l, names));
        (format!("https://{addr}"), tls_to(&root, "127.0.0.1"))
    }

    fn tls_to(root: &CertificateDer<'static>, name: &str) -> CaTransport {
        CaTransport::Tls {
            config: Arc::new(
                crate::wire::ca::client_tls_config(std::slice::from_ref(root)).unwrap(),
            ),
            server_name: rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap(),
        }
    }

    #[tokio::test]
    async fn the_tls_endpoint_is_trusted_only_through_the_root_and_its_names() {
        let dir = TempDir::new("tls");
        let ca = Arc::new(ca_with(
            Signer::generate(TD).unwrap(),
            Some(tokens_file(&dir)),
        ));
        let (url, good) = serve(ca.clone()).await;
        let token = Token::new(TOKEN_N1, "t").unwrap();
        let (_, req) = csr(&[WEB]);
        let ask = |t: CaTransport, url: String| {
            let req = req.clone();
            let token = token.clone();
            async move {
                CaGrpcClient::new(&url, Some(&token), &t)
                    .unwrap()
                    .create_certificate(IstioCertificateRequest::new(
                        req,
                        Duration::from_secs(600),
                        WEB,
                    ))
                    .await
            }
        };
        let r = ask(good.clone(), url.clone()).await.unwrap();
        verify(&der_chain(&r.cert_chain), ca.root()).unwrap();
        // The other name in the certificate works too (a DNS name, dialled by address).
        assert!(ask(tls_to(ca.root(), "ca.mesh.svc"), url.clone())
            .await
            .is_ok());
        // Another root, a name the certificate does not carry, and plaintext: refused
        // before any token is sent.
        let stranger = Signer::generate(TD).unwrap();
        for (what, t, u) in [
            (
                "foreign root",
                tls_to(stranger.root(), "127.0.0.1"),
                url.clone(),
            ),
            (
                "other name",
                tls_to(ca.root(), "istiod.istio-system.svc"),
                url.clone(),
            ),
            (
                "plaintext",
                CaTransport::Plaintext,
                url.replace("https://", "http://"),
            ),
        ] {
            let s = ask(t, u).await.unwrap_err();
            // A failed handshake is UNAVAILABLE; plaintext HTTP/2 into a TLS port breaks
            // the connection mid-request (UNKNOWN, transport error).
            assert!(
                matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown),
                "{what}: {s:?}"
            );
        }
        assert_eq!(ca.stats.issued.load(Relaxed), 2);
        assert_eq!(
            ca.stats.unauthenticated.load(Relaxed),
            0,
            "no request got through"
        );
        // A scheme that does not match the transport is refused at once.
        assert!(CaGrpcClient::new(&url, None, &CaTransport::Plaintext).is_err());
        assert!(CaGrpcClient::new(&url.replace("https", "http"), None, &good).is_err());
    }

    #[test]
    fn the_endpoint_certificate_names_the_endpoint_and_is_reissued_at_half_life() {
        let ca = Arc::new(ca_with(Signer::generate(TD).unwrap(), None));
        let names: Vec<tls::ServerNameSan> = ["10.0.0.1", "ca.mesh.svc"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        assert!("bad name!".parse::<tls::ServerNameSan>().is_err());
        assert!("-x.y".parse::<tls::ServerNameSan>().is_err());
        let cert = tls::ServerCert::new(ca.clone(), names, Duration::from_secs(2)).unwrap();
        let first = cert.get().unwrap();
        assert!(
            Arc::ptr_eq(&first, &cert.get().unwrap()),
            "kept while fresh"
        );
        let ders: Vec<CertificateDer<'static>> = first.cert.clone();
        let mut store = rustls::RootCertStore::empty();
        store.add(ca.root().clone()).unwrap();
        let server = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(store),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let check = |name: &str| {
            use rustls::client::danger::ServerCertVerifier as _;
            server.verify_server_cert(
                &ders[0],
                &ders[1..ders.len() - 1],
                &rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap(),
                &[],
                UnixTime::now(),
            )
        };
        check("10.0.0.1").unwrap();
        check("ca.mesh.svc").unwrap();
        assert!(check("istiod.istio-system.svc").is_err());
        // Not a client certificate: it cannot pass as a workload towards peers.
        assert!(verify(&ders, ca.root()).is_err());
        let (_, leaf) = x509_parser::parse_x509_certificate(&ders[0]).unwrap();
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![
                GeneralName::IPAddress(&[10, 0, 0, 1]),
                GeneralName::DNSName("ca.mesh.svc")
            ]
        );
        assert!(!leaf.is_ca());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(
            eku.server_auth && !eku.client_auth,
            "not usable as a workload identity"
        );
        std::thread::sleep(Duration::from_millis(1100));
        assert!(
            !Arc::ptr_eq(&first, &cert.get().unwrap()),
            "reissued at half life"
        );
        assert!(tls::ServerCert::new(ca, Vec::new(), Duration::from_secs(2)).is_err());
    }

    #[tokio::test]
    async fn grpc_round_trip_through_a_real_server() {
        let dir = TempDir::new("grpc");
        let ca = Arc::new(ca_with(
            Signer::generate(TD).unwrap(),
            Some(tokens_file(&dir)),
        ));
        let (url, transport) = serve(ca.clone()).await;
        let token = Token::new(TOKEN_N1, "t").unwrap();
        let client = CaGrpcClient::new(&url, Some(&token), &transport).unwrap();
        let (_, req) = csr(&[WEB]);
        let r = client
            .create_certificate(IstioCertificateRequest::new(
                req.clone(),
                Duration::from_secs(600),
                WEB,
            ))
            .await
            .unwrap();
        assert_eq!(r.cert_chain.len(), 2);
        verify(&der_chain(&r.cert_chain), ca.root()).unwrap();
        // Refusals arrive as statuses.
        let (_, db) = csr(&[DB]);
        let s = client
            .create_certificate(IstioCertificateRequest::new(
                db,
                Duration::from_secs(600),
                DB,
            ))
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
        let s = client
            .create_certificate(IstioCertificateRequest::new(
                req.clone(),
                Duration::ZERO,
                DB,
            ))
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        let anonymous = CaGrpcClient::new(&url, None, &transport).unwrap();
        let s = anonymous
            .create_certificate(IstioCertificateRequest::new(
                req.clone(),
                Duration::ZERO,
                WEB,
            ))
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
        // A request bigger than the server reads.
        let huge = IstioCertificateRequest::new(
            "x".repeat(crate::wire::ca::MAX_REQUEST_BYTES + 1),
            Duration::ZERO,
            WEB,
        );
        let s = client.create_certificate(huge).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::OutOfRange, "{s:?}");
        assert_eq!(ca.stats.unauthenticated.load(Relaxed), 1);
        // The agent's gRPC CA client and certificate manager against it.
        use crate::identity::{
            certs::{CertManager, CertOptions, GrpcCa},
            Certificates as _,
        };
        let m = CertManager::new(
            Arc::new(GrpcCa::new(&url, Some(&token), transport).unwrap()),
            CertOptions::default(),
        );
        let c = m.get(&id(WEB)).await.unwrap();
        assert_eq!(c.roots, vec![ca.root().clone()]);
        assert_eq!(m.roots(), vec![ca.root().clone()]);
        let e = m.get(&id(DB)).await.unwrap_err();
        assert!(matches!(e, IdentityError::Denied(_)), "{e:?}");
    }

    #[tokio::test]
    async fn the_grpc_client_reads_its_token_file_before_each_request() {
        use crate::identity::certs::{CaClient as _, GrpcCa};
        let dir = TempDir::new("token-file");
        let ca = Arc::new(ca_with(
            Signer::generate(TD).unwrap(),
            Some(tokens_file(&dir)),
        ));
        let (url, transport) = serve(ca.clone()).await;
        let file = dir.0.join("ca-token");
        std::fs::write(&file, format!("{TOKEN_N1}\n")).unwrap();
        let client = GrpcCa::with_token_file(&url, &file, transport.clone()).unwrap();
        let ttl = Duration::from_secs(600);
        let (_, web) = csr(&[WEB]);
        let (_, db) = csr(&[DB]);
        assert!(client.sign(&id(WEB), &web, ttl).await.is_ok());
        assert!(
            client.sign(&id(DB), &db, ttl).await.is_err(),
            "n1 runs no db"
        );
        // Rotated in place (as the kubelet does): the next request presents the new one.
        std::fs::write(&file, TOKEN_N2).unwrap();
        assert!(client.sign(&id(DB), &db, ttl).await.is_ok());
        // A bad version keeps the last good token.
        std::fs::write(&file, "short").unwrap();
        assert!(client.sign(&id(DB), &db, ttl).await.is_ok());
        std::fs::remove_file(&file).unwrap();
        assert!(client.sign(&id(DB), &db, ttl).await.is_ok());
        // At start the file must hold a token.
        assert!(GrpcCa::with_token_file(&url, &file, transport).is_err());
    }
}
