//! The embedded control plane: an ADS server (state-of-the-world and delta) serving
//! Envoy v3 resources from a snapshot that the translator rebuilds when the standalone
//! file changes. Any xDS client can use it: our own proxy, Envoy, gRPC.
//!
//! Protocol choices (Envoy's xDS protocol document):
//! - SotW: LDS and CDS are wildcard when the first request names nothing (or names `*`),
//!   else only the named resources are served (on-demand); RDS and EDS are always by name.
//!   A response carries every subscribed resource of its type, `version_info` is the
//!   snapshot version. A request whose `response_nonce` is not the last one sent for its
//!   type is stale and ignored, except for its subscription change.
//! - Delta: the server tracks what the client has (`initial_resource_versions` on a new
//!   stream, then what it sent), sends only resources whose version differs, and names
//!   removed ones in `removed_resources`, including explicitly requested names that do not
//!   exist, so an on-demand client learns that at once.
//! - Each resource's version is stable while its content is: an edit that touches one
//!   service costs one resource per affected type on a delta stream.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
};

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment, listener::v3::Listener,
            route::v3::RouteConfiguration,
        },
        service::discovery::v3::{
            aggregated_discovery_service_server::{
                AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
            },
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
            Resource,
        },
    },
    google::protobuf::Any,
};
use futures_util::Stream;
use prost::{Message, Name};
use tokio::sync::{mpsc, watch};
use tokio_stream::{wrappers::ReceiverStream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn, Instrument};

use super::translate::Delta;

mod chunked;
pub use chunked::ChunkedMap;

/// The types served: Envoy's four, then ztunnel's workload addresses and authorization
/// policies and our PeerAuthentications (`wire::istio`).
pub fn type_urls() -> [String; 7] {
    [
        Listener::type_url(),
        RouteConfiguration::type_url(),
        Cluster::type_url(),
        ClusterLoadAssignment::type_url(),
        crate::wire::istio::ADDRESS_TYPE_URL.to_owned(),
        crate::wire::istio::AUTHORIZATION_TYPE_URL.to_owned(),
        crate::wire::istio::PEER_AUTHENTICATION_TYPE_URL.to_owned(),
    ]
}

/// Types whose SotW subscription may be wildcard (ztunnel subscribes to every address
/// and policy that way).
fn wildcard_capable(type_url: &str) -> bool {
    type_url == Listener::type_url()
        || type_url == Cluster::type_url()
        || type_url == crate::wire::istio::ADDRESS_TYPE_URL
        || type_url == crate::wire::istio::AUTHORIZATION_TYPE_URL
        || type_url == crate::wire::istio::PEER_AUTHENTICATION_TYPE_URL
}

/// A resource type's URL, shared by every resource of the type: the served types' URLs
/// are allocated once per process (`TypeUrl::new` finds them), not once per resource
/// (50k copies of 50-70 bytes at 10k services).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TypeUrl(Arc<str>);

