//! Simulated nodes several test files share, so that each reads as what it checks.

use std::process::{Child, Command, Stdio};

use crate::{podtool, Agent, Pod, SimNode};

pub mod two_nodes;

/// `namespaces:` entries of the scenes' files (YAML flow mappings): `shop` and `backend`
/// enrolled with the agent's label, `backend` enrolled with Istio's own label instead, and
/// `legacy`, outside the mesh.
pub const NS_SHOP: &str = "{ name: shop, labels: { mesh-agent.io/dataplane-mode: ambient } }";
pub const NS_BACKEND: &str = "{ name: backend, labels: { mesh-agent.io/dataplane-mode: ambient } }";
pub const NS_BACKEND_ISTIO: &str =
    "{ name: backend, labels: { istio.io/dataplane-mode: ambient } }";
pub const NS_LEGACY: &str = "{ name: legacy }";

/// One entry of a file's `workloads:` for `pod` (the workload takes the pod's name):
/// `service_account` and `node` are left out when empty (the namespace's `default`; this
/// host), `labels` is a YAML flow mapping.
pub fn workload_entry(
    pod: &Pod,
    namespace: &str,
    service_account: &str,
    labels: &str,
    node: &str,
) -> String {
    let mut e = format!(
        "  - {{ name: {}, namespace: {namespace}, ip: {}, netns: {}",
        pod.name,
        pod.ip,
        pod.netns_path()
    );
    if !node.is_empty() {
        e += &format!(", node: {node}");
    }
    if !service_account.is_empty() {
        e += &format!(", service_account: {service_account}");
    }
    e + &format!(", labels: {labels} }}\n")
}

/// The head of a single-node file: `namespaces:` (the entries given), then `workloads:`,
/// one per `(pod, namespace, service account, labels)` of `n` (`workload_entry`). The
/// test appends its services and policies.
pub fn mesh_file(
    n: &SimNode,
    namespaces: &[&str],
    workloads: &[(&str, &str, &str, &str)],
) -> String {
    let mut yaml = String::from("namespaces:\n");
    for ns in namespaces {
        yaml += &format!("  - {ns}\n");
    }
    yaml += "workloads:\n";
    for &(pod, ns, sa, labels) in workloads {
        yaml += &workload_entry(n.pod(pod), ns, sa, labels, "");
    }
    yaml
}

/// The VIP of the `backend/echo` service in [`shop_backend_data`].
pub const ECHO_VIP: &str = "10.96.0.20";

/// A node with an enrolled client (`shop/client`, service account `web`), an enrolled
/// echo server behind the service `backend/echo` (`ECHO_VIP`:80 -> 7000), a `data/cache`
/// pod in a direct-mode namespace (pod to pod, socket to socket) also serving echo on
/// 7000, and the agent. `allow_web`: an ALLOW policy on the server for the client's
/// identity (which also keeps the server out of direct mode).
pub fn shop_backend_data(allow_web: bool) -> (SimNode, Agent) {
    let mut n = SimNode::new().expect("sim node");
    n.add_pod("client", 2).unwrap();
    n.add_pod("server", 3).unwrap();
    n.add_pod("cache", 4).unwrap();
    let p = |name: &str| n.pod(name);
    let mut yaml = format!(
        "namespaces:\n\
         \x20 - {{ name: shop, labels: {{ mesh-agent.io/dataplane-mode: ambient }} }}\n\
         \x20 - {{ name: backend, labels: {{ mesh-agent.io/dataplane-mode: ambient }} }}\n\
         \x20 - {{ name: data, mode: direct }}\n\
         workloads:\n\
         \x20 - {{ name: client, namespace: shop, ip: {}, netns: {}, service_account: web }}\n\
         \x20 - {{ name: server, namespace: backend, ip: {}, netns: {}, labels: {{ app: echo }} }}\n\
         \x20 - {{ name: cache, namespace: data, ip: {}, netns: {} }}\n\
         services:\n\
         \x20 - name: echo\n\
         \x20   namespace: backend\n\
         \x20   vip: {ECHO_VIP}\n\
         \x20   ports: [ {{ port: 80, target_port: 7000, protocol: tcp }} ]\n\
         \x20   selector: {{ app: echo }}\n",
        p("client").ip,
        p("client").netns_path(),
        p("server").ip,
        p("server").netns_path(),
        p("cache").ip,
        p("cache").netns_path(),
    );
    if allow_web {
        yaml += "authorization_policies:\n\
         \x20 - metadata: { name: allow-web, namespace: backend }\n\
         \x20   spec:\n\
         \x20     selector: { matchLabels: { app: echo } }\n\
         \x20     action: ALLOW\n\
         \x20     rules: [ { from: [ { source: { principals: [ cluster.local/ns/shop/sa/web ] } } ] } ]\n";
    }
    n.write_config(&yaml).unwrap();
    let agent = n.start_agent(&[]).unwrap();
    for pod in ["server", "cache"] {
        n.serve(pod, &["echo", "--listen", "0.0.0.0:7000"]).unwrap();
    }
    (n, agent)
}

