//! Every knob of `mesh-agent run` (a flag and an env var each, `RunArgs`), and the runtime
//! configuration checked and resolved from them once (`RunConfig`).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Serialize;

use crate::{
    datapath::features::NetnsCookieMode,
    enrol::file::{ConfigError, MeshFile},
    proxy::http::{H1Server, H2Server},
};

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
/// Entries of `FLOWS` (live captured flows listed, and handed to their accepting socket).
pub const DEFAULT_FLOWS_CAPACITY: u32 = mesh_common::capacity::FLOWS;
/// Entries of `SOCKHASH` (paired sockets: two per short-circuited flow).
pub const DEFAULT_SOCKHASH_CAPACITY: u32 = mesh_common::capacity::SOCKHASH;
/// Smallest `--flows-capacity`: the kernel's LRU frees entries in batches of 128 per CPU,
/// so a smaller LRU map would evict flows whose handshake has not finished yet.
pub const MIN_FLOWS_CAPACITY: u32 = 1024;
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
/// Validity the agent asks for its workload certificates (renewed at half of it).
pub const DEFAULT_WORKLOAD_CERT_TTL: &str = "24h";
/// The audience of other agents' ServiceAccount tokens at the embedded CA (istiod's).
pub const DEFAULT_CA_K8S_AUDIENCE: &str = "istio-ca";
/// The shortest `--workload-cert-ttl` accepted (seconds): shorter would mean a CSR every
/// few seconds per identity.
pub const MIN_WORKLOAD_CERT_TTL_S: u64 = 10;

/// A duration written `<n>s`, `<n>m`, `<n>h` or `<n>d` (e.g. `24h`, `90m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit (s, m, h, d), e.g. 24h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d (e.g. 24h)")),
    };
    Ok(Duration::from_secs(secs))
}

/// Where access-log lines go (`--access-log`): `off`, `stdout`, `stderr`, or a file path
/// (appended to).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogTarget {
    Off,
    Stdout,
    Stderr,
    File(PathBuf),
}

pub fn parse_access_log(s: &str) -> Result<AccessLogTarget, String> {
    Ok(match s.trim() {
        "" => return Err("expected off, stdout, stderr or a file path".into()),
        "off" => AccessLogTarget::Off,
        "stdout" => AccessLogTarget::Stdout,
        "stderr" => AccessLogTarget::Stderr,
        p => AccessLogTarget::File(PathBuf::from(p)),
    })
}

/// Share of traces recorded when the caller did not decide (Istio's default, 1%).
pub const DEFAULT_TRACE_SAMPLING: f64 = 0.01;

/// `--trace-otlp`: `http://host:port` (the exporter speaks plaintext gRPC).
pub fn parse_trace_otlp(s: &str) -> Result<String, String> {
    let s = s.trim();
    let uri: http::Uri = s
        .parse()
        .map_err(|_| format!("{s:?}: expected http://host:port of an OTLP/gRPC receiver"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "{s:?}: only http:// is supported (plaintext gRPC; send to a node-local collector)"
        ));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{s:?}: no host"));
    }
    Ok(s.to_owned())
}

/// A ratio from 0.0 to 1.0.
pub fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?}: expected a number from 0.0 to 1.0")),
    }
}

/// `--kernel-relay`: which kernel relay of decided proxied flows runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelRelay {
    /// `false`: none, the proxy relays in user space.
    #[default]
    Off,
    /// `true`: both directions, into the far end's receive queue (same-node destinations;
    /// the destination's socket is paired, so its blocking reads can see EAGAIN).
    Ingress,
    /// `egress`: the client's direction, onto the send path of the proxy's leg to the
    /// destination; the destination's socket is never paired.
    Egress,
}

impl Serialize for KernelRelay {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            KernelRelay::Off => "false",
            KernelRelay::Ingress => "true",
            KernelRelay::Egress => "egress",
        })
    }
}

/// `true`, `false` or `egress`.
pub fn parse_kernel_relay(s: &str) -> Result<KernelRelay, String> {
    match s.trim() {
        "false" => Ok(KernelRelay::Off),
        "true" => Ok(KernelRelay::Ingress),
        "egress" => Ok(KernelRelay::Egress),
        _ => Err(format!("{s:?}: expected true, false or egress")),
    }
}

/// `--proxy-redirect`: where IPv4 connections of enrolled pods are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirect4 {
    /// `IP:PORT`: this address of the node.
    Addr(SocketAddrV4),
    /// `auto` or `auto:PORT`: this node's IPv4 address from `--host-ips`
    /// (`MESH_HOST_IPS`), at PORT or `--proxy-address`'s port. None there: an error.
    /// What a node whose primary address (`status.hostIP`) is IPv6 needs.
    Auto(Option<u16>),
}

impl std::fmt::Display for Redirect4 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Redirect4::Addr(a) => write!(f, "{a}"),
            Redirect4::Auto(port) => fmt_auto(*port, f),
        }
    }
}

/// `auto` or `auto:PORT`, as `parse_auto` reads it.
fn fmt_auto(port: Option<u16>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    match port {
        None => f.write_str("auto"),
        Some(p) => write!(f, "auto:{p}"),
    }
}

impl Serialize for Redirect4 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Parses `--proxy-redirect`: `auto`, `auto:PORT` or `IP:PORT`.
pub fn parse_redirect4(s: &str) -> Result<Redirect4, String> {
    const SYNTAX: &str = "expected auto, auto:PORT or IPv4:PORT";
    let t = s.trim();
    if let Some(auto) = parse_auto(s, SYNTAX) {
        return auto.map(Redirect4::Auto);
    }
    t.parse::<SocketAddrV4>().map(Redirect4::Addr).map_err(|_| {
        let hint = if t.parse::<SocketAddrV6>().is_ok() {
            " (an IPv6 address, e.g. the status.hostIP of an IPv6-primary node: use auto \
             with --host-ips, and --proxy-redirect6 for IPv6)"
        } else {
            ""
        };
        format!("{s:?}: {SYNTAX}{hint}")
    })
}

/// `auto` (`Ok(None)`: the default port) or `auto:PORT` of `--proxy-redirect` and
/// `--proxy-redirect6`; `None` if `s` is neither.
fn parse_auto(s: &str, syntax: &str) -> Option<Result<Option<u16>, String>> {
    let t = s.trim();
    if t == "auto" {
        return Some(Ok(None));
    }
    let port = t.strip_prefix("auto:")?;
    Some(match port.parse::<u16>() {
        Ok(0) => Err(format!(
            "{s:?}: port 0 (auto:PORT names the port to listen on)"
        )),
        Ok(p) => Ok(Some(p)),
        Err(_) => Err(format!("{s:?}: {port:?} is not a port ({syntax})")),
    })
}

/// The address `--proxy-redirect auto` takes from `host_ips` (`MESH_HOST_IPS`): the first
/// IPv4 entry pods can be sent to (not unspecified, loopback, link-local, multicast or
/// broadcast). `Ok(None)`: the list holds none (an IPv6-only node, or `status.hostIP` of
/// an IPv6-primary node). An entry that is no address at all is an error.
pub fn pick_host_ip4(host_ips: &str) -> Result<Option<Ipv4Addr>, String> {
    let fit = |a: &Ipv4Addr| {
        !(a.is_unspecified()
            || a.is_loopback()
            || a.is_link_local()
            || a.is_multicast()
            || a.is_broadcast())
    };
    Ok(host_ips_parsed(host_ips)?
        .into_iter()
        .find_map(|ip| match ip {
            IpAddr::V4(a) if fit(&a) => Some(a),
            _ => None,
        }))
}

/// `--host-ips` as addresses; an entry that is not one is an error naming it.
fn host_ips_parsed(host_ips: &str) -> Result<Vec<IpAddr>, String> {
    host_ips
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|entry| {
            entry.parse().map_err(|_| {
                format!(
                    "--host-ips (MESH_HOST_IPS) {host_ips:?}: {entry:?} is not an IP address \
                     (expected the node's addresses, comma-separated)"
                )
            })
        })
        .collect()
}

