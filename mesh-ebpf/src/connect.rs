//! `cgroup/connect4` and `cgroup/connect6`: the capture decision for outbound TCP; and
//! `cgroup/getpeername4|6`: a captured socket reports its original destination as its
//! peer, so the redirect to the node proxy stays invisible to the application.
//!
//! # Minimum kernel version
//!
//! 5.8 for the getpeername hooks; `bpf_get_netns_cookie` in sock_addr programs is 5.7,
//! cgroup sock_addr hooks 4.17; `bpf_sk_storage_get` there (`SOCK_STATE`) is verified on
//! 5.10, the supported floor (docs/kernels.md, "Helpers by program type").

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, generated::bpf_ktime_get_ns},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::log;
use mesh_common::{
    cfg_flags, decision, flow_flags, local_scope, log_level,
    maps::{excludes_match, ip4_mapped, ip_eq, Ip, SockState},
    proxy_alive, user_port_host, user_port_raw, v4_mapped, wl_flags, Stat,
};

use crate::{
    log::{aya_level, ip16, on, NONE},
    maps::{
        bump, config, proxy_health, sock_state, DESTS, EXCLUDES, EXCLUDES_GEN, NETNS_PROBE,
        NODE_ADDRS, WORKLOADS,
    },
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
    /// Send it to the node proxy at this address (IPv4 v4-mapped) and port.
    Redirect(Ip, u16),
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
    let mut ev = Ev::new(ip4_mapped(sa.user_ip4), user_port_host(sa.user_port));
    let verdict = if sa.protocol != IPPROTO_TCP {
        ev.level = config().log_level;
        note(&mut ev, Stat::ConnectNotTcp);
        Verdict::Leave
    } else {
        decide(&ctx, &mut ev)
    };
    ev.say();
    match verdict {
        Verdict::Leave => ALLOW,
        Verdict::Redirect(ip, port) => {
            sa.user_ip4 = ip[3];
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
    // Word by word: the context allows 4-byte accesses only (no memcpy).
    // SAFETY: fields of the program's own context.
    let dst: Ip = unsafe {
        [
            core::ptr::read_volatile(&sa.user_ip6[0]),
            core::ptr::read_volatile(&sa.user_ip6[1]),
            core::ptr::read_volatile(&sa.user_ip6[2]),
            core::ptr::read_volatile(&sa.user_ip6[3]),
        ]
    };
    let mut ev = Ev::new(dst, user_port_host(sa.user_port));
    let verdict = if sa.protocol != IPPROTO_TCP {
        ev.level = config().log_level;
        note(&mut ev, Stat::ConnectNotTcp);
        Verdict::Leave
    } else if v4_mapped(dst).is_none() && config().proxy_port6 == 0 {
        // Native IPv6 without an IPv6 proxy listener (`--proxy-redirect6` unset): left
        // alone, as before the mesh carried it. Dual-stack sockets reach IPv4 peers
        // through v4-mapped addresses, decided as IPv4.
        let cfg = config();
        ev.level = cfg.log_level;
        // SAFETY: helper call on the program's own context.
        ev.netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
        note(&mut ev, Stat::ConnectNotIpv4);
        Verdict::Leave
    } else {
        decide(&ctx, &mut ev)
    };
    ev.say();
    match verdict {
        Verdict::Leave => ALLOW,
        Verdict::Redirect(ip, port) => {
            set_ip6(sa, ip);
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
        sa.user_ip4 = orig.orig_ip[3];
        sa.user_port = user_port_raw(orig.orig_port as u16);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_peername6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = proxied_orig(&ctx) {
        // SAFETY: the context pointer is valid for the program's lifetime.
        let sa = unsafe { &mut *ctx.sock_addr };
        set_ip6(sa, orig.orig_ip);
        sa.user_port = user_port_raw(orig.orig_port as u16);
    }
    ALLOW
}

/// Writes an IPv6 address into the context word by word (the context allows 4-byte
/// accesses only; a plain array assignment may become a memcpy the verifier rejects).
#[inline(always)]
fn set_ip6(sa: &mut aya_ebpf::bindings::bpf_sock_addr, ip: Ip) {
    // SAFETY: fields of the program's own context.
    unsafe {
        core::ptr::write_volatile(&mut sa.user_ip6[0], ip[0]);
        core::ptr::write_volatile(&mut sa.user_ip6[1], ip[1]);
        core::ptr::write_volatile(&mut sa.user_ip6[2], ip[2]);
        core::ptr::write_volatile(&mut sa.user_ip6[3], ip[3]);
    }
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

/// The context's socket (a full socket: sock_addr programs run on the caller's socket).
#[inline(always)]
fn ctx_sk(ctx: &SockAddrContext) -> *mut core::ffi::c_void {
    // SAFETY: the context pointer is valid for the program's lifetime.
    unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk.cast() }
}

/// The original destination of a socket connect4/6 redirected to the proxy.
#[inline(always)]
fn proxied_orig(ctx: &SockAddrContext) -> Option<SockState> {
    let sk = ctx_sk(ctx);
    if sk.is_null() {
        return None;
    }
    // SAFETY: the context's own socket, checked non-null; the value is copied out at once.
    let st = unsafe { sock_state(sk, false) }.map(|s| *s)?;
    // Only the client's own socket: the accepting end of the flow (the proxy's socket,
    // which `accept()` names through this hook too) carries the flow with `SERVER_SIDE`,
    // and its peer is the client, as it really is.
    (st.flags & flow_flags::PROXIED != 0 && st.flags & flow_flags::SERVER_SIDE == 0).then_some(st)
}

/// Stores what was decided for the socket in its `SOCK_STATE` (for sockops and
/// getpeername). `false`: no state could be created (kernel memory).
#[inline(always)]
fn record(ctx: &SockAddrContext, st: SockState) -> bool {
    let sk = ctx_sk(ctx);
    if sk.is_null() {
        return false;
    }
    // SAFETY: the context's own socket, checked non-null.
    match unsafe { sock_state(sk, true) } {
        Some(slot) => {
            *slot = st;
            true
        }
        None => false,
    }
}

/// One connect as the decision log shows it: collected by `note`, said once by `say`.
struct Ev {
    /// `CONFIG.log_level` at the decision.
    level: u32,
    /// The record's code (`mesh_common::decision`), `NONE` while nothing was noted.
    code: u32,
    /// The record's level.
    want: u32,
    netns: u64,
    /// The workload's address of the destination's family (zero before it is known).
    src: Ip,
    dst: Ip,
    port: u16,
}

impl Ev {
    #[inline(always)]
    fn new(dst: Ip, port: u16) -> Ev {
        Ev {
            level: log_level::OFF,
            code: NONE,
            want: log_level::DEBUG,
            netns: 0,
            src: [0; 4],
            dst,
            port,
        }
    }

    /// The one aya-log call site of the connect hooks' decisions: nothing is formatted
    /// unless the level asks for it. Addresses go out as 16 bytes (IPv4 v4-mapped, which
    /// the agent shows as a dotted quad: `events::decode`).
    #[inline(always)]
    fn say(&self) {
        if self.code == NONE || !on(self.level, self.want) {
            return;
        }
        log!(
            &(),
            aya_level(self.want),
            "{} netns={} src={:i} dst=[{:i}]:{}",
            self.code,
            self.netns,
            ip16(self.src),
            ip16(self.dst),
            self.port
        );
    }
}

/// Counts a connect's outcome and keeps it for the decision log (the last one noted is
/// said). Connects that are not a workload's (every other connect on the node) are trace
/// records.
#[inline(always)]
fn note(ev: &mut Ev, stat: Stat) {
    bump(stat);
    ev.code = stat as u32;
    ev.want = log_level::DEBUG;
    match stat {
        Stat::ConnectNotEnrolled | Stat::ConnectNotTcp => ev.want = log_level::TRACE,
        Stat::ConnectBypass if ip_eq(&ev.src, &[0; 4]) => {
            ev.code = decision::NODE_BYPASS;
            ev.want = log_level::TRACE;
        }
        _ => {}
    }
}

/// Decides what to do with a connection (IPv4 v4-mapped, or native IPv6 when the proxy
/// has an IPv6 listener). Records what was decided for the socket in its `SOCK_STATE`
/// for sockops.
#[inline(always)]
fn decide(ctx: &SockAddrContext, ev: &mut Ev) -> Verdict {
    bump(Stat::ConnectSeen);
    let (dst_ip, dst_port) = (ev.dst, ev.port);
    let v4 = v4_mapped(dst_ip).is_some();
    let cfg = config();
    ev.level = cfg.log_level;
    if cfg.flags & cfg_flags::BYPASS != 0 {
        note(ev, Stat::ConnectBypass);
        return Verdict::Leave;
    }
    // SAFETY: helper call on the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    ev.netns = netns;
    // SAFETY: the value is copied out at once.
    let Some(wl) = unsafe { WORKLOADS.get(netns) }.copied() else {
        note(ev, Stat::ConnectNotEnrolled);
        return Verdict::Leave;
    };
    if wl.flags & wl_flags::ENROLLED == 0 {
        note(ev, Stat::ConnectNotEnrolled);
        return Verdict::Leave;
    }
    ev.src = if v4 { wl.ip4 } else { wl.ip6 };
    if wl.flags & wl_flags::BYPASS != 0 {
        note(ev, Stat::ConnectBypass);
        return Verdict::Leave;
    }
    // A workload calling itself stays inside its namespace; so do the agent's own
    // in-pod sockets, which deliver captured inbound connections to the pod's address.
    if ip_eq(&dst_ip, &wl.ip4) | (!v4 & ip_eq(&dst_ip, &wl.ip6)) {
        note(ev, Stat::ConnectSelf);
        return Verdict::Leave;
    }
    if cfg.is_proxy(&dst_ip, dst_port as u32) {
        note(ev, Stat::ConnectToProxy);
        return Verdict::Leave;
    }
    // Never widen a pod's reach: "this host" and "this link" addresses, and the node's own
    // addresses, mean something else in the proxy's (the node's) namespace. Left alone,
    // the connection stays in the pod's namespace exactly as if it were not enrolled.
    if local_scope(&dst_ip) {
        note(ev, Stat::ConnectLocalScope);
        return Verdict::Leave;
    }
    // SAFETY: presence test only; nothing is read through the reference.
    if unsafe { NODE_ADDRS.get(dst_ip) }.is_some() {
        note(ev, Stat::ConnectNodeAddress);
        return Verdict::Leave;
    }
    if excluded(ev, &dst_ip, dst_port) {
        note(ev, Stat::ConnectExcluded);
        return Verdict::Leave;
    }
    // SAFETY: the value is copied out at once.
    let (dst_id, dst_flags, dst_netns) = match unsafe { DESTS.get(dst_ip) } {
        Some(d) => (d.id, d.flags, d.netns),
        None => (u32::MAX, 0, 0),
    };
    let fail_closed = wl.flags & wl_flags::FAIL_CLOSED != 0;
    let mut orig = SockState {
        orig_ip: dst_ip,
        orig_port: dst_port as u32,
        flags: flow_flags::DIRECT,
        src_id: wl.id,
        dst_id,
        fallback: 0,
        netns,
        own_netns: netns,
        // The namespace of the socket that will accept the flow: its `FLOWS` key.
        peer_netns: dst_netns,
        ..SockState::default()
    };
    if fail_closed {
        orig.flags |= flow_flags::FAIL_CLOSED;
    }
    if dst_flags & wl_flags::DIRECT != 0 && dst_netns != 0 {
        // Same-node destination that needs nothing from the proxy: no rewrite, sockops
        // pairs both sockets. If the record cannot be stored the flow simply stays on TCP.
        if !record(ctx, orig) {
            note(ev, Stat::SockStateFailed);
            return Verdict::Leave;
        }
        note(ev, Stat::ConnectDirect);
        return Verdict::Leave;
    }
    let ready = cfg.flags & cfg_flags::PROXY_READY != 0;
    // SAFETY: helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if !proxy_alive(ready, &proxy_health(), now) {
        // No proxy able to take the connection: the workload's fail mode decides.
        if fail_closed {
            note(ev, Stat::ConnectRefused);
            return Verdict::Refuse;
        }
        if ready {
            note(ev, Stat::ConnectProxyStale);
        } else {
            note(ev, Stat::ConnectProxyNotReady);
        }
        return Verdict::Leave;
    }
    orig.flags = (orig.flags & !flow_flags::DIRECT) | flow_flags::PROXIED;
    orig.peer_netns = cfg.proxy_netns;
    if !record(ctx, orig) {
        // Without the original destination the proxy could not serve it.
        note(ev, Stat::SockStateFailed);
        if fail_closed {
            note(ev, Stat::ConnectRefused);
            return Verdict::Refuse;
        }
        return Verdict::Leave;
    }
    note(ev, Stat::ConnectRedirected);
    if v4 {
        Verdict::Redirect(cfg.proxy_ip, cfg.proxy_port as u16)
    } else {
        Verdict::Redirect(cfg.proxy_ip6, cfg.proxy_port6 as u16)
    }
}

#[inline(always)]
fn excluded(ev: &mut Ev, ip: &Ip, port: u16) -> bool {
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
            note(ev, Stat::ConnectExcludesRaced);
            false
        }
    }
}
