//! The agent's certificate manager (`CertManager`, the `identity::Certificates` the proxy
//! uses): one certificate per local identity, asked for on demand.
//!
//! - **Single flight.** Concurrent `get`s of an identity without a certificate share one
//!   CSR: the first starts a task, the others wait for its result.
//! - **Keys** are ECDSA P-256, generated in memory for each certificate; only the CSR
//!   leaves the process.
//! - **Rotation** at half of the life left when the certificate arrived (not of
//!   `not_after - not_before`: CAs backdate `not_before` by a minute or more for clock skew,
//!   which would make a short-lived certificate look half-spent on arrival). New handshakes
//!   take the new certificate; connections made with the old one continue.
//! - **CA failures** during rotation are retried with exponential back-off while the held
//!   certificate serves; `current` never returns an expired one.
//! - **Bounds**: at most `CertOptions::max_identities` identities are held; `retain` drops
//!   identities no longer local (their rotation stops).
//!
//! Where certificates come from is a `CaClient`: `GrpcCa` (any `IstioCertificateService`,
//! `--ca-address`) or the embedded CA in-process (`control::ca::LocalCa`, which lives on
//! the control side: `identity` must not depend on `control`).

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex, Weak,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;
use tokio::{sync::watch, task::AbortHandle};
use tracing::{debug, info, warn, Instrument as _};

use super::{BoxFuture, Certificates, IdentityError, SpiffeId, WorkloadCert};
use crate::wire::{
    ca::{CaGrpcClient, CaTransport, IstioCertificateRequest},
    Token,
};

/// Most identities held at once (a node runs far fewer service accounts).
pub const DEFAULT_MAX_IDENTITIES: usize = 10_000;
/// First wait after a failed renewal; doubled each time up to `DEFAULT_RETRY_MAX`.
pub const DEFAULT_RETRY_MIN: Duration = Duration::from_secs(1);
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(30);

/// Where certificates are signed.
pub trait CaClient: Send + Sync + 'static {
    /// Asks for a certificate for `id` (the CSR's one URI SAN) valid for `ttl`; the chain
    /// in PEM: the leaf, the intermediates, the root last.
    fn sign<'a>(
        &'a self,
        id: &'a SpiffeId,
        csr_pem: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<String>, IdentityError>>;
}

/// A remote `IstioCertificateService` (`https://host:port`, or `http://` with an explicit
/// opt-in), with this node's bearer token.
pub struct GrpcCa {
    address: String,
    transport: CaTransport,
    /// Where the token is read again before each request (`with_token_file`).
    token_file: Option<std::path::PathBuf>,
    /// The token text last read from `token_file`, and the client presenting it.
    current: Mutex<Current>,
}

/// Largest root bundle read (bytes).
const MAX_ROOTS_FILE: u64 = 1 << 20;

/// How to reach the CA at `address`: TLS for `https://` (the server's chain checked against
/// the PEM bundle in `root_cert`, for `server_name` or else the address's host), plaintext
/// for `http://` only if `allow_plaintext` (logged as a warning: the bearer token then
/// crosses the network in the clear).
pub fn ca_transport(
    address: &str,
    root_cert: Option<&std::path::Path>,
    server_name: Option<&str>,
    allow_plaintext: bool,
) -> Result<CaTransport, IdentityError> {
    let bad = |why: String| IdentityError::Ca(format!("CA address {address:?}: {why}"));
    let uri: http::Uri = address.parse().map_err(|e| bad(format!("{e}")))?;
    match uri.scheme_str() {
        Some("http") if allow_plaintext => {
            warn!(ca = %address, "talking to the CA in plaintext (--ca-plaintext): its bearer token crosses the network in the clear");
            Ok(CaTransport::Plaintext)
        }
        Some("http") => Err(bad(
            "plaintext would send this node's bearer token in the clear; use https:// with \
             --ca-root-cert, or opt in with --ca-plaintext"
                .into(),
        )),
        Some("https") => {
            let Some(path) = root_cert else {
                return Err(bad(
                    "https:// needs --ca-root-cert, the PEM root(s) the CA's TLS certificate \
                     chains to (istiod: the istio-ca-root-cert ConfigMap's root-cert.pem)"
                        .into(),
                ));
            };
            let shown = path.display();
            let len = std::fs::metadata(path)
                .map_err(|e| bad(format!("{shown}: {e}")))?
                .len();
            if len > MAX_ROOTS_FILE {
                return Err(bad(format!(
                    "{shown}: {len} bytes, more than {MAX_ROOTS_FILE}"
                )));
            }
            let pem = std::fs::read(path).map_err(|e| bad(format!("{shown}: {e}")))?;
            let roots = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(format!("{shown}: {e}")))?;
            if roots.is_empty() {
                return Err(bad(format!("{shown} holds no PEM certificate")));
            }
            let config = crate::wire::ca::client_tls_config(&roots).map_err(bad)?;
            let name = match server_name {
                Some(n) => n.to_owned(),
                None => uri
                    .host()
                    .unwrap_or_default()
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned(),
            };
            let server_name = rustls::pki_types::ServerName::try_from(name.clone())
                .map_err(|e| bad(format!("server name {name:?}: {e}")))?;
            Ok(CaTransport::Tls {
                config: Arc::new(config),
                server_name,
            })
        }
        _ => Err(bad("expected https://host:port".into())),
    }
}

