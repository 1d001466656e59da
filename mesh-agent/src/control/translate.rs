//! The standalone file's services -> Envoy v3 resources, the way Istio names them, so
//! any xDS client (our proxy, Envoy) can consume them.
//!
//! Per service port:
//! - Listener `<vip>:<port>`: HTTP connection manager (RDS) for `http`/`http2`/`grpc`,
//!   `tcp_proxy` for `tcp`; for `auto`, the HTTP inspector picks the HTTP chain for
//!   HTTP/1.x and h2c and a `tcp_proxy` chain for anything else. A dual-stack service
//!   (`vip6`) has a second listener `[<vip6>]:<port>`, the same but for its address: the
//!   same route configuration and cluster. (Not one listener with Envoy's
//!   `additional_addresses`: on-demand clients subscribe to a listener by the name
//!   `<ip>:<port>` of the destination they met, so each address needs its own name.)
//! - RouteConfiguration `<name>.<namespace>:<port>`: one virtual host (`*`), the
//!   service's routes, then a catch-all to the service itself.
//! - Cluster `outbound|<port>||<name>.<namespace>`: EDS, load balancing, circuit breaker,
//!   outlier detection, HTTP/2 upstream for `http2`/`grpc`.
//! - ClusterLoadAssignment of the same name: selected workloads and explicit endpoints.
//!
//! Per workload (of every node), ztunnel's `istio.workload.Address` named by its uid
//! (`Kubernetes//Pod/<namespace>/<name>`, istiod's form); per AuthorizationPolicy,
//! `istio.security.Authorization`, and per PeerAuthentication our
//! `meshagent.v1.PeerAuthentication`, both named `<namespace>/<name>` (`wire::istio`
//! says how Istio's fields map).

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3 as ec, core::v3 as core, endpoint::v3 as ee, listener::v3 as el,
            route::v3 as er,
        },
        extensions::filters::{
            common::fault::v3 as common_fault,
            http::{fault::v3 as hfault, local_ratelimit::v3 as hrl, router::v3::Router},
            listener::http_inspector::v3::HttpInspector,
            network::{http_connection_manager::v3 as hcm, tcp_proxy::v3 as tcp},
        },
        r#type::{matcher::v3 as matcher, v3 as etype},
    },
    google::protobuf::{Any, Duration as PbDuration, UInt32Value},
};
use envoy_types::util::pack_any;

use crate::control::model::{
    security::{
        self as sec, AuthorizationPolicy, AuthzAction, ConditionKey, MtlsModeSpec,
        PeerAuthentication, Security, DEFAULT_ROOT_NAMESPACE,
    },
    KvMatchSpec, LbPolicySpec, Member, Protocol, RateLimitSpec, RouteSpec, ServicePort,
    ServiceSpec,
};
use crate::control::server::Packed;
use crate::wire::istio;
use crate::wire::{FAULT_FILTER, HCM_FILTER, RATE_LIMIT_FILTER, ROUTER_FILTER, TCP_PROXY_FILTER};

pub use crate::wire::HTTP_INSPECTOR;

pub fn cluster_name(svc: &ServiceSpec, port: u16) -> String {
    format!("outbound|{port}||{}.{}", svc.name, svc.namespace)
}

pub fn route_name(svc: &ServiceSpec, port: u16) -> String {
    format!("{}.{}:{port}", svc.name, svc.namespace)
}

pub fn listener_name(svc: &ServiceSpec, port: u16) -> String {
    format!("{}:{port}", svc.vip)
}

/// The listeners' addresses of a service port: `vip:port`, then `[vip6]:port`.
fn listener_addresses(svc: &ServiceSpec, port: u16) -> impl Iterator<Item = SocketAddr> {
    std::iter::once(SocketAddr::from((svc.vip, port)))
        .chain(svc.vip6.map(|ip| SocketAddr::from((ip, port))))
}

fn ms(ms: u64) -> PbDuration {
    PbDuration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

fn u32v(v: u32) -> Option<UInt32Value> {
    Some(UInt32Value { value: v })
}

fn ads() -> Option<core::ConfigSource> {
    Some(core::ConfigSource {
        resource_api_version: core::ApiVersion::V3 as i32,
        config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
            core::AggregatedConfigSource {},
        )),
        ..Default::default()
    })
}

fn socket_address(ip: String, port: u16) -> Option<core::Address> {
    Some(core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: ip,
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port as u32)),
            ..Default::default()
        })),
    })
}

/// Every resource the file defines, as `(name, Any)`.
#[cfg(test)]
pub fn resources(file: &crate::enrol::file::MeshFile) -> Vec<(String, Any)> {
    let mut t = Translator::default();
    t.update_mesh(&file.services, &file.members(), &Arc::new(file.security()));
    t.resources(&file.services, &file.members())
}

/// Services by (namespace, name): how route backends are resolved.
type Index<'a> = HashMap<(&'a str, &'a str), &'a ServiceSpec>;

/// A resource's identity in the served set: (type URL, name).
pub type Key = (String, String);

/// What an update changed in the served resources.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Delta {
    /// Resources new or changed, as `(name, resource)`.
    pub upserts: Vec<(String, Arc<Packed>)>,
    /// Resources gone, as (type URL, name).
    pub removes: Vec<Key>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removes.is_empty()
    }
}

/// Translation that remembers each service's resources. A service whose spec (the same
/// `Arc`, or an equal value) and inputs (its route backends' ports, the workloads its
/// selector picks) did not change is not translated again, and of a service translated
/// again only the resources whose content changed are passed on: an update costs a
/// pointer comparison per service and a translation per changed one, and the ADS server
/// gets only what changed.
#[derive(Default)]
pub struct Translator {
    cache: HashMap<(String, String), Cached>,
    /// The services of the last update, in order: a service at the same position as the
    /// same `Arc`, which reads no other service and no workload, is unchanged without
    /// any lookup.
    prev: Vec<Arc<ServiceSpec>>,
    /// Services translated (not reused) since start.
    pub translated: u64,
    /// Workload addresses and policies as last passed on, by key.
    mesh: HashMap<Key, Arc<Packed>>,
    /// What `mesh` was built from: the same inputs build nothing.
    mesh_inputs: Option<(Vec<Member>, Arc<Security>)>,
    /// The policies of the last `update_mesh` (`update` keeps them).
    security: Arc<Security>,
    /// Trust domain written into workloads; empty: elided (the mesh default,
    /// `cluster.local`, to clients).
    trust_domain: String,
    /// Where mesh-wide policies live; empty: `istio-system`.
    root_namespace: String,
}

struct Cached {
    spec: Arc<ServiceSpec>,
    inputs: Inputs,
    out: Vec<(String, Arc<Packed>)>,
}

/// What a service's resources depend on besides its own spec.
#[derive(Debug, PartialEq)]
struct Inputs {
    /// Per route backend, in order: the resolved backend's ports (`None`: unresolved, the
    /// service itself is used).
    backends: Vec<Option<Vec<ServicePort>>>,
    /// The selected workloads' addresses, in file order.
    selected: Vec<std::net::Ipv4Addr>,
}

fn backend<'a>(index: &Index<'a>, svc: &ServiceSpec, name: &str) -> Option<&'a ServiceSpec> {
    let (n, ns) = name.split_once('.').unwrap_or((name, &svc.namespace));
    index.get(&(ns, n)).copied()
}

fn selected<'w>(namespace_workloads: &[&'w Member], svc: &ServiceSpec) -> Vec<&'w Member> {
    if svc.selector.is_empty() {
        return Vec::new();
    }
    namespace_workloads
        .iter()
        .filter(|w| svc.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
        .copied()
        .collect()
}

fn key_of(name: &str, any: &Packed) -> Key {
    (any.type_url.as_str().to_owned(), name.to_owned())
}

impl Translator {
    /// A translator writing `trust_domain` into workloads (`--trust-domain`) and taking
    /// policies of `root_namespace` as mesh-wide (empty: `istio-system`).
    pub fn new(trust_domain: &str, root_namespace: &str) -> Translator {
        Translator {
            trust_domain: trust_domain.to_owned(),
            root_namespace: root_namespace.to_owned(),
            ..Default::default()
        }
    }

    fn root_namespace(&self) -> &str {
        if self.root_namespace.is_empty() {
            DEFAULT_ROOT_NAMESPACE
        } else {
            &self.root_namespace
        }
    }

    /// Every resource, in service order, then workloads and policies by name (what a
    /// client subscribing to everything gets).
    pub fn resources(
        &mut self,
        services: &[Arc<ServiceSpec>],
        workloads: &[Member],
    ) -> Vec<(String, Any)> {
        self.update(services, workloads);
        let mut mesh: Vec<(&Key, &Arc<Packed>)> = self.mesh.iter().collect();
        mesh.sort_by(|a, b| a.0.cmp(b.0));
        self.prev
            .iter()
            .filter_map(|s| self.cache.get(&(s.namespace.clone(), s.name.clone())))
            .flat_map(|c| c.out.iter().map(|(n, a)| (n.clone(), a.to_any())))
            .chain(mesh.into_iter().map(|((_, n), a)| (n.clone(), a.to_any())))
            .collect()
    }

