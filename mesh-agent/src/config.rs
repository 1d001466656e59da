//! Every knob of `mesh-agent run` (a flag and an env var each).

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::enrol::file::{ConfigError, MeshFile};

/// Default bpffs folder for pins (maps), one per node.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/mesh";
/// Default admin endpoint (metrics, readiness, config).
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:15020";
/// Default outbound listener of the node proxy.
pub const DEFAULT_PROXY_ADDRESS: &str = "0.0.0.0:15001";
/// How often the enrolment file is checked for changes (milliseconds).
pub const DEFAULT_RELOAD_INTERVAL_MS: u64 = 500;
/// Floor of the per-socket limit of bytes queued by sk_msg redirects (bytes).
pub const DEFAULT_SKMSG_QUEUE_FLOOR: u32 = 4 * 1024 * 1024;
/// How old the proxy's heartbeat may be before the datapath stops sending it connections
/// (milliseconds; 0 turns the check off).
pub const DEFAULT_PROXY_HEARTBEAT_TIMEOUT_MS: u64 = 1000;
/// After a hand-over, how long the old agent drains (milliseconds).
pub const DEFAULT_HANDOVER_DRAIN_MS: u64 = 60_000;
/// How long SIGTERM waits for proxied connections to finish (milliseconds).
pub const DEFAULT_DRAIN_MS: u64 = 5000;
/// Where the embedded control plane serves ADS (gRPC).
pub const DEFAULT_XDS_LISTEN: &str = "127.0.0.1:15010";
/// How long a connection to a new destination waits for its listener (milliseconds).
pub const DEFAULT_XDS_ON_DEMAND_TIMEOUT_MS: u64 = 1000;

/// Trust domain of SPIFFE identities.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// What the agent leaves on exit (`--on-exit`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExit {
    Detach,
    Keep,
}

