//! The command line: `run`, and the inspection commands that work on the pinned maps of a
//! running agent (`maps`, `dump`, `programs`, `links`, `bypass`) or ask its admin endpoint
//! (`certs`, `inspect`, `log-level`); `ca init` writes a CA root for the embedded CA.
//! Output is a table (text for `inspect`), or JSON with `-o json`; addresses print as IPs,
//! ports in host order, flags by name, times as ages.

use crate::datapath::flags_text;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, Map, MapData, MapInfo, PerCpuArray};
use clap::{Parser, Subcommand, ValueEnum};
use mesh_common::{
    cfg_flags, flow_flags, inbound, map_names,
    maps::{
        DestInfo, ExcludeCidr, FlowInfo, InboundInfo, MeshConfig, ProxyHealth, SockKey,
        UnreadClose, WorkloadInfo,
    },
    wl_flags, Stat,
};
use serde_json::{json, Value};

use crate::config::{RunArgs, DEFAULT_PIN_PATH};

#[derive(Parser, Debug)]
#[command(
    name = "mesh-agent",
    version,
    about = "Per-node service-mesh agent: eBPF capture, node proxy, inspection"
)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info`, `mesh_agent=debug`.
    #[arg(long, env = "MESH_LOG", default_value = "info", global = true)]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent: load and attach the datapath, enrol workloads, serve the proxy.
    Run(Box<RunArgs>),
    /// List the pinned maps with their type, size and entry count.
    Maps(Inspect),
    /// Print the entries of one map, decoded: a pinned one, or `UNREAD_CLOSES` (not
    /// pinned: found through the agent's programs).
    Dump {
        #[command(flatten)]
        inspect: Inspect,
        /// Map name (see `mesh-agent maps`).
        map: String,
    },
    /// List the programs the agent loaded (with run counts when kernel.bpf_stats_enabled=1).
    Programs(Inspect),
    /// List the kernel links attaching the agent's programs.
    Links(Inspect),
    /// Flip the global bypass: `on` sends every new connection direct, `off` restores capture.
    Bypass {
        #[command(flatten)]
        inspect: Inspect,
        state: OnOff,
    },
    /// Serve the embedded control plane alone (no datapath, no root): ADS for any xDS
    /// client (Envoy, gRPC, other agents) from a standalone file.
    ControlPlane(ControlPlaneArgs),
    /// Subscribe to an ADS server like the node proxy (wildcard) and print how each
    /// response is judged (ACK, or NACK with the reason) as JSON lines.
    XdsWatch(XdsWatchArgs),
    /// List the workload certificates a running agent holds (from its admin endpoint):
    /// identity, serial, expiry, next renewal; `-o json` adds the chains (PEM).
    Certs(CertsArgs),
    /// Show one pod or service end to end (from the admin endpoint): enrolment and mode,
    /// netns cookie and WORKLOADS entry, identity and certificate, live connections with
    /// their path and original destination, listeners, routes, clusters and endpoints,
    /// policies, metrics. Text, or `-o json`.
    Inspect {
        #[command(subcommand)]
        object: InspectObject,
    },
    /// Show the running agent's log filter, or set it without a restart: a level
    /// (`debug`) or EnvFilter directives (`mesh_agent::proxy=debug,info`).
    LogLevel(LogLevelArgs),
    /// A live terminal inspector of the agent (from its admin endpoint, local or remote):
    /// workloads, connections with their path, services, xDS state, datapath counters and
    /// rates; Enter shows the joined view of `inspect`.
    Top(crate::top::TopArgs),
    /// Production triage of a running agent (from its admin endpoint): `profile`, a CPU
    /// profile of its threads as folded stacks (flame graph input); `heap`, the
    /// allocator's view beside the RSS (a leak or fragmentation).
    Debug {
        #[command(subcommand)]
        command: DebugCommand,
    },
    /// The embedded CA's files.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(clap::Args, Debug, Clone)]
pub struct CertsArgs {
    /// The agent's admin endpoint.
    #[arg(long, env = "MESH_ADMIN_ADDRESS", default_value = crate::config::DEFAULT_ADMIN_ADDRESS)]
    pub admin_address: std::net::SocketAddr,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Subcommand, Debug, Clone)]
pub enum InspectObject {
    /// A pod (a workload of the mesh).
    #[command(alias = "po")]
    Pod(InspectArgs),
    /// A service.
    #[command(alias = "svc")]
    Service(InspectArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct InspectArgs {
    /// NAMESPACE/NAME
    pub object: String,
    /// The agent's admin endpoint.
    #[arg(long, env = "MESH_ADMIN_ADDRESS", default_value = crate::config::DEFAULT_ADMIN_ADDRESS)]
    pub admin_address: std::net::SocketAddr,
    /// Output format (`table`: text for people).
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args, Debug, Clone)]
pub struct LogLevelArgs {
    /// The filter to set: a level (trace, debug, info, warn, error, off) or EnvFilter
    /// directives; none: print the filter in force.
    pub filter: Option<String>,
    /// The agent's admin endpoint.
    #[arg(long, env = "MESH_ADMIN_ADDRESS", default_value = crate::config::DEFAULT_ADMIN_ADDRESS)]
    pub admin_address: std::net::SocketAddr,
}

#[derive(Subcommand, Debug, Clone)]
pub enum DebugCommand {
    /// Sample the agent's threads for `--seconds` (99 Hz of each thread's CPU time) and
    /// print folded stacks (`thread;outer;...;inner count`): pipe them to
    /// `flamegraph.pl` or `inferno-flamegraph`. One profile at a time per agent.
    Profile(ProfileArgs),
    /// The allocator's statistics (in use, free, mmapped, arenas) and the RSS.
    Heap(CertsArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct ProfileArgs {
    /// How long to sample (1..=60 seconds).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=60))]
    pub seconds: u32,
    /// Write the folded stacks here instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The agent's admin endpoint.
    #[arg(long, env = "MESH_ADMIN_ADDRESS", default_value = crate::config::DEFAULT_ADMIN_ADDRESS)]
    pub admin_address: std::net::SocketAddr,
}

#[derive(Subcommand, Debug, Clone)]
pub enum CaCommand {
    /// Write a fresh root (ECDSA P-256, 10 years) in Istio's plug-in layout (ca-cert.pem,
    /// ca-key.pem, root-cert.pem, cert-chain.pem) for `run --ca-dir DIR`; give several
    /// nodes the same files and they share one root. Refuses to overwrite a CA.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = crate::config::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
}

#[derive(clap::Args, Debug, Clone)]
pub struct ControlPlaneArgs {
    /// Where services come from: the standalone file (`--config`), or the Kubernetes API
    /// server (Services, EndpointSlices, HTTPRoutes and GRPCRoutes of the whole cluster).
    #[arg(long, env = "MESH_SOURCE", value_enum, default_value = "file")]
    pub source: crate::config::Source,
    /// Standalone file (YAML): services, namespaces, workloads.
    #[arg(long, env = "MESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Kubernetes: a kubeconfig file; default: in-cluster, else `KUBECONFIG` or
    /// `~/.kube/config`.
    #[arg(long, env = "MESH_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Where ADS is served (plaintext gRPC). Without `--xds-token-file` it must be a
    /// loopback address (only the node's own processes are served).
    #[arg(long, env = "MESH_XDS_LISTEN", default_value = crate::config::DEFAULT_XDS_LISTEN)]
    pub listen: std::net::SocketAddr,
    /// A file holding the bearer token every ADS client must present
    /// (`authorization: Bearer <token>`).
    #[arg(long, env = "MESH_XDS_TOKEN_FILE")]
    pub xds_token_file: Option<PathBuf>,
    /// Optional admin endpoint: `/xds_clients` (each stream's ACKs and NACKs), `/ready`.
    #[arg(long, env = "MESH_ADMIN_ADDRESS")]
    pub admin_address: Option<std::net::SocketAddr>,
    /// File poll interval (milliseconds).
    #[arg(long, env = "MESH_RELOAD_INTERVAL_MS", default_value_t = crate::config::DEFAULT_RELOAD_INTERVAL_MS)]
    pub reload_interval_ms: u64,
    /// Serve a reloaded file that declares nothing (withdraws every resource); refused by
    /// default.
    #[arg(long, env = "MESH_ALLOW_EMPTY_CONFIG", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_empty_config: bool,
    /// Trust domain of the identities the CA signs (`spiffe://<domain>/ns/N/sa/S`).
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = crate::config::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// The CA, as the agent embeds it; served (in TLS) only with `--ca-listen`. It signs
    /// an identity for a node whose workloads run it: the file's workloads with their
    /// `node:`, or, with `--source kubernetes`, the API server's pods.
    #[command(flatten)]
    pub ca: Box<crate::config::EmbeddedCaArgs>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct XdsWatchArgs {
    /// `http://host:port` of the ADS server, or `unix:/path` of its Unix socket.
    #[arg(long, env = "MESH_XDS_ADDRESS")]
    pub xds_address: String,
    /// A file holding the bearer token to present to the server.
    #[arg(long, env = "MESH_XDS_TOKEN_FILE")]
    pub xds_token_file: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "delta")]
    pub mode: crate::proxy::xds::client::Mode,
    #[arg(long, default_value = "xds-watch")]
    pub node_id: String,
    /// Stop after this long (milliseconds); 0: run until interrupted.
    #[arg(long, default_value_t = 0)]
    pub duration_ms: u64,
}