impl GrpcCa {
    /// Checks the address now; the gRPC channel is made at the first request (it needs
    /// the runtime the request runs on).
    pub fn new(
        address: &str,
        token: Option<&Token>,
        transport: CaTransport,
    ) -> Result<GrpcCa, IdentityError> {
        CaGrpcClient::check(address, &transport).map_err(IdentityError::Ca)?;
        Ok(GrpcCa {
            address: address.to_owned(),
            current: Mutex::new(Current {
                text: String::new(),
                token: token.cloned(),
                client: None,
            }),
            transport,
            token_file: None,
        })
    }

    /// A client that presents the token in `path`, read again before each request: a
    /// projected ServiceAccount token is rotated by the kubelet in place. The file must
    /// hold a valid token now (a start-up error otherwise); later, an unreadable or bad
    /// version is logged and the last good token kept.
    pub fn with_token_file(
        address: &str,
        path: &std::path::Path,
        transport: CaTransport,
    ) -> Result<GrpcCa, IdentityError> {
        let text = read_token_text(path).map_err(IdentityError::Ca)?;
        let token = Token::new(&text, &path.display().to_string())
            .map_err(|e| IdentityError::Ca(e.to_string()))?;
        let mut ca = GrpcCa::new(address, Some(&token), transport)?;
        ca.token_file = Some(path.to_owned());
        ca.current.get_mut().unwrap_or_else(|e| e.into_inner()).text = text;
        Ok(ca)
    }

    /// The client for this request: made at the first one, and again (a new connection)
    /// when the token changed.
    fn client(&self) -> Result<CaGrpcClient, IdentityError> {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(path) = &self.token_file {
            match read_token_text(path) {
                Ok(text) if text != cur.text => {
                    match Token::new(&text, &path.display().to_string()) {
                        Ok(t) => {
                            info!(path = %path.display(), "CA token changed; presenting the new one");
                            *cur = Current {
                                text,
                                token: Some(t),
                                client: None,
                            };
                        }
                        Err(e) => warn!(error = %e, "keeping the last good CA token"),
                    }
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "keeping the last good CA token"),
            }
        }
        if let Some(c) = &cur.client {
            return Ok(c.clone());
        }
        let c = CaGrpcClient::new(&self.address, cur.token.as_ref(), &self.transport)
            .map_err(IdentityError::Ca)?;
        cur.client = Some(c.clone());
        Ok(c)
    }
}

/// The token presented now, and the client presenting it (made on first use).
struct Current {
    text: String,
    token: Option<Token>,
    client: Option<CaGrpcClient>,
}

/// Largest token file read (bytes); projected tokens are about 1 KiB.
const MAX_TOKEN_FILE: u64 = 64 << 10;

fn read_token_text(path: &std::path::Path) -> Result<String, String> {
    let shown = path.display();
    let len = std::fs::metadata(path)
        .map_err(|e| format!("{shown}: {e}"))?
        .len();
    if len > MAX_TOKEN_FILE {
        return Err(format!("{shown}: {len} bytes, more than {MAX_TOKEN_FILE}"));
    }
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_owned())
        .map_err(|e| format!("{shown}: {e}"))
}