/// `--proxy-redirect6`: where native IPv6 connections of enrolled pods are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirect6 {
    /// Not captured (`off`, or the flag unset).
    Off,
    /// `[IP6]:PORT`: this address of the node.
    Addr(SocketAddrV6),
    /// `auto` or `auto:PORT`: this node's IPv6 address from `--host-ips`
    /// (`MESH_HOST_IPS`), at PORT or `--proxy-redirect`'s port. No IPv6 address there:
    /// not captured.
    Auto(Option<u16>),
}

impl std::fmt::Display for Redirect6 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Redirect6::Off => f.write_str("off"),
            Redirect6::Addr(a) => write!(f, "{a}"),
            Redirect6::Auto(port) => fmt_auto(*port, f),
        }
    }
}

impl Serialize for Redirect6 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Parses `--proxy-redirect6`: `off`, `auto`, `auto:PORT` or `[IP6]:PORT`.
pub fn parse_redirect6(s: &str) -> Result<Redirect6, String> {
    const SYNTAX: &str = "expected off, auto, auto:PORT or [IPv6]:PORT";
    let t = s.trim();
    if matches!(t, "" | "off") {
        return Ok(Redirect6::Off);
    }
    if let Some(auto) = parse_auto(s, SYNTAX) {
        return auto.map(Redirect6::Auto);
    }
    t.parse::<SocketAddrV6>()
        .map(Redirect6::Addr)
        .map_err(|_| format!("{s:?}: {SYNTAX}"))
}

/// Why `ip` cannot be the IPv6 redirect address (pods are sent to it and the proxy
/// listens on it: it must be one address of this node pods reach), if it cannot.
fn redirect6_unfit(ip: &Ipv6Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("is unspecified: pods must be sent to an address of this node they can reach")
    } else if ip.is_loopback() {
        Some("is loopback: a pod's ::1 is its own")
    } else if ip.segments()[0] & 0xffc0 == 0xfe80 {
        Some("is link-local: it names no one address across the pods' links")
    } else if ip.is_multicast() {
        Some("is multicast")
    } else if ip.to_ipv4_mapped().is_some() {
        Some("is IPv4-mapped: IPv4 goes to --proxy-redirect")
    } else {
        None
    }
}

/// The address `--proxy-redirect6 auto` takes from `host_ips` (`MESH_HOST_IPS`: the
/// node's addresses, comma-separated, as the downward API's `status.hostIPs` gives them):
/// the first IPv6 entry fit to redirect to. `Ok(None)`: the list holds none (an IPv4-only
/// node, or `status.hostIP` of a node whose primary address is IPv4). An entry that is no
/// address at all is an error (a wrong variable, not a single-stack node).
pub fn pick_host_ip6(host_ips: &str) -> Result<Option<Ipv6Addr>, String> {
    Ok(host_ips_parsed(host_ips)?
        .into_iter()
        .find_map(|ip| match ip {
            IpAddr::V6(a) if redirect6_unfit(&a).is_none() => Some(a),
            _ => None,
        }))
}

/// How native IPv6 capture was decided at start (`/config`; logged once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ipv6Capture {
    /// `--proxy-redirect6` unset or `off`.
    Off,
    /// An address given.
    Given,
    /// `auto` picked this node's address from `--host-ips`.
    Auto,
    /// `auto` found no IPv6 address of this node in `--host-ips` (these): not captured.
    NoHostAddress(String),
}

/// What the agent leaves on exit (`--on-exit`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExit {
    Detach,
    Keep,
}

/// A switch (`--telemetry`, and the CLI's own on/off arguments).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnOff {
    On,
    Off,
}

/// The source of workloads and services.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    File,
    Kubernetes,
}

/// The embedded CA's flags, shared by `mesh-agent run` and `mesh-agent control-plane`.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct EmbeddedCaArgs {
    /// The embedded CA's folder (Istio's plug-in layout: ca-cert.pem, ca-key.pem,
    /// root-cert.pem, cert-chain.pem), e.g. /var/lib/mesh-agent/ca: used if the files are
    /// there (an operator's CA, or `mesh-agent ca init`), else a root is generated and
    /// kept there. Default: a root generated in memory for this run (one node only).
    #[arg(long, env = "MESH_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// Serve the embedded CA (`IstioCertificateService`) to other nodes' agents on this
    /// address, in TLS with a certificate the CA issues itself for `--ca-server-names`
    /// (istiod serves it on 15012). Without it the CA serves only in-process.
    #[arg(long, env = "MESH_CA_LISTEN")]
    pub ca_listen: Option<SocketAddr>,
    /// The DNS names and IP addresses callers dial `--ca-listen` at (comma-separated),
    /// put in its certificate; default: the node name, `localhost`, 127.0.0.1 and the
    /// listen address when it is not 0.0.0.0.
    #[arg(long, env = "MESH_CA_SERVER_NAMES", value_delimiter = ',')]
    pub ca_server_names: Vec<String>,
    /// The embedded CA's credentials for other nodes' agents: a file of
    /// `<node-name> <token>` lines, read again when it changes. Without it the CA serves
    /// this agent only.
    #[arg(long, env = "MESH_CA_NODE_TOKENS")]
    pub ca_node_tokens: Option<PathBuf>,
    /// With `--source kubernetes`: the audience other agents' projected ServiceAccount
    /// tokens must be for (their bearer token, when it is not a node credential, is
    /// checked with a TokenReview).
    #[arg(long, env = "MESH_CA_K8S_AUDIENCE", default_value = DEFAULT_CA_K8S_AUDIENCE)]
    pub ca_k8s_audience: String,
    /// With `--source kubernetes`: the ServiceAccount (`NAMESPACE/NAME`) other agents'
    /// tokens must belong to; default: the one this agent runs as (asked of the API
    /// server).
    #[arg(long, env = "MESH_CA_K8S_SERVICE_ACCOUNT")]
    pub ca_k8s_service_account: Option<String>,
}

