//! Mesh workloads as the proxy knows them (from `istio.workload.Address`): for a
//! destination address, whether it is a mesh workload, its identity, the node that runs
//! it and whether it takes HBONE, the selector-based policies that apply to it, and what
//! its labels say for telemetry (Istio's `app` and `version`, its namespace's access-log
//! switch).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use serde::Serialize;

use crate::{identity::SpiffeId, metrics::istio::Peer};

/// The longest `app` or `version` the proxy takes (bytes): a DNS subdomain's length, more
/// than any Kubernetes label value (63) or name (253) a control plane derives them from.
/// A longer one is refused (NACK): every series of the workload would carry it.
pub const MAX_TELEMETRY_VALUE: usize = 253;

/// What a workload's labels say for telemetry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Telemetry {
    /// Istio's `app` (`canonical_name` on the wire); empty: not said (`unknown`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub app: String,
    /// Istio's `version` (`canonical_revision`); empty: not said.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// Its namespace asks for access logs: its connections and requests are logged
    /// whatever `--access-log` says.
    pub access_log: bool,
}

/// One workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkloadInfo {
    /// Its key on the wire (ztunnel's `uid`).
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub ips: Vec<IpAddr>,
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub identity: SpiffeId,
    /// The node that runs it (empty: not said).
    pub node: String,
    /// Takes HBONE at its own address, port 15008 (ztunnel's in-pod model).
    pub hbone: bool,
    /// Selector-based AuthorizationPolicies that apply, `namespace/name`, sorted.
    pub authorization_policies: Vec<String>,
    /// Selector-based PeerAuthentications that apply, `namespace/name`, sorted.
    pub peer_authentications: Vec<String>,
    #[serde(flatten)]
    pub telemetry: Telemetry,
}

impl WorkloadInfo {
    /// Where to open an HBONE tunnel to it, if it takes one: its IPv4 address (the
    /// in-pod listener is `0.0.0.0:15008`), whichever family the destination is; its
    /// first address if it has none.
    pub fn hbone_addr(&self) -> Option<SocketAddr> {
        self.hbone
            .then(|| {
                self.ips
                    .iter()
                    .find(|ip| ip.is_ipv4())
                    .or(self.ips.first())
                    .map(|ip| SocketAddr::new(*ip, crate::wire::istio::HBONE_PORT))
            })
            .flatten()
    }

    /// Its `app` and `version` onto Istio's view of a peer (left as they are, `unknown`,
    /// when not said).
    pub fn label_peer(&self, peer: &mut Peer) {
        if !self.telemetry.app.is_empty() {
            peer.app.clone_from(&self.telemetry.app);
        }
        if !self.telemetry.version.is_empty() {
            peer.version.clone_from(&self.telemetry.version);
        }
    }
}

/// Workloads by address and by uid.
#[derive(Debug, Default)]
pub struct WorkloadIndex {
    by_ip: HashMap<IpAddr, Arc<WorkloadInfo>>,
    by_uid: BTreeMap<String, Arc<WorkloadInfo>>,
    /// Addresses claimed by more than one workload (the first by uid keeps it).
    pub conflicts: Vec<IpAddr>,
    /// Namespaces whose workloads ask for access logs (`Telemetry::access_log`).
    access_logged: HashSet<String>,
}

