//! `sockops`: pairs the sockets of captured connections.
//!
//! - ACTIVE_ESTABLISHED (client side, connect() completing): if connect4 marked the socket,
//!   record `FLOWS[client view]` (the proxy reads the original destination from it) and put
//!   the socket in `SOCKHASH`.
//! - PASSIVE_ESTABLISHED (server side: the node proxy, or the destination pod in direct
//!   mode): if `FLOWS` holds the reversed tuple, put this socket in `SOCKHASH` too, which
//!   turns on the sk_msg short-circuit for the pair.
//! - STATE_CB to TCP_CLOSE: drop the flow record and the fallback mark.
//!
//! # Minimum kernel version
//!
//! 5.3 (`BPF_SOCK_OPS_STATE_CB`, socket cookie in sock_ops since 5.0); sockhash 4.18.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_HDR_OPT_LEN_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG,
        BPF_TCP_CLOSE, BPF_TCP_FIN_WAIT1,
    },
    helpers::{bpf_get_socket_cookie, generated::bpf_map_delete_elem},
    macros::sock_ops,
    programs::SockOpsContext,
};
use mesh_common::{
    cfg_flags, flow_flags,
    maps::{FlowInfo, SockKey},
    remote_port_host, v4_mapped, Stat,
};

use crate::maps::{
    bump, config, queue_check_enabled, socket_queue, FALLBACK, FLOWS, SK_ADDR, SOCKHASH, SOCK_ORIG,
};

/// Callbacks a paired socket needs: state changes (flow cleanup, un-pair on FIN), and TCP
/// traffic (transmit header-option sizing, RTT samples on ACKs) to notice the fallback.
const PAIRED_CB_FLAGS: u32 =
    BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => active_established(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => passive_established(&ctx),
        BPF_SOCK_OPS_STATE_CB => state_changed(&ctx),
        // A paired socket only sends or gets ACKs over TCP once it fell back.
        BPF_SOCK_OPS_HDR_OPT_LEN_CB | BPF_SOCK_OPS_RTT_CB => on_tcp_traffic(&ctx),
        _ => {}
    }
    0
}

/// This socket's (local, remote) view, with v4-mapped IPv6 folded to IPv4.
///
/// Every context field is read up front with a volatile load: the verifier rejects loads
/// through a ctx pointer the compiler has offset and kept in a register for later.
#[inline(always)]
fn sock_key(ctx: &SockOpsContext) -> Option<(SockKey, bool)> {
    let ops = ctx.ops;
    // SAFETY: the context pointer is valid for the program's lifetime.
    let (family, l4, r4, l6, r6, lport, rport) = unsafe {
        (
            read_volatile(&(*ops).family),
            read_volatile(&(*ops).local_ip4),
            read_volatile(&(*ops).remote_ip4),
            [
                read_volatile(&(*ops).local_ip6[0]),
                read_volatile(&(*ops).local_ip6[1]),
                read_volatile(&(*ops).local_ip6[2]),
                read_volatile(&(*ops).local_ip6[3]),
            ],
            [
                read_volatile(&(*ops).remote_ip6[0]),
                read_volatile(&(*ops).remote_ip6[1]),
                read_volatile(&(*ops).remote_ip6[2]),
                read_volatile(&(*ops).remote_ip6[3]),
            ],
            read_volatile(&(*ops).local_port),
            read_volatile(&(*ops).remote_port),
        )
    };
    let (local, remote, v6) = match family {
        AF_INET => (l4, r4, false),
        AF_INET6 => (v4_mapped(l6)?, v4_mapped(r6)?, true),
        _ => return None,
    };
    Some((
        SockKey {
            local_ip4: local,
            remote_ip4: remote,
            local_port: lport as u16,
            remote_port: remote_port_host(rport),
        },
        v6,
    ))
}

#[inline(always)]
fn active_established(ctx: &SockOpsContext) {
    // SAFETY: helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: the value is copied out at once.
    let Some(orig) = unsafe { SOCK_ORIG.get(cookie) }.copied() else {
        return;
    };
    let _ = SOCK_ORIG.remove(cookie);
    let Some((key, v6)) = sock_key(ctx) else {
        return;
    };
    let mut flags = orig.flags;
    if v6 {
        flags |= flow_flags::CLIENT_V6;
    }
    let cfg = config();
    let pair = orig.flags & flow_flags::DIRECT != 0 || cfg.flags & cfg_flags::SKMSG != 0;
    if pair {
        flags |= flow_flags::CLIENT_PAIRED;
    }
    let info = FlowInfo {
        orig_ip4: orig.ip4,
        orig_port: orig.port,
        flags,
        src_id: orig.src_id,
        dst_id: orig.dst_id,
        _pad: 0,
    };
    if FLOWS.insert(key, info, 0).is_err() {
        bump(Stat::FlowStoreFailed);
        return;
    }
    // Accepted race: the flow record is written before this socket is in the sockhash;
    // the peer only pairs when it finds the record, and sk_msg only redirects to a peer
    // that is in the sockhash, so either order is safe.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | PAIRED_CB_FLAGS) as i32);
    if pair {
        // SAFETY: the context pointer is valid for the program's lifetime.
        if SOCKHASH.update(key, unsafe { &mut *ctx.ops }, 0).is_ok() {
            remember_addr(ctx, key);
            bump(Stat::SockopsClientPaired);
        } else {
            bump(Stat::SockhashUpdateFailed);
        }
    }
}

