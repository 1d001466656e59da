//! The node proxy's xDS client: one ADS stream (state-of-the-world or delta) to the
//! embedded control plane or an external one.
//!
//! - Every response is judged as a unit: all its resources are checked (`xds::convert`)
//!   and it is ACKed (applied) or NACKed with a reason naming the resource and field (the
//!   previous configuration stays in force).
//! - Subscriptions follow references: listeners name route configurations (RDS), routes
//!   and TCP listeners name clusters (CDS), clusters name load assignments (EDS).
//! - On demand (the default with the embedded control plane): listeners are subscribed by
//!   name (`<ip>:<port>`) the first time a captured connection goes to that address, so a
//!   node holds the services its workloads call, not the whole mesh. Without it, listeners
//!   and clusters are wildcard subscriptions.
//! - Reconnects with jittered exponential back-off; a delta stream resumes with
//!   `initial_resource_versions`, so the server sends only what changed meanwhile.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::Cluster, core::v3::Node, endpoint::v3::ClusterLoadAssignment,
            listener::v3::Listener as PbListener, route::v3::RouteConfiguration,
        },
        service::discovery::v3::{
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        },
    },
    google::{protobuf::Any, rpc::Status as RpcStatus},
};
use prost::Name;
use serde::Serialize;
use tokio::sync::{mpsc, watch, Notify};
use tokio_stream::{wrappers::ReceiverStream, StreamExt as _};
use tracing::{debug, info, warn};

use super::convert::{self, Accepted, Invalid, Warming};
use crate::proxy::config::{policy::MeshConfig, Listener, ProxyConfig};
use crate::wire::istio;

/// gRPC `INVALID_ARGUMENT`, the code of a NACK's `error_detail`.
const INVALID_ARGUMENT: i32 = 3;
/// Back-off between reconnects: from this, doubling, jittered by +-50%.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// State of the world.
    Sotw,
    /// Incremental.
    Delta,
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `http://host:port` of the ADS server, or `unix:/path` of its Unix socket.
    pub address: String,
    /// Bearer token sent with every stream (a control plane with `--xds-token-file`).
    pub token: Option<crate::wire::Token>,
    pub node_id: String,
    pub cluster: String,
    pub mode: Mode,
    pub on_demand: bool,
    /// How long a new connection waits for its listener to arrive on demand.
    pub on_demand_timeout: Duration,
}

/// The types, in the order a client asks for them: Envoy's four, then ztunnel's
/// workload addresses and authorization policies and our PeerAuthentications
/// (`wire::istio`), always subscribed to as a whole (wildcard).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Listener,
    RouteConfiguration,
    Cluster,
    ClusterLoadAssignment,
    Address,
    Authorization,
    PeerAuthentication,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Cluster,
        Kind::ClusterLoadAssignment,
        Kind::Listener,
        Kind::RouteConfiguration,
        Kind::Address,
        Kind::Authorization,
        Kind::PeerAuthentication,
    ];
    pub fn type_url(self) -> String {
        match self {
            Kind::Listener => PbListener::type_url(),
            Kind::RouteConfiguration => RouteConfiguration::type_url(),
            Kind::Cluster => Cluster::type_url(),
            Kind::ClusterLoadAssignment => ClusterLoadAssignment::type_url(),
            Kind::Address => istio::ADDRESS_TYPE_URL.to_owned(),
            Kind::Authorization => istio::AUTHORIZATION_TYPE_URL.to_owned(),
            Kind::PeerAuthentication => istio::PEER_AUTHENTICATION_TYPE_URL.to_owned(),
        }
    }
    pub fn of(type_url: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.type_url() == type_url)
    }
    fn wildcard_capable(self) -> bool {
        matches!(self, Kind::Listener | Kind::Cluster) || self.is_mesh()
    }
    /// Workloads and policies: published as `MeshConfig`, not `ProxyConfig`.
    pub fn is_mesh(self) -> bool {
        matches!(
            self,
            Kind::Address | Kind::Authorization | Kind::PeerAuthentication
        )
    }
}

/// The last rejected response, for `/config_dump`.
#[derive(Debug, Clone, Serialize)]
pub struct Nack {
    pub type_url: String,
    pub version_info: String,
    pub nonce: String,
    pub reason: String,
    pub at_unix_ms: u64,
}

/// Per type: what is accepted, at which versions, and the stream bookkeeping.
#[derive(Debug, Default, Clone, Serialize)]
pub struct TypeState {
    /// SotW `version_info` last accepted (delta: `system_version_info`).
    pub version_info: String,
    /// Resource name -> version (delta: the resource's own; SotW: the response's).
    pub versions: BTreeMap<String, String>,
    /// Unix ms of the last accepted change per resource.
    pub updated_unix_ms: BTreeMap<String, u64>,
    pub last_nonce: String,
    /// What this client is subscribed to (empty with `wildcard`).
    pub subscribed: BTreeSet<String>,
    pub wildcard: bool,
    /// Whether this type's subscription was sent on the current stream.
    #[serde(skip)]
    sent: bool,
}

/// Everything the stream knows. Its lock is held while a whole response is judged and the
/// configuration built (hundreds of ms at 10k resources), so only the stream task and
/// the admin endpoint take it, both on the control runtime; what proxy threads need is
/// in `Demand`, behind a lock of its own.
#[derive(Debug, Default)]
pub struct Core {
    pub on_demand: bool,
    pub accepted: Accepted,
    pub types: BTreeMap<Kind, TypeState>,
    pub last_nack: Option<Nack>,
    pub warming: Warming,
    /// Shared with `XdsClient::lookup`. Lock order: `Core`, then `Demand`.
    demand: Arc<Mutex<Demand>>,
    pub acks: u64,
    pub nacks: u64,
    /// The last verdicts, oldest first (`/config_dump`, `mesh-agent xds-watch`).
    pub history: std::collections::VecDeque<Verdict>,
    verdicts: u64,
    /// `ProxyConfig::version` of the last configuration published.
    published: u64,
    /// `MeshConfig::version` of the last one published.
    mesh_published: u64,
    /// Clusters as last built: an update rebuilds only what it changed.
    memo: convert::BuildMemo,
    /// `Accepted::references` as last computed (RDS, CDS, EDS names); `None` once a
    /// listener, route configuration or cluster changed. An endpoints-only response (the
    /// common change) then costs no walk of every listener and cluster.
    references: Option<References>,
}

/// The RDS, CDS and EDS names the accepted resources refer to.
type References = (Vec<String>, Vec<String>, Vec<String>);

/// What `XdsClient::lookup` reads and writes besides the configuration in force. Proxy
/// threads take this lock for every captured connection whose destination is not in
/// force, so it is held for set and map operations only: never across decoding,
/// conversion, configuration building or I/O (those hold `Core`'s lock, which no proxy
/// thread takes).
#[derive(Debug, Default)]
pub struct Demand {
    pub connected: bool,
    /// Whether the last accepted listener response had a version (wildcard lookups: what
    /// it holds is the answer).
    listeners_known: bool,
    /// Unix ms of the last accepted change per listener (as the listener type's
    /// `TypeState::updated_unix_ms`).
    listener_updated_ms: HashMap<String, u64>,
    /// On-demand listeners wanted, and those the server said do not exist, by address:
    /// an on-demand listener's name is its address's `Display` form (`listener_name`), and
    /// a captured connection to a known destination then costs no formatting (issue 13,
    /// item 3: it was 5.7% of the agent's user space a connection).
    pub wanted: BTreeSet<SocketAddr>,
    pub absent: BTreeSet<SocketAddr>,
    /// `absent` in the order addresses were found absent, to forget the oldest first.
    absent_order: std::collections::VecDeque<SocketAddr>,
    /// Absent names forgotten since the subscription was last recomputed.
    pruned: bool,
}

