//! Every map of the datapath (BTF-defined so `bpftool map dump` names the fields), the
//! load-time globals, and the per-CPU counter helper.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, BPF_F_CLONE, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC,
        BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_SK_STORAGE_GET_F_CREATE,
    },
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SkStorage, SockHash},
    helpers::generated::{bpf_probe_read_kernel, bpf_ringbuf_query, bpf_sk_storage_get},
    macros::btf_map,
    Global,
};
use mesh_common::{
    capacity as cap,
    maps::{
        DestInfo, ExcludeCidr, FlowInfo, FlowRecord, InboundInfo, Ip, MeshConfig, ProxyHealth,
        RelayBack, RelayInfo, SockKey, SockState, UnreadClose, WorkloadInfo,
    },
    Stat,
};

/// Enrolled workloads by network-namespace cookie.
#[btf_map]
pub static WORKLOADS: HashMap<u64, WorkloadInfo, { cap::WORKLOADS as usize }> = HashMap::new();

/// Local workloads as destinations, by address (IPv4 v4-mapped): with the namespace that
/// accepts a direct-mode flow to them.
#[btf_map]
pub static DESTS: HashMap<Ip, DestInfo, { cap::DESTS as usize }> = HashMap::new();

/// The node's own addresses (IPv4 v4-mapped, and IPv6) -> interface index, kept current by the
/// agent. A workload's connection to one is never captured: in the node's namespace the
/// proxy would reach services a pod cannot (those bound to the node's addresses only, or
/// filtered by source address).
#[btf_map]
pub static NODE_ADDRS: HashMap<Ip, u32, { cap::NODE_ADDRS as usize }> = HashMap::new();

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

/// Per-socket state of captured connections (socket storage: created by connect4/6 or
/// sockops, freed by the kernel with its socket, never evicted): the original destination
/// (getpeername4/6, the proxy), what sockops decided, and each sender's fallback state
/// (sk_msg). A full map does not exist: the only failure is kernel memory.
#[btf_map]
pub static SOCK_STATE: SkStorage<SockState> = SkStorage::new();

/// Captured connections by the accepting side's network namespace and the client's view
/// of the 4-tuple (`SockKey`): original destination and carriage. An
/// LRU *cache*: the listing of live flows (CLI, `/inspect`) and the hand-off of a flow to
/// its accepting socket, which copies it into its own `SOCK_STATE` at PASSIVE_ESTABLISHED
/// (microseconds after the client wrote it). No invariant depends on an entry staying:
/// an eviction only drops it from the listing (counted at close, `flow_evicted`).
#[btf_map]
pub static FLOWS: LruHashMap<SockKey, FlowInfo, { cap::FLOWS as usize }> = LruHashMap::new();

/// Both local ends of captured connections, each under its own namespace and its own
/// (local, remote) view. A
/// plain hash: when full, a socket is not paired (`sockhash_update_failed`) and its
/// flow takes the TCP path; nothing in it is ever evicted.
#[btf_map]
pub static SOCKHASH: SockHash<SockKey, { cap::SOCKHASH as usize }> = SockHash::new();

/// The kernel address of a sender's peer socket, learnt by sk_msg from its own redirects
/// (`struct sk_msg.sk_redir`), for the back-pressure check. Socket storage of the sender,
/// and the one map the agent does not pin: kernel pointers are never in a map a dump can
/// read. After an agent restart the new programs learn it again at the next redirect.
#[btf_map]
pub static PEER_SK: SkStorage<PeerSk> = SkStorage::new();

