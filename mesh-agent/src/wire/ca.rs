//! Istio's `IstioCertificateService` (package `istio.v1.auth`), wire-compatible with
//! istiod's CA and ztunnel's client: the messages, the method path, a prost codec, the
//! server plumbing (any `IstioCertificateService` implementation becomes a tonic service
//! served on the CA's TLS endpoint) and a client (TLS or, opted in, plaintext).
//! Hand-written with tonic's `server::Grpc::unary` and `client::Grpc::unary`: one unary
//! method does not pay for build-time codegen.
//!
//! ```text
//! service IstioCertificateService {
//!   rpc CreateCertificate(IstioCertificateRequest) returns (IstioCertificateResponse);
//! }
//! message IstioCertificateRequest {
//!   string csr = 1;                       // PEM
//!   int64 validity_duration = 3;          // seconds
//!   google.protobuf.Struct metadata = 4;  // "ImpersonatedIdentity": the SPIFFE ID asked for
//! }
//! message IstioCertificateResponse { repeated string cert_chain = 1; } // PEM, leaf first
//! ```

use std::{
    collections::BTreeMap,
    convert::Infallible,
    future::Future,
    marker::PhantomData,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use prost::Message;
use rustls::pki_types::{CertificateDer, ServerName};
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    Request, Response, Status,
};

use super::{Credentials, Token};

/// The gRPC service name.
pub const SERVICE_NAME: &str = "istio.v1.auth.IstioCertificateService";
/// The one method's path.
pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// The metadata field a node agent names the identity it asks for in (Istio's key).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// Largest request the server decodes (bytes): a CSR is under 1 KiB; anything near this is
/// not a CSR (`RESOURCE_EXHAUSTED` before it is buffered whole).
pub const MAX_REQUEST_BYTES: usize = 64 << 10;
/// Largest response the client decodes (bytes): a chain of a few certificates.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

#[derive(Clone, PartialEq, Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded certificate signing request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested validity, in seconds (0: the CA's default).
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<Struct>,
}

#[derive(Clone, PartialEq, Message)]
pub struct IstioCertificateResponse {
    /// PEM certificates: the leaf, the intermediates, the root last.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// `google.protobuf.Struct`, the part Istio uses (string values; numbers and booleans
/// decode too, nested structs and lists are skipped as unknown fields).
#[derive(Clone, PartialEq, Message)]
pub struct Struct {
    #[prost(btree_map = "string, message", tag = "1")]
    pub fields: BTreeMap<String, Value>,
}

/// `google.protobuf.Value`, without `struct_value` (5) and `list_value` (6).
#[derive(Clone, PartialEq, Message)]
pub struct Value {
    #[prost(oneof = "value::Kind", tags = "1, 2, 3, 4")]
    pub kind: Option<value::Kind>,
}

pub mod value {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        /// `google.protobuf.NullValue` (always 0).
        #[prost(int32, tag = "1")]
        NullValue(i32),
        #[prost(double, tag = "2")]
        NumberValue(f64),
        #[prost(string, tag = "3")]
        StringValue(String),
        #[prost(bool, tag = "4")]
        BoolValue(bool),
    }
}

impl IstioCertificateRequest {
    /// A request for `identity` (sent as `ImpersonatedIdentity`, as a node agent does).
    pub fn new(csr: String, validity: Duration, identity: &str) -> IstioCertificateRequest {
        let mut fields = BTreeMap::new();
        fields.insert(
            IMPERSONATED_IDENTITY.to_owned(),
            Value {
                kind: Some(value::Kind::StringValue(identity.to_owned())),
            },
        );
        IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(validity.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(Struct { fields }),
        }
    }

    /// The `ImpersonatedIdentity` metadata field, if it is a string.
    pub fn impersonated_identity(&self) -> Option<&str> {
        match self
            .metadata
            .as_ref()?
            .fields
            .get(IMPERSONATED_IDENTITY)?
            .kind
            .as_ref()?
        {
            value::Kind::StringValue(s) => Some(s),
            _ => None,
        }
    }
}

/// A prost codec (what `tonic-prost` provides, in the few lines this service needs).
pub struct ProstCodec<E, D>(PhantomData<fn(E) -> D>);

impl<E, D> Default for ProstCodec<E, D> {
    fn default() -> Self {
        ProstCodec(PhantomData)
    }
}

pub struct ProstEncoder<E>(PhantomData<fn(E)>);
pub struct ProstDecoder<D>(PhantomData<fn() -> D>);

impl<E, D> Codec for ProstCodec<E, D>
where
    E: Message + Send + 'static,
    D: Message + Default + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = ProstEncoder<E>;
    type Decoder = ProstDecoder<D>;
    fn encoder(&mut self) -> ProstEncoder<E> {
        ProstEncoder(PhantomData)
    }
    fn decoder(&mut self) -> ProstDecoder<D> {
        ProstDecoder(PhantomData)
    }
}