/// The answer of `XdsClient::lookup`.
#[derive(Debug, Clone)]
pub enum Lookup {
    Found(Arc<Listener>),
    /// The control plane has no listener for the address: plain L4 is what it wants.
    Absent,
    /// Nothing is known (why): the workload's fail mode decides.
    Unknown(&'static str),
}

impl Lookup {
    pub fn found(self) -> Option<Arc<Listener>> {
        match self {
            Lookup::Found(l) => Some(l),
            _ => None,
        }
    }
}

/// How one response was judged.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub seq: u64,
    pub type_url: String,
    pub version_info: String,
    pub nonce: String,
    pub accepted: bool,
    pub reason: Option<String>,
    pub resources: usize,
}

/// Verdicts kept in memory.
const HISTORY: usize = 256;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A checked resource of any of the four types.
enum Checked {
    Listener(convert::ListenerSpec),
    Route(Arc<crate::proxy::config::RouteConfig>),
    Cluster(convert::ClusterSpec),
    Endpoints(Arc<Vec<crate::proxy::config::Endpoint>>),
    /// A workload, or `None` for a service address (recognised, not kept).
    Address(Option<Arc<crate::proxy::config::workloads::WorkloadInfo>>),
    Authorization(Arc<crate::proxy::config::policy::Policy>),
    PeerAuthentication(Arc<crate::proxy::config::policy::PeerAuthn>),
}

fn check(kind: Kind, any: &Any) -> Result<(String, Checked), String> {
    let e = |e: Invalid| e.to_string();
    Ok(match kind {
        Kind::Listener => {
            let l: PbListener = convert::unpack(any)?;
            (
                l.name.clone(),
                Checked::Listener(convert::listener(&l).map_err(e)?),
            )
        }
        Kind::RouteConfiguration => {
            let r: RouteConfiguration = convert::unpack(any)?;
            (
                r.name.clone(),
                Checked::Route(Arc::new(convert::route_config(&r).map_err(e)?)),
            )
        }
        Kind::Cluster => {
            let c: Cluster = convert::unpack(any)?;
            (
                c.name.clone(),
                Checked::Cluster(convert::cluster(&c).map_err(e)?),
            )
        }
        Kind::ClusterLoadAssignment => {
            let c: ClusterLoadAssignment = convert::unpack(any)?;
            (
                c.cluster_name.clone(),
                Checked::Endpoints(Arc::new(convert::load_assignment(&c).map_err(e)?)),
            )
        }
        Kind::Address => {
            let a: istio::Address = convert::unpack(any)?;
            match convert::address(&a).map_err(e)? {
                (name, convert::AddressSpec::Workload(w)) => (name, Checked::Address(Some(w))),
                (name, convert::AddressSpec::Service) => (name, Checked::Address(None)),
            }
        }
        Kind::Authorization => {
            let a: istio::Authorization = convert::unpack(any)?;
            let (name, p) = convert::authorization(&a).map_err(e)?;
            (name, Checked::Authorization(Arc::new(p)))
        }
        Kind::PeerAuthentication => {
            let a: istio::PeerAuthentication = convert::unpack(any)?;
            let (name, p) = convert::peer_authentication(&a).map_err(e)?;
            (name, Checked::PeerAuthentication(Arc::new(p)))
        }
    })
}

/// How many destinations that are not services the client remembers (and stays
/// subscribed to) at once: every distinct `ip:port` a pod dials would otherwise add a
/// subscription for good. The oldest are forgotten first; dialling one again asks the
/// control plane again (one round trip).
pub const MAX_ABSENT_LISTENERS: usize = 1024;

/// The on-demand listener name of `dst` (what `lookup` subscribes to).
fn listener_name(dst: SocketAddr) -> String {
    dst.to_string()
}

/// The address whose on-demand name `name` is; `None` for any other name (the server's
/// own listener names, or another spelling of an address, which were never asked for).
fn on_demand_addr(name: &str) -> Option<SocketAddr> {
    let a: SocketAddr = name.parse().ok()?;
    (listener_name(a) == name).then_some(a)
}

impl Demand {
    /// Records that the control plane has no listener for `dst`, forgetting the oldest
    /// absent addresses (and their subscriptions) beyond `MAX_ABSENT_LISTENERS`.
    fn mark_absent(&mut self, dst: SocketAddr) {
        if !self.absent.insert(dst) {
            return;
        }
        self.absent_order.push_back(dst);
        while self.absent.len() > MAX_ABSENT_LISTENERS {
            let Some(old) = self.absent_order.pop_front() else {
                break;
            };
            if self.absent.remove(&old) {
                self.wanted.remove(&old);
                self.pruned = true;
            }
        }
        // Names that turned present leave stale entries behind; keep the queue bounded.
        if self.absent_order.len() > 2 * MAX_ABSENT_LISTENERS {
            let absent = &self.absent;
            self.absent_order.retain(|n| absent.contains(n));
        }
    }
}

impl Core {
    /// Whether absent names were forgotten since the last call (their unsubscription is due).
    pub fn take_pruned(&mut self) -> bool {
        std::mem::take(&mut self.demand().pruned)
    }

    /// The state lookups share; held briefly (see `Demand`).
    pub fn demand(&self) -> std::sync::MutexGuard<'_, Demand> {
        self.demand.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn new(on_demand: bool) -> Core {
        let mut c = Core {
            on_demand,
            ..Default::default()
        };
        for k in Kind::ALL {
            let st = c.types.entry(k).or_default();
            // Workloads and policies are few and needed before the first connection:
            // the whole set, on demand or not.
            st.wildcard = k.is_mesh() || (!on_demand && k.wildcard_capable());
        }
        c
    }

    fn insert(&mut self, c: Checked, name: String) {
        if matches!(
            c,
            Checked::Listener(_) | Checked::Route(_) | Checked::Cluster(_)
        ) {
            self.references = None;
        }
        match c {
            Checked::Listener(l) => {
                self.accepted.listeners.insert(name, Arc::new(l));
            }
            Checked::Route(r) => {
                self.accepted.routes.insert(name, r);
            }
            Checked::Cluster(c) => {
                self.accepted.clusters.insert(name, c);
            }
            Checked::Endpoints(e) => {
                self.accepted.endpoints.insert(name, e);
            }
            Checked::Address(Some(w)) => {
                self.accepted.workloads.insert(name, w);
            }
            Checked::Address(None) => {
                self.accepted.workloads.remove(&name);
            }
            Checked::Authorization(p) => {
                self.accepted.authorizations.insert(name, p);
            }
            Checked::PeerAuthentication(p) => {
                self.accepted.peer_authentications.insert(name, p);
            }
        }
    }

    fn remove(&mut self, kind: Kind, name: &str) {
        if matches!(
            kind,
            Kind::Listener | Kind::RouteConfiguration | Kind::Cluster
        ) {
            self.references = None;
        }
        match kind {
            Kind::Listener => drop(self.accepted.listeners.remove(name)),
            Kind::RouteConfiguration => drop(self.accepted.routes.remove(name)),
            Kind::Cluster => drop(self.accepted.clusters.remove(name)),
            Kind::ClusterLoadAssignment => drop(self.accepted.endpoints.remove(name)),
            Kind::Address => drop(self.accepted.workloads.remove(name)),
            Kind::Authorization => drop(self.accepted.authorizations.remove(name)),
            Kind::PeerAuthentication => drop(self.accepted.peer_authentications.remove(name)),
        }
    }