/// The kernel relay's per-sender entries (`--kernel-relay`), written by the node proxy
/// when it has decided a flow, keyed by the sender's own view. Not pinned (see
/// `map_names::RELAY`). Loaded with one entry when the relay is off. Not preallocated: a
/// removed entry is freed after an RCU grace period, never handed to another flow while
/// a program still holds a pointer to it (a preallocated hash recycles elements at once,
/// and a sender's late write could then arm another flow's sender).
#[btf_map]
pub static RELAY: HashMap<
    SockKey,
    RelayInfo,
    { cap::RELAY as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// The egress relay's destination direction (`--kernel-relay egress`): the proxy's legs
/// P_u of armed flows, under their own view (namespace 0), with `mesh_relay_back` as the
/// stream verdict (`sk_skb`). P_u stays in `SOCKHASH` as well (the client's messages are
/// redirected onto its send path from there); a psock takes its `msg_parser` from one map
/// and its stream verdict from another. Not pinned; one entry unless egress mode.
#[btf_map]
pub static RELAY_UP: SockHash<SockKey, { cap::RELAY as usize }> = SockHash::new();

/// Per P_u in `RELAY_UP` (same key): where its bytes go (P_a) and the program's counts
/// (`RelayBack`). Written by the proxy before P_u joins `RELAY_UP`, then by
/// `mesh_relay_back` only. Not preallocated (as `RELAY`).
#[btf_map]
pub static RELAY_BACK: HashMap<
    SockKey,
    RelayBack,
    { cap::RELAY as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Per P_u in `RELAY_UP` (same key): the bytes the proxy read from P_u and wrote to P_a,
/// published each time it holds none of them. The proxy is its only writer.
#[btf_map]
pub static RELAY_ARMED: HashMap<
    SockKey,
    u64,
    { cap::RELAY as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// P_u keys of quiet egress-relayed flows (`RELAY_ARMED_QUIET`) that `mesh_relay_back`
/// handed a segment to the proxy: the proxy's wake-up (it does not watch P_u's receive
/// queue then). Rare (a fallback, a broken P_a, the relay off), so each record wakes the
/// reader. Not pinned (one reader per ring).
#[btf_map]
pub static RELAY_WAKE: RingBuf<SockKey, { cap::RELAY_WAKE_BYTES as usize }> = RingBuf::new();

/// Paired sockets closed with redirected bytes unread, by the closing socket's view
/// (namespace 0), written by `close::mesh_close_unread`, consumed by the proxy. Not pinned
/// (its entries live for milliseconds).
#[btf_map]
pub static UNREAD_CLOSES: LruHashMap<SockKey, UnreadClose, { cap::UNREAD_CLOSES as usize }> =
    LruHashMap::new();

/// When `close::mesh_close_unread` last wrote an `UNREAD_CLOSES` entry (`bpf_ktime_get_ns`
/// after the insert; 0: never). Memory-mappable: the proxy reads it without a system call
/// and skips its `UNREAD_CLOSES` look-up while no entry can be fresh (mesh-agent
/// `datapath::close`). Not pinned.
#[btf_map]
pub static UNREAD_LAST: Array<u64, 1, { BPF_F_MMAPABLE as usize }> = Array::new();

/// `PEER_SK` value.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PeerSk {
    /// The peer socket's `struct sock` address; 0 until the first redirect.
    pub peer: u64,
    /// The kernel relay's target socket address (`RELAY`), learnt from a redirect to it;
    /// 0 until then.
    pub relay_peer: u64,
    /// Scratch: the program's context pointer, stored and loaded back so the verifier
    /// treats it as a number (probe reads of `struct sk_msg` fields at BTF offsets).
    pub ctx: u64,
    /// This socket's own psock address, kept by sockops when it pairs the socket: read at
    /// close, after the socket no longer names it (`close::mesh_close_unread`). 0 while
    /// that feature is off.
    pub psock: u64,
}

#[inline(always)]
fn map_ptr<T>(m: &T) -> *mut c_void {
    core::ptr::from_ref(m).cast_mut().cast()
}

/// `SOCK_STATE` of the socket `sk` (a full socket from the program's context), created
/// zeroed with `create`. `None`: no state (or, with `create`, no memory).
///
/// # Safety
///
/// `sk` must be the context's own socket pointer, checked non-null.
#[inline(always)]
pub unsafe fn sock_state(sk: *mut c_void, create: bool) -> Option<&'static mut SockState> {
    let flags = if create {
        BPF_SK_STORAGE_GET_F_CREATE as u64
    } else {
        0
    };
    // SAFETY: the kernel returns a pointer to this socket's value or null; the value stays
    // valid while the program runs (the socket is held by the caller).
    unsafe {
        let p = bpf_sk_storage_get(map_ptr(&SOCK_STATE), sk, core::ptr::null_mut(), flags);
        (p as *mut SockState).as_mut()
    }
}

/// `PEER_SK` of the socket `sk`, created zeroed if missing.
///
/// # Safety
///
/// As `sock_state`.
#[inline(always)]
pub unsafe fn peer_sk(sk: *mut c_void) -> Option<&'static mut PeerSk> {
    // SAFETY: as in `sock_state`.
    unsafe {
        let p = bpf_sk_storage_get(
            map_ptr(&PEER_SK),
            sk,
            core::ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE as u64,
        );
        (p as *mut PeerSk).as_mut()
    }
}

