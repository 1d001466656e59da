//! The standalone enrolment file (YAML): namespaces, workloads, exclusions, the
//! services the embedded control plane serves and the security policies it distributes
//! (in the control plane's schema, `crate::control::model`), with its validation. Errors name the file, the line and the
//! field. `watch_file` polls it and publishes enrolment snapshots.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    Snapshot, BYPASS_LABEL, DATAPLANE_ENROLLED, DATAPLANE_LABEL, DATAPLANE_OPT_OUT,
    FAIL_MODE_LABEL, ISTIO_DATAPLANE_LABEL,
};
use crate::control::model::{
    not_a_service_ip6,
    security::{AuthorizationPolicy, PeerAuthentication, Security},
    LbPolicySpec, ServiceSpec, DEFAULT_SERVICE_ACCOUNT, MAX_LABEL_VALUE,
};

mod items;

/// On a namespace: `"true"` writes an access-log line for every connection and request
/// from or to its workloads, whatever `--access-log` says (`"false"`, or no label: by
/// the flag only). In the standalone file and on Kubernetes Namespaces alike.
pub const ACCESS_LOG_LABEL: &str = "mesh-agent.io/access-log";
/// The labels Istio's `app` is taken from, first present wins.
pub const APP_LABELS: [&str; 2] = ["app.kubernetes.io/name", "app"];
/// The labels Istio's `version` is taken from, first present wins.
pub const VERSION_LABELS: [&str; 2] = ["app.kubernetes.io/version", "version"];

/// Whether `v` is a Kubernetes label value: at most `MAX_LABEL_VALUE` bytes of ASCII
/// letters, digits, `-`, `_` and `.`, beginning and ending with a letter or digit (or
/// empty).
pub fn is_label_value(v: &str) -> bool {
    let b = v.as_bytes();
    b.len() <= MAX_LABEL_VALUE
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b.first().is_none_or(u8::is_ascii_alphanumeric)
        && b.last().is_none_or(u8::is_ascii_alphanumeric)
}

/// The value of the first of `keys` that `labels` carries as a valid label value, empty
/// if none: what the control plane passes on as Istio's `app` or `version`. (The file's
/// check refuses invalid values; from Kubernetes, the API server already did.)
pub fn telemetry_label(labels: &BTreeMap<String, String>, keys: &[&str]) -> String {
    keys.iter()
        .filter_map(|k| labels.get(*k))
        .find(|v| !v.is_empty() && is_label_value(v))
        .cloned()
        .unwrap_or_default()
}

/// Whether a namespace's labels switch its access logs on.
pub fn access_log_on(labels: &BTreeMap<String, String>) -> bool {
    labels.get(ACCESS_LOG_LABEL).map(String::as_str) == Some("true")
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
    pub services: Vec<Arc<ServiceSpec>>,
    /// Istio AuthorizationPolicies (`security.istio.io/v1` field names).
    #[serde(default)]
    pub authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    /// Istio PeerAuthentications (`security.istio.io/v1` field names).
    #[serde(default)]
    pub peer_authentications: Vec<Arc<PeerAuthentication>>,
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
    /// Its IPv6 address on a dual-stack node (a global or unique-local unicast address);
    /// absent: the workload has none, and its native IPv6 connections are not captured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    /// Network namespace of the workload: `/run/netns/NAME` or `/proc/PID/ns/net`.
    pub netns: PathBuf,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Overrides the namespace's mode for this workload as a destination.
    #[serde(default)]
    pub mode: Option<Mode>,
    /// Its identity's service account (default `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// The node it runs on (default: this node). A workload of another node is known to
    /// the control plane and the proxy (its identity, its HBONE address), never enrolled
    /// in this node's maps; its `netns` is not read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl WorkloadSpec {
    pub fn service_account(&self) -> &str {
        self.service_account
            .as_deref()
            .unwrap_or(DEFAULT_SERVICE_ACCOUNT)
    }

    /// Runs on `local` (the node this agent serves).
    pub fn is_local(&self, local: &str) -> bool {
        self.node.as_deref().is_none_or(|n| n == local)
    }
}

/// Why `ip` cannot be a pod's IPv6 address, if it cannot: the datapath never captures
/// connections to or from these scopes, so a workload declared with one would never be
/// meshed (and the IPv4 forms belong in `ip`).
pub fn not_a_pod_ip6(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.to_ipv4_mapped().is_some() {
        return Some("an IPv4-mapped address: write it in `ip`");
    }
    not_a_service_ip6(ip)
}

/// A parsed exclusion: network-order IPv4, prefix length, port.
pub fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, len) = s.split_once('/').unwrap_or((s, "32"));
    let ip: Ipv4Addr = ip.trim().parse().ok()?;
    let len: u8 = len.trim().parse().ok()?;
    (len <= 32).then_some((ip, len))
}

/// Parses successive versions of one file, reusing the services it parsed last time
/// (`items`): a change costs the items that changed, the skeleton and its checks, and the
/// checks of the changed services against an index of the others (`ServiceIndex`).
#[derive(Default)]
pub struct FileParser {
    items: items::ItemCache,
    /// The services of the last parse, when it went through `items` and was good: what
    /// the next one's changed services are checked against.
    index: Option<ServiceIndex>,
    /// Services checked (each time one is checked, at start and by a full check too)
    /// since start: a change should check the services it touched, not the file's.
    pub services_checked: u64,
}

