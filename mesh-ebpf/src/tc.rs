//! `mesh_tc_ingress` (TC ingress, `sched_cls`): inbound capture. Attached to the
//! interface of each capturing pod *inside the pod's network namespace*, where the agent
//! holds a plaintext listener (`inbound::PLAIN_PORT`). For a new IPv4 TCP connection to
//! the pod from a client outside the mesh it assigns the SYN to that listener
//! (`bpf_sk_assign`); the accepted socket's local address is the original destination and
//! its peer the original client, so no record is needed.
//!
//! Left alone (passed): other protocols and IPv6; packets to the agent's own ports;
//! sources that are the node's own addresses (the node proxy's connections, probes) or
//! local enrolled workloads (the connect hooks handled them: proxied flows arrive from
//! the node, direct-mode flows stay direct); packets of connections that already have a
//! socket (`bpf_skc_lookup_tcp`: established, handshaking, time-wait, including the
//! pod's own outbound connections); and everything when no listener is found (the agent
//! is not running: fail open) or the global bypass is on.
//!
//! `bpf_sk_assign` needs the socket in the packet's network namespace, hence in-pod
//! listeners rather than node-netns ones (docs/architecture.md, "Inbound capture").
//!
//! # Minimum kernel version
//!
//! 5.7 (`bpf_sk_assign` from TC); `bpf_skc_lookup_tcp` 5.2. tcx attachment 6.6 (the agent
//! falls back to clsact via netlink before that).

