//! `mesh_close_unread` (`tp_btf/inet_sock_set_state`): notes a paired socket closed with
//! bytes redirected to it still unread, so the node proxy can end the other side of its
//! flow with a reset instead of a clean end of stream (docs/architecture.md, "A paired
//! socket closed with unread bytes").
//!
//! Plain TCP answers a `close()` that leaves bytes unread with an RST. A paired socket's
//! redirected bytes wait in its psock's queue, which `sock_map_close` (the psock's
//! `sk_prot->close`) unlinks before `tcp_close` counts `sk_receive_queue`: the kernel
//! sends a FIN. By the time `tcp_close` changes the state (ESTABLISHED -> FIN_WAIT1,
//! CLOSE_WAIT -> LAST_ACK, just before `tcp_send_fin`) the socket no longer names its
//! psock, but the psock itself is only freed after an RCU grace period (`sk_psock_drop`
//! queues `sk_psock_destroy`, which purges the queue, as RCU work). So sockops remembers
//! each paired socket's psock address when it pairs it (`remember_psock`, in `PEER_SK`,
//! the map that is never pinned), and this program, at that state change in the closing
//! task, reads the queue length there. The entry is in `UNREAD_CLOSES` before the FIN is
//! sent: whoever reads that FIN and then looks finds it: the node proxy (its relay's
//! `pipe`), or, for a FIN that goes straight to another enrolled pod (direct mode),
//! `mesh_tc_ingress` in that pod, which rewrites it into an RST (`tc::fin_to_rst`).
//!
//! Why not `fentry/sock_map_close`, which runs while the psock is still linked: on the
//! kernel this was built on (6.18 under Firecracker, lockdown `integrity`) every
//! trampoline program (fentry, fexit, fmod_ret, lsm) fails `BPF_PROG_LOAD` with `EPERM`
//! after verifying; BTF tracepoints load.
//!
//! Accepted race: were the closing task preempted between `sk_psock_put` and `tcp_close`
//! for longer than a grace period plus the work's delay, the psock may be purged or
//! freed. A purged queue reads 0 (no mark: the FIN goes as before); freed memory is
//! recognised by `sk_psock.sk` no longer naming the socket (checked before the length is
//! believed).
//!
//! # Minimum kernel version
//!
//! BTF tracepoints need 5.5; the queue length (`sk_psock.msg_tot_len`) 6.9. The agent
//! loads it only where the offsets resolve.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_probe_read_kernel, bpf_sk_storage_get},
    },
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
    Global,
};
use mesh_common::{
    maps::{SockKey, UnreadClose},
    Stat, AF_INET, AF_INET6,
};

use crate::maps::{
    bump, PeerSk, OFF_PSOCK_MSG_TOT_LEN, OFF_SK_USER_DATA, PEER_SK, UNREAD_CLOSES, UNREAD_LAST,
};

/// Offsets in `struct sock` (through `sock_common`) and `struct sk_psock` from the
/// running kernel's BTF, set by the agent at load time, indexed by the `OFF_*` constants
/// below. `OFF_PROTOCOL` at 0: the feature is off (the program is not loaded then).
#[unsafe(no_mangle)]
pub static CLOSE_OFFSETS: Global<[u32; 10]> = Global::new([0; 10]);

const OFF_DADDR: usize = 0;
const OFF_RCV_SADDR: usize = 1;
const OFF_DPORT: usize = 2;
const OFF_NUM: usize = 3;
const OFF_FAMILY: usize = 4;
const OFF_V6_DADDR: usize = 5;
const OFF_V6_RCV_SADDR: usize = 6;
const OFF_PROTOCOL: usize = 7;
/// `sock.sk_shutdown` (u8).
const OFF_SHUTDOWN: usize = 8;
/// `sk_psock.sk`.
const OFF_PSOCK_SK: usize = 9;

const IPPROTO_TCP: u16 = 6;
const TCP_FIN_WAIT1: i32 = 4;
const TCP_LAST_ACK: i32 = 9;
/// `RCV_SHUTDOWN | SEND_SHUTDOWN`: what `tcp_close` sets first (a `shutdown(SHUT_WR)`
/// sets only `SEND_SHUTDOWN`, and its bytes may still be read).
const SHUTDOWN_MASK: u8 = 3;

/// Whether `mesh_close_unread` can mark closes here: the queue length (6.9+) and the
/// socket offsets were set at load time (not where the feature is forced missing). Both
/// are load-time constants, so where this is false the verifier never walks what it
/// guards (the FIN rewrite in `tc`, the psock address in sockops).
#[inline(always)]
pub fn marks_closes() -> bool {
    // The plain `u32` first, as in `remember_psock`.
    OFF_PSOCK_MSG_TOT_LEN.load() != 0 && CLOSE_OFFSETS.load()[OFF_PROTOCOL] != 0
}

/// Called by sockops when it has put the socket `sk` (its context's full socket) into
/// `SOCKHASH`: keeps the psock's address for `mesh_close_unread`. Does nothing while the
/// feature is off.
///
/// # Safety
///
/// `sk` must be the context's own socket pointer, checked non-null.
#[inline(always)]
pub unsafe fn remember_psock(sk: *mut c_void) {
    let user_data = OFF_SK_USER_DATA.load();
    // The queue length first: a plain `u32` global, 0 before 6.9, so there the verifier
    // sees a constant and never walks the rest (as `queue_check_enabled`).
    if OFF_PSOCK_MSG_TOT_LEN.load() == 0
        || user_data == 0
        || CLOSE_OFFSETS.load()[OFF_PROTOCOL] == 0
    {
        return;
    }
    // SAFETY: as the caller's; the value pointer is valid while the program runs.
    let Some(p) = (unsafe { crate::maps::peer_sk(sk) }) else {
        return;
    };
    // The verifier forbids arithmetic on a socket pointer: store it and load it back as
    // a number (as `PeerSk::ctx` does for sk_msg's context).
    // SAFETY: plain stores and loads of this socket's value.
    let addr = unsafe {
        core::ptr::write_volatile(&mut p.psock, sk as u64);
        core::ptr::read_volatile(&p.psock)
    };
    p.psock = read::<u64>(addr as *const c_void, user_data).unwrap_or(0) & !7;
}

