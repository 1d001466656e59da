//! Loading, attaching and pinning the datapath, and typed access to its maps.
//!
//! Life cycle: `preflight` checks what the kernel and the host must provide, then
//! `Datapath::load` takes the node lock (an `flock` on the pin folder), loads the embedded
//! object with load-time globals, attaches `connect4`, `connect6` and `sockops` (and,
//! below 5.15, `mesh_sock_netns`) to the cgroup and `sk_msg` to `SOCKHASH` (all as
//! kernel links owned by this process), and pins every map under the pin folder. Dropping the `Datapath` (normal exit, error half-way
//! through start-up, or a crash, where the kernel closes the link fds) detaches every
//! program; `Drop` removes the pins.

pub mod btf;
pub mod close;
pub mod events;
pub mod features;
pub mod relay;
pub mod ring;
pub mod tc;
pub mod writer;

use std::{
    collections::BTreeSet,
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsFd,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{Mutex, RwLock},
};

use aya::{
    maps::{Array, HashMap, MapData, MapInfo, PerCpuArray, SkStorage, SockHash},
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, SchedClassifier, SkMsg, SockOps},
    Ebpf, EbpfLoader,
};
use mesh_common::{
    cfg_flags, map_names,
    maps::{
        ip_addr, ip_from, DestInfo, ExcludeCidr, FlowInfo, InboundInfo, Ip, MeshConfig,
        ProxyHealth, SockKey, SockState, WorkloadInfo,
    },
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
    /// The proxy's IPv6 outbound listener (`--proxy-redirect6`); `None`: native IPv6 is
    /// not captured.
    pub redirect6: Option<SocketAddrV6>,
    pub skmsg: bool,
    pub queue_floor: u32,
    /// A proxy heartbeat older than this means the proxy cannot serve (zero: no check).
    pub heartbeat_timeout: std::time::Duration,
    /// Wait this long for the node lock (a hand-over: the old agent releases it) instead
    /// of failing at once.
    pub lock_wait: Option<std::time::Duration>,
    /// How pods' network-namespace cookies are read.
    pub netns_cookie: features::NetnsCookieMode,
    /// Pair sockets even where the kernel cannot show the redirect queue (< 6.9).
    pub unbounded_pairing: bool,
    /// Features to treat as missing whatever the kernel has (tests of the fallbacks).
    pub assume_missing: &'a [String],
    /// Entries of `FLOWS` and `SOCKHASH` (`--flows-capacity`, `--sockhash-capacity`).
    pub capacity: Capacity,
    /// The kernel relay of proxied flows (`--kernel-relay`): on where the kernel has what
    /// it needs (`features::KERNEL_RELAY`).
    pub kernel_relay: bool,
    /// `--kernel-relay egress`: the client's direction only, onto the proxy leg's send
    /// path (`relay_mode::EGRESS`).
    pub kernel_relay_egress: bool,
}

/// Sizes of the maps a workload's connections fill, chosen at load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Capacity {
    pub flows: u32,
    pub sockhash: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            flows: mesh_common::capacity::FLOWS,
            sockhash: mesh_common::capacity::SOCKHASH,
        }
    }
}

/// The loaded, attached datapath. Field order is drop order: maps and programs go before
/// the pins are removed and the lock is released.
pub struct Datapath {
    /// The reader of direct-mode flow records (`start_flow_telemetry`); before it starts,
    /// the ring it will read.
    _flows: Option<events::FlowReader>,
    flow_events: Option<aya::maps::RingBuf<MapData>>,
    /// The reader of the programs' decision log (first: it stops before the rest goes).
    _events: Option<events::EventReader>,
    pub maps: std::sync::Arc<Maps>,
    /// The TC inbound program, attached per pod by `proxy::inbound` (which owns those
    /// attachments and detaches them before this value is dropped).
    pub tc: std::sync::Arc<tc::TcProgram>,
    /// The sk_msg attachment to `SOCKHASH` (a plain attach, not a link): forgotten instead
    /// of detached when the datapath is kept.
    skmsg_link: Option<aya::programs::sk_msg::SkMsgLink>,
    /// `mesh_relay_back`'s attachment to `RELAY_UP` (egress relay only; the map is not
    /// pinned, so both go with the agent).
    _relay_back_link: Option<aya::programs::sk_skb::SkSkbLink>,
    /// Links adopted from an earlier agent's pins (those this agent attached are held by
    /// their pins, `link_<program>`, alone).
    _links: Vec<OwnedFd>,
    _ebpf: Ebpf,
    pins: PinDir,
    /// What the start found: maps adopted from an earlier agent, links updated in place.
    pub adopted_maps: usize,
    pub adopted_links: usize,
}

/// Interfaces whose addresses are not the node's own in the sense of `NODE_ADDRS`:
/// kube-proxy's IPVS mode puts every ClusterIP on `kube-ipvs0`, and connections to those
/// must still be captured (IPVS answers them with pods, not with the host).
const NODE_ADDR_SKIP: &[&str] = &["kube-ipvs0"];

/// A user-space copy of `NODE_ADDRS`' keys: read per captured connection by the proxy,
/// replaced whole by `Maps::sync_node_addrs` (a few dozen addresses, rarely changed).
#[derive(Default)]
struct NodeAddrSet(RwLock<BTreeSet<Ip>>);

impl NodeAddrSet {
    fn contains(&self, ip: &Ip) -> bool {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(ip)
    }

    fn replace(&self, set: BTreeSet<Ip>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = set;
    }
}

/// What one `Maps::sync_node_addrs` changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NodeAddrSync {
    pub added: usize,
    pub removed: usize,
    pub failed: usize,
    /// Addresses recorded after the sync.
    pub current: usize,
}

