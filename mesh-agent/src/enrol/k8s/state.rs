//! The cluster as the node needs it: what the watchers hold, turned into one `Snapshot`
//! (local workloads for the datapath maps, services and routes for the embedded control
//! plane). Pure: the filesystem lookups for pods are passed in, so tests feed objects.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::Arc,
};

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::{api::DynamicObject, ResourceExt as _};

use super::{
    compact::{Change, ServiceObj, SliceObj},
    routes::{self, Flavour},
};
use crate::{
    control::model::{EndpointSpec, Protocol, ServicePort, ServiceSpec},
    enrol::{
        file::{ExcludeRule, MeshFile, Mode, NamespaceSpec, WorkloadSpec},
        Snapshot,
    },
};

/// Label selecting how same-node flows to a namespace's (or a pod's) workloads are
/// carried: `direct` pairs the two sockets in the kernel, skipping the proxy.
pub const MODE_LABEL: &str = "mesh-agent.io/same-node";
/// What the watchers hold, at one instant. Services and EndpointSlices in their compact
/// form (`compact`: what `convert` reads).
#[derive(Default)]
pub struct Cluster {
    pub namespaces: Vec<Arc<Namespace>>,
    pub pods: Vec<Arc<Pod>>,
    pub services: Vec<Arc<ServiceObj>>,
    pub slices: Vec<Arc<SliceObj>>,
    pub service_accounts: Vec<Arc<ServiceAccount>>,
    pub http_routes: Vec<Arc<DynamicObject>>,
    pub grpc_routes: Vec<Arc<DynamicObject>>,
}

/// A local pod whose network namespace was not found.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Unresolved {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub reason: String,
}

pub struct Built {
    pub snapshot: Snapshot,
    pub unresolved: Vec<Unresolved>,
    /// Route rules that could not be carried, as `namespace/name: reason`.
    pub route_problems: Vec<String>,
}

pub struct Options<'a> {
    pub excludes: &'a [ExcludeRule],
    pub trust_domain: &'a str,
}

pub fn build(
    c: &Cluster,
    opts: &Options<'_>,
    resolve: &mut dyn FnMut(&Pod) -> Result<PathBuf, String>,
) -> Built {
    build_cached(c, opts, resolve, &mut ServiceCache::default())
}

/// `build`, converting again only the Services whose object, EndpointSlices or attached
/// routes changed since the last call with this cache; the others keep their converted
/// spec (the same `Arc`, which the translator then skips by pointer).
pub fn build_cached(
    c: &Cluster,
    opts: &Options<'_>,
    resolve: &mut dyn FnMut(&Pod) -> Result<PathBuf, String>,
    cache: &mut ServiceCache,
) -> Built {
    let namespaces: Vec<NamespaceSpec> = c
        .namespaces
        .iter()
        .map(|n| NamespaceSpec {
            name: n.name_any(),
            labels: n.labels().clone(),
            mode: mode_label(n.labels()).unwrap_or_default(),
        })
        .collect();
    let accounts: BTreeSet<(String, String)> = c
        .service_accounts
        .iter()
        .map(|a| (a.namespace().unwrap_or_default(), a.name_any()))
        .collect();
    let mut file = MeshFile {
        exclude: opts.excludes.to_vec(),
        namespaces,
        ..Default::default()
    };
    let mut identities = Vec::new();
    let mut pods: Vec<&Arc<Pod>> = c.pods.iter().filter(|p| is_local_workload(p)).collect();
    pods.sort_by_key(|p| (p.namespace(), p.name_any()));
    for p in pods {
        let ip = pod_ip(p).expect("filtered on an IPv4 pod IP");
        let spec = p.spec.as_ref();
        let sa = spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let ns = p.namespace().unwrap_or_default();
        identities.push(
            accounts
                .contains(&(ns.clone(), sa.clone()))
                .then(|| format!("spiffe://{}/ns/{ns}/sa/{sa}", opts.trust_domain)),
        );
        file.workloads.push(WorkloadSpec {
            name: p.name_any(),
            namespace: ns,
            ip,
            ip6: pod_ip6(p),
            netns: PathBuf::new(),
            labels: p.labels().clone(),
            mode: mode_label(p.labels()),
            service_account: Some(sa),
            node: None,
        });
    }
    // Network namespaces are looked up only for the pods that are captured.
    let mut unresolved = Vec::new();
    let mut reasons = Vec::new();
    let local: BTreeMap<(String, String), &Arc<Pod>> = c
        .pods
        .iter()
        .map(|p| ((p.namespace().unwrap_or_default(), p.name_any()), p))
        .collect();
    let enrolled: Vec<bool> = file.workloads.iter().map(|w| file.enrolled(w)).collect();
    for (w, enrolled) in file.workloads.iter_mut().zip(enrolled) {
        let mut reason = None;
        if enrolled {
            let pod = local[&(w.namespace.clone(), w.name.clone())];
            match resolve(pod) {
                Ok(path) => w.netns = path,
                Err(e) => {
                    unresolved.push(Unresolved {
                        namespace: w.namespace.clone(),
                        name: w.name.clone(),
                        uid: pod.uid().unwrap_or_default(),
                        reason: e.clone(),
                    });
                    reason = Some(e);
                }
            }
        }
        reasons.push(reason);
    }

    let mut route_problems = Vec::new();
    file.services = services(c, &mut route_problems, cache);
    // Every pod listed runs here (the watch selects this node's); their node name is
    // this node's, as the control plane's workloads carry it.
    let local = crate::enrol::LocalNode {
        node: c
            .pods
            .iter()
            .find_map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
            .unwrap_or_else(|| crate::enrol::LocalNode::from_host().node),
        trust_domain: opts.trust_domain.to_owned(),
    };
    let mut snapshot = Snapshot::from_file_on(&file, &local);
    for ((w, reason), identity) in snapshot.workloads.iter_mut().zip(reasons).zip(identities) {
        w.unresolved = reason;
        w.identity = identity;
    }
    Built {
        snapshot,
        unresolved,
        route_problems,
    }
}

fn mode_label(labels: &BTreeMap<String, String>) -> Option<Mode> {
    match labels.get(MODE_LABEL).map(String::as_str) {
        Some("direct") => Some(Mode::Direct),
        Some("proxied") => Some(Mode::Proxied),
        _ => None,
    }
}

/// Every address the pod's status names: `status.podIPs`, then `status.podIP`.
fn pod_addrs(p: &Pod) -> impl Iterator<Item = &str> {
    let st = p.status.as_ref();
    st.and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .map(|i| i.ip.as_str())
        .chain(st.and_then(|s| s.pod_ip.as_deref()))
}

fn pod_ip(p: &Pod) -> Option<Ipv4Addr> {
    pod_addrs(p).find_map(|ip| ip.parse().ok())
}

/// A dual-stack pod's IPv6 address: the IPv6 entry of `status.podIPs` (`status.podIP`
/// is the IPv4 one here, since a pod without IPv4 is not a workload). Addresses the
/// datapath never captures (link-local, loopback) are left out.
fn pod_ip6(p: &Pod) -> Option<Ipv6Addr> {
    pod_addrs(p)
        .filter_map(|ip| ip.parse::<Ipv6Addr>().ok())
        .find(|ip| crate::enrol::file::not_a_pod_ip6(*ip).is_none())
}