/// A socket-storage map definition whose values are copied to the sockets a listener
/// accepts (`BPF_F_CLONE`, 5.4+); aya-ebpf's `SkStorage` fixes its flags to
/// `BPF_F_NO_PREALLOC`. Laid out as `btf_map_def` lays out every BTF map.
#[repr(C)]
pub struct ClonedSkStorage<T> {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; (BPF_F_NO_PREALLOC | BPF_F_CLONE) as usize],
}

// SAFETY: placeholder pointers the loader reads from BTF; never dereferenced.
unsafe impl<T> Sync for ClonedSkStorage<T> {}

impl<T> ClonedSkStorage<T> {
    pub const fn new() -> Self {
        ClonedSkStorage {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
        }
    }
}

/// Each TCP socket's network-namespace cookie, stamped by `mesh_sock_netns`
/// (`cgroup/sock_create`) and cloned into every socket a stamped listener accepts: how
/// sockops names an accepting socket's namespace where it cannot ask the kernel (< 5.15).
#[btf_map]
pub static SOCK_NETNS: ClonedSkStorage<u64> = ClonedSkStorage::new();

/// The namespace stamped on the socket `sk` (`SOCK_NETNS`), 0 if it has none (it was made
/// before the stamping program was attached, or outside the cgroup).
///
/// # Safety
///
/// As `sock_state`.
#[inline(always)]
pub unsafe fn stamped_netns(sk: *mut c_void) -> u64 {
    // SAFETY: as in `sock_state`; the value is copied out at once.
    unsafe {
        let p = bpf_sk_storage_get(map_ptr(&SOCK_NETNS), sk, core::ptr::null_mut(), 0);
        match (p as *const u64).as_ref() {
            Some(c) => *c,
            None => 0,
        }
    }
}

/// Stamps the socket `sk` (a `cgroup/sock_create` context) with `netns`; false without
/// memory.
///
/// # Safety
///
/// `sk` must be the program's context pointer.
#[inline(always)]
pub unsafe fn stamp_netns(sk: *mut c_void, netns: u64) -> bool {
    // SAFETY: the kernel returns this socket's value (created zeroed) or null.
    unsafe {
        let p = bpf_sk_storage_get(
            map_ptr(&SOCK_NETNS),
            sk,
            core::ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE as u64,
        );
        match (p as *mut u64).as_mut() {
            Some(c) => {
                *c = netns;
                true
            }
            None => false,
        }
    }
}

/// The agent's netns-cookie probes (kernels without `SO_NETNS_COOKIE`): the agent inserts
/// the socket cookie of a UDP socket it made in a pod's network namespace, connects it,
/// and connect4 fills in the namespace's cookie. Only keys the agent inserted are filled,
/// so a pod cannot grow the map.
#[btf_map]
pub static NETNS_PROBE: HashMap<u64, u64, { cap::NETNS_PROBE as usize }> = HashMap::new();

/// Direct-mode flow records (opened, an end closed) for the agent's `istio_tcp_*` series
/// of flows no proxy sees. Fixed size; when full, a record is dropped and counted
/// (`telemetry_dropped`), never waited for. Not pinned (one reader per ring).
#[btf_map]
pub static FLOW_EVENTS: RingBuf<FlowRecord, { cap::FLOW_EVENTS_BYTES as usize }> = RingBuf::new();