    fn names(&self, kind: Kind) -> Vec<String> {
        match kind {
            Kind::Listener => self.accepted.listeners.keys().cloned().collect(),
            Kind::RouteConfiguration => self.accepted.routes.keys().cloned().collect(),
            Kind::Cluster => self.accepted.clusters.keys().cloned().collect(),
            Kind::ClusterLoadAssignment => self.accepted.endpoints.keys().cloned().collect(),
            Kind::Address => self.accepted.workloads.keys().cloned().collect(),
            Kind::Authorization => self.accepted.authorizations.keys().cloned().collect(),
            Kind::PeerAuthentication => {
                self.accepted.peer_authentications.keys().cloned().collect()
            }
        }
    }

    /// Checks every resource of a response; the first problem rejects it all.
    fn check_all(
        kind: Kind,
        items: impl Iterator<Item = (Option<String>, Any)>,
    ) -> Result<Vec<(String, Checked)>, String> {
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        for (wrapper_name, any) in items {
            let (name, c) = check(kind, &any)?;
            if let Some(w) = wrapper_name {
                if w != name {
                    return Err(format!(
                        "resource {w:?} carries a {} named {name:?}",
                        kind.type_url()
                    ));
                }
            }
            if !seen.insert(name.clone()) {
                return Err(format!("resource {name:?} appears twice in one response"));
            }
            out.push((name, c));
        }
        Ok(out)
    }

    fn verdict(
        &mut self,
        type_url: &str,
        version_info: &str,
        nonce: &str,
        reason: Option<String>,
        resources: usize,
    ) {
        self.verdicts += 1;
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(Verdict {
            seq: self.verdicts,
            type_url: type_url.to_owned(),
            version_info: version_info.to_owned(),
            nonce: nonce.to_owned(),
            accepted: reason.is_none(),
            reason,
            resources,
        });
    }

    fn nack(
        &mut self,
        type_url: &str,
        version_info: &str,
        nonce: &str,
        reason: String,
    ) -> RpcStatus {
        warn!(type_url, version_info, nonce, reason = %reason, "NACK: keeping the last good configuration");
        self.verdict(type_url, version_info, nonce, Some(reason.clone()), 0);
        self.nacks += 1;
        self.last_nack = Some(Nack {
            type_url: type_url.to_owned(),
            version_info: version_info.to_owned(),
            nonce: nonce.to_owned(),
            reason: reason.clone(),
            at_unix_ms: now_ms(),
        });
        RpcStatus {
            code: INVALID_ARGUMENT,
            message: reason,
            details: vec![],
        }
    }

    /// A state-of-the-world response: the full set of this type's subscribed resources.
    /// Returns the ACK or NACK, and whether the configuration changed.
    pub fn on_sotw(&mut self, resp: DiscoveryResponse) -> (DiscoveryRequest, bool) {
        let Some(kind) = Kind::of(&resp.type_url) else {
            let st = self.nack(
                &resp.type_url,
                &resp.version_info,
                &resp.nonce,
                format!("unknown resource type {:?}", resp.type_url),
            );
            let req = DiscoveryRequest {
                type_url: resp.type_url,
                response_nonce: resp.nonce,
                error_detail: Some(st),
                ..Default::default()
            };
            return (req, false);
        };
        let checked = Core::check_all(kind, resp.resources.into_iter().map(|a| (None, a)));
        let (error_detail, changed) = match checked {
            Err(reason) => (
                Some(self.nack(&resp.type_url, &resp.version_info, &resp.nonce, reason)),
                false,
            ),
            Ok(items) => {
                let now = now_ms();
                let new_names: BTreeSet<String> = items.iter().map(|(n, _)| n.clone()).collect();
                // For this type, the response replaces what we had.
                for old in self.names(kind) {
                    if !new_names.contains(&old) {
                        self.remove(kind, &old);
                        let st = self.types.entry(kind).or_default();
                        st.versions.remove(&old);
                        st.updated_unix_ms.remove(&old);
                    }
                }
                if kind == Kind::Listener {
                    let mut d = self.demand();
                    let (delivered, missing): (Vec<SocketAddr>, Vec<SocketAddr>) = d
                        .wanted
                        .iter()
                        .partition(|w| new_names.contains(&listener_name(**w)));
                    // Delivered names leave `absent` first: marking the missing ones may
                    // forget the oldest absent names, which must not be names this very
                    // response delivers.
                    for w in &delivered {
                        d.absent.remove(w);
                    }
                    for w in missing {
                        // Forgotten by `mark_absent` earlier in this loop: marking it again
                        // would forget the next oldest, and so on through the whole set.
                        if d.wanted.contains(&w) {
                            d.mark_absent(w);
                        }
                    }
                    d.listener_updated_ms = new_names.iter().map(|n| (n.clone(), now)).collect();
                    d.listeners_known = !resp.version_info.is_empty();
                }
                for (name, c) in items {
                    let st = self.types.entry(kind).or_default();
                    st.versions.insert(name.clone(), resp.version_info.clone());
                    st.updated_unix_ms.insert(name.clone(), now);
                    self.insert(c, name);
                }
                self.acks += 1;
                self.verdict(
                    &resp.type_url,
                    &resp.version_info,
                    &resp.nonce,
                    None,
                    new_names.len(),
                );
                self.types.entry(kind).or_default().version_info = resp.version_info.clone();
                (None, true)
            }
        };
        let st = self.types.entry(kind).or_default();
        st.last_nonce = resp.nonce.clone();
        let req = DiscoveryRequest {
            version_info: st.version_info.clone(),
            resource_names: if st.wildcard {
                vec![]
            } else {
                st.subscribed.iter().cloned().collect()
            },
            type_url: resp.type_url,
            response_nonce: resp.nonce,
            error_detail,
            ..Default::default()
        };
        (req, changed)
    }

    /// A delta response: upserts and removals.
    pub fn on_delta(&mut self, resp: DeltaDiscoveryResponse) -> (DeltaDiscoveryRequest, bool) {
        let Some(kind) = Kind::of(&resp.type_url) else {
            let st = self.nack(
                &resp.type_url,
                &resp.system_version_info,
                &resp.nonce,
                format!("unknown resource type {:?}", resp.type_url),
            );
            return (
                DeltaDiscoveryRequest {
                    type_url: resp.type_url,
                    response_nonce: resp.nonce,
                    error_detail: Some(st),
                    ..Default::default()
                },
                false,
            );
        };
        let mut versions = HashMap::new();
        let items = resp.resources.into_iter().filter_map(|r| {
            versions.insert(r.name.clone(), r.version.clone());
            match r.resource {
                Some(a) => Some((Some(r.name), a)),
                // A resource without a body (a heartbeat/TTL refresh) changes nothing.
                None => None,
            }
        });
        let checked = Core::check_all(kind, items.collect::<Vec<_>>().into_iter());
        let mut error_detail = None;
        let mut changed = false;
        match checked {
            Err(reason) => {
                error_detail = Some(self.nack(
                    &resp.type_url,
                    &resp.system_version_info,
                    &resp.nonce,
                    reason,
                ))
            }
            Ok(items) => {
                let n = items.len() + resp.removed_resources.len();
                let now = now_ms();
                if kind == Kind::Listener {
                    let mut d = self.demand();
                    for (name, _) in &items {
                        if let Some(a) = on_demand_addr(name) {
                            d.absent.remove(&a);
                        }
                        d.listener_updated_ms.insert(name.clone(), now);
                    }
                    for name in &resp.removed_resources {
                        d.listener_updated_ms.remove(name);
                        match on_demand_addr(name) {
                            Some(a) if d.wanted.contains(&a) => d.mark_absent(a),
                            _ => {}
                        }
                    }
                    d.listeners_known = !resp.system_version_info.is_empty();
                }
                for (name, c) in items {
                    let st = self.types.entry(kind).or_default();
                    st.versions
                        .insert(name.clone(), versions.remove(&name).unwrap_or_default());
                    st.updated_unix_ms.insert(name.clone(), now);
                    self.insert(c, name);
                    changed = true;
                }
                for name in &resp.removed_resources {
                    let st = self.types.entry(kind).or_default();
                    st.versions.remove(name);
                    st.updated_unix_ms.remove(name);
                    self.remove(kind, name);
                    changed = true;
                }
                self.acks += 1;
                self.verdict(
                    &resp.type_url,
                    &resp.system_version_info,
                    &resp.nonce,
                    None,
                    n,
                );
                self.types.entry(kind).or_default().version_info = resp.system_version_info.clone();
            }
        }
        self.types.entry(kind).or_default().last_nonce = resp.nonce.clone();
        (
            DeltaDiscoveryRequest {
                type_url: resp.type_url,
                response_nonce: resp.nonce,
                error_detail,
                ..Default::default()
            },
            changed,
        )
    }