impl<E: Message> Encoder for ProstEncoder<E> {
    type Item = E;
    type Error = Status;
    fn encode(&mut self, item: E, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding a message: {e}")))
    }
}

impl<D: Message + Default> Decoder for ProstDecoder<D> {
    type Item = D;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
        D::decode(src)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("decoding a message: {e}")))
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a CA implements to be served (`IstioCertificateServiceServer`).
pub trait IstioCertificateService: Send + Sync + 'static {
    fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> BoxFuture<'_, Result<Response<IstioCertificateResponse>, Status>>;
}

/// The tonic service: mount it with `Server::add_service` (the CA's TLS endpoint, `control::ca::tls`).
pub struct IstioCertificateServiceServer<T> {
    inner: Arc<T>,
}

impl<T> IstioCertificateServiceServer<T> {
    pub fn new(inner: Arc<T>) -> Self {
        IstioCertificateServiceServer { inner }
    }
}

impl<T> Clone for IstioCertificateServiceServer<T> {
    fn clone(&self) -> Self {
        IstioCertificateServiceServer {
            inner: self.inner.clone(),
        }
    }
}

impl<T> tonic::server::NamedService for IstioCertificateServiceServer<T> {
    const NAME: &'static str = SERVICE_NAME;
}

struct CreateCertificateSvc<T>(Arc<T>);

impl<T: IstioCertificateService> tonic::server::UnaryService<IstioCertificateRequest>
    for CreateCertificateSvc<T>
{
    type Response = IstioCertificateResponse;
    type Future = BoxFuture<'static, Result<Response<IstioCertificateResponse>, Status>>;
    fn call(&mut self, request: Request<IstioCertificateRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.create_certificate(request).await })
    }
}

impl<T, B> tonic::codegen::Service<http::Request<B>> for IstioCertificateServiceServer<T>
where
    T: IstioCertificateService,
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != CREATE_CERTIFICATE {
            return Box::pin(async {
                let mut response = http::Response::new(tonic::body::Body::default());
                let headers = response.headers_mut();
                headers.insert(
                    Status::GRPC_STATUS,
                    (tonic::Code::Unimplemented as i32).into(),
                );
                headers.insert(
                    http::header::CONTENT_TYPE,
                    tonic::metadata::GRPC_CONTENT_TYPE,
                );
                Ok(response)
            });
        }
        let svc = CreateCertificateSvc(self.inner.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<
                IstioCertificateResponse,
                IstioCertificateRequest,
            >::default())
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_RESPONSE_BYTES);
            Ok(grpc.unary(svc, req).await)
        })
    }
}

type Channel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Credentials>;

/// How a `CaGrpcClient` reaches its CA.
#[derive(Clone)]
pub enum CaTransport {
    /// `http://`: plaintext gRPC. The bearer token crosses the network in the clear; only
    /// with an explicit opt-in (`--ca-plaintext`).
    Plaintext,
    /// `https://`: gRPC in TLS (ALPN `h2`), the server's chain checked against the
    /// configured roots for `server_name` (istiod's 15012, or an agent's `--ca-listen`).
    Tls {
        config: Arc<rustls::ClientConfig>,
        server_name: ServerName<'static>,
    },
}

impl std::fmt::Debug for CaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CaTransport::Plaintext => f.write_str("Plaintext"),
            CaTransport::Tls { server_name, .. } => {
                write!(f, "Tls({})", server_name.to_str())
            }
        }
    }
}