impl FileParser {
    pub fn parse(&mut self, path: &Path, text: &str) -> Result<MeshFile, ConfigError> {
        // Taken: any parse that does not end well through the items leaves none.
        let index = self.index.take();
        if let Some(split) = items::split(text) {
            let skeleton = serde_yaml::from_str::<MeshFile>(&split.skeleton);
            if let (Ok(skeleton), Some((services, diff))) =
                (skeleton, self.items.services_diff(&split.items))
            {
                let file = MeshFile {
                    services,
                    ..skeleton
                };
                if let Some(mut index) = index {
                    self.services_checked += diff.added.len() as u64;
                    if index.update(&file, &diff) {
                        // The services are good as a whole: the rest of the checks.
                        let checked = file.checked_except_services(path, text);
                        if checked.is_ok() {
                            self.index = Some(index);
                        }
                        return checked;
                    }
                }
                // First time, or the changed services have a problem: the whole check,
                // which says what and where.
                self.services_checked += file.services.len() as u64;
                let checked = file.checked(path, text);
                if let Ok(file) = &checked {
                    self.index = Some(ServiceIndex::new(file));
                }
                return checked;
            }
        }
        MeshFile::parse_whole(path, text)
    }

    /// Service items parsed (not reused) since start.
    pub fn items_parsed(&self) -> u64 {
        self.items.parsed
    }