    /// The subscriptions the accepted resources call for. Returns the kinds whose
    /// subscription changed, with (added, removed) names.
    pub fn resubscribe(&mut self) -> Vec<(Kind, Vec<String>, Vec<String>)> {
        // Subscriptions change only here: with the references as they were when last
        // computed, and no on-demand names (which change on their own), every
        // subscription already is what they call for.
        if self.references.is_some() && !self.on_demand {
            return Vec::new();
        }
        let (rds, cds, eds) = self
            .references
            .get_or_insert_with(|| self.accepted.references())
            .clone();
        let mut want: BTreeMap<Kind, BTreeSet<String>> = BTreeMap::new();
        want.insert(Kind::RouteConfiguration, rds.into_iter().collect());
        want.insert(Kind::ClusterLoadAssignment, eds.into_iter().collect());
        if self.on_demand {
            want.insert(Kind::Cluster, cds.into_iter().collect());
            let wanted = self
                .demand()
                .wanted
                .iter()
                .map(|a| listener_name(*a))
                .collect();
            want.insert(Kind::Listener, wanted);
        }
        let mut out = Vec::new();
        for (kind, names) in want {
            let st = self.types.entry(kind).or_default();
            if st.wildcard {
                continue;
            }
            let added: Vec<String> = names.difference(&st.subscribed).cloned().collect();
            let removed: Vec<String> = st.subscribed.difference(&names).cloned().collect();
            if !added.is_empty() || !removed.is_empty() {
                st.subscribed = names;
                out.push((kind, added, removed));
            }
        }
        out
    }

    /// Requests to send on a new stream (or for a type never asked for yet).
    fn sotw_request(&mut self, kind: Kind, node: Option<Node>) -> Option<DiscoveryRequest> {
        let st = self.types.entry(kind).or_default();
        if !st.wildcard && st.subscribed.is_empty() && !st.sent {
            // An empty first request would mean "everything" for LDS and CDS.
            return None;
        }
        st.sent = true;
        Some(DiscoveryRequest {
            version_info: st.version_info.clone(),
            node,
            resource_names: if st.wildcard {
                vec![]
            } else {
                st.subscribed.iter().cloned().collect()
            },
            type_url: kind.type_url(),
            response_nonce: st.last_nonce.clone(),
            ..Default::default()
        })
    }

    fn delta_initial(&mut self, kind: Kind, node: Option<Node>) -> Option<DeltaDiscoveryRequest> {
        let st = self.types.entry(kind).or_default();
        if !st.wildcard && st.subscribed.is_empty() {
            return None;
        }
        st.sent = true;
        Some(DeltaDiscoveryRequest {
            node,
            type_url: kind.type_url(),
            resource_names_subscribe: if st.wildcard {
                vec!["*".into()]
            } else {
                st.subscribed.iter().cloned().collect()
            },
            initial_resource_versions: st.versions.clone().into_iter().collect(),
            ..Default::default()
        })
    }

    fn stream_reset(&mut self) {
        for st in self.types.values_mut() {
            st.sent = false;
            st.last_nonce.clear();
        }
    }
}

type AdsClient = AggregatedDiscoveryServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        crate::wire::Credentials,
    >,
>;

/// What differs between the two protocol variants of a stream.
trait Variant {
    type Req: Send + 'static;
    type Resp: Send + 'static;
    const NAME: &'static str;
    /// The type a response carries.
    fn type_url(resp: &Self::Resp) -> &str;
    /// The first request for a type on a new stream, if the type has a subscription.
    fn initial(core: &mut Core, kind: Kind, node: Option<Node>) -> Option<Self::Req>;
    /// Judges a response: the ACK or NACK, and whether the configuration changed.
    fn judge(core: &mut Core, resp: Self::Resp) -> (Self::Req, bool);
    /// Requests for subscriptions that changed.
    fn changes(core: &mut Core, node: &mut Option<Node>) -> Vec<Self::Req>;
    fn open(
        client: &mut AdsClient,
        requests: ReceiverStream<Self::Req>,
    ) -> impl std::future::Future<
        Output = Result<tonic::Response<tonic::Streaming<Self::Resp>>, tonic::Status>,
    > + Send;
}

struct Sotw;
struct Delta;

impl Variant for Sotw {
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;
    const NAME: &'static str = "SotW";

    fn type_url(resp: &DiscoveryResponse) -> &str {
        &resp.type_url
    }

    fn initial(core: &mut Core, kind: Kind, node: Option<Node>) -> Option<DiscoveryRequest> {
        core.sotw_request(kind, node)
    }

    fn judge(core: &mut Core, resp: DiscoveryResponse) -> (DiscoveryRequest, bool) {
        debug!(type_url = %resp.type_url, version = %resp.version_info, nonce = %resp.nonce, n = resp.resources.len(), "SotW response");
        core.on_sotw(resp)
    }

    fn changes(core: &mut Core, node: &mut Option<Node>) -> Vec<DiscoveryRequest> {
        let mut out = Vec::new();
        for (kind, _, _) in core.resubscribe() {
            if let Some(r) = core.sotw_request(kind, node.take()) {
                out.push(r);
            }
        }
        out
    }

    fn open(
        client: &mut AdsClient,
        requests: ReceiverStream<DiscoveryRequest>,
    ) -> impl std::future::Future<
        Output = Result<tonic::Response<tonic::Streaming<DiscoveryResponse>>, tonic::Status>,
    > + Send {
        client.stream_aggregated_resources(requests)
    }
}

impl Variant for Delta {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;
    const NAME: &'static str = "delta";

    fn type_url(resp: &DeltaDiscoveryResponse) -> &str {
        &resp.type_url
    }

    fn initial(core: &mut Core, kind: Kind, node: Option<Node>) -> Option<DeltaDiscoveryRequest> {
        core.delta_initial(kind, node)
    }

    fn judge(core: &mut Core, resp: DeltaDiscoveryResponse) -> (DeltaDiscoveryRequest, bool) {
        debug!(type_url = %resp.type_url, nonce = %resp.nonce, n = resp.resources.len(), removed = resp.removed_resources.len(), "delta response");
        core.on_delta(resp)
    }

