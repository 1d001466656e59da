//! Enrolment: what runs on this node and which of its workloads the mesh captures, as
//! one value (`Snapshot`) that a source publishes on a `watch` channel. Sources: the
//! standalone file (`file`) and the Kubernetes API server (`k8s`). The datapath's map
//! writer (`crate::datapath::writer`) is the reader that turns it into map entries.

pub mod file;
pub mod k8s;

/// The namespace label that enrols a namespace (value `ambient`), and, on a workload, opts it
/// out (value `none`).
pub const DATAPLANE_LABEL: &str = "mesh-agent.io/dataplane-mode";
pub const DATAPLANE_ENROLLED: &str = "ambient";
pub const DATAPLANE_OPT_OUT: &str = "none";
/// Istio's label of the same meaning, honoured alike (ours wins where both are set), so
/// namespaces and pods labelled for Istio ambient are enrolled as they are.
pub const ISTIO_DATAPLANE_LABEL: &str = "istio.io/dataplane-mode";

/// On a namespace (or a workload, which overrides it): `closed` refuses a workload's
/// connections while the mesh cannot serve them (proxy down or stuck, configuration
/// unknown); `open` (the default) lets them go around the mesh.
pub const FAIL_MODE_LABEL: &str = "mesh-agent.io/fail-mode";
/// On a namespace or a workload: `true` leaves its connections alone (an operator's
/// switch, kept in the source of truth so it survives agent restarts).
pub const BYPASS_LABEL: &str = "mesh-agent.io/bypass";

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::Arc,
};

use serde::Serialize;

use self::file::{ExcludeRule, MeshFile, Mode};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    /// The workload's IPv6 address on a dual-stack node (Kubernetes `status.podIPs`, the
    /// file's `ip6`); `None` on an IPv4-only node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    pub netns: PathBuf,
    /// Outbound traffic is captured.
    pub enrolled: bool,
    /// As a destination: same-node flows go socket to socket.
    pub direct: bool,
    /// Its connections are refused, not passed around the mesh, when the mesh cannot
    /// serve them (`mesh-agent.io/fail-mode: closed`).
    pub fail_closed: bool,
    /// Its connections are left alone (`mesh-agent.io/bypass: "true"`).
    pub bypass: bool,
    /// Why the workload's network namespace is not known (it is then not captured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unresolved: Option<String>,
    /// SPIFFE identity, from the pod's ServiceAccount (Kubernetes source).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// What the node should look like, as one consistent value.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Snapshot {
    pub workloads: Vec<Workload>,
    pub excludes: Vec<ExcludeRule>,
    /// Services, for the embedded control plane.
    pub services: Vec<Arc<crate::control::model::ServiceSpec>>,
    /// Workloads as declared (labels select service endpoints), those of other nodes
    /// included (`workloads` holds this node's only).
    #[serde(skip)]
    pub declared: Vec<crate::control::model::Member>,
    /// AuthorizationPolicies and PeerAuthentications, for the embedded control plane.
    #[serde(skip)]
    pub security: Arc<crate::control::model::security::Security>,
}

impl Snapshot {
    /// Whether same-node flows to `w` may go socket to socket (direct mode asks for it):
    /// only while no AuthorizationPolicy applies to it, since direct mode skips the proxy
    /// and with it every policy. A policy applies when it is in the workload's namespace
    /// or the root namespace and has no selector or one that selects the workload's labels
    /// (labels unknown: it applies). Enrolling must never loosen what a policy enforces.
    pub fn direct_allowed(&self, w: &Workload) -> bool {
        use crate::control::model::security::DEFAULT_ROOT_NAMESPACE;
        if !w.direct {
            return false;
        }
        let labels = self
            .declared
            .iter()
            .find(|m| m.namespace == w.namespace && m.name == w.name)
            .map(|m| &m.labels);
        !self.security.authorization_policies.iter().any(|p| {
            let ns = p.metadata.namespace.as_str();
            (ns == w.namespace || ns == DEFAULT_ROOT_NAMESPACE)
                && match (&p.spec.selector, labels) {
                    (Some(sel), Some(labels)) => sel.selects(labels),
                    _ => true,
                }
        })
    }
}