    /// Brings the translation up to date with `services` and `workloads`, keeping the
    /// policies of the last `update_mesh`; returns what changed since the last update.
    pub fn update(&mut self, services: &[Arc<ServiceSpec>], workloads: &[Member]) -> Delta {
        let security = self.security.clone();
        self.update_mesh(services, workloads, &security)
    }

    /// `update` with the mesh's security policies.
    pub fn update_mesh(
        &mut self,
        services: &[Arc<ServiceSpec>],
        workloads: &[Member],
        security: &Arc<Security>,
    ) -> Delta {
        let mut delta = self.update_services(services, workloads);
        self.update_workloads(workloads, security, &mut delta);
        delta
    }

    /// Workload addresses and policies: built again when the workloads or the policies
    /// changed (a few microseconds per workload), passed on only where content did.
    fn update_workloads(
        &mut self,
        workloads: &[Member],
        security: &Arc<Security>,
        delta: &mut Delta,
    ) {
        self.security = security.clone();
        if self
            .mesh_inputs
            .as_ref()
            .is_some_and(|(w, s)| w == workloads && (Arc::ptr_eq(s, security) || **s == **security))
        {
            return;
        }
        let fresh = mesh_resources(
            workloads,
            security,
            &self.trust_domain,
            self.root_namespace(),
        );
        let mut old = std::mem::take(&mut self.mesh);
        for (name, any) in fresh {
            let k = key_of(&name, &any);
            let kept = match old.remove(&k) {
                Some(prev) if super::server::same(&prev, &any) => prev,
                _ => {
                    let any = Arc::new(any);
                    delta.upserts.push((name, any.clone()));
                    any
                }
            };
            self.mesh.insert(k, kept);
        }
        delta.removes.extend(old.into_keys());
        self.mesh_inputs = Some((workloads.to_vec(), security.clone()));
    }

    fn update_services(&mut self, services: &[Arc<ServiceSpec>], workloads: &[Member]) -> Delta {
        // Built on first need: an update that only touches services reading nothing else
        // does not index the mesh.
        let index: std::cell::OnceCell<Index<'_>> = std::cell::OnceCell::new();
        let index = || {
            index.get_or_init(|| {
                services
                    .iter()
                    .map(|s| ((s.namespace.as_str(), s.name.as_str()), &**s))
                    .collect()
            })
        };
        // Selectors look within a namespace: index the workloads once.
        let by_ns: std::cell::OnceCell<HashMap<&str, Vec<&Member>>> = std::cell::OnceCell::new();
        let by_ns = || {
            by_ns.get_or_init(|| {
                let mut m: HashMap<&str, Vec<&Member>> = HashMap::new();
                for w in workloads {
                    m.entry(w.namespace.as_str()).or_default().push(w);
                }
                m
            })
        };
        let mut delta = Delta::default();
        let prev = std::mem::take(&mut self.prev);
        // Whether the set of service keys may differ from the last update's (then gone
        // services are looked for).
        let mut keys_moved = prev.len() != services.len();
        for (i, svc) in services.iter().enumerate() {
            let old = prev.get(i);
            if old.is_some_and(|p| Arc::ptr_eq(p, svc)) && reads_nothing_else(svc) {
                continue;
            }
            if !old.is_some_and(|p| p.namespace == svc.namespace && p.name == svc.name) {
                keys_moved = true;
            }
            let ns_workloads = by_ns()
                .get(svc.namespace.as_str())
                .map_or(&[][..], Vec::as_slice);
            let picked = selected(ns_workloads, svc);
            let inputs = Inputs {
                backends: svc
                    .routes
                    .iter()
                    .flat_map(|r| &r.backends)
                    .map(|b| backend(index(), svc, &b.service).map(|t| t.ports.clone()))
                    .collect(),
                selected: picked.iter().map(|w| w.ip).collect(),
            };
            let key = (svc.namespace.clone(), svc.name.clone());
            let unchanged = self.cache.get(&key).is_some_and(|c| {
                (Arc::ptr_eq(&c.spec, svc) || c.spec == *svc) && c.inputs == inputs
            });
            if unchanged {
                continue;
            }
            self.translated += 1;
            let fresh = service_resources(index(), &picked, svc);
            let old = self.cache.remove(&key).map(|c| c.out).unwrap_or_default();
            let mut old: HashMap<Key, Arc<Packed>> =
                old.into_iter().map(|(n, a)| (key_of(&n, &a), a)).collect();
            let mut out = Vec::with_capacity(fresh.len());
            for (name, any) in fresh {
                let k = key_of(&name, &any);
                let kept = match old.remove(&k) {
                    Some(prev) if super::server::same(&prev, &any) => prev,
                    _ => {
                        let any = Arc::new(any);
                        delta.upserts.push((name.clone(), any.clone()));
                        any
                    }
                };
                out.push((name, kept));
            }
            delta.removes.extend(old.into_keys());
            self.cache.insert(
                key,
                Cached {
                    spec: svc.clone(),
                    inputs,
                    out,
                },
            );
        }
        if keys_moved || self.cache.len() != services.len() {
            let seen: std::collections::HashSet<(&str, &str)> = services
                .iter()
                .map(|s| (s.namespace.as_str(), s.name.as_str()))
                .collect();
            let gone: Vec<(String, String)> = self
                .cache
                .keys()
                .filter(|(ns, n)| !seen.contains(&(ns.as_str(), n.as_str())))
                .cloned()
                .collect();
            for k in gone {
                if let Some(c) = self.cache.remove(&k) {
                    delta
                        .removes
                        .extend(c.out.iter().map(|(n, a)| key_of(n, a)));
                }
            }
        }
        self.prev = services.to_vec();
        delta
    }
}

/// ztunnel's key of a workload (istiod's form for a pod).
pub fn workload_uid(namespace: &str, name: &str) -> String {
    format!("Kubernetes//Pod/{namespace}/{name}")
}

fn scope(selector: Option<&sec::WorkloadSelector>, namespace: &str, root: &str) -> istio::Scope {
    match selector {
        Some(s) if !s.match_labels.is_empty() => istio::Scope::WorkloadSelector,
        _ if namespace == root => istio::Scope::Global,
        _ => istio::Scope::Namespace,
    }
}

/// Whether a selector-based policy of `namespace` applies to `w` (a root-namespace one
/// selects across namespaces, as in Istio).
fn selects(
    selector: Option<&sec::WorkloadSelector>,
    namespace: &str,
    root: &str,
    w: &Member,
) -> bool {
    selector.is_some_and(|s| {
        !s.match_labels.is_empty()
            && (namespace == w.namespace || namespace == root)
            && s.selects(&w.labels)
    })
}

fn mesh_resources(
    workloads: &[Member],
    security: &Security,
    trust_domain: &str,
    root: &str,
) -> Vec<(String, Packed)> {
    let mut out = Vec::with_capacity(
        workloads.len()
            + security.authorization_policies.len()
            + security.peer_authentications.len(),
    );
    for w in workloads {
        // A workload without a valid identity (an empty namespace or service account, a
        // character a SPIFFE ID cannot hold) is not offered as a mesh workload: every
        // proxy would refuse the resource, and with it the whole response.
        // (Empty trust domain and service account read as the defaults, as the proxy reads
        // them.)
        let td = if trust_domain.is_empty() {
            istio::DEFAULT_TRUST_DOMAIN
        } else {
            trust_domain
        };
        let sa = if w.service_account.is_empty() {
            super::model::DEFAULT_SERVICE_ACCOUNT
        } else {
            &w.service_account
        };
        if let Err(e) = crate::identity::SpiffeId::new(td, &w.namespace, sa) {
            tracing::warn!(workload = %w.name, namespace = %w.namespace, error = %e, "workload left out of the mesh's workload addresses");
            continue;
        }
        let authz = security
            .authorization_policies
            .iter()
            .filter(|p| selects(p.spec.selector.as_ref(), &p.metadata.namespace, root, w))
            .map(|p| p.metadata.key())
            .collect();
        let peer = security
            .peer_authentications
            .iter()
            .filter(|p| selects(p.spec.selector.as_ref(), &p.metadata.namespace, root, w))
            .map(|p| p.metadata.key())
            .collect();
        let uid = workload_uid(&w.namespace, &w.name);
        let workload = istio::Workload {
            uid: uid.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            // The IPv4 address first: it is the one HBONE tunnels are opened to.
            addresses: std::iter::once(w.ip.octets().to_vec())
                .chain(w.ip6.map(|a| a.octets().to_vec()))
                .collect(),
            tunnel_protocol: if w.hbone {
                istio::TunnelProtocol::Hbone
            } else {
                istio::TunnelProtocol::None
            } as i32,
            trust_domain: trust_domain.to_owned(),
            service_account: w.service_account.clone(),
            node: w.node.clone(),
            workload_name: w.name.clone(),
            canonical_name: w.app.clone(),
            canonical_revision: w.version.clone(),
            authorization_policies: authz,
            peer_authentications: peer,
            access_log: w.access_log,
            ..Default::default()
        };
        let address = istio::Address {
            r#type: Some(istio::address::Type::Workload(workload)),
        };
        out.push((uid, Packed::pack(&address)));
    }
    for p in &security.authorization_policies {
        out.push((p.metadata.key(), Packed::pack(&authorization(p, root))));
    }
    for p in &security.peer_authentications {
        out.push((
            p.metadata.key(),
            Packed::pack(&peer_authentication(p, root)),
        ));
    }
    out
}

