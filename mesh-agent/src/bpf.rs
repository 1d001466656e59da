//! Loading, attaching and pinning the datapath, and typed access to its maps.
//!
//! Life cycle: `preflight` checks what the kernel and the host must provide, then
//! `Datapath::load` takes the node lock (an `flock` on the pin folder), loads the embedded
//! object with load-time globals, attaches `connect4`, `connect6` and `sockops` to the
//! cgroup and `sk_msg` to `SOCKHASH` (all as kernel links owned by this process), and pins
//! every map under the pin folder. Dropping the `Datapath` (normal exit, error half-way
//! through start-up, or a crash, where the kernel closes the link fds) detaches every
//! program; `Drop` removes the pins.

pub mod btf;

use std::{
    fs::File,
    io,
    net::SocketAddrV4,
    os::fd::AsFd,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, SockHash},
    programs::{CgroupAttachMode, CgroupSockAddr, SkMsg, SockOps},
    Ebpf, EbpfLoader,
};
use mesh_common::{
    cfg_flags, map_names,
    maps::{DestInfo, ExcludeCidr, FlowInfo, MeshConfig, SockKey, WorkloadInfo},
    prog_names, Stat,
};
use tracing::{info, warn};

use crate::sys;

/// `BPF_CGROUP_INET4_CONNECT` (enum bpf_attach_type).
const BPF_CGROUP_INET4_CONNECT: u32 = 10;

/// The datapath object, built from `mesh-ebpf` by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("mesh-agent must run as root (or with CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_PERFMON); effective uid is {0}")]
    NotRoot(u32),
    #[error("missing kernel feature: {0}")]
    Kernel(String),
    #[error("another mesh-agent already runs on this node: it holds the lock on {0} (stop it, or give this one another --pin-path)")]
    AlreadyRunning(PathBuf),
    #[error("another mesh-agent's programs are attached to cgroup {cgroup} (program ids {ids:?}); two agents on one cgroup would capture every connection twice: stop the other agent")]
    AlreadyAttached { cgroup: PathBuf, ids: Vec<u32> },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("loading the eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("{what}")]
    Program {
        what: String,
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("pinning map {name} at {path}: {source}")]
    Pin {
        name: String,
        path: PathBuf,
        source: aya::pin::PinError,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> BpfError {
    let what = what.into();
    move |source| BpfError::Io { what, source }
}

/// The cgroup v2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        pre.split_whitespace().nth(4).map(PathBuf::from)
    })
}

pub fn require_root() -> Result<(), BpfError> {
    match sys::effective_uid() {
        0 => Ok(()),
        uid => Err(BpfError::NotRoot(uid)),
    }
}

/// Checks root, BTF, cgroup v2 and bpffs before anything is loaded; mounts bpffs at
/// `/sys/fs/bpf` when the pin folder's parent is not one and that is where it lives.
/// Returns the cgroup to attach to.
pub fn preflight(pin_path: &Path, cgroup: Option<&Path>) -> Result<PathBuf, BpfError> {
    require_root()?;
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(BpfError::Kernel(
            "kernel BTF (/sys/kernel/btf/vmlinux) is missing; the kernel needs CONFIG_DEBUG_INFO_BTF=y".into(),
        ));
    }
    let cgroup = match cgroup {
        Some(c) => c.to_owned(),
        None => cgroup2_mount().ok_or_else(|| {
            BpfError::Kernel("no cgroup v2 filesystem is mounted (see /proc/self/mountinfo); mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`".into())
        })?,
    };
    match sys::fs_magic(&cgroup) {
        Ok(sys::CGROUP2_SUPER_MAGIC) => {}
        Ok(_) => {
            return Err(BpfError::Kernel(format!(
                "{} is not a cgroup v2 folder",
                cgroup.display()
            )))
        }
        Err(e) => {
            return Err(BpfError::Kernel(format!(
                "cgroup {}: {e}",
                cgroup.display()
            )))
        }
    }
    let parent = pin_path.parent().unwrap_or(Path::new("/"));
    if sys::fs_magic(parent).ok() != Some(sys::BPF_FS_MAGIC) {
        if parent == Path::new("/sys/fs/bpf") {
            sys::mount_bpffs(parent).map_err(|e| {
                BpfError::Kernel(format!(
                    "bpffs is not mounted at /sys/fs/bpf and mounting it failed: {e}"
                ))
            })?;
            info!("mounted bpffs at /sys/fs/bpf");
        } else {
            return Err(BpfError::Kernel(format!(
                "{} is not on a bpffs; choose a --pin-path under a bpf filesystem (e.g. /sys/fs/bpf/mesh)",
                parent.display()
            )));
        }
    }
    Ok(cgroup)
}

/// Knobs fixed at load time.
pub struct LoadOptions<'a> {
    pub pin_path: &'a Path,
    pub cgroup: &'a Path,
    pub redirect: SocketAddrV4,
    pub skmsg: bool,
    pub queue_floor: u32,
}