impl CaClient for GrpcCa {
    fn sign<'a>(
        &'a self,
        id: &'a SpiffeId,
        csr_pem: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<String>, IdentityError>> {
        Box::pin(async move {
            let req = IstioCertificateRequest::new(csr_pem.to_owned(), ttl, &id.to_string());
            let client = self.client()?;
            match client.create_certificate(req).await {
                Ok(r) => Ok(r.cert_chain),
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                    ) =>
                {
                    Err(IdentityError::Denied(format!("CA: {}", s.message())))
                }
                Err(s) => Err(IdentityError::Ca(format!(
                    "{:?}: {}",
                    s.code(),
                    s.message()
                ))),
            }
        })
    }
}

#[derive(Debug, Clone)]
pub struct CertOptions {
    /// Validity asked of the CA.
    pub ttl: Duration,
    pub max_identities: usize,
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl Default for CertOptions {
    fn default() -> Self {
        CertOptions {
            ttl: Duration::from_secs(24 * 3600),
            max_identities: DEFAULT_MAX_IDENTITIES,
            retry_min: DEFAULT_RETRY_MIN,
            retry_max: DEFAULT_RETRY_MAX,
        }
    }
}

/// What `/certs` and `mesh-agent certs` show of a held certificate (never the key).
#[derive(Debug, Clone, Serialize)]
pub struct CertInfo {
    pub identity: String,
    pub serial: String,
    /// RFC 3339, UTC.
    pub not_before: String,
    pub not_after: String,
    /// When the next renewal is due (RFC 3339, UTC).
    pub refresh_at: String,
    /// Seconds until `not_after` (negative: expired).
    pub expires_in_s: i64,
    /// PEM: leaf, intermediates, root.
    pub chain: Vec<String>,
}

type Outcome = Option<Result<Arc<WorkloadCert>, IdentityError>>;

#[derive(Debug)]
struct Held {
    cert: Arc<WorkloadCert>,
    pem: Vec<String>,
    refresh_at: SystemTime,
}

#[derive(Default)]
struct Entry {
    held: Option<Held>,
    /// The CSR in flight for a `get` (single flight).
    inflight: Option<watch::Receiver<Outcome>>,
    rotation: Option<AbortHandle>,
}

#[derive(Default)]
struct State {
    entries: HashMap<SpiffeId, Entry>,
    /// The trust bundle: roots given at start, and the roots of the chains held.
    seed_roots: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
}

impl State {
    fn recompute_roots(&mut self) {
        let mut seen = BTreeSet::new();
        let mut roots = Vec::new();
        let held = self
            .entries
            .values()
            .filter_map(|e| e.held.as_ref())
            .flat_map(|h| h.cert.roots.iter());
        for r in self.seed_roots.iter().chain(held) {
            if seen.insert(r.as_ref().to_vec()) {
                roots.push(r.clone());
            }
        }
        self.roots = roots;
    }
}

struct Inner {
    ca: Arc<dyn CaClient>,
    opts: CertOptions,
    state: Mutex<State>,
    csrs: AtomicU64,
    failures: AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for e in st.entries.values() {
            if let Some(r) = &e.rotation {
                r.abort();
            }
        }
    }
}

/// The certificates of this node's identities (see the module documentation).
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

impl CertManager {
    pub fn new(ca: Arc<dyn CaClient>, opts: CertOptions) -> CertManager {
        CertManager {
            inner: Arc::new(Inner {
                ca,
                opts,
                state: Mutex::default(),
                csrs: AtomicU64::new(0),
                failures: AtomicU64::new(0),
            }),
        }
    }

    /// Roots trusted before any certificate arrives (e.g. the embedded CA's root).
    pub fn with_roots(self, roots: Vec<CertificateDer<'static>>) -> CertManager {
        {
            let mut st = self.inner.lock();
            st.seed_roots = roots;
            st.recompute_roots();
        }
        self
    }

    /// CSRs sent to the CA so far.
    pub fn csrs_sent(&self) -> u64 {
        self.inner.csrs.load(Relaxed)
    }