impl WorkloadIndex {
    pub fn new<'a>(workloads: impl IntoIterator<Item = &'a Arc<WorkloadInfo>>) -> WorkloadIndex {
        let mut ix = WorkloadIndex::default();
        for w in workloads {
            ix.by_uid.insert(w.uid.clone(), w.clone());
            if w.telemetry.access_log && !ix.access_logged.contains(&w.namespace) {
                ix.access_logged.insert(w.namespace.clone());
            }
        }
        for w in ix.by_uid.values() {
            for ip in &w.ips {
                if ix.by_ip.contains_key(ip) {
                    ix.conflicts.push(*ip);
                } else {
                    ix.by_ip.insert(*ip, w.clone());
                }
            }
        }
        ix
    }

    /// The workload at `ip`, if it is a mesh workload.
    pub fn by_ip(&self, ip: IpAddr) -> Option<&Arc<WorkloadInfo>> {
        self.by_ip.get(&ip)
    }

    pub fn by_uid(&self, uid: &str) -> Option<&Arc<WorkloadInfo>> {
        self.by_uid.get(uid)
    }

    pub fn len(&self) -> usize {
        self.by_uid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_uid.is_empty()
    }

    /// In uid order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<WorkloadInfo>> {
        self.by_uid.values()
    }

    /// Whether any namespace asks for access logs.
    pub fn any_access_logged(&self) -> bool {
        !self.access_logged.is_empty()
    }

    /// Whether `namespace` asks for access logs (one of its workloads says so).
    pub fn access_logged_namespace(&self, namespace: &str) -> bool {
        self.access_logged.contains(namespace)
    }

    /// Whether the workload at `ip` is in a namespace that asks for access logs.
    pub fn access_logged_ip(&self, ip: IpAddr) -> bool {
        self.by_ip(ip).is_some_and(|w| w.telemetry.access_log)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(ns: &str, name: &str, last: u8, t: Telemetry) -> Arc<WorkloadInfo> {
        Arc::new(WorkloadInfo {
            uid: format!("Kubernetes//Pod/{ns}/{name}"),
            name: name.into(),
            namespace: ns.into(),
            ips: vec![IpAddr::from([10, 0, 0, last])],
            identity: SpiffeId::new("cluster.local", ns, "default").unwrap(),
            node: String::new(),
            hbone: true,
            authorization_policies: vec![],
            peer_authentications: vec![],
            telemetry: t,
        })
    }

    #[test]
    fn the_index_knows_which_namespaces_ask_for_access_logs() {
        let on = Telemetry {
            access_log: true,
            ..Default::default()
        };
        let ws = [
            workload("shop", "a", 1, on.clone()),
            workload("shop", "b", 2, on),
            workload("backend", "c", 3, Telemetry::default()),
        ];
        let ix = WorkloadIndex::new(&ws);
        assert!(ix.any_access_logged());
        assert!(ix.access_logged_namespace("shop"));
        assert!(!ix.access_logged_namespace("backend"));
        assert!(ix.access_logged_ip(IpAddr::from([10, 0, 0, 2])));
        assert!(!ix.access_logged_ip(IpAddr::from([10, 0, 0, 3])));
        assert!(!ix.access_logged_ip(IpAddr::from([10, 0, 0, 9])));
        let none = WorkloadIndex::new(&ws[2..]);
        assert!(!none.any_access_logged());
    }

    #[test]
    fn app_and_version_fill_a_peer_and_unsaid_ones_stay_unknown() {
        let w = workload(
            "shop",
            "a",
            1,
            Telemetry {
                app: "reviews".into(),
                version: String::new(),
                access_log: false,
            },
        );
        let mut p = Peer::default();
        w.label_peer(&mut p);
        assert_eq!((p.app.as_str(), p.version.as_str()), ("reviews", "unknown"));
    }

    /// The workloads the embedded control plane serves, as the proxy takes them.
    fn served(yaml: &str) -> Vec<Arc<WorkloadInfo>> {
        use crate::proxy::xds::convert::{self, AddressSpec};
        let f = crate::enrol::file::MeshFile::parse(std::path::Path::new("m.yaml"), yaml).unwrap();
        crate::control::translate::resources(&f)
            .into_iter()
            .filter(|(_, any)| any.type_url == crate::wire::istio::ADDRESS_TYPE_URL)
            .map(
                |(_, any)| match convert::address(&convert::unpack(&any).unwrap()) {
                    Ok((_, AddressSpec::Workload(w))) => w,
                    _ => panic!("not a workload"),
                },
            )
            .collect()
    }

    #[test]
    fn app_version_and_the_access_log_travel_from_the_file_to_the_proxy() {
        let ws = served(
            "namespaces:\n\
             \x20 - { name: shop, labels: { mesh-agent.io/dataplane-mode: ambient, mesh-agent.io/access-log: \"true\" } }\n\
             \x20 - { name: backend, labels: { mesh-agent.io/dataplane-mode: ambient } }\n\
             workloads:\n\
             \x20 - { name: web, namespace: shop, ip: 10.0.0.2, netns: /n/web, labels: { app.kubernetes.io/name: storefront, app.kubernetes.io/version: \"2.1\" } }\n\
             \x20 - { name: db, namespace: backend, ip: 10.0.0.3, netns: /n/db, labels: { app: db } }\n",
        );
        let by = |n: &str| ws.iter().find(|w| w.name == n).unwrap().telemetry.clone();
        assert_eq!(
            by("web"),
            Telemetry {
                app: "storefront".into(),
                version: "2.1".into(),
                access_log: true
            }
        );
        assert_eq!(
            by("db"),
            Telemetry {
                app: "db".into(),
                version: String::new(),
                access_log: false
            }
        );
    }

    /// A resource of a control plane without the fields reads as "not said"; a proxy
    /// without them skips them (prost leaves unknown fields aside); a value past the bound
    /// is refused with its field.
    #[test]
    fn the_new_fields_are_compatible_both_ways_and_bounded() {
        use prost::Message;

        use crate::{proxy::xds::convert, wire::istio};
        let mut w = istio::Workload {
            uid: "Kubernetes//Pod/shop/web".into(),
            name: "web".into(),
            namespace: "shop".into(),
            addresses: vec![vec![10, 0, 0, 2]],
            ..Default::default()
        };
        let addr = |w: &istio::Workload| istio::Address {
            r#type: Some(istio::address::Type::Workload(w.clone())),
        };
        let Ok((_, convert::AddressSpec::Workload(old))) = convert::address(&addr(&w)) else {
            panic!("refused")
        };
        assert_eq!(old.telemetry, Telemetry::default());

        w.canonical_name = "storefront".into();
        w.canonical_revision = "v2".into();
        w.access_log = true;
        /// What an older proxy (or ztunnel) declares of a Workload.
        #[derive(Clone, PartialEq, prost::Message)]
        struct Older {
            #[prost(string, tag = "1")]
            name: String,
            #[prost(string, tag = "20")]
            uid: String,
        }
        let older = Older::decode(w.encode_to_vec().as_slice()).unwrap();
        assert_eq!(
            (older.name.as_str(), older.uid.as_str()),
            ("web", "Kubernetes//Pod/shop/web")
        );

        w.canonical_revision = "v".repeat(MAX_TELEMETRY_VALUE + 1);
        let Err(e) = convert::address(&addr(&w)) else {
            panic!("a 254-byte version was taken")
        };
        let e = e.to_string();
        assert!(
            e.contains("canonical_revision") && e.contains("at most 253"),
            "{e}"
        );
    }
}