#[derive(clap::Args, Debug)]
pub struct Inspect {
    /// Pin folder of the agent to inspect.
    #[arg(long, env = "MESH_PIN_PATH", default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

pub use crate::config::OnOff;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("no agent state at {path}: {source} (is mesh-agent running with this --pin-path?)")]
    NoPin {
        path: PathBuf,
        source: aya::maps::MapError,
    },
    #[error("map {0}: {1}")]
    Map(String, aya::maps::MapError),
    #[error("unknown map {0:?}; known maps: {1}")]
    UnknownMap(String, String),
    #[error("map {0} is socket storage: its entries belong to sockets and cannot be listed (bpftool cannot dump it either); `dump FLOWS` lists the flows")]
    Unlistable(String),
    #[error("listing {0}: {1}")]
    List(&'static str, String),
    #[error("map {0} is not pinned; it is found through the program that uses it, {1}, which is not loaded (is the agent running with this --pin-path? on a kernel before 6.9 it never loads: see /kernel)")]
    NotLoaded(&'static str, &'static str),
    #[error("admin endpoint {0}: {1} (is mesh-agent running with this --admin-address?)")]
    Admin(std::net::SocketAddr, String),
    /// The agent answered, with a refusal (unknown object, invalid filter): its message.
    #[error("{0}")]
    Refused(String),
    #[error("{0:?}: expected NAMESPACE/NAME")]
    Object(String),
    #[error(transparent)]
    Ca(#[from] crate::control::ca::CaError),
}

/// An address as the maps hold it (16 bytes, IPv4 v4-mapped), shown as IPv4 or IPv6.
fn ip(v: mesh_common::maps::Ip) -> String {
    mesh_common::maps::ip_addr(v).to_string()
}

/// `ip:port`, IPv6 in brackets.
fn ip_port(v: mesh_common::maps::Ip, port: u32) -> String {
    std::net::SocketAddr::new(mesh_common::maps::ip_addr(v), port as u16).to_string()
}

fn open(pin: &Path, name: &str) -> Result<Map, CliError> {
    let path = pin.join(name);
    let data = MapData::from_pin(&path).map_err(|source| CliError::NoPin { path, source })?;
    Map::from_map_data(data).map_err(|e| CliError::Map(name.into(), e))
}

fn hash<K: aya::Pod, V: aya::Pod>(pin: &Path, name: &str) -> Result<Vec<(K, V)>, CliError> {
    let m: HashMap<MapData, K, V> =
        HashMap::try_from(open(pin, name)?).map_err(|e| CliError::Map(name.into(), e))?;
    // Entries can vanish while we iterate (LRU, closes); skip those.
    Ok(m.iter().filter_map(Result::ok).collect())
}

/// A map that is not pinned (`UNREAD_CLOSES`), found through the agent's programs that
/// use it: this agent's, told apart from another's by their pinned maps (`own_programs`).
fn unpinned(pin: &Path, name: &'static str, program: &'static str) -> Result<Map, CliError> {
    let info = unpinned_info(pin, name)?.ok_or(CliError::NotLoaded(name, program))?;
    let data = MapData::from_id(info.id()).map_err(|e| CliError::Map(name.into(), e))?;
    Map::from_map_data(data).map_err(|e| CliError::Map(name.into(), e))
}

/// The map named `name` that one of this agent's programs uses, if any.
fn unpinned_info(pin: &Path, name: &str) -> Result<Option<MapInfo>, CliError> {
    Ok(own_programs(pin)?
        .iter()
        .flat_map(|p| p.map_ids().ok().flatten().unwrap_or_default())
        .filter_map(|id| MapInfo::from_id(id).ok())
        .find(|i| i.name_as_str() == Some(name)))
}

fn array<V: aya::Pod>(pin: &Path, name: &str) -> Result<Vec<V>, CliError> {
    let m: Array<MapData, V> =
        Array::try_from(open(pin, name)?).map_err(|e| CliError::Map(name.into(), e))?;
    Ok(m.iter().filter_map(Result::ok).collect())
}

pub fn stats(pin: &Path) -> Result<Vec<(Stat, u64)>, CliError> {
    let name = map_names::STATS;
    let m: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(open(pin, name)?).map_err(|e| CliError::Map(name.into(), e))?;
    Ok(Stat::ALL
        .iter()
        .map(|s| {
            (
                *s,
                m.get(&(*s as u32), 0).map(|v| v.iter().sum()).unwrap_or(0),
            )
        })
        .collect())
}

/// Decoded rows of a map: column names, and one JSON object per entry.
pub fn dump(pin: &Path, map: &str) -> Result<(Vec<&'static str>, Vec<Value>), CliError> {
    let key = |k: &SockKey| json!({"local": k.local().to_string(), "remote": k.remote().to_string(), "key_netns": k.netns});
    Ok(match map {
        map_names::WORKLOADS => (
            vec!["netns_cookie", "ip", "ip6", "id", "flags"],
            hash::<u64, WorkloadInfo>(pin, map)?
                .into_iter()
                .map(|(k, v)| json!({"netns_cookie": k, "ip": ip(v.ip4), "ip6": if v.ip6 == [0; 4] { "-".into() } else { ip(v.ip6) }, "id": v.id, "flags": flags_text(v.flags, &wl_flags::NAMES)}))
                .collect(),
        ),
        map_names::DESTS => (
            vec!["ip", "id", "flags", "netns_cookie"],
            hash::<mesh_common::maps::Ip, DestInfo>(pin, map)?
                .into_iter()
                .map(|(k, v)| json!({"ip": ip(k), "id": v.id, "flags": flags_text(v.flags, &wl_flags::NAMES), "netns_cookie": v.netns}))
                .collect(),
        ),
        map_names::CONFIG => (
            vec!["proxy", "proxy6", "proxy_netns", "flags", "log_level"],
            array::<MeshConfig>(pin, map)?
                .into_iter()
                .map(|c| json!({"proxy": ip_port(c.proxy_ip, c.proxy_port), "proxy6": if c.proxy_port6 == 0 { "-".into() } else { ip_port(c.proxy_ip6, c.proxy_port6) }, "proxy_netns": c.proxy_netns, "flags": flags_text(c.flags, &cfg_flags::NAMES), "log_level": mesh_common::log_level::NAMES.iter().find(|(l, _)| *l == c.log_level).map_or("?", |(_, n)| *n)}))
                .collect(),
        ),
        map_names::EXCLUDES => (
            vec!["cidr", "port"],
            array::<ExcludeCidr>(pin, map)?
                .into_iter()
                .filter(|e| e.enabled != 0)
                .map(|e| {
                    // An IPv4 rule is held v4-mapped, its length plus 96.
                    let v4 = mesh_common::v4_mapped(e.ip).is_some() && e.prefix_len >= 96;
                    let len = if v4 { e.prefix_len - 96 } else { e.prefix_len };
                    json!({"cidr": format!("{}/{len}", ip(e.ip)), "port": e.port})
                })
                .collect(),
        ),
        // Socket storage cannot be listed (the kernel has no "next key" for it): its
        // entries are read one socket at a time, by a socket fd.
        map_names::SOCK_STATE | map_names::SOCK_NETNS => {
            return Err(CliError::Unlistable(map.into()))
        }
        map_names::FLOWS => (
            vec!["key_netns", "local", "remote", "original_dst", "flags", "src_id", "dst_id", "netns_cookie"],
            hash::<SockKey, FlowInfo>(pin, map)?
                .into_iter()
                .map(|(k, v)| {
                    let mut o = key(&k);
                    o["original_dst"] = json!(v.orig_dst().to_string());
                    o["flags"] = json!(flags_text(v.flags, &flow_flags::NAMES));
                    o["src_id"] = json!(v.src_id);
                    o["dst_id"] = json!(v.dst_id);
                    o["netns_cookie"] = json!(v.netns);
                    o
                })
                .collect(),
        ),
        map_names::SOCKHASH => {
            let m: aya::maps::SockHash<MapData, SockKey> = aya::maps::SockHash::try_from(open(pin, map)?)
                .map_err(|e| CliError::Map(map.into(), e))?;
            (vec!["key_netns", "local", "remote"], m.keys().filter_map(Result::ok).map(|k| key(&k)).collect())
        }
        map_names::PROXY_HEALTH => (
            vec!["heartbeat_age_ms", "stale_after_ms"],
            array::<ProxyHealth>(pin, map)?
                .into_iter()
                .map(|h| {
                    let age = crate::sys::monotonic_ns().saturating_sub(h.heartbeat_ns);
                    json!({"heartbeat_age_ms": age / 1_000_000, "stale_after_ms": h.stale_after_ns / 1_000_000})
                })
                .collect(),
        ),
        map_names::NODE_ADDRS => (
            vec!["ip", "ifindex"],
            hash::<mesh_common::maps::Ip, u32>(pin, map)?
                .into_iter()
                .map(|(k, v)| json!({"ip": ip(k), "ifindex": v}))
                .collect(),
        ),
        // Keyed by the plain IPv4 address (`u32::from_ne_bytes(octets)`).
        map_names::INBOUND => (
            vec!["ip", "flags"],
            hash::<u32, InboundInfo>(pin, map)?
                .into_iter()
                .map(|(k, v)| json!({"ip": std::net::Ipv4Addr::from(k.to_ne_bytes()).to_string(), "flags": flags_text(v.flags, &inbound::NAMES)}))
                .collect(),
        ),
        map_names::INBOUND6 => (
            vec!["ip", "flags"],
            hash::<mesh_common::maps::Ip, InboundInfo>(pin, map)?
                .into_iter()
                .map(|(k, v)| json!({"ip": ip(k), "flags": flags_text(v.flags, &inbound::NAMES)}))
                .collect(),
        ),
        // Not pinned (its entries live for milliseconds: the proxy takes each at the FIN
        // that follows the close): reached through `mesh_close_unread`. An entry still
        // listed is one no proxy socket read (a direct-mode pair, whose FIN TC ingress
        // turned into an RST and left the entry for retransmissions; another program's).
        map_names::UNREAD_CLOSES => {
            let name = map_names::UNREAD_CLOSES;
            let m: HashMap<MapData, SockKey, UnreadClose> =
                HashMap::try_from(unpinned(pin, name, mesh_common::prog_names::CLOSE_UNREAD)?)
                    .map_err(|e| CliError::Map(name.into(), e))?;
            let now = crate::sys::monotonic_ns();
            (
                vec!["key_netns", "local", "remote", "unread_bytes", "age_ms"],
                m.iter()
                    .filter_map(Result::ok)
                    .map(|(k, v)| {
                        let mut o = key(&k);
                        o["unread_bytes"] = json!(v.unread);
                        o["age_ms"] = json!(now.saturating_sub(v.at_ns) / 1_000_000);
                        o
                    })
                    .collect(),
            )
        }
        map_names::NETNS_PROBE => (
            vec!["socket_cookie", "netns_cookie"],
            hash::<u64, u64>(pin, map)?
                .into_iter()
                .map(|(k, v)| json!({"socket_cookie": k, "netns_cookie": v}))
                .collect(),
        ),
        map_names::STATS => (
            vec!["event", "count"],
            stats(pin)?.into_iter().map(|(s, v)| json!({"event": s.name(), "count": v})).collect(),
        ),
        other => {
            let known = format!("{}, {}", map_names::ALL.join(", "), map_names::UNREAD_CLOSES);
            return Err(CliError::UnknownMap(other.into(), known));
        }
    })
}

/// Renders rows as an aligned table (or JSON).
pub fn render(cols: &[&str], rows: &[Value], output: Output) -> String {
    if output == Output::Json {
        return serde_json::to_string_pretty(rows).unwrap_or_default() + "\n";
    }
    let cell = |r: &Value, c: &str| match &r[c] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        v => v.to_string(),
    };
    let widths: Vec<usize> = cols
        .iter()
        .map(|c| {
            rows.iter()
                .map(|r| cell(r, c).len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let line = |vals: Vec<String>| {
        vals.iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
            + "\n"
    };
    out += &line(cols.iter().map(|c| c.to_uppercase()).collect());
    for r in rows {
        out += &line(cols.iter().map(|c| cell(r, c)).collect());
    }
    out
}

/// The programs that use one of the maps pinned under `pin` (so several agents on one
/// machine, as in the tests, are told apart).
fn own_programs(pin: &Path) -> Result<Vec<aya::programs::ProgramInfo>, CliError> {
    let path = pin.join(map_names::STATS);
    MapInfo::from_pin(&path).map_err(|source| CliError::NoPin { path, source })?;
    let ours: Vec<u32> = map_names::ALL
        .iter()
        .filter_map(|m| MapInfo::from_pin(pin.join(m)).ok().map(|i| i.id()))
        .collect();
    let mut out = Vec::new();
    for p in aya::programs::loaded_programs() {
        let p = p.map_err(|e| CliError::List("programs", e.to_string()))?;
        if p.map_ids()
            .ok()
            .flatten()
            .is_some_and(|ids| ids.iter().any(|id| ours.contains(id)))
        {
            out.push(p);
        }
    }
    Ok(out)
}

pub fn programs(pin: &Path) -> Result<(Vec<&'static str>, Vec<Value>), CliError> {
    let rows = own_programs(pin)?
        .iter()
        .map(|p| {
            json!({
                "id": p.id(),
                "name": p.name_as_str().unwrap_or("?"),
                "type": format!("{:?}", p.program_type()),
                "run_count": p.run_count(),
                "run_time_ns": p.run_time().as_nanos() as u64,
                "verified_insns": p.verified_instruction_count().unwrap_or(0),
            })
        })
        .collect();
    Ok((
        vec![
            "id",
            "name",
            "type",
            "run_count",
            "run_time_ns",
            "verified_insns",
        ],
        rows,
    ))
}

pub fn links(pin: &Path) -> Result<(Vec<&'static str>, Vec<Value>), CliError> {
    let progs = own_programs(pin)?;
    let mut rows = Vec::new();
    for l in aya::programs::loaded_links() {
        let l = l.map_err(|e| CliError::List("links", e.to_string()))?;
        if let Some(p) = progs.iter().find(|p| p.id() == l.program_id()) {
            rows.push(json!({
                "id": l.id(),
                "program_id": l.program_id(),
                "program": p.name_as_str().unwrap_or("?"),
                "type": l.link_type().map(|t| format!("{t:?}")).unwrap_or_else(|_| "?".into()),
            }));
        }
    }
    // sk_msg attaches to SOCKHASH with BPF_PROG_ATTACH (no link object); show it too.
    for p in progs
        .iter()
        .filter(|p| p.name_as_str() == Some(mesh_common::prog_names::SK_MSG))
    {
        rows.push(json!({"id": null, "program_id": p.id(), "program": mesh_common::prog_names::SK_MSG, "type": "prog_attach(SOCKHASH)"}));
    }
    Ok((vec!["id", "program_id", "program", "type"], rows))
}

/// One row of `maps`: what the kernel says of the map, and how many entries `dump` reads.
fn map_row(pin: &Path, name: &str, info: &MapInfo, pinned: Value) -> Value {
    let entries = dump(pin, name).map(|(_, r)| r.len() as i64).unwrap_or(-1);
    json!({
        "name": name,
        "id": info.id(),
        "type": info.map_type().map(|t| format!("{t:?}")).unwrap_or_else(|_| "?".into()),
        "key_size": info.key_size(),
        "value_size": info.value_size(),
        "max_entries": info.max_entries(),
        "entries": entries,
        "pinned": pinned,
    })
}

pub fn maps(pin: &Path) -> Result<(Vec<&'static str>, Vec<Value>), CliError> {
    let mut rows = Vec::new();
    let rd = std::fs::read_dir(pin)
        .map_err(|e| CliError::List("maps", format!("{}: {e}", pin.display())))?;
    let mut names: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        // The programs' pinned links (`link_<program>`) live here too: `links` lists them.
        .filter(|n| !n.starts_with("link_"))
        .collect();
    names.sort();
    for name in names {
        let Ok(info) = MapInfo::from_pin(pin.join(&name)) else {
            continue;
        };
        let pinned = json!(pin.join(&name).display().to_string());
        rows.push(map_row(pin, &name, &info, pinned));
    }
    // The one map `dump` reads that is not pinned, while its program is loaded.
    let name = map_names::UNREAD_CLOSES;
    if let Ok(Some(info)) = unpinned_info(pin, name) {
        rows.push(map_row(pin, name, &info, Value::Null));
    }
    Ok((
        vec![
            "name",
            "id",
            "type",
            "key_size",
            "value_size",
            "max_entries",
            "entries",
            "pinned",
        ],
        rows,
    ))
}

/// `GET path` on the admin endpoint (HTTP/1.1, one request); the body of a 200.
fn admin_get(addr: std::net::SocketAddr, path: &str) -> Result<String, CliError> {
    let (status, body) = admin_request(addr, "GET", path)?;
    if status != 200 {
        return Err(CliError::Admin(
            addr,
            format!("GET {path}: {status} {}", body.trim()),
        ));
    }
    Ok(body)
}

/// `METHOD path` on the admin endpoint (HTTP/1.1, one request): the status and the body,
/// whatever the status.
pub(crate) fn admin_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
) -> Result<(u16, String), CliError> {
    admin_request_within(addr, method, path, ADMIN_TIMEOUT)
}

/// `admin_request`, waiting up to `timeout` for the answer.
fn admin_request_within(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    timeout: std::time::Duration,
) -> Result<(u16, String), CliError> {
    use std::io::{Read as _, Write as _};
    let err = |e: String| CliError::Admin(addr, e);
    let mut conn =
        std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| err(e.to_string()))?;
    conn.set_read_timeout(Some(timeout))
        .map_err(|e| err(e.to_string()))?;
    // One write: `write!` on the stream would send the head in pieces.
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(head.as_bytes())
        .map_err(|e| err(e.to_string()))?;
    let mut resp = Vec::new();
    conn.take(64 << 20)
        .read_to_end(&mut resp)
        .map_err(|e| err(e.to_string()))?;
    let resp = String::from_utf8_lossy(&resp);
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| err("no HTTP response".into()))?;
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| err(format!("{method} {path}: no HTTP status line")))?;
    Ok((status, body.to_owned()))
}

