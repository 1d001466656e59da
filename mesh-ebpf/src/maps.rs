//! Every map of the datapath (BTF-defined so `bpftool map dump` names the fields), the
//! load-time globals, and the per-CPU counter helper.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
    helpers::generated::bpf_probe_read_kernel,
    macros::btf_map,
    Global,
};
use mesh_common::{
    capacity as cap,
    maps::{
        DestInfo, ExcludeCidr, FlowInfo, InboundInfo, MeshConfig, OrigDst, ProxyHealth, SockKey,
        WorkloadInfo,
    },
    Stat,
};

/// Enrolled workloads by network-namespace cookie.
#[btf_map]
pub static WORKLOADS: HashMap<u64, WorkloadInfo, { cap::WORKLOADS as usize }> = HashMap::new();

/// Local workloads as destinations, by IPv4 address (network order).
#[btf_map]
pub static DESTS: HashMap<u32, DestInfo, { cap::DESTS as usize }> = HashMap::new();

/// The node's own IPv4 addresses (network order) -> interface index, kept current by the
/// agent. A workload's connection to one is never captured: in the node's namespace the
/// proxy would reach services a pod cannot (those bound to the node's addresses only, or
/// filtered by source address).
#[btf_map]
pub static NODE_ADDRS: HashMap<u32, u32, { cap::NODE_ADDRS as usize }> = HashMap::new();

/// Node-wide knobs, one entry.
#[btf_map]
pub static CONFIG: Array<MeshConfig, 1> = Array::new();

/// The node proxy's heartbeat (one entry), refreshed by the proxy's runtime.
#[btf_map]
pub static PROXY_HEALTH: Array<ProxyHealth, 1> = Array::new();

/// Destination CIDRs that are never captured: two halves (a double buffer), the one in
/// force named by `EXCLUDES_GEN` (`mesh_common::maps::excludes_match`).
#[btf_map]
pub static EXCLUDES: Array<ExcludeCidr, { cap::EXCLUDE_SLOTS as usize }> = Array::new();

/// The generation of `EXCLUDES` (one entry): bumped by the agent after it filled the other
/// half; its parity names the half in force.
#[btf_map]
pub static EXCLUDES_GEN: Array<u32, 1> = Array::new();

/// connect4 decision by socket cookie: until sockops sees the socket established, and for
/// proxied sockets until they close (getpeername answers from it). LRU: a connect that
/// never completes must not leak an entry.
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

/// The agent's netns-cookie probes (kernels without `SO_NETNS_COOKIE`): the agent inserts
/// the socket cookie of a UDP socket it made in a pod's network namespace, connects it,
/// and connect4 fills in the namespace's cookie. Only keys the agent inserted are filled,
/// so a pod cannot grow the map.
#[btf_map]
pub static NETNS_PROBE: HashMap<u64, u64, { cap::NETNS_PROBE as usize }> = HashMap::new();

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
/// `struct tcp_sock` sequence numbers, for the recovery from a back-pressure fallback
/// (`sk_msg::drained`). Zero: no recovery (the fallback stays, as before).
#[unsafe(no_mangle)]
pub static OFF_TCP_SND_UNA: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_TCP_WRITE_SEQ: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_TCP_RCV_NXT: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_TCP_COPIED_SEQ: Global<u32> = Global::new(0);
/// Floor for the per-socket limit of bytes queued by redirects (bytes); the limit is
/// max(peer's SO_RCVBUF, this).
#[unsafe(no_mangle)]
pub static QUEUE_LIMIT_FLOOR: Global<u32> = Global::new(4 << 20);

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

#[inline(always)]
pub fn proxy_health() -> ProxyHealth {
    match PROXY_HEALTH.get(0) {
        Some(h) => *h,
        None => ProxyHealth::default(),
    }
}

