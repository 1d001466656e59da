//! The map writer: keeps `WORKLOADS`, `DESTS` and `EXCLUDES` in line with the enrolment
//! snapshot in force. It is the single reader of the snapshots a source publishes and turns
//! the difference between the snapshot in force and the new one into map updates, so an
//! update costs what changed. It runs on a thread of its own (`MapWriter`), never on the
//! control runtime: a new network namespace costs a thread and a `setns`, a large update
//! thousands of syscalls.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, RwLock,
    },
    time::Duration,
};

use aya::maps::{MapData, MapError};
use mesh_common::{
    capacity, map_names,
    maps::{exclude_half, ip_addr, ip_from, DestInfo, ExcludeCidr, Ip, WorkloadInfo},
    wl_flags,
};
use tracing::{info, warn};

use crate::{
    datapath::Maps,
    enrol::{file::parse_cidr, Snapshot},
};

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
    dests: BTreeMap<Ip, DestInfo>,
    excludes: Vec<ExcludeCidr>,
}

/// One map write the kernel refused. The entry is not recorded as applied, so the next
/// apply (a new snapshot, or the periodic retry) writes it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteFailure {
    /// The map (`map_names::*`).
    pub map: &'static str,
    /// The entry, readable (`netns_cookie=...`, `ip=...`, `slot=...`).
    pub key: String,
    /// What failed, with the kernel's answer.
    pub error: String,
}

impl std::fmt::Display for WriteFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}]: {}", self.map, self.key, self.error)
    }
}

/// Map writes that failed, by map: counted for good (`mesh_map_write_failures_total`) and
/// still pending after the last apply (`mesh_map_writes_pending`).
#[derive(Debug, Default)]
pub struct MapWriteStats {
    failures: [AtomicU64; 3],
    pending: [AtomicU64; 3],
}

/// The maps `MapSyncer` writes, in the order `MapWriteStats` keeps them.
const SYNCED_MAPS: [&str; 3] = [map_names::WORKLOADS, map_names::DESTS, map_names::EXCLUDES];

impl MapWriteStats {
    /// Records the outcome of one apply.
    pub fn record(&self, failures: &[WriteFailure]) {
        use std::sync::atomic::Ordering::Relaxed;
        for (i, name) in SYNCED_MAPS.iter().enumerate() {
            let n = failures.iter().filter(|f| f.map == *name).count() as u64;
            self.failures[i].fetch_add(n, Relaxed);
            self.pending[i].store(n, Relaxed);
        }
    }

    pub fn render(&self, out: &mut String) {
        use std::{fmt::Write as _, sync::atomic::Ordering::Relaxed};
        let _ = writeln!(
            out,
            "# HELP mesh_map_write_failures_total Datapath map entries the kernel refused to write (a full map, most often); each is retried until it is written.\n\
             # TYPE mesh_map_write_failures_total counter"
        );
        for (i, name) in SYNCED_MAPS.iter().enumerate() {
            let _ = writeln!(
                out,
                "mesh_map_write_failures_total{{map=\"{name}\"}} {}",
                self.failures[i].load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP mesh_map_writes_pending Datapath map entries that failed at the last sync and wait for a retry.\n\
             # TYPE mesh_map_writes_pending gauge"
        );
        for (i, name) in SYNCED_MAPS.iter().enumerate() {
            let _ = writeln!(
                out,
                "mesh_map_writes_pending{{map=\"{name}\"}} {}",
                self.pending[i].load(Relaxed)
            );
        }
    }
}

/// A hash map as the syncer writes it: the kernel's, or a fake in tests.
trait EntryWriter<K, V> {
    fn put(&mut self, k: &K, v: &V) -> Result<(), MapError>;
    fn del(&mut self, k: &K) -> Result<(), MapError>;
}

impl<K: aya::Pod, V: aya::Pod> EntryWriter<K, V> for aya::maps::HashMap<MapData, K, V> {
    fn put(&mut self, k: &K, v: &V) -> Result<(), MapError> {
        self.insert(k, v, 0)
    }
    fn del(&mut self, k: &K) -> Result<(), MapError> {
        match self.remove(k) {
            // Already gone (deleted by hand): what was wanted.
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            r => r,
        }
    }
}

fn failure(map: &'static str, key: String, e: &MapError) -> WriteFailure {
    // The syscall's name and the errno, e.g. "bpf_map_update_elem failed: Argument list
    // too long (os error 7)" for a full hash map.
    let mut error = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        error = format!("{error}: {s}");
        source = s.source();
    }
    WriteFailure { map, key, error }
}