/// The source of workloads and services.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    File,
    Kubernetes,
}

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct RunArgs {
    /// Where workloads and services come from: the standalone file (`--config`), or the
    /// Kubernetes API server (namespaces, local pods, Services, EndpointSlices, routes).
    #[arg(long, env = "MESH_SOURCE", value_enum, default_value = "file")]
    pub source: Source,
    /// Standalone enrolment file (YAML): namespaces, workloads, services, exclusions.
    /// With `--source kubernetes` it is optional and may hold only `exclude:`.
    #[arg(long, env = "MESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Kubernetes: a kubeconfig file; default: the pod's service account (in-cluster),
    /// else `KUBECONFIG` or `~/.kube/config`.
    #[arg(long, env = "MESH_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubernetes: the kubelet's pod cgroup folder (local pods' processes are found there);
    /// default: `kubepods.slice` or `kubepods` under the cgroup v2 mount.
    #[arg(long, env = "MESH_KUBEPODS_CGROUP")]
    pub kubepods_cgroup: Option<PathBuf>,
    /// Kubernetes: trust domain of workload identities (`spiffe://<domain>/ns/N/sa/S`).
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// bpffs folder where the maps are pinned; also the node lock (one agent per folder).
    #[arg(long, env = "MESH_PIN_PATH", default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// cgroup v2 folder the programs attach to; default: the cgroup2 mount root.
    #[arg(long, env = "MESH_CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// Address the node proxy listens on for captured outbound connections.
    #[arg(long, env = "MESH_PROXY_ADDRESS", default_value = DEFAULT_PROXY_ADDRESS)]
    pub proxy_address: SocketAddrV4,
    /// Address pods are redirected to (must reach the proxy listener from the pods'
    /// namespaces); default: `--proxy-address`, which then must not be 0.0.0.0.
    #[arg(long, env = "MESH_PROXY_REDIRECT")]
    pub proxy_redirect: Option<SocketAddrV4>,
    /// Admin endpoint: /metrics, /ready, /config, /workloads.
    #[arg(long, env = "MESH_ADMIN_ADDRESS", default_value = DEFAULT_ADMIN_ADDRESS)]
    pub admin_address: SocketAddr,
    /// Pair app and proxy sockets with sk_msg (false: captured flows cross the TCP stack).
    #[arg(long, env = "MESH_SKMSG", default_value_t = true, action = clap::ArgAction::Set)]
    pub skmsg: bool,
    /// Also pair the proxy's connection to a same-node destination with the destination's
    /// socket (sk_msg on both legs). Off by default: the destination's socket then reads
    /// through the sockmap path (see docs/architecture.md on blocking readers).
    #[arg(long, env = "MESH_SKMSG_UPSTREAM", default_value_t = false, action = clap::ArgAction::Set)]
    pub skmsg_upstream: bool,
    /// Floor of the per-socket limit of bytes waiting in an sk_msg redirect queue (bytes).
    #[arg(long, env = "MESH_SKMSG_QUEUE_FLOOR", default_value_t = DEFAULT_SKMSG_QUEUE_FLOOR)]
    pub skmsg_queue_floor: u32,
    /// Enrolment file poll interval (milliseconds).
    #[arg(long, env = "MESH_RELOAD_INTERVAL_MS", default_value_t = DEFAULT_RELOAD_INTERVAL_MS)]
    pub reload_interval_ms: u64,
    /// How old the proxy's heartbeat may be (milliseconds) before new connections of
    /// enrolled workloads stop going to it: fail-open workloads then go direct, fail-closed
    /// ones are refused, until it beats again. 0 turns the check off.
    #[arg(long, env = "MESH_PROXY_HEARTBEAT_TIMEOUT_MS", default_value_t = DEFAULT_PROXY_HEARTBEAT_TIMEOUT_MS)]
    pub proxy_heartbeat_timeout_ms: u64,
    /// What the agent leaves on exit: `detach` removes its programs and pins (nothing is
    /// captured until the next agent); `keep` leaves programs attached and maps pinned for
    /// the next agent to adopt, so fail-closed workloads stay refused and direct-mode pairs
    /// stay short-circuited meanwhile (see docs/operations.md).
    #[arg(long, env = "MESH_ON_EXIT", value_enum, default_value = "detach")]
    pub on_exit: OnExit,
    /// If an agent already runs on this node (pin folder), ask it to hand the node over
    /// (an upgrade: the old agent passes its listener, releases the node and drains)
    /// instead of refusing to start.
    #[arg(long, env = "MESH_TAKEOVER", default_value_t = false, action = clap::ArgAction::Set)]
    pub takeover: bool,
    /// After handing the node over, how long the old agent lets the connections it relays
    /// finish before it resets them (milliseconds).
    #[arg(long, env = "MESH_HANDOVER_DRAIN_MS", default_value_t = DEFAULT_HANDOVER_DRAIN_MS)]
    pub handover_drain_ms: u64,
    /// Apply a reloaded standalone file that declares nothing (no namespace, workload or
    /// service), which releases every workload; refused by default.
    #[arg(long, env = "MESH_ALLOW_EMPTY_CONFIG", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_empty_config: bool,
    /// On SIGTERM, how long proxied connections may take to finish (milliseconds).
    #[arg(long, env = "MESH_DRAIN_MS", default_value_t = DEFAULT_DRAIN_MS)]
    pub drain_ms: u64,
    /// An external ADS server (`http://host:port`) for the proxy; default: the embedded
    /// control plane, which then is not started.
    #[arg(long, env = "MESH_XDS_ADDRESS")]
    pub xds_address: Option<String>,
    /// Where the embedded control plane serves ADS over TCP to other clients (plaintext
    /// gRPC). Without `--xds-token-file` it must be a loopback address and serves the node's
    /// own processes only; with one, clients must present the token.
    #[arg(long, env = "MESH_XDS_LISTEN", default_value = DEFAULT_XDS_LISTEN)]
    pub xds_listen: SocketAddr,
    /// The Unix socket over which the embedded control plane serves this agent's proxy
    /// (mode 0600); default: `/run/mesh-agent/<last part of --pin-path>/xds.sock`.
    #[arg(long, env = "MESH_XDS_SOCKET")]
    pub xds_socket: Option<PathBuf>,
    /// A file holding the ADS bearer token (at least 16 printable characters): the
    /// embedded control plane then requires it from TCP clients, and the proxy presents it
    /// to an external control plane (`--xds-address`).
    #[arg(long, env = "MESH_XDS_TOKEN_FILE")]
    pub xds_token_file: Option<PathBuf>,
    /// xDS protocol variant of the proxy's stream.
    #[arg(long, env = "MESH_XDS_MODE", value_enum, default_value = "delta")]
    pub xds_mode: crate::proxy::xds::client::Mode,
    /// Subscribe to listeners (`<ip>:<port>`) when a workload first calls them, and to
    /// what they reference; false: wildcard listeners and clusters.
    #[arg(long, env = "MESH_XDS_ON_DEMAND", default_value_t = true, action = clap::ArgAction::Set)]
    pub xds_on_demand: bool,
    /// How long a connection to a new destination waits for its listener (milliseconds);
    /// then it is relayed as plain TCP.
    #[arg(long, env = "MESH_XDS_ON_DEMAND_TIMEOUT_MS", default_value_t = DEFAULT_XDS_ON_DEMAND_TIMEOUT_MS)]
    pub xds_on_demand_timeout_ms: u64,
    /// This node's name: the Kubernetes node whose pods are watched (required with
    /// `--source kubernetes`; the downward API's `spec.nodeName`), and the node id
    /// presented to the control plane; default: the host name.
    #[arg(long, env = "MESH_NODE_NAME")]
    pub node_name: Option<String>,
}