use aya_ebpf::{
    bindings::{bpf_sock_tuple, BPF_F_CURRENT_NETNS, TC_ACT_OK},
    helpers::generated::{bpf_sk_assign, bpf_sk_lookup_tcp, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::classifier,
    programs::TcContext,
};
use aya_log_ebpf::{log, macro_support::Level};
use mesh_common::{cfg_flags, inbound, log_level, Stat};

use crate::{
    log::{ip, on},
    maps::{bump, config, INBOUND, NODE_ADDRS},
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
/// `BPF_TCP_LISTEN` (enum in linux/bpf.h).
const BPF_TCP_LISTEN: u32 = 10;
/// `sizeof(tuple.ipv4)`.
const TUPLE_V4_LEN: u32 = 12;

#[classifier]
pub fn mesh_tc_ingress(ctx: TcContext) -> i32 {
    match try_ingress(&ctx) {
        Ok(()) | Err(()) => TC_ACT_OK,
    }
}

/// Addresses and ports of an IPv4 TCP packet, as they sit in the headers (network order).
struct Tcp4 {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Result<Tcp4, ()> {
    let proto: u16 = ctx.load(12).map_err(|_| ())?;
    if u16::from_be(proto) != ETH_P_IP {
        return Err(());
    }
    let vihl: u8 = ctx.load(ETH_HLEN).map_err(|_| ())?;
    if vihl >> 4 != 4 {
        return Err(());
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(());
    }
    let ipproto: u8 = ctx.load(ETH_HLEN + 9).map_err(|_| ())?;
    if ipproto != IPPROTO_TCP {
        return Err(());
    }
    // A non-first fragment carries no TCP header; the reassembled packet is what TCP
    // sees, and its first fragment decided.
    let frag: u16 = ctx.load(ETH_HLEN + 6).map_err(|_| ())?;
    if u16::from_be(frag) & 0x1fff != 0 {
        return Err(());
    }
    let saddr: u32 = ctx.load(ETH_HLEN + 12).map_err(|_| ())?;
    let daddr: u32 = ctx.load(ETH_HLEN + 16).map_err(|_| ())?;
    // Bounded for the verifier: ihl is at most 60.
    let l4 = ETH_HLEN + (ihl & 0x3c);
    let sport: u16 = ctx.load(l4).map_err(|_| ())?;
    let dport: u16 = ctx.load(l4 + 2).map_err(|_| ())?;
    Ok(Tcp4 {
        saddr,
        daddr,
        sport,
        dport,
    })
}

#[inline(always)]
fn tuple(saddr: u32, daddr: u32, sport: u16, dport: u16) -> bpf_sock_tuple {
    // SAFETY: an all-zero tuple is valid; the IPv4 member is then filled in.
    let mut t: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    t.__bindgen_anon_1.ipv4.saddr = saddr;
    t.__bindgen_anon_1.ipv4.daddr = daddr;
    t.__bindgen_anon_1.ipv4.sport = sport;
    t.__bindgen_anon_1.ipv4.dport = dport;
    t
}

#[inline(always)]
fn try_ingress(ctx: &TcContext) -> Result<(), ()> {
    let p = parse(ctx)?;
    bump(Stat::TcSeen);
    let dport = u16::from_be(p.dport);
    if dport == inbound::PLAIN_PORT || dport == inbound::HBONE_PORT {
        bump(Stat::TcPassMeshPort);
        return Ok(());
    }
    // SAFETY: the value is copied out at once.
    let captured = unsafe { INBOUND.get(p.daddr) }
        .map(|i| i.flags & inbound::CAPTURE != 0)
        .unwrap_or(false);
    if !captured {
        bump(Stat::TcPassNotCaptured);
        return Ok(());
    }
    let cfg = config();
    if cfg.flags & cfg_flags::BYPASS != 0 {
        bump(Stat::TcPassBypass);
        return Ok(());
    }
    // SAFETY: presence test only.
    if unsafe { NODE_ADDRS.get(mesh_common::maps::ip4_mapped(p.saddr)) }.is_some() {
        bump(Stat::TcPassNodeSource);
        return Ok(());
    }
    // SAFETY: the value is copied out at once.
    if unsafe { INBOUND.get(p.saddr) }.is_some_and(|i| i.flags & inbound::ENROLLED != 0) {
        bump(Stat::TcPassMeshSource);
        return Ok(());
    }
    let skb = ctx.skb.skb.cast();
    // A socket for this very connection (established, a request socket mid-handshake,
    // time-wait, or the pod's own outbound connection): the kernel's own lookup finds it.
    let mut t = tuple(p.saddr, p.daddr, p.sport, p.dport);
    // SAFETY: helper call with a stack tuple of the stated length; the returned
    // reference is released on every path.
    let sk =
        unsafe { bpf_skc_lookup_tcp(skb, &mut t, TUPLE_V4_LEN, BPF_F_CURRENT_NETNS as u64, 0) };
    if !sk.is_null() {
        // SAFETY: a non-null socket from the lookup; `state` is readable on sock_common.
        let state = unsafe { (*sk).state };
        // SAFETY: releasing the reference taken above.
        unsafe { bpf_sk_release(sk.cast()) };
        if state != BPF_TCP_LISTEN {
            bump(Stat::TcPassEstablished);
            return Ok(());
        }
    }
    // The agent's plaintext listener in this network namespace.
    let mut l = tuple(p.saddr, p.daddr, p.sport, inbound::PLAIN_PORT.to_be());
    // SAFETY: as above; released below.
    let listener =
        unsafe { bpf_sk_lookup_tcp(skb, &mut l, TUPLE_V4_LEN, BPF_F_CURRENT_NETNS as u64, 0) };
    // Only the first packet of a new connection gets here (the lookup above passes the
    // others), so these records are per connection.
    let logged = on(cfg.log_level, log_level::DEBUG);
    let (s, sp, d, dp) = (ip(p.saddr), u16::from_be(p.sport), ip(p.daddr), dport);
    if listener.is_null() {
        bump(Stat::TcNoListener);
        say(logged, Stat::TcNoListener, s, sp, d, dp);
        return Ok(());
    }
    // SAFETY: a full socket from bpf_sk_lookup_tcp.
    let state = unsafe { (*listener).state };
    let assigned = if state == BPF_TCP_LISTEN {
        // SAFETY: skb and a referenced full socket of the same network namespace.
        unsafe { bpf_sk_assign(skb, listener.cast(), 0) == 0 }
    } else {
        false
    };
    // SAFETY: releasing the lookup's reference (sk_assign took its own).
    unsafe { bpf_sk_release(listener.cast()) };
    let stat = if assigned {
        Stat::TcAssigned
    } else {
        Stat::TcAssignFailed
    };
    bump(stat);
    say(logged, stat, s, sp, d, dp);
    Ok(())
}

/// The decision log's record of a new inbound connection (two aya-log call sites in all:
/// `stat` is a variable at the second).
#[inline(always)]
fn say(logged: bool, stat: Stat, s: [u8; 4], sp: u16, d: [u8; 4], dp: u16) {
    if logged {
        log!(
            &(),
            Level::Debug,
            "{} {:i}:{} -> {:i}:{}",
            stat as u32,
            s,
            sp,
            d,
            dp
        );
    }
}
