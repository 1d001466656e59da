//! Finding a local pod's network namespace from the node itself, through the kubelet's
//! cgroup tree: the pod's folder (named after its UID) holds its containers' processes,
//! all of which share the pod's network namespace; `/proc/<pid>/ns/net` of any of them is
//! the namespace. Both kubelet cgroup drivers are understood:
//!
//! - systemd: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/<ctr>.scope`
//!   (the UID's dashes become underscores; Guaranteed pods sit directly under
//!   `kubepods.slice` as `kubepods-pod<uid_>.slice`);
//! - cgroupfs: `kubepods/<qos>/pod<uid>/<ctr>` (Guaranteed: `kubepods/pod<uid>`).
//!
//! No container runtime socket is needed, so this works with any CRI runtime.
//!
//! The walks are blocking file-system work (cgroupfs and `/proc` of a busy node can be
//! slow): from async code they go through `PodLocator::blocking`, never on the runtime.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

/// Depth of the pod folder below the kubepods root: QoS class folder, then pod.
const POD_DEPTH: usize = 2;
/// Depth of container folders below the pod folder (the sandbox and containers; some
/// runtimes nest one more level).
const CONTAINER_DEPTH: usize = 2;

/// Clones share what was found.
#[derive(Clone)]
pub struct PodLocator {
    /// Candidate kubepods roots, first existing one used.
    roots: Vec<PathBuf>,
    proc: PathBuf,
    /// Pod UID -> its cgroup folder, once found (folders do not move).
    found: Arc<Mutex<HashMap<String, PathBuf>>>,
}

impl PodLocator {
    /// `root`: the kubelet's pod cgroup folder; default: `kubepods.slice` or `kubepods`
    /// under the cgroup v2 mount.
    pub fn new(root: Option<PathBuf>, cgroup2: &Path, proc: PathBuf) -> PodLocator {
        let roots = match root {
            Some(r) => vec![r],
            None => vec![cgroup2.join("kubepods.slice"), cgroup2.join("kubepods")],
        };
        PodLocator {
            roots,
            proc,
            found: Arc::default(),
        }
    }

    /// Runs `f`, which looks pods up with this locator, on a blocking thread (tokio's
    /// blocking pool), so a slow walk never stalls the runtime the caller runs on.
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&PodLocator) -> T + Send + 'static,
    ) -> T {
        let locator = self.clone();
        match tokio::task::spawn_blocking(move || f(&locator)).await {
            Ok(t) => t,
            Err(e) => match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                // Cancelled: the runtime is shutting down, and this task with it.
                Err(_) => std::future::pending().await,
            },
        }
    }

    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// `/proc/<pid>/ns/net` of a live process of the pod, or why there is none.
    pub fn netns(&self, uid: &str) -> Result<PathBuf, String> {
        if uid.is_empty() {
            return Err("the pod has no UID".into());
        }
        let dir = self.pod_dir(uid)?;
        let mut pids = Vec::new();
        collect_pids(&dir, CONTAINER_DEPTH, &mut pids);
        if pids.is_empty() {
            return Err(format!(
                "the pod's cgroup {} holds no process yet",
                dir.display()
            ));
        }
        for pid in pids {
            let ns = self.proc.join(pid.to_string()).join("ns/net");
            if fs::metadata(&ns).is_ok() {
                return Ok(ns);
            }
        }
        Err(format!(
            "no process of the pod's cgroup {} is visible in {} (is the agent in the host PID namespace?)",
            dir.display(),
            self.proc.display()
        ))
    }

    fn pod_dir(&self, uid: &str) -> Result<PathBuf, String> {
        let mut found = self.found.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = found.get(uid) {
            if d.is_dir() {
                return Ok(d.clone());
            }
            found.remove(uid);
        }
        let Some(root) = self.roots.iter().find(|r| r.is_dir()) else {
            return Err(format!(
                "no kubelet pod cgroup folder ({}); set --kubepods-cgroup",
                self.roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            ));
        };
        let names = [
            format!("pod{uid}"),
            format!("pod{}.slice", uid.replace('-', "_")),
        ];
        let dir = find_dir(root, POD_DEPTH, &|n| {
            names.iter().any(|s| n.ends_with(s.as_str()))
        })
        .ok_or_else(|| format!("no cgroup for pod UID {uid} under {}", root.display()))?;
        found.insert(uid.to_owned(), dir.clone());
        Ok(dir)
    }

    /// Forgets pods that are gone.
    pub fn retain(&self, uids: &std::collections::BTreeSet<String>) {
        self.found
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| uids.contains(k));
    }
}

