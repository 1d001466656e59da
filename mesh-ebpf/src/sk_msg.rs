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
use mesh_common::{maps::SockKey, remote_port_host, v4_mapped, Stat};

use crate::maps::{
    add, bump, queue_check_enabled, socket_queue, FALLBACK, QUEUE_LIMIT_FLOOR, SK_ADDR, SOCKHASH,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    let md = ctx.msg;
    // SAFETY: the context pointer is valid for the program's lifetime. All fields are read
    // up front with volatile loads (the verifier rejects offset ctx pointers kept for later).
    let (family, l4, r4, l6, r6, lport, rport, size) = unsafe {
        (
            read_volatile(&(*md).family),
            read_volatile(&(*md).local_ip4),
            read_volatile(&(*md).remote_ip4),
            [
                read_volatile(&(*md).local_ip6[0]),
                read_volatile(&(*md).local_ip6[1]),
                read_volatile(&(*md).local_ip6[2]),
                read_volatile(&(*md).local_ip6[3]),
            ],
            [
                read_volatile(&(*md).remote_ip6[0]),
                read_volatile(&(*md).remote_ip6[1]),
                read_volatile(&(*md).remote_ip6[2]),
                read_volatile(&(*md).remote_ip6[3]),
            ],
            read_volatile(&(*md).local_port),
            read_volatile(&(*md).remote_port),
            read_volatile(&(*md).size),
        )
    };
    let (local, remote) = match family {
        AF_INET => (l4, r4),
        AF_INET6 => match (v4_mapped(l6), v4_mapped(r6)) {
            (Some(l), Some(r)) => (l, r),
            _ => {
                bump(Stat::MsgPassUnpaired);
                return SK_PASS;
            }
        },
        _ => return SK_PASS,
    };
    let me = SockKey {
        local_ip4: local,
        remote_ip4: remote,
        local_port: lport as u16,
        remote_port: remote_port_host(rport),
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
