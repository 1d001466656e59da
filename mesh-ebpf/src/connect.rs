//! `cgroup/connect4` and `cgroup/connect6`: the capture decision for outbound TCP; and
//! `cgroup/getpeername4|6`: a captured socket reports its original destination as its
//! peer, so the redirect to the node proxy stays invisible to the application.
//!
//! # Minimum kernel version
//!
//! 5.7 (`bpf_get_netns_cookie` in sock_addr programs); cgroup sock_addr hooks date from
//! 4.17, `bpf_get_socket_cookie` there from 5.0, the getpeername hooks from 5.8.

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, generated::bpf_ktime_get_ns},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use mesh_common::{
    cfg_flags, flow_flags, local_scope_ipv4,
    maps::{excludes_match, OrigDst},
    proxy_alive, user_port_host, user_port_raw, v4_mapped, wl_flags, Stat,
};

use crate::maps::{
    bump, config, proxy_health, DESTS, EXCLUDES, EXCLUDES_GEN, NETNS_PROBE, NODE_ADDRS, SOCK_ORIG,
    WORKLOADS,
};

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
/// Only TCP is carried: other stream protocols (SCTP) are left alone. An MPTCP socket
/// connects through a TCP subflow, which is what this hook sees: it is captured like TCP
/// and, since the proxy answers plain TCP, falls back to TCP (docs/architecture.md).
const IPPROTO_TCP: u32 = 6;
/// sock_addr programs return 1 to let the syscall go on, 0 to fail it with EPERM.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

/// What connect4/6 does with a connection.
enum Verdict {
    /// Let it go where it was going.
    Leave,
    /// Send it to the node proxy at this address (network order) and port.
    Redirect(u32, u16),
    /// Fail the connect (a fail-closed workload while the proxy cannot serve it).
    Refuse,
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        if sa.type_ == SOCK_DGRAM {
            answer_netns_probe(&ctx);
        }
        return ALLOW;
    }
    if sa.protocol != IPPROTO_TCP {
        bump(Stat::ConnectNotTcp);
        return ALLOW;
    }
    let port = user_port_host(sa.user_port);
    match decide(&ctx, sa.user_ip4, port) {
        Verdict::Leave => ALLOW,
        Verdict::Redirect(ip, port) => {
            sa.user_ip4 = ip;
            sa.user_port = user_port_raw(port);
            ALLOW
        }
        Verdict::Refuse => REFUSE,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return ALLOW;
    }
    if sa.protocol != IPPROTO_TCP {
        bump(Stat::ConnectNotTcp);
        return ALLOW;
    }
    // Dual-stack sockets reach IPv4 peers through v4-mapped addresses; native IPv6 is
    // not carried through the mesh yet and goes direct.
    let Some(ip4) = v4_mapped(sa.user_ip6) else {
        bump(Stat::ConnectNotIpv4);
        return ALLOW;
    };
    let port = user_port_host(sa.user_port);
    match decide(&ctx, ip4, port) {
        Verdict::Leave => ALLOW,
        Verdict::Redirect(ip, port) => {
            sa.user_ip6 = [0, 0, 0xffff_u32.to_be(), ip];
            sa.user_port = user_port_raw(port);
            ALLOW
        }
        Verdict::Refuse => REFUSE,
    }
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