/// Writes a flow record, or counts it dropped. The reader is woken only when the ring's
/// unread data crosses a multiple of `cap::FLOW_EVENTS_WAKE_BYTES`; in between it drains
/// the ring on its own timer (`datapath::events::FlowReader`). A wake-up per record (the
/// helper's default) is an irq_work self-IPI, which in a VM is an APIC MSR write that
/// exits to the hypervisor: measured on one vCPU, 24% of the CPU at 13k connections/s
/// (three records a connection), plus a context switch to the reader for each.
#[inline(always)]
pub fn flow_record(rec: &FlowRecord) {
    // SAFETY: helper call on our own ring buffer map.
    let before = unsafe { bpf_ringbuf_query(map_ptr(&FLOW_EVENTS), BPF_RB_AVAIL_DATA as u64) };
    // A record's room in the ring: the 8-byte header plus the record, 8-byte aligned.
    let after = before + ((core::mem::size_of::<FlowRecord>() as u64 + 8 + 7) & !7);
    let flags = if before / cap::FLOW_EVENTS_WAKE_BYTES as u64
        != after / cap::FLOW_EVENTS_WAKE_BYTES as u64
    {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if FLOW_EVENTS.output(rec, flags as u64).is_err() {
        bump(Stat::TelemetryDropped);
    }
}

/// Datapath events, indexed by `mesh_common::Stat`.
#[btf_map]
pub static STATS: PerCpuArray<u64, { Stat::COUNT as usize }> = PerCpuArray::new();

/// Offsets into kernel structures, resolved from the running kernel's BTF by the agent at
/// load time, for the sk_msg back-pressure check. Zero disables the check.
#[unsafe(no_mangle)]
pub static OFF_SK_USER_DATA: Global<u32> = Global::new(0);
/// `struct sk_msg`: `sk` (the sender) and `sk_redir` (the socket a redirect chose).
#[unsafe(no_mangle)]
pub static OFF_MSG_SK: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_MSG_SK_REDIR: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_SK_RCVBUF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_PSOCK_MSG_TOT_LEN: Global<u32> = Global::new(0);
/// `struct tcp_sock` sequence numbers, for the recovery from a back-pressure fallback
/// (`sk_msg::drained`) and the kernel relay's switch. Zero: no recovery (the fallback
/// stays, as before) and no relay.
#[unsafe(no_mangle)]
pub static OFF_TCP_WRITE_SEQ: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_TCP_COPIED_SEQ: Global<u32> = Global::new(0);
/// The kernel relay (`--kernel-relay`, and a kernel with everything it needs): non-zero
/// makes sk_msg look its sender up in `RELAY`. Zero (the default): the code is dead and
/// the verifier never walks it.
#[unsafe(no_mangle)]
pub static KERNEL_RELAY: Global<u32> = Global::new(0);
/// Non-zero: sockops may call `bpf_get_netns_cookie` (5.15+) and keys an accepting
/// socket's flow by its real namespace. Zero (older kernels): the namespace is derived
/// from the socket's local address (the proxy's listener: `CONFIG.proxy_netns`; a local
/// workload: `DESTS[addr].netns`), and the code that calls the helper is dead, never
/// verified.
#[unsafe(no_mangle)]
pub static SOCKOPS_NETNS: Global<u32> = Global::new(0);
/// Non-zero (where `SOCKOPS_NETNS` is 0 and the agent attached `mesh_sock_netns`): sockops
/// reads an accepting socket's namespace from its stamp in `SOCK_NETNS`, and derives it
/// from the address only for sockets without one. Zero: the lookup is dead code.
#[unsafe(no_mangle)]
pub static SOCK_NETNS_STAMP: Global<u32> = Global::new(0);
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
    OFF_SK_USER_DATA.load() != 0
        && OFF_PSOCK_MSG_TOT_LEN.load() != 0
        && OFF_SK_RCVBUF.load() != 0
        && OFF_MSG_SK_REDIR.load() != 0
        && OFF_MSG_SK.load() != 0
}

/// `(sk_rcvbuf, bytes waiting in the sk_msg ingress queue)` of the socket at kernel
/// address `addr` (from `PEER_SK`). Unreadable fields read as 0.
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

/// Reads the `u64` at `offset` of the kernel object at `addr`; 0 if unreadable.
#[inline(always)]
pub fn read_u64(addr: u64, offset: u32) -> u64 {
    let mut v: u64 = 0;
    // SAFETY: bpf_probe_read_kernel validates the source address.
    let rc = unsafe {
        bpf_probe_read_kernel(
            (&mut v as *mut u64).cast(),
            8,
            (addr as *const u8).wrapping_add(offset as usize).cast(),
        )
    };
    if rc == 0 {
        v
    } else {
        0
    }
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

/// Local enrolled workloads by IPv6 address (`Ip`), the same flags as `INBOUND`: read by
/// the TC program's IPv6 path, written by the agent's inbound manager.
#[btf_map]
pub static INBOUND6: HashMap<Ip, InboundInfo, { cap::INBOUND as usize }> = HashMap::new();
