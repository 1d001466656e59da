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
//! 4.17 for sk_msg; 5.8 for sockhash lookups returning a socket; `sk_psock.msg_tot_len`
//! exists from 6.9 (with older kernels the agent leaves the offsets at 0, which disables
//! the check).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{sk_action::SK_PASS, BPF_F_INGRESS},
    helpers::generated::{bpf_map_lookup_elem, bpf_probe_read_kernel, bpf_sk_release},
    macros::sk_msg,
    programs::SkMsgContext,
};
use mesh_common::{maps::SockKey, remote_port_host, v4_mapped, Stat};

use crate::maps::{
    add, bump, FALLBACK, OFF_PSOCK_MSG_TOT_LEN, OFF_SK_RCVBUF, OFF_SK_USER_DATA,
    QUEUE_LIMIT_FLOOR, SOCKHASH,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let md = unsafe { &*ctx.msg };
    let (local, remote) = match md.family {
        AF_INET => (md.local_ip4, md.remote_ip4),
        AF_INET6 => match (v4_mapped(md.local_ip6), v4_mapped(md.remote_ip6)) {
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
        local_port: md.local_port as u16,
        remote_port: remote_port_host(md.remote_port),
    };
    // SAFETY: the value is not kept past this check.
    if unsafe { FALLBACK.get(me) }.is_some() {
        bump(Stat::MsgPassFallback);
        return SK_PASS;
    }
    let peer = me.reversed();
    let size = md.size;
    match peer_queue(&peer) {
        PeerQueue::Missing => {
            // The peer never made it into the sockhash (it was established before the
            // agent started, or its insert failed). Stay on TCP for good.
            let _ = FALLBACK.insert(me, 1, 0);
            bump(Stat::MsgPassNoPeer);
            return SK_PASS;
        }
        PeerQueue::Full => {
            let _ = FALLBACK.insert(me, 1, 0);
            bump(Stat::MsgPassBackpressure);
            return SK_PASS;
        }
        PeerQueue::Room => {}
    }
    let mut key = peer;
    let verdict = SOCKHASH.redirect_msg(&ctx, &mut key, BPF_F_INGRESS as u64) as u32;
    if verdict == SK_PASS {
        bump(Stat::MsgRedirected);
        add(Stat::MsgRedirectedBytes, size as u64);
    }
    verdict
}

enum PeerQueue {
    Missing,
    Full,
    Room,
}

/// Looks the peer socket up and compares the bytes waiting in its redirect queue with its
/// limit.
#[inline(always)]
fn peer_queue(peer: &SockKey) -> PeerQueue {
    // SAFETY: a sockhash lookup from a BPF program returns a referenced socket or null;
    // every path below releases it.
    let sk = unsafe {
        bpf_map_lookup_elem(
            core::ptr::addr_of!(SOCKHASH) as *mut c_void,
            (peer as *const SockKey).cast(),
        )
    };
    if sk.is_null() {
        return PeerQueue::Missing;
    }
    let off_user_data = OFF_SK_USER_DATA.load();
    let off_len = OFF_PSOCK_MSG_TOT_LEN.load();
    let off_rcvbuf = OFF_SK_RCVBUF.load();
    let mut state = PeerQueue::Room;
    if off_user_data != 0 && off_len != 0 && off_rcvbuf != 0 {
        let base = sk as *const u8;
        let mut psock: u64 = 0;
        let mut queued: u32 = 0;
        let mut rcvbuf: i32 = 0;
        // SAFETY: bpf_probe_read_kernel validates the source address; the offsets come
        // from the running kernel's BTF for `struct sock` and `struct sk_psock`.
        unsafe {
            let _ = bpf_probe_read_kernel(
                (&mut rcvbuf as *mut i32).cast(),
                4,
                base.wrapping_add(off_rcvbuf as usize).cast(),
            );
            if bpf_probe_read_kernel(
                (&mut psock as *mut u64).cast(),
                8,
                base.wrapping_add(off_user_data as usize).cast(),
            ) == 0
                && psock != 0
            {
                let _ = bpf_probe_read_kernel(
                    (&mut queued as *mut u32).cast(),
                    4,
                    (psock as *const u8).wrapping_add(off_len as usize).cast(),
                );
            }
        }
        let floor = QUEUE_LIMIT_FLOOR.load();
        let limit = if rcvbuf > 0 && rcvbuf as u32 > floor { rcvbuf as u32 } else { floor };
        if queued > limit {
            state = PeerQueue::Full;
        }
    }
    // SAFETY: releases the reference taken by the lookup above.
    unsafe { bpf_sk_release(sk) };
    state
}
