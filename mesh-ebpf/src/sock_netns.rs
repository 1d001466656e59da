//! `cgroup/sock_create`: stamps each new TCP socket with its network namespace's cookie
//! (`SOCK_NETNS`), for sockops on kernels that cannot ask for an accepting socket's
//! namespace (`bpf_get_netns_cookie` in sockops is 5.15+). A listener's stamp is copied
//! to every socket it accepts (the map's `BPF_F_CLONE`), so at PASSIVE_ESTABLISHED the
//! accepted socket carries its real namespace, whatever addresses it holds.
//!
//! Attached by the agent only where sockops lacks the helper; never refuses a socket.
//!
//! # Minimum kernel version
//!
//! 5.9: `bpf_sk_storage_get` from cgroup sock programs (5.9), `bpf_get_netns_cookie`
//! there (5.7), `BPF_F_CLONE` (5.4); verified on 5.10, the supported floor.

use core::ptr::read_volatile;

use aya_ebpf::{helpers::bpf_get_netns_cookie, macros::cgroup_sock, programs::SockContext};

use crate::maps::stamp_netns;

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;

#[cgroup_sock(sock_create)]
pub fn mesh_sock_netns(ctx: SockContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let (ty, proto) = unsafe {
        (
            read_volatile(&(*ctx.sock).type_),
            read_volatile(&(*ctx.sock).protocol),
        )
    };
    // TCP only (the flow keys' sockets); other sockets carry nothing.
    if ty == SOCK_STREAM && proto == IPPROTO_TCP {
        // SAFETY: helper calls on the program's own context (a full socket).
        unsafe {
            let netns = bpf_get_netns_cookie(ctx.sock.cast());
            // Without memory the socket has no stamp: sockops derives its namespace from
            // its address, as on a kernel without this program.
            let _ = stamp_netns(ctx.sock.cast(), netns);
        }
    }
    1
}