/// A client in a pod that connects and holds the connection open (it reads until the end
/// of stream; an echo server sends nothing unasked). Killed on drop.
pub struct Held(Child);

impl Held {
    pub fn open(n: &SimNode, pod: &str, to: &str) -> Held {
        Held::spawn(n.pod_command(pod, &podtool()), to)
    }

    /// `in_pod`: podtool in the pod (`pod_command` of a node of either kind).
    pub fn spawn(mut in_pod: Command, to: &str) -> Held {
        let child = in_pod
            .args(["read-client", "--to", to, "--deadline-ms", "120000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn podtool read-client");
        Held(child)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The TCP service `db` of [`client_db`]: VIP:5432 -> pod db:9000.
pub const DB_VIP: &str = "10.96.0.12:5432";

/// A node with `shop/client` and `backend/db` (label `app: db`) behind the TCP service
/// `db` ([`DB_VIP`]), the configuration file written; no agent yet.
pub fn client_db() -> SimNode {
    let mut n = SimNode::new().expect("sim node");
    n.add_pod("client", 2).unwrap();
    n.add_pod("db", 3).unwrap();
    let yaml = mesh_file(
        &n,
        &[NS_SHOP, NS_BACKEND],
        &[
            ("client", "shop", "web", "{}"),
            ("db", "backend", "db", "{ app: db }"),
        ],
    ) + "services:\n\
         \x20 - { name: db, namespace: backend, vip: 10.96.0.12, ports: [ { port: 5432, target_port: 9000, protocol: tcp } ], selector: { app: db } }\n";
    n.write_config(&yaml).unwrap();
    n
}

/// [`client_db`] with an agent started with `--kernel-relay MODE` (plus `extra`).
pub fn client_db_relay(mode: &str, extra: &[&str]) -> (SimNode, Agent) {
    let n = client_db();
    let mut flags = vec!["--kernel-relay", mode];
    flags.extend_from_slice(extra);
    let agent = n.start_agent(&flags).unwrap();
    (n, agent)
}

/// Whether this kernel runs the kernel relay (6.9+: the queue length and `tcp_sock`
/// offsets). Where it does not, `/kernel` and `/ready` must say so: the flag is then
/// ignored and the proxy relays in user space (the relay tests then check that nothing
/// was relayed).
pub fn relay_available(agent: &Agent) -> bool {
    let on = agent
        .kernel_feature("kernel_relay")
        .expect("/kernel lists kernel_relay when --kernel-relay asks for it");
    if !on {
        let ready = agent.get("/ready").unwrap();
        assert!(ready.contains("kernel_relay"), "{ready}");
    }
    on
}

/// An unlabelled counter of the agent's `/metrics` (the proxy's flow byte totals).
pub fn flow_bytes(agent: &Agent, name: &str) -> u64 {
    crate::metric(&agent.get("/metrics").unwrap(), name, &[])
}

/// A node with two pods, `client` in the enrolled namespace `shop` and `server` in
/// `backend` (`backend_extra`: more of that namespace's YAML mapping, e.g. `"mode:
/// direct"`, or empty), both workloads of the configuration file written; no agent yet.
pub fn client_server(backend_extra: &str) -> SimNode {
    let mut n = SimNode::new().expect("sim node");
    n.add_pod("client", 2).unwrap();
    n.add_pod("server", 3).unwrap();
    let p = |name: &str| n.pod(name);
    let backend = match backend_extra {
        "" => String::new(),
        extra => format!("\n    {extra}"),
    };
    n.write_config(&format!(
        "namespaces:\n  - name: shop\n    labels: {{ mesh-agent.io/dataplane-mode: ambient }}\n  - name: backend{backend}\n\
         workloads:\n\
         \x20 - {{ name: client, namespace: shop, ip: {}, netns: {} }}\n\
         \x20 - {{ name: server, namespace: backend, ip: {}, netns: {} }}\n",
        p("client").ip,
        p("client").netns_path(),
        p("server").ip,
        p("server").netns_path(),
    ))
    .unwrap();
    n
}

/// Pods the agent captures inbound (`mesh_inbound_pods`): their in-pod listeners are open
/// and TC steers to them (0 while the agent's metrics do not answer).
pub fn inbound_pods(agent: &Agent) -> u64 {
    crate::metric(
        &agent.get("/metrics").unwrap_or_default(),
        "mesh_inbound_pods",
        &[],
    )
}

/// The listening TCP sockets in `netns` whose local port is one of `ports` (`ss -Hltn`),
/// a line each: e.g. inbound capture's in-pod listeners (15006, 15008).
pub fn listening(netns: &str, ports: &[u16]) -> Vec<String> {
    crate::sh(&format!("ip netns exec {netns} ss -Hltn"))
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            // State, Recv-Q, Send-Q, then the local address.
            let local = l.split_whitespace().nth(3).unwrap_or_default();
            let port = local.rsplit(':').next().and_then(|p| p.parse().ok());
            port.is_some_and(|p: u16| ports.contains(&p))
        })
        .map(str::to_owned)
        .collect()
}