impl EmbeddedCaArgs {
    /// Checks the flags (problems added to `problems`); the parsed ServiceAccount.
    pub fn check(&self, problems: &mut Vec<ConfigError>) -> Option<(String, String)> {
        if self.ca_k8s_audience.is_empty() {
            problems.push(ConfigError::Invalid(
                "--ca-k8s-audience must not be empty".into(),
            ));
        }
        if self.ca_node_tokens.is_some() && self.ca_listen.is_none() {
            problems.push(ConfigError::Invalid(
                "--ca-node-tokens names other nodes' credentials, but without --ca-listen the \
                 CA serves no other node (it is no longer served beside ADS)"
                    .into(),
            ));
        }
        if !self.ca_server_names.is_empty() && self.ca_listen.is_none() {
            problems.push(ConfigError::Invalid(
                "--ca-server-names names the certificate of --ca-listen, which is not set".into(),
            ));
        }
        match self.ca_k8s_service_account.as_deref() {
            None => None,
            Some(sa) => match sa.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                    Some((ns.to_owned(), name.to_owned()))
                }
                _ => {
                    problems.push(ConfigError::Invalid(format!(
                        "--ca-k8s-service-account {sa:?}: expected NAMESPACE/NAME"
                    )));
                    None
                }
            },
        }
    }
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
    /// Trust domain of workload identities (`spiffe://<domain>/ns/N/sa/S`): the
    /// Kubernetes source names pods' identities in it, and the embedded CA signs only it.
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// The embedded CA (`--ca-dir`, `--ca-listen`, its callers' credentials); the same
    /// flags serve it from `mesh-agent control-plane`.
    #[command(flatten)]
    #[serde(flatten)]
    pub ca: EmbeddedCaArgs,
    /// An external CA (`https://host:port`, Istio's `IstioCertificateService`: istiod's
    /// 15012, or another agent's `--ca-listen`) for workload certificates; the embedded
    /// CA is then not started. `http://` only with `--ca-plaintext`.
    #[arg(long, env = "MESH_CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// A file holding the bearer token this agent presents to `--ca-address` (at least 16
    /// printable characters).
    #[arg(long, env = "MESH_CA_TOKEN_FILE")]
    pub ca_token_file: Option<PathBuf>,
    /// The PEM root(s) `--ca-address`'s TLS certificate must chain to: the mesh root
    /// (istiod: `root-cert.pem` of the `istio-ca-root-cert` ConfigMap; an agent CA: its
    /// `root-cert.pem`). Only these are trusted, not the system's.
    #[arg(long, env = "MESH_CA_ROOT_CERT")]
    pub ca_root_cert: Option<PathBuf>,
    /// The name `--ca-address`'s certificate must carry; default: the address's host
    /// (e.g. `istiod.istio-system.svc` when the address is an IP).
    #[arg(long, env = "MESH_CA_SERVER_NAME")]
    pub ca_server_name: Option<String>,
    /// Allow an `http://` `--ca-address`: the bearer token then crosses the network in
    /// the clear (logged as a warning at start).
    #[arg(long, env = "MESH_CA_PLAINTEXT", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub ca_plaintext: bool,
    /// Validity asked for workload certificates (`<n>s|m|h|d`); renewed at half of it.
    #[arg(long, env = "MESH_WORKLOAD_CERT_TTL", default_value = DEFAULT_WORKLOAD_CERT_TTL, value_parser = parse_duration)]
    pub workload_cert_ttl: Duration,
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
    /// namespaces): `IP:PORT`, or `auto` (this node's IPv4 address from --host-ips, at
    /// --proxy-address's port) or `auto:PORT`; default: `--proxy-address`, which then
    /// must not be 0.0.0.0.
    #[arg(long, env = "MESH_PROXY_REDIRECT", value_parser = parse_redirect4)]
    pub proxy_redirect: Option<Redirect4>,
    /// Where IPv6 pods are redirected to: `[IP6]:PORT` (an IPv6 address of this node the
    /// pods reach; the proxy listens there too), `auto` (this node's IPv6 address from
    /// --host-ips, at --proxy-redirect's port; none there: not captured), `auto:PORT`, or
    /// `off` (the default: native IPv6 connections are not captured).
    #[arg(long, env = "MESH_PROXY_REDIRECT6", value_parser = parse_redirect6)]
    pub proxy_redirect6: Option<Redirect6>,
    /// This node's addresses, comma-separated, for `--proxy-redirect auto` and
    /// `--proxy-redirect6 auto` (Kubernetes:
    /// the downward API's `status.hostIPs`, 1.29+; or `status.hostIP`, the primary
    /// address only).
    #[arg(long, env = "MESH_HOST_IPS")]
    pub host_ips: Option<String>,
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
    /// Kernel relay: once the node proxy has decided a TCP flow to a same-node destination
    /// (endpoint, policy; no L7 work), sk_msg moves its bytes between the client's and the
    /// destination's sockets. Pairs the proxy's leg to such destinations (as
    /// `--skmsg-upstream`). Needs kernel 6.9+ (`kernel_relay` in /kernel). Off by default.
    /// `egress`: the client's direction appended to the send path of the proxy's leg to
    /// the destination, the destination's moved onto the proxy's leg to the client by an
    /// sk_skb verdict; the destination's socket stays out of the sockhash.
    #[arg(long, env = "MESH_KERNEL_RELAY", default_value = "false", value_parser = parse_kernel_relay)]
    pub kernel_relay: KernelRelay,
    /// Node proxy workers, each a thread with a current-thread runtime and its own
    /// SO_REUSEPORT listeners; 0: one per CPU the agent may run on (its CPU affinity and
    /// cgroup CPU quota). A connection stays on the worker that accepted it.
    #[arg(long, env = "MESH_PROXY_WORKERS", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=256))]
    pub proxy_workers: u16,
    /// Floor of the per-socket limit of bytes waiting in an sk_msg redirect queue (bytes).
    #[arg(long, env = "MESH_SKMSG_QUEUE_FLOOR", default_value_t = DEFAULT_SKMSG_QUEUE_FLOOR)]
    pub skmsg_queue_floor: u32,
    /// Entries of the `FLOWS` map (an LRU cache of live captured flows; past it the oldest
    /// leave the listing, counted as `flow_evicted`). At least 1024.
    #[arg(long, env = "MESH_FLOWS_CAPACITY", default_value_t = DEFAULT_FLOWS_CAPACITY)]
    pub flows_capacity: u32,
    /// Entries of the `SOCKHASH` map (paired sockets, two per short-circuited flow; past
    /// it new flows are not paired and use TCP, counted as `sockhash_update_failed`).
    #[arg(long, env = "MESH_SOCKHASH_CAPACITY", default_value_t = DEFAULT_SOCKHASH_CAPACITY)]
    pub sockhash_capacity: u32,
    /// How pods' network-namespace cookies are read: `sockopt` (`SO_NETNS_COOKIE`, kernel
    /// 5.14+), `probe` (a UDP connect from the pod's namespace answered by the connect4
    /// program, 5.7+; the agent must run inside `--cgroup`), or `auto` (sockopt where the
    /// kernel has it).
    #[arg(long, env = "MESH_NETNS_COOKIE", value_enum, default_value_t = NetnsCookieMode::Auto)]
    pub netns_cookie: NetnsCookieMode,
    /// On kernels without the sk_msg back-pressure check (< 6.9), pair sockets anyway
    /// (sk_msg short-circuit, direct mode): a slow reader then lets a writer queue without
    /// a limit in the kernel. Off: such kernels pair nothing and every flow uses TCP.
    #[arg(long, env = "MESH_SKMSG_UNBOUNDED_PAIRING", default_value_t = false, action = clap::ArgAction::Set)]
    pub skmsg_unbounded_pairing: bool,
    /// Treat a kernel feature as missing (`so_netns_cookie`, `skmsg_queue_length`): runs
    /// the fallback on a kernel that has it. For tests.
    #[arg(long, hide = true)]
    pub assume_missing_feature: Vec<String>,
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
    /// Capture plaintext inbound connections to enrolled pods: listeners inside each pod's
    /// network namespace (15006, 15008) and a TC ingress program on its interface that
    /// steers new connections from outside the mesh to them (docs/architecture.md,
    /// "Inbound capture").
    #[arg(long, env = "MESH_INBOUND_CAPTURE", default_value_t = true, action = clap::ArgAction::Set)]
    pub inbound_capture: bool,
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
    /// Access logs (docs/observability.md): one JSON line per proxied connection and per
    /// HTTP request, to `stdout`, `stderr` or a file (appended to); `off` by default.
    #[arg(long, env = "MESH_ACCESS_LOG", default_value = "off", value_parser = parse_access_log)]
    pub access_log: AccessLogTarget,
    /// Istio's standard series (`istio_*` at `/metrics`, docs/observability.md), recorded
    /// by the node proxy per connection and per request: `on` (default) or `off`, where
    /// the proxy records none (the agent's own `mesh_*` series stay). The access log and
    /// traces have switches of their own, both off by default.
    #[arg(long, env = "MESH_TELEMETRY", value_enum, default_value = "on")]
    pub telemetry: OnOff,
    /// Traces (docs/observability.md): OpenTelemetry spans per HTTP request and try and
    /// per proxied TCP connection, sent over OTLP/gRPC to this receiver
    /// (`http://host:port`, e.g. an OpenTelemetry Collector on 4317). Off by default.
    #[arg(long, env = "MESH_TRACE_OTLP", value_parser = parse_trace_otlp)]
    pub trace_otlp: Option<String>,
    /// Share of traces recorded when the caller did not decide (0.0 to 1.0); a request
    /// whose `traceparent` or B3 headers carry a decision follows it.
    #[arg(long, env = "MESH_TRACE_SAMPLING", default_value_t = DEFAULT_TRACE_SAMPLING, value_parser = parse_ratio)]
    pub trace_sampling: f64,
    /// The L7 engine's downstream HTTP/1.1 codec: `own`, the engine's own (docs/l7.md),
    /// or `hyper`, hyper's server (HTTP/2: `--l7-h2-server`).
    #[arg(long, env = "MESH_L7_H1_SERVER", value_enum, default_value_t = H1Server::DEFAULT)]
    pub l7_h1_server: H1Server,
    /// The L7 engine's downstream HTTP/2 server: `own`, the `h2` crate's server driven
    /// by the connection's task (docs/l7.md), or `hyper`, hyper's server.
    #[arg(long, env = "MESH_L7_H2_SERVER", value_enum, default_value_t = H2Server::DEFAULT)]
    pub l7_h2_server: H2Server,
}