fn find_dir(dir: &Path, depth: usize, want: &dyn Fn(&str) -> bool) -> Option<PathBuf> {
    let entries = fs::read_dir(dir).ok()?;
    let mut subdirs = Vec::new();
    for e in entries.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = e.file_name();
        if want(&name.to_string_lossy()) {
            return Some(e.path());
        }
        subdirs.push(e.path());
    }
    if depth > 1 {
        for d in subdirs {
            if let Some(found) = find_dir(&d, depth - 1, want) {
                return Some(found);
            }
        }
    }
    None
}

fn collect_pids(dir: &Path, depth: usize, out: &mut Vec<u32>) {
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if depth == 0 {
        return;
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_pids(&e.path(), depth - 1, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake kubepods tree in a temp folder (plain folders: `cgroup.procs` are files).
    fn tree(layout: &[(&str, &str)]) -> PathBuf {
        let root = std::env::temp_dir().join(format!(
            "mesh-podns-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        for (dir, procs) in layout {
            let d = root.join(dir);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("cgroup.procs"), procs).unwrap();
        }
        root
    }

    #[test]
    fn systemd_and_cgroupfs_layouts_resolve_to_a_live_process() {
        let me = std::process::id().to_string();
        let uid = "0b1c2d3e-aaaa-bbbb-cccc-0123456789ab";
        for layout in [
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-1.scope", uid.replace('-', "_")),
            format!("kubepods.slice/kubepods-pod{}.slice/cri-containerd-1.scope", uid.replace('-', "_")),
            format!("kubepods/burstable/pod{uid}/0123abcd"),
        ] {
            let root = tree(&[(layout.as_str(), &format!("999999999\n{me}\n"))]);
            let loc = PodLocator::new(None, &root, PathBuf::from("/proc"));
            let ns = loc.netns(uid).unwrap_or_else(|e| panic!("{layout}: {e}"));
            assert_eq!(ns, PathBuf::from(format!("/proc/{me}/ns/net")));
            fs::remove_dir_all(&root).unwrap();
        }
    }

    #[test]
    fn every_miss_says_why() {
        let root = tree(&[("kubepods.slice/kubepods-podabc.slice", "")]);
        let loc = PodLocator::new(None, &root, PathBuf::from("/proc"));
        assert!(loc
            .netns("zzz")
            .unwrap_err()
            .contains("no cgroup for pod UID zzz"));
        assert!(loc.netns("abc").unwrap_err().contains("holds no process"));
        let none = PodLocator::new(None, &root.join("nope"), PathBuf::from("/proc"));
        assert!(none.netns("abc").unwrap_err().contains("--kubepods-cgroup"));
        fs::remove_dir_all(&root).unwrap();
    }

    /// Issue 9, item 3: a walk runs on a blocking thread, not on the caller's runtime
    /// (a current-thread runtime keeps running other tasks meanwhile).
    #[test]
    fn walks_run_off_the_runtime() {
        let me = std::process::id().to_string();
        let uid = "0b1c2d3e-aaaa-bbbb-cccc-0123456789ab";
        let root = tree(&[(&format!("kubepods/besteffort/pod{uid}/c1") as &str, &me)]);
        let loc = PodLocator::new(None, &root, PathBuf::from("/proc"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let runtime_thread = std::thread::current().id();
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let (ns, ticked) = rt.block_on(async {
            let walk = loc.blocking(move |l| {
                assert_ne!(std::thread::current().id(), runtime_thread);
                // The runtime's other task must run while this walk is held up.
                gate.recv_timeout(std::time::Duration::from_secs(10))
                    .expect("the runtime stalled while the walk ran");
                l.netns(uid)
            });
            let other = async {
                release.send(()).unwrap();
                true
            };
            tokio::join!(walk, other)
        });
        assert!(ticked);
        assert_eq!(ns.unwrap(), PathBuf::from(format!("/proc/{me}/ns/net")));
        // Clones share what was found.
        assert!(loc.clone().found.lock().unwrap().contains_key(uid));
        fs::remove_dir_all(&root).unwrap();
    }
}
