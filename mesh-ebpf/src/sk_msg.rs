//! `sk_msg` on `SOCKHASH`: a send on one end of a paired connection goes straight into the
//! peer socket's receive queue (`bpf_msg_redirect_hash` with `BPF_F_INGRESS`), skipping the
//! TCP/IP stack.
//!
//! Back-pressure: an ingress redirect does not wait for the reader, so a fast sender could
//! queue without bound into a slow reader (and writes then fail with ENOMEM). Before each
//! redirect we read how many bytes already wait in the peer's queue (`sk_psock.msg_tot_len`,
//! at offsets the agent resolves from the kernel's BTF) and, above the limit, send this and
//! every later message of this socket over plain TCP instead (sticky, so bytes are never
//! reordered: the reader drains the redirect queue before the TCP queue). TCP then provides
//! the back-pressure.
//!
//! # Minimum kernel version
//!
//! 4.17 for sk_msg. The back-pressure check needs `sk_psock.msg_tot_len` (6.9) and
//! `bpf_probe_read_kernel` (5.8); on older kernels the agent leaves the offsets at 0,
//! which disables the check.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{sk_action::SK_PASS, BPF_F_INGRESS},
    macros::sk_msg,
    programs::SkMsgContext,
};
use mesh_common::{maps::SockKey, socket_key, Stat, AF_INET6};

use crate::maps::{
    add, bump, queue_check_enabled, read_addressing, socket_queue, FALLBACK, QUEUE_LIMIT_FLOOR,
    SK_ADDR, SOCKHASH,
};

#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    let md = ctx.msg;
    // SAFETY: the context pointer is valid for the program's lifetime.
    let ((family, l4, r4, l6, r6, lport, rport), size) =
        unsafe { (read_addressing!(md), read_volatile(&(*md).size)) };
    let Some((me, _)) = socket_key(family, l4, r4, l6, r6, lport, rport) else {
        if family == AF_INET6 {
            bump(Stat::MsgPassUnpaired);
        }
        return SK_PASS;
    };
    // SAFETY: the value is not kept past this check.
    if unsafe { FALLBACK.get(me) }.is_some() {
        bump(Stat::MsgPassFallback);
        return SK_PASS;
    }
    let peer = me.reversed();
    if peer_queue_full(&peer) {
        // Both directions leave the redirect path together, so a slow reader's own
        // replies also get TCP's flow control.
        let _ = FALLBACK.insert(me, 1, 0);
        let _ = FALLBACK.insert(peer, 1, 0);
        bump(Stat::MsgPassBackpressure);
        return SK_PASS;
    }
    let mut key = peer;
    if SOCKHASH.redirect_msg(&ctx, &mut key, BPF_F_INGRESS as u64) as u32 != SK_PASS {
        // The peer is not in the sockhash (established before the agent started, its
        // insert failed, or it just closed). The helper set no redirect, so returning
        // SK_PASS sends this message over TCP; stay there for good so later messages
        // cannot overtake it.
        let _ = FALLBACK.insert(me, 1, 0);
        bump(Stat::MsgPassNoPeer);
        return SK_PASS;
    }
    bump(Stat::MsgRedirected);
    add(Stat::MsgRedirectedBytes, size as u64);
    SK_PASS
}

/// Whether more bytes than the limit already wait in the peer's redirect queue.
#[inline(always)]
fn peer_queue_full(peer: &SockKey) -> bool {
    if !queue_check_enabled() {
        return false;
    }
    // SAFETY: the value is copied out at once.
    let Some(addr) = (unsafe { SK_ADDR.get(peer) }).copied() else {
        return false;
    };
    let (rcvbuf, queued) = socket_queue(addr);
    let floor = QUEUE_LIMIT_FLOOR.load();
    let limit = if rcvbuf > 0 && rcvbuf as u32 > floor {
        rcvbuf as u32
    } else {
        floor
    };
    queued > limit
}