/// Runs at every TCP state change; acts only on `tcp_close`'s own change of a paired
/// socket.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn mesh_close_unread(ctx: BtfTracePointContext) -> i32 {
    let new: i32 = ctx.arg(2);
    if new == TCP_FIN_WAIT1 || new == TCP_LAST_ACK {
        let sk: *mut c_void = ctx.arg(0);
        try_close_unread(sk);
    }
    0
}

#[inline(always)]
fn try_close_unread(sk: *mut c_void) {
    let off = CLOSE_OFFSETS.load();
    let tot_len = OFF_PSOCK_MSG_TOT_LEN.load();
    if sk.is_null() || tot_len == 0 || off[OFF_PROTOCOL] == 0 {
        return;
    }
    if read::<u8>(sk, off[OFF_SHUTDOWN]) != Some(SHUTDOWN_MASK)
        || read::<u16>(sk, off[OFF_PROTOCOL]) != Some(IPPROTO_TCP)
    {
        return;
    }
    // SAFETY: `sk` is the tracepoint's socket (a BTF pointer the helper accepts); no
    // creation: only sockets sockops paired have an entry.
    let peer = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&PEER_SK).cast_mut().cast(),
            sk,
            core::ptr::null_mut(),
            0,
        ) as *mut PeerSk
    };
    // SAFETY: null or this socket's value, valid while the program runs.
    let Some(peer) = (unsafe { peer.as_ref() }) else {
        return;
    };
    let psock = peer.psock;
    if psock == 0 {
        return;
    }
    let psock = psock as *const c_void;
    // Still this socket's psock (not freed and reused: see the accepted race above).
    if read::<u64>(psock, off[OFF_PSOCK_SK]) != Some(sk as u64) {
        return;
    }
    let unread = read::<u32>(psock, tot_len).unwrap_or(0);
    if unread == 0 {
        return;
    }
    let Some(key) = view(sk, &off) else {
        return;
    };
    let v = UnreadClose {
        // SAFETY: helper without arguments.
        at_ns: unsafe { bpf_ktime_get_ns() },
        unread,
        _pad: 0,
    };
    // A full map evicts its oldest entry (LRU): old entries are stale anyway.
    if UNREAD_CLOSES.insert(key, v, 0).is_ok() {
        bump(Stat::ClosedUnread);
        note_last();
    }
}

/// Stamps `UNREAD_LAST` after an insert: the proxy looks in `UNREAD_CLOSES` only while
/// some entry may be fresh (this stamp younger than `UNREAD_CLOSE_FRESH_NS`), and skips
/// the system call on every other FIN it reads. The stamp is written before `tcp_close`
/// sends the FIN, so a proxy that reads the FIN sees it.
///
/// Accepted race: two CPUs stamping at once may leave the older of two close stamps (a
/// plain store, not a maximum); the stamp is still taken after this CPU's insert, and the
/// proxy allows a margin of a second beyond freshness (far more than two such programs
/// can be apart) before it skips.
#[inline(always)]
fn note_last() {
    if let Some(p) = UNREAD_LAST.get_ptr_mut(0) {
        // SAFETY: the one slot of an array map, valid while the program runs; a u64 store
        // is single-copy atomic, so a reader sees the old stamp or the new one.
        unsafe { core::ptr::write_volatile(p, bpf_ktime_get_ns()) };
    }
}

/// The closing socket's (local, remote) view, namespace 0 (IPv4 v4-mapped).
#[inline(always)]
fn view(sk: *mut c_void, off: &[u32; 10]) -> Option<SockKey> {
    let family = u32::from(read::<u16>(sk, off[OFF_FAMILY])?);
    let l4 = read::<u32>(sk, off[OFF_RCV_SADDR])?;
    let r4 = read::<u32>(sk, off[OFF_DADDR])?;
    let (l6, r6) = if family == AF_INET6 {
        (
            read::<[u32; 4]>(sk, off[OFF_V6_RCV_SADDR])?,
            read::<[u32; 4]>(sk, off[OFF_V6_DADDR])?,
        )
    } else if family == AF_INET {
        ([0; 4], [0; 4])
    } else {
        return None;
    };
    let local_port = read::<u16>(sk, off[OFF_NUM])?;
    let remote_port = u16::from_be(read::<u16>(sk, off[OFF_DPORT])?);
    let (mut key, _) =
        mesh_common::socket_key(0, family, l4, r4, l6, r6, u32::from(local_port), 0)?;
    key.remote_port = remote_port;
    Some(key)
}

/// Reads the `T` at `offset` of the kernel object at `base`; `None` if unreadable.
#[inline(always)]
fn read<T: Copy + Default>(base: *const c_void, offset: u32) -> Option<T> {
    let mut v = T::default();
    // SAFETY: bpf_probe_read_kernel validates the source address; the offsets come from
    // the running kernel's BTF.
    let rc = unsafe {
        bpf_probe_read_kernel(
            (&mut v as *mut T).cast(),
            core::mem::size_of::<T>() as u32,
            (base as *const u8).wrapping_add(offset as usize).cast(),
        )
    };
    (rc == 0).then_some(v)
}