impl TypeUrl {
    pub fn new(url: &str) -> TypeUrl {
        static SERVED: std::sync::OnceLock<Vec<TypeUrl>> = std::sync::OnceLock::new();
        let served =
            SERVED.get_or_init(|| type_urls().into_iter().map(|u| TypeUrl(u.into())).collect());
        match served.iter().find(|t| &*t.0 == url) {
            Some(t) => t.clone(),
            None => TypeUrl(url.into()),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for TypeUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

/// A resource as the translator makes it and the server holds it: an `Any` whose type
/// URL is shared (`TypeUrl`). Made into an `Any` when it is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    pub type_url: TypeUrl,
    pub value: Vec<u8>,
}

impl Packed {
    /// `m` encoded (as `envoy_types::util::pack_any`).
    pub fn pack<M: Message + Name>(m: &M) -> Packed {
        Packed {
            type_url: TypeUrl::new(&M::type_url()),
            value: m.encode_to_vec(),
        }
    }

    pub fn from_any(a: Any) -> Packed {
        Packed {
            type_url: TypeUrl::new(&a.type_url),
            value: a.value,
        }
    }

    pub fn to_any(&self) -> Any {
        Any {
            type_url: self.type_url.as_str().to_owned(),
            value: self.value.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// A hash of the content (`version_string` gives the wire form): 8 bytes per resource
    /// instead of a string of 16 digits.
    pub version: u64,
    /// Shared with the translator's cache: a resource is held once.
    pub any: Arc<Packed>,
    /// Served only to clients naming it, never in a wildcard subscription (API listeners
    /// for proxyless gRPC: a socket proxy cannot use them).
    pub named_only: bool,
}

impl Entry {
    fn new(any: Arc<Packed>) -> Entry {
        Entry {
            version: fnv1a(&any.value),
            named_only: is_api_listener(&any),
            any,
        }
    }
}

/// A resource version on the wire: 16 hex digits.
fn version_string(v: u64) -> String {
    format!("{v:016x}")
}

/// A version a delta client says it holds: one of ours (`Entry::version`), or `None` for
/// any other string (a resumed stream's, from another server), which matches nothing
/// served.
type Held = Option<u64>;

fn held(v: &str) -> Held {
    let ours = v.len() == 16 && v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    ours.then(|| u64::from_str_radix(v, 16).ok()).flatten()
}

fn is_api_listener(any: &Packed) -> bool {
    any.type_url.as_str() == Listener::type_url()
        && Listener::decode(any.value.as_slice()).is_ok_and(|l| l.api_listener.is_some())
}

/// One consistent set of resources, by type URL then name. Successive snapshots share
/// every part of a type's map that a change did not touch (`ChunkedMap`: a change to one
/// resource copies one chunk of at most 128 entries and the chunk list, not the 10k
/// entries of the type).
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub version: u64,
    pub types: HashMap<String, ChunkedMap<Entry>>,
    /// The version this one was made from, and the names (by type) whose entry changed
    /// or went away in that step: a stream that had reconciled `base` looks at these
    /// names only.
    pub base: u64,
    pub changed: Arc<HashMap<String, Vec<String>>>,
}

impl Snapshot {
    /// The next snapshot from the full set of freshly built resources: a resource whose
    /// content did not change keeps its version, so delta clients are not sent it again.
    pub fn next(&self, items: Vec<(String, Any)>) -> Snapshot {
        let mut seen: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
        let mut delta = Delta::default();
        for (name, any) in items {
            seen.entry(any.type_url.clone())
                .or_default()
                .insert(name.clone());
            delta.upserts.push((name, Arc::new(Packed::from_any(any))));
        }
        for (t, m) in &self.types {
            for name in m.keys() {
                if !seen.get(t).is_some_and(|s| s.contains(name)) {
                    delta.removes.push((t.clone(), name.clone()));
                }
            }
        }
        self.apply(&delta)
    }

    /// The next snapshot with `delta` applied; the version moves only if content did. A
    /// resource equal to the one in force keeps its entry (and version).
    pub fn apply(&self, delta: &Delta) -> Snapshot {
        let mut types = self.types.clone();
        for t in type_urls() {
            types.entry(t).or_default();
        }
        let mut names: HashMap<String, Vec<String>> = HashMap::new();
        for (t, name) in &delta.removes {
            if let Some(m) = types.get_mut(t) {
                if m.remove(name).is_some() {
                    names.entry(t.clone()).or_default().push(name.clone());
                }
            }
        }
        for (name, any) in &delta.upserts {
            let t = any.type_url.as_str();
            let m = match types.get_mut(t) {
                Some(m) => m,
                None => types.entry(t.to_owned()).or_default(),
            };
            if m.get(name).is_some_and(|p| same(&p.any, any)) {
                continue;
            }
            m.insert(name.clone(), Entry::new(any.clone()));
            match names.get_mut(t) {
                Some(v) => v.push(name.clone()),
                None => {
                    names.insert(t.to_owned(), vec![name.clone()]);
                }
            }
        }
        if names.is_empty() {
            return Snapshot {
                types,
                ..self.clone()
            };
        }
        Snapshot {
            version: self.version + 1,
            types,
            base: self.version,
            changed: Arc::new(names),
        }
    }

    fn of(&self, type_url: &str) -> Option<&ChunkedMap<Entry>> {
        self.types.get(type_url)
    }
}

fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, x| {
        (h ^ *x as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Equal content. Byte equality first; maps inside messages are encoded in hash order, so
/// equal messages can differ in bytes: compare decoded then.
pub(crate) fn same(a: &Packed, b: &Packed) -> bool {
    if a == b {
        return true;
    }
    if a.type_url != b.type_url {
        return false;
    }
    fn eq<T: Message + Default + PartialEq>(a: &[u8], b: &[u8]) -> bool {
        matches!((T::decode(a), T::decode(b)), (Ok(x), Ok(y)) if x == y)
    }
    let t = a.type_url.as_str();
    let (x, y) = (a.value.as_slice(), b.value.as_slice());
    if t == Listener::type_url() {
        eq::<Listener>(x, y)
    } else if t == RouteConfiguration::type_url() {
        eq::<RouteConfiguration>(x, y)
    } else if t == Cluster::type_url() {
        eq::<Cluster>(x, y)
    } else if t == ClusterLoadAssignment::type_url() {
        eq::<ClusterLoadAssignment>(x, y)
    } else if t == crate::wire::istio::ADDRESS_TYPE_URL {
        eq::<crate::wire::istio::Address>(x, y)
    } else if t == crate::wire::istio::AUTHORIZATION_TYPE_URL {
        eq::<crate::wire::istio::Authorization>(x, y)
    } else if t == crate::wire::istio::PEER_AUTHENTICATION_TYPE_URL {
        eq::<crate::wire::istio::PeerAuthentication>(x, y)
    } else {
        false
    }
}

/// Counters for the admin endpoint and the xDS benchmark.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub streams: AtomicU64,
    pub responses: AtomicU64,
    pub resources_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub acks: AtomicU64,
    pub nacks: AtomicU64,
    /// Streams refused before they started (no or wrong credentials; see `auth`).
    pub rejected: AtomicU64,
    /// Streams open now, and streams refused because `MAX_STREAMS` were open.
    pub open: AtomicU64,
    pub over_capacity: AtomicU64,
    /// Streams ended because a request could not be read (too large, not protobuf).
    pub bad_requests: AtomicU64,
    /// Per stream: who it is and how it answered (`/xds_clients`).
    pub clients: std::sync::Mutex<BTreeMap<u64, ClientRecord>>,
}

/// What one client stream did, as the server saw it.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ClientRecord {
    pub node: String,
    pub mode: &'static str,
    pub open: bool,
    pub acks: u64,
    pub nacks: u64,
    /// Type URL -> the last version it ACKed.
    pub acked: BTreeMap<String, String>,
    /// Every NACK: (type URL, the version it refused, reason).
    pub nack_log: Vec<(String, String, String)>,
}

impl ServerStats {
    fn record(&self, id: u64, f: impl FnOnce(&mut ClientRecord)) {
        let mut m = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        f(m.entry(id).or_default());
    }

    pub fn clients_json(&self) -> serde_json::Value {
        let m = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        serde_json::to_value(&*m).unwrap_or_default()
    }
}

#[derive(Clone)]
pub struct AdsServer {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    pub stats: Arc<ServerStats>,
}

impl AdsServer {
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>) -> AdsServer {
        AdsServer {
            snapshots,
            stats: Arc::default(),
        }
    }

    /// The gRPC service behind `access`, which admits or refuses each stream.
    pub fn into_service(
        self,
        access: super::auth::Access,
    ) -> tonic::service::interceptor::InterceptedService<
        AggregatedDiscoveryServiceServer<AdsServer>,
        super::auth::Access,
    > {
        let svc = AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(256 << 20);
        tonic::service::interceptor::InterceptedService::new(svc, access)
    }
}

/// Largest request a client may send (bytes). A request carries subscriptions and ACKs:
/// a delta client's first request naming 10k resources with versions is well under 1 MiB.
/// Anything bigger is refused (`RESOURCE_EXHAUSTED`) before it is buffered.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

/// Most ADS streams served at once (one per client: a node's proxy, an Envoy, ...).
pub const MAX_STREAMS: u64 = 1024;

/// Counts a stream open while it lives.
struct OpenStream(Arc<ServerStats>);

impl OpenStream {
    fn admit(stats: &Arc<ServerStats>) -> Result<OpenStream, Status> {
        if stats.open.fetch_add(1, Relaxed) >= MAX_STREAMS {
            stats.open.fetch_sub(1, Relaxed);
            stats.over_capacity.fetch_add(1, Relaxed);
            warn!(
                max = MAX_STREAMS,
                "ADS stream refused: too many open streams"
            );
            return Err(Status::resource_exhausted(format!(
                "this control plane serves at most {MAX_STREAMS} streams at once"
            )));
        }
        Ok(OpenStream(stats.clone()))
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

static STREAM_IDS: AtomicU64 = AtomicU64::new(0);

fn node_id(n: &Option<envoy_types::pb::envoy::config::core::v3::Node>) -> String {
    n.as_ref().map(|n| n.id.clone()).unwrap_or_default()
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let open = OpenStream::admit(&self.stats)?;
        let (tx, rx) = mpsc::channel(16);
        let id = STREAM_IDS.fetch_add(1, Relaxed);
        self.stats.streams.fetch_add(1, Relaxed);
        let s = SotwStream {
            snapshots: self.snapshots.clone(),
            stats: self.stats.clone(),
            tx,
            subs: HashMap::new(),
            nonce: 0,
            id,
        };
        tokio::spawn(
            serve(s, request.into_inner(), open).instrument(tracing::info_span!("ads_sotw", id)),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let open = OpenStream::admit(&self.stats)?;
        let (tx, rx) = mpsc::channel(16);
        let id = STREAM_IDS.fetch_add(1, Relaxed);
        self.stats.streams.fetch_add(1, Relaxed);
        let s = DeltaStream {
            snapshots: self.snapshots.clone(),
            stats: self.stats.clone(),
            tx,
            subs: HashMap::new(),
            nonce: 0,
            id,
            versions: BTreeMap::new(),
        };
        tokio::spawn(
            serve(s, request.into_inner(), open).instrument(tracing::info_span!("ads_delta", id)),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// What differs between a SotW and a delta stream on the server side.
trait ServerStream: Send + 'static {
    type Req: Send + 'static;
    const MODE: &'static str;
    fn node(req: &Self::Req) -> &Option<envoy_types::pb::envoy::config::core::v3::Node>;
    fn base(&mut self) -> (&mut watch::Receiver<Arc<Snapshot>>, &ServerStats, u64);
    /// Handles one request; false when the response channel is gone.
    fn on_request(&mut self, req: Self::Req) -> impl std::future::Future<Output = bool> + Send;
    /// Pushes what a new snapshot changed for every subscribed type.
    fn push_all(&mut self) -> impl std::future::Future<Output = bool> + Send;
    /// Ends the response stream with `status` (the client sees it as the call's status).
    fn fail(&mut self, status: Status) -> impl std::future::Future<Output = ()> + Send;
    /// A response sent on this stream is not answered (ACKed or NACKed) yet.
    fn awaiting(&self) -> bool;
}

/// Bytes sent (by every stream) after which, once the client has answered every response,
/// freed heap is given back to the kernel.
const TRIM_AFTER_BYTES: u64 = 1 << 20;

/// Serves one stream until the client goes away; the client record says so after.
async fn serve<S: ServerStream>(mut s: S, mut requests: Streaming<S::Req>, _open: OpenStream) {
    let mut node = String::new();
    // Bytes sent (by every stream) when freed heap was last given back.
    let mut trimmed_at = 0;
    loop {
        let (snapshots, _, _) = s.base();
        tokio::select! {
            req = requests.next() => match req {
                Some(Ok(req)) => {
                    if node.is_empty() {
                        node = node_id(S::node(&req));
                        info!(node = %node, mode = S::MODE, "ADS stream opened");
                        let n = node.clone();
                        let (_, stats, id) = s.base();
                        stats.record(id, |r| {
                            r.node = n;
                            r.mode = S::MODE;
                            r.open = true;
                        });
                    }
                    let sent_before = s.base().1.bytes_sent.load(Relaxed);
                    if !s.on_request(req).await {
                        break;
                    }
                    // Big responses (a 10k-service mesh's first load is 11 MB, its
                    // encoding and copies about as much again) leave tens of megabytes
                    // freed that glibc keeps. Once the client has answered every response
                    // (the buffers of all of them are gone) give them back: a few ms, paid
                    // only after a megabyte was sent. Trimming at the first ACK instead
                    // left the types sent after it (a delta client subscribes one type
                    // after the other) in the heap: about 6 MB at 10k services.
                    let sent = s.base().1.bytes_sent.load(Relaxed);
                    if sent == sent_before
                        && !s.awaiting()
                        && sent.saturating_sub(trimmed_at) > TRIM_AFTER_BYTES
                    {
                        trimmed_at = sent;
                        crate::sys::release_free_heap();
                    }
                }
                Some(Err(e)) if is_bad_request(&e) => {
                    // Too large or not protobuf: say so, instead of ending the call as if
                    // all went well (grpc-status 0).
                    let (_, stats, _) = s.base();
                    stats.bad_requests.fetch_add(1, Relaxed);
                    warn!(node = %node, code = ?e.code(), error = %e.message(), "ADS request refused; ending the stream");
                    s.fail(e).await;
                    break;
                }
                Some(Err(e)) => {
                    debug!(error = %e, "stream ended");
                    break;
                }
                None => break,
            },
            r = snapshots.changed() => {
                if r.is_err() || !s.push_all().await {
                    break;
                }
            }
        }
    }
    let (_, stats, id) = s.base();
    stats.record(id, |r| r.open = false);
}

/// Whether a request stream error is the client's message (its size or encoding) rather
/// than the connection going away.
fn is_bad_request(e: &Status) -> bool {
    matches!(
        e.code(),
        tonic::Code::OutOfRange
            | tonic::Code::ResourceExhausted
            | tonic::Code::Internal
            | tonic::Code::InvalidArgument
    )
}

impl ServerStream for SotwStream {
    type Req = DiscoveryRequest;
    const MODE: &'static str = "sotw";
    fn node(req: &DiscoveryRequest) -> &Option<envoy_types::pb::envoy::config::core::v3::Node> {
        &req.node
    }
    fn base(&mut self) -> (&mut watch::Receiver<Arc<Snapshot>>, &ServerStats, u64) {
        (&mut self.snapshots, &self.stats, self.id)
    }
    async fn on_request(&mut self, req: DiscoveryRequest) -> bool {
        SotwStream::on_request(self, req).await
    }
    async fn fail(&mut self, status: Status) {
        let _ = self.tx.send(Err(status)).await;
    }
    fn awaiting(&self) -> bool {
        self.subs.values().any(|st| !st.answered)
    }
    async fn push_all(&mut self) -> bool {
        let eds = ClusterLoadAssignment::type_url();
        for t in push_order(self.subs.keys()) {
            let before = self.nonce;
            if !self.push(&t, false).await {
                return false;
            }
            // A changed cluster warms until its endpoints arrive again (Envoy waits for
            // them): push the load assignments right after, changed or not.
            let cluster_pushed = t == Cluster::type_url() && self.nonce != before;
            if cluster_pushed && self.subs.contains_key(&eds) && !self.push(&eds, true).await {
                return false;
            }
        }
        true
    }
}

/// Types in the order the xDS protocol asks servers to push them: clusters, their
/// endpoints, listeners, their routes, then anything else.
fn push_order<'a>(types: impl Iterator<Item = &'a String>) -> Vec<String> {
    let rank = |t: &str| {
        [
            Cluster::type_url(),
            ClusterLoadAssignment::type_url(),
            Listener::type_url(),
            RouteConfiguration::type_url(),
        ]
        .iter()
        .position(|x| x == t)
        .unwrap_or(4)
    };
    let mut v: Vec<String> = types.cloned().collect();
    v.sort_by_key(|t| rank(t));
    v
}

impl ServerStream for DeltaStream {
    type Req = DeltaDiscoveryRequest;
    const MODE: &'static str = "delta";
    fn node(
        req: &DeltaDiscoveryRequest,
    ) -> &Option<envoy_types::pb::envoy::config::core::v3::Node> {
        &req.node
    }
    fn base(&mut self) -> (&mut watch::Receiver<Arc<Snapshot>>, &ServerStats, u64) {
        (&mut self.snapshots, &self.stats, self.id)
    }
    async fn on_request(&mut self, req: DeltaDiscoveryRequest) -> bool {
        DeltaStream::on_request(self, req).await
    }
    async fn fail(&mut self, status: Status) {
        let _ = self.tx.send(Err(status)).await;
    }
    fn awaiting(&self) -> bool {
        self.subs.values().any(|st| !st.pending.is_empty())
    }
    async fn push_all(&mut self) -> bool {
        let cds = Cluster::type_url();
        let eds = ClusterLoadAssignment::type_url();
        for t in push_order(self.subs.keys()) {
            let before = self.nonce;
            if !self.push(&t).await {
                return false;
            }
            // As for SotW: a changed cluster gets its endpoints again, by forgetting
            // that the client has them.
            if t == cds && self.nonce != before {
                let changed: Vec<String> = self
                    .subs
                    .get(&cds)
                    .and_then(|st| st.pending.get(&self.nonce.to_string()))
                    .map(|v| v.iter().map(|(n, _)| n.clone()).collect())
                    .unwrap_or_default();
                if let Some(st) = self.subs.get_mut(&eds) {
                    for n in &changed {
                        st.has.remove(n);
                    }
                    if !changed.is_empty() {
                        st.synced = None;
                    }
                }
            }
        }
        true
    }
}

/// What a client subscribed to, for one type.
#[derive(Debug, Default)]
struct Subscription {
    wildcard: bool,
    names: BTreeSet<String>,
}

impl Subscription {
    fn wants(&self, name: &str, e: &Entry) -> bool {
        (self.wildcard && !e.named_only) || self.names.contains(name)
    }
}

// ---------------------------------------------------------------------------------------
// State of the world

struct SotwType {
    sub: Subscription,
    /// Nonce of the last response sent, and the resource versions it carried.
    last_nonce: String,
    sent_version: String,
    sent: BTreeMap<String, u64>,
    sent_any: bool,
    /// The client answered the last response sent (or none was sent).
    answered: bool,
    /// The snapshot version this type was last compared with (`None`: compare all).
    synced: Option<u64>,
}

struct SotwStream {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    stats: Arc<ServerStats>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    subs: HashMap<String, SotwType>,
    nonce: u64,
    id: u64,
}

impl SotwStream {
    async fn on_request(&mut self, req: DiscoveryRequest) -> bool {
        let t = req.type_url.clone();
        if !type_urls().contains(&t) {
            // Unknown types get an empty answer, never an error: clients probe.
            warn!(type_url = %t, "subscription to an unknown type");
        }
        let first = !self.subs.contains_key(&t);
        let st = self.subs.entry(t.clone()).or_insert_with(|| SotwType {
            sub: Subscription::default(),
            last_nonce: String::new(),
            sent_version: String::new(),
            sent: BTreeMap::new(),
            sent_any: false,
            answered: true,
            synced: None,
        });
        if !req.response_nonce.is_empty() {
            if req.response_nonce != st.last_nonce {
                debug!(type_url = %t, nonce = %req.response_nonce, "stale nonce; ignored");
                return true;
            }
            st.answered = true;
            if let Some(err) = &req.error_detail {
                self.stats.nacks.fetch_add(1, Relaxed);
                warn!(type_url = %t, version = %req.version_info, reason = %err.message, "client NACKed");
                let refused = st.sent_version.clone();
                self.stats.record(self.id, |r| {
                    r.nacks += 1;
                    r.nack_log.push((t.clone(), refused, err.message.clone()));
                });
            } else {
                self.stats.acks.fetch_add(1, Relaxed);
                debug!(type_url = %t, version = %req.version_info, "client ACKed");
                self.stats.record(self.id, |r| {
                    r.acks += 1;
                    r.acked.insert(t.clone(), req.version_info.clone());
                });
            }
        }
        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        let wildcard = names.contains("*")
            || (wildcard_capable(&t) && names.is_empty() && (first || st.sub.wildcard));
        let changed = first || wildcard != st.sub.wildcard || names != st.sub.names;
        st.sub = Subscription {
            wildcard,
            names: names.into_iter().filter(|n| n != "*").collect(),
        };
        if changed {
            return self.push(&t, true).await;
        }
        true
    }

    /// Sends the subscribed resources of one type if they differ from what was last sent
    /// (or `force`, for a new subscription: the client waits for an answer).
    async fn push(&mut self, t: &str, force: bool) -> bool {
        let snap = self.snapshots.borrow().clone();
        let Some(st) = self.subs.get_mut(t) else {
            return true;
        };
        // Reconciled with the snapshot this one was made from, and this type did not
        // change in that step: nothing to compare.
        if !force && st.synced == Some(snap.base) && !snap.changed.contains_key(t) {
            st.synced = Some(snap.version);
            return true;
        }
        st.synced = Some(snap.version);
        let empty = ChunkedMap::default();
        let m = snap.of(t).unwrap_or(&empty);
        let versions: BTreeMap<String, u64> = m
            .iter()
            .filter(|(name, e)| st.sub.wants(name, e))
            .map(|(name, e)| (name.clone(), e.version))
            .collect();
        if !force && st.sent_any && versions == st.sent {
            return true;
        }
        let resources: Vec<Any> = versions
            .keys()
            .filter_map(|name| m.get(name))
            .map(|e| e.any.to_any())
            .collect();
        self.nonce += 1;
        let resp = DiscoveryResponse {
            version_info: snap.version.to_string(),
            resources,
            type_url: t.to_owned(),
            nonce: self.nonce.to_string(),
            ..Default::default()
        };
        st.last_nonce = resp.nonce.clone();
        st.answered = false;
        st.sent_version = resp.version_info.clone();
        st.sent = versions;
        st.sent_any = true;
        self.stats.responses.fetch_add(1, Relaxed);
        self.stats
            .resources_sent
            .fetch_add(resp.resources.len() as u64, Relaxed);
        self.stats
            .bytes_sent
            .fetch_add(resp.encoded_len() as u64, Relaxed);
        self.tx.send(Ok(resp)).await.is_ok()
    }
}

// ---------------------------------------------------------------------------------------
// Delta

struct DeltaType {
    sub: Subscription,
    /// What the client has: name -> version.
    has: BTreeMap<String, Held>,
    /// Names the client was told do not exist (so it is told once).
    told_absent: BTreeSet<String>,
    /// Per unacknowledged nonce: what the client had before (name -> version, or none).
    pending: BTreeMap<String, Vec<(String, Option<Held>)>>,
    /// Versions the client NACKed: not sent again until they change.
    rejected: BTreeMap<String, Held>,
    /// The snapshot version `has` was last reconciled with; `None` after anything else
    /// changed `has` or the subscription (then every name is compared again).
    synced: Option<u64>,
}

/// Responses of more resources than this update what the client has in one merge.
const BULK_HAS: usize = 1024;

struct DeltaStream {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    stats: Arc<ServerStats>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    subs: HashMap<String, DeltaType>,
    nonce: u64,
    id: u64,
    /// Nonce -> system version of what it carried (for the client records).
    versions: BTreeMap<String, String>,
}

impl DeltaStream {
    async fn on_request(&mut self, req: DeltaDiscoveryRequest) -> bool {
        let t = req.type_url.clone();
        if !type_urls().contains(&t) {
            warn!(type_url = %t, "subscription to an unknown type");
        }
        let first = !self.subs.contains_key(&t);
        let st = self.subs.entry(t.clone()).or_insert_with(|| DeltaType {
            sub: Subscription::default(),
            has: BTreeMap::new(),
            told_absent: BTreeSet::new(),
            pending: BTreeMap::new(),
            rejected: BTreeMap::new(),
            synced: None,
        });
        if !req.response_nonce.is_empty() {
            let before = st.pending.remove(&req.response_nonce).unwrap_or_default();
            let version = self
                .versions
                .remove(&req.response_nonce)
                .unwrap_or_default();
            if let Some(err) = &req.error_detail {
                self.stats.nacks.fetch_add(1, Relaxed);
                warn!(type_url = %t, nonce = %req.response_nonce, reason = %err.message, "client NACKed");
                self.stats.record(self.id, |r| {
                    r.nacks += 1;
                    r.nack_log.push((t.clone(), version, err.message.clone()));
                });
                // The client kept what it had before that response: remember that, and do
                // not send the rejected versions again until they change.
                for (name, prev) in before {
                    if let Some(v) = st.has.get(&name) {
                        st.rejected.insert(name.clone(), *v);
                    }
                    match prev {
                        Some(v) => st.has.insert(name, v),
                        None => st.has.remove(&name),
                    };
                }
            } else {
                self.stats.acks.fetch_add(1, Relaxed);
                self.stats.record(self.id, |r| {
                    r.acks += 1;
                    r.acked.insert(t.clone(), version);
                });
            }
        }
        if first {
            // A resumed stream says what the client already has.
            st.has = req
                .initial_resource_versions
                .iter()
                .map(|(n, v)| (n.clone(), held(v)))
                .collect();
            st.sub.wildcard = req.resource_names_subscribe.is_empty() && wildcard_capable(&t);
        }
        for n in &req.resource_names_subscribe {
            if n == "*" {
                st.sub.wildcard = true;
            } else {
                st.sub.names.insert(n.clone());
                st.told_absent.remove(n);
            }
        }
        for n in &req.resource_names_unsubscribe {
            if n == "*" {
                st.sub.wildcard = false;
            } else {
                st.sub.names.remove(n);
                st.has.remove(n);
                st.told_absent.remove(n);
            }
        }
        // A NACK restored `has`; a subscription change changes what is wanted.
        if req.error_detail.is_some()
            || first
            || !req.resource_names_subscribe.is_empty()
            || !req.resource_names_unsubscribe.is_empty()
        {
            st.synced = None;
        }
        let needs_answer = first || !req.resource_names_subscribe.is_empty();
        self.push_inner(&t, needs_answer).await
    }

    async fn push(&mut self, t: &str) -> bool {
        self.push_inner(t, false).await
    }

    async fn push_inner(&mut self, t: &str, force: bool) -> bool {
        let snap = self.snapshots.borrow().clone();
        let Some(st) = self.subs.get_mut(t) else {
            return true;
        };
        let empty = ChunkedMap::default();
        let m = snap.of(t).unwrap_or(&empty);
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        let send = |name: &String, e: &Entry, st: &DeltaType| {
            let v = Some(e.version);
            (st.sub.wants(name, e)
                && st.has.get(name) != Some(&v)
                && st.rejected.get(name) != Some(&v))
            .then(|| Resource {
                name: name.clone(),
                version: version_string(e.version),
                resource: Some(e.any.to_any()),
                ..Default::default()
            })
        };
        if !force && st.synced == Some(snap.version) {
            // Already reconciled with this very snapshot (an ACK): nothing can differ.
        } else if !force && st.synced == Some(snap.base) {
            // `has` matched the snapshot this one was made from: only the names that
            // changed in that step can differ (at 10k resources per type, a full
            // comparison per push costs more than the change itself).
            for name in snap.changed.get(t).into_iter().flatten() {
                match m.get(name) {
                    Some(e) if st.sub.wants(name, e) => resources.extend(send(name, e, st)),
                    _ if st.has.contains_key(name) => removed.push(name.clone()),
                    None if st.sub.names.contains(name) && !st.told_absent.contains(name) => {
                        removed.push(name.clone())
                    }
                    _ => {}
                }
            }
        } else {
            for (name, e) in m.iter() {
                resources.extend(send(name, e, st));
            }
            for name in st.has.keys() {
                if !m.get(name).is_some_and(|e| st.sub.wants(name, e)) {
                    removed.push(name.clone());
                }
            }
            for name in &st.sub.names {
                if !m.contains_key(name)
                    && !st.has.contains_key(name)
                    && !st.told_absent.contains(name)
                {
                    removed.push(name.clone());
                }
            }
        }
        st.synced = Some(snap.version);
        if resources.is_empty() && removed.is_empty() && !force {
            return true;
        }
        let mut before = Vec::with_capacity(resources.len());
        if resources.len() > BULK_HAS {
            // Built whole and merged (`append`): inserted one by one in name order, the
            // tree's nodes stay half full (about 2 MB more per 10k-service client).
            let mut fresh: BTreeMap<String, Held> = resources
                .iter()
                .map(|r| (r.name.clone(), held(&r.version)))
                .collect();
            for r in &resources {
                before.push((r.name.clone(), st.has.get(&r.name).copied()));
                st.rejected.remove(&r.name);
            }
            st.has.append(&mut fresh);
        } else {
            for r in &resources {
                before.push((
                    r.name.clone(),
                    st.has.insert(r.name.clone(), held(&r.version)),
                ));
                st.rejected.remove(&r.name);
            }
        }
        for n in &removed {
            st.has.remove(n);
            if st.sub.names.contains(n) {
                st.told_absent.insert(n.clone());
            }
        }
        self.nonce += 1;
        // Bounded: a client that never answers does not grow this without end.
        if st.pending.len() > 64 {
            st.pending.pop_first();
        }
        st.pending.insert(self.nonce.to_string(), before);
        if self.versions.len() > 256 {
            self.versions.pop_first();
        }
        self.versions
            .insert(self.nonce.to_string(), snap.version.to_string());
        let resp = DeltaDiscoveryResponse {
            system_version_info: snap.version.to_string(),
            resources,
            type_url: t.to_owned(),
            removed_resources: removed,
            nonce: self.nonce.to_string(),
            ..Default::default()
        };
        self.stats.responses.fetch_add(1, Relaxed);
        self.stats
            .resources_sent
            .fetch_add(resp.resources.len() as u64, Relaxed);
        self.stats
            .bytes_sent
            .fetch_add(resp.encoded_len() as u64, Relaxed);
        self.tx.send(Ok(resp)).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(name: &str, timeout_s: i64) -> (String, Any) {
        let c = Cluster {
            name: name.into(),
            connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
                seconds: timeout_s,
                nanos: 0,
            }),
            ..Default::default()
        };
        (name.into(), envoy_types::util::pack_any(c))
    }

    /// Only our own version strings (16 lowercase hex digits) stand for a version; any
    /// other string a client holds matches nothing served.
    #[test]
    fn held_versions_are_ours_or_nothing() {
        for v in [0, 1, 0xdead_beef, u64::MAX] {
            assert_eq!(held(&version_string(v)), Some(v));
        }
        for other in [
            "",
            "1",
            "00000000DEADBEEF",
            "+00000000deadbee",
            "00000000deadbeef0",
            "v1",
        ] {
            assert_eq!(held(other), None, "{other:?}");
        }
    }

    /// Resources of a served type share one type URL; an `Any` goes in and comes out
    /// unchanged, an unknown type included.
    #[test]
    fn packed_resources_share_their_type_url() {
        let (_, a) = cluster("a", 1);
        let (_, b) = cluster("b", 2);
        let (pa, pb) = (Packed::from_any(a.clone()), Packed::from_any(b));
        assert!(Arc::ptr_eq(&pa.type_url.0, &pb.type_url.0));
        assert_eq!(pa.to_any(), a);
        let c = Cluster {
            name: "a".into(),
            connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        };
        assert_eq!(Packed::pack(&c), pa);
        let unknown = Any {
            type_url: "type.googleapis.com/example.Unknown".into(),
            value: vec![1, 2, 3],
        };
        assert_eq!(Packed::from_any(unknown.clone()).to_any(), unknown);
    }

    /// A resumed delta stream (`initial_resource_versions`) is sent what it holds in
    /// another version than ours, or under a version string that is not ours, and not what
    /// it holds in ours; what it holds that is gone is removed.
    #[tokio::test]
    async fn a_resumed_delta_stream_gets_what_differs() {
        let snap = Snapshot::default().next(vec![
            cluster("same", 1),
            cluster("changed", 2),
            cluster("foreign", 3),
            cluster("new", 4),
        ]);
        let cds = Cluster::type_url();
        let version =
            |name: &str| version_string(snap.of(&cds).unwrap().get(name).unwrap().version);
        let (_keep, rx) = watch::channel(Arc::new(snap.clone()));
        let (tx, mut responses) = mpsc::channel(4);
        let mut s = DeltaStream {
            snapshots: rx,
            stats: Arc::default(),
            tx,
            subs: HashMap::new(),
            nonce: 0,
            id: 0,
            versions: BTreeMap::new(),
        };
        let initial = [
            ("same", version("same")),
            ("changed", version_string(7)),
            ("foreign", "v1".to_owned()),
            ("gone", version("same")),
        ];
        assert!(
            s.on_request(DeltaDiscoveryRequest {
                type_url: cds.clone(),
                initial_resource_versions: initial
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.clone()))
                    .collect(),
                ..Default::default()
            })
            .await
        );
        let resp = responses.recv().await.unwrap().unwrap();
        let mut sent: Vec<(&str, &str)> = resp
            .resources
            .iter()
            .map(|r| (r.name.as_str(), r.version.as_str()))
            .collect();
        sent.sort();
        let (changed, foreign, new) = (version("changed"), version("foreign"), version("new"));
        assert_eq!(
            sent,
            [
                ("changed", changed.as_str()),
                ("foreign", foreign.as_str()),
                ("new", new.as_str())
            ]
        );
        assert_eq!(resp.removed_resources, ["gone"]);
        // The ACK leaves nothing awaiting: the point where freed heap is given back.
        assert!(s.awaiting());
        assert!(
            s.on_request(DeltaDiscoveryRequest {
                type_url: cds,
                response_nonce: resp.nonce,
                ..Default::default()
            })
            .await
        );
        assert!(!s.awaiting());
        assert!(responses.try_recv().is_err(), "nothing more to send");
    }
}