/// The loaded, attached datapath. Field order is drop order: maps and programs go before
/// the pins are removed and the lock is released.
pub struct Datapath {
    pub maps: std::sync::Arc<Maps>,
    _ebpf: Ebpf,
    pins: PinDir,
}

/// Typed handles on the maps the agent writes or reads.
pub struct Maps {
    pub workloads: Mutex<HashMap<MapData, u64, WorkloadInfo>>,
    pub dests: Mutex<HashMap<MapData, u32, DestInfo>>,
    pub excludes: Mutex<Array<MapData, ExcludeCidr>>,
    pub config: Mutex<Array<MapData, MeshConfig>>,
    pub flows: Mutex<HashMap<MapData, SockKey, FlowInfo>>,
    pub stats: PerCpuArray<MapData, u64>,
    _sockhash: SockHash<MapData, SockKey>,
}

/// The pin folder: locked while the agent runs, emptied and removed on drop.
struct PinDir {
    path: PathBuf,
    _lock: OwnedFd,
}

impl PinDir {
    fn take(path: &Path) -> Result<PinDir, BpfError> {
        std::fs::create_dir_all(path)
            .map_err(io_err(format!("creating pin folder {}", path.display())))?;
        let lock = sys::lock_dir(path).map_err(|e| {
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                BpfError::AlreadyRunning(path.to_owned())
            } else {
                BpfError::Io {
                    what: format!("locking {}", path.display()),
                    source: e,
                }
            }
        })?;
        let dir = PinDir {
            path: path.to_owned(),
            _lock: lock,
        };
        // Pins left by an agent that was killed: nobody holds the lock, so they are stale.
        let stale = dir.clear();
        if stale > 0 {
            warn!(pin_path = %path.display(), stale, "removed stale pins of an earlier agent");
        }
        Ok(dir)
    }

    fn clear(&self) -> usize {
        let mut n = 0;
        if let Ok(rd) = std::fs::read_dir(&self.path) {
            for e in rd.flatten() {
                if std::fs::remove_file(e.path()).is_ok() {
                    n += 1;
                }
            }
        }
        n
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        self.clear();
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Offsets for the sk_msg back-pressure check, or zeros (check off) with a warning.
fn queue_offsets() -> (u32, u32, u32) {
    let resolve = || -> Result<(u32, u32, u32), String> {
        let btf = btf::KernelBtf::from_sys_fs().map_err(|e| e.to_string())?;
        let get = |s: &str, m: &str| btf.member_offset(s, m).map_err(|e| e.to_string());
        Ok((
            get("sock", "sk_user_data")?,
            get("sock", "sk_rcvbuf")?,
            get("sk_psock", "msg_tot_len")?,
        ))
    };
    resolve().unwrap_or_else(|e| {
        warn!(error = %e, "sk_msg back-pressure check disabled: this kernel does not expose the queue length (needs 6.9+)");
        (0, 0, 0)
    })
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(BpfError::Map {
        name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    })?;
    T::try_from(map).map_err(|source| BpfError::Map { name, source })
}

impl Datapath {
    pub fn load(o: &LoadOptions<'_>) -> Result<Datapath, BpfError> {
        let pins = PinDir::take(o.pin_path)?;
        let (off_user_data, off_rcvbuf, off_msg_tot_len) = queue_offsets();
        let mut ebpf = EbpfLoader::new()
            .override_global("OFF_SK_USER_DATA", &off_user_data, true)
            .override_global("OFF_SK_RCVBUF", &off_rcvbuf, true)
            .override_global("OFF_PSOCK_MSG_TOT_LEN", &off_msg_tot_len, true)
            .override_global("QUEUE_LIMIT_FLOOR", &o.queue_floor, true)
            .load(OBJECT)
            .map_err(BpfError::Load)?;

        // Pin first: a map is visible to operators as soon as programs can write it.
        for (name, map) in ebpf.maps() {
            if name.starts_with('.') {
                // .rodata (load-time globals) is frozen and internal; nothing to inspect.
                continue;
            }
            let path = o.pin_path.join(name);
            map.pin(&path).map_err(|source| BpfError::Pin {
                name: name.to_owned(),
                path,
                source,
            })?;
        }

        let cgroup_fd = File::open(o.cgroup)
            .map_err(io_err(format!("opening cgroup {}", o.cgroup.display())))?;
        // Another agent with another pin folder on the same cgroup: its links are alive.
        let theirs =
            sys::cgroup_prog_ids(cgroup_fd.as_fd(), BPF_CGROUP_INET4_CONNECT).map_err(io_err(
                format!("querying the programs of cgroup {}", o.cgroup.display()),
            ))?;
        let theirs: Vec<u32> = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter(|p| theirs.contains(&p.id()) && p.name_as_str() == Some(prog_names::CONNECT4))
            .map(|p| p.id())
            .collect();
        if !theirs.is_empty() {
            return Err(BpfError::AlreadyAttached {
                cgroup: o.cgroup.to_owned(),
                ids: theirs,
            });
        }
        let prog_err = |what: String| move |source| BpfError::Program { what, source };
        for name in [
            prog_names::CONNECT4,
            prog_names::CONNECT6,
            prog_names::GETPEERNAME4,
            prog_names::GETPEERNAME6,
        ] {
            let p: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or_else(|| BpfError::Kernel(format!("program {name} missing from the object")))?
                .try_into()
                .map_err(prog_err(format!("program {name}")))?;
            p.load().map_err(prog_err(format!("loading {name}")))?;
            p.attach(&cgroup_fd, CgroupAttachMode::Single)
                .map_err(prog_err(format!(
                    "attaching {name} to cgroup {}",
                    o.cgroup.display()
                )))?;
        }
        let sockops: &mut SockOps = ebpf
            .program_mut(prog_names::SOCKOPS)
            .ok_or_else(|| BpfError::Kernel("program mesh_sockops missing from the object".into()))?
            .try_into()
            .map_err(prog_err("program mesh_sockops".into()))?;
        sockops
            .load()
            .map_err(prog_err("loading mesh_sockops".into()))?;
        sockops
            .attach(&cgroup_fd, CgroupAttachMode::Single)
            .map_err(prog_err(format!(
                "attaching mesh_sockops to cgroup {}",
                o.cgroup.display()
            )))?;

        let sockhash: SockHash<MapData, SockKey> = take(&mut ebpf, map_names::SOCKHASH)?;
        let skmsg: &mut SkMsg = ebpf
            .program_mut(prog_names::SK_MSG)
            .ok_or_else(|| BpfError::Kernel("program mesh_sk_msg missing from the object".into()))?
            .try_into()
            .map_err(prog_err("program mesh_sk_msg".into()))?;
        skmsg
            .load()
            .map_err(prog_err("loading mesh_sk_msg".into()))?;
        skmsg
            .attach(sockhash.fd())
            .map_err(prog_err("attaching mesh_sk_msg to SOCKHASH".into()))?;

        let maps = Maps {
            workloads: Mutex::new(take(&mut ebpf, map_names::WORKLOADS)?),
            dests: Mutex::new(take(&mut ebpf, map_names::DESTS)?),
            excludes: Mutex::new(take(&mut ebpf, map_names::EXCLUDES)?),
            config: Mutex::new(take(&mut ebpf, map_names::CONFIG)?),
            flows: Mutex::new(take(&mut ebpf, map_names::FLOWS)?),
            stats: take(&mut ebpf, map_names::STATS)?,
            _sockhash: sockhash,
        };
        let cfg = MeshConfig {
            proxy_ip4: u32::from_ne_bytes(o.redirect.ip().octets()),
            proxy_port: o.redirect.port() as u32,
            flags: if o.skmsg { cfg_flags::SKMSG } else { 0 },
            _pad: 0,
        };
        maps.set_config(|c| *c = cfg)
            .map_err(|source| BpfError::Map {
                name: map_names::CONFIG,
                source,
            })?;
        info!(
            pin_path = %o.pin_path.display(),
            cgroup = %o.cgroup.display(),
            redirect = %o.redirect,
            backpressure_check = off_msg_tot_len != 0,
            "datapath attached"
        );
        Ok(Datapath {
            maps: std::sync::Arc::new(maps),
            _ebpf: ebpf,
            pins,
        })
    }

    pub fn pin_path(&self) -> &Path {
        &self.pins.path
    }
}

impl Maps {
    /// Read-modify-write of `CONFIG[0]`.
    pub fn set_config(&self, f: impl FnOnce(&mut MeshConfig)) -> Result<(), aya::maps::MapError> {
        let mut m = self.config.lock().unwrap_or_else(|e| e.into_inner());
        let mut c = m.get(&0, 0)?;
        f(&mut c);
        m.set(0, c, 0)
    }

    /// The original destination and flags of a captured connection, by the client's view.
    pub fn flow(&self, client: SockKey) -> Option<FlowInfo> {
        let m = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&client, 0).ok()
    }

    /// Announces one of the proxy's own connections (by its 4-tuple, before connecting) so
    /// sockops pairs it with the destination's socket.
    pub fn announce_upstream(
        &self,
        key: SockKey,
        info: FlowInfo,
    ) -> Result<(), aya::maps::MapError> {
        let mut m = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        m.insert(key, info, 0)
    }

    pub fn forget_flow(&self, key: SockKey) {
        let mut m = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        let _ = m.remove(&key);
    }

    /// Datapath counters summed over CPUs.
    pub fn stats(&self) -> Vec<(Stat, u64)> {
        Stat::ALL
            .iter()
            .map(|s| {
                let v = self
                    .stats
                    .get(&(*s as u32), 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0);
                (*s, v)
            })
            .collect()
    }
}