/// The agent's netns-cookie probe (`NETNS_PROBE`): if the agent asked for this socket,
/// record the cookie of the network namespace it was made in. Costs one hash lookup per
/// UDP `connect()`; nothing else about the connect changes.
#[inline(always)]
fn answer_netns_probe(ctx: &SockAddrContext) {
    // SAFETY: helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if let Some(slot) = NETNS_PROBE.get_ptr_mut(cookie) {
        // SAFETY: map value pointer returned by the kernel, valid during this program run;
        // helper call on the program's own context.
        unsafe { *slot = bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    }
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

/// Decides what to do with a connection. Records what was decided for the socket in
/// `SOCK_ORIG` for sockops.
#[inline(always)]
fn decide(ctx: &SockAddrContext, dst_ip: u32, dst_port: u16) -> Verdict {
    bump(Stat::ConnectSeen);
    let cfg = config();
    if cfg.flags & cfg_flags::BYPASS != 0 {
        bump(Stat::ConnectBypass);
        return Verdict::Leave;
    }
    // SAFETY: helper call on the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    // SAFETY: the value is copied out at once.
    let Some(wl) = unsafe { WORKLOADS.get(netns) }.copied() else {
        bump(Stat::ConnectNotEnrolled);
        return Verdict::Leave;
    };
    if wl.flags & wl_flags::ENROLLED == 0 {
        bump(Stat::ConnectNotEnrolled);
        return Verdict::Leave;
    }
    if wl.flags & wl_flags::BYPASS != 0 {
        bump(Stat::ConnectBypass);
        return Verdict::Leave;
    }
    // A workload calling itself stays inside its namespace; so do the agent's own
    // in-pod sockets, which deliver captured inbound connections to the pod's address.
    if dst_ip == wl.ip4 {
        bump(Stat::ConnectSelf);
        return Verdict::Leave;
    }
    if dst_ip == cfg.proxy_ip4 && dst_port as u32 == cfg.proxy_port {
        bump(Stat::ConnectToProxy);
        return Verdict::Leave;
    }
    // Never widen a pod's reach: "this host" and "this link" addresses, and the node's own
    // addresses, mean something else in the proxy's (the node's) namespace. Left alone,
    // the connection stays in the pod's namespace exactly as if it were not enrolled.
    if local_scope_ipv4(dst_ip) {
        bump(Stat::ConnectLocalScope);
        return Verdict::Leave;
    }
    // SAFETY: presence test only; nothing is read through the reference.
    if unsafe { NODE_ADDRS.get(dst_ip) }.is_some() {
        bump(Stat::ConnectNodeAddress);
        return Verdict::Leave;
    }
    if excluded(dst_ip, dst_port) {
        bump(Stat::ConnectExcluded);
        return Verdict::Leave;
    }
    // SAFETY: the value is copied out at once.
    let (dst_id, dst_flags) = match unsafe { DESTS.get(dst_ip) } {
        Some(d) => (d.id, d.flags),
        None => (u32::MAX, 0),
    };
    // SAFETY: helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let fail_closed = wl.flags & wl_flags::FAIL_CLOSED != 0;
    let mut orig = OrigDst {
        ip4: dst_ip,
        port: dst_port as u32,
        flags: flow_flags::DIRECT,
        src_id: wl.id,
        dst_id,
        _pad: 0,
    };
    if fail_closed {
        orig.flags |= flow_flags::FAIL_CLOSED;
    }
    if dst_flags & wl_flags::DIRECT != 0 {
        // Same-node destination that needs nothing from the proxy: no rewrite, sockops
        // pairs both sockets. If the record cannot be stored the flow simply stays on TCP.
        if SOCK_ORIG.insert(cookie, orig, 0).is_err() {
            bump(Stat::ConnectOrigStoreFailed);
            return Verdict::Leave;
        }
        bump(Stat::ConnectDirect);
        return Verdict::Leave;
    }
    let ready = cfg.flags & cfg_flags::PROXY_READY != 0;
    // SAFETY: helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if !proxy_alive(ready, &proxy_health(), now) {
        // No proxy able to take the connection: the workload's fail mode decides.
        if fail_closed {
            bump(Stat::ConnectRefused);
            return Verdict::Refuse;
        }
        bump(if ready {
            Stat::ConnectProxyStale
        } else {
            Stat::ConnectProxyNotReady
        });
        return Verdict::Leave;
    }
    orig.flags = (orig.flags & !flow_flags::DIRECT) | flow_flags::PROXIED;
    if SOCK_ORIG.insert(cookie, orig, 0).is_err() {
        // Without the original destination the proxy could not serve it.
        bump(Stat::ConnectOrigStoreFailed);
        if fail_closed {
            bump(Stat::ConnectRefused);
            return Verdict::Refuse;
        }
        return Verdict::Leave;
    }
    bump(Stat::ConnectRedirected);
    Verdict::Redirect(cfg.proxy_ip4, cfg.proxy_port as u16)
}

#[inline(always)]
fn excluded(ip: u32, port: u16) -> bool {
    // Volatile reads: the compiler keeps the generation reads around the slot reads, in
    // program order. Accepted race: on x86-64 loads are not reordered with loads either;
    // a weakly ordered CPU (arm64) could in theory satisfy a slot load after the second
    // generation load (BPF has no load-acquire before kernel 6.15).
    // SAFETY: map values are valid for the program's run; copied out at once.
    let gen = || {
        EXCLUDES_GEN
            .get(0)
            .map(|g| unsafe { core::ptr::read_volatile(g) })
            .unwrap_or(0)
    };
    // SAFETY: as above.
    let slot = |i: u32| {
        EXCLUDES
            .get(i)
            .map(|e| unsafe { core::ptr::read_volatile(e) })
    };
    match excludes_match(gen, slot, ip, port) {
        Some(hit) => hit,
        None => {
            // The agent flipped halves under every attempt: capture, as if not excluded
            // (the proxy still dials the original destination).
            bump(Stat::ConnectExcludesRaced);
            false
        }
    }
}