/// Typed handles on the maps the agent writes or reads.
pub struct Maps {
    pub workloads: Mutex<HashMap<MapData, u64, WorkloadInfo>>,
    pub dests: Mutex<HashMap<MapData, Ip, DestInfo>>,
    pub excludes: Mutex<Array<MapData, ExcludeCidr>>,
    /// The generation of the `EXCLUDES` double buffer (`writer::write_excludes`).
    pub excludes_gen: Mutex<Array<MapData, u32>>,
    pub config: Mutex<Array<MapData, MeshConfig>>,
    pub flows: Mutex<HashMap<MapData, SockKey, FlowInfo>>,
    /// Per-socket state (socket storage), read by the proxy through its accepted sockets.
    sock_state: SkStorage<MapData, SockState>,
    /// The node's own addresses (IPv4 v4-mapped, IPv6) -> interface index. Written only by
    /// `sync_node_addrs`, which keeps `node_addr_set` in step.
    node_addrs: Mutex<HashMap<MapData, Ip, u32>>,
    /// The keys of `NODE_ADDRS` as user space last wrote them, so the proxy's per-connection
    /// check (`is_node_addr`) is a memory lookup, not a `bpf()` system call.
    node_addr_set: NodeAddrSet,
    /// The proxy's heartbeat, read by connect4/6.
    pub proxy_health: Mutex<Array<MapData, ProxyHealth>>,
    /// Local enrolled workloads by IPv4 address, for the TC inbound program.
    pub inbound: Mutex<HashMap<MapData, u32, InboundInfo>>,
    /// The same by IPv6 address.
    pub inbound6: Mutex<HashMap<MapData, Ip, InboundInfo>>,
    pub stats: PerCpuArray<MapData, u64>,
    _sockhash: SockHash<MapData, SockKey>,
    /// The agent's netns-cookie probes (`Maps::netns_cookie`), one at a time.
    netns_probe: Mutex<HashMap<MapData, u64, u64>>,
    /// What the kernel offers beyond the datapath's floor, and how cookies are read.
    pub features: features::KernelFeatures,
    /// The node proxy's network-namespace cookie (the agent's own namespace): the first
    /// word of the `FLOWS` key of every proxied flow (`CONFIG.proxy_netns`).
    pub proxy_netns: u64,
    /// The kernel relay's maps, when `--kernel-relay` is on and the kernel has it.
    pub relay: Option<relay::RelayMaps>,
    /// Enrolled workloads (`namespace/name`) the map writer could not put in `WORKLOADS`
    /// because their network namespace's cookie could not be read, with the error: the
    /// admin endpoint reports them unresolved, never captured.
    pub cookie_failures: Mutex<std::collections::BTreeMap<String, String>>,
}

/// The pin folder: locked while the agent runs, emptied and removed on drop.
struct PinDir {
    path: PathBuf,
    /// Held while this agent owns the node; released early by a hand-over.
    lock: Option<OwnedFd>,
    /// Leave the pins (maps and links) for the next agent.
    keep: bool,
}

impl PinDir {
    fn take(path: &Path, wait: Option<std::time::Duration>) -> Result<PinDir, BpfError> {
        std::fs::create_dir_all(path)
            .map_err(io_err(format!("creating pin folder {}", path.display())))?;
        let lock = match wait {
            Some(t) => sys::lock_dir_wait(path, t),
            None => sys::lock_dir(path),
        };
        let lock = lock.map_err(|e| {
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                BpfError::AlreadyRunning(path.to_owned())
            } else {
                BpfError::Io {
                    what: format!("locking {}", path.display()),
                    source: e,
                }
            }
        })?;
        Ok(PinDir {
            path: path.to_owned(),
            lock: Some(lock),
            keep: false,
        })
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
        if self.keep {
            return;
        }
        self.clear();
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// `(key size, value size, max entries)` each pinned map must have for this build's
/// programs: a map pinned by another build with another layout is not adopted.
fn expected_layout(name: &str, capacity: Capacity) -> Option<(u32, u32, u32)> {
    use mesh_common::capacity as cap;
    use std::mem::size_of;
    let sz = |n: usize| n as u32;
    Some(match name {
        map_names::WORKLOADS => (8, sz(size_of::<WorkloadInfo>()), cap::WORKLOADS),
        map_names::DESTS => (16, sz(size_of::<DestInfo>()), cap::DESTS),
        map_names::CONFIG => (4, sz(size_of::<MeshConfig>()), 1),
        map_names::PROXY_HEALTH => (4, sz(size_of::<ProxyHealth>()), 1),
        map_names::EXCLUDES => (4, sz(size_of::<ExcludeCidr>()), cap::EXCLUDE_SLOTS),
        map_names::EXCLUDES_GEN => (4, 4, 1),
        // Socket storage: the key is a socket fd, there is no size.
        map_names::SOCK_STATE => (4, sz(size_of::<SockState>()), 0),
        map_names::FLOWS => (
            sz(size_of::<SockKey>()),
            sz(size_of::<FlowInfo>()),
            capacity.flows,
        ),
        map_names::SOCKHASH => (sz(size_of::<SockKey>()), 4, capacity.sockhash),
        map_names::STATS => (4, 8, Stat::COUNT),
        map_names::NODE_ADDRS => (16, 4, cap::NODE_ADDRS),
        map_names::INBOUND => (4, sz(size_of::<InboundInfo>()), cap::INBOUND),
        map_names::INBOUND6 => (16, sz(size_of::<InboundInfo>()), cap::INBOUND),
        map_names::NETNS_PROBE => (8, 8, cap::NETNS_PROBE),
        map_names::SOCK_NETNS => (4, 8, 0),
        _ => return None,
    })
}

/// Checks the maps an earlier agent left pinned: compatible ones are adopted (their state,
/// connections' flows and the sockhash included, carries over), others are removed and
/// created afresh. Returns how many are adopted.
fn vet_pinned_maps(pin_path: &Path, capacity: Capacity) -> usize {
    // Maps of earlier builds that no longer exist: per-socket state moved to socket
    // storage (`SOCK_STATE`), kernel addresses out of pinned maps.
    for gone in ["SOCK_ORIG", "SK_ADDR", "FALLBACK"] {
        let path = pin_path.join(gone);
        if path.exists() {
            let _ = std::fs::remove_file(&path);
        }
    }
    let mut adopted = 0;
    for name in map_names::ALL {
        let path = pin_path.join(name);
        if !path.exists() {
            continue;
        }
        let fits = MapInfo::from_pin(&path).ok().is_some_and(|i| {
            expected_layout(name, capacity) == Some((i.key_size(), i.value_size(), i.max_entries()))
        });
        if fits {
            adopted += 1;
        } else {
            warn!(
                map = name,
                "a pinned map of another layout (another build): recreated, its entries are lost"
            );
            let _ = std::fs::remove_file(&path);
        }
    }
    adopted
}

/// The pin of a program's cgroup link: while it exists the program stays attached, also
/// when no agent runs (`--on-exit keep`).
fn link_pin(pin_path: &Path, prog: &str) -> PathBuf {
    pin_path.join(format!("link_{prog}"))
}

/// `RELAY_WAKE`'s size in bytes: `RELAY_WAKE_BYTES` with the egress relay's destination
/// direction on, else 4 KiB (no record is ever written), and at least one page either
/// way: a ring buffer's size must be a power of two multiple of the page size (both are
/// powers of two, so the larger one is).
fn wake_ring_bytes(back_direction: bool) -> u32 {
    let want = if back_direction {
        mesh_common::capacity::RELAY_WAKE_BYTES
    } else {
        4096
    };
    let page = u32::try_from(sys::page_size())
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096);
    want.max(page)
}

