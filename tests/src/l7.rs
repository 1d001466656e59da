//! The L7 scenes' simulated node (`tests/tests/l7.rs`, `upgrade.rs`): an enrolled
//! `shop/client` calling `protocol: http` services whose endpoints are `backend` pods of
//! the same node.

use crate::{scenes::mesh_file, SimNode};

/// `shop` enrolled, `backend` not (its pods are reached through services).
const NAMESPACES: [&str; 2] = [
    "{ name: shop, labels: { mesh-agent.io/dataplane-mode: ambient } }",
    "{ name: backend }",
];

/// A node with the pod `client` (host 2) and the `backends` (hosts 3, 4, ...).
pub fn node(backends: &[&str]) -> SimNode {
    let mut n = SimNode::new().expect("sim node");
    n.add_pod("client", 2).unwrap();
    for (host, pod) in (3..).zip(backends) {
        n.add_pod(pod, host).unwrap();
    }
    n
}

/// The file up to `services:` (inclusive): `shop/client`, and each `(pod, labels)` of
/// `backends` a workload of `backend` (labels: a YAML flow mapping).
pub fn file_head(n: &SimNode, backends: &[(&str, &str)]) -> String {
    let mut workloads = vec![("client", "shop", "", "{}")];
    workloads.extend(
        backends
            .iter()
            .map(|&(pod, labels)| (pod, "backend", "", labels)),
    );
    mesh_file(n, &NAMESPACES, &workloads) + "services:\n"
}

/// A `protocol: http` service of `backend`: `vip`:80 to port 8080 of the pods `selector`
/// (a YAML flow mapping) picks. More of the entry's keys may follow (four spaces deep).
pub fn http_service(name: &str, vip: &str, selector: &str) -> String {
    format!(
        "  - name: {name}\n\
         \x20   namespace: backend\n\
         \x20   vip: {vip}\n\
         \x20   ports: [ {{ port: 80, target_port: 8080, protocol: http }} ]\n\
         \x20   selector: {selector}\n"
    )
}