/// The runtime configuration of `mesh-agent run`: `RunArgs` checked, resolved and typed
/// once at start-up (durations, the redirect target, the xDS socket, the node name, the
/// source with its file). The wiring uses this only; `/config` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RunConfig {
    /// Where workloads and services come from.
    pub source: SourceConfig,
    pub pin_path: PathBuf,
    pub cgroup: Option<PathBuf>,
    pub proxy_address: SocketAddrV4,
    /// Where pods are redirected to (`--proxy-redirect`, else `--proxy-address`).
    pub proxy_redirect: SocketAddrV4,
    /// Where IPv6 pods are redirected to (`--proxy-redirect6`, `auto` resolved); `None`:
    /// native IPv6 is not captured.
    pub proxy_redirect6: Option<SocketAddrV6>,
    /// How that was decided.
    pub ipv6_capture: Ipv6Capture,
    pub admin_address: SocketAddr,
    pub skmsg: bool,
    pub skmsg_upstream: bool,
    pub kernel_relay: bool,
    /// `--kernel-relay egress` (with `kernel_relay`).
    pub kernel_relay_egress: bool,
    /// Node proxy workers, one thread and current-thread runtime each (resolved: at least 1).
    pub proxy_workers: usize,
    pub skmsg_queue_floor: u32,
    pub flows_capacity: u32,
    pub sockhash_capacity: u32,
    pub netns_cookie: NetnsCookieMode,
    pub skmsg_unbounded_pairing: bool,
    pub assume_missing_feature: Vec<String>,
    #[serde(serialize_with = "as_text")]
    pub reload_interval: Duration,
    /// Zero turns the check off.
    #[serde(serialize_with = "as_text")]
    pub proxy_heartbeat_timeout: Duration,
    pub on_exit: OnExit,
    pub takeover: bool,
    #[serde(serialize_with = "as_text")]
    pub handover_drain: Duration,
    pub inbound_capture: bool,
    pub allow_empty_config: bool,
    /// How long a SIGTERM drain waits for proxied connections.
    #[serde(serialize_with = "as_text")]
    pub drain: Duration,
    /// An external ADS server; `None`: the embedded control plane.
    pub xds_address: Option<String>,
    pub xds_listen: SocketAddr,
    /// The embedded control plane's Unix socket (resolved from `--pin-path` by default).
    pub xds_socket: PathBuf,
    /// The token's file; the token itself is read by the wiring and never shown.
    pub xds_token_file: Option<PathBuf>,
    pub xds_mode: crate::proxy::xds::client::Mode,
    pub xds_on_demand: bool,
    #[serde(serialize_with = "as_text")]
    pub xds_on_demand_timeout: Duration,
    /// `--node-name`, else the host name.
    pub node_name: String,
    pub trust_domain: String,
    /// The embedded CA's folder; `None`: an in-memory root (or `ca_address`).
    pub ca_dir: Option<PathBuf>,
    /// Where the embedded CA serves other nodes (TLS), and its certificate's names.
    pub ca_listen: Option<SocketAddr>,
    pub ca_server_names: Vec<String>,
    /// An external CA; `None`: the embedded one.
    pub ca_address: Option<String>,
    /// The token's file (the token is read by the wiring and never shown).
    pub ca_token_file: Option<PathBuf>,
    /// The external CA's TLS: the roots, the name checked, or plaintext (opted in).
    pub ca_root_cert: Option<PathBuf>,
    pub ca_server_name: Option<String>,
    pub ca_plaintext: bool,
    pub ca_node_tokens: Option<PathBuf>,
    /// Kubernetes callers of the embedded CA: their tokens' audience.
    pub ca_k8s_audience: String,
    /// Kubernetes callers' ServiceAccount (namespace, name); `None`: this agent's own.
    pub ca_k8s_service_account: Option<(String, String)>,
    #[serde(serialize_with = "as_text")]
    pub workload_cert_ttl: Duration,
    pub access_log: AccessLogTarget,
    /// Istio's standard series are recorded (`--telemetry on`).
    pub telemetry: bool,
    /// The OTLP/gRPC receiver of spans; `None`: tracing is off.
    pub trace_otlp: Option<String>,
    pub trace_sampling: f64,
    /// The L7 engine's downstream HTTP/1.1 codec.
    pub l7_h1_server: H1Server,
    /// The L7 engine's downstream HTTP/2 server.
    pub l7_h2_server: H2Server,
}

/// The source of workloads and services, with what it reads.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SourceConfig {
    /// The standalone file declares everything.
    File {
        path: PathBuf,
        #[serde(skip)]
        file: MeshFile,
    },
    /// The API server; the optional file holds `exclude:` only.
    Kubernetes {
        exclude_file: Option<PathBuf>,
        #[serde(skip)]
        file: MeshFile,
        kubeconfig: Option<PathBuf>,
        kubepods_cgroup: Option<PathBuf>,
        trust_domain: String,
    },
}

impl SourceConfig {
    /// The file as loaded (empty for Kubernetes without one).
    pub fn file(&self) -> &MeshFile {
        match self {
            SourceConfig::File { file, .. } | SourceConfig::Kubernetes { file, .. } => file,
        }
    }

    pub fn is_kubernetes(&self) -> bool {
        matches!(self, SourceConfig::Kubernetes { .. })
    }
}

fn as_text<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{d:?}"))
}