/// `struct tcp_sock` offsets of `write_seq` and `copied_seq`, for the recovery from a
/// back-pressure fallback and the kernel relay's switch, or zeros (neither) with a
/// warning.
fn tcp_seq_offsets() -> [u32; 2] {
    let resolve = || -> Result<[u32; 2], String> {
        let btf = btf::KernelBtf::from_sys_fs().map_err(|e| e.to_string())?;
        let get = |m: &str| btf.member_offset("tcp_sock", m).map_err(|e| e.to_string());
        Ok([get("write_seq")?, get("copied_seq")?])
    };
    resolve().unwrap_or_else(|e| {
        warn!(error = %e, "sk_msg fallback recovery disabled: tcp_sock offsets not found in the kernel's BTF");
        [0; 2]
    })
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

/// `struct sk_msg` offsets of `sk` and `sk_redir`: how sk_msg learns its own and its
/// peer's socket address without a kernel pointer in a pinned map. Zeros (back-pressure
/// check off) with a warning.
fn sk_msg_offsets() -> (u32, u32) {
    let resolve = || -> Result<(u32, u32), String> {
        let btf = btf::KernelBtf::from_sys_fs().map_err(|e| e.to_string())?;
        let get = |m: &str| btf.member_offset("sk_msg", m).map_err(|e| e.to_string());
        Ok((get("sk")?, get("sk_redir")?))
    };
    resolve().unwrap_or_else(|e| {
        warn!(error = %e, "sk_msg back-pressure check disabled: struct sk_msg offsets not found in the kernel's BTF");
        (0, 0)
    })
}

/// What became of `mesh_sock_netns`.
enum StampLink {
    /// Loaded (verified), not attached: not wanted here.
    Loaded,
    /// Attached now, its link pinned.
    Attached,
    /// Swapped into the link an earlier agent pinned (this fd keeps it).
    Adopted(OwnedFd),
}

/// Loads `mesh_sock_netns` and, when `attach`, links it to the cgroup (taking over an
/// earlier agent's pinned link, else attaching and pinning a new one).
fn sock_netns_program(
    ebpf: &mut Ebpf,
    cgroup: &File,
    pin: &Path,
    attach: bool,
) -> Result<StampLink, BpfError> {
    let name = prog_names::SOCK_NETNS;
    let err = |what: &str| {
        let what = format!("{what} {name}");
        move |source| BpfError::Program { what, source }
    };
    let p: &mut CgroupSock = ebpf
        .program_mut(name)
        .ok_or_else(|| BpfError::Kernel(format!("program {name} missing from the object")))?
        .try_into()
        .map_err(err("program"))?;
    p.load().map_err(err("loading"))?;
    if !attach {
        return Ok(StampLink::Loaded);
    }
    if let Some(fd) = adopt_link(pin, p.fd().map_err(err("loading"))?)? {
        return Ok(StampLink::Adopted(fd));
    }
    let id = p
        .attach(cgroup, CgroupAttachMode::Single)
        .map_err(err("attaching"))?;
    let link: aya::programs::links::FdLink = p
        .take_link(id)
        .map_err(err("attaching"))?
        .try_into()
        .map_err(|e| BpfError::Kernel(format!("the link of {name}: {e}")))?;
    // The pin keeps the link; our fd may close with the process.
    drop(link.pin(pin).map_err(|source| BpfError::Pin {
        name: format!("link of {name}"),
        path: pin.to_owned(),
        source,
    })?);
    Ok(StampLink::Attached)
}

/// Swaps `prog` into the link pinned at `pin`, if there is one. `None`: no pin (attach).
fn adopt_link(pin: &Path, prog: &aya::programs::ProgramFd) -> Result<Option<OwnedFd>, BpfError> {
    if !pin.exists() {
        return Ok(None);
    }
    match sys::bpf_obj_get(pin).and_then(|link| {
        sys::bpf_link_update(link.as_fd(), prog.as_fd())?;
        Ok(link)
    }) {
        Ok(link) => Ok(Some(link)),
        Err(e) => {
            // A pin we cannot use (another kind of object, a link that died): start over.
            warn!(pin = %pin.display(), error = %e, "a pinned link could not be taken over; attaching afresh");
            let _ = std::fs::remove_file(pin);
            Ok(None)
        }
    }
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
    /// What keeps the programs' log level in line with the agent's log filter, if the
    /// decision log has a reader (without one the level stays off): the wiring hands it
    /// to `admin::logging::on_change`, so the datapath never names the admin module.
    pub fn log_level_follower(&self) -> Option<Box<dyn Fn() + Send + Sync>> {
        self._events
            .as_ref()
            .map(|_| events::log_level_follower(&self.maps))
    }

    pub fn load(o: &LoadOptions<'_>) -> Result<Datapath, BpfError> {
        let pins = PinDir::take(o.pin_path, o.lock_wait)?;
        let adopted_maps = vet_pinned_maps(o.pin_path, o.capacity);
        let (off_user_data, off_rcvbuf, mut off_msg_tot_len) = queue_offsets();
        let (off_msg_sk, off_msg_sk_redir) = sk_msg_offsets();
        let assumed_missing = |f: &str| o.assume_missing.iter().any(|m| m == f);
        if assumed_missing(features::SKMSG_QUEUE_LENGTH) {
            off_msg_tot_len = 0;
        }
        // Without the queue length a redirect into a slow reader has no bound: pair no
        // sockets unless the operator accepts that.
        let no_pairing = off_msg_tot_len == 0 && !o.unbounded_pairing;
        let tcp_seq = tcp_seq_offsets();
        // The relay needs the queue check (its back-pressure and its switch) and the
        // sequence offsets; the programs' code for it is dead (never verified) unless on.
        let relay_possible = off_msg_tot_len != 0
            && off_msg_sk != 0
            && off_msg_sk_redir != 0
            && tcp_seq.iter().all(|o| *o != 0)
            && !assumed_missing(features::KERNEL_RELAY);
        let kernel_relay = o.kernel_relay && relay_possible;
        let egress_offsets = if kernel_relay && o.kernel_relay_egress {
            relay::egress_offsets()
        } else {
            [0; 5]
        };
        let relay_on = match (kernel_relay, o.kernel_relay_egress) {
            (false, _) => 0,
            (true, false) => mesh_common::maps::relay_mode::INGRESS,
            (true, true) => mesh_common::maps::relay_mode::EGRESS,
        };
        // Egress mode's destination direction (`mesh_relay_back` on `RELAY_UP`): loaded
        // only with the egress relay on, and where the program's offsets resolve.
        let back_offsets = if relay_on == mesh_common::maps::relay_mode::EGRESS
            && egress_offsets.iter().all(|o| *o != 0)
        {
            relay::back_offsets()
        } else {
            None
        };
        let back_caps = if back_offsets.is_some() {
            mesh_common::capacity::RELAY
        } else {
            1
        };
        let back_off = back_offsets.unwrap_or([0; 3]);
        // sockops reads an accepting socket's namespace itself where it may (5.15+).
        let sockops_netns =
            features::KernelFeatures::release_at_least(&sys::kernel_release(), 5, 15)
                && !assumed_missing(features::SOCKOPS_NETNS_COOKIE);
        let sockops_netns_on = u32::from(sockops_netns);
        // Where it cannot, sockops reads the stamp `mesh_sock_netns` leaves on each TCP
        // socket (attached below, only then); the lookup is dead code otherwise.
        let stamp_wanted = !sockops_netns && !assumed_missing(features::SOCK_NETNS_STAMP);
        let stamp_on = u32::from(stamp_wanted);
        // The unread-close mark needs the queue length and `struct sock`'s addresses.
        let close_offsets = if off_msg_tot_len != 0
            && !assumed_missing(features::CLOSE_UNREAD_RESET)
        {
            close::offsets().unwrap_or_else(|e| {
                warn!(error = %e, "mesh_close_unread disabled: struct sock offsets not found in the kernel's BTF");
                [0; 10]
            })
        } else {
            [0; 10]
        };
        let map_paths: Vec<(&'static str, PathBuf)> = map_names::ALL
            .iter()
            .map(|n| (*n, o.pin_path.join(n)))
            .collect();
        let mut loader = EbpfLoader::new();
        loader
            .override_global("OFF_SK_USER_DATA", &off_user_data, true)
            .override_global("OFF_SK_RCVBUF", &off_rcvbuf, true)
            .override_global("OFF_PSOCK_MSG_TOT_LEN", &off_msg_tot_len, true)
            .override_global("OFF_TCP_WRITE_SEQ", &tcp_seq[0], true)
            .override_global("OFF_TCP_COPIED_SEQ", &tcp_seq[1], true)
            .override_global("KERNEL_RELAY", &relay_on, true)
            .override_global("OFF_TCP_SND_UNA", &egress_offsets[0], true)
            .override_global("OFF_SK_SNDBUF", &egress_offsets[1], true)
            .override_global("OFF_SK_SOCKET", &egress_offsets[2], true)
            .override_global("OFF_SOCKET_FILE", &egress_offsets[3], true)
            .override_global("OFF_FILE_FLAGS", &egress_offsets[4], true)
            .override_global("OFF_SKB_SK_REDIR", &back_off[0], true)
            .override_global("OFF_PSOCK_INGRESS_QLEN", &back_off[1], true)
            .override_global("OFF_PSOCK_STATE", &back_off[2], true)
            .map_max_entries(map_names::RELAY_UP, back_caps)
            .map_max_entries(map_names::RELAY_BACK, back_caps)
            .map_max_entries(map_names::RELAY_ARMED, back_caps)
            .map_max_entries(
                map_names::RELAY_WAKE,
                wake_ring_bytes(back_offsets.is_some()),
            )
            .override_global("SOCKOPS_NETNS", &sockops_netns_on, true)
            .override_global("SOCK_NETNS_STAMP", &stamp_on, true)
            .override_global("OFF_MSG_SK", &off_msg_sk, true)
            .override_global("OFF_MSG_SK_REDIR", &off_msg_sk_redir, true)
            .override_global("QUEUE_LIMIT_FLOOR", &o.queue_floor, true)
            .override_global("CLOSE_OFFSETS", &close_offsets, true)
            .map_max_entries(map_names::FLOWS, o.capacity.flows)
            .map_max_entries(map_names::SOCKHASH, o.capacity.sockhash)
            .map_max_entries(
                map_names::RELAY,
                if kernel_relay {
                    mesh_common::capacity::RELAY
                } else {
                    1
                },
            );
        // Every map is opened from its pin when an earlier agent left one (adopted, with
        // its state), else created and pinned: visible to operators before any program
        // can write it.
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).map_err(BpfError::Load)?;

        let cgroup_fd = File::open(o.cgroup)
            .map_err(io_err(format!("opening cgroup {}", o.cgroup.display())))?;
        // Another agent with another pin folder on the same cgroup: its links are alive.
        let theirs =
            sys::cgroup_prog_ids(cgroup_fd.as_fd(), BPF_CGROUP_INET4_CONNECT).map_err(io_err(
                format!("querying the programs of cgroup {}", o.cgroup.display()),
            ))?;
        // Programs attached through our own pinned links (an earlier agent of this pin
        // folder) are ours to replace.
        let ours: Vec<u32> =
            aya::programs::links::PinnedLink::from_pin(link_pin(o.pin_path, prog_names::CONNECT4))
                .ok()
                .map(aya::programs::links::FdLink::from)
                .and_then(|l| l.info().ok())
                .map(|i| vec![i.program_id()])
                .unwrap_or_default();
        let theirs: Vec<u32> = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter(|p| {
                theirs.contains(&p.id())
                    && !ours.contains(&p.id())
                    && p.name_as_str() == Some(prog_names::CONNECT4)
            })
            .map(|p| p.id())
            .collect();
        if !theirs.is_empty() {
            return Err(BpfError::AlreadyAttached {
                cgroup: o.cgroup.to_owned(),
                ids: theirs,
            });
        }
        let prog_err = |what: String| move |source| BpfError::Program { what, source };
        let mut links = Vec::new();
        let mut adopted_links = 0;
        for name in [
            prog_names::CONNECT4,
            prog_names::CONNECT6,
            prog_names::GETPEERNAME4,
            prog_names::GETPEERNAME6,
            prog_names::SOCKOPS,
        ] {
            let pin = link_pin(o.pin_path, name);
            let program = ebpf.program_mut(name).ok_or_else(|| {
                BpfError::Kernel(format!("program {name} missing from the object"))
            })?;
            let attach = |what: &str, e: aya::programs::ProgramError| BpfError::Program {
                what: format!("{what} {name} (cgroup {})", o.cgroup.display()),
                source: e,
            };
            // Load, then either swap it into the link an earlier agent pinned (one step:
            // connections never see no program) or attach it.
            // The same steps for both program types, which aya gives no common trait.
            macro_rules! load_and_link {
                ($ty:ty) => {{
                    let p: &mut $ty = program
                        .try_into()
                        .map_err(prog_err(format!("program {name}")))?;
                    p.load().map_err(prog_err(format!("loading {name}")))?;
                    if let Some(fd) = adopt_link(&pin, p.fd().map_err(|e| attach("loading", e))?)? {
                        links.push(fd);
                        adopted_links += 1;
                        None
                    } else {
                        let id = p
                            .attach(&cgroup_fd, CgroupAttachMode::Single)
                            .map_err(|e| attach("attaching", e))?;
                        p.take_link(id).ok().and_then(|l| l.try_into().ok())
                    }
                }};
            }
            let fdlink: Option<aya::programs::links::FdLink> = if name == prog_names::SOCKOPS {
                load_and_link!(SockOps)
            } else {
                load_and_link!(CgroupSockAddr)
            };
            if let Some(l) = fdlink {
                let pinned = l.pin(&pin).map_err(|source| BpfError::Pin {
                    name: format!("link of {name}"),
                    path: pin.clone(),
                    source,
                })?;
                // The pin keeps the link; our fd may close with the process.
                drop(pinned);
            }
        }

        // The namespace stamp for sockops' flow keys: loaded (verified) on every kernel, so
        // `/kernel` says whether this one can run it; attached only where sockops cannot
        // read a socket's namespace itself.
        let stamp_pin = link_pin(o.pin_path, prog_names::SOCK_NETNS);
        let sock_netns_stamp = match sock_netns_program(
            &mut ebpf,
            &cgroup_fd,
            &stamp_pin,
            stamp_wanted,
        ) {
            Ok(StampLink::Attached) => true,
            Ok(StampLink::Adopted(fd)) => {
                links.push(fd);
                adopted_links += 1;
                true
            }
            Ok(StampLink::Loaded) => !assumed_missing(features::SOCK_NETNS_STAMP),
            Err(e) => {
                warn!(error = %e, "the socket namespace stamp (mesh_sock_netns) is not available");
                false
            }
        };
        if !(stamp_wanted && sock_netns_stamp) && stamp_pin.exists() {
            // An earlier agent's stamp link this node no longer needs: detach it.
            let _ = std::fs::remove_file(&stamp_pin);
        }

        let sockhash: SockHash<MapData, SockKey> = take(&mut ebpf, map_names::SOCKHASH)?;
        let skmsg: &mut SkMsg = ebpf
            .program_mut(prog_names::SK_MSG)
            .ok_or_else(|| BpfError::Kernel("program mesh_sk_msg missing from the object".into()))?
            .try_into()
            .map_err(prog_err("program mesh_sk_msg".into()))?;
        skmsg
            .load()
            .map_err(prog_err("loading mesh_sk_msg".into()))?;
        // Attaching to a SOCKHASH that already has our earlier sk_msg (adopted) replaces it.
        let skmsg_id = skmsg
            .attach(sockhash.fd())
            .map_err(prog_err("attaching mesh_sk_msg to SOCKHASH".into()))?;
        let skmsg_link = skmsg.take_link(skmsg_id).ok();
        let (relay_back_maps, relay_back_link) = if back_offsets.is_some() {
            let up: SockHash<MapData, SockKey> = take(&mut ebpf, map_names::RELAY_UP)?;
            let prog: &mut aya::programs::SkSkb = ebpf
                .program_mut(prog_names::RELAY_BACK)
                .ok_or_else(|| {
                    BpfError::Kernel(format!(
                        "program {} missing from the object",
                        prog_names::RELAY_BACK
                    ))
                })?
                .try_into()
                .map_err(prog_err(format!("program {}", prog_names::RELAY_BACK)))?;
            prog.load()
                .map_err(prog_err(format!("loading {}", prog_names::RELAY_BACK)))?;
            let id = prog.attach(up.fd()).map_err(prog_err(format!(
                "attaching {} to RELAY_UP",
                prog_names::RELAY_BACK
            )))?;
            let link = prog.take_link(id).ok();
            (
                Some(relay::BackMaps {
                    up,
                    back: take(&mut ebpf, map_names::RELAY_BACK)?,
                    armed: take(&mut ebpf, map_names::RELAY_ARMED)?,
                    wake: take(&mut ebpf, map_names::RELAY_WAKE)?,
                    stats: MapData::from_pin(o.pin_path.join(map_names::STATS))
                        .and_then(aya::maps::Map::from_map_data)
                        .and_then(PerCpuArray::try_from)
                        .ok(),
                }),
                link,
            )
        } else {
            (None, None)
        };

        // The TC inbound program is loaded (verified) now and attached per pod later.
        let tc_prog: &mut SchedClassifier = ebpf
            .program_mut(prog_names::TC_INGRESS)
            .ok_or_else(|| {
                BpfError::Kernel(format!(
                    "program {} missing from the object",
                    prog_names::TC_INGRESS
                ))
            })?
            .try_into()
            .map_err(prog_err(format!("program {}", prog_names::TC_INGRESS)))?;
        tc_prog
            .load()
            .map_err(prog_err(format!("loading {}", prog_names::TC_INGRESS)))?;
        let tc = std::sync::Arc::new(tc::TcProgram::new(tc_prog, prog_names::TC_INGRESS)?);
        let close_unread = close::attach(&mut ebpf, close_offsets[7] != 0);

        // Not pinned (one reader per ring); read once the wiring gives it a sink.
        let flow_events = take(&mut ebpf, map_names::FLOW_EVENTS)?;
        let mut maps = Maps {
            workloads: Mutex::new(take(&mut ebpf, map_names::WORKLOADS)?),
            dests: Mutex::new(take(&mut ebpf, map_names::DESTS)?),
            excludes: Mutex::new(take(&mut ebpf, map_names::EXCLUDES)?),
            excludes_gen: Mutex::new(take(&mut ebpf, map_names::EXCLUDES_GEN)?),
            config: Mutex::new(take(&mut ebpf, map_names::CONFIG)?),
            flows: Mutex::new(take(&mut ebpf, map_names::FLOWS)?),
            sock_state: take(&mut ebpf, map_names::SOCK_STATE)?,
            node_addrs: Mutex::new(take(&mut ebpf, map_names::NODE_ADDRS)?),
            node_addr_set: NodeAddrSet::default(),
            proxy_health: Mutex::new(take(&mut ebpf, map_names::PROXY_HEALTH)?),
            inbound: Mutex::new(take(&mut ebpf, map_names::INBOUND)?),
            inbound6: Mutex::new(take(&mut ebpf, map_names::INBOUND6)?),
            stats: take(&mut ebpf, map_names::STATS)?,
            _sockhash: sockhash,
            netns_probe: Mutex::new(take(&mut ebpf, map_names::NETNS_PROBE)?),
            features: features::KernelFeatures::detect(
                sys::netns_cookie_sockopt_works()
                    && !assumed_missing(features::NETNS_COOKIE_SOCKOPT),
                off_msg_tot_len != 0,
                sockops_netns,
                sock_netns_stamp,
                o.netns_cookie,
                o.kernel_relay.then_some(relay_possible),
            ),
            relay: if kernel_relay {
                Some(relay::RelayMaps::new(
                    take(&mut ebpf, map_names::RELAY)?,
                    MapData::from_pin(o.pin_path.join(map_names::SOCK_STATE))
                        .and_then(aya::maps::Map::from_map_data)
                        .and_then(SkStorage::try_from)
                        .map_err(|source| BpfError::Map {
                            name: map_names::SOCK_STATE,
                            source,
                        })?,
                    o.kernel_relay_egress,
                    relay_back_maps,
                ))
            } else {
                None
            },
            cookie_failures: Mutex::default(),
            proxy_netns: 0,
        };
        if maps.features.netns_cookie == features::NetnsCookieMode::Sockopt
            && !maps
                .features
                .features
                .iter()
                .any(|f| f.name == features::NETNS_COOKIE_SOCKOPT && f.available)
        {
            return Err(BpfError::Kernel(format!(
                "--netns-cookie sockopt: this kernel ({}) has no SO_NETNS_COOKIE (5.14+); use auto or probe",
                maps.features.release
            )));
        }
        maps.features.features.push(close::feature(close_unread));
        for line in maps.features.degraded_lines().lines() {
            warn!("{line}");
        }
        info!(mode = ?maps.features.netns_cookie, "network-namespace cookies");
        // The proxy's namespace is this process's (the node's): the key proxied flows are
        // recorded under. `SO_NETNS_COOKIE` where it works, else the probe through the
        // programs just attached (so only now). Where neither answers (a kernel without
        // the sockopt, 5.14+, and an agent outside the cgroup it attaches to) it stays 0:
        // such a kernel (< 5.15) also derives the accepting namespace of a proxied flow
        // from `CONFIG.proxy_netns`, so both sides still agree.
        let mut maps = maps;
        let own = Path::new("/proc/self/ns/net");
        maps.proxy_netns = match sys::netns_cookie(own).or_else(|_| maps.netns_cookie(own)) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "the agent's own network-namespace cookie could not be read; proxied flows are keyed by namespace 0");
                0
            }
        };
        let cfg = MeshConfig {
            proxy_ip: ip_from(IpAddr::V4(*o.redirect.ip())),
            proxy_port: o.redirect.port() as u32,
            proxy_ip6: o
                .redirect6
                .map(|a| ip_from(IpAddr::V6(*a.ip())))
                .unwrap_or_default(),
            proxy_port6: o.redirect6.map(|a| u32::from(a.port())).unwrap_or(0),
            proxy_netns: maps.proxy_netns,
            flags: if o.skmsg { cfg_flags::SKMSG } else { 0 }
                | if no_pairing { cfg_flags::NO_PAIRING } else { 0 },
            // Off until `events::follow_log_filter` below sets it from the log filter.
            log_level: mesh_common::log_level::OFF,
        };
        // An adopted CONFIG keeps what describes the node rather than this agent: a proxy
        // still serving (a hand-over: the old agent's proxy takes connections until this
        // one is ready) and the operator's global bypass.
        maps.set_config(|c| {
            let kept = c.flags & (cfg_flags::PROXY_READY | cfg_flags::BYPASS);
            *c = MeshConfig {
                flags: cfg.flags | kept,
                ..cfg
            };
        })
        .map_err(|source| BpfError::Map {
            name: map_names::CONFIG,
            source,
        })?;
        {
            let mut h = maps.proxy_health.lock().unwrap_or_else(|e| e.into_inner());
            // An adopted heartbeat is kept: the old agent's proxy may still be beating.
            let health = ProxyHealth {
                heartbeat_ns: h.get(&0, 0).map(|h| h.heartbeat_ns).unwrap_or(0),
                stale_after_ns: o.heartbeat_timeout.as_nanos() as u64,
            };
            h.set(0, health, 0).map_err(|source| BpfError::Map {
                name: map_names::PROXY_HEALTH,
                source,
            })?;
        }
        // Before any workload is enrolled (WORKLOADS is still empty, so nothing is captured
        // yet): the node's addresses must be known before the first capture decision.
        let node_addrs = maps
            .sync_node_addrs()
            .map_err(io_err("listing the node's addresses (getifaddrs)"))?;
        info!(
            pin_path = %o.pin_path.display(),
            cgroup = %o.cgroup.display(),
            redirect = %o.redirect,
            redirect6 = ?o.redirect6,
            sockops_netns,
            flow_key_netns = ?maps.features.flow_key_netns,
            backpressure_check = off_msg_tot_len != 0,
            kernel_relay,
            node_addresses = node_addrs.current,
            "datapath attached"
        );
        if adopted_maps + adopted_links > 0 {
            info!(
                maps = adopted_maps,
                links = adopted_links,
                "adopted the datapath an earlier agent left pinned"
            );
        }
        // The decision log: its reader first, then the level (the programs write nothing
        // before the level says so). Without a reader the level stays off.
        let events = match events::EventReader::start(&mut ebpf) {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(error = %e, "the datapath decision log is not available");
                None
            }
        };
        let maps = std::sync::Arc::new(maps);
        Ok(Datapath {
            _flows: None,
            flow_events: Some(flow_events),
            _events: events,
            maps,
            tc,
            skmsg_link,
            _relay_back_link: relay_back_link,
            _links: links,
            _ebpf: ebpf,
            pins,
            adopted_maps,
            adopted_links,
        })
    }

    /// Starts reading the records of direct-mode flows into `sink` (once; later calls do
    /// nothing). Until then they wait in their ring (fixed size; when full, the programs
    /// drop and count them).
    pub fn start_flow_telemetry(&mut self, sink: events::FlowSink) -> Result<(), BpfError> {
        if let Some(ring) = self.flow_events.take() {
            self._flows = Some(events::FlowReader::start(ring, sink).map_err(BpfError::Kernel)?);
        }
        Ok(())
    }

    pub fn pin_path(&self) -> &Path {
        &self.pins.path
    }

    /// Hands the node over: the pins and links stay (the next agent adopts them) and the
    /// lock is released now, so that agent can start while this one drains.
    pub fn release_for_handover(&mut self) {
        self.keep_on_exit();
        self.pins.lock = None;
    }

    /// Leaves the datapath in place when this value is dropped: maps and links stay
    /// pinned, the programs stay attached, and the next agent adopts them.
    pub fn keep_on_exit(&mut self) {
        self.pins.keep = true;
        // Dropping the sk_msg attachment would detach it from the (kept) SOCKHASH.
        if let Some(l) = self.skmsg_link.take() {
            std::mem::forget(l);
        }
    }
}

