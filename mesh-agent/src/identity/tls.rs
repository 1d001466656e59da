//! rustls configurations for mesh mTLS (see `identity`): TLS 1.3 only, ALPN `h2`, the
//! ring provider, certificates and roots read from `Certificates` at each handshake.
//!
//! Nothing here is rebuilt when a certificate or the trust roots rotate: the resolvers ask
//! `Certificates::current` at every handshake (a rotated certificate serves the next one),
//! and the verifiers rebuild their webpki state when `Certificates::roots` returns other
//! roots than last time (compared byte for byte: a CA rotation takes effect at the next
//! handshake). Connections already up keep what they negotiated.
//!
//! Session resumption is off on both sides: a resumed TLS 1.3 session skips the
//! certificate check, so a ticket issued for one expected identity could otherwise open a
//! connection the verifier of another would refuse, and the peer's certificate (its
//! serial, its identity) would be the one of the first handshake.

use std::{
    fmt,
    sync::{Arc, Mutex},
};

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        ResolvesClientCert, Resumption,
    },
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ClientHello, NoServerSessionStorage, ParsedCertificate, ResolvesServerCert,
        WebPkiClientVerifier,
    },
    sign::CertifiedKey,
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};

use super::{Certificates, IdentityError, SpiffeId, WorkloadCert};

/// The one application protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// The server name the client puts in its handshake. The peer is checked against the
/// SPIFFE ID the client expects, never against a DNS name; SNI is not sent.
pub const HBONE_SERVER_NAME: &str = "hbone.mesh.invalid";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("building the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The mTLS configurations of the node's identities, over one `Certificates`.
pub struct MeshTls {
    certs: Arc<dyn Certificates>,
    provider: Arc<CryptoProvider>,
    roots: Arc<RootsCache>,
}

impl fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshTls").finish_non_exhaustive()
    }
}

impl MeshTls {
    pub fn new(certs: Arc<dyn Certificates>) -> Arc<MeshTls> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(MeshTls {
            roots: Arc::new(RootsCache {
                certs: certs.clone(),
                provider: provider.clone(),
                cached: Mutex::new(None),
            }),
            certs,
            provider,
        })
    }

    pub fn certificates(&self) -> &Arc<dyn Certificates> {
        &self.certs
    }

    /// The server side for `local`: presents `local`'s current certificate, requires a
    /// client certificate chained to the current roots with exactly one SPIFFE URI SAN.
    /// Call `Certificates::get(local)` once before serving: the resolver cannot wait for a
    /// CA, it takes the certificate held (a handshake without one fails).
    pub fn server_config(&self, local: &SpiffeId) -> Result<Arc<ServerConfig>, TlsError> {
        let mut c = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier {
                roots: self.roots.clone(),
            }))
            .with_cert_resolver(Arc::new(LocalCert::new(self, local)));
        c.alpn_protocols = vec![ALPN_H2.to_vec()];
        c.session_storage = Arc::new(NoServerSessionStorage {});
        c.send_tls13_tickets = 0;
        Ok(Arc::new(c))
    }

    /// The client side from `local` to a peer that must present `expected`: the
    /// certificate of `local`, and a server chain valid to the current roots whose leaf's
    /// only SPIFFE URI SAN is `expected` exactly.
    pub fn client_config(
        &self,
        local: &SpiffeId,
        expected: &SpiffeId,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let mut c = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                roots: self.roots.clone(),
                expected: expected.clone(),
            }))
            .with_client_cert_resolver(Arc::new(LocalCert::new(self, local)));
        c.alpn_protocols = vec![ALPN_H2.to_vec()];
        c.resumption = Resumption::disabled();
        c.enable_sni = false;
        Ok(Arc::new(c))
    }
}

/// The fixed server name clients connect with (see `HBONE_SERVER_NAME`).
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(HBONE_SERVER_NAME).expect("a valid DNS name")
}