/// A pod that is a workload of this node: it has its own network namespace (not host
/// networking), an IPv4 address, and has not finished.
fn is_local_workload(p: &Pod) -> bool {
    let host_net = p
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    !host_net && !matches!(phase, Some("Succeeded" | "Failed")) && pod_ip(p).is_some()
}

/// The protocol of a service port: `appProtocol` first, then the port name's prefix
/// (Istio's convention: `http`, `http-web`, `grpc-api`, ...), else sniffed.
pub fn protocol(app_protocol: Option<&str>, name: Option<&str>) -> Protocol {
    let by = |s: &str| match s {
        "http" | "http1" | "kubernetes.io/http" => Some(Protocol::Http),
        "http2" | "h2c" | "kubernetes.io/h2c" => Some(Protocol::Http2),
        "grpc" | "grpc-web" => Some(Protocol::Grpc),
        "tcp" | "tls" | "https" | "kubernetes.io/ws" | "kubernetes.io/wss" | "mongo" | "mysql"
        | "redis" => Some(Protocol::Tcp),
        _ => None,
    };
    if let Some(p) = app_protocol.and_then(|a| by(&a.to_ascii_lowercase())) {
        return p;
    }
    name.and_then(|n| {
        let n = n.to_ascii_lowercase();
        by(n.split('-').next().unwrap_or(&n))
    })
    .unwrap_or(Protocol::Auto)
}

/// Converted Services by `namespace/name` (neither may hold a `/`), with what each
/// conversion read.
#[derive(Default)]
pub struct ServiceCache {
    by_name: HashMap<String, CachedService>,
    /// Services converted (not reused) since start.
    pub converted: u64,
    /// Set by the caller before a build: what changed in the stores since the previous
    /// build with this cache (`CompactStore::state_and_changes`). With it, and when the
    /// previous build left `follow`, the build converts the Services those changes touch
    /// and walks nothing else; without it (`None`: unknown), every Service is walked.
    pub changes: Option<Changes>,
    follow: Option<Follow>,
    /// Builds that followed the changes instead of walking every Service.
    pub followed: u64,
}

/// What changed in the Service and EndpointSlice stores between two builds.
pub struct Changes {
    pub services: Vec<Change<ServiceObj>>,
    pub slices: Vec<Change<SliceObj>>,
}

/// The last build's result in the shape a build that follows changes updates: left by a
/// build in which no two Services met on a name or an address (then no port was left
/// out, and each Service's spec stands alone).
struct Follow {
    /// The served specs by (namespace, name): the build's output, in its order.
    served: BTreeMap<(String, String), Arc<ServiceSpec>>,
    /// How many served specs hold each (address, port), `vip` and `vip6` alike: one, or
    /// the build walks all.
    addresses: HashMap<(IpAddr, u16), u32>,
    /// IPv4 and IPv6 EndpointSlices by their Service's `namespace/name`, in name order (most
    /// Services have one or two: a `Vec`, not a map of its own).
    slices: HashMap<String, Vec<Arc<SliceObj>>>,
    /// The routes attached to each Service.
    routes: BTreeMap<(String, String), Vec<crate::control::model::RouteSpec>>,
}

struct CachedService {
    /// The stores' objects the conversion read: a watch event replaces an object's `Arc`
    /// in its store, so the same pointers mean the same objects.
    service: Arc<ServiceObj>,
    slices: Vec<Arc<SliceObj>>,
    routes: Vec<crate::control::model::RouteSpec>,
    /// `None`: the Service is not served (ExternalName, headless, no TCP port).
    spec: Option<Arc<ServiceSpec>>,
}

fn services(
    c: &Cluster,
    problems: &mut Vec<String>,
    cache: &mut ServiceCache,
) -> Vec<Arc<ServiceSpec>> {
    let routes = attached_routes(c, problems);
    if let Some(changes) = cache.changes.take() {
        if let Some(out) = follow(changes, &routes, cache) {
            cache.followed += 1;
            return out;
        }
    }
    walk(c, routes, cache)
}

fn id_of(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Whether the cached conversion of a Service read exactly these objects and routes.
fn same_inputs(
    c: &CachedService,
    s: &Arc<ServiceObj>,
    slices: &[&Arc<SliceObj>],
    routes: &[crate::control::model::RouteSpec],
) -> bool {
    Arc::ptr_eq(&c.service, s)
        && c.slices.len() == slices.len()
        && c.slices.iter().zip(slices).all(|(a, b)| Arc::ptr_eq(a, b))
        && c.routes == routes
}

/// The build of `services` from the last one and the stores' changes: converts the
/// Services a change touched (its object, one of its slices, its routes) and nothing else.
/// `None` when it cannot: no last build to follow, or two Services now share an address
/// (the walk decides which keeps it).
fn follow(
    changes: Changes,
    routes: &BTreeMap<(String, String), Vec<crate::control::model::RouteSpec>>,
    cache: &mut ServiceCache,
) -> Option<Vec<Arc<ServiceSpec>>> {
    let mut f = cache.follow.take()?;
    let mut touched: BTreeSet<(String, String)> = BTreeSet::new();
    // The last state of each changed Service (`None`: deleted).
    let mut current: HashMap<(String, String), Option<Arc<ServiceObj>>> = HashMap::new();
    for (old, new) in changes.services {
        for (o, now) in [(old, false), (new, true)] {
            if let Some(o) = o {
                let key = (o.namespace.clone(), o.name.clone());
                touched.insert(key.clone());
                current.insert(key, now.then_some(o));
            }
        }
    }
    for (old, new) in changes.slices {
        if let Some(o) = old {
            if let Some(svc) = &o.service {
                let id = id_of(&o.namespace, svc);
                if let Some(v) = f.slices.get_mut(&id) {
                    v.retain(|s| s.name != o.name);
                    if v.is_empty() {
                        f.slices.remove(&id);
                    }
                }
                touched.insert((o.namespace.clone(), svc.clone()));
            }
        }
        if let Some(n) = new {
            if let Some(svc) = &n.service {
                let v = f.slices.entry(id_of(&n.namespace, svc)).or_default();
                // Name order, one per name (a store holds one object per name).
                match v.binary_search_by(|s| s.name.cmp(&n.name)) {
                    Ok(i) => v[i] = n.clone(),
                    Err(i) => v.insert(i, n.clone()),
                }
                touched.insert((n.namespace.clone(), svc.clone()));
            }
        }
    }
    if f.routes != *routes {
        for (k, v) in f.routes.iter().chain(routes.iter()) {
            if f.routes.get(k) != Some(v) || routes.get(k) != Some(v) {
                touched.insert(k.clone());
            }
        }
        f.routes = routes.clone();
    }
    for key in touched {
        let id = id_of(&key.0, &key.1);
        let svc = match current.get(&key) {
            Some(now) => now.clone(),
            None => cache.by_name.get(&id).map(|c| c.service.clone()),
        };
        if let Some(old) = f.served.remove(&key) {
            for a in served_addresses(&old) {
                if let Some(n) = f.addresses.get_mut(&a) {
                    *n -= 1;
                }
            }
        }
        let Some(svc) = svc else {
            cache.by_name.remove(&id);
            continue;
        };
        let svc_slices: Vec<&Arc<SliceObj>> = f
            .slices
            .get(&id)
            .map(|v| v.iter().collect())
            .unwrap_or_default();
        let svc_routes = routes.get(&key).cloned().unwrap_or_default();
        let cached = match cache.by_name.remove(&id) {
            Some(c) if same_inputs(&c, &svc, &svc_slices, &svc_routes) => c,
            _ => {
                cache.converted += 1;
                CachedService {
                    spec: convert(&svc, &svc_slices, svc_routes.clone()).map(Arc::new),
                    service: svc,
                    slices: svc_slices.into_iter().cloned().collect(),
                    routes: svc_routes,
                }
            }
        };
        if let Some(spec) = &cached.spec {
            for a in served_addresses(spec) {
                *f.addresses.entry(a).or_default() += 1;
            }
            f.served.insert(key, spec.clone());
        }
        cache.by_name.insert(id, cached);
    }
    f.addresses.retain(|_, n| *n > 0);
    if f.addresses.values().any(|&n| n > 1) {
        return None;
    }
    let out = f.served.values().cloned().collect();
    cache.follow = Some(f);
    Some(out)
}

/// The (address, port) pairs a spec's port is dialled at: `vip`, and `vip6` if it has one.
fn port_addresses(spec: &ServiceSpec, port: u16) -> impl Iterator<Item = (IpAddr, u16)> {
    std::iter::once(IpAddr::V4(spec.vip))
        .chain(spec.vip6.map(IpAddr::V6))
        .map(move |ip| (ip, port))
}

/// Every (address, port) a spec is dialled at.
fn served_addresses(spec: &ServiceSpec) -> impl Iterator<Item = (IpAddr, u16)> + '_ {
    spec.ports.iter().flat_map(|p| port_addresses(spec, p.port))
}