/// The IPv6 addresses of this network namespace's interfaces with their index, from
/// `/proc/net/if_inet6` (empty without IPv6), skipping the interfaces named in `skip`.
fn local_ipv6_addrs(skip: &[&str]) -> Vec<(std::net::Ipv6Addr, u32)> {
    let Ok(text) = std::fs::read_to_string("/proc/net/if_inet6") else {
        return Vec::new();
    };
    parse_if_inet6(&text, skip)
}

/// `/proc/net/if_inet6` lines: address (32 hex digits), ifindex (hex), prefix length,
/// scope, flags, interface name.
fn parse_if_inet6(text: &str, skip: &[&str]) -> Vec<(std::net::Ipv6Addr, u32)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (addr, index, name) = (f.first()?, f.get(1)?, f.get(5)?);
            if skip.contains(name) || addr.len() != 32 {
                return None;
            }
            let bits = u128::from_str_radix(addr, 16).ok()?;
            let index = u32::from_str_radix(index, 16).ok()?;
            Some((std::net::Ipv6Addr::from(bits), index))
        })
        .collect()
}

/// Where the netns-cookie probe connects: loopback's discard port. A UDP connect sends
/// nothing; the connect4 program answers the probe before the kernel routes it.
const NETNS_PROBE_TARGET: (std::net::Ipv4Addr, u16) = (std::net::Ipv4Addr::LOCALHOST, 9);

