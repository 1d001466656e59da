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
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE, BPF_TCP_FIN_WAIT1,
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

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => active_established(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => passive_established(&ctx),
        BPF_SOCK_OPS_STATE_CB => state_changed(&ctx),
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
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
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
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
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
        unpair_on_fin(key);
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

/// This socket sent its FIN (shutdown(SHUT_WR) or close). A socket in a sockmap reads
/// through `tcp_bpf_recvmsg`, which waits for data once and answers EAGAIN to a blocking
/// reader when any other event (the ACK of this FIN moving the socket to FIN_WAIT2, send
/// space freed by ACKs) wakes it. The common "send, half-close, read the answer" pattern
/// hits exactly that. The socket sends nothing more, so take it out of the sockhash: the
/// kernel restores the plain TCP receive path, and the peer's later sends fall back to TCP
/// (its sk_msg finds no peer). Only when nothing waits in the redirect queue: dropping the
/// psock would discard it. STATE_CB runs with the socket locked, and redirects into this
/// socket take the same lock, so the queue cannot grow between the check and the delete.
#[inline(always)]
fn unpair_on_fin(key: SockKey) {
    // SAFETY: the value is copied out at once.
    let Some(addr) = (unsafe { SK_ADDR.get(key) }).copied() else {
        return;
    };
    if !queue_check_enabled() {
        return;
    }
    let (_, queued) = socket_queue(addr);
    if queued != 0 {
        bump(Stat::UnpairSkippedQueued);
        return;
    }
    // SAFETY: deleting our own key; sockops may delete from a sockhash.
    let rc = unsafe {
        bpf_map_delete_elem(
            core::ptr::addr_of!(SOCKHASH) as *mut core::ffi::c_void,
            (&key as *const SockKey).cast(),
        )
    };
    if rc == 0 {
        let _ = SK_ADDR.remove(key);
        bump(Stat::UnpairedOnFin);
    }
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
