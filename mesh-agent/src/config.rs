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
/// How long SIGTERM waits for proxied connections to finish (milliseconds).
pub const DEFAULT_DRAIN_MS: u64 = 5000;

/// The namespace label that enrols a namespace (value `ambient`), and, on a workload, opts it
/// out (value `none`).
pub const DATAPLANE_LABEL: &str = "mesh-agent.io/dataplane-mode";
pub const DATAPLANE_ENROLLED: &str = "ambient";
pub const DATAPLANE_OPT_OUT: &str = "none";

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct RunArgs {
    /// Standalone enrolment file (YAML): namespaces, workloads, exclusions.
    #[arg(long, env = "MESH_CONFIG")]
    pub config: PathBuf,
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
    /// On SIGTERM, how long proxied connections may take to finish (milliseconds).
    #[arg(long, env = "MESH_DRAIN_MS", default_value_t = DEFAULT_DRAIN_MS)]
    pub drain_ms: u64,
}

impl RunArgs {
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
            let line = line_of(&w.name, "workloads:");
            if !ns_names.contains_key(w.namespace.as_str()) {
                problems.push((
                    line,
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
                    line,
                    format!(
                        "workloads[{i}].name: {}/{} is declared twice",
                        w.namespace, w.name
                    ),
                ));
            }
            if let Some(j) = ips.insert(w.ip, i) {
                problems.push((
                    line,
                    format!(
                        "workloads[{i}].ip: {} is also the IP of workloads[{j}]",
                        w.ip
                    ),
                ));
            }
            if w.ip.is_unspecified() || w.ip.is_loopback() {
                problems.push((
                    line,
                    format!("workloads[{i}].ip: {} is not a pod address", w.ip),
                ));
            }
        }
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
        let t =
            T::try_parse_from(["x", "--config", "f", "--proxy-address", "10.1.0.1:15001"]).unwrap();
        assert_eq!(
            t.run.redirect_target().unwrap(),
            "10.1.0.1:15001".parse().unwrap()
        );
    }
}