/// Writes the difference between `applied` and `want`, every entry on its own: removals
/// first (they make room), then inserts; a failure is recorded and the rest still goes.
/// Returns what the map holds as far as the syncer knows: `want`, except that an entry
/// whose insert failed keeps its old value (or stays absent) and one whose removal failed
/// stays, so the next sync retries exactly those.
fn sync_entries<K: Ord + Copy, V: Copy + PartialEq>(
    map: &'static str,
    m: &mut impl EntryWriter<K, V>,
    applied: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
    key_name: impl Fn(&K) -> String,
    failures: &mut Vec<WriteFailure>,
) -> BTreeMap<K, V> {
    let mut now = want.clone();
    for (k, old) in applied.iter().filter(|(k, _)| !want.contains_key(k)) {
        if let Err(e) = m.del(k) {
            failures.push(failure(map, key_name(k), &e));
            now.insert(*k, *old);
        }
    }
    for (k, v) in want {
        if applied.get(k) == Some(v) {
            continue;
        }
        if let Err(e) = m.put(k, v) {
            failures.push(failure(map, key_name(k), &e));
            match applied.get(k) {
                Some(old) => now.insert(*k, *old),
                None => now.remove(k),
            };
        }
    }
    now
}

/// The `EXCLUDES` double buffer as the syncer writes it: the kernel's, or a fake in tests.
trait ExcludeWriter {
    fn generation(&self) -> Result<u32, MapError>;
    fn set_generation(&mut self, gen: u32) -> Result<(), MapError>;
    fn set_slot(&mut self, i: u32, v: ExcludeCidr) -> Result<(), MapError>;
}

struct KernelExcludes<'a> {
    slots: std::sync::MutexGuard<'a, aya::maps::Array<MapData, ExcludeCidr>>,
    gen: std::sync::MutexGuard<'a, aya::maps::Array<MapData, u32>>,
}

impl ExcludeWriter for KernelExcludes<'_> {
    fn generation(&self) -> Result<u32, MapError> {
        self.gen.get(&0, 0)
    }
    fn set_generation(&mut self, gen: u32) -> Result<(), MapError> {
        self.gen.set(0, gen, 0)
    }
    fn set_slot(&mut self, i: u32, v: ExcludeCidr) -> Result<(), MapError> {
        self.slots.set(i, v, 0)
    }
}

/// Replaces the rule set connect4/6 reads, atomically from their view: fills the half not
/// in force, flips the generation, then clears the half left behind (so that `mesh-agent
/// dump EXCLUDES` shows the set in force). The reader's side and why no reader sees a mix
/// of the two sets: `mesh_common::maps::excludes_match`. On a failure before the flip the
/// old set stays in force; after it, the new one is; either way the caller retries.
fn write_excludes(w: &mut impl ExcludeWriter, rules: &[ExcludeCidr]) -> Result<(), WriteFailure> {
    let gen_fail = |e: &MapError| failure(map_names::EXCLUDES_GEN, "0".into(), e);
    let gen = w.generation().map_err(|e| gen_fail(&e))?;
    let next = gen.wrapping_add(1);
    let half = |g: u32| exclude_half(g)..exclude_half(g) + capacity::EXCLUDES;
    let slot_fail = |i: u32, e: &MapError| failure(map_names::EXCLUDES, format!("slot={i}"), e);
    for (n, i) in half(next).enumerate() {
        let v = rules.get(n).copied().unwrap_or_default();
        w.set_slot(i, v).map_err(|e| slot_fail(i, &e))?;
    }
    w.set_generation(next).map_err(|e| gen_fail(&e))?;
    for i in half(gen) {
        w.set_slot(i, ExcludeCidr::default())
            .map_err(|e| slot_fail(i, &e))?;
    }
    Ok(())
}