/// `mesh-agent inspect pod|service NAMESPACE/NAME`: the agent's `/inspect` answer, as
/// text or JSON. An object the agent does not know is an error with its message.
pub fn inspect(o: &InspectObject) -> Result<String, CliError> {
    let (kind, a) = match o {
        InspectObject::Pod(a) => ("pod", a),
        InspectObject::Service(a) => ("service", a),
    };
    let (ns, name) = a
        .object
        .split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
        .ok_or_else(|| CliError::Object(a.object.clone()))?;
    let path = format!("/inspect/{kind}/{ns}/{name}");
    let (status, body) = admin_request(a.admin_address, "GET", &path)?;
    if status != 200 {
        return Err(CliError::Refused(body.trim().to_owned()));
    }
    let v: Value = serde_json::from_str(&body)
        .map_err(|e| CliError::Admin(a.admin_address, format!("{path}: {e}")))?;
    Ok(match a.output {
        Output::Json => serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
        Output::Table => crate::admin::inspect::render_text(&v),
    })
}

/// `mesh-agent log-level [FILTER]`: the filter in force after the call.
pub fn log_level(admin: std::net::SocketAddr, filter: Option<&str>) -> Result<String, CliError> {
    let (status, body) = match filter {
        None => admin_request(admin, "GET", "/logging")?,
        Some(f) => admin_request(
            admin,
            "POST",
            &format!(
                "/logging?filter={}",
                crate::admin::logging::percent_encode(f)
            ),
        )?,
    };
    if status != 200 {
        return Err(CliError::Refused(body.trim().to_owned()));
    }
    Ok(body)
}

