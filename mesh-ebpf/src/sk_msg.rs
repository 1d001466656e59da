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
//! 4.17 for sk_msg; `sk_psock.msg_tot_len`
//! exists from 6.9 (with older kernels the agent leaves the offsets at 0, which disables
//! the check).

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{sk_action::SK_PASS, BPF_F_INGRESS},
    helpers::generated::bpf_probe_read_kernel,
    macros::sk_msg,
    programs::SkMsgContext,
};
use mesh_common::{maps::SockKey, remote_port_host, v4_mapped, Stat};

use crate::maps::{
    add, bump, FALLBACK, OFF_PSOCK_MSG_TOT_LEN, OFF_SK_RCVBUF, OFF_SK_USER_DATA,
    QUEUE_LIMIT_FLOOR, SK_ADDR, SOCKHASH,
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
        let _ = FALLBACK.insert(me, 1, 0);
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
    let off_user_data = OFF_SK_USER_DATA.load();
    let off_len = OFF_PSOCK_MSG_TOT_LEN.load();
    let off_rcvbuf = OFF_SK_RCVBUF.load();
    if off_user_data == 0 || off_len == 0 || off_rcvbuf == 0 {
        return false;
    }
    // SAFETY: the value is copied out at once.
    let Some(addr) = (unsafe { SK_ADDR.get(peer) }).copied() else {
        return false;
    };
    // SAFETY: bpf_probe_read_kernel validates the source address; the offsets come from
    // the running kernel's BTF for `struct sock` and `struct sk_psock`.
    let (rcvbuf, queued) = unsafe {
        let base = addr as *const u8;
        let mut rcvbuf: i32 = 0;
        let mut psock: u64 = 0;
        let mut queued: u32 = 0;
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
        (rcvbuf, queued)
    };
    let floor = QUEUE_LIMIT_FLOOR.load();
    let limit = if rcvbuf > 0 && rcvbuf as u32 > floor { rcvbuf as u32 } else { floor };
    queued > limit
}