/// The one writer of WORKLOADS, DESTS and EXCLUDES. Best effort per entry: a write the
/// kernel refuses (a full map) is reported and counted, every other change still applies,
/// and the failed entry is retried by the next apply until it is written.
pub struct MapSyncer {
    maps: Arc<Maps>,
    registry: SharedRegistry,
    /// What the maps hold as far as the syncer knows (failed writes excluded).
    applied: Desired,
    /// Whether the last apply left entries unwritten.
    pending: bool,
    /// Whether `applied.excludes` is what the half in force holds (false until the first
    /// write: adopted maps may hold anything).
    excludes_written: bool,
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
        // Maps adopted from an earlier agent hold its entries: start from what is there,
        // so the first apply removes what is no longer wanted.
        let applied = Desired {
            workloads: maps
                .workloads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter_map(Result::ok)
                .collect(),
            dests: maps
                .dests
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter_map(Result::ok)
                .collect(),
            excludes: Vec::new(),
        };
        MapSyncer {
            maps,
            registry,
            applied,
            pending: false,
            excludes_written: false,
            unresolved: 0,
            cookies: Default::default(),
        }
    }

    /// Whether the last apply left entries unwritten: apply the snapshot in force again.
    pub fn needs_retry(&self) -> bool {
        self.pending
    }

    fn cookie(
        &mut self,
        netns: &std::path::Path,
        seen: &mut std::collections::HashSet<(u32, u64, u64)>,
    ) -> std::io::Result<u64> {
        let Some(key) = proc_netns_key(netns) else {
            return self.maps.netns_cookie(netns);
        };
        seen.insert(key);
        if let Some(c) = self.cookies.get(&key) {
            return Ok(*c);
        }
        let c = self.maps.netns_cookie(netns)?;
        self.cookies.insert(key, c);
        Ok(c)
    }

    fn desired(&mut self, snap: &Snapshot) -> Desired {
        let excludes = snap
            .excludes
            .iter()
            .filter_map(|e| {
                let (ip, prefix_len) = exclude_cidr(&e.cidr)?;
                Some(ExcludeCidr::new(ip, prefix_len, e.port as u32))
            })
            .collect();
        let mut d = Desired {
            excludes,
            ..Default::default()
        };
        let registry = self.registry.clone();
        let mut reg = registry.write().unwrap_or_else(|e| e.into_inner());
        self.unresolved = 0;
        let mut failures = std::collections::BTreeMap::new();
        let mut seen = std::collections::HashSet::new();
        for w in &snap.workloads {
            let id = reg.id(&w.namespace, &w.name);
            // Every local workload's namespace, enrolled or not: the accepting side of a
            // direct-mode flow to it, named by the client in the flow's key.
            let cookie = match &w.unresolved {
                Some(_) => None,
                None => Some(self.cookie(&w.netns, &mut seen)),
            };
            let netns = match &cookie {
                Some(Ok(c)) => *c,
                _ => 0,
            };
            let dest = DestInfo {
                id,
                // Direct mode needs the destination's namespace (the flow's key).
                flags: if snap.direct_allowed(w) && netns != 0 {
                    wl_flags::DIRECT
                } else {
                    0
                },
                netns,
            };
            let ip4 = ip_from(IpAddr::V4(w.ip));
            d.dests.insert(ip4, dest);
            let ip6 = w.ip6.map(|a| ip_from(IpAddr::V6(a))).unwrap_or_default();
            if w.ip6.is_some() {
                d.dests.insert(ip6, dest);
            }
            if !w.enrolled {
                continue;
            }
            let cookie = match (cookie, &w.unresolved) {
                (Some(c), _) => c,
                (None, reason) => {
                    self.unresolved += 1;
                    warn!(workload = %format!("{}/{}", w.namespace, w.name), reason = %reason.as_deref().unwrap_or(""),
                        "the workload's network namespace is not known; it is not captured until it is");
                    continue;
                }
            };
            match cookie {
                Ok(cookie) => {
                    d.workloads.insert(
                        cookie,
                        WorkloadInfo {
                            ip4,
                            ip6,
                            id,
                            flags: wl_flags::ENROLLED
                                | if w.fail_closed {
                                    wl_flags::FAIL_CLOSED
                                } else {
                                    0
                                }
                                | if w.bypass { wl_flags::BYPASS } else { 0 },
                        },
                    );
                }
                Err(e) => {
                    self.unresolved += 1;
                    warn!(workload = %format!("{}/{}", w.namespace, w.name), netns = %w.netns.display(), error = %e,
                        "cannot resolve the workload's network namespace; it is not captured until it can be");
                    failures.insert(
                        format!("{}/{}", w.namespace, w.name),
                        format!("network namespace {}: {e}", w.netns.display()),
                    );
                }
            }
        }
        *self
            .maps
            .cookie_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = failures;
        self.cookies.retain(|k, _| seen.contains(k));
        d
    }

    /// Applies the difference between what is in the maps and `snap`, entry by entry;
    /// returns the writes that failed (logged here, once per apply).
    pub fn apply(&mut self, snap: &Snapshot) -> Vec<WriteFailure> {
        let want = self.desired(snap);
        let mut failures = Vec::new();
        let workloads = {
            let mut m = self
                .maps
                .workloads
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            sync_entries(
                map_names::WORKLOADS,
                &mut *m,
                &self.applied.workloads,
                &want.workloads,
                |k| format!("netns_cookie={k}"),
                &mut failures,
            )
        };
        let dests = {
            let mut m = self.maps.dests.lock().unwrap_or_else(|e| e.into_inner());
            sync_entries(
                map_names::DESTS,
                &mut *m,
                &self.applied.dests,
                &want.dests,
                |k| format!("ip={}", ip_addr(*k)),
                &mut failures,
            )
        };
        let mut excludes = want.excludes;
        if excludes != self.applied.excludes || !self.excludes_written {
            let mut w = KernelExcludes {
                slots: self.maps.excludes.lock().unwrap_or_else(|e| e.into_inner()),
                gen: self
                    .maps
                    .excludes_gen
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
            };
            match write_excludes(&mut w, &excludes) {
                Ok(()) => self.excludes_written = true,
                Err(f) => {
                    failures.push(f);
                    // Written again, in full, by the next apply.
                    excludes = self.applied.excludes.clone();
                    self.excludes_written = false;
                }
            }
        }
        self.applied = Desired {
            workloads,
            dests,
            excludes,
        };
        self.pending = !failures.is_empty();
        if failures.is_empty() {
            info!(
                enrolled = self.applied.workloads.len(),
                local = self.applied.dests.len(),
                unresolved = self.unresolved,
                "datapath maps in sync"
            );
        } else {
            const SHOWN: usize = 5;
            let mut shown: Vec<String> =
                failures.iter().take(SHOWN).map(|f| f.to_string()).collect();
            if failures.len() > SHOWN {
                shown.push(format!("and {} more", failures.len() - SHOWN));
            }
            warn!(
                failed = failures.len(),
                failures = %shown.join("; "),
                "some datapath map writes failed; every other change applied, the failed ones are retried"
            );
        }
        failures
    }
}