/// How long an admin request may take to answer.
const ADMIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// `mesh-agent debug profile`: the folded stacks, and a summary line for the operator
/// (samples, lost, threads, whether kernel frames and deep stacks were had).
pub fn debug_profile(a: &ProfileArgs) -> Result<(String, String), CliError> {
    let path = format!("/debug/profile?seconds={}&format=json", a.seconds);
    // The agent answers when the profile ends, then symbolizes: allow for both.
    let timeout = std::time::Duration::from_secs(u64::from(a.seconds) + 30);
    let (status, body) = admin_request_within(a.admin_address, "GET", &path, timeout)?;
    if status != 200 {
        return Err(CliError::Refused(body.trim().to_owned()));
    }
    let p: Value = serde_json::from_str(&body)
        .map_err(|e| CliError::Admin(a.admin_address, format!("{path}: {e}")))?;
    let mut folded = String::new();
    for l in p["folded"].as_array().into_iter().flatten() {
        folded.push_str(l.as_str().unwrap_or_default());
        folded.push('\n');
    }
    let summary = format!(
        "{} samples over {} s of {} threads at {} Hz ({} lost, {} truncated); kernel frames {}; mean depth {:.1} frames, {:.1} in user space{}",
        p["samples"],
        p["seconds"],
        p["threads"],
        p["sample_hz"],
        p["lost"],
        p["truncated"],
        if p["kernel_frames"] == true { "yes" } else { "no" },
        p["mean_depth"].as_f64().unwrap_or(0.0),
        p["mean_user_depth"].as_f64().unwrap_or(0.0),
        if p["mean_user_depth"].as_f64().unwrap_or(0.0) < 5.0 && p["samples"].as_u64().unwrap_or(0) > 0 {
            " (shallow: is the agent built with frame pointers? see docs/observability.md)"
        } else {
            ""
        }
    );
    Ok((folded, summary))
}

