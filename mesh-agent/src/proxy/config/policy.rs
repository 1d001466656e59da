//! Authorization and peer-authentication policies, compiled from
//! `istio.security.Authorization` and `meshagent.v1.PeerAuthentication`: strings parsed
//! into matchers, CIDRs into numbers, policies indexed by where they apply, so that
//! evaluation (`proxy::authz`) only compares.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
    /// Logged when it matches, never refuses.
    Audit,
}

/// Where a policy applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Every workload.
    Global,
    /// The workloads of its namespace.
    Namespace,
    /// The workloads that name it.
    WorkloadSelector,
}

/// Istio's string match: exact, `prefix*`, `*suffix`, `*` (any non-empty value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

/// A CIDR, both sides masked once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.len as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.len as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            // A v4-mapped v6 peer is compared as v4.
            (IpAddr::V4(_), IpAddr::V6(ip)) => ip
                .to_ipv4_mapped()
                .is_some_and(|v4| self.contains(IpAddr::V4(v4))),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeaderCond {
    /// Lower case.
    pub name: String,
    pub values: Vec<StrMatch>,
    pub not_values: Vec<StrMatch>,
}

/// Values of one field OR-ed, fields AND-ed; an empty field does not constrain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Match {
    pub namespaces: Vec<StrMatch>,
    pub not_namespaces: Vec<StrMatch>,
    /// Against the SPIFFE ID without `spiffe://`.
    pub principals: Vec<StrMatch>,
    pub not_principals: Vec<StrMatch>,
    pub source_ips: Vec<Cidr>,
    pub not_source_ips: Vec<Cidr>,
    pub destination_ips: Vec<Cidr>,
    pub not_destination_ips: Vec<Cidr>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
    pub methods: Vec<StrMatch>,
    pub not_methods: Vec<StrMatch>,
    pub paths: Vec<StrMatch>,
    pub not_paths: Vec<StrMatch>,
    /// Case-insensitive (stored lower case).
    pub hosts: Vec<StrMatch>,
    pub not_hosts: Vec<StrMatch>,
    pub headers: Vec<HeaderCond>,
}

impl Match {
    pub fn has_l7(&self) -> bool {
        !(self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.headers.is_empty())
    }

    /// Whether the port fields let `port` through (what `needs_http` asks).
    pub fn admits_port(&self, port: u16) -> bool {
        (self.destination_ports.is_empty() || self.destination_ports.contains(&port))
            && !self.not_destination_ports.contains(&port)
    }
}

/// Matches OR-ed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Clause {
    pub matches: Vec<Match>,
}

/// Clauses AND-ed; no clause: matches everything (Istio's `rules: [{}]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub clauses: Vec<Clause>,
    /// Some clause uses HTTP attributes: evaluated in full per request only (see
    /// `proxy::authz` for what a connection-level check makes of it).
    pub has_l7: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// `namespace/name`, shared with every verdict that names it.
    #[serde(serialize_with = "as_str")]
    pub key: Arc<str>,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    /// OR-ed; none: matches nothing.
    pub rules: Vec<Rule>,
}

fn as_str<S: serde::Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v)
}

/// `PeerAuthentication.MutualTLS.Mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Inherit (workload -> namespace -> mesh; PERMISSIVE at the top).
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerAuthn {
    #[serde(serialize_with = "as_str")]
    pub key: Arc<str>,
    pub namespace: String,
    pub scope: Scope,
    pub mode: MtlsMode,
    pub port_level: BTreeMap<u16, MtlsMode>,
}

/// The policies in force, indexed by where they apply.
#[derive(Debug, Default, Serialize)]
pub struct Policies {
    /// By `namespace/name`.
    pub authorizations: BTreeMap<String, Arc<Policy>>,
    pub peer_authentications: BTreeMap<String, Arc<PeerAuthn>>,
    #[serde(skip)]
    pub(crate) global: Vec<Arc<Policy>>,
    #[serde(skip)]
    pub(crate) by_namespace: HashMap<String, Vec<Arc<Policy>>>,
    #[serde(skip)]
    pub(crate) mesh_peer: Option<Arc<PeerAuthn>>,
    #[serde(skip)]
    pub(crate) namespace_peer: HashMap<String, Arc<PeerAuthn>>,
}

impl Policies {
    pub fn new<'a>(
        authorizations: impl IntoIterator<Item = (&'a String, &'a Arc<Policy>)>,
        peer_authentications: impl IntoIterator<Item = (&'a String, &'a Arc<PeerAuthn>)>,
    ) -> Policies {
        let mut p = Policies::default();
        for (k, a) in authorizations {
            p.authorizations.insert(k.clone(), a.clone());
            match a.scope {
                Scope::Global => p.global.push(a.clone()),
                Scope::Namespace => p
                    .by_namespace
                    .entry(a.namespace.clone())
                    .or_default()
                    .push(a.clone()),
                Scope::WorkloadSelector => {}
            }
        }
        // In key order: the first of several same-scope policies wins, deterministically
        // (Istio takes the oldest; the file check refuses duplicates).
        for (k, a) in peer_authentications {
            p.peer_authentications.insert(k.clone(), a.clone());
        }
        for a in p.peer_authentications.values() {
            match a.scope {
                Scope::Global => {
                    p.mesh_peer.get_or_insert_with(|| a.clone());
                }
                Scope::Namespace => {
                    p.namespace_peer
                        .entry(a.namespace.clone())
                        .or_insert_with(|| a.clone());
                }
                Scope::WorkloadSelector => {}
            }
        }
        p
    }
}

/// What the proxy knows of the mesh besides listeners and clusters: workloads and
/// policies. Published by the xDS client next to `ProxyConfig` (`XdsClient::mesh`).
#[derive(Debug, Default)]
pub struct MeshConfig {
    pub workloads: super::workloads::WorkloadIndex,
    pub policies: Policies,
    /// 1, 2, 3... per publication; 0 until the first.
    pub version: u64,
}