    fn changes(core: &mut Core, node: &mut Option<Node>) -> Vec<DeltaDiscoveryRequest> {
        let mut out = Vec::new();
        for (kind, added, removed) in core.resubscribe() {
            let st = core.types.entry(kind).or_default();
            if !st.sent {
                if let Some(r) = core.delta_initial(kind, node.take()) {
                    out.push(r);
                }
                continue;
            }
            for n in &removed {
                st.versions.remove(n);
            }
            out.push(DeltaDiscoveryRequest {
                node: node.take(),
                type_url: kind.type_url(),
                resource_names_subscribe: added,
                resource_names_unsubscribe: removed,
                ..Default::default()
            });
        }
        out
    }

    fn open(
        client: &mut AdsClient,
        requests: ReceiverStream<DeltaDiscoveryRequest>,
    ) -> impl std::future::Future<
        Output = Result<tonic::Response<tonic::Streaming<DeltaDiscoveryResponse>>, tonic::Status>,
    > + Send {
        client.delta_aggregated_resources(requests)
    }
}

/// Whether every cluster a listener sends traffic to is known with its endpoints.
fn complete(cfg: &ProxyConfig, l: &Listener) -> bool {
    use crate::proxy::config::{ListenerKind, RouteAction};
    let known = |c: &str| cfg.cluster(c).is_some_and(|c| c.endpoints_known);
    let fallback_ok = l.tcp_fallback.as_deref().is_none_or(known);
    fallback_ok
        && match &l.kind {
            ListenerKind::Tcp { cluster } => known(cluster),
            ListenerKind::Http(h) => h.route_config.virtual_hosts.iter().all(|vh| {
                vh.routes.iter().all(|r| match &r.action {
                    RouteAction::Forward(f) => f.clusters.iter().all(|c| known(&c.name)),
                    _ => true,
                })
            }),
        }
}

/// The client: runs the stream, publishes the configuration, answers on-demand lookups.
pub struct XdsClient {
    opts: ClientOptions,
    /// The stream's state: the stream task and the admin endpoint only.
    core: Mutex<Core>,
    /// `Core`'s `Demand`: what lookups on proxy threads take.
    lookups: Arc<Mutex<Demand>>,
    config: watch::Sender<Arc<ProxyConfig>>,
    /// Workloads and policies in force.
    mesh: watch::Sender<Arc<MeshConfig>>,
    /// Bumped after every processed response (on-demand waiters re-check).
    generation: watch::Sender<u64>,
    demand: Notify,
}

impl XdsClient {
    pub fn new(opts: ClientOptions) -> Arc<XdsClient> {
        let (config, _) = watch::channel(Arc::new(ProxyConfig::default()));
        let (mesh, _) = watch::channel(Arc::new(MeshConfig::default()));
        let (generation, _) = watch::channel(0);
        let core = Core::new(opts.on_demand);
        Arc::new(XdsClient {
            lookups: core.demand.clone(),
            core: Mutex::new(core),
            opts,
            config,
            mesh,
            generation,
            demand: Notify::new(),
        })
    }

    /// Verdicts after `seq`.
    pub fn verdicts_after(&self, seq: u64) -> Vec<Verdict> {
        self.core()
            .history
            .iter()
            .filter(|v| v.seq > seq)
            .cloned()
            .collect()
    }

    /// Responses accepted (ACK) and refused (NACK) since start.
    pub fn verdict_counts(&self) -> (u64, u64) {
        let core = self.core();
        (core.acks, core.nacks)
    }

    pub fn connected(&self) -> bool {
        self.demand().connected
    }

    pub fn config(&self) -> watch::Receiver<Arc<ProxyConfig>> {
        self.config.subscribe()
    }

    /// Workloads and policies in force (`MeshConfig::version` 0 until the first
    /// accepted response of those types): `WorkloadIndex::by_ip`, and `proxy::authz`'s
    /// `authorize`, `authorize_request`, `needs_http`, `mtls_mode` on `policies`.
    pub fn mesh(&self) -> watch::Receiver<Arc<MeshConfig>> {
        self.mesh.subscribe()
    }

    /// The workloads and policies in force now.
    pub fn mesh_now(&self) -> Arc<MeshConfig> {
        self.mesh.borrow().clone()
    }

    fn core(&self) -> std::sync::MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lookups' state; never held across anything but set and map operations.
    fn demand(&self) -> std::sync::MutexGuard<'_, Demand> {
        self.lookups.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The listener for a captured connection's original destination, subscribing to it
    /// first when on demand. `None`: no listener, or none known (see `lookup`).
    pub async fn listener_for(&self, dst: SocketAddr) -> Option<Arc<Listener>> {
        self.lookup(dst).await.found()
    }

    /// What the configuration says about `dst`: a listener, none (plain L4 is right), or
    /// nothing known yet (the control plane unreachable, or not answering in time); the
    /// caller applies the workload's fail mode to the last case.
    pub async fn lookup(&self, dst: SocketAddr) -> Lookup {
        match self.lookup_now(dst) {
            Some(answer) => answer,
            None => self.await_listener(dst).await,
        }
    }

    /// `lookup`'s answer when it needs no wait (a listener in force, or a destination
    /// known to have none); `None`: `dst` is now subscribed, and `await_listener` waits for
    /// the answer. The proxy calls this first, so an accepted connection whose destination
    /// is known never makes (or allocates) the waiting future.
    pub fn lookup_now(&self, dst: SocketAddr) -> Option<Lookup> {
        let in_force = {
            let cfg = self.config.borrow();
            cfg.listener(dst).map(|l| (l.clone(), complete(&cfg, l)))
        };
        if let Some((l, true)) = in_force {
            return Some(Lookup::Found(l));
        }
        {
            let mut demand = self.demand();
            // A listener in force before what its routes send traffic to: its clusters and
            // endpoints follow it within a round trip or two, and a connection served now
            // gets 503 (no cluster) for its first requests. Found by the soak: the second
            // of two clients calling a new service met the listener the first client's
            // lookup was still waiting to complete. Wait like that lookup does, unless the
            // listener stayed incomplete past the on-demand timeout (what it lacks is not
            // coming soon: serve it, as Envoy would) or the stream is down.
            if let Some((l, false)) = &in_force {
                // (Formatted only here: a listener waiting for its clusters is rare.)
                let accepted_ms = demand.listener_updated_ms.get(&listener_name(dst)).copied();
                let recent = accepted_ms.is_some_and(|at| {
                    u128::from(now_ms().saturating_sub(at))
                        < self.opts.on_demand_timeout.as_millis()
                });
                if !self.opts.on_demand || !demand.connected || !recent {
                    return Some(Lookup::Found(l.clone()));
                }
            }
            if !self.opts.on_demand {
                // Wildcard: what the last accepted response holds is the answer, once
                // there is one.
                return Some(if demand.listeners_known {
                    Lookup::Absent
                } else {
                    Lookup::Unknown("no listener configuration received yet")
                });
            }
            if demand.absent.contains(&dst) {
                return Some(Lookup::Absent);
            }
            // Not connected (yet: an agent that just took the node over): subscribe anyway,
            // the next stream asks for it first thing, and wait like any lookup (bounded).
            if demand.wanted.insert(dst) {
                debug!(listener = %dst, "subscribing on demand");
                self.demand.notify_one();
            }
        }
        None
    }