impl RunConfig {
    /// Checks and resolves the flags; every problem at once. A file that cannot be loaded
    /// keeps its own error (path, line, field) when it is the only problem.
    pub fn from_args(args: RunArgs) -> Result<RunConfig, ConfigError> {
        let mut problems: Vec<ConfigError> = Vec::new();
        let host_ips = args.host_ips.as_deref().unwrap_or("");
        let proxy_redirect = match args.proxy_redirect {
            Some(Redirect4::Addr(a)) => a,
            Some(Redirect4::Auto(port)) => {
                let port = port.unwrap_or(args.proxy_address.port());
                match pick_host_ip4(host_ips) {
                    Ok(Some(ip)) => SocketAddrV4::new(ip, port),
                    Ok(None) => {
                        problems.push(ConfigError::Invalid(format!(
                            "--proxy-redirect auto: no IPv4 address of this node in --host-ips \
                             (MESH_HOST_IPS) {host_ips:?}: IPv4 connections are sent to one \
                             (IPv6-only nodes are not supported). Kubernetes: MESH_HOST_IPS \
                             from status.hostIPs, all of the node's addresses"
                        )));
                        args.proxy_address
                    }
                    Err(e) => {
                        problems.push(ConfigError::Invalid(format!("--proxy-redirect auto: {e}")));
                        args.proxy_address
                    }
                }
            }
            None if args.proxy_address.ip().is_unspecified() => {
                problems.push(ConfigError::Invalid(
                    "--proxy-redirect is required when --proxy-address listens on 0.0.0.0: pods \
                     must be sent to an address of this node they can reach"
                        .into(),
                ));
                args.proxy_address
            }
            None => args.proxy_address,
        };
        let (proxy_redirect6, ipv6_capture) = match args.proxy_redirect6 {
            None | Some(Redirect6::Off) => (None, Ipv6Capture::Off),
            Some(Redirect6::Addr(a)) => {
                // The datapath rewrites IPv6 connects to exactly this address, and the
                // proxy listens on it: it must be one address of this node pods reach.
                let why = redirect6_unfit(a.ip()).or((a.port() == 0).then_some("has port 0"));
                if let Some(why) = why {
                    problems.push(ConfigError::Invalid(format!("--proxy-redirect6 {a} {why}")));
                }
                (Some(a), Ipv6Capture::Given)
            }
            Some(Redirect6::Auto(port)) => match pick_host_ip6(host_ips) {
                Ok(Some(ip)) => {
                    let port = port.unwrap_or(proxy_redirect.port());
                    (Some(SocketAddrV6::new(ip, port, 0, 0)), Ipv6Capture::Auto)
                }
                Ok(None) => (None, Ipv6Capture::NoHostAddress(host_ips.to_owned())),
                Err(e) => {
                    problems.push(ConfigError::Invalid(format!("--proxy-redirect6 auto: {e}")));
                    (None, Ipv6Capture::Off)
                }
            },
        };
        let node_name = args.node_name.clone().filter(|n| !n.is_empty());
        if let Some(a) = &args.ca_address {
            match a.split_once("://").map(|(s, _)| s) {
                Some("https") => {
                    if args.ca_root_cert.is_none() {
                        problems.push(ConfigError::Invalid(format!(
                            "--ca-address {a:?} needs --ca-root-cert: the root its TLS \
                             certificate must chain to (istiod: the istio-ca-root-cert ConfigMap)"
                        )));
                    }
                }
                Some("http") if args.ca_plaintext => {}
                Some("http") => problems.push(ConfigError::Invalid(format!(
                    "--ca-address {a:?}: plaintext sends this node's bearer token in the clear; \
                     use https://HOST:PORT with --ca-root-cert, or opt in with --ca-plaintext"
                ))),
                _ => problems.push(ConfigError::Invalid(format!(
                    "--ca-address {a:?}: expected https://HOST:PORT"
                ))),
            }
            if args.ca_token_file.is_none() {
                problems.push(ConfigError::Invalid(
                    "--ca-address needs --ca-token-file: the CA knows nodes by their token".into(),
                ));
            }
            if args.ca.ca_dir.is_some()
                || args.ca.ca_node_tokens.is_some()
                || args.ca.ca_listen.is_some()
            {
                problems.push(ConfigError::Invalid(
                    "--ca-dir, --ca-listen and --ca-node-tokens configure the embedded CA, which \
                     does not run with --ca-address"
                        .into(),
                ));
            }
        } else if args.ca_root_cert.is_some() || args.ca_server_name.is_some() || args.ca_plaintext
        {
            problems.push(ConfigError::Invalid(
                "--ca-root-cert, --ca-server-name and --ca-plaintext are for --ca-address".into(),
            ));
        }
        let ca_k8s_service_account = args.ca.check(&mut problems);
        if args.flows_capacity < MIN_FLOWS_CAPACITY {
            problems.push(ConfigError::Invalid(format!(
                "--flows-capacity {}: at least {MIN_FLOWS_CAPACITY}",
                args.flows_capacity
            )));
        }
        if args.sockhash_capacity < 2 {
            problems.push(ConfigError::Invalid(format!(
                "--sockhash-capacity {}: at least 2 (two sockets per pair)",
                args.sockhash_capacity
            )));
        }
        if args.workload_cert_ttl < Duration::from_secs(MIN_WORKLOAD_CERT_TTL_S) {
            problems.push(ConfigError::Invalid(format!(
                "--workload-cert-ttl {:?}: at least {MIN_WORKLOAD_CERT_TTL_S}s",
                args.workload_cert_ttl
            )));
        }
        let source = match (args.source, args.config.clone()) {
            (Source::File, Some(path)) => match MeshFile::load(&path) {
                Ok(file) => Some(SourceConfig::File { path, file }),
                Err(e) => {
                    problems.push(e);
                    None
                }
            },
            (Source::File, None) => {
                problems.push(ConfigError::Invalid(
                    "--config (MESH_CONFIG) is required with --source file".into(),
                ));
                None
            }
            (Source::Kubernetes, exclude_file) => {
                if node_name.is_none() {
                    problems.push(ConfigError::Invalid(
                        "--node-name (MESH_NODE_NAME) is required with --source kubernetes: \
                         set it from the downward API (spec.nodeName)"
                            .into(),
                    ));
                }
                let file = match &exclude_file {
                    Some(path) => match MeshFile::load(path) {
                        Ok(f)
                            if !f.namespaces.is_empty()
                                || !f.workloads.is_empty()
                                || !f.services.is_empty() =>
                        {
                            problems.push(ConfigError::Invalid(format!(
                                "{}: with --source kubernetes the file may hold only `exclude:`; \
                                 namespaces, workloads and services come from the API server",
                                path.display()
                            )));
                            None
                        }
                        Ok(f) => Some(f),
                        Err(e) => {
                            problems.push(e);
                            None
                        }
                    },
                    None => Some(MeshFile::default()),
                };
                file.map(|file| SourceConfig::Kubernetes {
                    exclude_file,
                    file,
                    kubeconfig: args.kubeconfig.clone(),
                    kubepods_cgroup: args.kubepods_cgroup.clone(),
                    trust_domain: args.trust_domain.clone(),
                })
            }
        };
        let source = match (source, problems.len()) {
            (Some(s), 0) => s,
            (_, 1) => return Err(problems.remove(0)),
            _ => {
                let all: Vec<String> = problems.iter().map(ToString::to_string).collect();
                return Err(ConfigError::Invalid(all.join("; ")));
            }
        };
        let xds_socket = args.xds_socket.clone().unwrap_or_else(|| {
            // Unique per pin folder, like the node lock.
            let name = args
                .pin_path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "mesh".into());
            Path::new("/run/mesh-agent").join(name).join("xds.sock")
        });
        Ok(RunConfig {
            source,
            pin_path: args.pin_path,
            cgroup: args.cgroup,
            proxy_address: args.proxy_address,
            proxy_redirect,
            proxy_redirect6,
            ipv6_capture,
            admin_address: args.admin_address,
            skmsg: args.skmsg,
            skmsg_upstream: args.skmsg_upstream,
            kernel_relay: args.kernel_relay != KernelRelay::Off,
            kernel_relay_egress: args.kernel_relay == KernelRelay::Egress,
            proxy_workers: match args.proxy_workers {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => usize::from(n),
            },
            skmsg_queue_floor: args.skmsg_queue_floor,
            flows_capacity: args.flows_capacity,
            sockhash_capacity: args.sockhash_capacity,
            netns_cookie: args.netns_cookie,
            skmsg_unbounded_pairing: args.skmsg_unbounded_pairing,
            assume_missing_feature: args.assume_missing_feature,
            reload_interval: Duration::from_millis(args.reload_interval_ms),
            proxy_heartbeat_timeout: Duration::from_millis(args.proxy_heartbeat_timeout_ms),
            on_exit: args.on_exit,
            takeover: args.takeover,
            handover_drain: Duration::from_millis(args.handover_drain_ms),
            inbound_capture: args.inbound_capture,
            allow_empty_config: args.allow_empty_config,
            drain: Duration::from_millis(args.drain_ms),
            xds_address: args.xds_address,
            xds_listen: args.xds_listen,
            xds_socket,
            xds_token_file: args.xds_token_file,
            xds_mode: args.xds_mode,
            xds_on_demand: args.xds_on_demand,
            xds_on_demand_timeout: Duration::from_millis(args.xds_on_demand_timeout_ms),
            node_name: node_name.unwrap_or_else(hostname),
            trust_domain: args.trust_domain,
            ca_dir: args.ca.ca_dir,
            ca_listen: args.ca.ca_listen,
            ca_server_names: args.ca.ca_server_names,
            ca_address: args.ca_address,
            ca_token_file: args.ca_token_file,
            ca_root_cert: args.ca_root_cert,
            ca_server_name: args.ca_server_name,
            ca_plaintext: args.ca_plaintext,
            ca_node_tokens: args.ca.ca_node_tokens,
            ca_k8s_audience: args.ca.ca_k8s_audience,
            ca_k8s_service_account,
            workload_cert_ttl: args.workload_cert_ttl,
            access_log: args.access_log,
            telemetry: args.telemetry == OnOff::On,
            trace_otlp: args.trace_otlp,
            trace_sampling: args.trace_sampling,
            l7_h1_server: args.l7_h1_server,
            l7_h2_server: args.l7_h2_server,
        })
    }

    /// Whether the agent runs the embedded control plane (no `--xds-address`).
    pub fn embedded_control_plane(&self) -> bool {
        self.xds_address.is_none()
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "mesh-agent".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_relay_takes_true_false_or_egress() {
        use super::{parse_kernel_relay, KernelRelay};
        assert_eq!(parse_kernel_relay("false"), Ok(KernelRelay::Off));
        assert_eq!(parse_kernel_relay("true"), Ok(KernelRelay::Ingress));
        assert_eq!(parse_kernel_relay("egress"), Ok(KernelRelay::Egress));
        assert!(parse_kernel_relay("ingress").is_err());
    }

    use clap::Parser;

    use super::*;

    #[derive(clap::Parser)]
    struct T {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<RunConfig, String> {
        let t = T::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        RunConfig::from_args(t.run).map_err(|e| e.to_string())
    }

    /// A file under the temp folder, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, text: &str) -> TempFile {
            let p = std::env::temp_dir().join(format!("mesh-config-{}-{name}", std::process::id()));
            std::fs::write(&p, text).unwrap();
            TempFile(p)
        }
        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn flags_resolve_into_typed_settings() {
        let f = TempFile::new("typed.yaml", "");
        let c = parse(&[
            "--config",
            f.path(),
            "--proxy-address",
            "10.1.0.1:15001",
            "--drain-ms",
            "2500",
            "--handover-drain-ms",
            "100",
            "--pin-path",
            "/sys/fs/bpf/mesh-n3",
            "--node-name",
            "n3",
        ])
        .unwrap();
        assert_eq!(c.proxy_redirect, "10.1.0.1:15001".parse().unwrap());
        assert_eq!(c.drain, Duration::from_millis(2500));
        assert_eq!(c.handover_drain, Duration::from_millis(100));
        assert_eq!(
            c.reload_interval,
            Duration::from_millis(DEFAULT_RELOAD_INTERVAL_MS)
        );
        assert_eq!(
            c.xds_socket,
            Path::new("/run/mesh-agent/mesh-n3/xds.sock"),
            "one socket per pin folder"
        );
        assert_eq!(c.node_name, "n3");
        assert!(c.embedded_control_plane());
        assert!(matches!(&c.source, SourceConfig::File { path, .. } if path == &f.0));
        // `/config` shows durations as text and the source with its file's path.
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["drain"], "2.5s", "{json}");
        assert_eq!(json["source"]["kind"], "file", "{json}");
        assert_eq!(json["source"]["path"], f.path(), "{json}");
        assert_eq!(json["xds_socket"], "/run/mesh-agent/mesh-n3/xds.sock");
    }

    #[test]
    fn an_explicit_redirect_and_socket_win() {
        let f = TempFile::new("explicit.yaml", "");
        let c = parse(&[
            "--config",
            f.path(),
            "--proxy-redirect",
            "10.1.0.1:15001",
            "--xds-socket",
            "/tmp/x.sock",
            "--xds-address",
            "http://cp:15010",
        ])
        .unwrap();
        assert_eq!(c.proxy_address, DEFAULT_PROXY_ADDRESS.parse().unwrap());
        assert_eq!(c.proxy_redirect, "10.1.0.1:15001".parse().unwrap());
        assert_eq!(c.xds_socket, Path::new("/tmp/x.sock"));
        assert!(!c.embedded_control_plane());
        assert!(!c.node_name.is_empty(), "the host name by default");
    }

    #[test]
    fn the_ipv6_redirect_is_off_by_default_and_must_be_a_node_address() {
        let f = TempFile::new("redirect6.yaml", "");
        let c = |extra: &[&str]| {
            let mut args = vec!["--config", f.path(), "--proxy-address", "10.1.0.1:15001"];
            args.extend_from_slice(extra);
            parse(&args).map(|c| c.proxy_redirect6)
        };
        assert_eq!(c(&[]).unwrap(), None);
        assert_eq!(
            c(&["--proxy-redirect6", "[fd00:201::1]:15001"]).unwrap(),
            Some("[fd00:201::1]:15001".parse().unwrap())
        );
        for (bad, why) in [
            ("[::]:15001", "unspecified"),
            ("[::1]:15001", "loopback"),
            ("[fe80::1]:15001", "link-local"),
            ("[::ffff:10.1.0.1]:15001", "IPv4-mapped"),
            ("[fd00:201::1]:0", "port 0"),
        ] {
            let e = c(&["--proxy-redirect6", bad]).unwrap_err().to_string();
            assert!(
                e.contains("--proxy-redirect6") && e.contains(why),
                "{bad}: {e}"
            );
        }
        assert!(
            c(&["--proxy-redirect6", "fd00:201::1"]).is_err(),
            "a port is required"
        );
    }

    #[test]
    fn the_ipv6_redirect_syntax_is_off_auto_auto_port_or_an_address() {
        assert_eq!(parse_redirect6("off"), Ok(Redirect6::Off));
        assert_eq!(parse_redirect6(""), Ok(Redirect6::Off));
        assert_eq!(parse_redirect6("auto"), Ok(Redirect6::Auto(None)));
        assert_eq!(
            parse_redirect6("auto:15006"),
            Ok(Redirect6::Auto(Some(15006)))
        );
        assert_eq!(
            parse_redirect6("[fd00::1]:15001"),
            Ok(Redirect6::Addr("[fd00::1]:15001".parse().unwrap()))
        );
        refused(
            parse_redirect6,
            &[
                ("auto:0", "port 0"),
                ("auto:x", "is not a port"),
                ("auto:70000", "is not a port"),
                ("fd00::1", "expected off, auto, auto:PORT or [IPv6]:PORT"),
                ("10.0.0.1:15001", "expected off, auto"),
                ("on", "expected off, auto"),
            ],
        );
    }

    /// Each of `cases` (text, why) is refused by `parse` with a message naming the text
    /// and saying why.
    fn refused<T: std::fmt::Debug>(parse: fn(&str) -> Result<T, String>, cases: &[(&str, &str)]) {
        for (bad, why) in cases {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn auto_picks_the_first_fit_ipv6_host_address() {
        let ip = |s: &str| Some(s.parse::<Ipv6Addr>().unwrap());
        // status.hostIPs of a dual-stack node, either order.
        assert_eq!(pick_host_ip6("10.0.0.5,fd00:10::5"), Ok(ip("fd00:10::5")));
        assert_eq!(
            pick_host_ip6("2001:db8::5, 10.0.0.5"),
            Ok(ip("2001:db8::5"))
        );
        // Single-stack IPv4 (or status.hostIP of an IPv4-primary node), or nothing: none.
        assert_eq!(pick_host_ip6("10.0.0.5"), Ok(None));
        assert_eq!(pick_host_ip6(""), Ok(None));
        // Addresses pods cannot be sent to are passed over.
        assert_eq!(
            pick_host_ip6("fe80::1,::1,::ffff:10.0.0.5,fd00:10::5"),
            Ok(ip("fd00:10::5"))
        );
        assert_eq!(pick_host_ip6("fe80::1"), Ok(None));
        let e = pick_host_ip6("10.0.0.5,node-a").unwrap_err();
        assert!(e.contains("\"node-a\" is not an IP address"), "{e}");
    }

    #[test]
    fn the_ipv4_redirect_syntax_is_auto_auto_port_or_an_address() {
        for (text, want) in [
            ("auto", Redirect4::Auto(None)),
            (" auto:15006", Redirect4::Auto(Some(15006))),
            (
                "10.0.0.1:15001",
                Redirect4::Addr("10.0.0.1:15001".parse().unwrap()),
            ),
        ] {
            assert_eq!(parse_redirect4(text), Ok(want), "{text}");
            assert_eq!(parse_redirect4(&want.to_string()), Ok(want), "{want}");
        }
        refused(
            parse_redirect4,
            &[
                ("auto:0", "port 0"),
                ("auto:x", "is not a port"),
                ("10.0.0.1", "expected auto, auto:PORT or IPv4:PORT"),
                ("off", "expected auto"),
                // What `$(HOST_IP):15001` becomes on an IPv6-primary node.
                ("[fd00:10::5]:15001", "IPv6-primary node: use auto"),
            ],
        );
    }

    #[test]
    fn auto_picks_the_first_fit_ipv4_host_address() {
        let ip = |s: &str| Some(s.parse::<Ipv4Addr>().unwrap());
        // status.hostIPs of a dual-stack node, IPv6-primary or IPv4-primary.
        assert_eq!(pick_host_ip4("fd00:10::5,10.0.0.5"), Ok(ip("10.0.0.5")));
        assert_eq!(pick_host_ip4("10.0.0.5, fd00:10::5"), Ok(ip("10.0.0.5")));
        // IPv6 only, or nothing: none.
        assert_eq!(pick_host_ip4("fd00:10::5"), Ok(None));
        assert_eq!(pick_host_ip4(""), Ok(None));
        // Addresses pods cannot be sent to are passed over.
        assert_eq!(
            pick_host_ip4("0.0.0.0,127.0.0.1,169.254.1.1,224.0.0.1,255.255.255.255,10.0.0.5"),
            Ok(ip("10.0.0.5"))
        );
        let e = pick_host_ip4("10.0.0.5,node-a").unwrap_err();
        assert!(e.contains("\"node-a\" is not an IP address"), "{e}");
    }

    #[test]
    fn ipv4_auto_resolves_against_the_host_addresses_and_the_listener_port() {
        let f = TempFile::new("redirect4-auto.yaml", "");
        let c = |extra: &[&str]| {
            let mut args = vec!["--config", f.path()];
            args.extend_from_slice(extra);
            parse(&args).map(|c| (c.proxy_redirect, c.proxy_redirect6))
        };
        // The chart's settings on an IPv6-primary dual-stack node (status.hostIPs lists
        // the IPv6 address first): each family gets its own address.
        let chart = [
            "--proxy-address",
            "0.0.0.0:15001",
            "--proxy-redirect",
            "auto",
            "--proxy-redirect6",
            "auto",
            "--host-ips",
            "fd00:201::1,10.1.0.1",
        ];
        assert_eq!(
            c(&chart).unwrap(),
            (
                "10.1.0.1:15001".parse().unwrap(),
                Some("[fd00:201::1]:15001".parse().unwrap())
            )
        );
        // auto:PORT, and IPv6's auto follows the IPv4 redirect's port.
        assert_eq!(
            c(&[
                "--proxy-redirect",
                "auto:15009",
                "--proxy-redirect6",
                "auto",
                "--host-ips",
                "10.1.0.1,fd00:201::1"
            ])
            .unwrap(),
            (
                "10.1.0.1:15009".parse().unwrap(),
                Some("[fd00:201::1]:15009".parse().unwrap())
            )
        );
        // No IPv4 address of the node: refused, saying why.
        let e = c(&["--proxy-redirect", "auto", "--host-ips", "fd00:201::1"]).unwrap_err();
        assert!(
            e.contains("--proxy-redirect auto: no IPv4 address") && e.contains("fd00:201::1"),
            "{e}"
        );
        let e = c(&["--proxy-redirect", "auto"]).unwrap_err();
        assert!(e.contains("no IPv4 address"), "{e}");
        let e = c(&["--proxy-redirect", "auto", "--host-ips", "bogus"]).unwrap_err();
        assert!(
            e.contains("--proxy-redirect auto") && e.contains("MESH_HOST_IPS"),
            "{e}"
        );
    }

    #[test]
    fn auto_resolves_against_the_host_addresses_and_the_ipv4_port() {
        let f = TempFile::new("redirect6-auto.yaml", "");
        let c = |extra: &[&str]| {
            let mut args = vec!["--config", f.path(), "--proxy-address", "10.1.0.1:15001"];
            args.extend_from_slice(extra);
            parse(&args).map(|c| (c.proxy_redirect6, c.ipv6_capture))
        };
        let auto = ["--proxy-redirect6", "auto"];
        assert_eq!(
            c(&[&auto[..], &["--host-ips", "10.1.0.1,fd00:201::1"]].concat()).unwrap(),
            (
                Some("[fd00:201::1]:15001".parse().unwrap()),
                Ipv6Capture::Auto
            )
        );
        assert_eq!(
            c(&[
                "--proxy-redirect6",
                "auto:15007",
                "--host-ips",
                "fd00:201::1"
            ])
            .unwrap(),
            (
                Some("[fd00:201::1]:15007".parse().unwrap()),
                Ipv6Capture::Auto
            )
        );
        // No IPv6 address of the node: not captured, and said so.
        assert_eq!(
            c(&[&auto[..], &["--host-ips", "10.1.0.1"]].concat()).unwrap(),
            (None, Ipv6Capture::NoHostAddress("10.1.0.1".into()))
        );
        assert_eq!(
            c(&auto).unwrap(),
            (None, Ipv6Capture::NoHostAddress(String::new()))
        );
        let e = c(&[&auto[..], &["--host-ips", "10.1.0.1,bogus"]].concat()).unwrap_err();
        assert!(
            e.contains("--proxy-redirect6 auto") && e.contains("MESH_HOST_IPS"),
            "{e}"
        );
        assert_eq!(
            c(&["--proxy-redirect6", "off", "--host-ips", "fd00:201::1"]).unwrap(),
            (None, Ipv6Capture::Off)
        );
    }

    #[test]
    fn the_access_log_is_off_by_default_and_takes_a_stream_or_a_path() {
        let f = TempFile::new("accesslog.yaml", "");
        let c = |extra: &[&str]| {
            let mut args = vec!["--config", f.path(), "--proxy-address", "10.1.0.1:15001"];
            args.extend_from_slice(extra);
            parse(&args).map(|c| c.access_log)
        };
        assert_eq!(c(&[]).unwrap(), AccessLogTarget::Off);
        assert_eq!(c(&["--access-log", "off"]).unwrap(), AccessLogTarget::Off);
        assert_eq!(
            c(&["--access-log", "stderr"]).unwrap(),
            AccessLogTarget::Stderr
        );
        assert_eq!(
            c(&["--access-log", "/var/log/mesh/access.log"]).unwrap(),
            AccessLogTarget::File("/var/log/mesh/access.log".into())
        );
        assert!(c(&["--access-log", ""]).is_err());
    }

    #[test]
    fn tracing_is_off_by_default_and_its_flags_are_checked() {
        let f = TempFile::new("trace.yaml", "");
        let c = |extra: &[&str]| {
            let mut args = vec!["--config", f.path(), "--proxy-address", "10.1.0.1:15001"];
            args.extend_from_slice(extra);
            parse(&args).map(|c| (c.trace_otlp, c.trace_sampling))
        };
        assert_eq!(c(&[]).unwrap(), (None, DEFAULT_TRACE_SAMPLING));
        assert_eq!(
            c(&[
                "--trace-otlp",
                "http://127.0.0.1:4317",
                "--trace-sampling",
                "1"
            ])
            .unwrap(),
            (Some("http://127.0.0.1:4317".into()), 1.0)
        );
        for bad in [
            &["--trace-otlp", "127.0.0.1:4317"][..],
            &["--trace-otlp", "https://collector:4317"],
            &["--trace-otlp", "http://"],
            &["--trace-sampling", "1.5"],
            &["--trace-sampling", "-0.1"],
            &["--trace-sampling", "NaN"],
        ] {
            assert!(c(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bad_combinations_are_named_and_reported_together() {
        // One problem: its own message.
        let e = parse(&[
            "--config",
            "/nonexistent/mesh.yaml",
            "--proxy-address",
            "10.1.0.1:1",
        ])
        .unwrap_err();
        assert!(
            e.starts_with("cannot read config file /nonexistent/mesh.yaml"),
            "{e}"
        );
        let e = parse(&["--proxy-address", "10.1.0.1:1"]).unwrap_err();
        assert_eq!(e, "--config (MESH_CONFIG) is required with --source file");
        let f = TempFile::new("redirect.yaml", "");
        let e = parse(&["--config", f.path()]).unwrap_err();
        assert!(e.starts_with("--proxy-redirect is required"), "{e}");
        // Several: all of them, in one error.
        let e = parse(&[]).unwrap_err();
        assert!(
            e.contains("--proxy-redirect is required") && e.contains("--config"),
            "{e}"
        );
        let e = parse(&["--source", "kubernetes"]).unwrap_err();
        assert!(
            e.contains("--node-name") && e.contains("--proxy-redirect"),
            "{e}"
        );
        let e = parse(&[
            "--source",
            "kubernetes",
            "--node-name",
            "",
            "--proxy-address",
            "10.1.0.1:1",
        ])
        .unwrap_err();
        assert!(e.contains("--node-name"), "an empty name is no name: {e}");
        // Kubernetes: the file may hold exclusions only.
        let full = TempFile::new("full.yaml", "namespaces:\n  - name: shop\n");
        let e = parse(&[
            "--source",
            "kubernetes",
            "--node-name",
            "n1",
            "--proxy-address",
            "10.1.0.1:1",
            "--config",
            full.path(),
        ])
        .unwrap_err();
        assert!(e.contains("may hold only `exclude:`"), "{e}");
    }

    #[test]
    fn identity_flags_resolve_and_conflicts_are_named() {
        let f = TempFile::new("ca.yaml", "");
        let base = ["--config", f.path(), "--proxy-address", "10.1.0.1:1"];
        let c = parse(&base).unwrap();
        assert_eq!(c.workload_cert_ttl, Duration::from_secs(24 * 3600));
        assert_eq!(c.trust_domain, DEFAULT_TRUST_DOMAIN);
        assert!(c.ca_address.is_none() && c.ca_dir.is_none());
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["workload_cert_ttl"], "86400s", "{json}");
        let with = |more: &[&str]| {
            let mut a = base.to_vec();
            a.extend_from_slice(more);
            parse(&a)
        };
        let c = with(&[
            "--workload-cert-ttl",
            "90m",
            "--ca-dir",
            "/var/lib/mesh-agent/ca",
            "--trust-domain",
            "example.org",
        ])
        .unwrap();
        assert_eq!(c.workload_cert_ttl, Duration::from_secs(5400));
        assert_eq!(
            c.ca_dir.as_deref(),
            Some(Path::new("/var/lib/mesh-agent/ca"))
        );
        assert_eq!(c.trust_domain, "example.org");
        let c = with(&[
            "--ca-address",
            "https://istiod.istio-system.svc:15012",
            "--ca-token-file",
            "/t",
            "--ca-root-cert",
            "/r.pem",
        ])
        .unwrap();
        assert_eq!(
            c.ca_address.as_deref(),
            Some("https://istiod.istio-system.svc:15012")
        );
        assert!(!c.ca_plaintext);
        // Plaintext only when asked for.
        let e = with(&[
            "--ca-address",
            "http://10.0.0.1:15010",
            "--ca-token-file",
            "/t",
        ])
        .unwrap_err();
        assert!(e.contains("--ca-plaintext"), "{e}");
        let c = with(&[
            "--ca-address",
            "http://10.0.0.1:15010",
            "--ca-token-file",
            "/t",
            "--ca-plaintext",
        ])
        .unwrap();
        assert!(c.ca_plaintext);
        let e = with(&[
            "--ca-address",
            "https://ca:15012",
            "--ca-dir",
            "/x",
            "--ca-listen",
            "0.0.0.0:15012",
        ])
        .unwrap_err();
        assert!(
            e.contains("needs --ca-root-cert")
                && e.contains("--ca-token-file")
                && e.contains("does not run"),
            "{e}"
        );
        assert!(with(&["--ca-address", "ftp://ca", "--ca-token-file", "/t"])
            .unwrap_err()
            .contains("expected https://"));
        assert!(with(&["--ca-root-cert", "/r.pem"])
            .unwrap_err()
            .contains("are for --ca-address"));
        // The embedded CA's endpoint.
        let c = with(&[
            "--ca-listen",
            "10.0.0.1:15012",
            "--ca-server-names",
            "ca.mesh.svc,10.0.0.1",
        ])
        .unwrap();
        assert_eq!(c.ca_listen, Some("10.0.0.1:15012".parse().unwrap()));
        assert_eq!(c.ca_server_names, vec!["ca.mesh.svc", "10.0.0.1"]);
        assert!(with(&["--ca-server-names", "a"])
            .unwrap_err()
            .contains("--ca-listen, which is not set"));
        assert!(with(&["--ca-node-tokens", "/t"])
            .unwrap_err()
            .contains("without --ca-listen"));
        assert!(with(&["--workload-cert-ttl", "5s"])
            .unwrap_err()
            .contains("at least 10s"));
        assert!(with(&["--workload-cert-ttl", "1w"]).is_err());
        assert!(with(&["--workload-cert-ttl", "h"]).is_err());
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        // Kubernetes callers of the embedded CA.
        assert_eq!(c.ca_k8s_audience, DEFAULT_CA_K8S_AUDIENCE);
        assert_eq!(c.ca_k8s_service_account, None);
        let c = with(&[
            "--ca-k8s-audience",
            "mesh-ca",
            "--ca-k8s-service-account",
            "mesh-system/mesh-agent",
        ])
        .unwrap();
        assert_eq!(c.ca_k8s_audience, "mesh-ca");
        assert_eq!(
            c.ca_k8s_service_account,
            Some(("mesh-system".into(), "mesh-agent".into()))
        );
        for bad in ["mesh-agent", "/x", "x/", "a/b/c"] {
            let e = with(&["--ca-k8s-service-account", bad]).unwrap_err();
            assert!(e.contains("expected NAMESPACE/NAME"), "{bad}: {e}");
        }
        assert!(with(&["--ca-k8s-audience", ""]).is_err());
    }

    #[test]
    fn kubernetes_without_a_file_has_an_empty_one() {
        let c = parse(&[
            "--source",
            "kubernetes",
            "--node-name",
            "n1",
            "--proxy-address",
            "10.1.0.1:1",
        ])
        .unwrap();
        assert!(c.source.is_kubernetes());
        assert_eq!(c.source.file(), &MeshFile::default());
        assert_eq!(c.node_name, "n1");
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["source"]["kind"], "kubernetes", "{json}");
        assert_eq!(
            json["source"]["trust_domain"], DEFAULT_TRUST_DOMAIN,
            "{json}"
        );
    }
}
