//! Workload enrolment: what runs on this node, which workloads are captured, and the
//! writer that keeps the datapath maps in line with it.
//!
//! A source (today the standalone file, later Kubernetes) publishes `Snapshot`s on a
//! `watch` channel; `MapSyncer` is the single reader that turns the difference between the
//! snapshot in force and the new one into map updates, so an update costs what changed.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use mesh_common::{
    maps::{DestInfo, ExcludeCidr, WorkloadInfo},
    wl_flags,
};
use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    bpf::Maps,
    config::{parse_cidr, ExcludeRule, MeshFile, Mode},
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    pub netns: PathBuf,
    /// Outbound traffic is captured.
    pub enrolled: bool,
    /// As a destination: same-node flows go socket to socket.
    pub direct: bool,
    /// Why the workload's network namespace is not known (it is then not captured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unresolved: Option<String>,
    /// SPIFFE identity, from the pod's ServiceAccount (Kubernetes source).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// What the node should look like, as one consistent value.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Snapshot {
    pub workloads: Vec<Workload>,
    pub excludes: Vec<ExcludeRule>,
    /// Services, for the embedded control plane.
    pub services: Vec<crate::config::ServiceSpec>,
    /// Workloads as declared (labels select service endpoints).
    #[serde(skip)]
    pub declared: Vec<crate::config::WorkloadSpec>,
}

impl Snapshot {
    pub fn from_file(f: &MeshFile) -> Snapshot {
        let workloads = f
            .workloads
            .iter()
            .map(|w| Workload {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                ip: w.ip,
                netns: w.netns.clone(),
                enrolled: f.enrolled(w),
                direct: f.mode(w) == Mode::Direct,
                unresolved: None,
                identity: None,
            })
            .collect();
        Snapshot {
            workloads,
            excludes: f.exclude.clone(),
            services: f.services.clone(),
            declared: f.workloads.clone(),
        }
    }
}

/// Names for the ids the datapath carries (metrics labels, CLI output). Ids are handed
/// out once per (namespace, name) and never reused while the agent runs.
#[derive(Default)]
pub struct Registry {
    ids: BTreeMap<(String, String), u32>,
    names: Vec<(String, String)>,
}

impl Registry {
    pub fn id(&mut self, ns: &str, name: &str) -> u32 {
        if let Some(id) = self.ids.get(&(ns.to_owned(), name.to_owned())) {
            return *id;
        }
        let id = self.names.len() as u32;
        self.names.push((ns.to_owned(), name.to_owned()));
        self.ids.insert((ns.to_owned(), name.to_owned()), id);
        id
    }

    /// `namespace/name`, or `None` for unknown ids (e.g. `u32::MAX`: not a local workload).
    pub fn name(&self, id: u32) -> Option<String> {
        self.names
            .get(id as usize)
            .map(|(ns, n)| format!("{ns}/{n}"))
    }
}

pub type SharedRegistry = Arc<RwLock<Registry>>;

/// Watches the standalone file; publishes a new snapshot when its content changes and
/// parses. A bad edit is logged with file and line and the last good snapshot stays.
pub async fn watch_file(path: PathBuf, interval: Duration, tx: watch::Sender<Arc<Snapshot>>) {
    let mut last_seen: Option<(SystemTime, u64, String)> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let stamp = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        if last_seen
            .as_ref()
            .is_some_and(|(t, l, _)| (*t, *l) == stamp)
        {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        if last_seen.as_ref().is_some_and(|(_, _, old)| *old == text) {
            last_seen = Some((stamp.0, stamp.1, text));
            continue;
        }
        last_seen = Some((stamp.0, stamp.1, text.clone()));
        match MeshFile::parse(&path, &text) {
            Ok(f) => {
                let snap = Snapshot::from_file(&f);
                tx.send_if_modified(|cur| {
                    if **cur == snap {
                        return false;
                    }
                    info!(path = %path.display(), workloads = snap.workloads.len(), services = snap.services.len(), "standalone file changed");
                    *cur = Arc::new(snap);
                    true
                });
            }
            Err(e) => {
                warn!(error = %e, "enrolment file rejected; the last good configuration stays in force")
            }
        }
    }
}