    /// Failed CA requests so far.
    pub fn failures(&self) -> u64 {
        self.inner.failures.load(Relaxed)
    }

    /// Drops the identities not in `keep` (no longer local), and stops their rotation.
    pub fn retain(&self, keep: &BTreeSet<SpiffeId>) {
        let mut st = self.inner.lock();
        let before = st.entries.len();
        st.entries.retain(|id, e| {
            let k = keep.contains(id);
            if !k {
                if let Some(r) = &e.rotation {
                    r.abort();
                }
            }
            k
        });
        if st.entries.len() != before {
            debug!(
                dropped = before - st.entries.len(),
                "certificates of identities no longer local dropped"
            );
            st.recompute_roots();
        }
    }

    /// Prometheus series: CSRs sent, failed CA requests, certificates held.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let held = self
            .inner
            .lock()
            .entries
            .values()
            .filter(|e| e.held.is_some())
            .count();
        let _ = writeln!(
            out,
            "# HELP mesh_workload_cert_requests_total Certificate signing requests sent to the CA.\n\
             # TYPE mesh_workload_cert_requests_total counter\n\
             mesh_workload_cert_requests_total {}\n\
             # HELP mesh_workload_cert_failures_total CA requests that failed or returned an unusable chain.\n\
             # TYPE mesh_workload_cert_failures_total counter\n\
             mesh_workload_cert_failures_total {}\n\
             # HELP mesh_workload_certs Workload certificates held.\n\
             # TYPE mesh_workload_certs gauge\n\
             mesh_workload_certs {held}",
            self.csrs_sent(),
            self.failures(),
        );
    }

    /// What is held, by identity (no keys).
    pub fn snapshot(&self) -> Vec<CertInfo> {
        let st = self.inner.lock();
        let now = SystemTime::now();
        let mut out: Vec<CertInfo> = st
            .entries
            .iter()
            .filter_map(|(id, e)| {
                let h = e.held.as_ref()?;
                let secs = |t: SystemTime| {
                    t.duration_since(UNIX_EPOCH)
                        .map(|d| d.as_secs() as i64)
                        .unwrap_or(0)
                };
                Some(CertInfo {
                    identity: id.to_string(),
                    serial: h.cert.serial.clone(),
                    not_before: rfc3339(h.cert.not_before),
                    not_after: rfc3339(h.cert.not_after),
                    refresh_at: rfc3339(h.refresh_at),
                    expires_in_s: secs(h.cert.not_after) - secs(now),
                    chain: h.pem.clone(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn valid(st: &State, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        let h = st.entries.get(id)?.held.as_ref()?;
        (h.cert.not_after > SystemTime::now()).then(|| h.cert.clone())
    }

    /// A key, a CSR, the CA, the chain checked.
    async fn fetch(&self, id: &SpiffeId) -> Result<Held, IdentityError> {
        let err = |e: rcgen::Error| IdentityError::Cert(e.to_string());
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = rcgen::string::Ia5String::try_from(id.to_string()).map_err(err)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params
            .serialize_request(&key)
            .map_err(err)?
            .pem()
            .map_err(err)?;
        self.csrs.fetch_add(1, Relaxed);
        let r = match self.ca.sign(id, &csr, self.opts.ttl).await {
            Ok(pem) => parse_chain(id, &key, pem),
            Err(e) => Err(e),
        };
        if r.is_err() {
            self.failures.fetch_add(1, Relaxed);
        }
        r
    }

    fn install(self: &Arc<Self>, id: &SpiffeId, held: Held) {
        let mut st = self.lock();
        let Some(e) = st.entries.get_mut(id) else {
            // Dropped by `retain` meanwhile.
            return;
        };
        info!(%id, serial = %held.cert.serial, not_after = %rfc3339(held.cert.not_after), "workload certificate installed");
        e.held = Some(held);
        if e.rotation.is_none() {
            let task = tokio::spawn(
                rotate(Arc::downgrade(self), id.clone())
                    .instrument(tracing::info_span!("cert_rotation", %id)),
            );
            e.rotation = Some(task.abort_handle());
        }
        st.recompute_roots();
    }
}

/// Renews `id` at its refresh time, for as long as the manager holds it.
async fn rotate(inner: Weak<Inner>, id: SpiffeId) {
    loop {
        let due = {
            let Some(i) = inner.upgrade() else { return };
            let st = i.lock();
            match st.entries.get(&id).and_then(|e| e.held.as_ref()) {
                Some(h) => h.refresh_at,
                None => return,
            }
        };
        let wait = due
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        tokio::time::sleep(wait).await;
        let mut delay = match inner.upgrade() {
            Some(i) => i.opts.retry_min,
            None => return,
        };
        loop {
            let Some(i) = inner.upgrade() else { return };
            match i.fetch(&id).await {
                Ok(h) => {
                    i.install(&id, h);
                    break;
                }
                Err(e) => {
                    let left = {
                        let st = i.lock();
                        Inner::valid(&st, &id).map(|c| {
                            c.not_after
                                .duration_since(SystemTime::now())
                                .unwrap_or_default()
                        })
                    };
                    warn!(%id, error = %e, retry_in = ?delay, valid_for = ?left, "certificate renewal failed; the held certificate serves meanwhile");
                    let max = i.opts.retry_max;
                    drop(i);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(max);
                }
            }
        }
    }
}

impl Certificates for CertManager {
    fn current(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        Inner::valid(&self.inner.lock(), id)
    }

    fn get<'a>(
        &'a self,
        id: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<Arc<WorkloadCert>, IdentityError>> {
        Box::pin(async move {
            let mut rx = {
                let mut st = self.inner.lock();
                if let Some(c) = Inner::valid(&st, id) {
                    return Ok(c);
                }
                let full = st.entries.len() >= self.inner.opts.max_identities;
                if full && !st.entries.contains_key(id) {
                    return Err(IdentityError::Denied(format!(
                        "{id}: this node already holds certificates for {} identities",
                        self.inner.opts.max_identities
                    )));
                }
                let e = st.entries.entry(id.clone()).or_default();
                match &e.inflight {
                    Some(rx) => rx.clone(),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        e.inflight = Some(rx.clone());
                        let inner = self.inner.clone();
                        let id = id.clone();
                        tokio::spawn(
                            async move {
                                let r = inner.fetch(&id).await;
                                let out = match r {
                                    Ok(h) => {
                                        let c = h.cert.clone();
                                        inner.install(&id, h);
                                        Ok(c)
                                    }
                                    Err(e) => {
                                        warn!(%id, error = %e, "no certificate");
                                        Err(e)
                                    }
                                };
                                {
                                    let mut st = inner.lock();
                                    if let Some(e) = st.entries.get_mut(&id) {
                                        e.inflight = None;
                                        // A failure leaves nothing behind to count.
                                        if e.held.is_none() && e.rotation.is_none() {
                                            st.entries.remove(&id);
                                        }
                                    }
                                }
                                let _ = tx.send(Some(out));
                            }
                            .instrument(tracing::info_span!("cert_request")),
                        );
                        rx
                    }
                }
            };
            let out = rx
                .wait_for(Option::is_some)
                .await
                .map_err(|_| IdentityError::Ca("the certificate request was abandoned".into()))?
                .clone();
            out.unwrap_or_else(|| Err(IdentityError::Ca("no outcome".into())))
        })
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.inner.lock().roots.clone()
    }
}

/// Checks what the CA returned against what was asked, and types it.
fn parse_chain(id: &SpiffeId, key: &KeyPair, pem: Vec<String>) -> Result<Held, IdentityError> {
    let bad = |why: String| IdentityError::Cert(format!("the CA's answer for {id}: {why}"));
    let mut ders: Vec<CertificateDer<'static>> = Vec::new();
    for p in &pem {
        for c in CertificateDer::pem_slice_iter(p.as_bytes()) {
            ders.push(c.map_err(|e| bad(format!("bad PEM: {e:?}")))?);
        }
    }
    if ders.len() < 2 {
        return Err(bad(format!(
            "{} certificate(s); expected the leaf and at least the root",
            ders.len()
        )));
    }
    let (_, leaf) =
        x509_parser::parse_x509_certificate(&ders[0]).map_err(|e| bad(format!("leaf: {e}")))?;
    let uris: Vec<String> = leaf
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if uris != [id.to_string()] {
        return Err(bad(format!("the leaf names {uris:?}")));
    }
    if leaf.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(bad("the leaf is not for the key of the CSR".into()));
    }
    let at = |t: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    let not_before = at(leaf.validity().not_before.timestamp());
    let not_after = at(leaf.validity().not_after.timestamp());
    let now = SystemTime::now();
    if not_after <= now {
        return Err(bad("the leaf has expired already".into()));
    }
    let serial = leaf
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<String>();
    let refresh_at = now + not_after.duration_since(now).unwrap_or_default() / 2;
    let n = ders.len();
    let roots = vec![ders[n - 1].clone()];
    ders.truncate(n - 1);
    Ok(Held {
        cert: Arc::new(WorkloadCert {
            id: id.clone(),
            chain: ders,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            roots,
            serial,
            not_before,
            not_after,
        }),
        pem,
        refresh_at,
    })
}

/// (year, month, day) of a count of days since 1970-01-01 (the proleptic Gregorian
/// calendar, by eras of 400 years; Howard Hinnant's algorithm).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    //! Certificate validity is wall-clock time (whole seconds in X.509), so rotation and
    //! expiry are tested with short real lifetimes rather than a paused tokio clock.

    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::control::ca::{Ca, CaOptions, LocalCa, NodeIdentities, Signer};

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
    const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    /// The real embedded CA for node n1 (web and api run there), which can be taken down
    /// and counts what it is asked.
    struct TestCa {
        local: LocalCa,
        up: AtomicBool,
        calls: AtomicU64,
        delay: Duration,
    }

    impl CaClient for TestCa {
        fn sign<'a>(
            &'a self,
            id: &'a SpiffeId,
            csr_pem: &'a str,
            ttl: Duration,
        ) -> BoxFuture<'a, Result<Vec<String>, IdentityError>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Relaxed);
                tokio::time::sleep(self.delay).await;
                if !self.up.load(Relaxed) {
                    return Err(IdentityError::Ca("unavailable (test)".into()));
                }
                self.local.sign(id, csr_pem, ttl).await
            })
        }
    }

    fn test_ca(delay: Duration) -> Arc<TestCa> {
        let nodes = NodeIdentities::default()
            .with("n1", id(WEB))
            .with("n1", id(API))
            .with("n2", id(DB));
        let (_tx, rx) = watch::channel(Arc::new(nodes));
        let ca = Ca::new(
            Signer::generate("cluster.local").unwrap(),
            CaOptions::new("cluster.local"),
            rx,
            None,
        )
        .unwrap();
        Arc::new(TestCa {
            local: LocalCa {
                ca: Arc::new(ca),
                node: "n1".into(),
            },
            up: AtomicBool::new(true),
            calls: AtomicU64::new(0),
            delay,
        })
    }

    fn manager(ca: &Arc<TestCa>, ttl: Duration) -> CertManager {
        CertManager::new(
            ca.clone(),
            CertOptions {
                ttl,
                retry_min: Duration::from_millis(100),
                retry_max: Duration::from_millis(400),
                ..CertOptions::default()
            },
        )
    }

    /// Polls `f` every 50 ms until it holds or `limit` passes.
    async fn until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
        let end = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < end {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        f()
    }

    #[tokio::test]
    async fn concurrent_gets_share_one_csr() {
        let ca = test_ca(Duration::from_millis(200));
        let m = manager(&ca, Duration::from_secs(3600));
        let web = id(WEB);
        let gets = (0..16).map(|_| m.get(&web));
        let certs = futures_util::future::join_all(gets).await;
        assert_eq!(ca.calls.load(Relaxed), 1, "one CSR for 16 concurrent gets");
        assert_eq!(m.csrs_sent(), 1);
        let serials: BTreeSet<String> = certs
            .into_iter()
            .map(|c| c.unwrap().serial.clone())
            .collect();
        assert_eq!(serials.len(), 1);
        // Held now: no CSR for later gets.
        let c = m.get(&web).await.unwrap();
        assert_eq!(ca.calls.load(Relaxed), 1);
        assert_eq!(m.current(&web).unwrap().serial, c.serial);
        // What the proxy needs: the key, the leaf, the root, the times.
        assert_eq!(c.chain.len(), 1, "leaf only: the root is in `roots`");
        assert_eq!(c.roots, vec![ca.local.ca.root().clone()]);
        assert_eq!(m.roots(), c.roots);
        assert!(matches!(c.key, PrivateKeyDer::Pkcs8(_)));
        assert!(c.not_before < SystemTime::now() && c.not_after > SystemTime::now());
        assert!(c.serial.len() >= 2 && c.serial.bytes().all(|b| b.is_ascii_hexdigit()));
        // Each identity its own certificate and key.
        let api = m.get(&id(API)).await.unwrap();
        assert_ne!(api.serial, c.serial);
        assert_ne!(api.key.secret_der(), c.key.secret_der());
        let snap = m.snapshot();
        assert_eq!(snap.len(), 2);
        assert_eq!(snap[1].identity, WEB);
        assert_eq!(snap[1].serial, c.serial);
        assert_eq!(snap[1].chain.len(), 2);
        assert!(snap[1].chain[0].starts_with("-----BEGIN CERTIFICATE-----"));
        let json = serde_json::to_string(&snap).unwrap();
        assert!(!json.contains("PRIVATE"), "no key in the snapshot");
    }

    #[tokio::test]
    async fn refusals_and_bounds() {
        let ca = test_ca(Duration::ZERO);
        let mut m = manager(&ca, Duration::from_secs(3600));
        // db runs on n2, not here.
        let e = m.get(&id(DB)).await.unwrap_err();
        assert!(
            matches!(&e, IdentityError::Denied(m) if m.contains("node n1")),
            "{e:?}"
        );
        assert!(m.current(&id(DB)).is_none());
        assert!(m.snapshot().is_empty(), "a failure holds nothing");
        // At most `max_identities`.
        m = CertManager::new(
            ca.clone(),
            CertOptions {
                max_identities: 1,
                ..CertOptions::default()
            },
        );
        m.get(&id(WEB)).await.unwrap();
        let e = m.get(&id(API)).await.unwrap_err();
        assert!(
            matches!(&e, IdentityError::Denied(m) if m.contains("1 identities")),
            "{e:?}"
        );
        // `retain` drops what is no longer local, and frees room.
        m.retain(&BTreeSet::from([id(API)]));
        assert!(m.current(&id(WEB)).is_none());
        assert!(m.snapshot().is_empty());
        m.get(&id(API)).await.unwrap();
        m.retain(&BTreeSet::from([id(API)]));
        assert!(m.current(&id(API)).is_some());
    }

    #[tokio::test]
    async fn rotates_at_half_life_and_new_handshakes_get_the_new_certificate() {
        let ca = test_ca(Duration::ZERO);
        let m = manager(&ca, Duration::from_secs(4));
        let web = id(WEB);
        let start = std::time::Instant::now();
        let first = m.get(&web).await.unwrap();
        let switched = until(Duration::from_secs(4), || {
            m.current(&web).is_some_and(|c| c.serial != first.serial)
        })
        .await;
        let after = start.elapsed();
        assert!(switched, "no new certificate within the first one's life");
        // Half of a 4 s life (whole seconds: 3 to 4 s), not at once and not at the end.
        assert!(
            after >= Duration::from_millis(1400) && after < Duration::from_millis(3500),
            "{after:?}"
        );
        let second = m.current(&web).unwrap();
        assert!(second.not_after > first.not_after);
        assert_eq!(ca.calls.load(Relaxed), 2);
        // A connection made with the first still holds it, whole.
        assert_eq!(first.chain.len(), 1);
    }

    #[tokio::test]
    async fn ca_outage_keeps_the_valid_certificate_and_retries() {
        let ca = test_ca(Duration::ZERO);
        let m = manager(&ca, Duration::from_secs(4));
        let web = id(WEB);
        let first = m.get(&web).await.unwrap();
        ca.up.store(false, Relaxed);
        // Past the refresh time: renewals fail, the first certificate still serves.
        tokio::time::sleep(Duration::from_millis(2600)).await;
        assert_eq!(m.current(&web).unwrap().serial, first.serial);
        let tries = ca.calls.load(Relaxed);
        assert!(tries >= 3, "retried with back-off: {tries} calls");
        assert!(m.failures() >= 2);
        // The CA is back: a new certificate before the old one expires.
        ca.up.store(true, Relaxed);
        let renewed = until(Duration::from_millis(1000), || {
            m.current(&web).is_some_and(|c| c.serial != first.serial)
        })
        .await;
        assert!(renewed, "no renewal once the CA came back");
    }

    #[tokio::test]
    async fn an_expired_certificate_is_never_returned() {
        let ca = test_ca(Duration::ZERO);
        let m = manager(&ca, Duration::from_secs(2));
        let web = id(WEB);
        let first = m.get(&web).await.unwrap();
        ca.up.store(false, Relaxed);
        let wait = first
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::time::sleep(wait + Duration::from_millis(100)).await;
        assert!(m.current(&web).is_none(), "expired");
        // `get` asks again rather than hand out the expired one.
        let e = m.get(&web).await.unwrap_err();
        assert!(matches!(e, IdentityError::Ca(_)), "{e:?}");
        ca.up.store(true, Relaxed);
        let c = m.get(&web).await.unwrap();
        assert_ne!(c.serial, first.serial);
        assert!(c.not_after > SystemTime::now());
    }

    #[test]
    fn chains_that_do_not_match_the_request_are_refused() {
        let ca = test_ca(Duration::ZERO);
        let key = KeyPair::generate().unwrap();
        let other = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(WEB.try_into().unwrap())];
        let csr = p.serialize_request(&other).unwrap().pem().unwrap();
        let chain = ca.local.ca.sign_for_node("n1", &csr, None, None).unwrap();
        // Signed for another key.
        let e = parse_chain(&id(WEB), &key, chain.clone()).unwrap_err();
        assert!(e.to_string().contains("not for the key"), "{e}");
        // For another identity.
        let e = parse_chain(&id(API), &other, chain.clone()).unwrap_err();
        assert!(e.to_string().contains("the leaf names"), "{e}");
        // Without a root.
        let e = parse_chain(&id(WEB), &other, chain[..1].to_vec()).unwrap_err();
        assert!(e.to_string().contains("1 certificate"), "{e}");
        assert!(parse_chain(&id(WEB), &other, chain).is_ok());
    }

    #[test]
    fn the_ca_transport_is_tls_unless_plaintext_is_asked_for() {
        let dir = std::env::temp_dir().join(format!("mesh-ca-transport-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let root = dir.join("root.pem");
        let ca = Signer::generate("cluster.local").unwrap();
        std::fs::write(&root, crate::control::ca::pem_of(ca.root())).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let t = ca_transport("https://10.0.0.1:15012", Some(&root), None, false).unwrap();
        assert!(
            matches!(&t, CaTransport::Tls { server_name, .. } if server_name.to_str() == "10.0.0.1")
        );
        let t = ca_transport(
            "https://10.0.0.1:15012",
            Some(&root),
            Some("istiod.istio-system.svc"),
            false,
        )
        .unwrap();
        assert!(
            matches!(&t, CaTransport::Tls { server_name, .. } if server_name.to_str() == "istiod.istio-system.svc")
        );
        let err = |r: Result<CaTransport, IdentityError>| r.unwrap_err().to_string();
        assert!(
            err(ca_transport("http://10.0.0.1:15010", None, None, false))
                .contains("--ca-plaintext")
        );
        assert!(matches!(
            ca_transport("http://10.0.0.1:15010", None, None, true),
            Ok(CaTransport::Plaintext)
        ));
        assert!(err(ca_transport("https://ca:15012", None, None, false)).contains("--ca-root-cert"));
        assert!(
            err(ca_transport("https://ca:15012", Some(&empty), None, false))
                .contains("no PEM certificate")
        );
        assert!(err(ca_transport(
            "https://ca:15012",
            Some(&dir.join("missing")),
            None,
            false
        ))
        .contains("missing"));
        assert!(
            err(ca_transport("ftp://ca", Some(&root), None, false)).contains("expected https://")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn times_print_as_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661)),
            "2000-02-29T01:01:01Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_798_761_599)),
            "2026-12-31T23:59:59Z"
        );
    }
}