    /// The wait of `lookup` for a subscribed `dst` (after `lookup_now` said `None`): until
    /// its listener is in force with everything it sends traffic to, the server says it
    /// has none, or the on-demand timeout.
    pub async fn await_listener(&self, dst: SocketAddr) -> Lookup {
        let mut generation = self.generation.subscribe();
        let deadline = tokio::time::Instant::now() + self.opts.on_demand_timeout;
        loop {
            // Ready when the listener and everything it sends traffic to have arrived.
            let found = {
                let cfg = self.config.borrow();
                cfg.listener(dst).map(|l| (l.clone(), complete(&cfg, l)))
            };
            if let Some((l, true)) = found {
                return Lookup::Found(l);
            }
            if self.demand().absent.contains(&dst) {
                return Lookup::Absent;
            }
            match tokio::time::timeout_at(deadline, generation.changed()).await {
                Ok(Ok(())) => continue,
                _ => {
                    debug!(listener = %dst, "the listener did not arrive complete in time");
                    return match found {
                        Some((l, _)) => Lookup::Found(l),
                        None if !self.connected() => {
                            Lookup::Unknown("the control plane is not connected")
                        }
                        None => Lookup::Unknown("the control plane did not answer in time"),
                    };
                }
            }
        }
    }

    /// Builds and publishes the configuration in force, numbered after the last one.
    fn publish(&self, core: &mut Core) {
        let (mut cfg, warming) = core.accepted.build_with(&mut core.memo);
        core.warming = warming;
        core.published += 1;
        cfg.version = core.published;
        self.config.send_replace(Arc::new(cfg));
    }

    /// Builds and publishes the workloads and policies in force.
    fn publish_mesh(&self, core: &mut Core) {
        let mut m = core.accepted.build_mesh();
        core.mesh_published += 1;
        m.version = core.mesh_published;
        if !m.workloads.conflicts.is_empty() {
            warn!(addresses = ?m.workloads.conflicts, "addresses claimed by more than one workload; the first by uid keeps each");
        }
        self.mesh.send_replace(Arc::new(m));
    }

    fn node(&self) -> Node {
        use envoy_types::pb::{
            envoy::config::core::v3::node::UserAgentVersionType,
            google::protobuf::{value::Kind as V, Struct, Value},
        };
        let text = |s: &str| Value {
            kind: Some(V::StringValue(s.to_owned())),
        };
        // What a control plane may want to know to tailor its answers.
        let metadata = Struct {
            fields: [
                ("proxy".to_owned(), text("mesh-agent node proxy")),
                (
                    "on_demand_listeners".to_owned(),
                    Value {
                        kind: Some(V::BoolValue(self.opts.on_demand)),
                    },
                ),
                ("listener_names".to_owned(), text("<ip>:<port>")),
            ]
            .into_iter()
            .collect(),
        };
        Node {
            id: self.opts.node_id.clone(),
            cluster: self.opts.cluster.clone(),
            metadata: Some(metadata),
            user_agent_name: "mesh-agent".into(),
            user_agent_version_type: Some(UserAgentVersionType::UserAgentVersion(
                env!("CARGO_PKG_VERSION").to_owned(),
            )),
            ..Default::default()
        }
    }

    /// Runs forever: connect, stream, back off, reconnect.
    pub async fn run(self: Arc<Self>) {
        let mut backoff = BACKOFF_START;
        loop {
            let started = Instant::now();
            let r = match self.opts.mode {
                Mode::Sotw => self.clone().stream::<Sotw>().await,
                Mode::Delta => self.clone().stream::<Delta>().await,
            };
            self.core().stream_reset();
            self.demand().connected = false;
            self.generation.send_modify(|g| *g += 1);
            match r {
                Ok(()) => info!("ADS stream closed by the server; reconnecting"),
                Err(e) => {
                    warn!(error = %e, address = %self.opts.address, "ADS stream failed; reconnecting")
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff = BACKOFF_START;
            }
            let jitter = 0.5 + fastrand::f64();
            tokio::time::sleep(backoff.mul_f64(jitter)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn connect(&self) -> Result<AdsClient, String> {
        let address = &self.opts.address;
        let ch = match address.strip_prefix("unix:") {
            Some(path) => {
                // The URI is only a placeholder: the connector dials the socket.
                let path = std::path::PathBuf::from(path);
                tonic::transport::Endpoint::from_static("http://ads.local")
                    .connect_timeout(Duration::from_secs(2))
                    .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                        let path = path.clone();
                        async move {
                            tokio::net::UnixStream::connect(path)
                                .await
                                .map(hyper_util::rt::TokioIo::new)
                        }
                    }))
                    .await
            }
            None => {
                tonic::transport::Endpoint::from_shared(address.clone())
                    .map_err(|e| format!("bad xDS address {address:?}: {e}"))?
                    .connect_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true)
                    .connect()
                    .await
            }
        }
        .map_err(|e| format!("connecting to {address}: {e}"))?;
        let creds = crate::wire::Credentials::bearer(self.opts.token.as_ref());
        Ok(
            AggregatedDiscoveryServiceClient::with_interceptor(ch, creds)
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(64 << 20),
        )
    }

