//! Every map of the datapath (BTF-defined so `bpftool map dump` names the fields), the
//! load-time globals, and the per-CPU counter helper.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
    macros::btf_map,
    Global,
};
use mesh_common::{
    capacity as cap,
    maps::{DestInfo, ExcludeCidr, FlowInfo, MeshConfig, OrigDst, SockKey, WorkloadInfo},
    Stat,
};

/// Enrolled workloads by network-namespace cookie.
#[btf_map]
pub static WORKLOADS: HashMap<u64, WorkloadInfo, { cap::WORKLOADS as usize }> = HashMap::new();

/// Local workloads as destinations, by IPv4 address (network order).
#[btf_map]
pub static DESTS: HashMap<u32, DestInfo, { cap::DESTS as usize }> = HashMap::new();

/// Node-wide knobs, one entry.
#[btf_map]
pub static CONFIG: Array<MeshConfig, 1> = Array::new();

/// Destination CIDRs that are never captured.
#[btf_map]
pub static EXCLUDES: Array<ExcludeCidr, { cap::EXCLUDES as usize }> = Array::new();

/// connect4 decision by socket cookie, until sockops sees the socket established. LRU:
/// a connect that never completes must not leak an entry.
#[btf_map]
pub static SOCK_ORIG: LruHashMap<u64, OrigDst, { cap::SOCK_ORIG as usize }> = LruHashMap::new();

/// Captured connections by the client's 4-tuple: original destination and carriage.
#[btf_map]
pub static FLOWS: LruHashMap<SockKey, FlowInfo, { cap::FLOWS as usize }> = LruHashMap::new();

/// Both local ends of captured connections, each under its own (local, remote) view.
#[btf_map]
pub static SOCKHASH: SockHash<SockKey, { cap::SOCKHASH as usize }> = SockHash::new();

/// Kernel address of each socket in `SOCKHASH` (same key), read by sk_msg to look at the
/// peer's redirect queue with `bpf_probe_read_kernel`. A stale address after a close only
/// yields a wrong estimate, never a fault (probe reads are checked).
#[btf_map]
pub static SK_ADDR: LruHashMap<SockKey, u64, { cap::SOCKHASH as usize }> = LruHashMap::new();

/// Sender sockets (by their own view) whose later sends must stay on the TCP path, so
/// bytes are never reordered: set when a send could not be redirected.
#[btf_map]
pub static FALLBACK: LruHashMap<SockKey, u32, { cap::SOCKHASH as usize }> = LruHashMap::new();

/// Datapath events, indexed by `mesh_common::Stat`.
#[btf_map]
pub static STATS: PerCpuArray<u64, { Stat::COUNT as usize }> = PerCpuArray::new();

/// Offsets into kernel structures, resolved from the running kernel's BTF by the agent at
/// load time, for the sk_msg back-pressure check. Zero disables the check.
#[unsafe(no_mangle)]
pub static OFF_SK_USER_DATA: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_SK_RCVBUF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_PSOCK_MSG_TOT_LEN: Global<u32> = Global::new(0);
/// Floor for the per-socket limit of bytes queued by redirects (bytes); the limit is
/// max(peer's SO_RCVBUF, this).
#[unsafe(no_mangle)]
pub static QUEUE_LIMIT_FLOOR: Global<u32> = Global::new(262_144);

#[inline(always)]
pub fn bump(stat: Stat) {
    add(stat, 1);
}

#[inline(always)]
pub fn add(stat: Stat, n: u64) {
    if let Some(p) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *p += n };
    }
}

#[inline(always)]
pub fn config() -> MeshConfig {
    match CONFIG.get(0) {
        Some(c) => *c,
        None => MeshConfig::default(),
    }
}
