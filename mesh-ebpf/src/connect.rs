//! `cgroup/connect4` and `cgroup/connect6`: the capture decision for outbound TCP; and
//! `cgroup/getpeername4|6`: a captured socket reports its original destination as its
//! peer, so the redirect to the node proxy stays invisible to the application.
//!
//! # Minimum kernel version
//!
//! 5.7 (`bpf_get_netns_cookie` in sock_addr programs); cgroup sock_addr hooks date from
//! 4.17, `bpf_get_socket_cookie` there from 5.0, the getpeername hooks from 5.8.

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use mesh_common::{
    capacity, cfg_flags, flow_flags, maps::OrigDst, user_port_host, user_port_raw, v4_mapped,
    wl_flags, Stat,
};

use crate::maps::{bump, config, DESTS, EXCLUDES, SOCK_ORIG, WORKLOADS};

const SOCK_STREAM: u32 = 1;
/// sock_addr programs return 1 to let the syscall go on (0 would fail it with EPERM).
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return ALLOW;
    }
    let port = user_port_host(sa.user_port);
    if let Some((ip, port)) = decide(&ctx, sa.user_ip4, port) {
        sa.user_ip4 = ip;
        sa.user_port = user_port_raw(port);
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return ALLOW;
    }
    // Dual-stack sockets reach IPv4 peers through v4-mapped addresses; native IPv6 is
    // not carried through the mesh yet and goes direct.
    let Some(ip4) = v4_mapped(sa.user_ip6) else {
        bump(Stat::ConnectNotIpv4);
        return ALLOW;
    };
    let port = user_port_host(sa.user_port);
    if let Some((ip, port)) = decide(&ctx, ip4, port) {
        sa.user_ip6 = [0, 0, 0xffff_u32.to_be(), ip];
        sa.user_port = user_port_raw(port);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_peername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = proxied_orig(&ctx) {
        // SAFETY: the context pointer is valid for the program's lifetime.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = orig.ip4;
        sa.user_port = user_port_raw(orig.port as u16);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_peername6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = proxied_orig(&ctx) {
        // SAFETY: the context pointer is valid for the program's lifetime.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip6 = [0, 0, 0xffff_u32.to_be(), orig.ip4];
        sa.user_port = user_port_raw(orig.port as u16);
    }
    ALLOW
}

/// The original destination of a socket connect4/6 redirected to the proxy.
#[inline(always)]
fn proxied_orig(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: the value is copied out at once.
    let orig = unsafe { SOCK_ORIG.get(cookie) }.copied()?;
    (orig.flags & flow_flags::PROXIED != 0).then_some(orig)
}

/// Returns where to send the connection instead, or `None` to leave it alone. Records
/// what was decided for the socket in `SOCK_ORIG` for sockops.
#[inline(always)]
fn decide(ctx: &SockAddrContext, dst_ip: u32, dst_port: u16) -> Option<(u32, u16)> {
    bump(Stat::ConnectSeen);
    let cfg = config();
    if cfg.flags & cfg_flags::BYPASS != 0 {
        bump(Stat::ConnectBypass);
        return None;
    }
    // SAFETY: helper call on the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    // SAFETY: the value is copied out at once.
    let Some(wl) = unsafe { WORKLOADS.get(netns) }.copied() else {
        bump(Stat::ConnectNotEnrolled);
        return None;
    };
    if wl.flags & wl_flags::ENROLLED == 0 {
        bump(Stat::ConnectNotEnrolled);
        return None;
    }
    if dst_ip == cfg.proxy_ip4 && dst_port as u32 == cfg.proxy_port {
        bump(Stat::ConnectToProxy);
        return None;
    }
    if excluded(dst_ip, dst_port) {
        bump(Stat::ConnectExcluded);
        return None;
    }
    // SAFETY: the value is copied out at once.
    let (dst_id, dst_flags) = match unsafe { DESTS.get(dst_ip) } {
        Some(d) => (d.id, d.flags),
        None => (u32::MAX, 0),
    };
    // SAFETY: helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let mut orig = OrigDst {
        ip4: dst_ip,
        port: dst_port as u32,
        flags: flow_flags::DIRECT,
        src_id: wl.id,
        dst_id,
        _pad: 0,
    };
    if dst_flags & wl_flags::DIRECT != 0 {
        // Same-node destination that needs nothing from the proxy: no rewrite, sockops
        // pairs both sockets. If the record cannot be stored the flow simply stays on TCP.
        if SOCK_ORIG.insert(cookie, orig, 0).is_err() {
            bump(Stat::ConnectOrigStoreFailed);
            return None;
        }
        bump(Stat::ConnectDirect);
        return None;
    }
    if cfg.flags & cfg_flags::PROXY_READY == 0 {
        // Fail open: no proxy to hand the connection to.
        bump(Stat::ConnectProxyNotReady);
        return None;
    }
    orig.flags = flow_flags::PROXIED;
    if SOCK_ORIG.insert(cookie, orig, 0).is_err() {
        // Without the original destination the proxy could not serve it: leave it alone.
        bump(Stat::ConnectOrigStoreFailed);
        return None;
    }
    bump(Stat::ConnectRedirected);
    Some((cfg.proxy_ip4, cfg.proxy_port as u16))
}

#[inline(always)]
fn excluded(ip: u32, port: u16) -> bool {
    // 127.0.0.0/8 never leaves the workload's own namespace.
    if u32::from_be(ip) >> 24 == 127 {
        return true;
    }
    let mut i = 0;
    while i < capacity::EXCLUDES {
        if let Some(e) = EXCLUDES.get(i) {
            if e.enabled == 0 {
                // Slots are filled from index 0; the first empty one ends the list.
                return false;
            }
            if e.matches(ip, port) {
                return true;
            }
        }
        i += 1;
    }
    false
}