/// The build of `services` from every Service and slice.
fn walk(
    c: &Cluster,
    mut routes: BTreeMap<(String, String), Vec<crate::control::model::RouteSpec>>,
    cache: &mut ServiceCache,
) -> Vec<Arc<ServiceSpec>> {
    let all_routes = routes.clone();
    let mut slices: HashMap<(&str, &str), Vec<&Arc<SliceObj>>> = HashMap::new();
    for s in &c.slices {
        // `None` also for slices of another address type.
        if let Some(svc) = &s.service {
            slices
                .entry((s.namespace.as_str(), svc.as_str()))
                .or_default()
                .push(s);
        }
    }
    for v in slices.values_mut() {
        // Store order is not stable across re-lists: name order is.
        if v.len() > 1 {
            v.sort_by(|a, b| a.name.cmp(&b.name));
        }
    }
    // Each slice name once under its Service (a store holds one object per name; a test's
    // `Cluster` may not): else a later follow would drop one.
    let mut followable = slices
        .values()
        .all(|v| v.windows(2).all(|w| w[0].name != w[1].name));
    let follow_slices: HashMap<String, Vec<Arc<SliceObj>>> = slices
        .iter()
        .map(|(k, v)| (id_of(k.0, k.1), v.iter().map(|s| Arc::clone(s)).collect()))
        .collect();
    let mut out = Vec::with_capacity(c.services.len());
    let mut served = BTreeMap::new();
    let mut sorted: Vec<&Arc<ServiceObj>> = c.services.iter().collect();
    // Borrowed keys: an owned (namespace, name) per comparison costs two allocations each,
    // 280k at 10k Services.
    sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    // A store holds one object per name and the API server gives each Service its own
    // cluster IP; should two meet anyway, the first keeps the name and the address, as
    // the same listener or cluster twice makes the proxy refuse every service.
    let mut names = std::collections::HashSet::with_capacity(sorted.len());
    let mut addresses = std::collections::HashSet::with_capacity(sorted.len());
    let mut next = HashMap::with_capacity(sorted.len());
    let mut id = String::new();
    for s in sorted {
        let key = (s.namespace.as_str(), s.name.as_str());
        if !names.insert(key) {
            followable = false;
            continue;
        }
        let svc_slices = slices.remove(&key).unwrap_or_default();
        let svc_routes = if routes.is_empty() {
            Vec::new()
        } else {
            routes
                .remove(&(key.0.to_owned(), key.1.to_owned()))
                .unwrap_or_default()
        };
        id.clear();
        id.push_str(key.0);
        id.push('/');
        id.push_str(key.1);
        let reused = cache
            .by_name
            .remove_entry(id.as_str())
            .filter(|(_, c)| same_inputs(c, s, &svc_slices, &svc_routes));
        let (id, cached) = match reused {
            Some(kept) => kept,
            None => {
                cache.converted += 1;
                (
                    id.clone(),
                    CachedService {
                        service: s.clone(),
                        slices: svc_slices.iter().map(|s| Arc::clone(s)).collect(),
                        spec: convert(s, &svc_slices, svc_routes.clone()).map(Arc::new),
                        routes: svc_routes,
                    },
                )
            }
        };
        if let Some(spec) = &cached.spec {
            // The first Service of an address keeps it: a port another Service took is
            // left out, with its endpoints (rare: the API server hands out each cluster
            // IP once).
            let taken: Vec<u16> = spec
                .ports
                .iter()
                .map(|p| p.port)
                .filter(|&p| port_addresses(spec, p).any(|a| addresses.contains(&a)))
                .collect();
            addresses.extend(served_addresses(spec).filter(|a| !taken.contains(&a.1)));
            if taken.is_empty() {
                out.push(spec.clone());
                served.insert((key.0.to_owned(), key.1.to_owned()), spec.clone());
            } else if taken.len() < spec.ports.len() {
                followable = false;
                let mut narrowed = ServiceSpec::clone(spec);
                narrowed.ports.retain(|p| !taken.contains(&p.port));
                narrowed
                    .endpoints
                    .retain(|e| e.service_port.is_none_or(|p| !taken.contains(&p)));
                out.push(Arc::new(narrowed));
            } else {
                followable = false;
            }
        }
        next.insert(id, cached);
    }
    // Services that are gone leave the cache.
    cache.by_name = next;
    cache.follow = followable.then(|| Follow {
        served,
        addresses: addresses.into_iter().map(|a| (a, 1)).collect(),
        slices: follow_slices,
        routes: all_routes,
    });
    out
}

