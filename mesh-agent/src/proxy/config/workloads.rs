//! Mesh workloads as the proxy knows them (from `istio.workload.Address`): for a
//! destination address, whether it is a mesh workload, its identity, the node that runs
//! it and whether it takes HBONE, and the selector-based policies that apply to it.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use serde::Serialize;

use crate::identity::SpiffeId;

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
}

impl WorkloadInfo {
    /// Where to open an HBONE tunnel to it, if it takes one.
    pub fn hbone_addr(&self) -> Option<SocketAddr> {
        self.hbone
            .then(|| {
                self.ips
                    .first()
                    .map(|ip| SocketAddr::new(*ip, crate::wire::istio::HBONE_PORT))
            })
            .flatten()
    }
}

/// Workloads by address and by uid.
#[derive(Debug, Default)]
pub struct WorkloadIndex {
    by_ip: HashMap<IpAddr, Arc<WorkloadInfo>>,
    by_uid: BTreeMap<String, Arc<WorkloadInfo>>,
    /// Addresses claimed by more than one workload (the first by uid keeps it).
    pub conflicts: Vec<IpAddr>,
}

impl WorkloadIndex {
    pub fn new<'a>(workloads: impl IntoIterator<Item = &'a Arc<WorkloadInfo>>) -> WorkloadIndex {
        let mut ix = WorkloadIndex::default();
        for w in workloads {
            ix.by_uid.insert(w.uid.clone(), w.clone());
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
}