/// Istio's string forms: `*` any non-empty value, `prefix*`, `*suffix`, else exact.
fn string_match(v: &str) -> istio::StringMatch {
    use istio::string_match::MatchType;
    let m = if v == "*" {
        MatchType::Presence(istio::Empty {})
    } else if let Some(rest) = v.strip_prefix('*') {
        MatchType::Suffix(rest.to_owned())
    } else if let Some(rest) = v.strip_suffix('*') {
        MatchType::Prefix(rest.to_owned())
    } else {
        MatchType::Exact(v.to_owned())
    };
    istio::StringMatch {
        match_type: Some(m),
    }
}

fn strings(vs: &[String]) -> Vec<istio::StringMatch> {
    vs.iter().map(|v| string_match(v)).collect()
}

/// Principals are compared without `spiffe://`, as Istio writes them.
fn principals(vs: &[String]) -> Vec<istio::StringMatch> {
    vs.iter()
        .map(|v| string_match(v.strip_prefix("spiffe://").unwrap_or(v)))
        .collect()
}

fn ip_blocks<'a>(vs: impl IntoIterator<Item = &'a String>) -> Vec<istio::IpBlock> {
    vs.into_iter()
        .filter_map(|v| sec::parse_ip_block(v))
        .map(|(ip, len)| istio::IpBlock {
            address: match ip {
                std::net::IpAddr::V4(a) => a.octets().to_vec(),
                std::net::IpAddr::V6(a) => a.octets().to_vec(),
            },
            length: len as u32,
        })
        .collect()
}

fn ports(vs: &[sec::PortValue]) -> Vec<u32> {
    vs.iter().filter_map(|p| p.port()).map(u32::from).collect()
}

fn authorization(p: &AuthorizationPolicy, root: &str) -> istio::Authorization {
    let action = match p.spec.action {
        AuthzAction::Allow => istio::Action::Allow,
        AuthzAction::Deny => istio::Action::Deny,
        AuthzAction::Audit => istio::Action::Audit,
        // Refused by the file check; never served as an ALLOW.
        AuthzAction::Custom => istio::Action::Deny,
    };
    let rules = p
        .spec
        .rules
        .iter()
        .map(|r| {
            let mut clauses = Vec::new();
            if !r.from.is_empty() {
                clauses.push(istio::Clause {
                    matches: r
                        .from
                        .iter()
                        .map(|f| {
                            let s = &f.source;
                            istio::Match {
                                principals: principals(&s.principals),
                                not_principals: principals(&s.not_principals),
                                namespaces: strings(&s.namespaces),
                                not_namespaces: strings(&s.not_namespaces),
                                source_ips: ip_blocks(
                                    s.ip_blocks.iter().chain(&s.remote_ip_blocks),
                                ),
                                not_source_ips: ip_blocks(
                                    s.not_ip_blocks.iter().chain(&s.not_remote_ip_blocks),
                                ),
                                ..Default::default()
                            }
                        })
                        .collect(),
                });
            }
            if !r.to.is_empty() {
                clauses.push(istio::Clause {
                    matches: r
                        .to
                        .iter()
                        .map(|t| {
                            let o = &t.operation;
                            istio::Match {
                                destination_ports: ports(&o.ports),
                                not_destination_ports: ports(&o.not_ports),
                                methods: strings(&o.methods),
                                not_methods: strings(&o.not_methods),
                                paths: strings(&o.paths),
                                not_paths: strings(&o.not_paths),
                                hosts: strings(&o.hosts),
                                not_hosts: strings(&o.not_hosts),
                                ..Default::default()
                            }
                        })
                        .collect(),
                });
            }
            for c in &r.when {
                let Ok(key) = ConditionKey::parse(&c.key) else {
                    continue;
                };
                let (v, nv) = (&c.values, &c.not_values);
                let m = match key {
                    ConditionKey::SourceIp => istio::Match {
                        source_ips: ip_blocks(v),
                        not_source_ips: ip_blocks(nv),
                        ..Default::default()
                    },
                    ConditionKey::DestinationIp => istio::Match {
                        destination_ips: ip_blocks(v),
                        not_destination_ips: ip_blocks(nv),
                        ..Default::default()
                    },
                    ConditionKey::SourceNamespace => istio::Match {
                        namespaces: strings(v),
                        not_namespaces: strings(nv),
                        ..Default::default()
                    },
                    ConditionKey::SourcePrincipal => istio::Match {
                        principals: principals(v),
                        not_principals: principals(nv),
                        ..Default::default()
                    },
                    ConditionKey::DestinationPort => {
                        let p = |vs: &[String]| -> Vec<u32> {
                            vs.iter()
                                .filter_map(|s| sec::PortValue::Text(s.clone()).port())
                                .map(u32::from)
                                .collect()
                        };
                        istio::Match {
                            destination_ports: p(v),
                            not_destination_ports: p(nv),
                            ..Default::default()
                        }
                    }
                    ConditionKey::RequestHeader(name) => istio::Match {
                        headers: vec![istio::HeaderCondition {
                            name,
                            values: strings(v),
                            not_values: strings(nv),
                        }],
                        ..Default::default()
                    },
                };
                clauses.push(istio::Clause { matches: vec![m] });
            }
            istio::Rule { clauses }
        })
        .collect();
    istio::Authorization {
        name: p.metadata.name.clone(),
        namespace: p.metadata.namespace.clone(),
        scope: scope(p.spec.selector.as_ref(), &p.metadata.namespace, root) as i32,
        action: action as i32,
        rules,
    }
}

fn mtls_mode(m: Option<MtlsModeSpec>) -> istio::MtlsMode {
    match m.unwrap_or_default() {
        MtlsModeSpec::Unset => istio::MtlsMode::Unset,
        MtlsModeSpec::Disable => istio::MtlsMode::Disable,
        MtlsModeSpec::Permissive => istio::MtlsMode::Permissive,
        MtlsModeSpec::Strict => istio::MtlsMode::Strict,
    }
}

fn peer_authentication(p: &PeerAuthentication, root: &str) -> istio::PeerAuthentication {
    istio::PeerAuthentication {
        name: p.metadata.name.clone(),
        namespace: p.metadata.namespace.clone(),
        scope: scope(p.spec.selector.as_ref(), &p.metadata.namespace, root) as i32,
        mode: mtls_mode(p.spec.mtls.map(|m| m.mode)) as i32,
        port_level: p
            .spec
            .port_level_mtls
            .iter()
            .map(|(port, m)| istio::PortMtls {
                port: *port,
                mode: mtls_mode(Some(m.mode)) as i32,
            })
            .collect(),
    }
}

/// A service whose resources depend on its own spec only: no route names a backend, no
/// selector picks workloads.
fn reads_nothing_else(svc: &ServiceSpec) -> bool {
    svc.selector.is_empty() && svc.routes.iter().all(|r| r.backends.is_empty())
}

fn service_resources(
    index: &Index<'_>,
    picked: &[&Member],
    svc: &ServiceSpec,
) -> Vec<(String, Packed)> {
    let mut out = Vec::new();
    for p in &svc.ports {
        for at in listener_addresses(svc, p.port) {
            out.push((at.to_string(), Packed::pack(&listener(svc, p, at))));
        }
        if p.protocol != Protocol::Tcp {
            out.push((
                route_name(svc, p.port),
                Packed::pack(&route_config(index, svc, p)),
            ));
            out.push((route_name(svc, p.port), Packed::pack(&api_listener(svc, p))));
        }
        out.push((cluster_name(svc, p.port), Packed::pack(&cluster(svc, p))));
        out.push((
            cluster_name(svc, p.port),
            Packed::pack(&load_assignment(picked, svc, p)),
        ));
    }
    out
}