/// One Service with its EndpointSlices (IPv4 and IPv6, merged) and routes in the control
/// plane's model; `None` when it is not served (ExternalName, headless or IPv6-only, no
/// TCP port).
fn convert(
    s: &ServiceObj,
    slices: &[&Arc<SliceObj>],
    routes: Vec<crate::control::model::RouteSpec>,
) -> Option<ServiceSpec> {
    // ExternalName, headless ("None") or IPv6-only: not served (`vip` is `None`). A
    // dual-stack Service is served at both addresses.
    let vip = s.vip?;
    let (ns, name) = (s.namespace.clone(), s.name.clone());
    // The API server refuses a port number twice per protocol and numbers outside
    // 1..=65535, but one object that slipped through would otherwise make the same
    // listener and cluster twice, and the proxy refuses the whole response (every
    // service) for it: the first port of a number wins, invalid ones are skipped.
    // (`ports` holds the TCP ports only.)
    let mut numbers = BTreeSet::new();
    let svc_ports: Vec<_> = s
        .ports
        .iter()
        .filter(|p| u16::try_from(p.port).is_ok_and(|n| n != 0 && numbers.insert(n)))
        .collect();
    if svc_ports.is_empty() {
        return None;
    }
    let ports = svc_ports
        .iter()
        .map(|p| ServicePort {
            port: p.port as u16,
            target_port: None,
            protocol: protocol(p.app_protocol.as_deref(), p.name.as_deref()),
        })
        .collect();
    let mut endpoints = Vec::new();
    let mut seen = BTreeSet::new();
    for slice in slices {
        // TCP ports with a number; IPv4 or IPv6 addresses (`compact`).
        for sp in &slice.ports {
            let port = sp.port;
            // Slice ports carry the service port's name; a single unnamed port belongs
            // to the single service port.
            let svc_port = svc_ports
                .iter()
                .find(|p| p.name.as_deref().unwrap_or("") == sp.name.as_deref().unwrap_or(""));
            let Some(svc_port) = svc_port else { continue };
            for (ip, health) in slice.addresses() {
                if seen.insert((ip, port, svc_port.port)) {
                    endpoints.push(EndpointSpec {
                        ip,
                        port: Some(port as u16),
                        weight: None,
                        health: health.as_model().map(str::to_owned),
                        service_port: Some(svc_port.port as u16),
                    });
                }
            }
        }
    }
    // Held for as long as the Service is unchanged: no room for 16 when there are 10.
    endpoints.shrink_to_fit();
    Some(ServiceSpec {
        routes,
        name,
        namespace: ns,
        vip,
        vip6: s.vip6,
        ports,
        selector: BTreeMap::new(),
        endpoints,
        lb: Default::default(),
        connect_timeout_ms: None,
        circuit_breaker: None,
        outlier_detection: None,
        rate_limit: None,
        max_request_headers_kb: None,
    })
}

