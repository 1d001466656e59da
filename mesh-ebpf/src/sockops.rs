//! `sockops`: pairs the sockets of captured connections.
//!
//! - ACTIVE_ESTABLISHED (client side, connect() completing): if connect4 marked the socket,
//!   record `FLOWS[client view]` (the proxy reads the original destination from it) and put
//!   the socket in `SOCKHASH`.
//! - PASSIVE_ESTABLISHED (server side: the node proxy, or the destination pod in direct
//!   mode): if `FLOWS` holds the reversed tuple, put this socket in `SOCKHASH` too, which
//!   turns on the sk_msg short-circuit for the pair.
//! - TCP_CONNECT (a captured socket sends its SYN): ask for state callbacks, so a connect
//!   that never completes still drops its `SOCK_ORIG` record on close.
//! - STATE_CB to TCP_CLOSE: drop the flow record, the fallback mark and the address.
//!
//! Paired sockets are never taken out of the sockhash while they live: deleting one drops
//! its psock, which discards whatever a concurrent redirect from the peer queued there
//! (measured: 64 KiB lost in a 16 MiB echo when a socket was un-paired on its FIN).
//!
//! # Minimum kernel version
//!
//! 5.3 (`BPF_SOCK_OPS_STATE_CB`, socket cookie in sock_ops since 5.0); sockhash 4.18.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use mesh_common::{
    cfg_flags, flow_flags,
    maps::{FlowInfo, SockKey},
    socket_key, Stat,
};

use crate::maps::{bump, config, read_addressing, FALLBACK, FLOWS, SK_ADDR, SOCKHASH, SOCK_ORIG};

/// Callbacks a paired socket needs: state changes, for the flow clean-up on close.
const PAIRED_CB_FLAGS: u32 = BPF_SOCK_OPS_STATE_CB_FLAG;

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => active_established(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => passive_established(&ctx),
        BPF_SOCK_OPS_STATE_CB => state_changed(&ctx),
        BPF_SOCK_OPS_TCP_CONNECT_CB => connecting(&ctx),
        _ => {}
    }
    0
}

/// This socket's (local, remote) view, with v4-mapped IPv6 folded to IPv4.
#[inline(always)]
fn sock_key(ctx: &SockOpsContext) -> Option<(SockKey, bool)> {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let (family, l4, r4, l6, r6, lport, rport) = unsafe { read_addressing!(ctx.ops) };
    socket_key(family, l4, r4, l6, r6, lport, rport)
}

#[inline(always)]
fn active_established(ctx: &SockOpsContext) {
    // SAFETY: helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: the value is copied out at once.
    let Some(orig) = unsafe { SOCK_ORIG.get(cookie) }.copied() else {
        upstream_established(ctx);
        return;
    };
    if orig.flags & flow_flags::PROXIED == 0 {
        // Proxied sockets keep theirs until close: getpeername4|6 answer from it.
        let _ = SOCK_ORIG.remove(cookie);
    }
    let Some((key, v6)) = sock_key(ctx) else {
        return;
    };
    let mut flags = orig.flags;
    if v6 {
        flags |= flow_flags::CLIENT_V6;
    }
    let cfg = config();
    let pair = (orig.flags & flow_flags::DIRECT != 0 || cfg.flags & cfg_flags::SKMSG != 0)
        && cfg.flags & cfg_flags::NO_PAIRING == 0;
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

/// The node proxy's connection to a local destination, announced by the proxy in `FLOWS`
/// (flag `upstream`) before it connected: pair it like a client.
#[inline(always)]
fn upstream_established(ctx: &SockOpsContext) {
    let Some((key, _)) = sock_key(ctx) else {
        return;
    };
    let Some(flow) = FLOWS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: map value pointer returned by the kernel, valid during this program run.
    let flow = unsafe { &mut *flow };
    if flow.flags & flow_flags::UPSTREAM == 0 || config().flags & cfg_flags::NO_PAIRING != 0 {
        return;
    }
    let _ = ctx.set_cb_flags((ctx.cb_flags() | PAIRED_CB_FLAGS) as i32);
    // SAFETY: the context pointer is valid for the program's lifetime.
    if SOCKHASH.update(key, unsafe { &mut *ctx.ops }, 0).is_ok() {
        remember_addr(ctx, key);
        flow.flags |= flow_flags::CLIENT_PAIRED;
        bump(Stat::SockopsClientPaired);
    } else {
        bump(Stat::SockhashUpdateFailed);
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

/// A connect the connect hooks decided on is starting: watch its state, so a connect that
/// never completes (refused, timed out, reset) drops its `SOCK_ORIG` record when it closes
/// instead of leaving it to LRU eviction.
#[inline(always)]
fn connecting(ctx: &SockOpsContext) {
    // SAFETY: helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: presence test only.
    if unsafe { SOCK_ORIG.get(cookie) }.is_some() {
        let _ = ctx.set_cb_flags((ctx.cb_flags() | PAIRED_CB_FLAGS) as i32);
    }
}

#[inline(always)]
fn state_changed(ctx: &SockOpsContext) {
    // arg 1 is the new state.
    if ctx.arg(1) != BPF_TCP_CLOSE {
        return;
    }
    let Some((key, _)) = sock_key(ctx) else {
        return;
    };
    // The kernel removes closed sockets from SOCKHASH itself; the flow record is keyed by
    // the client's view, so the client's close removes it.
    let _ = FALLBACK.remove(key);
    let _ = SK_ADDR.remove(key);
    // SAFETY: helper call on the program's own context.
    let _ = SOCK_ORIG.remove(unsafe { bpf_get_socket_cookie(ctx.ops.cast()) });
    if FLOWS.remove(key).is_ok() {
        bump(Stat::FlowClosed);
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