/// An exclusion rule's CIDR as `EXCLUDES` holds it: IPv4 v4-mapped with its prefix length
/// plus 96, IPv6 as it is (`a::b/len`, length 128 when omitted).
fn exclude_cidr(cidr: &str) -> Option<(Ip, u32)> {
    if let Some((ip, len)) = parse_cidr(cidr) {
        return Some((ip_from(IpAddr::V4(ip)), 96 + u32::from(len)));
    }
    let (ip, len) = cidr.split_once('/').unwrap_or((cidr, "128"));
    let ip: Ipv6Addr = ip.trim().parse().ok()?;
    let len: u32 = len.trim().parse().ok()?;
    (len <= 128).then_some((ip_from(IpAddr::V6(ip)), len))
}

/// The map writer's thread: applies the snapshots it is sent (the newest of those waiting,
/// one at a time) and, while writes are pending, the snapshot in force again every
/// `retry` (a full map heals once room is made). The control runtime only hands it
/// snapshots, so a slow apply never holds up the enrolment source, the control plane or
/// the admin endpoint.
pub struct MapWriter {
    tx: Option<mpsc::Sender<Arc<Snapshot>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Resolves when the thread ends (a panic in `apply`).
    exited: tokio::sync::oneshot::Receiver<()>,
}

impl MapWriter {
    /// Starts the thread with `in_force` as the snapshot the maps were last synced to
    /// (`pending`: some of its writes failed, so it is applied again after `retry`).
    /// `apply` writes a snapshot and says whether writes are pending afterwards.
    pub fn spawn(
        retry: Duration,
        in_force: Arc<Snapshot>,
        pending: bool,
        mut apply: impl FnMut(&Snapshot) -> bool + Send + 'static,
    ) -> std::io::Result<MapWriter> {
        let (tx, rx) = mpsc::channel::<Arc<Snapshot>>();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let (alive, exited) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("map-writer".into())
            .spawn(move || {
                // Dropped when the thread ends, unwinding included.
                let _alive = alive;
                let _span = tracing::info_span!("map_sync").entered();
                let mut current = in_force;
                let mut pending = pending;
                loop {
                    let next = if pending {
                        rx.recv_timeout(retry)
                    } else {
                        rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
                    };
                    match next {
                        // Snapshots that waited behind a slow apply: the newest is the one.
                        Ok(snap) => current = rx.try_iter().last().unwrap_or(snap),
                        // Entries the last apply could not write: the snapshot in force again.
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                    if stopped.load(Ordering::Acquire) {
                        break;
                    }
                    pending = apply(&current);
                }
            })?;
        Ok(MapWriter {
            tx: Some(tx),
            stop,
            thread: Some(thread),
            exited,
        })
    }

    /// Resolves if the thread ends before `stop` (`apply` panicked; `stop` passes the
    /// panic on): the caller stops what feeds it.
    pub async fn exited(&mut self) {
        let _ = (&mut self.exited).await;
    }

    /// Hands a new snapshot to the thread; returns at once.
    pub fn send(&self, snap: Arc<Snapshot>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(snap);
        }
    }

