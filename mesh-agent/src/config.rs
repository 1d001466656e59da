//! Every knob of `mesh-agent run` (a flag and an env var each), and the standalone
//! enrolment file (YAML) with its validation. Errors name the file, the line and the field.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

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

/// The namespace label that enrols a namespace (value `ambient`), and, on a workload, opts it
/// out (value `none`).
pub const DATAPLANE_LABEL: &str = "mesh-agent.io/dataplane-mode";
pub const DATAPLANE_ENROLLED: &str = "ambient";
pub const DATAPLANE_OPT_OUT: &str = "none";

/// On a namespace (or a workload, which overrides it): `closed` refuses a workload's
/// connections while the mesh cannot serve them (proxy down or stuck, configuration
/// unknown); `open` (the default) lets them go around the mesh.
pub const FAIL_MODE_LABEL: &str = "mesh-agent.io/fail-mode";
/// On a namespace or a workload: `true` leaves its connections alone (an operator's
/// switch, kept in the source of truth so it survives agent restarts).
pub const BYPASS_LABEL: &str = "mesh-agent.io/bypass";

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
    pub xds_mode: crate::xds::client::Mode,
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

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}:{line}: {message}")]
    Semantic {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Same-node flows to this destination go through the node proxy.
    #[default]
    Proxied,
    /// Same-node flows from enrolled workloads to this destination go socket to socket.
    Direct,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MeshFile {
    #[serde(default)]
    pub exclude: Vec<ExcludeRule>,
    #[serde(default)]
    pub namespaces: Vec<NamespaceSpec>,
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
    /// Services the embedded control plane serves to proxies over xDS.
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
}

/// A service: the address clients dial (`vip`), its ports, its endpoints (workloads
/// selected by label, and/or explicit addresses), its traffic policy and HTTP routes.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    pub vip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    /// Workloads of the service's namespace whose labels include all of these.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
    #[serde(default)]
    pub lb: LbSpec,
    #[serde(default)]
    pub connect_timeout_ms: Option<u64>,
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierSpec>,
    /// A token bucket for every request to this service (per node proxy).
    #[serde(default)]
    pub rate_limit: Option<RateLimitSpec>,
    /// Largest request header block accepted, in KiB (Envoy's default 60); larger: 431.
    #[serde(default)]
    pub max_request_headers_kb: Option<u32>,
    /// HTTP routes, first match wins; none: every request goes to this service.
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    /// The endpoints' port (default: `port`).
    #[serde(default)]
    pub target_port: Option<u16>,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Sniffed per connection: HTTP/1.x, the HTTP/2 preface, else opaque TCP.
    #[default]
    Auto,
    Http,
    Http2,
    Grpc,
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    pub ip: Ipv4Addr,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub weight: Option<u32>,
    /// healthy (default), unhealthy, degraded, draining
    #[serde(default)]
    pub health: Option<String>,
    /// Only this service port is served by the endpoint (a multi-port service whose ports
    /// map to different endpoint ports, as EndpointSlices say); absent: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_port: Option<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct LbSpec {
    #[serde(default)]
    pub policy: LbPolicySpec,
    /// ring_hash: the request header hashed.
    #[serde(default)]
    pub hash_header: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicySpec {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
    RingHash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerSpec {
    #[serde(default)]
    pub max_connections: Option<u32>,
    #[serde(default)]
    pub max_pending_requests: Option<u32>,
    #[serde(default)]
    pub max_requests: Option<u32>,
    #[serde(default)]
    pub max_retries: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierSpec {
    #[serde(default)]
    pub consecutive_5xx: Option<u32>,
    #[serde(default)]
    pub base_ejection_ms: Option<u64>,
    #[serde(default)]
    pub max_ejection_percent: Option<u32>,
    #[serde(default)]
    pub interval_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    pub max_tokens: u32,
    #[serde(default)]
    pub tokens_per_fill: Option<u32>,
    pub fill_interval_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matcher: MatchSpec,
    /// Where matching requests go: services of the same namespace (`name`) or another
    /// (`name.namespace`), by weight. None: this service.
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub retries: Option<RetrySpec>,
    #[serde(default)]
    pub fault: Option<FaultSpec>,
    #[serde(default)]
    pub rate_limit: Option<RateLimitSpec>,
    #[serde(default)]
    pub request_headers: Option<HeadersSpec>,
    #[serde(default)]
    pub response_headers: Option<HeadersSpec>,
    #[serde(default)]
    pub direct_response: Option<DirectResponseSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
    #[serde(default)]
    pub headers: Vec<KvMatchSpec>,
    #[serde(default)]
    pub query: Vec<KvMatchSpec>,
}

/// One of `exact`, `prefix`, `regex`, `present` (default: present).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KvMatchSpec {
    pub name: String,
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
    #[serde(default)]
    pub present: Option<bool>,
    #[serde(default)]
    pub invert: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    pub service: String,
    #[serde(default)]
    pub weight: Option<u32>,
    /// The backend service's port; default: the port of the same number, else its first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    pub attempts: u32,
    /// Envoy `retry_on` conditions, e.g. `5xx,reset,connect-failure`.
    #[serde(default)]
    pub on: Option<String>,
    #[serde(default)]
    pub per_try_timeout_ms: Option<u64>,
    #[serde(default)]
    pub statuses: Vec<u32>,
    #[serde(default)]
    pub backoff_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    #[serde(default)]
    pub delay_ms: Option<u64>,
    #[serde(default)]
    pub delay_percent: Option<f64>,
    #[serde(default)]
    pub abort_status: Option<u32>,
    #[serde(default)]
    pub abort_grpc_status: Option<u32>,
    #[serde(default)]
    pub abort_percent: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeadersSpec {
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DirectResponseSpec {
    pub status: u32,
    #[serde(default)]
    pub body: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExcludeRule {
    /// `a.b.c.d/len`
    pub cidr: String,
    /// 0 or absent: every port.
    #[serde(default)]
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSpec {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How same-node flows to this namespace's workloads are carried.
    #[serde(default)]
    pub mode: Mode,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    pub name: String,
    pub namespace: String,
    pub ip: Ipv4Addr,
    /// Network namespace of the workload: `/run/netns/NAME` or `/proc/PID/ns/net`.
    pub netns: PathBuf,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Overrides the namespace's mode for this workload as a destination.
    #[serde(default)]
    pub mode: Option<Mode>,
}

/// A parsed exclusion: network-order IPv4, prefix length, port.
pub fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, len) = s.split_once('/').unwrap_or((s, "32"));
    let ip: Ipv4Addr = ip.trim().parse().ok()?;
    let len: u8 = len.trim().parse().ok()?;
    (len <= 32).then_some((ip, len))
}

impl MeshFile {
    pub fn load(path: &Path) -> Result<MeshFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates; every semantic problem is reported at once.
    pub fn parse(path: &Path, text: &str) -> Result<MeshFile, ConfigError> {
        let file: MeshFile = if text.trim().is_empty() {
            MeshFile::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
                path: path.to_owned(),
                // serde_yaml's message carries the field path and "at line L column C".
                message: e.to_string(),
            })?
        };
        let mut problems: Vec<(usize, String)> = Vec::new();
        let line_of = |needle: &str, after: &str| find_line(text, after, needle);
        for (i, e) in file.exclude.iter().enumerate() {
            if parse_cidr(&e.cidr).is_none() {
                problems.push((
                    line_of(&e.cidr, "exclude:"),
                    format!(
                        "exclude[{i}].cidr: {:?} is not an IPv4 CIDR (a.b.c.d/len)",
                        e.cidr
                    ),
                ));
            }
        }
        if file.exclude.len() > mesh_common::capacity::EXCLUDES as usize {
            problems.push((
                line_of("exclude:", ""),
                format!(
                    "exclude: {} rules, at most {} are supported",
                    file.exclude.len(),
                    mesh_common::capacity::EXCLUDES
                ),
            ));
        }
        let mut ns_names = BTreeMap::new();
        for (i, ns) in file.namespaces.iter().enumerate() {
            if ns_names.insert(ns.name.as_str(), i).is_some() {
                problems.push((
                    line_of(&ns.name, "namespaces:"),
                    format!("namespaces[{i}].name: {:?} is declared twice", ns.name),
                ));
            }
        }
        let mut wl_names = BTreeMap::new();
        let mut ips = BTreeMap::new();
        for (i, w) in file.workloads.iter().enumerate() {
            // Found only when there is a problem: a search per entry would make checking a
            // big file quadratic.
            let line = || line_of(&w.name, "workloads:");
            if !ns_names.contains_key(w.namespace.as_str()) {
                problems.push((
                    line(),
                    format!(
                        "workloads[{i}].namespace: {:?} (workload {:?}) is not declared under namespaces",
                        w.namespace, w.name
                    ),
                ));
            }
            if wl_names
                .insert((w.namespace.as_str(), w.name.as_str()), i)
                .is_some()
            {
                problems.push((
                    line(),
                    format!(
                        "workloads[{i}].name: {}/{} is declared twice",
                        w.namespace, w.name
                    ),
                ));
            }
            if let Some(j) = ips.insert(w.ip, i) {
                problems.push((
                    line(),
                    format!(
                        "workloads[{i}].ip: {} is also the IP of workloads[{j}]",
                        w.ip
                    ),
                ));
            }
            if w.ip.is_unspecified() || w.ip.is_loopback() {
                problems.push((
                    line(),
                    format!("workloads[{i}].ip: {} is not a pod address", w.ip),
                ));
            }
        }
        check_services(&file, &ns_names, &mut problems, &line_of);
        if problems.is_empty() {
            return Ok(file);
        }
        let (line, _) = problems[0];
        let message = problems
            .into_iter()
            .map(|(_, m)| m)
            .collect::<Vec<_>>()
            .join("; ");
        Err(ConfigError::Semantic {
            path: path.to_owned(),
            line,
            message,
        })
    }

    /// Whether a workload's outbound traffic is captured: its namespace carries the
    /// enrolment label and the workload does not opt out.
    pub fn enrolled(&self, w: &WorkloadSpec) -> bool {
        let ns_on = self.namespaces.iter().any(|n| {
            n.name == w.namespace
                && n.labels.get(DATAPLANE_LABEL).map(String::as_str) == Some(DATAPLANE_ENROLLED)
        });
        let opted_out =
            w.labels.get(DATAPLANE_LABEL).map(String::as_str) == Some(DATAPLANE_OPT_OUT);
        ns_on && !opted_out
    }

    /// Whether a workload fails closed: its own label, else its namespace's.
    pub fn fail_closed(&self, w: &WorkloadSpec) -> bool {
        let ns = self.namespaces.iter().find(|n| n.name == w.namespace);
        let mode = w
            .labels
            .get(FAIL_MODE_LABEL)
            .or_else(|| ns.and_then(|n| n.labels.get(FAIL_MODE_LABEL)));
        mode.map(String::as_str) == Some("closed")
    }

    /// Whether a workload's connections are left alone by its own or its namespace's switch.
    pub fn bypassed(&self, w: &WorkloadSpec) -> bool {
        let on =
            |l: &BTreeMap<String, String>| l.get(BYPASS_LABEL).map(String::as_str) == Some("true");
        on(&w.labels)
            || self
                .namespaces
                .iter()
                .any(|n| n.name == w.namespace && on(&n.labels))
    }

    /// The mode a workload has as a destination.
    pub fn mode(&self, w: &WorkloadSpec) -> Mode {
        w.mode.unwrap_or_else(|| {
            self.namespaces
                .iter()
                .find(|n| n.name == w.namespace)
                .map(|n| n.mode)
                .unwrap_or_default()
        })
    }
}

fn check_services(
    file: &MeshFile,
    ns_names: &BTreeMap<&str, usize>,
    problems: &mut Vec<(usize, String)>,
    line_of: &dyn Fn(&str, &str) -> usize,
) {
    let mut names = BTreeMap::new();
    let mut addrs = BTreeMap::new();
    for (i, svc) in file.services.iter().enumerate() {
        let mut bad = |m: String| {
            problems.push((line_of(&svc.name, "services:"), format!("services[{i}]{m}")))
        };
        if !ns_names.contains_key(svc.namespace.as_str()) {
            bad(format!(
                ".namespace: {:?} is not declared under namespaces",
                svc.namespace
            ));
        }
        if names
            .insert((svc.namespace.as_str(), svc.name.as_str()), i)
            .is_some()
        {
            bad(format!(
                ".name: {}.{} is declared twice",
                svc.name, svc.namespace
            ));
        }
        if svc.ports.is_empty() {
            bad(".ports: at least one port is required".into());
        }
        for (j, p) in svc.ports.iter().enumerate() {
            if p.port == 0 || p.target_port == Some(0) {
                bad(format!(".ports[{j}]: port 0 is not a port"));
            }
            if let Some(k) = addrs.insert((svc.vip, p.port), i) {
                bad(format!(
                    ".ports[{j}]: {}:{} is also served by services[{k}]",
                    svc.vip, p.port
                ));
            }
        }
        if svc
            .max_request_headers_kb
            .is_some_and(|k| k == 0 || k > 8192)
        {
            bad(".max_request_headers_kb: must be in 1..8192".into());
        }
        // Limits the xDS level checks as Envoy does (token buckets, durations beyond a
        // protobuf Duration, header rewrites) are left to the proxy, which refuses them
        // with a NACK naming the field while the last good configuration stays: the
        // interop tests hold our client's verdicts against Envoy's on exactly those.
        if svc.lb.policy == LbPolicySpec::RingHash && svc.lb.hash_header.is_none() {
            bad(".lb.hash_header: ring_hash needs the header to hash".into());
        }
        for (j, e) in svc.endpoints.iter().enumerate() {
            if let Some(h) = &e.health {
                if !["healthy", "unhealthy", "degraded", "draining"].contains(&h.as_str()) {
                    bad(format!(".endpoints[{j}].health: {h:?} is not healthy, unhealthy, degraded or draining"));
                }
            }
            if e.weight == Some(0) {
                bad(format!(".endpoints[{j}].weight: must be >= 1"));
            }
        }
        for (j, r) in svc.routes.iter().enumerate() {
            let m = &r.matcher;
            let paths = [&m.prefix, &m.path, &m.regex]
                .iter()
                .filter(|p| p.is_some())
                .count();
            if paths > 1 {
                bad(format!(
                    ".routes[{j}].match: at most one of prefix, path, regex"
                ));
            }
            for (what, re) in std::iter::once(("regex", m.regex.as_ref()))
                .chain(
                    m.headers
                        .iter()
                        .map(|h| ("headers[].regex", h.regex.as_ref())),
                )
                .chain(m.query.iter().map(|q| ("query[].regex", q.regex.as_ref())))
            {
                if let Some(Err(e)) = re.map(|re| regex_lite::Regex::new(re)) {
                    bad(format!(".routes[{j}].match.{what}: {e}"));
                }
            }
            for b in &r.backends {
                let (n, ns) = b
                    .service
                    .split_once('.')
                    .unwrap_or((&b.service, &svc.namespace));
                if !file
                    .services
                    .iter()
                    .any(|s| s.name == n && s.namespace == ns)
                {
                    bad(format!(
                        ".routes[{j}].backends: service {:?} is not declared",
                        b.service
                    ));
                }
            }
            if r.backends
                .iter()
                .map(|b| b.weight.unwrap_or(1) as u64)
                .sum::<u64>()
                == 0
                && !r.backends.is_empty()
            {
                bad(format!(".routes[{j}].backends: the weights add up to 0"));
            }
            if let Some(f) = &r.fault {
                for p in [f.delay_percent, f.abort_percent].into_iter().flatten() {
                    if !(0.0..=100.0).contains(&p) {
                        bad(format!(
                            ".routes[{j}].fault: percentage {p} is not in 0..100"
                        ));
                    }
                }
            }
            for s in r.retries.iter().flat_map(|r| &r.statuses) {
                if !(100..600).contains(s) {
                    bad(format!(
                        ".routes[{j}].retries.statuses: {s} is not an HTTP status"
                    ));
                }
            }
            if let Some(d) = &r.direct_response {
                if !(200..600).contains(&d.status) {
                    bad(format!(
                        ".routes[{j}].direct_response.status: {} is not in 200..599",
                        d.status
                    ));
                }
            }
        }
    }
}

/// Header rewrites the proxy can carry out (the xDS conversion refuses the others, which
/// would leave the whole route configuration out): names are HTTP tokens, values valid
/// header values, and neither pseudo-headers nor `host` are touched.
pub(crate) fn check_headers(field: &str, h: &HeadersSpec, bad: &mut dyn FnMut(String)) {
    let protected = |n: &str| n.starts_with(':') || n.eq_ignore_ascii_case("host");
    for (name, value) in &h.add {
        if protected(name) {
            bad(format!(
                "{field}.add: {name:?}: ':'-prefixed or host headers may not be modified"
            ));
        } else if http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).is_err() {
            bad(format!("{field}.add: {name:?} is not a valid header name"));
        }
        if http::HeaderValue::from_str(value).is_err() {
            bad(format!(
                "{field}.add: the value of {name:?} is not a valid header value"
            ));
        }
    }
    for name in &h.remove {
        if protected(name) {
            bad(format!(
                "{field}.remove: {name:?}: ':'-prefixed or host headers may not be removed"
            ));
        }
    }
}

/// 1-based line of the first line containing `needle` after the first line containing
/// `after` (or from the top); 1 if not found.
fn find_line(text: &str, after: &str, needle: &str) -> usize {
    let mut started = after.is_empty();
    for (i, l) in text.lines().enumerate() {
        if !started {
            started = l.contains(after);
            if !started {
                continue;
            }
            if after == needle {
                return i + 1;
            }
        }
        if l.contains(needle) {
            return i + 1;
        }
    }
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
namespaces:
  - name: shop
    labels: { mesh-agent.io/dataplane-mode: ambient }
  - name: legacy
    mode: direct
workloads:
  - name: web
    namespace: shop
    ip: 10.0.0.2
    netns: /run/netns/web
  - name: batch
    namespace: shop
    ip: 10.0.0.3
    netns: /run/netns/batch
    labels: { mesh-agent.io/dataplane-mode: none }
  - name: db
    namespace: legacy
    ip: 10.0.0.4
    netns: /run/netns/db
";

    #[test]
    fn good_file_enrols_by_namespace_label_and_respects_opt_out() {
        let f = MeshFile::parse(Path::new("m.yaml"), GOOD).unwrap();
        let by = |n: &str| f.workloads.iter().find(|w| w.name == n).unwrap();
        assert!(f.enrolled(by("web")));
        assert!(!f.enrolled(by("batch")));
        assert!(!f.enrolled(by("db")));
        assert_eq!(f.mode(by("db")), Mode::Direct);
        assert_eq!(f.mode(by("web")), Mode::Proxied);
    }

    #[test]
    fn syntax_error_names_file_line_and_field() {
        let bad = GOOD.replace("ip: 10.0.0.3", "ip: 10.0.0.300");
        let e = MeshFile::parse(Path::new("m.yaml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("m.yaml: workloads[1].ip"), "{e}");
        assert!(e.contains("line 13"), "{e}");
    }

    #[test]
    fn unknown_field_is_refused() {
        let bad = GOOD.replace("    mode: direct", "    mdoe: direct");
        let e = MeshFile::parse(Path::new("m.yaml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `mdoe`"), "{e}");
        assert!(e.contains("line 5"), "{e}");
    }

    #[test]
    fn semantic_errors_are_all_reported_with_a_line() {
        let bad = GOOD
            .replace("namespace: legacy", "namespace: nowhere")
            .replace("10.0.0.3", "10.0.0.2");
        let e = MeshFile::parse(Path::new("m.yaml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("m.yaml:11: "), "{e}");
        assert!(e.contains("\"nowhere\""), "{e}");
        assert!(
            e.contains("workloads[1].ip: 10.0.0.2 is also the IP of workloads[0]"),
            "{e}"
        );
    }

    #[test]
    fn cidrs_parse() {
        assert_eq!(
            parse_cidr("10.96.0.0/12"),
            Some((Ipv4Addr::new(10, 96, 0, 0), 12))
        );
        assert_eq!(
            parse_cidr("10.0.0.1"),
            Some((Ipv4Addr::new(10, 0, 0, 1), 32))
        );
        assert_eq!(parse_cidr("10.0.0.0/33"), None);
        assert_eq!(parse_cidr("nope/8"), None);
    }

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

    /// Found by the `standalone_file` fuzz target: a retry status that is not an HTTP
    /// status passed the file check. (Token buckets, durations beyond a protobuf Duration
    /// and header rewrites the proxy refuses stay xDS-level checks, answered with a NACK
    /// naming the field: see the interop verdict tests.)
    #[test]
    fn fuzz_retry_statuses_that_are_not_http_statuses_are_reported() {
        let file = |service: &str, route: &str| {
            format!(
                "namespaces: [{{ name: shop }}]\n\
                 services:\n\
                 \x20 - name: reviews\n\
                 \x20   namespace: shop\n\
                 \x20   vip: 10.96.0.10\n\
                 \x20   ports: [ {{ port: 80, protocol: http }} ]\n\
                 \x20   {service}\n\
                 \x20   routes:\n\
                 \x20     - match: {{ prefix: /api }}\n\
                 \x20       {route}\n"
            )
        };
        let (service, route) = (
            "connect_timeout_ms: 1000",
            "retries: { attempts: 2, statuses: [503, 922] }",
        );
        let e = MeshFile::parse(Path::new("m.yaml"), &file(service, route))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(".routes[0].retries.statuses: 922 is not an HTTP status"),
            "{e}"
        );
        let ok = file(
            "rate_limit: { max_tokens: 5, fill_interval_ms: 50 }",
            "rate_limit: { max_tokens: 1, fill_interval_ms: 1000 }",
        );
        MeshFile::parse(Path::new("m.yaml"), &ok).unwrap();
    }
}