/// The trust domain when none is configured (Istio's default).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The node a source builds snapshots for: which workloads run here, and the trust
/// domain their identities are in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNode {
    pub node: String,
    pub trust_domain: String,
}

impl LocalNode {
    /// The host name (the `--node-name` default) and `cluster.local`.
    pub fn from_host() -> LocalNode {
        let node = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        LocalNode {
            node: if node.is_empty() {
                "localhost".into()
            } else {
                node
            },
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
        }
    }
}

impl Snapshot {
    /// Equal, comparing services by pointer first (an unchanged service is the same
    /// `Arc` from one parse to the next), so an unchanged 10k-service snapshot costs
    /// 10k pointer comparisons, not a deep comparison.
    pub fn same_as(&self, other: &Snapshot) -> bool {
        self.same_node(other) && self.same_services(other)
    }

    /// The node-local part (what the map writer applies) is equal.
    pub fn same_node(&self, other: &Snapshot) -> bool {
        self.workloads == other.workloads
            && self.excludes == other.excludes
            && self.direct_verdicts().eq(other.direct_verdicts())
    }

    /// `direct_allowed` of each direct-mode workload: a policy added or removed changes
    /// what the map writer writes for them.
    fn direct_verdicts(&self) -> impl Iterator<Item = bool> + '_ {
        self.workloads
            .iter()
            .filter(|w| w.direct)
            .map(|w| self.direct_allowed(w))
    }

    /// The part the control plane translates (services, and the workloads their
    /// selectors read) is equal.
    pub fn same_services(&self, other: &Snapshot) -> bool {
        self.declared == other.declared
            && (Arc::ptr_eq(&self.security, &other.security) || self.security == other.security)
            && self.services.len() == other.services.len()
            && self
                .services
                .iter()
                .zip(&other.services)
                .all(|(a, b)| Arc::ptr_eq(a, b) || a == b)
    }

    /// `from_file_on` this host (`LocalNode::from_host`).
    pub fn from_file(f: &MeshFile) -> Snapshot {
        Snapshot::from_file_on(f, &LocalNode::from_host())
    }

    /// The snapshot of node `local`: its workloads (those without `node:` or naming it)
    /// go to the maps; every workload, and the policies, go to the control plane.
    pub fn from_file_on(f: &MeshFile, local: &LocalNode) -> Snapshot {
        let workloads = f
            .workloads
            .iter()
            .filter(|w| w.is_local(&local.node))
            .map(|w| Workload {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                ip: w.ip,
                ip6: w.ip6,
                netns: w.netns.clone(),
                enrolled: f.enrolled(w),
                direct: f.mode(w) == Mode::Direct,
                fail_closed: f.fail_closed(w),
                bypass: f.bypassed(w),
                unresolved: None,
                identity: Some(format!(
                    "spiffe://{}/ns/{}/sa/{}",
                    local.trust_domain,
                    w.namespace,
                    w.service_account()
                )),
            })
            .collect();
        Snapshot {
            workloads,
            excludes: f.exclude.clone(),
            services: f.services.clone(),
            declared: f.members_on(&local.node),
            security: Arc::new(f.security()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn snapshot_follows_labels_and_modes() {
        let f = MeshFile::parse(
            Path::new("t.yaml"),
            "namespaces:\n  - name: a\n    labels: {mesh-agent.io/dataplane-mode: ambient}\n  - name: b\n    mode: direct\n\
             workloads:\n  - {name: x, namespace: a, ip: 10.0.0.1, netns: /n/x}\n  - {name: y, namespace: b, ip: 10.0.0.2, netns: /n/y}\n\
             exclude:\n  - {cidr: 10.96.0.0/12, port: 53}\n",
        )
        .unwrap();
        let s = Snapshot::from_file(&f);
        assert!(s.workloads[0].enrolled && !s.workloads[0].direct);
        assert!(!s.workloads[1].enrolled && s.workloads[1].direct);
        assert_eq!(s.excludes.len(), 1);
        assert_eq!(s.excludes[0].cidr, "10.96.0.0/12");
        assert_eq!(s.excludes[0].port, 53);
    }
}