/// `mesh-agent debug heap`: the agent's `/debug/heap`, as rows or JSON.
pub fn debug_heap(admin: std::net::SocketAddr) -> Result<Value, CliError> {
    let body = admin_get(admin, "/debug/heap")?;
    serde_json::from_str(&body).map_err(|e| CliError::Admin(admin, format!("/debug/heap: {e}")))
}

/// `mesh-agent certs`: the certificates the agent at `admin` holds.
pub fn certs(admin: std::net::SocketAddr) -> Result<(Vec<&'static str>, Vec<Value>), CliError> {
    let body = admin_get(admin, "/certs")?;
    let rows: Vec<Value> =
        serde_json::from_str(&body).map_err(|e| CliError::Admin(admin, format!("/certs: {e}")))?;
    Ok((
        vec![
            "identity",
            "serial",
            "not_before",
            "not_after",
            "expires_in_s",
            "refresh_at",
        ],
        rows,
    ))
}

/// `mesh-agent ca init`.
pub fn ca_init(dir: &Path, trust_domain: &str) -> Result<(), CliError> {
    Ok(crate::control::ca::init_dir(dir, trust_domain)?)
}

pub fn bypass(pin: &Path, on: bool) -> Result<MeshConfig, CliError> {
    let name = map_names::CONFIG;
    let mut m: Array<MapData, MeshConfig> =
        Array::try_from(open(pin, name)?).map_err(|e| CliError::Map(name.into(), e))?;
    let mut c = m.get(&0, 0).map_err(|e| CliError::Map(name.into(), e))?;
    if on {
        c.flags |= cfg_flags::BYPASS;
    } else {
        c.flags &= !cfg_flags::BYPASS;
    }
    m.set(0, c, 0).map_err(|e| CliError::Map(name.into(), e))?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let rows = vec![
            json!({"a": "x", "b": 10}),
            json!({"a": "longer", "b": null}),
        ];
        let t = render(&["a", "b"], &rows, Output::Table);
        assert_eq!(t, "A       B\nx       10\nlonger  -\n");
        let j: Value = serde_json::from_str(&render(&["a", "b"], &rows, Output::Json)).unwrap();
        assert_eq!(j[0]["b"], 10);
    }

    /// Every map `dump` decodes, the unpinned `UNREAD_CLOSES` included, is named when an
    /// unknown one is asked for; without an agent each says where it looked.
    #[test]
    fn dump_names_its_maps_and_says_when_no_agent_runs() {
        let none = Path::new("/nonexistent/mesh-cli-test");
        match dump(none, "NOPE") {
            Err(CliError::UnknownMap(m, known)) => {
                assert_eq!(m, "NOPE");
                for want in ["INBOUND", "INBOUND6", "UNREAD_CLOSES", "FLOWS"] {
                    assert!(known.split(", ").any(|k| k == want), "{want}: {known}");
                }
            }
            other => panic!("{other:?}"),
        }
        for map in [
            map_names::INBOUND,
            map_names::INBOUND6,
            map_names::UNREAD_CLOSES,
        ] {
            match dump(none, map) {
                Err(CliError::NoPin { path, .. }) => assert!(path.starts_with(none), "{map}"),
                other => panic!("{map}: {other:?}"),
            }
        }
    }

    #[test]
    fn cli_parses_inspection_commands() {
        let c = Cli::try_parse_from([
            "mesh-agent",
            "dump",
            "FLOWS",
            "-o",
            "json",
            "--pin-path",
            "/x",
        ])
        .unwrap();
        match c.command {
            Command::Dump { inspect, map } => {
                assert_eq!(map, "FLOWS");
                assert_eq!(inspect.output, Output::Json);
                assert_eq!(inspect.pin_path, PathBuf::from("/x"));
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["mesh-agent", "bypass", "maybe"]).is_err());
    }

    #[test]
    fn ca_init_writes_a_root_and_certs_reads_the_admin_endpoint() {
        let c = Cli::try_parse_from(["mesh-agent", "ca", "init", "--dir", "/x"]).unwrap();
        match c.command {
            Command::Ca {
                command: CaCommand::Init { dir, trust_domain },
            } => {
                assert_eq!(dir, PathBuf::from("/x"));
                assert_eq!(trust_domain, "cluster.local");
            }
            other => panic!("{other:?}"),
        }
        let dir = std::env::temp_dir().join(format!("mesh-cli-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        ca_init(&dir, "example.org").unwrap();
        assert!(dir.join("root-cert.pem").exists() && dir.join("ca-key.pem").exists());
        assert!(ca_init(&dir, "example.org").is_err(), "not overwritten");
        let _ = std::fs::remove_dir_all(&dir);
        // A fake admin endpoint answering /certs.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            use std::io::{Read as _, Write as _};
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"GET /certs HTTP/1.1\r\n"));
            let body = r#"[{"identity":"spiffe://cluster.local/ns/a/sa/b","serial":"0A1B","not_before":"x","not_after":"y","refresh_at":"z","expires_in_s":10,"chain":["pem"]}]"#;
            write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        });
        let (cols, rows) = certs(addr).unwrap();
        server.join().unwrap();
        let t = render(&cols, &rows, Output::Table);
        assert!(t.starts_with("IDENTITY"), "{t}");
        assert!(t.contains("spiffe://cluster.local/ns/a/sa/b  0A1B"), "{t}");
        assert!(!t.contains("pem"), "chains only in JSON: {t}");
        assert!(render(&cols, &rows, Output::Json).contains("\"chain\""));
    }

    #[test]
    fn inspect_and_log_level_parse_and_report_refusals() {
        let c = Cli::try_parse_from([
            "mesh-agent",
            "inspect",
            "svc",
            "backend/reviews",
            "-o",
            "json",
        ])
        .unwrap();
        match c.command {
            Command::Inspect {
                object: InspectObject::Service(a),
            } => {
                assert_eq!(a.object, "backend/reviews");
                assert_eq!(a.output, Output::Json);
            }
            other => panic!("{other:?}"),
        }
        let c = Cli::try_parse_from(["mesh-agent", "log-level", "mesh_agent=debug"]).unwrap();
        assert!(
            matches!(c.command, Command::LogLevel(ref a) if a.filter.as_deref() == Some("mesh_agent=debug"))
        );
        let bad = InspectObject::Pod(InspectArgs {
            object: "web".into(),
            admin_address: "127.0.0.1:1".parse().unwrap(),
            output: Output::Table,
        });
        assert!(matches!(inspect(&bad), Err(CliError::Object(_))));
        // The agent's refusal (404 and its message) is the error.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            use std::io::{Read as _, Write as _};
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"GET /inspect/pod/shop/nope HTTP/1.1\r\n"));
            let body = "no pod shop/nope on this node\n";
            write!(
                s,
                "HTTP/1.1 404 Not Found\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        });
        let o = InspectObject::Pod(InspectArgs {
            object: "shop/nope".into(),
            admin_address: addr,
            output: Output::Table,
        });
        let e = inspect(&o).unwrap_err();
        server.join().unwrap();
        assert_eq!(e.to_string(), "no pod shop/nope on this node");
    }
}