/// The listener of `svc`'s port `p` at `at` (its `vip` or `vip6`), named by that address.
fn listener(svc: &ServiceSpec, p: &ServicePort, at: SocketAddr) -> el::Listener {
    let tcp_chain = || el::FilterChain {
        filters: vec![el::Filter {
            name: TCP_PROXY_FILTER.into(),
            config_type: Some(el::filter::ConfigType::TypedConfig(pack_any(
                tcp::TcpProxy {
                    stat_prefix: cluster_name(svc, p.port),
                    cluster_specifier: Some(tcp::tcp_proxy::ClusterSpecifier::Cluster(
                        cluster_name(svc, p.port),
                    )),
                    ..Default::default()
                },
            ))),
        }],
        ..Default::default()
    };
    let http_chain = |codec: hcm::http_connection_manager::CodecType| el::FilterChain {
        filters: vec![el::Filter {
            name: HCM_FILTER.into(),
            config_type: Some(el::filter::ConfigType::TypedConfig(pack_any(
                http_connection_manager(svc, p, codec),
            ))),
        }],
        ..Default::default()
    };
    use hcm::http_connection_manager::CodecType;
    let (filter_chains, listener_filters) = match p.protocol {
        Protocol::Tcp => (vec![tcp_chain()], vec![]),
        Protocol::Http => (vec![http_chain(CodecType::Http1)], vec![]),
        // AUTO: h2 with prior knowledge (the preface), and HTTP/1.1 clients too.
        Protocol::Http2 | Protocol::Grpc => (vec![http_chain(CodecType::Auto)], vec![]),
        Protocol::Auto => {
            let mut h = http_chain(CodecType::Auto);
            h.filter_chain_match = Some(el::FilterChainMatch {
                application_protocols: vec!["http/1.0".into(), "http/1.1".into(), "h2c".into()],
                ..Default::default()
            });
            (
                vec![h, tcp_chain()],
                vec![el::ListenerFilter {
                    name: HTTP_INSPECTOR.into(),
                    config_type: Some(el::listener_filter::ConfigType::TypedConfig(pack_any(
                        HttpInspector {},
                    ))),
                    ..Default::default()
                }],
            )
        }
    };
    el::Listener {
        name: at.to_string(),
        address: socket_address(at.ip().to_string(), p.port),
        filter_chains,
        listener_filters,
        ..Default::default()
    }
}

/// For proxyless gRPC clients (`xds:///<name>.<namespace>:<port>`): an API listener
/// named like the route configuration, served only to clients that ask for it by name.
fn api_listener(svc: &ServiceSpec, p: &ServicePort) -> el::Listener {
    let hcm = hcm::HttpConnectionManager {
        stat_prefix: route_name(svc, p.port),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                config_source: ads(),
                route_config_name: route_name(svc, p.port),
            },
        )),
        http_filters: vec![hcm::HttpFilter {
            name: ROUTER_FILTER.into(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pack_any(
                Router::default(),
            ))),
            ..Default::default()
        }],
        ..Default::default()
    };
    el::Listener {
        name: route_name(svc, p.port),
        api_listener: Some(el::ApiListener {
            api_listener: Some(pack_any(hcm)),
        }),
        ..Default::default()
    }
}

fn http_connection_manager(
    svc: &ServiceSpec,
    p: &ServicePort,
    codec: hcm::http_connection_manager::CodecType,
) -> hcm::HttpConnectionManager {
    let mut http_filters = Vec::new();
    let any_fault = svc.routes.iter().any(|r| r.fault.is_some());
    if any_fault {
        // Configured per route; the listener-level filter is empty.
        http_filters.push(hcm::HttpFilter {
            name: FAULT_FILTER.into(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pack_any(
                hfault::HttpFault::default(),
            ))),
            ..Default::default()
        });
    }
    if svc.rate_limit.is_some() || svc.routes.iter().any(|r| r.rate_limit.is_some()) {
        http_filters.push(hcm::HttpFilter {
            name: RATE_LIMIT_FILTER.into(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pack_any(
                svc.rate_limit
                    .as_ref()
                    .map(|r| local_rate_limit(&route_name(svc, p.port), r))
                    .unwrap_or_else(|| hrl::LocalRateLimit {
                        stat_prefix: route_name(svc, p.port),
                        ..Default::default()
                    }),
            ))),
            ..Default::default()
        });
    }
    http_filters.push(hcm::HttpFilter {
        name: ROUTER_FILTER.into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pack_any(
            Router::default(),
        ))),
        ..Default::default()
    });
    hcm::HttpConnectionManager {
        stat_prefix: route_name(svc, p.port),
        codec_type: codec as i32,
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                config_source: ads(),
                route_config_name: route_name(svc, p.port),
            },
        )),
        http_filters,
        max_request_headers_kb: svc.max_request_headers_kb.and_then(u32v),
        ..Default::default()
    }
}

fn local_rate_limit(prefix: &str, r: &RateLimitSpec) -> hrl::LocalRateLimit {
    let all = || {
        Some(core::RuntimeFractionalPercent {
            default_value: Some(etype::FractionalPercent {
                numerator: 100,
                denominator: etype::fractional_percent::DenominatorType::Hundred as i32,
            }),
            runtime_key: String::new(),
        })
    };
    hrl::LocalRateLimit {
        stat_prefix: prefix.to_owned(),
        token_bucket: Some(etype::TokenBucket {
            max_tokens: r.max_tokens,
            tokens_per_fill: u32v(r.tokens_per_fill.unwrap_or(r.max_tokens)),
            fill_interval: Some(ms(r.fill_interval_ms)),
        }),
        filter_enabled: all(),
        filter_enforced: all(),
        enable_x_ratelimit_headers: 1,
        ..Default::default()
    }
}

fn percent(p: f64) -> Option<etype::FractionalPercent> {
    Some(etype::FractionalPercent {
        numerator: (p * 10_000.0).round() as u32,
        denominator: etype::fractional_percent::DenominatorType::Million as i32,
    })
}

fn header_options(h: &std::collections::BTreeMap<String, String>) -> Vec<core::HeaderValueOption> {
    h.iter()
        .map(|(k, v)| core::HeaderValueOption {
            header: Some(core::HeaderValue {
                key: k.clone(),
                value: v.clone(),
                ..Default::default()
            }),
            append_action: core::header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd
                as i32,
            ..Default::default()
        })
        .collect()
}

fn string_matcher(m: &KvMatchSpec) -> Option<matcher::StringMatcher> {
    use matcher::string_matcher::MatchPattern as M;
    let pattern = if let Some(v) = &m.exact {
        M::Exact(v.clone())
    } else if let Some(v) = &m.prefix {
        M::Prefix(v.clone())
    } else if let Some(v) = &m.regex {
        M::SafeRegex(matcher::RegexMatcher {
            regex: v.clone(),
            ..Default::default()
        })
    } else {
        return None;
    };
    Some(matcher::StringMatcher {
        match_pattern: Some(pattern),
        ignore_case: false,
    })
}