/// The names of the bits set in a map value's flags (`a|b`), `-` for none: how the CLI
/// and the admin endpoint show map entries.
pub fn flags_text(v: u32, names: &[(u32, &'static str)]) -> String {
    let mut out = [""; 12];
    let n = mesh_common::flag_names(v, names, &mut out);
    if n == 0 {
        "-".into()
    } else {
        out[..n].join("|")
    }
}

impl Maps {
    /// The cookie of the network namespace at `netns` (`/run/netns/NAME`,
    /// `/proc/PID/ns/net`), the key connect4 looks workloads up by: `SO_NETNS_COOKIE`, or
    /// on kernels without it the probe (a UDP socket made in the namespace, its socket
    /// cookie put in `NETNS_PROBE`, then `connect()`: the connect4 program, attached to a
    /// cgroup the agent runs in, writes `bpf_get_netns_cookie` next to it).
    pub fn netns_cookie(&self, netns: &Path) -> std::io::Result<u64> {
        if self.features.netns_cookie != features::NetnsCookieMode::Probe {
            return sys::netns_cookie(netns);
        }
        let sock = sys::in_netns(netns, || std::net::UdpSocket::bind("0.0.0.0:0"))?;
        let cookie = sys::socket_cookie(std::os::fd::AsFd::as_fd(&sock))?;
        // One probe at a time: the map has room for a few, and resolving is not hot.
        let mut probes = self.netns_probe.lock().unwrap_or_else(|e| e.into_inner());
        probes
            .insert(cookie, 0, 0)
            .map_err(|e| std::io::Error::other(format!("NETNS_PROBE insert: {e}")))?;
        let connected = sock.connect(NETNS_PROBE_TARGET);
        let answer = probes.get(&cookie, 0);
        let _ = probes.remove(&cookie);
        connected?;
        match answer {
            Ok(c) if c != 0 => Ok(c),
            _ => Err(std::io::Error::other(
                "the netns-cookie probe was not answered: the agent must run inside the cgroup the connect4 program is attached to (--cgroup)",
            )),
        }
    }

    /// Sets how verbose the programs' decision log is (`mesh_common::log_level`).
    pub fn set_log_level(&self, level: u32) {
        let was = self
            .config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&0, 0)
            .map(|c| c.log_level);
        if was.as_ref().ok() == Some(&level) {
            return;
        }
        match self.set_config(|c| c.log_level = level) {
            Ok(()) => info!(
                level = mesh_common::log_level::NAMES
                    .iter()
                    .find(|(l, _)| *l == level)
                    .map(|(_, n)| *n)
                    .unwrap_or("?"),
                "datapath decision log level set"
            ),
            Err(e) => warn!(error = %e, "setting the datapath decision log level failed"),
        }
    }

    /// Read-modify-write of `CONFIG[0]`.
    pub fn set_config(&self, f: impl FnOnce(&mut MeshConfig)) -> Result<(), aya::maps::MapError> {
        let mut m = self.config.lock().unwrap_or_else(|e| e.into_inner());
        let mut c = m.get(&0, 0)?;
        f(&mut c);
        m.set(0, c, 0)
    }

    /// The original destination and flags of a captured connection, by its `FLOWS` key
    /// (the accepting side's namespace, the client's view).
    pub fn flow(&self, key: SockKey) -> Option<FlowInfo> {
        let m = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&key, 0).ok()
    }

    /// The `FLOWS` key of a flow the node proxy accepted: its namespace, the client's
    /// view (`client` -> `proxy`).
    pub fn proxied_key(&self, client: SocketAddr, proxy: SocketAddr) -> SockKey {
        SockKey::new(self.proxy_netns, client, proxy)
    }

    /// The flow an accepted connection carries, from the accepted socket's own state
    /// (`SOCK_STATE`, copied from `FLOWS` by sockops when the handshake completed: what
    /// `FLOWS` evicts later does not matter), else from `FLOWS` by the client's view
    /// (`client`'s namespace is ignored: the proxy's is the key's).
    pub fn accepted_flow(
        &self,
        socket: &impl std::os::fd::AsRawFd,
        client: SockKey,
    ) -> Option<FlowInfo> {
        match self.sock_state.get(socket, 0) {
            Ok(st) if st.flags & mesh_common::flow_flags::SERVER_SIDE != 0 => Some(FlowInfo {
                orig_ip: st.orig_ip,
                orig_port: st.orig_port,
                flags: st.flags
                    & !(mesh_common::flow_flags::SERVER_SIDE | mesh_common::flow_flags::RECORDED),
                src_id: st.src_id,
                dst_id: st.dst_id,
                netns: st.netns,
            }),
            _ => self.flow(client.in_netns(self.proxy_netns)),
        }
    }

    /// The per-socket state of a socket this process holds (`None`: not a captured one).
    pub fn sock_state(&self, socket: &impl std::os::fd::AsRawFd) -> Option<SockState> {
        self.sock_state.get(socket, 0).ok()
    }

    /// Announces one of the proxy's own connections (by its view, before connecting) so
    /// sockops pairs it with the destination's socket. The key's namespace is set here:
    /// the destination's (`DESTS`, the accepting side), and the flow's client is the
    /// proxy. Fails for a destination that is not a local workload with a known namespace.
    pub fn announce_upstream(
        &self,
        key: SockKey,
        info: FlowInfo,
    ) -> Result<SockKey, aya::maps::MapError> {
        let dest_netns = self
            .dest(ip_addr(key.remote_ip))
            .map(|d| d.netns)
            .filter(|n| *n != 0)
            .ok_or(aya::maps::MapError::KeyNotFound)?;
        let key = key.in_netns(dest_netns);
        let info = FlowInfo {
            netns: self.proxy_netns,
            ..info
        };
        let mut m = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        m.insert(key, info, 0)?;
        Ok(key)
    }

    /// The proxy's heartbeat: it can take connections now. Called from the proxy's own
    /// runtime, so a stuck or starved proxy stops beating.
    pub fn beat(&self) -> Result<(), aya::maps::MapError> {
        let mut m = self.proxy_health.lock().unwrap_or_else(|e| e.into_inner());
        let mut h = m.get(&0, 0)?;
        h.heartbeat_ns = sys::monotonic_ns();
        m.set(0, h, 0)
    }

    /// The local workload at `ip`, if `DESTS` has one (a same-node destination).
    pub fn dest(&self, ip: IpAddr) -> Option<DestInfo> {
        let m = self.dests.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&ip_from(ip), 0).ok()
    }

    /// Whether `ip` is one of this node's own addresses (as last synced): read from the
    /// user-space copy of `NODE_ADDRS`'s keys, which holds every address the map holds.
    pub fn is_node_addr(&self, ip: IpAddr) -> bool {
        self.node_addr_set.contains(&ip_from(ip))
    }

    /// Brings `NODE_ADDRS` in line with the addresses of the node's interfaces (IPv4 and
    /// IPv6): adds new ones first, then removes those that are gone. A full map keeps
    /// what it has (the failure is counted and logged) and the next sync retries.
    pub fn sync_node_addrs(&self) -> io::Result<NodeAddrSync> {
        let mut want: std::collections::BTreeMap<Ip, u32> = sys::local_ipv4_addrs(NODE_ADDR_SKIP)?
            .into_iter()
            .map(|(ip, ifindex)| (ip_from(IpAddr::V4(ip)), ifindex))
            .collect();
        want.extend(
            local_ipv6_addrs(NODE_ADDR_SKIP)
                .into_iter()
                .map(|(ip, ifindex)| (ip_from(IpAddr::V6(ip)), ifindex)),
        );
        let mut m = self.node_addrs.lock().unwrap_or_else(|e| e.into_inner());
        let have: std::collections::BTreeMap<Ip, u32> = m.iter().filter_map(Result::ok).collect();
        // The copy is a superset of the map at every moment: what the map holds and what is
        // about to be added before the writes, exactly the map's keys after them (removed
        // after the map has dropped them). The proxy errs on refusing, never on dialling.
        let mut set: BTreeSet<Ip> = have.keys().chain(want.keys()).copied().collect();
        self.node_addr_set.replace(set.clone());
        let mut r = NodeAddrSync::default();
        for (ip, ifindex) in &want {
            if have.get(ip) == Some(ifindex) {
                continue;
            }
            match m.insert(ip, ifindex, 0) {
                Ok(()) => r.added += 1,
                Err(e) => {
                    r.failed += 1;
                    if !have.contains_key(ip) {
                        set.remove(ip);
                    }
                    warn!(address = %ip_addr(*ip), error = %e, "cannot record a node address in NODE_ADDRS; pods' connections to it would be captured");
                }
            }
        }
        for ip in have.keys().filter(|ip| !want.contains_key(*ip)) {
            if m.remove(ip).is_ok() {
                r.removed += 1;
                set.remove(ip);
            }
        }
        self.node_addr_set.replace(set);
        r.current = want.len() - r.failed;
        Ok(r)
    }

    /// Records a local enrolled workload's address for the TC inbound program
    /// (`inbound::*` flags): `INBOUND` for IPv4, `INBOUND6` for IPv6.
    pub fn set_inbound(&self, ip: IpAddr, flags: u32) -> Result<(), aya::maps::MapError> {
        let v = InboundInfo { flags, _pad: 0 };
        match ip {
            IpAddr::V4(a) => {
                let mut m = self.inbound.lock().unwrap_or_else(|e| e.into_inner());
                m.insert(u32::from_ne_bytes(a.octets()), v, 0)
            }
            IpAddr::V6(_) => {
                let mut m = self.inbound6.lock().unwrap_or_else(|e| e.into_inner());
                m.insert(ip_from(ip), v, 0)
            }
        }
    }

    pub fn remove_inbound(&self, ip: IpAddr) {
        match ip {
            IpAddr::V4(a) => {
                let mut m = self.inbound.lock().unwrap_or_else(|e| e.into_inner());
                let _ = m.remove(&u32::from_ne_bytes(a.octets()));
            }
            IpAddr::V6(_) => {
                let mut m = self.inbound6.lock().unwrap_or_else(|e| e.into_inner());
                let _ = m.remove(&ip_from(ip));
            }
        }
    }

    /// Every IPv6 address in `INBOUND6` (an earlier agent's entries, when adopted).
    pub fn inbound6_entries(&self) -> Vec<(IpAddr, u32)> {
        let m = self.inbound6.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (ip_addr(k), v.flags))
            .collect()
    }

    /// Every address in `INBOUND` (an earlier agent's entries, when adopted).
    pub fn inbound_entries(&self) -> Vec<(Ipv4Addr, u32)> {
        let m = self.inbound.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (Ipv4Addr::from(k.to_ne_bytes()), v.flags))
            .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_inet6_lines_give_addresses_and_indexes() {
        let text = "\
00000000000000000000000000000001 01 80 10 80       lo
fd000000000000000000000000000002 0a 40 00 80     eth0
fe800000000000000000000000000001 1f 40 20 80 kube-ipvs0
";
        let got = parse_if_inet6(text, NODE_ADDR_SKIP);
        assert_eq!(
            got,
            vec![
                ("::1".parse().unwrap(), 1),
                ("fd00::2".parse().unwrap(), 10),
            ]
        );
    }
}