/// The SPIFFE ID of the peer's leaf certificate, once the handshake is done (the
/// verifiers have refused any leaf without exactly one).
pub fn peer_identity(state: &CommonState) -> Option<SpiffeId> {
    let leaf = state.peer_certificates()?.first()?;
    spiffe_id_of(leaf).ok()
}

/// The one SPIFFE ID in a certificate's URI SANs; none or several is an error.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, IdentityError> {
    let bad = |why: &str| IdentityError::Cert(why.to_string());
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| bad(&format!("unparsable certificate: {e}")))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| bad(&format!("bad subjectAltName: {e}")))?
        .ok_or_else(|| bad("no subjectAltName, so no SPIFFE ID"))?;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u)
            if u.len() >= 9 && u[..9].eq_ignore_ascii_case("spiffe://") =>
        {
            Some(*u)
        }
        _ => None,
    });
    match (ids.next(), ids.next()) {
        (Some(id), None) => id.parse(),
        (None, _) => Err(bad("no SPIFFE URI SAN")),
        (Some(_), Some(_)) => Err(bad("several SPIFFE URI SANs")),
    }
}

fn refuse(e: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The webpki state for the current roots, rebuilt when they change.
struct RootsCache {
    certs: Arc<dyn Certificates>,
    provider: Arc<CryptoProvider>,
    cached: Mutex<Option<Arc<Roots>>>,
}

struct Roots {
    der: Vec<CertificateDer<'static>>,
    store: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

impl RootsCache {
    fn current(&self) -> Result<Arc<Roots>, rustls::Error> {
        let der = self.certs.roots();
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = cached.as_ref().filter(|r| r.der == der) {
            return Ok(r.clone());
        }
        let mut store = RootCertStore::empty();
        let (_added, ignored) = store.add_parsable_certificates(der.iter().cloned());
        if ignored > 0 {
            tracing::warn!(
                ignored,
                "trust roots the TLS stack cannot use were left out"
            );
        }
        if store.is_empty() {
            return Err(refuse(IdentityError::Cert(
                "no usable trust roots (has the CA been reached?)".into(),
            )));
        }
        let store = Arc::new(store);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(store.clone(), self.provider.clone())
                .build()
                .map_err(|e| refuse(IdentityError::Cert(format!("client verifier: {e}"))))?;
        let r = Arc::new(Roots {
            der,
            store,
            client_verifier,
        });
        *cached = Some(r.clone());
        Ok(r)
    }
}

/// The server side's check of client certificates: webpki (chain, time, signatures,
/// clientAuth usage) to the current roots, and exactly one SPIFFE ID.
struct SpiffeClientVerifier {
    roots: Arc<RootsCache>,
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SpiffeClientVerifier")
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The roots change under us; clients send their one certificate anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let roots = self.roots.current()?;
        roots
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        spiffe_id_of(end_entity).map_err(refuse)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.roots.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.roots.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.roots
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The client side's check of the server: webpki (chain, time, signatures, serverAuth
/// usage) to the current roots, the DNS name ignored, and the leaf's one SPIFFE ID equal
/// to the expected one.
struct SpiffeServerVerifier {
    roots: Arc<RootsCache>,
    expected: SpiffeId,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("expected", &self.expected.to_string())
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = self.roots.current()?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots.store,
            intermediates,
            now,
            self.roots.provider.signature_verification_algorithms.all,
        )?;
        let got = spiffe_id_of(end_entity).map_err(refuse)?;
        if got != self.expected {
            return Err(refuse(IdentityError::Denied(format!(
                "the server is {got}, expected {}",
                self.expected
            ))));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.roots.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.roots.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.roots
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The current certificate of one local identity, for either side of a handshake; the
/// signing key is loaded once per certificate.
struct LocalCert {
    certs: Arc<dyn Certificates>,
    provider: Arc<CryptoProvider>,
    id: SpiffeId,
    loaded: Mutex<Option<(Arc<WorkloadCert>, Arc<CertifiedKey>)>>,
}

impl fmt::Debug for LocalCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCert")
            .field("id", &self.id.to_string())
            .finish_non_exhaustive()
    }
}

impl LocalCert {
    fn new(tls: &MeshTls, id: &SpiffeId) -> LocalCert {
        LocalCert {
            certs: tls.certs.clone(),
            provider: tls.provider.clone(),
            id: id.clone(),
            loaded: Mutex::new(None),
        }
    }

    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let Some(cert) = self.certs.current(&self.id) else {
            tracing::warn!(id = %self.id, "no certificate held for the local identity");
            return None;
        };
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((held, key)) = loaded.as_ref() {
            if Arc::ptr_eq(held, &cert) {
                return Some(key.clone());
            }
        }
        let key = match self
            .provider
            .key_provider
            .load_private_key(cert.key.clone_key())
        {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(id = %self.id, error = %e, "unusable private key");
                return None;
            }
        };
        let ck = Arc::new(CertifiedKey::new(cert.chain.clone(), key));
        *loaded = Some((cert, ck.clone()));
        Some(ck)
    }
}