impl RunArgs {
    /// The Unix socket of the embedded control plane (unique per pin folder, like the
    /// node lock).
    pub fn xds_socket_path(&self) -> PathBuf {
        self.xds_socket.clone().unwrap_or_else(|| {
            let name = self
                .pin_path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "mesh".into());
            Path::new("/run/mesh-agent").join(name).join("xds.sock")
        })
    }

    pub fn redirect_target(&self) -> Result<SocketAddrV4, ConfigError> {
        match self.proxy_redirect {
            Some(a) => Ok(a),
            None if self.proxy_address.ip().is_unspecified() => Err(ConfigError::Invalid(
                "--proxy-redirect is required when --proxy-address listens on 0.0.0.0: pods \
                 must be sent to an address of this node they can reach"
                    .into(),
            )),
            None => Ok(self.proxy_address),
        }
    }

    /// The standalone file as the source needs it; every problem of the source's flags at
    /// once.
    pub fn source_file(&self) -> Result<MeshFile, ConfigError> {
        match (self.source, &self.config) {
            (Source::File, Some(path)) => MeshFile::load(path),
            (Source::File, None) => Err(ConfigError::Invalid(
                "--config (MESH_CONFIG) is required with --source file".into(),
            )),
            (Source::Kubernetes, config) => {
                let mut problems = Vec::new();
                if self.node_name.as_deref().is_none_or(str::is_empty) {
                    problems.push(
                        "--node-name (MESH_NODE_NAME) is required with --source kubernetes: \
                         set it from the downward API (spec.nodeName)"
                            .to_owned(),
                    );
                }
                let file = match config {
                    Some(path) => {
                        let f = MeshFile::load(path)?;
                        if !f.namespaces.is_empty()
                            || !f.workloads.is_empty()
                            || !f.services.is_empty()
                        {
                            problems.push(format!(
                                "{}: with --source kubernetes the file may hold only `exclude:`; \
                                 namespaces, workloads and services come from the API server",
                                path.display()
                            ));
                        }
                        f
                    }
                    None => MeshFile::default(),
                };
                if problems.is_empty() {
                    Ok(file)
                } else {
                    Err(ConfigError::Invalid(problems.join("; ")))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::enrol::file::MeshFile;

    #[test]
    fn redirect_target_needs_a_concrete_address() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            run: RunArgs,
        }
        let t = T::try_parse_from(["x", "--config", "f"]).unwrap();
        assert!(t.run.redirect_target().is_err());
        let t = T::try_parse_from(["x", "--source", "kubernetes"]).unwrap();
        let e = t.run.source_file().unwrap_err().to_string();
        assert!(e.contains("--node-name"), "{e}");
        let t = T::try_parse_from(["x"]).unwrap();
        let e = t.run.source_file().unwrap_err().to_string();
        assert!(e.contains("--config"), "{e}");
        let t = T::try_parse_from(["x", "--source", "kubernetes", "--node-name", "n1"]).unwrap();
        assert_eq!(t.run.source_file().unwrap(), MeshFile::default());
        let t =
            T::try_parse_from(["x", "--config", "f", "--proxy-address", "10.1.0.1:15001"]).unwrap();
        assert_eq!(
            t.run.redirect_target().unwrap(),
            "10.1.0.1:15001".parse().unwrap()
        );
    }
}