/// Whether the agent resolved the kernel offsets the queue check needs.
#[inline(always)]
pub fn queue_check_enabled() -> bool {
    OFF_SK_USER_DATA.load() != 0 && OFF_PSOCK_MSG_TOT_LEN.load() != 0 && OFF_SK_RCVBUF.load() != 0
}

/// `(sk_rcvbuf, bytes waiting in the sk_msg ingress queue)` of the socket at kernel
/// address `addr` (recorded in `SK_ADDR`). Unreadable fields read as 0.
#[inline(always)]
pub fn socket_queue(addr: u64) -> (i32, u32) {
    let base = addr as *const u8;
    let mut rcvbuf: i32 = 0;
    let mut psock: u64 = 0;
    let mut queued: u32 = 0;
    // SAFETY: bpf_probe_read_kernel validates the source address; the offsets come from
    // the running kernel's BTF for `struct sock` and `struct sk_psock`.
    unsafe {
        let _ = bpf_probe_read_kernel(
            (&mut rcvbuf as *mut i32).cast(),
            4,
            base.wrapping_add(OFF_SK_RCVBUF.load() as usize).cast(),
        );
        if bpf_probe_read_kernel(
            (&mut psock as *mut u64).cast(),
            8,
            base.wrapping_add(OFF_SK_USER_DATA.load() as usize).cast(),
        ) == 0
            && psock != 0
        {
            // sk_user_data carries flag bits (SK_USER_DATA_NOCOPY|BPF|PSOCK) in its low 3 bits.
            let psock = psock & !7;
            let _ = bpf_probe_read_kernel(
                (&mut queued as *mut u32).cast(),
                4,
                (psock as *const u8)
                    .wrapping_add(OFF_PSOCK_MSG_TOT_LEN.load() as usize)
                    .cast(),
            );
        }
    }
    (rcvbuf, queued)
}

/// Reads the `u32` at `offset` of the kernel object at `addr`; `None` if unreadable.
#[inline(always)]
pub fn read_u32(addr: u64, offset: u32) -> Option<u32> {
    let mut v: u32 = 0;
    // SAFETY: bpf_probe_read_kernel validates the source address.
    let rc = unsafe {
        bpf_probe_read_kernel(
            (&mut v as *mut u32).cast(),
            4,
            (addr as *const u8).wrapping_add(offset as usize).cast(),
        )
    };
    (rc == 0).then_some(v)
}

/// Reads the addressing fields shared by `bpf_sock_ops` and `sk_msg_md` from a context
/// pointer, each with its own volatile load, all up front: the verifier rejects a ctx
/// pointer the compiler has offset and kept for a later load. Evaluates to
/// `(family, local_ip4, remote_ip4, local_ip6, remote_ip6, local_port, remote_port)`.
/// Must be used inside an `unsafe` block on a valid context pointer.
macro_rules! read_addressing {
    ($ctx:expr) => {{
        let c = $ctx;
        (
            read_volatile(&(*c).family),
            read_volatile(&(*c).local_ip4),
            read_volatile(&(*c).remote_ip4),
            [
                read_volatile(&(*c).local_ip6[0]),
                read_volatile(&(*c).local_ip6[1]),
                read_volatile(&(*c).local_ip6[2]),
                read_volatile(&(*c).local_ip6[3]),
            ],
            [
                read_volatile(&(*c).remote_ip6[0]),
                read_volatile(&(*c).remote_ip6[1]),
                read_volatile(&(*c).remote_ip6[2]),
                read_volatile(&(*c).remote_ip6[3]),
            ],
            read_volatile(&(*c).local_port),
            read_volatile(&(*c).remote_port),
        )
    }};
}
pub(crate) use read_addressing;

/// Local enrolled workloads by IPv4 address (network order): as sources they are never
/// captured inbound (the connect hooks handled their side), and as destinations with
/// `inbound::CAPTURE` their new connections go to the agent's in-pod listener. Written by
/// the agent's inbound manager.
#[btf_map]
pub static INBOUND: HashMap<u32, InboundInfo, { cap::INBOUND as usize }> = HashMap::new();