impl ResolvesServerCert for LocalCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for LocalCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A test CA and a test `Certificates` (shared by the tests of `proxy::hbone`).
#[cfg(test)]
pub mod testing {
    use std::{
        collections::HashMap,
        sync::{
            atomic::{AtomicU64, Ordering::Relaxed},
            Arc, Mutex,
        },
        time::{Duration, SystemTime},
    };

    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose, SanType, SerialNumber,
    };
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    use crate::identity::{BoxFuture, Certificates, IdentityError, SpiffeId, WorkloadCert};

    static SERIAL: AtomicU64 = AtomicU64::new(1);

    pub struct TestCa {
        pub root: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    }

    impl TestCa {
        pub fn new(name: &str) -> TestCa {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name
                .push(rcgen::DnType::CommonName, format!("test root {name}"));
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate().unwrap();
            let root = p.self_signed(&key).unwrap().der().clone();
            TestCa {
                root,
                issuer: Issuer::new(p, key),
            }
        }

        /// A leaf with the given URI SANs; `expired` puts its validity in the past.
        pub fn leaf_with(&self, id: &SpiffeId, uris: &[&str], expired: bool) -> WorkloadCert {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.subject_alt_names = uris
                .iter()
                .map(|u| SanType::URI(rcgen::string::Ia5String::try_from(*u).unwrap()))
                .collect();
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            let n = SERIAL.fetch_add(1, Relaxed);
            let mut serial = vec![0x10];
            serial.extend_from_slice(&n.to_be_bytes());
            p.serial_number = Some(SerialNumber::from_slice(&serial));
            let now = SystemTime::now();
            let (nb, na) = if expired {
                (
                    now - Duration::from_secs(7200),
                    now - Duration::from_secs(3600),
                )
            } else {
                (
                    now - Duration::from_secs(60),
                    now + Duration::from_secs(3600),
                )
            };
            p.not_before = nb.into();
            p.not_after = na.into();
            let key = KeyPair::generate().unwrap();
            let der = p.signed_by(&key, &self.issuer).unwrap().der().clone();
            WorkloadCert {
                id: id.clone(),
                chain: vec![der],
                key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
                roots: vec![self.root.clone()],
                serial: serial.iter().map(|b| format!("{b:02X}")).collect(),
                not_before: nb,
                not_after: na,
            }
        }

        pub fn leaf(&self, id: &SpiffeId) -> WorkloadCert {
            self.leaf_with(id, &[&id.to_string()], false)
        }
    }

    /// Certificates held in a map the test edits; roots set by the test.
    pub struct TestCerts {
        pub held: Mutex<HashMap<SpiffeId, Arc<WorkloadCert>>>,
        pub roots: Mutex<Vec<CertificateDer<'static>>>,
    }

    impl TestCerts {
        pub fn new(roots: Vec<CertificateDer<'static>>) -> Arc<TestCerts> {
            Arc::new(TestCerts {
                held: Mutex::new(HashMap::new()),
                roots: Mutex::new(roots),
            })
        }

        pub fn put(&self, cert: WorkloadCert) -> Arc<WorkloadCert> {
            let c = Arc::new(cert);
            self.held.lock().unwrap().insert(c.id.clone(), c.clone());
            c
        }
    }

    impl Certificates for TestCerts {
        fn current(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
            self.held.lock().unwrap().get(id).cloned()
        }

        fn get<'a>(
            &'a self,
            id: &'a SpiffeId,
        ) -> BoxFuture<'a, Result<Arc<WorkloadCert>, IdentityError>> {
            let c = self.current(id);
            Box::pin(async move { c.ok_or_else(|| IdentityError::Ca(format!("no cert for {id}"))) })
        }

        fn roots(&self) -> Vec<CertificateDer<'static>> {
            self.roots.lock().unwrap().clone()
        }
    }

    pub fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", sa).unwrap()
    }

    /// The serial of a DER certificate, in `WorkloadCert::serial`'s format.
    pub fn serial_of(der: &[u8]) -> String {
        let (_, x) = x509_parser::parse_x509_certificate(der).unwrap();
        x.tbs_certificate
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::{testing::*, *};

    /// One handshake over loopback; (client result, server result with the peer's ID).
    async fn handshake(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
    ) -> (Result<String, String>, Result<Option<SpiffeId>, String>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let srv = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            match TlsAcceptor::from(server).accept(s).await {
                Ok(mut t) => {
                    let id = peer_identity(t.get_ref().1);
                    let _ = t.write_all(b"x").await;
                    let _ = t.shutdown().await;
                    Ok(id)
                }
                Err(e) => Err(e.to_string()),
            }
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let cli = match TlsConnector::from(client).connect(server_name(), tcp).await {
            Ok(mut t) => {
                let serial = serial_of(t.get_ref().1.peer_certificates().unwrap()[0].as_ref());
                // A TLS 1.3 client learns that the server refused its certificate only
                // when it reads.
                let mut b = [0u8; 1];
                match t.read_exact(&mut b).await {
                    Ok(_) => Ok(serial),
                    Err(e) => Err(e.to_string()),
                }
            }
            Err(e) => Err(e.to_string()),
        };
        (cli, srv.await.unwrap())
    }

    struct Setup {
        ca: TestCa,
        certs: Arc<TestCerts>,
        tls: Arc<MeshTls>,
    }

    fn setup() -> Setup {
        let ca = TestCa::new("a");
        let certs = TestCerts::new(vec![ca.root.clone()]);
        certs.put(ca.leaf(&id("client")));
        certs.put(ca.leaf(&id("server")));
        let tls = MeshTls::new(certs.clone());
        Setup { ca, certs, tls }
    }

    #[tokio::test]
    async fn mutual_tls_with_the_expected_identities() {
        let s = setup();
        let (c, srv) = handshake(
            s.tls.client_config(&id("client"), &id("server")).unwrap(),
            s.tls.server_config(&id("server")).unwrap(),
        )
        .await;
        let serial = c.unwrap();
        assert_eq!(serial, s.certs.current(&id("server")).unwrap().serial);
        assert_eq!(srv.unwrap(), Some(id("client")));
    }

    #[tokio::test]
    async fn the_client_refuses_a_valid_certificate_of_another_identity() {
        let s = setup();
        let (c, srv) = handshake(
            s.tls.client_config(&id("client"), &id("db")).unwrap(),
            s.tls.server_config(&id("server")).unwrap(),
        )
        .await;
        let e = c.unwrap_err();
        assert!(
            e.contains("expected spiffe://cluster.local/ns/default/sa/db"),
            "{e}"
        );
        assert!(srv.is_err());
    }

    #[tokio::test]
    async fn expired_certificates_are_refused_both_ways() {
        let s = setup();
        s.certs
            .put(s.ca.leaf_with(&id("server"), &[&id("server").to_string()], true));
        let (c, _) = handshake(
            s.tls.client_config(&id("client"), &id("server")).unwrap(),
            s.tls.server_config(&id("server")).unwrap(),
        )
        .await;
        assert!(c.unwrap_err().to_lowercase().contains("expired"));

        let s = setup();
        s.certs
            .put(s.ca.leaf_with(&id("client"), &[&id("client").to_string()], true));
        let (c, srv) = handshake(
            s.tls.client_config(&id("client"), &id("server")).unwrap(),
            s.tls.server_config(&id("server")).unwrap(),
        )
        .await;
        assert!(c.is_err());
        assert!(srv.unwrap_err().to_lowercase().contains("expired"));
    }

    #[tokio::test]
    async fn a_foreign_root_is_refused_both_ways() {
        let s = setup();
        let other = TestCa::new("b");
        s.certs.put(other.leaf(&id("server")));
        let (c, _) = handshake(
            s.tls.client_config(&id("client"), &id("server")).unwrap(),
            s.tls.server_config(&id("server")).unwrap(),
        )
        .await;
        assert!(c.unwrap_err().contains("UnknownIssuer"));

        let s = setup();
        s.certs.put(other.leaf(&id("client")));
        let (c, srv) = handshake(
            s.tls.client_config(&id("client"), &id("server")).unwrap(),
            s.tls.server_config(&id("server")).unwrap(),
        )
        .await;
        assert!(c.is_err());
        assert!(srv.unwrap_err().contains("UnknownIssuer"));
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_is_refused() {
        let s = setup();
        s.certs.held.lock().unwrap().remove(&id("client"));
        let (c, srv) = handshake(
            s.tls.client_config(&id("client"), &id("server")).unwrap(),
            s.tls.server_config(&id("server")).unwrap(),
        )
        .await;
        assert!(c.is_err());
        let e = srv.unwrap_err();
        assert!(
            e.contains("NoCertificatesPresented") || e.contains("certificate"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn certificates_without_exactly_one_spiffe_id_are_refused() {
        let s = setup();
        let server = id("server").to_string();
        for uris in [
            vec![],
            vec![server.as_str(), "spiffe://cluster.local/ns/x/sa/y"],
        ] {
            s.certs.put(s.ca.leaf_with(&id("server"), &uris, false));
            let (c, _) = handshake(
                s.tls.client_config(&id("client"), &id("server")).unwrap(),
                s.tls.server_config(&id("server")).unwrap(),
            )
            .await;
            assert!(c.unwrap_err().contains("SPIFFE"), "{uris:?}");
        }
    }

    #[tokio::test]
    async fn rotation_of_certificates_and_roots_applies_to_the_next_handshake() {
        let s = setup();
        let client = s.tls.client_config(&id("client"), &id("server")).unwrap();
        let server = s.tls.server_config(&id("server")).unwrap();
        let first = handshake(client.clone(), server.clone()).await.0.unwrap();
        let new = s.certs.put(s.ca.leaf(&id("server")));
        let second = handshake(client.clone(), server.clone()).await.0.unwrap();
        assert_ne!(first, second);
        assert_eq!(second, new.serial);

        // CA rotation: both roots during the overlap, then the new one only.
        let b = TestCa::new("b");
        s.certs.roots.lock().unwrap().push(b.root.clone());
        s.certs.put(b.leaf(&id("server")));
        handshake(client.clone(), server.clone()).await.0.unwrap();
        *s.certs.roots.lock().unwrap() = vec![b.root.clone()];
        let (c, srv) = handshake(client.clone(), server.clone()).await;
        assert!(
            c.is_err(),
            "the client's certificate is from the retired root"
        );
        assert!(srv.unwrap_err().contains("UnknownIssuer"));
        s.certs.put(b.leaf(&id("client")));
        handshake(client, server).await.0.unwrap();
    }
}