/// Routes per parent Service, in Gateway API precedence order.
fn attached_routes(
    c: &Cluster,
    problems: &mut Vec<String>,
) -> BTreeMap<(String, String), Vec<crate::control::model::RouteSpec>> {
    type Key = (
        std::cmp::Reverse<routes::Precedence>,
        String,
        String,
        usize,
        usize,
    );
    let mut keyed: BTreeMap<(String, String), Vec<(Key, crate::control::model::RouteSpec)>> =
        BTreeMap::new();
    let all = c
        .http_routes
        .iter()
        .map(|r| (Flavour::Http, r))
        .chain(c.grpc_routes.iter().map(|r| (Flavour::Grpc, r)));
    for (flavour, obj) in all {
        let ns = obj.namespace().unwrap_or_default();
        let id = format!("{ns}/{}", obj.name_any());
        let parsed: routes::RouteObject = match serde_json::from_value(obj.data.clone()) {
            Ok(r) => r,
            Err(e) => {
                problems.push(format!("{id}: {e}"));
                continue;
            }
        };
        let created = obj
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default();
        for parent in &parsed.spec.parent_refs {
            if !parent.is_service() {
                continue;
            }
            if parent.namespace.as_deref().is_some_and(|p| p != ns) {
                problems.push(format!(
                    "{id}: parent Service {}/{} is in another namespace (consumer routes are not supported)",
                    parent.namespace.as_deref().unwrap_or_default(),
                    parent.name
                ));
                continue;
            }
            for (i, rule) in parsed.spec.rules.iter().enumerate() {
                match routes::convert_rule(flavour, &ns, &id, i, rule) {
                    Ok(converted) => {
                        for (j, cv) in converted.into_iter().enumerate() {
                            keyed
                                .entry((ns.clone(), parent.name.clone()))
                                .or_default()
                                .push((
                                    (
                                        std::cmp::Reverse(cv.precedence),
                                        created.clone(),
                                        id.clone(),
                                        i,
                                        j,
                                    ),
                                    cv.route,
                                ));
                        }
                    }
                    Err(e) => problems.push(format!("{id} rule {i}: {e}")),
                }
            }
        }
    }
    keyed
        .into_iter()
        .map(|(k, mut v)| {
            v.sort_by(|a, b| a.0.cmp(&b.0));
            (k, v.into_iter().map(|(_, r)| r).collect())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj<T: serde::de::DeserializeOwned>(yaml: &str) -> Arc<T> {
        Arc::new(serde_yaml::from_str(yaml).unwrap())
    }

    /// `c` built with no excludes, every pod resolved to the same network namespace.
    fn build_local(c: &Cluster) -> Built {
        let opts = Options {
            excludes: &[],
            trust_domain: "cluster.local",
        };
        build(c, &opts, &mut |_| Ok(PathBuf::from("/proc/1/ns/net")))
    }

    fn cluster() -> Cluster {
        Cluster {
            namespaces: vec![
                obj("metadata: {name: shop, labels: {mesh-agent.io/dataplane-mode: ambient}}"),
                obj("metadata: {name: plain}"),
            ],
            pods: vec![
                obj("metadata: {name: web, namespace: shop, uid: u1, labels: {app: web}}\nspec: {containers: [], serviceAccountName: web}\nstatus: {podIP: 10.1.0.2}"),
                obj("metadata: {name: out, namespace: shop, uid: u2, labels: {mesh-agent.io/dataplane-mode: none}}\nspec: {containers: []}\nstatus: {podIP: 10.1.0.3}"),
                obj("metadata: {name: db, namespace: plain, uid: u3}\nspec: {containers: []}\nstatus: {podIP: 10.1.0.4}"),
                obj("metadata: {name: hostnet, namespace: shop, uid: u4}\nspec: {containers: [], hostNetwork: true}\nstatus: {podIP: 192.168.0.1}"),
                obj("metadata: {name: pending, namespace: shop, uid: u5}\nspec: {containers: []}\nstatus: {phase: Pending}"),
                obj("metadata: {name: lost, namespace: shop, uid: u6}\nspec: {containers: []}\nstatus: {podIP: 10.1.0.9}"),
            ],
            services: vec![
                obj("metadata: {name: reviews, namespace: shop}\nspec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 9080}, {name: grpc-api, port: 9090, appProtocol: tcp}, {name: dns, port: 53, protocol: UDP}]}"),
                obj("metadata: {name: headless, namespace: shop}\nspec: {clusterIP: None, ports: [{port: 80}]}"),
            ],
            slices: vec![obj(
                "metadata: {name: reviews-1, namespace: shop, labels: {kubernetes.io/service-name: reviews}}\naddressType: IPv4\n\
                 ports: [{name: http, port: 8080}, {name: grpc-api, port: 8090}]\n\
                 endpoints:\n- addresses: [10.1.0.2]\n- addresses: [10.2.0.7]\n  conditions: {ready: false, serving: true, terminating: true}\n",
            )],
            service_accounts: vec![obj("metadata: {name: web, namespace: shop}")],
            http_routes: vec![obj(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop, creationTimestamp: '2026-01-01T00:00:00Z'}\n\
                 spec:\n  parentRefs: [{group: '', kind: Service, name: reviews}]\n  rules:\n\
                 \x20 - matches: [{path: {type: PathPrefix, value: /v2}}]\n    backendRefs: [{name: reviews, port: 9080}]\n\
                 \x20 - matches: [{path: {type: Exact, value: /v2/exact}}]\n    filters: [{type: RequestMirror}]\n",
            )],
            grpc_routes: vec![],
        }
    }

    /// A dual-stack pod: `status.podIPs` lists both families (in either order); the IPv4
    /// one is the workload's `ip`, the IPv6 one its `ip6`, in the datapath's snapshot and
    /// in the control plane's members alike. An IPv4-only pod has none.
    #[test]
    fn a_dual_stack_pods_ipv6_address_comes_from_pod_ips() {
        let mut c = cluster();
        c.pods[0] = obj("metadata: {name: web, namespace: shop, uid: u1}
spec: {containers: []}
status: {podIP: 10.1.0.2, podIPs: [{ip: 10.1.0.2}, {ip: 'fd00:10:1::2'}]}");
        c.pods[1] = obj("metadata: {name: out, namespace: shop, uid: u2}
spec: {containers: []}
status: {podIP: 'fd00:10:1::3', podIPs: [{ip: 'fd00:10:1::3'}, {ip: 10.1.0.3}]}");
        let built = build_local(&c);
        let w = |n: &str| {
            built
                .snapshot
                .workloads
                .iter()
                .find(|w| w.name == n)
                .unwrap()
                .clone()
        };
        let v6 = |s: &str| Some(s.parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            (w("web").ip, w("web").ip6),
            (Ipv4Addr::new(10, 1, 0, 2), v6("fd00:10:1::2"))
        );
        assert_eq!(
            (w("out").ip, w("out").ip6),
            (Ipv4Addr::new(10, 1, 0, 3), v6("fd00:10:1::3"))
        );
        assert_eq!(w("db").ip6, None);
        let m = built
            .snapshot
            .declared
            .iter()
            .find(|m| m.name == "web")
            .unwrap();
        assert_eq!(m.ip6, v6("fd00:10:1::2"));
    }

    /// A dual-stack Service (`clusterIPs`, `ipFamilies`) is served at both addresses;
    /// its IPv4 and IPv6 EndpointSlices become one list of endpoints (ports matched by
    /// name in each). An IPv6-only Service is not served; an IPv6 slice's Service is.
    #[test]
    fn dual_stack_services_merge_both_families_slices() {
        let mut c = cluster();
        c.services = vec![
            obj("metadata: {name: reviews, namespace: shop}\nspec: {clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 'fd00:96::10'], ipFamilies: [IPv4, IPv6], ipFamilyPolicy: RequireDualStack, ports: [{name: http, port: 9080}]}"),
            obj("metadata: {name: only6, namespace: shop}\nspec: {clusterIP: 'fd00:96::11', clusterIPs: ['fd00:96::11'], ipFamilies: [IPv6], ports: [{port: 80}]}"),
        ];
        c.slices = vec![
            obj("metadata: {name: reviews-4, namespace: shop, labels: {kubernetes.io/service-name: reviews}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.1.0.2]}]"),
            obj("metadata: {name: reviews-6, namespace: shop, labels: {kubernetes.io/service-name: reviews}}\naddressType: IPv6\nports: [{name: http, port: 8080}]\n\
                 endpoints: [{addresses: ['fd00:10:1::2']}, {addresses: ['fd00:10:1::3'], conditions: {ready: false}}]"),
            obj("metadata: {name: only6-6, namespace: shop, labels: {kubernetes.io/service-name: only6}}\naddressType: IPv6\nports: [{port: 80}]\nendpoints: [{addresses: ['fd00:10:1::4']}]"),
        ];
        let built = build_local(&c);
        let services = &built.snapshot.services;
        assert_eq!(services.len(), 1, "IPv6-only is not served: {services:?}");
        let s = &services[0];
        assert_eq!(
            (s.vip, s.vip6),
            (
                Ipv4Addr::new(10, 96, 0, 10),
                Some("fd00:96::10".parse().unwrap())
            )
        );
        let eps: Vec<(String, Option<u16>, Option<&str>)> = s
            .endpoints
            .iter()
            .map(|e| (e.ip.to_string(), e.port, e.health.as_deref()))
            .collect();
        assert_eq!(
            eps,
            [
                ("10.1.0.2".to_owned(), Some(8080), None),
                ("fd00:10:1::2".to_owned(), Some(8080), None),
                ("fd00:10:1::3".to_owned(), Some(8080), Some("unhealthy")),
            ]
        );
        assert!(s.endpoints.iter().all(|e| e.service_port == Some(9080)));
    }

    #[test]
    fn pods_app_and_version_labels_and_the_namespace_access_log_label_reach_the_members() {
        let mut c = cluster();
        c.namespaces[0] = obj("metadata: {name: shop, labels: {mesh-agent.io/dataplane-mode: ambient, mesh-agent.io/access-log: 'true'}}");
        c.pods[0] = obj("metadata: {name: web, namespace: shop, uid: u1, labels: {app: web, app.kubernetes.io/version: v3}}\nspec: {containers: [], serviceAccountName: web}\nstatus: {podIP: 10.1.0.2}");
        let built = build_local(&c);
        let m = &built.snapshot.declared;
        let by = |n: &str| m.iter().find(|w| w.name == n).unwrap();
        let web = by("web");
        assert_eq!(
            (web.app.as_str(), web.version.as_str(), web.access_log),
            ("web", "v3", true)
        );
        let db = by("db");
        assert_eq!(
            (db.app.as_str(), db.version.as_str(), db.access_log),
            ("", "", false)
        );
    }

    #[test]
    fn local_pods_services_slices_and_routes_become_one_snapshot() {
        let mut asked = Vec::new();
        let built = build(
            &cluster(),
            &Options {
                excludes: &[],
                trust_domain: "cluster.local",
            },
            &mut |p| {
                asked.push(p.name_any());
                if p.name_any() == "lost" {
                    Err("no cgroup".into())
                } else {
                    Ok(PathBuf::from(format!("/proc/1/ns/net#{}", p.name_any())))
                }
            },
        );
        // Only enrolled pods are looked up: not the opted-out one, not the other namespace.
        assert_eq!(asked, vec!["lost", "web"]);
        let names: Vec<_> = built
            .snapshot
            .workloads
            .iter()
            .map(|w| w.name.as_str())
            .collect();
        assert_eq!(
            names,
            vec!["db", "lost", "out", "web"],
            "hostnet and pending are not workloads"
        );
        let w = |n: &str| {
            built
                .snapshot
                .workloads
                .iter()
                .find(|w| w.name == n)
                .unwrap()
        };
        assert!(w("web").enrolled && !w("out").enrolled && !w("db").enrolled);
        assert_eq!(
            w("web").identity.as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/web")
        );
        assert_eq!(w("out").identity, None, "the default account is not known");
        assert_eq!(w("lost").unresolved.as_deref(), Some("no cgroup"));
        assert_eq!(built.unresolved.len(), 1);
        assert_eq!(built.unresolved[0].uid, "u6");

        assert_eq!(built.snapshot.services.len(), 1, "headless skipped");
        let s = &built.snapshot.services[0];
        assert_eq!(s.vip, "10.96.0.10".parse::<Ipv4Addr>().unwrap());
        assert_eq!(s.ports.len(), 2, "UDP skipped");
        assert_eq!(s.ports[0].protocol, Protocol::Http);
        assert_eq!(
            s.ports[1].protocol,
            Protocol::Tcp,
            "appProtocol wins over the name"
        );
        assert_eq!(s.endpoints.len(), 4);
        let e = s
            .endpoints
            .iter()
            .find(|e| e.ip.to_string() == "10.2.0.7" && e.service_port == Some(9090))
            .unwrap();
        assert_eq!(
            (e.port, e.health.as_deref()),
            (Some(8090), Some("draining"))
        );
        assert_eq!(s.routes.len(), 1);
        assert_eq!(s.routes[0].matcher.regex.as_deref(), Some("/v2(/.*)?"));
        assert_eq!(built.route_problems.len(), 1, "{:?}", built.route_problems);
        assert!(built.route_problems[0].contains("RequestMirror"));
    }

    /// Found by the `k8s_state` fuzz target: a Service listing port 9090 twice became two
    /// listeners and clusters of the same name, and the proxy NACKed every listener and
    /// cluster for it.
    #[test]
    fn fuzz_a_port_number_twice_makes_one_listener() {
        let mut c = cluster();
        c.services = vec![obj(
            "metadata: {name: reviews, namespace: shop}\nspec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 9090}, {name: grpc-api, port: 9090, appProtocol: tcp}, {name: big, port: 74626}, {name: zero, port: 0}]}",
        )];
        let opts = Options {
            excludes: &[],
            trust_domain: "td",
        };
        let built = build(&c, &opts, &mut |_| Ok(PathBuf::new()));
        let s = &built.snapshot.services[0];
        assert_eq!(s.ports.len(), 1, "{:?}", s.ports);
        // Found next: the same Service twice, and another one on the same address.
        c.services = vec![
            obj("metadata: {name: ratings, namespace: shop}\nspec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}"),
            obj("metadata: {name: ratings, namespace: shop}\nspec: {clusterIP: 10.96.0.12, ports: [{port: 80}]}"),
            obj("metadata: {name: stars, namespace: shop}\nspec: {clusterIP: 10.96.0.11, ports: [{port: 80}, {port: 81}]}"),
        ];
        let built = build(&c, &opts, &mut |_| Ok(PathBuf::new()));
        let got: Vec<_> = built
            .snapshot
            .services
            .iter()
            .map(|s| {
                (
                    s.name.as_str(),
                    s.vip.to_string(),
                    s.ports.iter().map(|p| p.port).collect::<Vec<_>>(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("ratings", "10.96.0.11".to_string(), vec![80]),
                ("stars", "10.96.0.11".to_string(), vec![81]),
            ]
        );
        assert_eq!(
            (s.ports[0].port, s.ports[0].protocol),
            (9090, Protocol::Http)
        );
    }

    /// Found by the `k8s_state` fuzz target: an HTTPRoute header match with the invalid
    /// regular expression `a.)*` went into the route configuration, and the proxy NACKed
    /// it, dropping every route of the Service. Such a rule (or one rewriting a header
    /// the proxy refuses) is now reported and left out; the Service's other rules stay.
    #[test]
    fn fuzz_rules_the_proxy_would_refuse_are_left_out() {
        let mut c = cluster();
        c.http_routes = vec![obj(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\n\
             spec:\n  parentRefs: [{group: '', kind: Service, name: reviews}]\n  rules:\n\
             \x20 - matches: [{headers: [{name: x-user, type: RegularExpression, value: 'a.)*'}]}]\n\
             \x20 - matches: [{path: {type: PathPrefix, value: /bad}}]\n    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: 'x:y', value: z}]}}]\n\
             \x20 - matches: [{path: {type: PathPrefix, value: /v2}}]\n",
        )];
        let opts = Options {
            excludes: &[],
            trust_domain: "td",
        };
        let built = build(&c, &opts, &mut |_| Ok(PathBuf::new()));
        let routes = &built.snapshot.services[0].routes;
        assert_eq!(routes.len(), 1, "{routes:?}");
        assert_eq!(routes[0].matcher.regex.as_deref(), Some("/v2(/.*)?"));
        assert_eq!(built.route_problems.len(), 2, "{:?}", built.route_problems);
        assert!(built.route_problems[0].contains("invalid regex \"a.)*\""));
        assert!(built.route_problems[1].contains("\"x:y\" is not a valid header name"));
    }

    /// A change converts the Service it touches, and every other Service keeps its spec
    /// (the same `Arc`), so what follows (translation, the ADS server) skips it by pointer.
    #[test]
    fn only_changed_services_are_converted_again() {
        let opts = Options {
            excludes: &[],
            trust_domain: "cluster.local",
        };
        let mut c = cluster();
        c.services.push(obj(
            "metadata: {name: ratings, namespace: shop}\nspec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80}]}",
        ));
        let ok = &mut |_: &Pod| Ok(PathBuf::new());
        let mut cache = ServiceCache::default();
        let first = build_cached(&c, &opts, ok, &mut cache).snapshot.services;
        assert_eq!(first.len(), 2);
        assert_eq!(cache.converted, 3, "reviews, ratings and the headless one");
        // Nothing changed: nothing converted, the very same specs.
        let again = build_cached(&c, &opts, ok, &mut cache).snapshot.services;
        assert_eq!(cache.converted, 3);
        assert!(first.iter().zip(&again).all(|(a, b)| Arc::ptr_eq(a, b)));
        // An EndpointSlice of reviews changes (a watch event: a new object in the store).
        let mut slice = SliceObj::clone(&c.slices[0]);
        slice.endpoints[0].ip = Ipv4Addr::new(10, 1, 0, 5);
        c.slices[0] = Arc::new(slice);
        let after = build_cached(&c, &opts, ok, &mut cache).snapshot.services;
        assert_eq!(cache.converted, 4, "reviews only");
        let by = |v: &[Arc<ServiceSpec>], n: &str| v.iter().find(|s| s.name == n).unwrap().clone();
        assert!(Arc::ptr_eq(&by(&first, "ratings"), &by(&after, "ratings")));
        assert!(!Arc::ptr_eq(&by(&first, "reviews"), &by(&after, "reviews")));
        assert_eq!(
            by(&after, "reviews").endpoints[0].ip,
            Ipv4Addr::new(10, 1, 0, 5)
        );
        // The same as a conversion from scratch.
        let fresh = build(&c, &opts, ok).snapshot.services;
        assert_eq!(fresh, after);
        // A Service that is gone leaves the cache.
        c.services.retain(|s| s.name != "ratings");
        let gone = build_cached(&c, &opts, ok, &mut cache).snapshot.services;
        assert_eq!(gone.len(), 1);
        assert_eq!(cache.by_name.len(), 2);
    }

    /// Successive changes through one cache: a change after a change, a rename (a new
    /// name, the old one gone), a Service and its slice removed and added back; each build
    /// equals a build from scratch, and only what changed is converted.
    #[test]
    fn successive_changes_convert_what_they_touch() {
        let opts = Options {
            excludes: &[],
            trust_domain: "cluster.local",
        };
        let mut c = measure::bench_cluster(5);
        let ok = &mut |_: &Pod| Ok(PathBuf::new());
        let mut cache = ServiceCache::default();
        let mut check = |c: &Cluster, cache: &mut ServiceCache, converted: u64| {
            let got = build_cached(c, &opts, ok, cache).snapshot.services;
            assert_eq!(got, build(c, &opts, ok).snapshot.services);
            assert_eq!(cache.converted, converted);
            got
        };
        let first = check(&c, &mut cache, 5);
        for (k, converted) in [(1, 6), (2, 7)] {
            let mut s = SliceObj::clone(&c.slices[3]);
            s.endpoints[0].ip = Ipv4Addr::new(10, 99, 0, k);
            c.slices[3] = Arc::new(s);
            let got = check(&c, &mut cache, converted);
            assert_eq!(got[3].endpoints[0].ip, Ipv4Addr::new(10, 99, 0, k));
            assert!(Arc::ptr_eq(&got[2], &first[2]));
        }
        // s1 renamed to t1, its slice following it.
        let mut svc = ServiceObj::clone(&c.services[1]);
        svc.name = "t1".into();
        c.services[1] = Arc::new(svc);
        let mut slice = SliceObj::clone(&c.slices[1]);
        slice.service = Some("t1".into());
        c.slices[1] = Arc::new(slice);
        let renamed = check(&c, &mut cache, 8);
        assert!(renamed
            .iter()
            .any(|s| s.name == "t1" && s.endpoints.len() == 10));
        assert!(!renamed.iter().any(|s| s.name == "s1"));
        assert_eq!(cache.by_name.len(), 5);
        // s4 and its slice go, then come back as they were.
        let (svc, slice) = (c.services.remove(4), c.slices.remove(4));
        assert_eq!(check(&c, &mut cache, 8).len(), 4);
        c.services.push(svc);
        c.slices.push(slice);
        assert_eq!(check(&c, &mut cache, 9).len(), 5);
    }

    /// Builds that follow the stores' change logs (as `k8s::run` does) convert only the
    /// Services a change touched, walk nothing else, and equal a build from scratch after
    /// every step: an endpoint, a Service's port, a slice moving to another Service, a
    /// Service deleted and back, a second Service on one address (walked: the walk decides
    /// which keeps it; then followed again once it is gone), a route attached.
    #[test]
    fn builds_follow_the_stores_changes() {
        use crate::enrol::k8s::compact::{CompactStore, EndpointObj, Health};
        let opts = Options {
            excludes: &[],
            trust_domain: "cluster.local",
        };
        let ok = &mut |_: &Pod| Ok(PathBuf::new());
        let start = measure::bench_cluster(50);
        let (services, slices) = (CompactStore::default(), CompactStore::default());
        services.relist_start();
        slices.relist_start();
        for s in &start.services {
            services.relist_apply(ServiceObj::clone(s));
        }
        for s in &start.slices {
            slices.relist_apply(SliceObj::clone(s));
        }
        services.relist_done();
        slices.relist_done();
        let mut cache = ServiceCache::default();
        let mut http_routes: Vec<Arc<DynamicObject>> = Vec::new();
        // One build as `k8s::run` makes it; checked against a build from scratch.
        let mut step = |cache: &mut ServiceCache,
                        http_routes: &[Arc<DynamicObject>],
                        followed: bool,
                        converted: u64| {
            let (service_objs, service_changes) = services.state_and_changes();
            let (slice_objs, slice_changes) = slices.state_and_changes();
            cache.changes = match (service_changes, slice_changes) {
                (Some(services), Some(slices)) => Some(Changes { services, slices }),
                _ => None,
            };
            let c = Cluster {
                namespaces: start.namespaces.clone(),
                services: service_objs,
                slices: slice_objs,
                http_routes: http_routes.to_vec(),
                ..Default::default()
            };
            let (followed_before, converted_before) = (cache.followed, cache.converted);
            let got = build_cached(&c, &opts, ok, cache).snapshot.services;
            assert_eq!(got, build(&c, &opts, ok).snapshot.services);
            assert_eq!(cache.followed - followed_before, u64::from(followed));
            assert_eq!(cache.converted - converted_before, converted);
            got
        };
        let first = step(&mut cache, &http_routes, false, 50);
        assert_eq!(first.len(), 50);
        // Nothing changed.
        let same = step(&mut cache, &http_routes, true, 0);
        assert!(first.iter().zip(&same).all(|(a, b)| Arc::ptr_eq(a, b)));
        let find = |name: &str| {
            let s = services.state().into_iter().find(|s| s.name == name);
            s.unwrap()
        };
        let slice_of = |name: &str| {
            let s = slices.state().into_iter().find(|s| s.name == name);
            s.unwrap()
        };
        // An endpoint of s3.
        let mut s = SliceObj::clone(&slice_of("s3-bench"));
        s.endpoints[0].ip = Ipv4Addr::new(10, 99, 0, 3);
        slices.apply(s);
        let got = step(&mut cache, &http_routes, true, 1);
        assert_eq!(
            got[got.len() - 1].name,
            "s9",
            "name order: s0, s1, s10, ..."
        );
        // A port of s4 and, in the same build, an endpoint of s5.
        let mut svc = ServiceObj::clone(&find("s4"));
        svc.ports[0].port = 81;
        services.apply(svc);
        let mut s = SliceObj::clone(&slice_of("s5-bench"));
        s.endpoints[1].ip = Ipv4Addr::new(10, 99, 0, 5);
        slices.apply(s);
        step(&mut cache, &http_routes, true, 2);
        // s6's slice now belongs to s7 (both converted).
        let mut s = SliceObj::clone(&slice_of("s6-bench"));
        s.service = Some("s7".into());
        slices.apply(s);
        let got = step(&mut cache, &http_routes, true, 2);
        let s7 = got.iter().find(|s| s.name == "s7").unwrap();
        assert_eq!(s7.endpoints.len(), 20);
        // s8 deleted, then back.
        let s8 = find("s8");
        services.delete(&s8);
        assert_eq!(step(&mut cache, &http_routes, true, 0).len(), 49);
        services.apply(ServiceObj::clone(&s8));
        assert_eq!(step(&mut cache, &http_routes, true, 1).len(), 50);
        // t1 takes s1's address: the walk decides (s1 keeps it, t1 is left out).
        let mut t1 = ServiceObj::clone(&find("s1"));
        t1.name = "t1".into();
        services.apply(t1.clone());
        let got = step(&mut cache, &http_routes, false, 1);
        assert!(!got.iter().any(|s| s.name == "t1"));
        // Walked again while the two meet; followed again once t1 is gone.
        let mut s = SliceObj::clone(&slice_of("s2-bench"));
        s.endpoints[0].ip = Ipv4Addr::new(10, 99, 0, 2);
        slices.apply(s);
        step(&mut cache, &http_routes, false, 1);
        services.delete(&t1);
        step(&mut cache, &http_routes, false, 0);
        step(&mut cache, &http_routes, true, 0);
        // s2 becomes dual-stack, then gets an IPv6 slice: followed, converted once each.
        let mut s2 = ServiceObj::clone(&find("s2"));
        s2.vip6 = Some("fd00:96::2".parse().unwrap());
        services.apply(s2);
        let got = step(&mut cache, &http_routes, true, 1);
        let spec = got.iter().find(|s| s.name == "s2").unwrap();
        assert_eq!(spec.vip6, Some("fd00:96::2".parse().unwrap()));
        let mut s6 = SliceObj::clone(&slice_of("s2-bench"));
        s6.name = "s2-bench6".into();
        s6.endpoints = Box::new([]);
        s6.endpoints6 = Box::new([EndpointObj {
            ip: "fd00:10::2".parse().unwrap(),
            health: Health::Ready,
        }]);
        slices.apply(s6);
        let got = step(&mut cache, &http_routes, true, 1);
        let spec = got.iter().find(|s| s.name == "s2").unwrap();
        assert!(
            spec.endpoints
                .iter()
                .any(|e| e.ip.to_string() == "fd00:10::2"),
            "{spec:?}"
        );
        // t2 takes s2's IPv6 address only: walked, s2 keeps it, t2 is left out.
        let mut t2 = ServiceObj::clone(&find("s2"));
        t2.name = "t2".into();
        t2.vip = Some(Ipv4Addr::new(10, 96, 200, 2));
        services.apply(t2.clone());
        let got = step(&mut cache, &http_routes, false, 1);
        assert!(!got.iter().any(|s| s.name == "t2"));
        services.delete(&t2);
        step(&mut cache, &http_routes, false, 0);
        step(&mut cache, &http_routes, true, 0);
        // A route attached to s9.
        http_routes.push(obj(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: b}\n\
             spec:\n  parentRefs: [{group: '', kind: Service, name: s9}]\n  rules:\n\
             \x20 - matches: [{path: {type: PathPrefix, value: /v2}}]\n",
        ));
        let got = step(&mut cache, &http_routes, true, 1);
        assert_eq!(got.iter().find(|s| s.name == "s9").unwrap().routes.len(), 1);
        // A re-list: walked.
        services.relist_start();
        for s in services.state() {
            services.relist_apply(ServiceObj::clone(&s));
        }
        services.relist_done();
        step(&mut cache, &http_routes, false, 0);
    }

    #[test]
    fn protocols_from_app_protocol_and_port_names() {
        assert_eq!(protocol(Some("kubernetes.io/h2c"), None), Protocol::Http2);
        assert_eq!(protocol(None, Some("grpc-web")), Protocol::Grpc);
        assert_eq!(protocol(None, Some("http-metrics")), Protocol::Http);
        assert_eq!(protocol(None, Some("web")), Protocol::Auto);
        assert_eq!(protocol(None, None), Protocol::Auto);
    }

    #[test]
    fn slimmed_objects_build_the_same_snapshot() {
        use crate::enrol::k8s::Slim;
        let mut c = cluster();
        c.pods.push(obj(
            "metadata: {name: full, namespace: shop, uid: u9, labels: {app: full}, ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: rs, uid: r1}],\n\
             \x20 annotations: {kubectl.kubernetes.io/last-applied-configuration: '{}', keep: me}, managedFields: [{manager: kubectl, operation: Apply}]}\n\
             spec: {serviceAccountName: web, containers: [{name: c, image: i, env: [{name: A, value: b}]}], volumes: [{name: v, emptyDir: {}}]}\n\
             status: {phase: Running, podIP: 10.1.0.8, conditions: [{type: Ready, status: 'True'}], containerStatuses: [{name: c, image: i, imageID: x, ready: true, restartCount: 0}]}",
        ));
        c.slices.push(obj(
            "metadata: {name: reviews-2, namespace: shop, labels: {kubernetes.io/service-name: reviews}}\naddressType: IPv4\n\
             ports: [{name: http, port: 8080}]\n\
             endpoints: [{addresses: [10.1.0.8], nodeName: n1, zone: z1, hostname: h, targetRef: {kind: Pod, name: full, namespace: shop, uid: u9}, hints: {forZones: [{name: z1}]}}]",
        ));
        let opts = Options {
            excludes: &[],
            trust_domain: "td",
        };
        let resolve = |p: &Pod| -> Result<PathBuf, String> {
            Ok(PathBuf::from(format!(
                "/proc/{}/ns/net",
                p.name_any().len()
            )))
        };
        let before = build(&c, &opts, &mut resolve.clone());
        fn slim_all<K: Slim + Clone>(v: &mut [Arc<K>]) {
            for o in v {
                Arc::make_mut(o).slim();
            }
        }
        slim_all(&mut c.namespaces);
        slim_all(&mut c.pods);
        slim_all(&mut c.service_accounts);
        slim_all(&mut c.http_routes);
        let full = c.pods.iter().find(|p| p.name_any() == "full").unwrap();
        assert!(
            full.metadata.managed_fields.is_none()
                && full.spec.as_ref().unwrap().containers.is_empty()
        );
        assert_eq!(
            full.annotations().len(),
            1,
            "only the last-applied annotation goes"
        );
        let after = build(&c, &opts, &mut resolve.clone());
        assert_eq!(after.snapshot, before.snapshot);
        assert_eq!(after.unresolved, before.unresolved);
        assert_eq!(after.route_problems, before.route_problems);
        assert!(after
            .snapshot
            .workloads
            .iter()
            .any(|w| w.name == "full" && w.enrolled));
    }
}