/// For `/proc/<pid>/ns/net`: (pid, the process's start time in clock ticks since boot,
/// the namespace's nsfs inode); `None` for other paths or a process that is gone.
fn proc_netns_key(netns: &std::path::Path) -> Option<(u32, u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let mut parts = netns.strip_prefix("/proc").ok()?.components();
    let pid: u32 = parts.next()?.as_os_str().to_str()?.parse().ok()?;
    let start_time = || -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Field 22 (starttime), counted after the command name's closing parenthesis.
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(19)?
            .parse()
            .ok()
    };
    let start = start_time()?;
    let ino = std::fs::metadata(netns).ok()?.ino();
    // The process may have been replaced between the two reads: read the time again.
    (start_time()? == start).then_some((pid, start, ino))
}

/// Map state derived from a snapshot.
#[derive(Default, Debug, PartialEq)]
struct Desired {
    workloads: BTreeMap<u64, WorkloadInfo>,
    dests: BTreeMap<u32, DestInfo>,
    excludes: Vec<ExcludeCidr>,
}

/// The one writer of WORKLOADS, DESTS and EXCLUDES.
pub struct MapSyncer {
    maps: Arc<Maps>,
    registry: SharedRegistry,
    applied: Desired,
    /// Workloads whose network namespace could not be resolved last time (for metrics).
    pub unresolved: usize,
    /// `/proc/<pid>/ns/net` paths (the Kubernetes source): (pid, the process's start time,
    /// nsfs inode) -> cookie. A cookie costs a thread and a `setns`; the key says whether
    /// it is the same process in the same namespace as before (pids and nsfs inodes are
    /// reused, the pair with a start time is not), so an update that adds no pod costs
    /// no `setns`. Other paths (`/run/netns/NAME`) are looked up every time.
    cookies: std::collections::HashMap<(u32, u64, u64), u64>,
}

impl MapSyncer {
    pub fn new(maps: Arc<Maps>, registry: SharedRegistry) -> Self {
        MapSyncer {
            maps,
            registry,
            applied: Desired::default(),
            unresolved: 0,
            cookies: Default::default(),
        }
    }

    fn cookie(
        &mut self,
        netns: &std::path::Path,
        seen: &mut std::collections::HashSet<(u32, u64, u64)>,
    ) -> std::io::Result<u64> {
        let Some(key) = proc_netns_key(netns) else {
            return crate::sys::netns_cookie(netns);
        };
        seen.insert(key);
        if let Some(c) = self.cookies.get(&key) {
            return Ok(*c);
        }
        let c = crate::sys::netns_cookie(netns)?;
        self.cookies.insert(key, c);
        Ok(c)
    }

    fn desired(&mut self, snap: &Snapshot) -> Desired {
        let excludes = snap
            .excludes
            .iter()
            .filter_map(|e| {
                let (ip, len) = parse_cidr(&e.cidr)?;
                Some(ExcludeCidr {
                    ip4: u32::from_ne_bytes(ip.octets()),
                    prefix_len: len as u32,
                    port: e.port as u32,
                    enabled: 1,
                })
            })
            .collect();
        let mut d = Desired {
            excludes,
            ..Default::default()
        };
        let registry = self.registry.clone();
        let mut reg = registry.write().unwrap_or_else(|e| e.into_inner());
        self.unresolved = 0;
        let mut seen = std::collections::HashSet::new();
        for w in &snap.workloads {
            let id = reg.id(&w.namespace, &w.name);
            let ip4 = u32::from_ne_bytes(w.ip.octets());
            d.dests.insert(
                ip4,
                DestInfo {
                    id,
                    flags: if w.direct { wl_flags::DIRECT } else { 0 },
                },
            );
            if !w.enrolled {
                continue;
            }
            if let Some(reason) = &w.unresolved {
                self.unresolved += 1;
                warn!(workload = %format!("{}/{}", w.namespace, w.name), reason = %reason,
                    "the workload's network namespace is not known; it is not captured until it is");
                continue;
            }
            match self.cookie(&w.netns, &mut seen) {
                Ok(cookie) => {
                    d.workloads.insert(
                        cookie,
                        WorkloadInfo {
                            ip4,
                            id,
                            flags: wl_flags::ENROLLED,
                            _pad: 0,
                        },
                    );
                }
                Err(e) => {
                    self.unresolved += 1;
                    warn!(workload = %format!("{}/{}", w.namespace, w.name), netns = %w.netns.display(), error = %e,
                        "cannot resolve the workload's network namespace; it is not captured until it can be");
                }
            }
        }
        self.cookies.retain(|k, _| seen.contains(k));
        d
    }