/// A TLS client configuration for a CA: trusts exactly `roots` (not the system's), TLS 1.2
/// or 1.3 (istiod's Go server speaks both), ALPN `h2` (gRPC; grpc-go refuses a TLS client
/// without it).
pub fn client_tls_config(
    roots: &[CertificateDer<'static>],
) -> Result<rustls::ClientConfig, String> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store
            .add(r.clone())
            .map_err(|e| format!("a root certificate the CA's TLS cannot use: {e}"))?;
    }
    if store.is_empty() {
        return Err("no root certificate to check the CA's TLS certificate against".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Dials the CA and does the TLS handshake (tonic's own TLS features stay off: one TLS
/// stack, rustls with ring, configured here).
#[derive(Clone)]
struct TlsConnector {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl tower::Service<http::Uri> for TlsConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = BoxFuture<'static, Result<Self::Response, std::io::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let bad =
                |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, why.to_owned());
            let host = uri
                .host()
                .ok_or_else(|| bad("the CA address has no host"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(443);
            let dial = async {
                let tcp = tokio::net::TcpStream::connect((host, port)).await?;
                let _ = tcp.set_nodelay(true);
                tokio_rustls::TlsConnector::from(this.config)
                    .connect(this.server_name, tcp)
                    .await
                    .map_err(|e| {
                        std::io::Error::new(e.kind(), format!("TLS handshake with the CA: {e}"))
                    })
            };
            let tls = tokio::time::timeout(CLIENT_TIMEOUT, dial)
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connecting to the CA: no TLS session within {CLIENT_TIMEOUT:?}"),
                    )
                })??;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// A client of any `IstioCertificateService` (`https://host:port` over TLS, or
/// `http://host:port` in plaintext), that presents a bearer token with each call. Cheap to
/// clone; connects lazily and reconnects.
#[derive(Clone)]
pub struct CaGrpcClient {
    grpc: tonic::client::Grpc<Channel>,
}

/// How long one CSR may take (connect included).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

impl CaGrpcClient {
    /// Checks that `address` is one this transport can use (`https://` with TLS,
    /// `http://` with `Plaintext`), without connecting or needing a runtime.
    pub fn check(
        address: &str,
        transport: &CaTransport,
    ) -> Result<tonic::transport::Endpoint, String> {
        let endpoint = tonic::transport::Endpoint::from_shared(address.to_owned())
            .map_err(|e| format!("CA address {address:?}: {e}"))?;
        match (transport, endpoint.uri().scheme_str()) {
            (CaTransport::Plaintext, Some("http")) | (CaTransport::Tls { .. }, Some("https")) => {
                Ok(endpoint)
            }
            (CaTransport::Plaintext, _) => Err(format!(
                "CA address {address:?}: plaintext is for http:// addresses only"
            )),
            (CaTransport::Tls { .. }, _) => Err(format!(
                "CA address {address:?}: TLS is for https:// addresses only"
            )),
        }
    }

    /// The address's scheme must match the transport: `https://` with TLS, `http://`
    /// with `Plaintext`. Must be called within a Tokio runtime (the channel's worker is
    /// spawned there); it connects lazily.
    pub fn new(
        address: &str,
        token: Option<&Token>,
        transport: &CaTransport,
    ) -> Result<CaGrpcClient, String> {
        let endpoint = CaGrpcClient::check(address, transport)?
            .timeout(CLIENT_TIMEOUT)
            .tcp_nodelay(true);
        let scheme = endpoint.uri().scheme_str().unwrap_or_default().to_owned();
        let channel = match (transport, scheme.as_str()) {
            (CaTransport::Plaintext, "http") => {
                endpoint.connect_timeout(CLIENT_TIMEOUT).connect_lazy()
            }
            // The connector bounds its own connect and handshake (tonic's connect timeout
            // wraps a custom connector in a timer that needs a runtime at construction).
            (
                CaTransport::Tls {
                    config,
                    server_name,
                },
                "https",
            ) => endpoint.connect_with_connector_lazy(TlsConnector {
                config: config.clone(),
                server_name: server_name.clone(),
            }),
            (CaTransport::Plaintext, _) => {
                return Err(format!(
                    "CA address {address:?}: plaintext is for http:// addresses only"
                ))
            }
            (CaTransport::Tls { .. }, _) => {
                return Err(format!(
                    "CA address {address:?}: TLS is for https:// addresses only"
                ))
            }
        };
        let channel = tonic::service::interceptor::InterceptedService::new(
            channel,
            Credentials::bearer(token),
        );
        Ok(CaGrpcClient {
            grpc: tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES),
        })
    }

    pub async fn create_certificate(
        &self,
        request: IstioCertificateRequest,
    ) -> Result<IstioCertificateResponse, Status> {
        let mut grpc = self.grpc.clone();
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("CA connection: {e}")))?;
        grpc.unary(
            Request::new(request),
            http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE),
            ProstCodec::<IstioCertificateRequest, IstioCertificateResponse>::default(),
        )
        .await
        .map(Response::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_carries_the_impersonated_identity_and_round_trips() {
        let r = IstioCertificateRequest::new(
            "-----BEGIN CERTIFICATE REQUEST-----".into(),
            Duration::from_secs(3600),
            "spiffe://cluster.local/ns/a/sa/b",
        );
        let bytes = r.encode_to_vec();
        let back = IstioCertificateRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.validity_duration, 3600);
        assert_eq!(
            back.impersonated_identity(),
            Some("spiffe://cluster.local/ns/a/sa/b")
        );
        // Field numbers as Istio's proto: csr 1 (0x0a), validity 3 (0x18), metadata 4 (0x22).
        assert_eq!(bytes[0], 0x0a);
        assert!(bytes.contains(&0x18) && bytes.contains(&0x22));
        // A Struct with a nested struct value (tag 5) decodes; the field is skipped.
        let nested = [0x0a, 0x07, 0x0a, 0x01, b'k', 0x12, 0x02, 0x2a, 0x00];
        let s = Struct::decode(&nested[..]).unwrap();
        assert_eq!(s.fields["k"].kind, None);
    }
}