#[inline(always)]
fn passive_established(ctx: &SockOpsContext) {
    let Some((key, _)) = sock_key(ctx) else {
        return;
    };
    let client_view = key.reversed();
    let Some(flow) = FLOWS.get_ptr_mut(client_view) else {
        return;
    };
    // SAFETY: map value pointer returned by the kernel, valid during this program run.
    let flow = unsafe { &mut *flow };
    if flow.flags & flow_flags::CLIENT_PAIRED == 0 {
        return;
    }
    // SAFETY: the context pointer is valid for the program's lifetime.
    if SOCKHASH.update(key, unsafe { &mut *ctx.ops }, 0).is_ok() {
        remember_addr(ctx, key);
        // Accepted race: a concurrent reader (the proxy) may see the flag a moment late;
        // it only labels metrics.
        flow.flags |= flow_flags::SERVER_PAIRED;
        bump(Stat::SockopsServerPaired);
        let _ = ctx.set_cb_flags((ctx.cb_flags() | PAIRED_CB_FLAGS) as i32);
    } else {
        bump(Stat::SockhashUpdateFailed);
    }
}

#[inline(always)]
fn state_changed(ctx: &SockOpsContext) {
    // arg 1 is the new state.
    let state = ctx.arg(1);
    if state != BPF_TCP_CLOSE && state != BPF_TCP_FIN_WAIT1 {
        return;
    }
    let Some((key, _)) = sock_key(ctx) else {
        return;
    };
    if state == BPF_TCP_FIN_WAIT1 {
        if unpair_if_drained(key) {
            bump(Stat::UnpairedOnFin);
        }
        return;
    }
    // The kernel removes closed sockets from SOCKHASH itself; the flow record is keyed by
    // the client's view, so the client's close removes it.
    let _ = FALLBACK.remove(key);
    let _ = SK_ADDR.remove(key);
    if FLOWS.remove(key).is_ok() {
        bump(Stat::FlowClosed);
    }
}

/// TCP traffic on a paired socket: it (or its peer) fell back from the redirect path. Once
/// its own redirect queue is drained, un-pair it and stop these callbacks.
#[inline(always)]
fn on_tcp_traffic(ctx: &SockOpsContext) {
    let Some((key, _)) = sock_key(ctx) else {
        return;
    };
    // SAFETY: only tested for presence.
    if unsafe { FALLBACK.get(key) }.is_none() {
        return;
    }
    if unpair_if_drained(key) {
        bump(Stat::UnpairedOnFallback);
        let _ = ctx.set_cb_flags(
            (ctx.cb_flags() & !(BPF_SOCK_OPS_RTT_CB_FLAG | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG))
                as i32,
        );
    }
}

/// Takes a socket out of the sockhash when nothing waits in its redirect queue.
///
/// Why: a socket in a sockmap reads through `tcp_bpf_recvmsg`, which waits for data once
/// and answers EAGAIN to a *blocking* reader when anything else wakes it: the ACK of its
/// FIN (FIN_WAIT1 -> FIN_WAIT2), or send space freed by ACKs once it sends over TCP after a
/// fallback. Out of the sockhash the kernel restores the plain TCP receive path. Only when
/// the redirect queue is empty: dropping the psock would discard what waits there. Redirects
/// into this socket take its lock, as does this callback when it runs from the socket's
/// own syscalls; and the peer stopped redirecting (FALLBACK, or it closed) before we get
/// here, so the queue cannot grow behind the check. The peer's later sends find no peer
/// in the sockhash and go over TCP.
#[inline(always)]
fn unpair_if_drained(key: SockKey) -> bool {
    // SAFETY: the value is copied out at once.
    let Some(addr) = (unsafe { SK_ADDR.get(key) }).copied() else {
        return false;
    };
    if !queue_check_enabled() {
        return false;
    }
    let (_, queued) = socket_queue(addr);
    if queued != 0 {
        bump(Stat::UnpairSkippedQueued);
        return false;
    }
    // SAFETY: deleting our own key; sockops may delete from a sockhash.
    let rc = unsafe {
        bpf_map_delete_elem(
            core::ptr::addr_of!(SOCKHASH) as *mut core::ffi::c_void,
            (&key as *const SockKey).cast(),
        )
    };
    if rc != 0 {
        return false;
    }
    let _ = SK_ADDR.remove(key);
    true
}

/// Records the socket's kernel address for the sk_msg back-pressure check. Storing a
/// pointer in a map needs the loader to be privileged (CAP_PERFMON): the agent is.
#[inline(always)]
fn remember_addr(ctx: &SockOpsContext, key: SockKey) {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let sk = unsafe { read_volatile(&(*ctx.ops).__bindgen_anon_2.sk) };
    if !sk.is_null() {
        let _ = SK_ADDR.insert(key, sk as u64, 0);
    }
}