    /// Applies the difference between what is in the maps and `snap`.
    pub fn apply(&mut self, snap: &Snapshot) -> Result<(), aya::maps::MapError> {
        let want = self.desired(snap);
        {
            let mut m = self
                .maps
                .workloads
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for k in self
                .applied
                .workloads
                .keys()
                .filter(|k| !want.workloads.contains_key(k))
            {
                let _ = m.remove(k);
            }
            for (k, v) in &want.workloads {
                if self.applied.workloads.get(k) != Some(v) {
                    m.insert(k, v, 0)?;
                }
            }
        }
        {
            let mut m = self.maps.dests.lock().unwrap_or_else(|e| e.into_inner());
            for k in self
                .applied
                .dests
                .keys()
                .filter(|k| !want.dests.contains_key(k))
            {
                let _ = m.remove(k);
            }
            for (k, v) in &want.dests {
                if self.applied.dests.get(k) != Some(v) {
                    m.insert(k, v, 0)?;
                }
            }
        }
        if want.excludes != self.applied.excludes {
            let mut m = self.maps.excludes.lock().unwrap_or_else(|e| e.into_inner());
            for i in 0..mesh_common::capacity::EXCLUDES {
                let v = want.excludes.get(i as usize).copied().unwrap_or_default();
                m.set(i, v, 0)?;
            }
        }
        info!(
            enrolled = want.workloads.len(),
            local = want.dests.len(),
            unresolved = self.unresolved,
            "datapath maps in sync"
        );
        self.applied = want;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn proc_netns_paths_are_keyed_by_process_and_namespace() {
        let me = std::process::id();
        let key = proc_netns_key(Path::new(&format!("/proc/{me}/ns/net"))).unwrap();
        assert_eq!(key.0, me);
        assert!(key.1 > 0 && key.2 > 0);
        assert_eq!(
            proc_netns_key(Path::new(&format!("/proc/{me}/ns/net"))),
            Some(key)
        );
        assert_eq!(proc_netns_key(Path::new("/run/netns/x")), None);
        assert_eq!(proc_netns_key(Path::new("/proc/999999999/ns/net")), None);
    }

    #[test]
    fn registry_ids_are_stable() {
        let mut r = Registry::default();
        let a = r.id("shop", "web");
        let b = r.id("shop", "db");
        assert_ne!(a, b);
        assert_eq!(r.id("shop", "web"), a);
        assert_eq!(r.name(b).as_deref(), Some("shop/db"));
        assert_eq!(r.name(u32::MAX), None);
    }

    #[test]
    fn snapshot_follows_labels_and_modes() {
        let f = MeshFile::parse(
            Path::new("t.yaml"),
            "namespaces:\n  - name: a\n    labels: {mesh-agent.io/dataplane-mode: ambient}\n  - name: b\n    mode: direct\n\
             workloads:\n  - {name: x, namespace: a, ip: 10.0.0.1, netns: /n/x}\n  - {name: y, namespace: b, ip: 10.0.0.2, netns: /n/y}\n\
             exclude:\n  - {cidr: 10.96.0.0/12, port: 53}\n",
        )
        .unwrap();
        let s = Snapshot::from_file(&f);
        assert!(s.workloads[0].enrolled && !s.workloads[0].direct);
        assert!(!s.workloads[1].enrolled && s.workloads[1].direct);
        assert_eq!(s.excludes.len(), 1);
        assert_eq!(s.excludes[0].cidr, "10.96.0.0/12");
        assert_eq!(s.excludes[0].port, 53);
    }
}