#[cfg(test)]
mod measure {
    use super::*;

    /// The xds bench's Kubernetes objects (xtask/bench-xds.py `service`, `endpoint_slice`).
    pub(super) fn bench_cluster(n: usize) -> Cluster {
        fn json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
            serde_json::from_value(v).unwrap()
        }
        let mut c = Cluster {
            namespaces: vec![Arc::new(json(
                serde_json::json!({"metadata": {"name": "b"}}),
            ))],
            ..Default::default()
        };
        for i in 0..n {
            let (hi, lo) = (i >> 8, i & 255);
            c.services.push(Arc::new(json(serde_json::json!({
                "metadata": {"name": format!("s{i}"), "namespace": "b"},
                "spec": {"clusterIP": format!("127.96.{hi}.{lo}"),
                         "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
            }))));
            c.slices.push(Arc::new(json(serde_json::json!({
                "metadata": {"name": format!("s{i}-bench"), "namespace": "b",
                             "labels": {"kubernetes.io/service-name": format!("s{i}")}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}],
                "endpoints": (0..10).map(|j| serde_json::json!(
                    {"addresses": [format!("10.{}.{hi}.{lo}", 100 + j)], "conditions": {"ready": true}}
                )).collect::<Vec<_>>(),
            }))));
        }
        c
    }

    /// One EndpointSlice changed at 10k Services: the build, in one process. `cargo test
    /// --release -p mesh-agent --lib k8s_change_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn k8s_change_cost_at_10k() {
        use std::time::Instant;
        let mut c = bench_cluster(10_000);
        let opts = Options {
            excludes: &[],
            trust_domain: "cluster.local",
        };
        let mut resolve = |_: &Pod| -> Result<PathBuf, String> { Ok(PathBuf::new()) };
        // `walk`: every Service compared (no change log); `follow`: the build `k8s::run`
        // makes, given the stores' log of the one changed slice.
        for follow in [false, true] {
            let mut cache = ServiceCache::default();
            let mut last = build_cached(&c, &opts, &mut resolve, &mut cache).snapshot;
            let mut ms = Vec::new();
            for k in 0..20u8 {
                let old = c.slices[0].clone();
                let mut s = SliceObj::clone(&old);
                s.endpoints[0].ip = Ipv4Addr::new(10, 99, 0, k);
                c.slices[0] = Arc::new(s);
                if follow {
                    cache.changes = Some(Changes {
                        services: Vec::new(),
                        slices: vec![(Some(old), Some(c.slices[0].clone()))],
                    });
                }
                let t0 = Instant::now();
                let snap = build_cached(&c, &opts, &mut resolve, &mut cache).snapshot;
                ms.push(t0.elapsed().as_secs_f64() * 1e3);
                assert!(!snap.same_as(&last));
                last = snap;
            }
            assert_eq!(cache.followed, if follow { 20 } else { 0 });
            ms.sort_by(f64::total_cmp);
            println!(
                "build ({}) median {:7.2} ms  min {:7.2}  max {:7.2}",
                if follow { "follow" } else { "walk" },
                ms[ms.len() / 2],
                ms[0],
                ms[ms.len() - 1]
            );
        }
    }
}
