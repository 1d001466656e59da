//! Two simulated nodes (`crate::cluster`) with the cast the cross-node tests share.
//!
//! Node 0 runs the callers: `client-a` (namespace `shop`, service account `web`),
//! `client-x` (`shop`, `batch`) and `legacy` (namespace `legacy`, outside the mesh); node 1
//! runs `server-b` (namespace `backend`, enrolled with Istio's own label, service account
//! `echo`, label `app: echo`). A test picks the members it needs; every node reads the
//! same file: each member with its `node:`, then what the test adds (services, policies).

use std::{net::Ipv4Addr, ops::Deref, time::Duration};

use crate::{
    cluster::{NodeAgent, SimCluster},
    scenes::{workload_entry, NS_BACKEND_ISTIO, NS_LEGACY, NS_SHOP},
    wait_for,
};

/// A workload of the scene: its pod, where the pod runs, what the file says of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub pod: &'static str,
    /// The node that runs it.
    pub node: usize,
    /// The last octet of its address in the node's pod range.
    pub host: u8,
    pub namespace: &'static str,
    pub service_account: &'static str,
    /// A YAML flow mapping.
    pub labels: &'static str,
}

impl Member {
    /// Its SPIFFE ID (trust domain `cluster.local`).
    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://cluster.local/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

pub const CLIENT_A: Member = Member {
    pod: "client-a",
    node: 0,
    host: 2,
    namespace: "shop",
    service_account: "web",
    labels: "{}",
};
pub const CLIENT_X: Member = Member {
    pod: "client-x",
    node: 0,
    host: 3,
    namespace: "shop",
    service_account: "batch",
    labels: "{}",
};
pub const LEGACY: Member = Member {
    pod: "legacy",
    node: 0,
    host: 4,
    namespace: "legacy",
    service_account: "default",
    labels: "{}",
};
pub const SERVER_B: Member = Member {
    pod: "server-b",
    node: 1,
    host: 2,
    namespace: "backend",
    service_account: "echo",
    labels: "{ app: echo }",
};

/// `client-a`'s identity.
pub const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
/// `server-b`'s identity.
pub const ECHO: &str = "spiffe://cluster.local/ns/backend/sa/echo";

/// A `services:` section with `backend/web-api` at `vip`:80, HTTP, to `port` of the pods
/// labelled `app: echo` (server-b).
pub fn web_api(vip: Ipv4Addr, port: u16) -> String {
    format!(
        "services:\n\
         \x20 - name: web-api\n\
         \x20   namespace: backend\n\
         \x20   vip: {vip}\n\
         \x20   ports: [ {{ port: 80, target_port: {port}, protocol: http }} ]\n\
         \x20   selector: {{ app: echo }}\n"
    )
}

/// An `authorization_policies:` section with `backend/no-admin`: a DENY of the paths
/// `/admin*` at server-b (`app: echo`), on `port` only if one is given. Its HTTP
/// attributes make server-b's node terminate HTTP there and judge each request.
pub fn deny_admin(port: Option<u16>) -> String {
    let ports = port
        .map(|p| format!(", ports: [ \"{p}\" ]"))
        .unwrap_or_default();
    format!(
        "authorization_policies:\n\
         \x20 - metadata: {{ name: no-admin, namespace: backend }}\n\
         \x20   spec:\n\
         \x20     selector: {{ matchLabels: {{ app: echo }} }}\n\
         \x20     action: DENY\n\
         \x20     rules: [ {{ to: [ {{ operation: {{ paths: [ \"/admin*\" ]{ports} }} }} ] }} ]\n"
    )
}

/// The two nodes and the members' pods; derefs to the cluster (`node(i)`, `pod(name)`).
pub struct TwoNodes {
    pub cluster: SimCluster,
    pub members: Vec<Member>,
}

impl TwoNodes {
    /// The nodes with a pod per member, no file, no agent, no server yet.
    pub fn new(members: &[Member]) -> TwoNodes {
        let mut cluster = SimCluster::new(2).expect("sim cluster");
        for m in members {
            cluster.add_pod(m.node, m.pod, m.host).unwrap();
        }
        TwoNodes {
            cluster,
            members: members.to_vec(),
        }
    }

    /// The file of `members` (pods of this scene, each on its node), then `extra`.
    /// `namespaces:` has `shop`, `backend` and, when a member of the scene lives there,
    /// `legacy`.
    pub fn file_of(&self, members: &[Member], extra: &str) -> String {
        let mut yaml = format!("namespaces:\n  - {NS_SHOP}\n  - {NS_BACKEND_ISTIO}\n");
        if self.members.iter().any(|m| m.namespace == "legacy") {
            yaml += &format!("  - {NS_LEGACY}\n");
        }
        yaml += "workloads:\n";
        for m in members {
            yaml += &workload_entry(
                self.cluster.pod(m.pod),
                m.namespace,
                m.service_account,
                m.labels,
                &self.cluster.node(m.node).name(),
            );
        }
        yaml + extra
    }

    /// `file_of` every member.
    pub fn file(&self, extra: &str) -> String {
        self.file_of(&self.members, extra)
    }

    /// `yaml` as every node's file.
    pub fn write_text(&self, yaml: &str) {
        for n in &self.cluster.nodes {
            n.write_config(yaml).unwrap();
        }
    }

    /// `file(extra)` as every node's file.
    pub fn write_file(&self, extra: &str) {
        self.write_text(&self.file(extra));
    }

    /// Starts podtool's HTTP server in `pod` on `port`, answering `name` as its body
    /// (empty: podtool's default); the server's address.
    pub fn serve_http(&self, pod: &str, port: u16, name: &str) -> String {
        let listen = format!("0.0.0.0:{port}");
        let mut args = vec!["http", "--listen", listen.as_str()];
        if !name.is_empty() {
            args.extend(["--name", name]);
        }
        self.cluster.node_of(pod).serve(pod, &args).unwrap();
        format!("{}:{port}", self.cluster.pod(pod).ip)
    }

    /// An agent on each node, started with `args`, ready.
    pub fn start_agents(&self, args: &[&str]) -> Vec<NodeAgent> {
        (0..self.cluster.nodes.len())
            .map(|i| self.cluster.node(i).start_agent(args).expect("agent"))
            .collect()
    }

    /// Waits until each of `agents` serves `member`'s workload: its address and its
    /// identity in `/config_dump` (a tunnel to it needs both).
    pub fn wait_workload(&self, agents: &[NodeAgent], member: Member) {
        let ip = self.cluster.pod(member.pod).ip.to_string();
        let id = member.spiffe_id();
        for a in agents {
            wait_for("the workloads in force", Duration::from_secs(10), || {
                a.get("/config_dump")
                    .map(|d| d.contains(&ip) && d.contains(&id))
                    .unwrap_or(false)
            });
        }
    }

    /// `wait_workload` of `server-b`, what every cross-node test talks to.
    pub fn wait_mesh(&self, agents: &[NodeAgent]) {
        self.wait_workload(agents, SERVER_B);
    }
}

impl Deref for TwoNodes {
    type Target = SimCluster;

    fn deref(&self) -> &SimCluster {
        &self.cluster
    }
}