    /// One stream of either variant: subscribe, then judge responses and follow
    /// subscription changes (references, on-demand listeners) until the stream ends.
    async fn stream<V: Variant>(self: Arc<Self>) -> Result<(), String> {
        let mut client = self.connect().await?;
        let (tx, rx) = mpsc::channel::<V::Req>(64);
        // The node goes with the first request only.
        let mut node = Some(self.node());
        {
            let mut core = self.core();
            let _ = core.resubscribe();
            for k in Kind::ALL {
                if let Some(r) = V::initial(&mut core, k, node.clone()) {
                    node = None;
                    let _ = tx.try_send(r);
                }
            }
        }
        let mut responses = V::open(&mut client, ReceiverStream::new(rx))
            .await
            .map_err(|e| format!("opening the {} stream: {e}", V::NAME))?
            .into_inner();
        self.demand().connected = true;
        info!(address = %self.opts.address, variant = V::NAME, "ADS stream open");
        self.generation.send_modify(|g| *g += 1);
        loop {
            let out = tokio::select! {
                m = responses.next() => {
                    let resp = match m {
                        None => return Ok(()),
                        Some(Err(e)) => return Err(e.to_string()),
                        Some(Ok(r)) => r,
                    };
                    let mesh = Kind::of(V::type_url(&resp)).is_some_and(Kind::is_mesh);
                    let mut core = self.core();
                    let (ack, changed) = V::judge(&mut core, resp);
                    let mut out = vec![ack];
                    if changed && mesh {
                        self.publish_mesh(&mut core);
                    } else if changed {
                        self.publish(&mut core);
                    }
                    if core.take_pruned() || changed {
                        out.extend(V::changes(&mut core, &mut node));
                    }
                    out
                }
                _ = self.demand.notified() => V::changes(&mut self.core(), &mut node),
            };
            for r in out {
                tx.send(r)
                    .await
                    .map_err(|_| "request stream closed".to_string())?;
            }
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// `/config_dump`: what is in force, at which versions, what warms, the last NACK.
    /// The locks are held while copying only: the admin endpoint renders on a blocking
    /// thread, and the stream task (on the control runtime) takes the same lock.
    pub fn dump(&self) -> serde_json::Value {
        let core = {
            let c = self.core();
            Core {
                on_demand: c.on_demand,
                types: c.types.clone(),
                last_nack: c.last_nack.clone(),
                warming: c.warming.clone(),
                acks: c.acks,
                nacks: c.nacks,
                history: c.history.iter().rev().take(20).cloned().collect(),
                ..Default::default()
            }
        };
        let (connected, wanted, absent) = {
            let d = self.demand();
            // By name, as subscribed (and in the names' order).
            let names = |set: &BTreeSet<SocketAddr>| -> BTreeSet<String> {
                set.iter().map(|a| listener_name(*a)).collect()
            };
            (d.connected, names(&d.wanted), names(&d.absent))
        };
        let cfg = self.config.borrow().clone();
        let mesh = self.mesh.borrow().clone();
        let types: BTreeMap<Kind, serde_json::Value> = core
            .types
            .iter()
            .map(|(k, st)| {
                let resources: Vec<serde_json::Value> = st
                    .versions
                    .iter()
                    .map(|(name, v)| {
                        serde_json::json!({
                            "name": name,
                            "version": v,
                            "last_updated_unix_ms": st.updated_unix_ms.get(name),
                        })
                    })
                    .collect();
                (
                    *k,
                    serde_json::json!({
                        "type_url": k.type_url(),
                        "version_info": st.version_info,
                        "last_nonce": st.last_nonce,
                        "wildcard": st.wildcard,
                        "subscribed": st.subscribed,
                        "resources": resources,
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "xds": {
                "server": self.opts.address,
                "mode": self.opts.mode,
                "node": { "id": self.opts.node_id, "cluster": self.opts.cluster },
                "connected": connected,
                "on_demand": core.on_demand,
                "acks": core.acks,
                "nacks": core.nacks,
                "last_nack": core.last_nack,
            },
            "resources": types,
            "warming": {
                "listeners": core.warming.listeners,
                "clusters": core.warming.clusters,
            },
            "on_demand": { "requested": wanted, "absent": absent },
            // Newest first (copied so).
            "recent_verdicts": core.history,
            "in_force": super::dump::config(&cfg),
            "mesh": super::dump::mesh(&mesh),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const FILE: &str = "\
namespaces:
  - { name: shop }
services:
  - name: db
    namespace: shop
    vip: 10.96.0.12
    ports: [ { port: 5432, protocol: tcp } ]
    endpoints: [ { ip: 10.0.0.4 } ]
";
    const DB: &str = "10.96.0.12:5432";

    fn client(on_demand: bool) -> Arc<XdsClient> {
        XdsClient::new(ClientOptions {
            // Never dialled: the tests feed responses as the stream task would.
            address: "unix:/nonexistent".into(),
            token: None,
            node_id: "node".into(),
            cluster: "test".into(),
            mode: Mode::Sotw,
            on_demand,
            on_demand_timeout: Duration::from_millis(50),
        })
    }

    /// Judges one SotW response per kind (those in `kinds`) of the file's resources and
    /// publishes what changed, as the stream task does.
    fn accept(c: &XdsClient, kinds: &[Kind], version: &str) {
        let file = crate::enrol::file::MeshFile::parse(Path::new("t.yaml"), FILE).unwrap();
        let resources = crate::control::translate::resources(&file);
        let mut core = c.core();
        for kind in kinds {
            let resp = DiscoveryResponse {
                version_info: version.into(),
                nonce: format!("{kind:?}-{version}"),
                type_url: kind.type_url(),
                resources: resources
                    .iter()
                    .filter(|(_, a)| a.type_url == kind.type_url())
                    .map(|(_, a)| a.clone())
                    .collect(),
                ..Default::default()
            };
            let (req, changed) = core.on_sotw(resp);
            assert!(req.error_detail.is_none(), "{kind:?}: {req:?}");
            if changed && kind.is_mesh() {
                c.publish_mesh(&mut core);
            } else if changed {
                c.publish(&mut core);
            }
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// `lookup(dst)` from a thread of its own (a proxy thread) while this thread holds
    /// what the stream task holds while it judges a response and builds the
    /// configuration. The answer must come while that is held: a lookup that took the
    /// stream's lock would block here until the bound below and fail.
    fn lookup_while_judging(c: &Arc<XdsClient>, dst: SocketAddr) -> Lookup {
        let judging = c.core();
        let (tx, rx) = std::sync::mpsc::channel();
        let proxy = {
            let c = c.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let _ = tx.send(rt.block_on(c.lookup(dst)));
            })
        };
        let got = rx.recv_timeout(Duration::from_secs(10));
        drop(judging);
        proxy.join().unwrap();
        got.expect("the lookup waited for the stream's lock (held while judging)")
    }

    /// Issue 9, item 3: proxy threads never wait for a response being judged.
    #[test]
    fn on_demand_lookups_answer_while_a_response_is_judged() {
        let c = client(true);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Wanted while the stream is down: waits out the on-demand timeout.
        let nowhere = addr("10.9.9.9:80");
        assert!(matches!(
            rt.block_on(c.lookup(nowhere)),
            Lookup::Unknown("the control plane is not connected")
        ));
        assert!(matches!(
            lookup_while_judging(&c, addr("10.9.9.8:80")),
            Lookup::Unknown("the control plane is not connected")
        ));
        c.demand().wanted.insert(addr(DB));
        // The listener alone: in force, incomplete (its cluster has not arrived).
        accept(&c, &[Kind::Listener], "1");
        assert!(c.demand().absent.contains(&nowhere));
        assert!(matches!(lookup_while_judging(&c, nowhere), Lookup::Absent));
        // Recently accepted but the stream is down: served as it is.
        assert!(matches!(
            lookup_while_judging(&c, addr(DB)),
            Lookup::Found(l) if l.name == DB
        ));
        // Recently accepted, connected: waits for its cluster, which does not come.
        c.demand().connected = true;
        assert!(matches!(
            lookup_while_judging(&c, addr(DB)),
            Lookup::Found(l) if l.name == DB
        ));
        accept(&c, &[Kind::Cluster, Kind::ClusterLoadAssignment], "1");
        assert!(matches!(
            lookup_while_judging(&c, addr(DB)),
            Lookup::Found(l) if l.name == DB
        ));
        assert!(matches!(
            lookup_while_judging(&c, addr("10.9.9.7:80")),
            Lookup::Unknown("the control plane did not answer in time")
        ));
    }

    /// A SotW listener response that delivers the oldest absent name while the absent set
    /// is at its cap and another wanted name (earlier in the set's order) turns absent:
    /// the delivered name stays wanted (subscribed), the set stays at its cap, nothing is
    /// forgotten.
    #[test]
    fn a_delivered_name_is_not_forgotten_for_a_new_absent_one() {
        let c = client(true);
        {
            let mut d = c.demand();
            // DB is the oldest absent name, then fillers up to the cap.
            d.wanted.insert(addr(DB));
            d.mark_absent(addr(DB));
            for i in 0..MAX_ABSENT_LISTENERS - 1 {
                let a = SocketAddr::from(([10, 200, (i / 250) as u8, (i % 250) as u8], 80));
                d.wanted.insert(a);
                d.mark_absent(a);
            }
            assert_eq!(d.absent.len(), MAX_ABSENT_LISTENERS);
            // Wanted, not yet answered; ordered before DB.
            d.wanted.insert(addr("10.1.1.1:80"));
        }
        accept(&c, &[Kind::Listener], "1");
        let d = c.demand();
        assert!(
            d.wanted.contains(&addr(DB)),
            "the delivered name was forgotten"
        );
        assert!(!d.absent.contains(&addr(DB)));
        assert!(d.absent.contains(&addr("10.1.1.1:80")));
        assert_eq!(d.absent.len(), MAX_ABSENT_LISTENERS);
        assert!(!d.pruned, "nothing was to be forgotten");
    }

    /// Subscriptions follow the accepted references, recomputed only when a listener,
    /// route configuration or cluster changed: an endpoints response changes none, a
    /// cluster added or gone (in one response after another) changes the EDS set.
    #[test]
    fn subscriptions_follow_references_across_changes() {
        let sotw = |core: &mut Core, file: &str, kind: Kind, version: &str| {
            let f = crate::enrol::file::MeshFile::parse(Path::new("t.yaml"), file).unwrap();
            let resp = DiscoveryResponse {
                version_info: version.into(),
                nonce: format!("{kind:?}-{version}"),
                type_url: kind.type_url(),
                resources: crate::control::translate::resources(&f)
                    .into_iter()
                    .filter(|(_, a)| a.type_url == kind.type_url())
                    .map(|(_, a)| a)
                    .collect(),
                ..Default::default()
            };
            let (req, _) = core.on_sotw(resp);
            assert!(req.error_detail.is_none(), "{kind:?}: {req:?}");
        };
        let two = format!(
            "{FILE}  - {{ name: web, namespace: shop, vip: 10.96.0.13, ports: [ {{ port: 80, protocol: http }} ], endpoints: [ {{ ip: 10.0.0.5 }} ] }}\n"
        );
        let mut core = Core::new(false);
        sotw(&mut core, FILE, Kind::Cluster, "1");
        let eds = |changes: &[(Kind, Vec<String>, Vec<String>)]| {
            changes
                .iter()
                .find(|(k, _, _)| *k == Kind::ClusterLoadAssignment)
                .map(|(_, a, r)| (a.len(), r.len()))
        };
        assert_eq!(eds(&core.resubscribe()), Some((1, 0)));
        assert!(core.resubscribe().is_empty(), "nothing changed");
        sotw(&mut core, FILE, Kind::ClusterLoadAssignment, "1");
        assert!(core.resubscribe().is_empty(), "endpoints only");
        // A second cluster, then a listener with its route configuration, then it goes.
        sotw(&mut core, &two, Kind::Cluster, "2");
        assert_eq!(eds(&core.resubscribe()), Some((1, 0)));
        sotw(&mut core, &two, Kind::Listener, "2");
        let rds = core.resubscribe();
        assert!(rds
            .iter()
            .any(|(k, a, _)| *k == Kind::RouteConfiguration && a.len() == 1));
        sotw(&mut core, FILE, Kind::Cluster, "3");
        assert_eq!(eds(&core.resubscribe()), Some((0, 1)));
        assert_eq!(
            core.types[&Kind::ClusterLoadAssignment].subscribed.len(),
            1,
            "{:?}",
            core.types[&Kind::ClusterLoadAssignment].subscribed
        );
    }

    #[test]
    fn wildcard_lookups_answer_while_a_response_is_judged() {
        let c = client(false);
        assert!(matches!(
            lookup_while_judging(&c, addr("10.9.9.9:80")),
            Lookup::Unknown("no listener configuration received yet")
        ));
        accept(&c, &Kind::ALL, "1");
        assert!(matches!(
            lookup_while_judging(&c, addr("10.9.9.9:80")),
            Lookup::Absent
        ));
        assert!(matches!(
            lookup_while_judging(&c, addr(DB)),
            Lookup::Found(l) if l.name == DB
        ));
    }

    /// Issue 9, item 3: every configuration published carries the next version, shown in
    /// `/config_dump`; a response that changes nothing publishes nothing.
    #[test]
    fn published_configurations_are_numbered() {
        let c = client(false);
        assert_eq!(c.config().borrow().version, 0);
        assert_eq!(c.dump()["in_force"]["version"], 0);
        accept(&c, &[Kind::Cluster], "1");
        assert_eq!(c.config().borrow().version, 1);
        accept(&c, &[Kind::ClusterLoadAssignment, Kind::Listener], "1");
        assert_eq!(c.config().borrow().version, 3);
        assert_eq!(c.dump()["in_force"]["version"], 3);
        // A NACK keeps the configuration (and its version) in force.
        let mut core = c.core();
        let (req, changed) = core.on_sotw(DiscoveryResponse {
            version_info: "2".into(),
            nonce: "bad".into(),
            type_url: Kind::Cluster.type_url(),
            resources: vec![Any {
                type_url: Kind::Cluster.type_url(),
                value: vec![0xff],
            }],
            ..Default::default()
        });
        drop(core);
        assert!(req.error_detail.is_some() && !changed);
        assert_eq!(c.config().borrow().version, 3);
    }

    /// Issue 11: workloads and policies arrive as their own types, are judged like the
    /// others (an action the proxy cannot honour is refused, naming the field, and the
    /// last good policies stay), and are published as `MeshConfig`, shown in the dump.
    #[test]
    fn workloads_and_policies_are_judged_and_published_apart() {
        use prost::Message;
        let c = client(true);
        let any = |url: &str, value: Vec<u8>| Any {
            type_url: url.to_owned(),
            value,
        };
        let workload = istio::Address {
            r#type: Some(istio::address::Type::Workload(istio::Workload {
                uid: "Kubernetes//Pod/shop/web".into(),
                name: "web".into(),
                namespace: "shop".into(),
                addresses: vec![vec![10, 0, 0, 2]],
                tunnel_protocol: istio::TunnelProtocol::Hbone as i32,
                service_account: "web".into(),
                node: "node-b".into(),
                authorization_policies: vec!["shop/p".into()],
                ..Default::default()
            })),
        };
        let policy = |action: i32| istio::Authorization {
            name: "p".into(),
            namespace: "shop".into(),
            scope: istio::Scope::WorkloadSelector as i32,
            action,
            rules: vec![],
        };
        let judge = |url: &str, items: Vec<Vec<u8>>, nonce: &str| {
            let mut core = c.core();
            let (req, changed) = core.on_sotw(DiscoveryResponse {
                version_info: nonce.into(),
                nonce: nonce.into(),
                type_url: url.into(),
                resources: items.into_iter().map(|v| any(url, v)).collect(),
                ..Default::default()
            });
            if changed {
                c.publish_mesh(&mut core);
            }
            req
        };
        // Subscribed as a whole even on demand.
        assert!(c.core().types[&Kind::Address].wildcard);
        let req = judge(istio::ADDRESS_TYPE_URL, vec![workload.encode_to_vec()], "1");
        assert!(req.error_detail.is_none(), "{req:?}");
        let req = judge(
            istio::AUTHORIZATION_TYPE_URL,
            vec![policy(istio::Action::Deny as i32).encode_to_vec()],
            "2",
        );
        assert!(req.error_detail.is_none(), "{req:?}");
        let m = c.mesh_now();
        assert_eq!(m.version, 2);
        let w = m.workloads.by_ip("10.0.0.2".parse().unwrap()).unwrap();
        assert_eq!(
            w.identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(w.hbone_addr(), Some("10.0.0.2:15008".parse().unwrap()));
        // CUSTOM (or anything newer) is refused; the DENY policy stays in force.
        let req = judge(
            istio::AUTHORIZATION_TYPE_URL,
            vec![policy(3).encode_to_vec()],
            "3",
        );
        let reason = req.error_detail.expect("a NACK").message;
        assert!(
            reason.contains("action") && reason.contains("shop/p"),
            "{reason}"
        );
        let m = c.mesh_now();
        assert_eq!(m.version, 2);
        assert_eq!(
            m.policies.authorizations["shop/p"].action,
            crate::proxy::config::policy::Action::Deny
        );
        // ProxyConfig is not republished for workloads and policies.
        assert_eq!(c.config().borrow().version, 0);
        let dump = c.dump();
        assert_eq!(dump["mesh"]["workloads"][0]["node"], "node-b");
        assert_eq!(dump["mesh"]["workloads"][0]["hbone"], "10.0.0.2:15008");
        assert_eq!(
            dump["mesh"]["authorization_policies"]["shop/p"]["action"],
            "DENY"
        );
    }
}