    /// Stops the thread and waits for it: the apply in progress finishes, snapshots not
    /// started yet are dropped, and no map is written after this returns (a hand-over
    /// gives the maps to the next agent next).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            if let Err(panic) = t.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

impl Drop for MapWriter {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.stop();
        }
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
    fn exclusion_cidrs_of_both_families_match_what_they_name() {
        let (ip, len) = exclude_cidr("10.96.0.0/12").unwrap();
        assert_eq!(len, 108);
        let rule = ExcludeCidr::new(ip, len, 0);
        let at = |s: &str| ip_from(s.parse().unwrap());
        assert!(rule.matches(&at("10.100.1.1"), 80));
        assert!(rule.matches(&at("::ffff:10.100.1.1"), 80));
        assert!(!rule.matches(&at("10.112.0.1"), 80));
        let (ip, len) = exclude_cidr("fd00:10:96::/64").unwrap();
        let rule = ExcludeCidr::new(ip, len, 0);
        assert!(rule.matches(&at("fd00:10:96::7"), 80));
        assert!(!rule.matches(&at("fd00:10:97::7"), 80));
        assert_eq!(exclude_cidr("fd00::1").map(|r| r.1), Some(128));
        assert_eq!(exclude_cidr("fd00::/129"), None);
        assert_eq!(exclude_cidr("nonsense"), None);
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

    /// A hash map with a capacity, refusing inserts of new keys when full (as the kernel
    /// does with `E2BIG`), and refusing to delete the keys in `stuck`.
    #[derive(Default)]
    struct FakeMap {
        entries: BTreeMap<u32, u32>,
        capacity: usize,
        stuck: Vec<u32>,
    }

    fn errno(call: &'static str, e: i32) -> MapError {
        MapError::SyscallError(aya::sys::SyscallError {
            call,
            io_error: std::io::Error::from_raw_os_error(e),
        })
    }

    impl EntryWriter<u32, u32> for FakeMap {
        fn put(&mut self, k: &u32, v: &u32) -> Result<(), MapError> {
            if !self.entries.contains_key(k) && self.entries.len() >= self.capacity {
                return Err(errno("bpf_map_update_elem", libc::E2BIG));
            }
            self.entries.insert(*k, *v);
            Ok(())
        }
        fn del(&mut self, k: &u32) -> Result<(), MapError> {
            if self.stuck.contains(k) {
                return Err(errno("bpf_map_delete_elem", libc::EBUSY));
            }
            self.entries.remove(k);
            Ok(())
        }
    }

    #[test]
    fn a_full_map_fails_one_entry_not_the_sync_and_a_retry_heals_it() {
        // Someone else's entry takes the room the third one needs.
        let mut m = FakeMap {
            capacity: 3,
            entries: BTreeMap::from([(99, 0)]),
            ..Default::default()
        };
        let key = |k: &u32| format!("k{k}");
        let mut failures = Vec::new();
        let want = BTreeMap::from([(1, 10), (2, 20), (3, 30)]);
        let applied = sync_entries("T", &mut m, &BTreeMap::new(), &want, key, &mut failures);
        assert_eq!(failures.len(), 1);
        assert_eq!((failures[0].map, failures[0].key.as_str()), ("T", "k3"));
        assert!(
            failures[0].error.contains("bpf_map_update_elem"),
            "{}",
            failures[0]
        );
        assert!(failures[0].error.contains("os error 7"), "{}", failures[0]);
        // The failed entry is not recorded as applied; the others are.
        assert_eq!(applied, BTreeMap::from([(1, 10), (2, 20)]));

        // A later change still applies, and the failed entry is tried again.
        failures.clear();
        let want = BTreeMap::from([(1, 11), (2, 20), (3, 30)]);
        let applied = sync_entries("T", &mut m, &applied, &want, key, &mut failures);
        assert_eq!(
            failures.iter().map(|f| f.key.as_str()).collect::<Vec<_>>(),
            ["k3"]
        );
        assert_eq!(m.entries, BTreeMap::from([(1, 11), (2, 20), (99, 0)]));
        assert_eq!(applied, BTreeMap::from([(1, 11), (2, 20)]));

        // Room made: the retry (the same snapshot again) writes it.
        failures.clear();
        m.entries.remove(&99);
        let applied = sync_entries("T", &mut m, &applied, &want, key, &mut failures);
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(applied, want);
        assert_eq!(m.entries, want);
    }

    #[test]
    fn a_failed_removal_stays_recorded_and_is_retried() {
        let mut m = FakeMap {
            capacity: 8,
            stuck: vec![2],
            ..Default::default()
        };
        let key = |k: &u32| k.to_string();
        let mut failures = Vec::new();
        let all = BTreeMap::from([(1, 10), (2, 20)]);
        let applied = sync_entries("T", &mut m, &BTreeMap::new(), &all, key, &mut failures);
        let want = BTreeMap::from([(3, 30)]);
        let applied = sync_entries("T", &mut m, &applied, &want, key, &mut failures);
        assert_eq!(failures.len(), 1);
        assert_eq!(applied, BTreeMap::from([(2, 20), (3, 30)]));
        m.stuck.clear();
        failures.clear();
        let applied = sync_entries("T", &mut m, &applied, &want, key, &mut failures);
        assert!(failures.is_empty());
        assert_eq!((applied, m.entries), (want.clone(), want));
    }

    #[test]
    fn map_write_stats_count_failures_and_pending_entries() {
        let s = MapWriteStats::default();
        let f = |map| WriteFailure {
            map,
            key: "k".into(),
            error: "e".into(),
        };
        s.record(&[f(map_names::DESTS), f(map_names::DESTS)]);
        s.record(&[f(map_names::DESTS)]);
        let mut out = String::new();
        s.render(&mut out);
        assert!(
            out.contains("mesh_map_write_failures_total{map=\"DESTS\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("mesh_map_write_failures_total{map=\"WORKLOADS\"} 0\n"),
            "{out}"
        );
        assert!(
            out.contains("mesh_map_writes_pending{map=\"DESTS\"} 1\n"),
            "{out}"
        );
        s.record(&[]);
        out.clear();
        s.render(&mut out);
        assert!(
            out.contains("mesh_map_writes_pending{map=\"DESTS\"} 0\n"),
            "{out}"
        );
    }

    /// The EXCLUDES array and its generation, with every state a reader could observe:
    /// one after each single write.
    struct FakeExcludes {
        gen: u32,
        slots: Vec<ExcludeCidr>,
        history: Vec<(u32, Vec<ExcludeCidr>)>,
        /// Fail the n-th write from now.
        fail_at: Option<usize>,
    }

    impl FakeExcludes {
        fn new() -> Self {
            let slots = vec![ExcludeCidr::default(); capacity::EXCLUDE_SLOTS as usize];
            FakeExcludes {
                gen: 0,
                history: vec![(0, slots.clone())],
                slots,
                fail_at: None,
            }
        }
        fn write(&mut self, f: impl FnOnce(&mut Self)) -> Result<(), MapError> {
            if let Some(n) = self.fail_at.as_mut() {
                if *n == 0 {
                    self.fail_at = None;
                    return Err(errno("bpf_map_update_elem", libc::EIO));
                }
                *n -= 1;
            }
            f(self);
            self.history.push((self.gen, self.slots.clone()));
            Ok(())
        }
        /// The rule set in force, as connect4/6 finds it in a quiet moment.
        fn in_force(&self) -> Vec<ExcludeCidr> {
            read_view(&self.history, self.history.len() - 1, 1, 1).unwrap()
        }
    }

    impl ExcludeWriter for FakeExcludes {
        fn generation(&self) -> Result<u32, MapError> {
            Ok(self.gen)
        }
        fn set_generation(&mut self, gen: u32) -> Result<(), MapError> {
            self.write(|s| s.gen = gen)
        }
        fn set_slot(&mut self, i: u32, v: ExcludeCidr) -> Result<(), MapError> {
            self.write(|s| s.slots[i as usize] = v)
        }
    }

    /// Runs the datapath's own reader (`excludes_match`) against the writer's history:
    /// it starts at state `start` and the writer takes `steps` writes every `reads` reads
    /// of the reader. Returns the rules of the attempt that validated (`None` if every
    /// attempt raced), and records every attempt's rules, validated or not, in `raw`.
    fn read_view_raw(
        history: &[(u32, Vec<ExcludeCidr>)],
        start: usize,
        reads: usize,
        steps: usize,
        raw: &mut Vec<Vec<ExcludeCidr>>,
    ) -> Option<Vec<ExcludeCidr>> {
        use std::cell::{Cell, RefCell};
        let n = Cell::new(0usize);
        let now = || {
            let i = (start + n.get() / reads * steps).min(history.len() - 1);
            n.set(n.get() + 1);
            &history[i]
        };
        let attempt = RefCell::new(Vec::new());
        let attempts = RefCell::new(Vec::new());
        let open = Cell::new(false);
        let gen = || {
            let g = now().0;
            if open.replace(!open.get()) {
                attempts.borrow_mut().push(attempt.take());
            }
            g
        };
        let slot = |i: u32| {
            let v = now().1.get(i as usize).copied();
            attempt.borrow_mut().extend(v.filter(|e| e.enabled != 0));
            v
        };
        // An address no rule matches, so the reader reads up to the end of the set.
        let ip = ip_from(IpAddr::V4(std::net::Ipv4Addr::new(1, 2, 3, 4)));
        let r = mesh_common::maps::excludes_match(gen, slot, &ip, 1);
        let attempts = attempts.into_inner();
        raw.extend(attempts.iter().cloned());
        r.map(|hit| {
            assert!(!hit);
            attempts.last().cloned().unwrap_or_default()
        })
    }

    fn read_view(
        history: &[(u32, Vec<ExcludeCidr>)],
        start: usize,
        reads: usize,
        steps: usize,
    ) -> Option<Vec<ExcludeCidr>> {
        read_view_raw(history, start, reads, steps, &mut Vec::new())
    }

    fn rules(cidrs: &[(&str, u32)]) -> Vec<ExcludeCidr> {
        cidrs
            .iter()
            .map(|(c, port)| {
                let (ip, prefix_len) = exclude_cidr(c).unwrap();
                ExcludeCidr::new(ip, prefix_len, *port)
            })
            .collect()
    }

    #[test]
    fn an_excludes_rewrite_never_shows_a_reader_a_mix_of_two_sets() {
        let sets = [
            rules(&[("10.96.0.0/12", 0), ("10.0.0.10/32", 53)]),
            rules(&[("192.168.0.0/16", 0)]),
            rules(&[
                ("172.16.0.0/12", 443),
                ("10.96.0.0/12", 0),
                ("10.1.0.0/16", 0),
            ]),
            Vec::new(),
            rules(&[("10.2.0.0/16", 80)]),
        ];
        let mut w = FakeExcludes::new();
        for set in &sets {
            write_excludes(&mut w, set).unwrap();
            assert_eq!(&w.in_force(), set);
        }
        // Only the half in force holds rules between two rewrites (what the CLI dumps).
        let enabled = w.slots.iter().filter(|e| e.enabled != 0).count();
        assert_eq!(enabled, sets.last().unwrap().len());

        // Every state after every single write, and readers running at several speeds
        // against the writer (a reader may be preempted: the writer then runs ahead).
        let initial = Vec::new();
        let published: Vec<&Vec<ExcludeCidr>> = std::iter::once(&initial).chain(&sets).collect();
        let mut raw = Vec::new();
        let (mut validated, mut raced) = (0, 0);
        for start in 0..w.history.len() {
            for (reads, steps) in [(1, 1), (2, 1), (3, 1), (1, 2), (1, 5), (1, 17), (7, 20)] {
                match read_view_raw(&w.history, start, reads, steps, &mut raw) {
                    Some(view) => {
                        validated += 1;
                        assert!(
                            published.contains(&&view),
                            "a reader saw a set never published (start {start}, {reads}:{steps}): {view:?}"
                        );
                    }
                    None => raced += 1,
                }
            }
        }
        assert!(
            validated > raced * 10,
            "{validated} validated, {raced} raced"
        );
        // The check has teeth: without the generation re-check, readers would have acted
        // on mixed or partial sets.
        assert!(
            raw.iter().any(|v| !published.contains(&v)),
            "no interleaving produced a mixed read"
        );
    }

    #[test]
    fn a_failed_excludes_rewrite_leaves_one_whole_set_in_force() {
        let old = rules(&[("10.96.0.0/12", 0)]);
        let new = rules(&[("192.168.0.0/16", 0), ("10.0.0.0/8", 22)]);
        let writes = capacity::EXCLUDES as usize * 2 + 1;
        for fail_at in 0..writes {
            let mut w = FakeExcludes::new();
            write_excludes(&mut w, &old).unwrap();
            w.fail_at = Some(fail_at);
            let r = write_excludes(&mut w, &new);
            let f = r.expect_err("the write fails");
            // Before the flip the old set is in force; after it, the new one.
            let expect = if fail_at <= capacity::EXCLUDES as usize {
                &old
            } else {
                &new
            };
            assert_eq!(&w.in_force(), expect, "failure at write {fail_at}: {f}");
            // The retry (a whole rewrite) puts the new set in force and cleans up.
            write_excludes(&mut w, &new).unwrap();
            assert_eq!(w.in_force(), new);
            let enabled = w.slots.iter().filter(|e| e.enabled != 0).count();
            assert_eq!(enabled, new.len(), "failure at write {fail_at}");
        }
    }

    /// A snapshot told apart from others by its exclude count.
    fn snap(n: usize) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            excludes: (0..n)
                .map(|i| crate::enrol::file::ExcludeRule {
                    cidr: format!("10.{i}.0.0/16"),
                    port: 0,
                })
                .collect(),
            ..Default::default()
        })
    }

    /// A writer whose applies are reported on a channel as they start, and answer
    /// "pending" as told by `pending` (in order; then not pending); each then waits for
    /// `gate` when given (until the gate is dropped).
    fn writer(
        in_force: Arc<Snapshot>,
        initially_pending: bool,
        pending: Vec<bool>,
        gate: Option<mpsc::Receiver<()>>,
    ) -> (MapWriter, mpsc::Receiver<usize>) {
        let (tx, rx) = mpsc::channel();
        let mut pending = pending.into_iter();
        let w = MapWriter::spawn(
            Duration::from_millis(5),
            in_force,
            initially_pending,
            move |s| {
                tx.send(s.excludes.len()).unwrap();
                if let Some(g) = &gate {
                    let _ = g.recv();
                }
                pending.next().unwrap_or(false)
            },
        )
        .unwrap();
        (w, rx)
    }

    const WAIT: Duration = Duration::from_secs(10);

    #[test]
    fn the_writer_retries_the_snapshot_in_force_while_writes_are_pending() {
        // The first (synchronous) apply left writes pending: retried with no new snapshot.
        let (mut w, applied) = writer(snap(1), true, vec![true, false], None);
        assert_eq!(applied.recv_timeout(WAIT), Ok(1));
        assert_eq!(applied.recv_timeout(WAIT), Ok(1));
        // In sync now: nothing until a snapshot comes.
        w.send(snap(2));
        assert_eq!(applied.recv_timeout(WAIT), Ok(2));
        w.stop();
        assert_eq!(applied.try_iter().collect::<Vec<_>>(), Vec::<usize>::new());
    }

    #[test]
    fn snapshots_sent_during_a_slow_apply_collapse_into_the_newest() {
        let (gate_tx, gate) = mpsc::channel();
        let (mut w, applied) = writer(snap(0), false, vec![], Some(gate));
        w.send(snap(1));
        // The apply of 1 is in progress (waiting for the gate) when 2 and 3 come.
        assert_eq!(applied.recv_timeout(WAIT), Ok(1));
        w.send(snap(2));
        w.send(snap(3));
        gate_tx.send(()).unwrap();
        assert_eq!(applied.recv_timeout(WAIT), Ok(3));
        // Stopping waits for the apply in progress (3), then the thread is gone: 4 is
        // applied only if it was taken before the stop.
        w.send(snap(4));
        let stopper = std::thread::spawn(move || w.stop());
        drop(gate_tx);
        stopper.join().unwrap();
        let after: Vec<usize> = applied.iter().collect();
        assert!(after.iter().all(|n| *n == 4), "{after:?}");
    }
}