    /// Makes `next` (built from this parser's last parse) share the services of `current`
    /// (what consumers hold) that are equal, position by position, and this parser hand
    /// those out from now on. The file loaded at start-up was parsed by another parser:
    /// without this the first change after start would reach the translator as 10k new
    /// pointers, each compared in depth, and the specs would be held twice.
    pub fn share_unchanged(&mut self, next: &mut Snapshot, current: &Snapshot) {
        let mut shared = std::collections::HashMap::new();
        for (n, c) in next.services.iter_mut().zip(&current.services) {
            if !Arc::ptr_eq(n, c) && **n == **c {
                shared.insert(Arc::as_ptr(n), Arc::clone(c));
                *n = Arc::clone(c);
            }
        }
        if !shared.is_empty() {
            self.items.adopt(&shared);
        }
    }
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
        FileParser::default().parse(path, text)
    }

    /// The whole text through serde, then the checks: the reference the incremental path
    /// (`FileParser`) falls back to, and is compared with in the tests.
    pub fn parse_whole(path: &Path, text: &str) -> Result<MeshFile, ConfigError> {
        let file: MeshFile = if text.trim().is_empty() {
            MeshFile::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
                path: path.to_owned(),
                // serde_yaml's message carries the field path and "at line L column C".
                message: e.to_string(),
            })?
        };
        file.checked(path, text)
    }

    /// Every semantic problem of a parsed file at once (`text` gives the lines).
    fn checked(self, path: &Path, text: &str) -> Result<MeshFile, ConfigError> {
        self.checked_with(path, text, true)
    }

    /// `checked` without `check_services`: for a file whose services `ServiceIndex` found
    /// good.
    fn checked_except_services(self, path: &Path, text: &str) -> Result<MeshFile, ConfigError> {
        self.checked_with(path, text, false)
    }

    fn checked_with(
        self,
        path: &Path,
        text: &str,
        services: bool,
    ) -> Result<MeshFile, ConfigError> {
        let file = self;
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
            if let Some(v) = ns.labels.get(ACCESS_LOG_LABEL) {
                if v != "true" && v != "false" {
                    problems.push((
                        line_of(&ns.name, "namespaces:"),
                        format!(
                            "namespaces[{i}].labels.{ACCESS_LOG_LABEL}: {v:?}: \"true\" or \"false\""
                        ),
                    ));
                }
            }
        }
        let mut wl_names = BTreeMap::new();
        let mut ips = BTreeMap::new();
        let mut ip6s = BTreeMap::new();
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
            if let Some(ip6) = w.ip6 {
                if let Some(j) = ip6s.insert(ip6, i) {
                    problems.push((
                        line(),
                        format!(
                            "workloads[{i}].ip6: {ip6} is also the IPv6 address of workloads[{j}]"
                        ),
                    ));
                }
                if let Some(why) = not_a_pod_ip6(ip6) {
                    problems.push((
                        line(),
                        format!("workloads[{i}].ip6: {ip6} is not a pod address ({why})"),
                    ));
                }
            }
            if let Some(sa) = &w.service_account {
                if !identity_segment(sa) {
                    problems.push((
                        line(),
                        format!("workloads[{i}].service_account: {sa:?} is not a service account name (letters, digits, '-', '.', '_')"),
                    ));
                }
            }
            for key in APP_LABELS.iter().chain(&VERSION_LABELS) {
                match w.labels.get(*key) {
                    Some(v) if v.len() > MAX_LABEL_VALUE => problems.push((
                        line(),
                        format!(
                            "workloads[{i}].labels.{key}: {} bytes, at most {MAX_LABEL_VALUE} (a Kubernetes label value)",
                            v.len()
                        ),
                    )),
                    Some(v) if !is_label_value(v) => problems.push((
                        line(),
                        format!(
                            "workloads[{i}].labels.{key}: {v:?} is not a label value (letters, digits, '-', '_', '.', beginning and ending with a letter or digit)"
                        ),
                    )),
                    _ => {}
                }
            }
            if w.node.as_deref().is_some_and(|n| n.is_empty()) {
                problems.push((
                    line(),
                    format!("workloads[{i}].node: empty; leave it out for this node"),
                ));
            }
        }
        file.security().check(&mut |m| {
            // The section's line: policies are few, the field path says which one.
            let section = if m.starts_with("authorization_policies") {
                "authorization_policies:"
            } else {
                "peer_authentications:"
            };
            problems.push((line_of(section, section), m))
        });
        if services {
            check_services(&file, &ns_names, &mut problems, &line_of);
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

    /// The workloads as the control plane sees them (service selectors match them),
    /// those of other nodes included; `local` names this node (a workload without
    /// `node:` runs here).
    pub fn members_on(&self, local: &str) -> Vec<crate::control::model::Member> {
        let logged: std::collections::HashSet<&str> = self
            .namespaces
            .iter()
            .filter(|n| access_log_on(&n.labels))
            .map(|n| n.name.as_str())
            .collect();
        self.workloads
            .iter()
            .map(|w| crate::control::model::Member {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                ip: w.ip,
                ip6: w.ip6,
                labels: w.labels.clone(),
                service_account: w.service_account().to_owned(),
                node: w.node.clone().unwrap_or_else(|| local.to_owned()),
                hbone: self.enrolled(w),
                app: telemetry_label(&w.labels, &APP_LABELS),
                version: telemetry_label(&w.labels, &VERSION_LABELS),
                access_log: logged.contains(w.namespace.as_str()),
            })
            .collect()
    }

    /// `members_on` this host (`super::LocalNode::from_host`).
    pub fn members(&self) -> Vec<crate::control::model::Member> {
        self.members_on(&super::LocalNode::from_host().node)
    }

    /// The security policies, as the control plane takes them.
    pub fn security(&self) -> Security {
        Security {
            authorization_policies: self.authorization_policies.clone(),
            peer_authentications: self.peer_authentications.clone(),
        }
    }

    /// Whether a workload's outbound traffic is captured: its namespace carries the
    /// enrolment label and the workload does not opt out.
    pub fn enrolled(&self, w: &WorkloadSpec) -> bool {
        // Ours, else Istio's (`istio.io/dataplane-mode`).
        fn mode(l: &BTreeMap<String, String>) -> Option<&str> {
            l.get(DATAPLANE_LABEL)
                .or_else(|| l.get(ISTIO_DATAPLANE_LABEL))
                .map(String::as_str)
        }
        let ns_on = self
            .namespaces
            .iter()
            .any(|n| n.name == w.namespace && mode(&n.labels) == Some(DATAPLANE_ENROLLED));
        ns_on && mode(&w.labels) != Some(DATAPLANE_OPT_OUT)
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
    // Hash maps: at 10k services ordered maps of string keys cost more than the rest of
    // the checks.
    let mut names = std::collections::HashMap::with_capacity(file.services.len());
    let mut addrs = std::collections::HashMap::with_capacity(file.services.len());
    let declared: std::collections::HashSet<(&str, &str)> = file
        .services
        .iter()
        .map(|s| (s.namespace.as_str(), s.name.as_str()))
        .collect();
    for (i, svc) in file.services.iter().enumerate() {
        let mut bad = |m: String| {
            problems.push((line_of(&svc.name, "services:"), format!("services[{i}]{m}")))
        };
        let name_taken = names
            .insert((svc.namespace.as_str(), svc.name.as_str()), i)
            .is_some();
        check_service(
            svc,
            ns_names.contains_key(svc.namespace.as_str()),
            name_taken,
            &mut |vip, port| addrs.insert((vip, port), i),
            &|ns, n| declared.contains(&(ns, n)),
            &mut bad,
        );
    }
}

/// One service's checks. What involves the other services is answered by the caller:
/// whether its namespace is declared, whether its name is taken, who else serves an
/// address (`addr_taken`, called once per port in order: the index of that service), and
/// whether a service is declared.
fn check_service(
    svc: &ServiceSpec,
    namespace_declared: bool,
    name_taken: bool,
    addr_taken: &mut dyn FnMut(IpAddr, u16) -> Option<usize>,
    declared: &dyn Fn(&str, &str) -> bool,
    bad: &mut dyn FnMut(String),
) {
    if !namespace_declared {
        bad(format!(
            ".namespace: {:?} is not declared under namespaces",
            svc.namespace
        ));
    }
    if name_taken {
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
        for ip in service_ips(svc) {
            if let Some(k) = addr_taken(ip, p.port) {
                bad(format!(
                    ".ports[{j}]: {} is also served by services[{k}]",
                    SocketAddr::new(ip, p.port)
                ));
            }
        }
    }
    if let Some(why) = svc.vip6.and_then(not_a_service_ip6) {
        bad(format!(
            ".vip6: {} is not a service address ({why})",
            svc.vip6.unwrap_or(Ipv6Addr::UNSPECIFIED)
        ));
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
                bad(format!(
                    ".endpoints[{j}].health: {h:?} is not healthy, unhealthy, degraded or draining"
                ));
            }
        }
        if e.weight == Some(0) {
            bad(format!(".endpoints[{j}].weight: must be >= 1"));
        }
        if let IpAddr::V6(ip) = e.ip {
            if let Some(why) = not_a_service_ip6(ip) {
                bad(format!(
                    ".endpoints[{j}].ip: {ip} is not an endpoint address ({why})"
                ));
            }
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
            if !declared(ns, n) {
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

/// The addresses a service is dialled at: `vip`, and `vip6` if it has one.
fn service_ips(svc: &ServiceSpec) -> impl Iterator<Item = IpAddr> {
    std::iter::once(IpAddr::V4(svc.vip)).chain(svc.vip6.map(IpAddr::V6))
}

/// The services of a good file, indexed so that a parse which changed some of them
/// checks only those: names and addresses (with how many services hold each, a good file
/// has one), the services route backends name, and the declared namespaces.
struct ServiceIndex {
    namespaces: Vec<String>,
    names: std::collections::HashMap<(String, String), u32>,
    addrs: std::collections::HashMap<(IpAddr, u16), u32>,
    /// (namespace, name) of services that route backends name, with how many backends.
    targets: std::collections::HashMap<(String, String), u32>,
}

/// The (namespace, name) each of `svc`'s route backends names.
fn backend_targets(svc: &ServiceSpec) -> impl Iterator<Item = (String, String)> + '_ {
    svc.routes.iter().flat_map(|r| &r.backends).map(|b| {
        let (n, ns) = b
            .service
            .split_once('.')
            .unwrap_or((&b.service, &svc.namespace));
        (ns.to_owned(), n.to_owned())
    })
}

impl ServiceIndex {
    fn new(file: &MeshFile) -> ServiceIndex {
        let mut index = ServiceIndex {
            namespaces: file.namespaces.iter().map(|n| n.name.clone()).collect(),
            names: Default::default(),
            addrs: Default::default(),
            targets: Default::default(),
        };
        for svc in &file.services {
            index.count(svc, 1);
        }
        index
    }

    fn count(&mut self, svc: &ServiceSpec, add: i64) {
        fn bump<K: std::hash::Hash + Eq>(
            m: &mut std::collections::HashMap<K, u32>,
            k: K,
            add: i64,
        ) {
            let n = m.entry(k).or_default();
            *n = (i64::from(*n) + add).max(0) as u32;
        }
        bump(
            &mut self.names,
            (svc.namespace.clone(), svc.name.clone()),
            add,
        );
        for p in &svc.ports {
            for ip in service_ips(svc) {
                bump(&mut self.addrs, (ip, p.port), add);
            }
        }
        for t in backend_targets(svc) {
            bump(&mut self.targets, t, add);
        }
    }

    /// Takes `diff` (from the services this index holds to `file`'s) in; whether `file`'s
    /// services are good as a whole. `false`: the index is stale, and a whole check says
    /// what is wrong (this one only knows that something may be).
    fn update(&mut self, file: &MeshFile, diff: &items::ItemDiff) -> bool {
        if diff.repeated
            || !file
                .namespaces
                .iter()
                .map(|n| &n.name)
                .eq(self.namespaces.iter())
        {
            return false;
        }
        for svc in &diff.removed {
            self.count(svc, -1);
        }
        for svc in &diff.added {
            self.count(svc, 1);
        }
        let names = &self.names;
        let key = |ns: &str, n: &str| (ns.to_owned(), n.to_owned());
        // A removed name that a route still sends to.
        for svc in &diff.removed {
            let k = key(&svc.namespace, &svc.name);
            if names.get(&k).is_none_or(|&n| n == 0) && self.targets.get(&k).is_some_and(|&n| n > 0)
            {
                return false;
            }
        }
        let mut good = true;
        for svc in &diff.added {
            check_service(
                svc,
                self.namespaces.iter().any(|n| *n == svc.namespace),
                names.get(&key(&svc.namespace, &svc.name)) != Some(&1),
                &mut |vip, port| (self.addrs.get(&(vip, port)) != Some(&1)).then_some(0),
                &|ns, n| names.get(&key(ns, n)).is_some_and(|&c| c > 0),
                &mut |_| good = false,
            );
        }
        self.names.retain(|_, n| *n > 0);
        self.addrs.retain(|_, n| *n > 0);
        self.targets.retain(|_, n| *n > 0);
        good
    }
}

/// A SPIFFE ID segment (`identity::SpiffeId`'s rule; `enrol` does not use `identity`).
fn identity_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
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

/// How reloads of the standalone file went (`mesh_config_reloads_total{result}`).
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub applied: std::sync::atomic::AtomicU64,
    pub rejected: std::sync::atomic::AtomicU64,
}

impl ReloadStats {
    pub fn render(&self, out: &mut String) {
        use std::{fmt::Write as _, sync::atomic::Ordering::Relaxed};
        let _ = writeln!(
            out,
            "# HELP mesh_config_reloads_total Changes of the standalone file, applied or rejected (the last good configuration stays in force).\n\
             # TYPE mesh_config_reloads_total counter\n\
             mesh_config_reloads_total{{result=\"applied\"}} {}\n\
             mesh_config_reloads_total{{result=\"rejected\"}} {}",
            self.applied.load(Relaxed),
            self.rejected.load(Relaxed)
        );
    }
}

/// Why a reload that parses is still refused: a file that declares nothing (no namespace,
/// workload or service) would un-mesh the node at once, and is far more often a truncated
/// write or a bad template than an intent. `--allow-empty-config` lets it through.
fn refuse_empty(f: &MeshFile, allow_empty: bool) -> Option<&'static str> {
    let empty = f.namespaces.is_empty() && f.workloads.is_empty() && f.services.is_empty();
    (empty && !allow_empty).then_some(
        "the file declares no namespace, workload or service; applying it would release every workload (start with --allow-empty-config to allow that)",
    )
}

