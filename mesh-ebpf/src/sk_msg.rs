//! `sk_msg` on `SOCKHASH`: a send on one end of a paired connection goes straight into the
//! peer socket's receive queue (`bpf_msg_redirect_hash` with `BPF_F_INGRESS`), skipping the
//! TCP/IP stack.
//!
//! Back-pressure: an ingress redirect does not wait for the reader, so a fast sender could
//! queue without bound into a slow reader (and writes then fail with ENOMEM). Before each
//! redirect we read how many bytes already wait in the peer's queue (`sk_psock.msg_tot_len`,
//! at offsets the agent resolves from the kernel's BTF) and, above the limit, send this and
//! later messages of this socket over plain TCP instead (sticky, so bytes are never
//! reordered: the reader drains the redirect queue before the TCP queue). TCP then provides
//! the back-pressure. Once every byte sent over TCP has been acknowledged and read and the
//! redirect queue has drained to half the limit, the sender goes back to redirecting
//! (`drained`): nothing of it is left on the TCP path for a redirect to overtake.
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
use mesh_common::{fallback, maps::SockKey, socket_key, Stat, AF_INET6};

use crate::maps::{
    add, bump, queue_check_enabled, read_addressing, read_u32, socket_queue, FALLBACK,
    OFF_TCP_COPIED_SEQ, OFF_TCP_RCV_NXT, OFF_TCP_SND_UNA, OFF_TCP_WRITE_SEQ, QUEUE_LIMIT_FLOOR,
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
    let peer = me.reversed();
    // SAFETY: the value is copied out at once.
    match unsafe { FALLBACK.get(me) }.copied() {
        None => {}
        Some(fallback::BACKPRESSURE) if drained(&me, &peer) => {
            // Accepted race: none. This sender's socket lock is held (we run inside its
            // sendmsg), so no byte of it can enter TCP between the check and the redirect.
            let _ = FALLBACK.remove(me);
            bump(Stat::MsgFallbackRecovered);
        }
        Some(_) => {
            bump(Stat::MsgPassFallback);
            return SK_PASS;
        }
    }
    if peer_queue_full(&peer) {
        // Both directions leave the redirect path together, so a slow reader's own
        // replies also get TCP's flow control; each comes back on its own once drained.
        let _ = FALLBACK.insert(me, fallback::BACKPRESSURE, 0);
        let _ = FALLBACK.insert(peer, fallback::BACKPRESSURE, 0);
        bump(Stat::MsgPassBackpressure);
        return SK_PASS;
    }
    let mut key = peer;
    if SOCKHASH.redirect_msg(&ctx, &mut key, BPF_F_INGRESS as u64) as u32 != SK_PASS {
        // The peer is not in the sockhash (established before the agent started, its
        // insert failed, or it just closed). The helper set no redirect, so returning
        // SK_PASS sends this message over TCP; stay there for good so later messages
        // cannot overtake it.
        let _ = FALLBACK.insert(me, fallback::NO_PEER, 0);
        bump(Stat::MsgPassNoPeer);
        return SK_PASS;
    }
    bump(Stat::MsgRedirected);
    add(Stat::MsgRedirectedBytes, size as u64);
    SK_PASS
}

/// Whether a sender in back-pressure fallback may go back to redirecting without
/// reordering: every byte it sent over TCP was acknowledged (`snd_una == write_seq`: none
/// is in flight, queued, or waiting in the peer's backlog, which is acknowledged only once
/// processed), the reader has read all of them (`copied_seq == rcv_nxt` on the peer), and
/// the peer's redirect queue is below half the limit (hysteresis, so a reader that stays
/// slow does not make the pair flip at every message).
#[inline(always)]
fn drained(me: &SockKey, peer: &SockKey) -> bool {
    let (una, wseq, nxt, copied) = (
        OFF_TCP_SND_UNA.load(),
        OFF_TCP_WRITE_SEQ.load(),
        OFF_TCP_RCV_NXT.load(),
        OFF_TCP_COPIED_SEQ.load(),
    );
    if una == 0 || wseq == 0 || nxt == 0 || copied == 0 || !queue_check_enabled() {
        return false;
    }
    // SAFETY: the values are copied out at once.
    let (Some(mine), Some(theirs)) = (
        unsafe { SK_ADDR.get(me) }.copied(),
        unsafe { SK_ADDR.get(peer) }.copied(),
    ) else {
        return false;
    };
    let sent_all_acked = match (read_u32(mine, una), read_u32(mine, wseq)) {
        (Some(a), Some(w)) => a == w,
        _ => false,
    };
    if !sent_all_acked {
        return false;
    }
    let read_all = match (read_u32(theirs, nxt), read_u32(theirs, copied)) {
        (Some(n), Some(c)) => n == c,
        _ => false,
    };
    if !read_all {
        return false;
    }
    let (rcvbuf, queued) = socket_queue(theirs);
    queued <= queue_limit(rcvbuf) / 2
}

/// The most bytes a redirect queue may hold: the peer's `SO_RCVBUF`, at least the floor.
#[inline(always)]
fn queue_limit(rcvbuf: i32) -> u32 {
    let floor = QUEUE_LIMIT_FLOOR.load();
    if rcvbuf > 0 && rcvbuf as u32 > floor {
        rcvbuf as u32
    } else {
        floor
    }
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
    queued > queue_limit(rcvbuf)
}