fn route_config(index: &Index<'_>, svc: &ServiceSpec, p: &ServicePort) -> er::RouteConfiguration {
    let mut routes: Vec<er::Route> = svc
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| route(index, svc, p, i, r))
        .collect();
    if svc.routes.iter().all(|r| !is_catch_all(r)) {
        routes.push(route(
            index,
            svc,
            p,
            svc.routes.len(),
            &RouteSpec {
                name: Some("default".into()),
                ..Default::default()
            },
        ));
    }
    er::RouteConfiguration {
        name: route_name(svc, p.port),
        virtual_hosts: vec![er::VirtualHost {
            name: route_name(svc, p.port),
            domains: vec!["*".into()],
            routes,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn is_catch_all(r: &RouteSpec) -> bool {
    let m = &r.matcher;
    m.path.is_none()
        && m.regex.is_none()
        && m.prefix.as_deref().is_none_or(|p| p == "/")
        && m.headers.is_empty()
        && m.query.is_empty()
}

fn route(
    index: &Index<'_>,
    svc: &ServiceSpec,
    p: &ServicePort,
    i: usize,
    r: &RouteSpec,
) -> er::Route {
    use er::route_match::PathSpecifier;
    let m = &r.matcher;
    let path = if let Some(x) = &m.path {
        PathSpecifier::Path(x.clone())
    } else if let Some(x) = &m.regex {
        PathSpecifier::SafeRegex(matcher::RegexMatcher {
            regex: x.clone(),
            ..Default::default()
        })
    } else {
        PathSpecifier::Prefix(m.prefix.clone().unwrap_or_else(|| "/".into()))
    };
    let headers = m
        .headers
        .iter()
        .map(|h| er::HeaderMatcher {
            name: h.name.clone(),
            header_match_specifier: Some(match string_matcher(h) {
                Some(s) => er::header_matcher::HeaderMatchSpecifier::StringMatch(s),
                None => er::header_matcher::HeaderMatchSpecifier::PresentMatch(
                    h.present.unwrap_or(true),
                ),
            }),
            invert_match: h.invert,
            ..Default::default()
        })
        .collect();
    let query_parameters = m
        .query
        .iter()
        .map(|q| er::QueryParameterMatcher {
            name: q.name.clone(),
            query_parameter_match_specifier: Some(match string_matcher(q) {
                Some(s) => {
                    er::query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(s)
                }
                None => er::query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(
                    q.present.unwrap_or(true),
                ),
            }),
        })
        .collect();
    let action = if let Some(d) = &r.direct_response {
        er::route::Action::DirectResponse(er::DirectResponseAction {
            status: d.status,
            body: Some(core::DataSource {
                specifier: Some(core::data_source::Specifier::InlineString(d.body.clone())),
                ..Default::default()
            }),
            ..Default::default()
        })
    } else {
        er::route::Action::Route(route_action(index, svc, p, r))
    };
    let mut per_filter = HashMap::new();
    if let Some(f) = &r.fault {
        per_filter.insert(FAULT_FILTER.to_owned(), pack_any(fault(f)));
    }
    if let Some(rl) = &r.rate_limit {
        per_filter.insert(
            RATE_LIMIT_FILTER.to_owned(),
            pack_any(local_rate_limit(
                &format!("{}/{i}", route_name(svc, p.port)),
                rl,
            )),
        );
    }
    let (req_add, req_rm) = r
        .request_headers
        .as_ref()
        .map(|h| (header_options(&h.add), h.remove.clone()))
        .unwrap_or_default();
    let (resp_add, resp_rm) = r
        .response_headers
        .as_ref()
        .map(|h| (header_options(&h.add), h.remove.clone()))
        .unwrap_or_default();
    er::Route {
        name: r.name.clone().unwrap_or_else(|| format!("route-{i}")),
        r#match: Some(er::RouteMatch {
            path_specifier: Some(path),
            headers,
            query_parameters,
            ..Default::default()
        }),
        action: Some(action),
        typed_per_filter_config: per_filter,
        request_headers_to_add: req_add,
        request_headers_to_remove: req_rm,
        response_headers_to_add: resp_add,
        response_headers_to_remove: resp_rm,
        ..Default::default()
    }
}

fn route_action(
    index: &Index<'_>,
    svc: &ServiceSpec,
    p: &ServicePort,
    r: &RouteSpec,
) -> er::RouteAction {
    use er::route_action::ClusterSpecifier;
    let backend_cluster = |name: &str, wanted: Option<u16>| {
        let target = backend(index, svc, name).unwrap_or(svc);
        // The backend's port asked for, else the one of the same number, else its first.
        let port = target
            .ports
            .iter()
            .find(|q| q.port == wanted.unwrap_or(p.port))
            .or(target.ports.first())
            .map_or(p.port, |q| q.port);
        cluster_name(target, port)
    };
    let cluster_specifier = match r.backends.as_slice() {
        [] => ClusterSpecifier::Cluster(cluster_name(svc, p.port)),
        [one] => ClusterSpecifier::Cluster(backend_cluster(&one.service, one.port)),
        many => ClusterSpecifier::WeightedClusters(er::WeightedCluster {
            clusters: many
                .iter()
                .map(|b| er::weighted_cluster::ClusterWeight {
                    name: backend_cluster(&b.service, b.port),
                    weight: u32v(b.weight.unwrap_or(1)),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
    };
    let retry_policy = r.retries.as_ref().map(|x| er::RetryPolicy {
        retry_on: x.on.clone().unwrap_or_else(|| {
            if x.statuses.is_empty() {
                "5xx,reset,connect-failure".into()
            } else {
                "5xx,reset,connect-failure,retriable-status-codes".into()
            }
        }),
        num_retries: u32v(x.attempts),
        per_try_timeout: x.per_try_timeout_ms.map(ms),
        retriable_status_codes: x.statuses.clone(),
        retry_back_off: x.backoff_ms.map(|b| er::retry_policy::RetryBackOff {
            base_interval: Some(ms(b)),
            max_interval: Some(ms(b * 10)),
        }),
        ..Default::default()
    });
    let hash_policy = match (&svc.lb.policy, &svc.lb.hash_header) {
        (LbPolicySpec::RingHash, Some(h)) => vec![er::route_action::HashPolicy {
            policy_specifier: Some(er::route_action::hash_policy::PolicySpecifier::Header(
                er::route_action::hash_policy::Header {
                    header_name: h.clone(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }],
        _ => vec![],
    };
    er::RouteAction {
        cluster_specifier: Some(cluster_specifier),
        timeout: r.timeout_ms.map(ms),
        retry_policy,
        hash_policy,
        ..Default::default()
    }
}

fn fault(f: &crate::control::model::FaultSpec) -> hfault::HttpFault {
    hfault::HttpFault {
        delay: f.delay_ms.map(|d| common_fault::FaultDelay {
            fault_delay_secifier: Some(common_fault::fault_delay::FaultDelaySecifier::FixedDelay(
                ms(d),
            )),
            percentage: percent(f.delay_percent.unwrap_or(100.0)),
        }),
        abort: match (f.abort_status, f.abort_grpc_status) {
            (None, None) => None,
            (s, g) => Some(hfault::FaultAbort {
                error_type: Some(match g {
                    Some(g) => hfault::fault_abort::ErrorType::GrpcStatus(g),
                    None => hfault::fault_abort::ErrorType::HttpStatus(s.unwrap_or(503)),
                }),
                percentage: percent(f.abort_percent.unwrap_or(100.0)),
                ..Default::default()
            }),
        },
        ..Default::default()
    }
}

fn cluster(svc: &ServiceSpec, p: &ServicePort) -> ec::Cluster {
    use ec::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy};
    let lb_policy = match svc.lb.policy {
        LbPolicySpec::RoundRobin => LbPolicy::RoundRobin,
        LbPolicySpec::LeastRequest => LbPolicy::LeastRequest,
        LbPolicySpec::Random => LbPolicy::Random,
        LbPolicySpec::RingHash => LbPolicy::RingHash,
    };
    let circuit_breakers = svc.circuit_breaker.map(|c| ec::CircuitBreakers {
        thresholds: vec![ec::circuit_breakers::Thresholds {
            max_connections: c.max_connections.and_then(u32v),
            max_pending_requests: c.max_pending_requests.and_then(u32v),
            max_requests: c.max_requests.and_then(u32v),
            max_retries: c.max_retries.and_then(u32v),
            ..Default::default()
        }],
        ..Default::default()
    });
    let outlier_detection = svc.outlier_detection.map(|o| ec::OutlierDetection {
        consecutive_5xx: o.consecutive_5xx.and_then(u32v),
        base_ejection_time: o.base_ejection_ms.map(ms),
        max_ejection_percent: o.max_ejection_percent.and_then(u32v),
        interval: o.interval_ms.map(ms),
        ..Default::default()
    });
    #[expect(
        deprecated,
        reason = "http2_protocol_options is what every xDS client reads"
    )]
    ec::Cluster {
        name: cluster_name(svc, p.port),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(ec::cluster::EdsClusterConfig {
            eds_config: ads(),
            service_name: String::new(),
        }),
        connect_timeout: Some(ms(svc.connect_timeout_ms.unwrap_or(5000))),
        lb_policy: lb_policy as i32,
        circuit_breakers,
        outlier_detection,
        http2_protocol_options: matches!(p.protocol, Protocol::Http2 | Protocol::Grpc)
            .then(core::Http2ProtocolOptions::default),
        ..Default::default()
    }
}

fn load_assignment(
    selected: &[&Member],
    svc: &ServiceSpec,
    p: &ServicePort,
) -> ee::ClusterLoadAssignment {
    let port = p.target_port.unwrap_or(p.port);
    let mut lb_endpoints = Vec::new();
    let ep = |ip: String, port: u16, weight: u32, health: core::HealthStatus| ee::LbEndpoint {
        host_identifier: Some(ee::lb_endpoint::HostIdentifier::Endpoint(ee::Endpoint {
            address: socket_address(ip, port),
            ..Default::default()
        })),
        health_status: health as i32,
        load_balancing_weight: u32v(weight),
        ..Default::default()
    };
    for w in selected {
        lb_endpoints.push(ep(w.ip.to_string(), port, 1, core::HealthStatus::Healthy));
    }
    for e in svc
        .endpoints
        .iter()
        .filter(|e| e.service_port.is_none_or(|sp| sp == p.port))
    {
        let health = match e.health.as_deref() {
            Some("unhealthy") => core::HealthStatus::Unhealthy,
            Some("degraded") => core::HealthStatus::Degraded,
            Some("draining") => core::HealthStatus::Draining,
            _ => core::HealthStatus::Healthy,
        };
        lb_endpoints.push(ep(
            e.ip.to_string(),
            e.port.unwrap_or(port),
            e.weight.unwrap_or(1),
            health,
        ));
    }
    ee::ClusterLoadAssignment {
        cluster_name: cluster_name(svc, p.port),
        endpoints: vec![ee::LocalityLbEndpoints {
            lb_endpoints,
            // gRPC's xDS client requires a locality and ignores one without a weight.
            locality: Some(core::Locality::default()),
            load_balancing_weight: u32v(1),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enrol::file::MeshFile;
    use crate::proxy::xds::convert::{self, Accepted};
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use prost::Name as _;
    use std::path::Path;

    pub const FILE: &str = "\
namespaces:
  - { name: shop, labels: { mesh-agent.io/dataplane-mode: ambient } }
workloads:
  - { name: r1, namespace: shop, ip: 10.0.0.2, netns: /run/netns/r1, labels: { app: reviews } }
  - { name: r2, namespace: shop, ip: 10.0.0.3, netns: /run/netns/r2, labels: { app: reviews-v2 } }
services:
  - name: reviews
    namespace: shop
    vip: 10.96.0.10
    ports: [ { port: 80, target_port: 8080, protocol: http } ]
    selector: { app: reviews }
    rate_limit: { max_tokens: 5, fill_interval_ms: 1000 }
    max_request_headers_kb: 16
    routes:
      - name: canary
        match: { prefix: /api, headers: [ { name: x-canary, exact: \"1\" } ] }
        backends: [ { service: reviews-v2, weight: 90 }, { service: reviews, weight: 10 } ]
        timeout_ms: 250
        retries: { attempts: 2, statuses: [503] }
        fault: { abort_status: 503, abort_percent: 10 }
        request_headers: { add: { x-mesh: yes }, remove: [ x-drop ] }
  - name: reviews-v2
    namespace: shop
    vip: 10.96.0.11
    ports: [ { port: 80, target_port: 8080, protocol: grpc } ]
    selector: { app: reviews-v2 }
    lb: { policy: ring_hash, hash_header: x-user }
    endpoints: [ { ip: 10.0.0.9, weight: 3, health: unhealthy } ]
  - name: db
    namespace: shop
    vip: 10.96.0.12
    ports: [ { port: 5432, protocol: tcp }, { port: 9000 } ]
    endpoints: [ { ip: 10.0.0.4 } ]
";

    fn accepted() -> Accepted {
        accepted_from(FILE)
    }

    fn accepted_from(text: &str) -> Accepted {
        let file = MeshFile::parse(Path::new("m.yaml"), text).unwrap();
        let mut a = Accepted::default();
        for (name, any) in resources(&file) {
            let t = any.type_url.as_str();
            if t == <el::Listener as prost::Name>::type_url() {
                let l = convert::listener(&convert::unpack(&any).unwrap()).unwrap();
                a.listeners.insert(name, std::sync::Arc::new(l));
            } else if t == <er::RouteConfiguration as prost::Name>::type_url() {
                let r = convert::route_config(&convert::unpack(&any).unwrap()).unwrap();
                a.routes.insert(name, std::sync::Arc::new(r));
            } else if t == <ec::Cluster as prost::Name>::type_url() {
                a.clusters.insert(
                    name,
                    convert::cluster(&convert::unpack(&any).unwrap()).unwrap(),
                );
            } else if t == ClusterLoadAssignment::type_url() {
                let e = convert::load_assignment(&convert::unpack(&any).unwrap()).unwrap();
                a.endpoints.insert(name, std::sync::Arc::new(e));
            } else if t == istio::ADDRESS_TYPE_URL {
                let (n, spec) = convert::address(&convert::unpack(&any).unwrap()).unwrap();
                assert_eq!(n, name);
                if let convert::AddressSpec::Workload(w) = spec {
                    a.workloads.insert(n, w);
                }
            } else {
                panic!("unexpected type {t}");
            }
        }
        a
    }

    const POLICIES: &str = "\
authorization_policies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: { name: reviews-allow, namespace: shop }
    spec:
      selector: { matchLabels: { app: reviews } }
      rules:
        - from: [ { source: { principals: [ \"spiffe://cluster.local/ns/shop/sa/*\" ], ipBlocks: [ 10.0.0.0/8 ] } } ]
          to: [ { operation: { ports: [ \"9080\" ], methods: [ GET ] } } ]
          when: [ { key: source.namespace, values: [ shop ] }, { key: \"request.headers[x-env]\", notValues: [ dev ] } ]
  - metadata: { name: mesh-deny, namespace: istio-system }
    spec: { action: DENY, rules: [ { from: [ { source: { notNamespaces: [ shop ] } } ] } ] }
peer_authentications:
  - metadata: { name: default, namespace: shop }
    spec: { mtls: { mode: STRICT } }
  - metadata: { name: r1, namespace: shop }
    spec:
      selector: { matchLabels: { app: reviews } }
      portLevelMtls: { 9080: { mode: PERMISSIVE } }
";

    /// Issue 11: one Address per workload (this node's and others'), one Authorization
    /// per AuthorizationPolicy in ztunnel's shape, one PeerAuthentication each; selector
    /// policies are listed by the workloads they select; a policy edit passes on that
    /// policy (and the workloads whose list changed) only.
    #[test]
    fn workloads_without_a_valid_identity_are_left_out() {
        let member = |ns: &str, name: &str, sa: &str, last: u8| Member {
            namespace: ns.into(),
            name: name.into(),
            ip: std::net::Ipv4Addr::new(10, 0, 0, last),
            ip6: None,
            labels: Default::default(),
            service_account: sa.into(),
            node: "n".into(),
            hbone: true,
            app: String::new(),
            version: String::new(),
            access_log: false,
        };
        // What the fuzzer found: a pod without a namespace made a resource every proxy
        // refuses (and with it the whole response).
        let members = [
            member("", "", "default", 1),
            member("shop", "bad", "a b", 2),
            member("shop", "ok", "web", 3),
        ];
        let mut t = Translator::new("cluster.local", "");
        let d = t.update_mesh(&[], &members, &Arc::new(Default::default()));
        let names: Vec<&str> = d
            .upserts
            .iter()
            .filter(|(_, a)| a.type_url.as_str() == istio::ADDRESS_TYPE_URL)
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(names, ["Kubernetes//Pod/shop/ok"]);
    }

    #[test]
    fn workloads_and_policies_are_served_in_ztunnels_shape() {
        use prost::Message;
        let text = format!(
            "{}{POLICIES}",
            FILE.replace(
                "netns: /run/netns/r1,",
                "netns: /run/netns/r1, service_account: reviews, node: node-b, ip6: \"fd00:201::2\","
            )
        );
        let f = MeshFile::parse(Path::new("t.yaml"), &text).unwrap();
        let members = f.members_on("node-a");
        let mut t = Translator::new("td.example", "");
        let sec = Arc::new(f.security());
        let d = t.update_mesh(&f.services, &members, &sec);
        let of = |url: &str| -> Vec<(String, Arc<Packed>)> {
            d.upserts
                .iter()
                .filter(|(_, a)| a.type_url.as_str() == url)
                .cloned()
                .collect()
        };
        let addrs = of(istio::ADDRESS_TYPE_URL);
        assert_eq!(addrs.len(), f.workloads.len());
        let (name, any) = addrs
            .iter()
            .find(|(n, _)| n == "Kubernetes//Pod/shop/r1")
            .unwrap();
        let Some(istio::address::Type::Workload(w)) =
            istio::Address::decode(any.value.as_slice()).unwrap().r#type
        else {
            panic!("{name}")
        };
        // Both families, IPv4 first (the HBONE address).
        let v6: std::net::Ipv6Addr = "fd00:201::2".parse().unwrap();
        assert_eq!(w.addresses, vec![vec![10, 0, 0, 2], v6.octets().to_vec()]);
        assert_eq!(w.service_account, "reviews");
        assert_eq!(w.trust_domain, "td.example");
        assert_eq!(w.node, "node-b");
        assert_eq!(w.tunnel_protocol, istio::TunnelProtocol::Hbone as i32);
        assert_eq!(w.authorization_policies, vec!["shop/reviews-allow"]);
        assert_eq!(w.peer_authentications, vec!["shop/r1"]);
        let authz = of(istio::AUTHORIZATION_TYPE_URL);
        let names: Vec<&str> = authz.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["shop/reviews-allow", "istio-system/mesh-deny"]);
        let a = istio::Authorization::decode(authz[0].1.value.as_slice()).unwrap();
        assert_eq!(a.scope, istio::Scope::WorkloadSelector as i32);
        assert_eq!(a.action, istio::Action::Allow as i32);
        let clauses = &a.rules[0].clauses;
        // from, to, and one clause per `when` condition, AND-ed.
        assert_eq!(clauses.len(), 4);
        let from = &clauses[0].matches[0];
        assert_eq!(
            from.principals[0].match_type,
            Some(istio::string_match::MatchType::Prefix(
                "cluster.local/ns/shop/sa/".into()
            ))
        );
        assert_eq!(from.source_ips[0].length, 8);
        assert_eq!(clauses[1].matches[0].destination_ports, vec![9080]);
        assert!(clauses[1].matches[0].has_l7());
        assert_eq!(clauses[3].matches[0].headers[0].name, "x-env");
        let g = istio::Authorization::decode(authz[1].1.value.as_slice()).unwrap();
        assert_eq!(
            (g.scope, g.action),
            (istio::Scope::Global as i32, istio::Action::Deny as i32)
        );
        let pa = of(istio::PEER_AUTHENTICATION_TYPE_URL);
        assert_eq!(pa.len(), 2);
        // Nothing changed: nothing passed on.
        assert!(t.update_mesh(&f.services, &members, &sec).is_empty());
        assert!(t.update(&f.services, &members).is_empty());
        // A policy's selector stops matching r1: r1's address changes (its list), the
        // policy itself (which does not carry its selector) does not.
        let edited = text.replace(
            "selector: { matchLabels: { app: reviews } }\n      rules",
            "selector: { matchLabels: { app: ratings } }\n      rules",
        );
        let f2 = MeshFile::parse(Path::new("t.yaml"), &edited).unwrap();
        let d = t.update_mesh(
            &f2.services,
            &f2.members_on("node-a"),
            &Arc::new(f2.security()),
        );
        let mut names: Vec<&str> = d.upserts.iter().map(|(n, _)| n.as_str()).collect();
        names.sort();
        assert_eq!(names, vec!["Kubernetes//Pod/shop/r1"]);
        // A policy removed: its name goes.
        let f3 = MeshFile::parse(Path::new("t.yaml"), &text.replace("  - metadata: { name: mesh-deny, namespace: istio-system }\n    spec: { action: DENY, rules: [ { from: [ { source: { notNamespaces: [ shop ] } } ] } ] }\n", "")).unwrap();
        let d = t.update_mesh(
            &f3.services,
            &f3.members_on("node-a"),
            &Arc::new(f3.security()),
        );
        assert!(d.removes.contains(&(
            istio::AUTHORIZATION_TYPE_URL.to_owned(),
            "istio-system/mesh-deny".to_owned()
        )));
    }

    /// `FILE` with `reviews` and `db` dual-stack, and an IPv6 endpoint of `db`.
    fn dual_stack_file() -> String {
        FILE.replace(
            "    vip: 10.96.0.10\n",
            "    vip: 10.96.0.10\n    vip6: \"fd00:96::10\"\n",
        )
        .replace(
            "    vip: 10.96.0.12\n",
            "    vip: 10.96.0.12\n    vip6: \"fd00:96::12\"\n",
        )
        .replace(
            "endpoints: [ { ip: 10.0.0.4 } ]",
            "endpoints: [ { ip: 10.0.0.4 }, { ip: \"fd00:10::4\", port: 5433 } ]",
        )
    }

    /// A dual-stack service has, per port, a second listener named and bound by its IPv6
    /// address that is otherwise the IPv4 one (the same filter chains, route
    /// configuration name and cluster); its IPv6 endpoints are IPv6 socket addresses.
    /// Accepted by the proxy, `[vip6]:port` finds a listener that routes as `vip:port`.
    #[test]
    fn a_dual_stack_service_has_a_listener_per_address() {
        let file = MeshFile::parse(Path::new("m.yaml"), &dual_stack_file()).unwrap();
        let res = resources(&file);
        let listener = |name: &str| -> el::Listener {
            let any = res
                .iter()
                .find(|(n, a)| n == name && a.type_url == <el::Listener as prost::Name>::type_url())
                .unwrap_or_else(|| panic!("no listener {name}"));
            convert::unpack(&any.1).unwrap()
        };
        for (v4, v6) in [
            ("10.96.0.10:80", "[fd00:96::10]:80"),
            ("10.96.0.12:5432", "[fd00:96::12]:5432"),
            ("10.96.0.12:9000", "[fd00:96::12]:9000"),
        ] {
            let (l4, mut l6) = (listener(v4), listener(v6));
            assert_eq!(l6.name, v6);
            let at: SocketAddr = v6.parse().unwrap();
            assert_eq!(l6.address, socket_address(at.ip().to_string(), at.port()));
            (l6.name, l6.address) = (l4.name.clone(), l4.address.clone());
            assert_eq!(l4, l6, "{v6} is {v4} at another address");
        }
        assert!(
            !res.iter().any(|(n, _)| n.starts_with("[fd00:96::11]")),
            "reviews-v2 has no vip6"
        );
        let db = res
            .iter()
            .find(|(n, a)| {
                n == "outbound|5432||db.shop" && a.type_url == ClusterLoadAssignment::type_url()
            })
            .unwrap();
        let cla: ClusterLoadAssignment = convert::unpack(&db.1).unwrap();
        let e = convert::load_assignment(&cla).unwrap();
        let addrs: Vec<String> = e.iter().map(|e| e.address.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.4:5432", "[fd00:10::4]:5433"]);

        use crate::proxy::config::*;
        let (cfg, warming) = accepted_from(&dual_stack_file()).build();
        assert_eq!(warming, convert::Warming::default());
        assert_eq!(
            cfg.listeners.len(),
            7,
            "four IPv4 listeners, three IPv6 ones"
        );
        let (l4, l6) = (
            cfg.listener("10.96.0.10:80".parse().unwrap()).unwrap(),
            cfg.listener("[fd00:96::10]:80".parse().unwrap()).unwrap(),
        );
        let (ListenerKind::Http(h4), ListenerKind::Http(h6)) = (&l4.kind, &l6.kind) else {
            panic!("{l4:?} {l6:?}")
        };
        assert!(
            Arc::ptr_eq(&h4.route_config, &h6.route_config),
            "the same routes"
        );
        assert_eq!(
            (h6.codec, h6.max_request_headers_bytes),
            (Codec::Http1, 16 * 1024)
        );
        let l = cfg.listener("[fd00:96::12]:5432".parse().unwrap()).unwrap();
        assert!(
            matches!(&l.kind, ListenerKind::Tcp { cluster } if cluster == "outbound|5432||db.shop")
        );
        let l = cfg.listener("[fd00:96::12]:9000".parse().unwrap()).unwrap();
        assert_eq!(l.tcp_fallback.as_deref(), Some("outbound|9000||db.shop"));
        let db = cfg.cluster("outbound|5432||db.shop").unwrap();
        assert_eq!(
            db.endpoints[1].address,
            "[fd00:10::4]:5433".parse().unwrap()
        );
    }

    /// A listener with Envoy's `additional_addresses` (istiod's dual-stack form) is found
    /// at each of them, as one listener (the same `Arc`, listed once); an address twice
    /// is refused.
    #[test]
    fn additional_addresses_serve_one_listener_at_several_addresses() {
        let mut a = accepted();
        let file = MeshFile::parse(Path::new("m.yaml"), FILE).unwrap();
        let (_, any) = resources(&file)
            .into_iter()
            .find(|(n, a)| {
                n == "10.96.0.12:5432" && a.type_url == <el::Listener as prost::Name>::type_url()
            })
            .unwrap();
        let mut l: el::Listener = convert::unpack(&any).unwrap();
        l.additional_addresses = vec![el::AdditionalAddress {
            address: socket_address("fd00:96::12".into(), 5432),
            ..Default::default()
        }];
        let spec = convert::listener(&l).unwrap();
        assert_eq!(
            spec.additional,
            ["[fd00:96::12]:5432".parse::<SocketAddr>().unwrap()]
        );
        a.listeners.insert(l.name.clone(), Arc::new(spec));
        let (cfg, _) = a.build();
        let (l4, l6) = (
            cfg.listener("10.96.0.12:5432".parse().unwrap()).unwrap(),
            cfg.listener("[fd00:96::12]:5432".parse().unwrap()).unwrap(),
        );
        assert!(Arc::ptr_eq(l4, l6));
        let dump = crate::proxy::xds::dump::config(&cfg);
        let named = dump["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["name"] == "10.96.0.12:5432")
            .count();
        assert_eq!(named, 1, "{dump}");

        l.additional_addresses
            .push(l.additional_addresses[0].clone());
        let e = convert::listener(&l).unwrap_err().to_string();
        assert!(e.contains("additional_addresses[1].address"), "{e}");
    }

    #[test]
    fn every_translated_resource_is_accepted_and_resolves() {
        use crate::proxy::config::*;
        let (cfg, warming) = accepted().build();
        assert_eq!(warming, convert::Warming::default());
        // Four socket listeners; the API listeners (proxyless gRPC) are not served here.
        assert_eq!(cfg.listeners.len(), 4);
        let l = cfg.listener("10.96.0.10:80".parse().unwrap()).unwrap();
        let ListenerKind::Http(h) = &l.kind else {
            panic!("{l:?}")
        };
        assert_eq!(h.codec, Codec::Http1);
        assert_eq!(h.rate_limit.as_ref().unwrap().max_tokens, 5);
        assert_eq!(h.max_request_headers_bytes, 16 * 1024);
        let vh = &h.route_config.virtual_hosts[0];
        assert_eq!(vh.routes.len(), 2, "the canary route and the default");
        let r = &vh.routes[0];
        assert_eq!(r.name, "canary");
        let RouteAction::Forward(f) = &r.action else {
            panic!()
        };
        assert_eq!(f.total_weight, 100);
        assert_eq!(f.clusters[0].name, "outbound|80||reviews-v2.shop");
        assert_eq!(f.timeout, Some(std::time::Duration::from_millis(250)));
        let rp = f.retry_policy.as_ref().unwrap();
        assert_eq!(rp.num_retries, 2);
        assert!(rp.retry_on.retriable_status_codes && rp.retry_on.server_error);
        assert_eq!(rp.retriable_status_codes, vec![503]);
        let (_, abort_ppm) = r.fault.as_ref().unwrap().abort.unwrap();
        assert_eq!(abort_ppm, 100_000);
        assert_eq!(
            r.request_headers.add,
            vec![("x-mesh".into(), "yes".into(), false)]
        );
        assert_eq!(r.request_headers.remove, vec!["x-drop".to_string()]);

        let v2 = cfg.cluster("outbound|80||reviews-v2.shop").unwrap();
        assert_eq!(v2.protocol, UpstreamProtocol::Http2);
        assert!(matches!(v2.lb, LbPolicy::RingHash { .. }));
        assert_eq!(v2.endpoints.len(), 2);
        assert_eq!(v2.endpoints[0].address, "10.0.0.3:8080".parse().unwrap());
        assert_eq!(v2.endpoints[1].health, Health::Unhealthy);
        assert_eq!(v2.endpoints[1].weight, 3);

        let db = cfg.listener("10.96.0.12:5432".parse().unwrap()).unwrap();
        assert!(
            matches!(&db.kind, ListenerKind::Tcp { cluster } if cluster == "outbound|5432||db.shop")
        );
        let auto = cfg.listener("10.96.0.12:9000".parse().unwrap()).unwrap();
        assert_eq!(auto.tcp_fallback.as_deref(), Some("outbound|9000||db.shop"));
    }

    #[test]
    fn a_listener_whose_routes_are_missing_warms() {
        let mut a = accepted();
        a.routes.remove("reviews.shop:80");
        a.endpoints.remove("outbound|5432||db.shop");
        let (cfg, warming) = a.build();
        assert!(cfg.listener("10.96.0.10:80".parse().unwrap()).is_none());
        assert_eq!(
            warming.listeners.get("10.96.0.10:80").map(String::as_str),
            Some("reviews.shop:80")
        );
        assert_eq!(warming.clusters, vec!["outbound|5432||db.shop".to_string()]);
    }

    /// The proxy's client rebuilds only the cluster whose endpoints changed; the others
    /// stay the very same `Arc`s, and the result equals a build from scratch.
    #[test]
    fn a_rebuild_reuses_clusters_whose_inputs_did_not_change() {
        let mut a = accepted();
        let mut memo = convert::BuildMemo::default();
        let (first, _) = a.build_with(&mut memo);
        let (again, _) = a.build_with(&mut memo);
        for (name, c) in &first.clusters {
            assert!(std::sync::Arc::ptr_eq(c, &again.clusters[name]), "{name}");
        }
        let changed = "outbound|5432||db.shop";
        let mut eps = a.endpoints[changed].as_ref().clone();
        eps[0].address = "10.0.0.5:5432".parse().unwrap();
        a.endpoints.insert(changed.into(), std::sync::Arc::new(eps));
        let (after, _) = a.build_with(&mut memo);
        for (name, c) in &first.clusters {
            assert_eq!(
                std::sync::Arc::ptr_eq(c, &after.clusters[name]),
                name != changed,
                "{name}"
            );
        }
        let (scratch, _) = a.build();
        assert_eq!(
            format!("{:?}", sorted(&after)),
            format!("{:?}", sorted(&scratch))
        );
    }

    fn sorted(c: &crate::proxy::config::ProxyConfig) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = c
            .clusters
            .iter()
            .map(|(n, c)| (n.clone(), format!("{c:?}")))
            .collect();
        v.sort();
        v
    }

    /// An edit of one endpoint reaches the ADS server as that one resource; a removed
    /// service as its names; the server's snapshot then equals one built from scratch.
    #[test]
    fn an_update_passes_on_only_what_changed() {
        use crate::control::server::Snapshot;
        let mut parser = crate::enrol::file::FileParser::default();
        let mut f = parser.parse(Path::new("t.yaml"), FILE).unwrap();
        let mut t = Translator::default();
        let first = t.update(&f.services, &f.members());
        assert!(first.removes.is_empty());
        let served = Snapshot::default().apply(&first);
        assert_eq!(t.update(&f.services, &f.members()), Delta::default());
        // One endpoint of db changes, in the file: one item parsed, one resource out.
        let edited = FILE.replace(
            "endpoints: [ { ip: 10.0.0.4 } ]",
            "endpoints: [ { ip: 10.0.0.5 } ]",
        );
        let parsed = parser.items_parsed();
        f = parser.parse(Path::new("t.yaml"), &edited).unwrap();
        assert_eq!(parser.items_parsed(), parsed + 1);
        let d = t.update(&f.services, &f.members());
        let names: Vec<(&str, &str)> = d
            .upserts
            .iter()
            .map(|(n, a)| (n.as_str(), a.type_url.as_str()))
            .collect();
        assert_eq!(
            names,
            vec![
                (
                    "outbound|5432||db.shop",
                    ClusterLoadAssignment::type_url().as_str()
                ),
                (
                    "outbound|9000||db.shop",
                    ClusterLoadAssignment::type_url().as_str()
                ),
            ]
        );
        assert!(d.removes.is_empty());
        let served = served.apply(&d);
        assert_eq!(served.version, 2);
        let scratch = Snapshot::default().next(resources(&f));
        let flat = |s: &Snapshot| -> Vec<(String, String, u64)> {
            let mut v: Vec<_> = s
                .types
                .iter()
                .flat_map(|(t, m)| {
                    m.iter()
                        .map(move |(n, e)| (t.clone(), n.clone(), e.version))
                })
                .collect();
            v.sort();
            v
        };
        assert_eq!(flat(&served), flat(&scratch));
        // db goes: its eight resources (two ports) are removed, nothing else moves.
        f.services.retain(|s| s.name != "db");
        let d = t.update(&f.services, &f.members());
        assert!(d.upserts.is_empty());
        assert_eq!(d.removes.len(), 8, "{:?}", d.removes);
        let served = served.apply(&d);
        assert_eq!(
            flat(&served),
            flat(&Snapshot::default().next(resources(&f)))
        );
    }

    #[test]
    fn the_cache_retranslates_what_changed_and_matches_a_full_translation() {
        let mut f = MeshFile::parse(Path::new("t.yaml"), FILE).unwrap();
        let mut t = Translator::default();
        let first = t.resources(&f.services, &f.members());
        assert_eq!(first, resources(&f));
        let all = t.translated;
        assert_eq!(all, f.services.len() as u64);
        // Nothing changed: nothing translated.
        assert_eq!(t.resources(&f.services, &f.members()), first);
        assert_eq!(t.translated, all);
        // A backend's ports change: the service routing to it is translated again too.
        let i = f
            .services
            .iter()
            .position(|s| s.name == "reviews-v2")
            .unwrap();
        Arc::make_mut(&mut f.services[i]).ports[0].port = 81;
        let out = t.resources(&f.services, &f.members());
        assert_eq!(out, resources(&f));
        assert_eq!(
            t.translated,
            all + 2,
            "reviews-v2 and reviews, whose route names it"
        );
        // A workload's labels change what a selector picks.
        let before = t.translated;
        f.workloads[0]
            .labels
            .insert("app".into(), "reviews-v2".into());
        let out = t.resources(&f.services, &f.members());
        assert_eq!(out, resources(&f));
        assert_eq!(
            t.translated,
            before + 2,
            "r1 moved from reviews to reviews-v2"
        );
        // A removed service leaves the cache.
        f.services.remove(i);
        assert_eq!(t.resources(&f.services, &f.members()), resources(&f));
        assert_eq!(t.cache.len(), f.services.len());
    }
}