/// Watches the standalone file; publishes a new snapshot when its content changes and
/// parses. A bad edit is logged with file and line and the last good snapshot stays.
pub async fn watch_file(
    path: PathBuf,
    interval: Duration,
    tx: watch::Sender<Arc<Snapshot>>,
    allow_empty: bool,
    stats: Arc<ReloadStats>,
) {
    watch_file_on(
        path,
        interval,
        tx,
        allow_empty,
        stats,
        super::LocalNode::from_host(),
    )
    .await
}

/// `watch_file` for the node `local` (`--node-name`, `--trust-domain`).
pub async fn watch_file_on(
    path: PathBuf,
    interval: Duration,
    tx: watch::Sender<Arc<Snapshot>>,
    allow_empty: bool,
    stats: Arc<ReloadStats>,
    local: super::LocalNode,
) {
    use std::sync::atomic::Ordering::Relaxed;
    // Reading and parsing run on the blocking pool (a 10k-service file is megabytes), with
    // the parser moved there and back. A new stamp with the same content (a `touch`)
    // parses again from the item cache and publishes nothing (the snapshot compares
    // equal), so no copy of the last text is kept.
    let mut parser = FileParser::default();
    let mut last_stamp: Option<(SystemTime, u64)> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // One stat per tick: cheap enough for the runtime.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let stamp = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        if last_stamp == Some(stamp) {
            continue;
        }
        let job_path = path.clone();
        let job = tokio::task::spawn_blocking(move || {
            let parsed = std::fs::read_to_string(&job_path)
                .ok()
                .map(|text| parser.parse(&job_path, &text));
            (parser, parsed)
        });
        let Ok((p, parsed)) = job.await else {
            // The blocking task panicked: the parser went with it.
            parser = FileParser::default();
            continue;
        };
        parser = p;
        last_stamp = Some(stamp);
        match parsed {
            None => {}
            Some(Ok(f)) => {
                if let Some(why) = refuse_empty(&f, allow_empty) {
                    stats.rejected.fetch_add(1, Relaxed);
                    warn!(path = %path.display(), reason = why, "enrolment file rejected; the last good configuration stays in force");
                    continue;
                }
                let mut snap = Snapshot::from_file_on(&f, &local);
                drop(f);
                parser.share_unchanged(&mut snap, &tx.borrow());
                let applied = tx.send_if_modified(|cur| {
                    if cur.same_as(&snap) {
                        return false;
                    }
                    info!(path = %path.display(), workloads = snap.workloads.len(), services = snap.services.len(), "standalone file changed");
                    *cur = Arc::new(snap);
                    true
                });
                if applied {
                    stats.applied.fetch_add(1, Relaxed);
                }
            }
            Some(Err(e)) => {
                stats.rejected.fetch_add(1, Relaxed);
                warn!(error = %e, "enrolment file rejected; the last good configuration stays in force")
            }
        }
    }
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
    fn istios_dataplane_label_enrols_and_opts_out_alike() {
        let text = GOOD
            .replace(
                "  - name: legacy\n",
                "  - name: legacy\n    labels: { istio.io/dataplane-mode: ambient }\n",
            )
            .replace(
                "labels: { mesh-agent.io/dataplane-mode: none }",
                "labels: { istio.io/dataplane-mode: none }",
            );
        let f = MeshFile::parse(Path::new("m.yaml"), &text).unwrap();
        let by = |n: &str| f.workloads.iter().find(|w| w.name == n).unwrap();
        assert!(f.enrolled(by("web")));
        assert!(!f.enrolled(by("batch")), "opted out with Istio's label");
        assert!(
            f.enrolled(by("db")),
            "namespace enrolled with Istio's label"
        );
        // Ours wins where both are set.
        let both = text.replace(
            "labels: { istio.io/dataplane-mode: none }",
            "labels: { istio.io/dataplane-mode: none, mesh-agent.io/dataplane-mode: ambient }",
        );
        let f = MeshFile::parse(Path::new("m.yaml"), &both).unwrap();
        assert!(f.enrolled(f.workloads.iter().find(|w| w.name == "batch").unwrap()));
    }

    #[test]
    fn syntax_error_names_file_line_and_field() {
        let bad = GOOD.replace("ip: 10.0.0.3", "ip: 10.0.0.300");
        let e = MeshFile::parse(Path::new("m.yaml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("m.yaml: workloads[1].ip"), "{e}");
        assert!(e.starts_with("m.yaml: "), "{e}");
    }

    /// A workload's `ip6`: parsed and checked like `ip` (the field named on a syntax
    /// error; duplicates and scopes the datapath never captures refused), carried into
    /// the snapshot and the control plane's members.
    #[test]
    fn ip6_is_parsed_checked_and_carried() {
        let dual = GOOD
            .replace("ip: 10.0.0.2\n", "ip: 10.0.0.2\n    ip6: fd00:201::2\n")
            .replace("ip: 10.0.0.3\n", "ip: 10.0.0.3\n    ip6: \"fd00:201::3\"\n");
        let f = MeshFile::parse(Path::new("m.yaml"), &dual).unwrap();
        let v6 = |s: &str| Some(s.parse::<Ipv6Addr>().unwrap());
        assert_eq!(f.workloads[0].ip6, v6("fd00:201::2"));
        assert_eq!(f.workloads[2].ip6, None);
        let snap = super::super::Snapshot::from_file(&f);
        assert_eq!(snap.workloads[1].ip6, v6("fd00:201::3"));
        assert_eq!(f.members()[0].ip6, v6("fd00:201::2"));

        let bad = dual.replace("fd00:201::3", "fd00:201::zz");
        let e = MeshFile::parse(Path::new("m.yaml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("m.yaml: workloads[1].ip6"), "{e}");
        let e = MeshFile::parse(
            Path::new("m.yaml"),
            &dual.replace("fd00:201::3", "fd00:201::2"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("workloads[1].ip6: fd00:201::2 is also the IPv6 address of workloads[0]"),
            "{e}"
        );
        for (addr, why) in [
            ("\"::1\"", "loopback"),
            ("\"fe80::1\"", "link-local"),
            ("\"::ffff:10.0.0.9\"", "IPv4-mapped"),
            ("\"ff02::1\"", "multicast"),
        ] {
            let e = MeshFile::parse(Path::new("m.yaml"), &dual.replace("\"fd00:201::3\"", addr))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("workloads[1].ip6: ") && e.contains(why),
                "{addr}: {e}"
            );
        }
    }

    /// A service's `vip6` and IPv6 endpoints: parsed (a file without them reads as
    /// before), checked like a workload's `ip6` (the scopes no pod or service holds are
    /// refused, naming the field and why), and a `[vip6]:port` twice is refused; the
    /// incremental parse says the same. (The same endpoint twice is allowed, as for IPv4:
    /// files list one address with several healths.)
    #[test]
    fn vip6_and_ipv6_endpoints_are_parsed_and_checked() {
        let path = Path::new("m.yaml");
        let svc = |name: &str, vip6: &str, eps: &str| {
            format!("  - {{ name: {name}, namespace: shop, vip: 10.96.0.{}, vip6: \"{vip6}\", ports: [ {{ port: 80 }} ], endpoints: [ {eps} ] }}\n",
                name.len())
        };
        let file = |items: &[String]| format!("{GOOD}services:\n{}", items.concat());
        let good = file(&[
            svc(
                "a",
                "fd00:96::a",
                "{ ip: \"fd00:10:1::2\", port: 8080 }, { ip: 10.1.0.2, port: 8080 }",
            ),
            svc("bb", "fd00:96::b", "{ ip: \"fd00:10:1::3\" }"),
        ]);
        let f = MeshFile::parse(path, &good).unwrap();
        assert_eq!(f.services[0].vip6, Some("fd00:96::a".parse().unwrap()));
        let ips: Vec<String> = f.services[0]
            .endpoints
            .iter()
            .map(|e| e.ip.to_string())
            .collect();
        assert_eq!(ips, ["fd00:10:1::2", "10.1.0.2"]);
        // Serialised back, a service without `vip6` has no such field (files read by older
        // agents stay readable), one with it round-trips.
        let plain = MeshFile::parse(path, &format!("{GOOD}{SECURITY}")).unwrap();
        assert_eq!(plain.services[0].vip6, None);
        let yaml = serde_yaml::to_string(&*plain.services[0]).unwrap();
        assert!(!yaml.contains("vip6"), "{yaml}");
        let yaml = serde_yaml::to_string(&*f.services[0]).unwrap();
        let back: ServiceSpec = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(back, *f.services[0]);

        let refused = |items: &[String], want: &[&str]| {
            let text = file(items);
            let e = MeshFile::parse(path, &text).unwrap_err().to_string();
            for w in want {
                assert!(e.contains(w), "{w:?} not in: {e}");
            }
            let mut p = FileParser::default();
            p.parse(path, &good).unwrap();
            let inc = p.parse(path, &text).unwrap_err().to_string();
            assert_eq!(inc, e, "the incremental parse says the same");
        };
        for (addr, why) in [
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("::ffff:10.96.0.9", "IPv4-mapped"),
        ] {
            refused(
                &[svc("a", addr, "{ ip: 10.1.0.2 }")],
                &["services[0].vip6: ", why],
            );
            refused(
                &[svc("a", "fd00:96::a", &format!("{{ ip: \"{addr}\" }}"))],
                &["services[0].endpoints[0].ip: ", why],
            );
        }
        refused(
            &[
                svc("a", "fd00:96::a", "{ ip: 10.1.0.2 }"),
                svc("bb", "fd00:96::a", "{ ip: 10.1.0.3 }"),
            ],
            &["services[1].ports[0]: [fd00:96::a]:80 is also served by services[0]"],
        );
        let e = MeshFile::parse(path, &good.replace("fd00:96::b", "fd00:96::zz"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("vip6"), "{e}");
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

    const SECURITY: &str = "
authorization_policies:
  - metadata: { name: web, namespace: shop }
    spec:
      selector: { matchLabels: { app: web } }
      action: ALLOW
      rules:
        - from: [ { source: { principals: [ cluster.local/ns/shop/sa/batch ] } } ]
          to: [ { operation: { ports: [ \"8080\" ], methods: [ GET ] } } ]
          when: [ { key: source.ip, values: [ 10.0.0.0/24 ] } ]
peer_authentications:
  - metadata: { name: default, namespace: istio-system }
    spec: { mtls: { mode: STRICT } }
services:
  - name: web
    namespace: shop
    vip: 10.96.0.2
    ports: [ { port: 80 } ]
";

    #[test]
    fn policies_parse_the_same_whole_or_incrementally() {
        let text = format!("{GOOD}{SECURITY}");
        let whole = MeshFile::parse_whole(Path::new("m.yaml"), &text).unwrap();
        let mut p = FileParser::default();
        assert_eq!(p.parse(Path::new("m.yaml"), &text).unwrap(), whole);
        assert_eq!(whole.authorization_policies.len(), 1);
        assert_eq!(whole.peer_authentications.len(), 1);
        // An edit of a policy alone is seen by the incremental path.
        let edited = text.replace("mode: STRICT", "mode: PERMISSIVE");
        let again = p.parse(Path::new("m.yaml"), &edited).unwrap();
        assert_eq!(
            again.peer_authentications[0].spec.mtls.unwrap().mode,
            crate::control::model::security::MtlsModeSpec::Permissive
        );
    }

    /// Successive edits through one parser: each result is the whole-file parse's, only
    /// changed items are parsed, unchanged ones keep their `Arc`; a bad edit is refused
    /// and the next good one still reuses what was parsed before it.
    #[test]
    fn successive_edits_parse_only_what_changed() {
        let path = Path::new("m.yaml");
        let svc = |name: &str, vip: &str, port: u16| {
            format!("  - {{ name: {name}, namespace: shop, vip: {vip}, ports: [ {{ port: 80 }} ], endpoints: [ {{ ip: 10.1.0.1, port: {port} }} ] }}\n")
        };
        let file = |items: &[String]| format!("{GOOD}services:\n{}", items.concat());
        let mut items: Vec<String> = (0..4)
            .map(|i| svc(&format!("s{i}"), &format!("10.96.0.{}", i + 1), 8080))
            .collect();
        let mut p = FileParser::default();
        let step = |p: &mut FileParser, text: &str| {
            let got = p.parse(path, text).unwrap();
            assert_eq!(got, MeshFile::parse_whole(path, text).unwrap(), "{text}");
            got
        };
        let first = step(&mut p, &file(&items));
        assert_eq!(p.items_parsed(), 4);
        // One endpoint changes, then another service's, then the first back.
        items[1] = svc("s1", "10.96.0.2", 9090);
        let second = step(&mut p, &file(&items));
        assert_eq!(p.items_parsed(), 5);
        assert!(Arc::ptr_eq(&first.services[0], &second.services[0]));
        assert!(!Arc::ptr_eq(&first.services[1], &second.services[1]));
        items[2] = svc("s2", "10.96.0.3", 9090);
        let third = step(&mut p, &file(&items));
        assert_eq!(p.items_parsed(), 6);
        assert!(Arc::ptr_eq(&second.services[1], &third.services[1]));
        assert_eq!(third.services[2].endpoints[0].port, Some(9090));
        // A removal parses nothing; the others stay the same `Arc`s.
        items.remove(0);
        let removed = step(&mut p, &file(&items));
        assert_eq!(p.items_parsed(), 6);
        assert_eq!(removed.services.len(), 3);
        assert!(Arc::ptr_eq(&third.services[3], &removed.services[2]));
        // A rename is a new item.
        items[0] = svc("renamed", "10.96.0.2", 9090);
        let renamed = step(&mut p, &file(&items));
        assert_eq!(p.items_parsed(), 7);
        assert_eq!(renamed.services[0].name, "renamed");
        // A malformed edit is refused with the whole parse's error ...
        let mut bad = items.clone();
        bad[1] = "  - { name: s2, namespace: shop, vip: 10.96.0.3, ports: [ { port: 80 } ], endpoints: [ { ip: 10.1.0.999 } ] }\n".into();
        let e = p.parse(path, &file(&bad)).unwrap_err().to_string();
        let whole = MeshFile::parse_whole(path, &file(&bad))
            .unwrap_err()
            .to_string();
        assert_eq!(e, whole);
        assert!(e.starts_with("m.yaml: "), "{e}");
        // ... and the good file again parses nothing: the same `Arc`s as before it.
        let back = step(&mut p, &file(&items));
        assert_eq!(p.items_parsed(), 8, "the malformed item only");
        assert!(back
            .services
            .iter()
            .zip(&renamed.services)
            .all(|(a, b)| Arc::ptr_eq(a, b)));
        // A semantic error too; the next good version is right again.
        bad[1] = svc("s3", "10.96.0.9", 8080);
        let e = p.parse(path, &file(&bad)).unwrap_err().to_string();
        assert!(e.contains("s3.shop is declared twice"), "{e}");
        step(&mut p, &file(&items));
    }

    /// The watcher's parser takes over the services consumers already hold (the start-up
    /// load's), so the first change reaches them as one new pointer.
    #[test]
    fn the_watch_parser_shares_what_consumers_hold() {
        let path = Path::new("m.yaml");
        let text = format!("{GOOD}{SECURITY}");
        let local = crate::enrol::LocalNode {
            node: "n".into(),
            trust_domain: "td".into(),
        };
        let loaded = Snapshot::from_file_on(&MeshFile::parse(path, &text).unwrap(), &local);
        let mut p = FileParser::default();
        let mut next = Snapshot::from_file_on(&p.parse(path, &text).unwrap(), &local);
        assert!(!Arc::ptr_eq(&next.services[0], &loaded.services[0]));
        p.share_unchanged(&mut next, &loaded);
        assert!(Arc::ptr_eq(&next.services[0], &loaded.services[0]));
        // From now on the parser hands out the consumers' `Arc`s.
        let again = p.parse(path, &text).unwrap();
        assert!(Arc::ptr_eq(&again.services[0], &loaded.services[0]));
        // A changed service is not shared.
        let edited = text.replace("vip: 10.96.0.2", "vip: 10.96.0.3");
        let mut changed = Snapshot::from_file_on(&p.parse(path, &edited).unwrap(), &local);
        p.share_unchanged(&mut changed, &loaded);
        assert!(!Arc::ptr_eq(&changed.services[0], &loaded.services[0]));
        assert_eq!(changed.services[0].vip, Ipv4Addr::new(10, 96, 0, 3));
    }

    #[test]
    fn unsupported_and_invalid_policy_fields_are_named() {
        let bad = format!("{GOOD}{SECURITY}")
            .replace(
                "principals: [ cluster.local/ns/shop/sa/batch ]",
                "requestPrincipals: [ \"*\" ], ipBlocks: [ 10.0.0.0/40 ]",
            )
            .replace("action: ALLOW", "action: CUSTOM")
            .replace("key: source.ip", "key: \"request.auth.claims[iss]\"")
            .replace(
                "ports: [ \"8080\" ]",
                "ports: [ \"80a\" ], paths: [ \"/a*b\" ]",
            );
        let e = MeshFile::parse(Path::new("m.yaml"), &bad)
            .unwrap_err()
            .to_string();
        for want in [
            "authorization_policies[0].spec.action: CUSTOM",
            "source.requestPrincipals/notRequestPrincipals: not supported",
            "ipBlocks: \"10.0.0.0/40\" is not an IP address or CIDR",
            "when[0].key: \"request.auth.claims[iss]\" is not supported",
            "operation.ports: Text(\"80a\") is not a port",
            "paths: \"/a*b\": `*` is allowed only at the start or the end",
        ] {
            assert!(e.contains(want), "{want}: {e}");
        }
        // A field Istio does not have is a parse error naming it.
        let typo = format!("{GOOD}{SECURITY}").replace("action: ALLOW", "acton: ALLOW");
        let e = MeshFile::parse(Path::new("m.yaml"), &typo)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `acton`"), "{e}");
        // Port-level modes need a selector; two namespace-wide policies conflict.
        let pa = format!("{GOOD}{SECURITY}").replace(
            "    spec: { mtls: { mode: STRICT } }\n",
            "    spec: { mtls: { mode: STRICT }, portLevelMtls: { 80: { mode: DISABLE } } }\n  - metadata: { name: other, namespace: istio-system }\n",
        );
        let e = MeshFile::parse(Path::new("m.yaml"), &pa)
            .unwrap_err()
            .to_string();
        assert!(e.contains("portLevelMtls: needs a selector"), "{e}");
        assert!(e.contains("already has a policy without selector"), "{e}");
    }

    #[test]
    fn workloads_of_other_nodes_are_known_not_enrolled() {
        let text = GOOD.replace(
            "    netns: /run/netns/batch\n",
            "    netns: /run/netns/batch\n    node: node-b\n    service_account: batch\n",
        );
        let f = MeshFile::parse(Path::new("m.yaml"), &text).unwrap();
        let local = crate::enrol::LocalNode {
            node: "node-a".into(),
            trust_domain: "td.example".into(),
        };
        let s = crate::enrol::Snapshot::from_file_on(&f, &local);
        let names: Vec<&str> = s.workloads.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, vec!["web", "db"]);
        assert_eq!(
            s.workloads[0].identity.as_deref(),
            Some("spiffe://td.example/ns/shop/sa/default")
        );
        let batch = s.declared.iter().find(|m| m.name == "batch").unwrap();
        assert_eq!(
            (batch.node.as_str(), batch.service_account.as_str()),
            ("node-b", "batch")
        );
        assert_eq!(
            s.declared.iter().find(|m| m.name == "web").unwrap().node,
            "node-a"
        );
        let bad = text.replace("service_account: batch", "service_account: \"a b\"");
        let e = MeshFile::parse(Path::new("m.yaml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("workloads[1].service_account"), "{e}");
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

    #[test]
    fn app_and_version_come_from_istios_labels_and_the_access_log_from_the_namespace() {
        let text = GOOD
            .replace(
                "    mode: direct\n",
                "    mode: direct\n    labels: { mesh-agent.io/access-log: \"true\" }\n",
            )
            .replace(
                "    netns: /run/netns/web\n",
                "    netns: /run/netns/web\n    labels: { app: web, app.kubernetes.io/name: storefront, version: v2 }\n",
            )
            .replace(
                "    netns: /run/netns/db\n",
                "    netns: /run/netns/db\n    labels: { app.kubernetes.io/version: \"1.4.0\" }\n",
            );
        let f = MeshFile::parse(Path::new("m.yaml"), &text).unwrap();
        let m = f.members_on("n");
        let by = |n: &str| m.iter().find(|w| w.name == n).unwrap();
        // `app.kubernetes.io/name` wins over `app`; `version` when no
        // `app.kubernetes.io/version`.
        assert_eq!(
            (by("web").app.as_str(), by("web").version.as_str()),
            ("storefront", "v2")
        );
        assert_eq!(
            (by("batch").app.as_str(), by("batch").version.as_str()),
            ("", "")
        );
        assert_eq!(
            (by("db").app.as_str(), by("db").version.as_str()),
            ("", "1.4.0")
        );
        assert!(by("db").access_log, "legacy asks for access logs");
        assert!(!by("web").access_log && !by("batch").access_log);
    }

    #[test]
    fn app_version_and_access_log_values_are_bounded_with_a_clear_error() {
        let long = "a".repeat(MAX_LABEL_VALUE + 1);
        let bad = GOOD
            .replace(
                "    netns: /run/netns/web\n",
                &format!(
                    "    netns: /run/netns/web\n    labels: {{ app: {long}, version: \"-v1\" }}\n"
                ),
            )
            .replace(
                "    mode: direct\n",
                "    mode: direct\n    labels: { mesh-agent.io/access-log: \"yes\" }\n",
            );
        let e = MeshFile::parse(Path::new("m.yaml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("workloads[0].labels.app: 64 bytes, at most 63 (a Kubernetes label value)"),
            "{e}"
        );
        assert!(
            e.contains("workloads[0].labels.version: \"-v1\" is not a label value"),
            "{e}"
        );
        assert!(
            e.contains(
                "namespaces[1].labels.mesh-agent.io/access-log: \"yes\": \"true\" or \"false\""
            ),
            "{e}"
        );
        // Exactly 63 is a label value; so is the empty one (then: not said).
        let ok = GOOD.replace(
            "    netns: /run/netns/web\n",
            &format!(
                "    netns: /run/netns/web\n    labels: {{ app: {}, version: \"\" }}\n",
                &long[1..]
            ),
        );
        let f = MeshFile::parse(Path::new("m.yaml"), &ok).unwrap();
        assert_eq!(f.members_on("n")[0].app.len(), MAX_LABEL_VALUE);
        assert_eq!(f.members_on("n")[0].version, "");
    }

    #[test]
    fn label_values_follow_kubernetes_syntax() {
        for ok in ["", "a", "v1.2.3", "my_app-2", &"x".repeat(63)] {
            assert!(is_label_value(ok), "{ok:?}");
        }
        for bad in ["-a", "a-", ".a", "a b", "ü", "a/b", &"x".repeat(64)] {
            assert!(!is_label_value(bad), "{bad:?}");
        }
        // What the control plane passes on skips values it could not (a source other
        // than the file, which checks them): the next label in Istio's order then.
        let labels: BTreeMap<String, String> = [
            ("app.kubernetes.io/name".to_owned(), "not valid!".to_owned()),
            ("app".to_owned(), "web".to_owned()),
        ]
        .into();
        assert_eq!(telemetry_label(&labels, &APP_LABELS), "web");
    }
}
