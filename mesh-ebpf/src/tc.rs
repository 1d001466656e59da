//! `mesh_tc_ingress` (TC ingress, `sched_cls`): inbound capture. Attached to the
//! interface of each capturing pod *inside the pod's network namespace*, where the agent
//! holds a plaintext listener (`inbound::PLAIN_PORT`, one per family). For a new TCP
//! connection (IPv4, or IPv6 to a dual-stack pod) to the pod from a client outside the
//! mesh it assigns the SYN to that listener (`bpf_sk_assign`); the accepted socket's local
//! address is the original destination and its peer the original client, so no record is
//! needed.
//!
//! IPv6: the fixed 40-byte header, then up to `IPV6_EXT_MAX` extension headers the kernel
//! would walk itself on the way to TCP (hop-by-hop, routing, destination options, and a
//! first fragment's fragment header), so a client cannot slip a connection past capture by
//! adding one. A non-first fragment is passed, as for IPv4. A longer chain, or one with a
//! header the walk does not follow (AH, ESP, mobility, ...), is passed and counted
//! (`tc_pass_ipv6_ext_header`): AH and ESP reach a socket only through an IPsec SA the pod
//! holds, the others end in the kernel's own drop. A chain of walkable headers longer
//! than the bound, to a captured pod whose agent is there, is dropped
//! (`tc_drop_ipv6_ext_chain`, see `long_chain`).
//!
//! Left alone (passed): other protocols; packets to the agent's own ports;
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
//! Before any of that, one rewrite (`fin_to_rst`): a FIN sent by a paired socket that
//! closed with redirected bytes unread (`UNREAD_CLOSES`, written by `mesh_close_unread`
//! just before the kernel sent that FIN) becomes an RST, as plain TCP would have sent: a
//! direct-mode peer reads `ECONNRESET`, not a clean end of stream (docs/architecture.md,
//! "A paired socket closed with unread bytes"). Only segments with FIN (and neither SYN
//! nor RST) reach its map lookup.
//!
//! # Minimum kernel version
//!
//! 5.7 (`bpf_sk_assign` from TC); `bpf_skc_lookup_tcp` 5.2. tcx attachment 6.6 (the agent
//! falls back to clsact via netlink before that). The FIN rewrite only where
//! `mesh_close_unread` runs (6.9+: `close::marks_closes`, a load-time constant).

use aya_ebpf::{
    bindings::{bpf_sock_tuple, BPF_F_CURRENT_NETNS, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{
        bpf_ktime_get_ns,
        generated::{
            bpf_l4_csum_replace, bpf_sk_assign, bpf_sk_lookup_tcp, bpf_sk_release,
            bpf_skb_store_bytes, bpf_skc_lookup_tcp,
        },
    },
    macros::classifier,
    programs::TcContext,
};
use aya_log_ebpf::{log, macro_support::Level};
use mesh_common::{
    cfg_flags, inbound, log_level,
    maps::{ip4_mapped, InboundInfo, Ip, SockKey, UNREAD_CLOSE_FRESH_NS},
    Stat,
};

use crate::{
    log::{ip16, on},
    maps::{bump, config, INBOUND, INBOUND6, NODE_ADDRS, UNREAD_CLOSES},
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
/// The fixed IPv6 header.
const IPV6_HLEN: usize = 40;
/// IPv6 extension headers walked before TCP, at most (a bounded loop for the verifier).
const IPV6_EXT_MAX: usize = 6;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
/// `BPF_TCP_LISTEN` (enum in linux/bpf.h).
const BPF_TCP_LISTEN: u32 = 10;
/// `BPF_TCP_TIME_WAIT`.
const BPF_TCP_TIME_WAIT: u32 = 6;
/// TCP header: offset of the data-offset byte and the flags byte (one 16-bit word), and
/// of the checksum.
const TCP_OFF_FLAGS_WORD: usize = 12;
const TCP_OFF_CSUM: usize = 16;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// `sizeof(tuple.ipv4)`.
const TUPLE_V4_LEN: u32 = 12;
/// `sizeof(tuple.ipv6)`.
const TUPLE_V6_LEN: u32 = 36;

#[classifier]
pub fn mesh_tc_ingress(ctx: TcContext) -> i32 {
    match try_ingress(&ctx) {
        Ok(()) | Err(Unparsed::Pass) => TC_ACT_OK,
        Err(Unparsed::LongChain(daddr)) => long_chain(&ctx, &daddr),
    }
}

/// Why a packet was not parsed to its TCP ports.
enum Unparsed {
    /// Not TCP, not a first fragment, a header not walked (AH, ESP, ...), or truncated:
    /// passed.
    Pass,
    /// IPv6 whose hop-by-hop, routing, destination-options or fragment headers go on past
    /// `IPV6_EXT_MAX`: the kernel would walk on to whatever follows, this program cannot,
    /// so it is judged by its destination alone (`long_chain`).
    LongChain(Ip),
}

/// Addresses and ports of a TCP packet, as they sit in the headers (network order); an
/// IPv4 packet's addresses v4-mapped (`Ip`), its own address in word 3.
struct Tcp {
    saddr: Ip,
    daddr: Ip,
    sport: u16,
    dport: u16,
    v6: bool,
    /// Offset of the TCP header in the packet (even: 14 + a multiple of 4).
    l4: usize,
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Result<Tcp, Unparsed> {
    let proto: u16 = ctx.load(12).map_err(|_| Unparsed::Pass)?;
    match u16::from_be(proto) {
        ETH_P_IP => parse4(ctx),
        ETH_P_IPV6 => parse6(ctx),
        _ => Err(Unparsed::Pass),
    }
}

#[inline(always)]
fn parse4(ctx: &TcContext) -> Result<Tcp, Unparsed> {
    let vihl: u8 = ctx.load(ETH_HLEN).map_err(|_| Unparsed::Pass)?;
    if vihl >> 4 != 4 {
        return Err(Unparsed::Pass);
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(Unparsed::Pass);
    }
    let ipproto: u8 = ctx.load(ETH_HLEN + 9).map_err(|_| Unparsed::Pass)?;
    if ipproto != IPPROTO_TCP {
        return Err(Unparsed::Pass);
    }
    // A non-first fragment carries no TCP header; the reassembled packet is what TCP
    // sees, and its first fragment decided.
    let frag: u16 = ctx.load(ETH_HLEN + 6).map_err(|_| Unparsed::Pass)?;
    if u16::from_be(frag) & 0x1fff != 0 {
        return Err(Unparsed::Pass);
    }
    let saddr: u32 = ctx.load(ETH_HLEN + 12).map_err(|_| Unparsed::Pass)?;
    let daddr: u32 = ctx.load(ETH_HLEN + 16).map_err(|_| Unparsed::Pass)?;
    // Bounded for the verifier: ihl is at most 60.
    let l4 = ETH_HLEN + (ihl & 0x3c);
    let sport: u16 = ctx.load(l4).map_err(|_| Unparsed::Pass)?;
    let dport: u16 = ctx.load(l4 + 2).map_err(|_| Unparsed::Pass)?;
    Ok(Tcp {
        saddr: ip4_mapped(saddr),
        daddr: ip4_mapped(daddr),
        sport,
        dport,
        v6: false,
        l4,
    })
}

/// IPv6: the fixed header, then the extension headers the kernel walks to reach TCP
/// (`IPV6_EXT_MAX` at most; `bpf_skb_load_bytes` checks each offset against the packet at
/// run time, so the verifier only sees a bounded loop). Anything but TCP at the end is
/// passed; a chain not walked to its end is counted.
#[inline(always)]
fn parse6(ctx: &TcContext) -> Result<Tcp, Unparsed> {
    let vtc: u8 = ctx.load(ETH_HLEN).map_err(|_| Unparsed::Pass)?;
    if vtc >> 4 != 6 {
        return Err(Unparsed::Pass);
    }
    let mut next: u8 = ctx.load(ETH_HLEN + 6).map_err(|_| Unparsed::Pass)?;
    let mut l4 = ETH_HLEN + IPV6_HLEN;
    let mut i = 0;
    while i < IPV6_EXT_MAX && next != IPPROTO_TCP {
        // Every header walked starts with (next header, length).
        let h: [u8; 2] = ctx.load(l4).map_err(|_| Unparsed::Pass)?;
        let len = match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => (h[1] as usize + 1) * 8,
            NEXTHDR_FRAGMENT => {
                // Offset (13 bits) and flags: only the first fragment has the TCP header;
                // the others are passed as IPv4's are.
                let frag: u16 = ctx.load(l4 + 2).map_err(|_| Unparsed::Pass)?;
                if u16::from_be(frag) & 0xfff8 != 0 {
                    return Err(Unparsed::Pass);
                }
                8
            }
            _ => break,
        };
        next = h[0];
        l4 += len;
        i += 1;
    }
    if next != IPPROTO_TCP {
        if matches!(
            next,
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_FRAGMENT
        ) {
            // The walk's bound reached with the chain still going.
            let daddr: Ip = ctx.load(ETH_HLEN + 24).map_err(|_| Unparsed::Pass)?;
            return Err(Unparsed::LongChain(daddr));
        }
        if ipv6_ext_header(next) {
            bump(Stat::TcPassIpv6ExtHeader);
        }
        return Err(Unparsed::Pass);
    }
    let saddr: Ip = ctx.load(ETH_HLEN + 8).map_err(|_| Unparsed::Pass)?;
    let daddr: Ip = ctx.load(ETH_HLEN + 24).map_err(|_| Unparsed::Pass)?;
    let sport: u16 = ctx.load(l4).map_err(|_| Unparsed::Pass)?;
    let dport: u16 = ctx.load(l4 + 2).map_err(|_| Unparsed::Pass)?;
    Ok(Tcp {
        saddr,
        daddr,
        sport,
        dport,
        v6: true,
        l4,
    })
}

/// IPv6 extension headers (RFC 8200 section 4, and the IANA list: hop-by-hop 0, routing
/// 43, fragment 44, ESP 50, AH 51, destination options 60, mobility 135, HIP 139, shim6
/// 140, experimental 253 and 254).
#[inline(always)]
fn ipv6_ext_header(next: u8) -> bool {
    matches!(
        next,
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254
    )
}

#[inline(always)]
fn tuple(p: &Tcp, dport: u16) -> bpf_sock_tuple {
    // SAFETY: an all-zero tuple is valid; the member of the packet's family is filled in.
    let mut t: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    if p.v6 {
        t.__bindgen_anon_1.ipv6.saddr = p.saddr;
        t.__bindgen_anon_1.ipv6.daddr = p.daddr;
        t.__bindgen_anon_1.ipv6.sport = p.sport;
        t.__bindgen_anon_1.ipv6.dport = dport;
    } else {
        t.__bindgen_anon_1.ipv4.saddr = p.saddr[3];
        t.__bindgen_anon_1.ipv4.daddr = p.daddr[3];
        t.__bindgen_anon_1.ipv4.sport = p.sport;
        t.__bindgen_anon_1.ipv4.dport = dport;
    }
    t
}

/// `INBOUND` (IPv4, by the address in word 3) or `INBOUND6`, copied out.
#[inline(always)]
fn inbound_of(addr: &Ip, v6: bool) -> Option<InboundInfo> {
    // SAFETY: the values are copied out at once.
    unsafe {
        if v6 {
            INBOUND6.get(addr).copied()
        } else {
            INBOUND.get(addr[3]).copied()
        }
    }
}

#[inline(always)]
fn try_ingress(ctx: &TcContext) -> Result<(), Unparsed> {
    let p = parse(ctx)?;
    bump(Stat::TcSeen);
    // First: a FIN from an enrolled pod (direct mode) would pass as a mesh source below.
    if fin_to_rst(ctx, &p) {
        return Ok(());
    }
    let dport = u16::from_be(p.dport);
    if dport == inbound::PLAIN_PORT || dport == inbound::HBONE_PORT {
        bump(Stat::TcPassMeshPort);
        return Ok(());
    }
    let captured = inbound_of(&p.daddr, p.v6)
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
    // `NODE_ADDRS` holds both families (IPv4 v4-mapped), as the packet's source is here.
    // SAFETY: presence test only.
    if unsafe { NODE_ADDRS.get(p.saddr) }.is_some() {
        bump(Stat::TcPassNodeSource);
        return Ok(());
    }
    if inbound_of(&p.saddr, p.v6).is_some_and(|i| i.flags & inbound::ENROLLED != 0) {
        bump(Stat::TcPassMeshSource);
        return Ok(());
    }
    let skb = ctx.skb.skb.cast();
    let len = if p.v6 { TUPLE_V6_LEN } else { TUPLE_V4_LEN };
    // A socket for this very connection (established, a request socket mid-handshake,
    // time-wait, or the pod's own outbound connection): the kernel's own lookup finds it.
    let mut t = tuple(&p, p.dport);
    // SAFETY: helper call with a stack tuple of the stated length; the returned
    // reference is released on every path.
    let sk = unsafe { bpf_skc_lookup_tcp(skb, &mut t, len, BPF_F_CURRENT_NETNS as u64, 0) };
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
    // The agent's plaintext listener of the packet's family in this network namespace.
    let mut l = tuple(&p, inbound::PLAIN_PORT.to_be());
    // SAFETY: as above; released below.
    let listener = unsafe { bpf_sk_lookup_tcp(skb, &mut l, len, BPF_F_CURRENT_NETNS as u64, 0) };
    // Only the first packet of a new connection gets here (the lookup above passes the
    // others), so these records are per connection.
    let logged = on(cfg.log_level, log_level::DEBUG);
    let (s, sp, d, dp) = (ip16(p.saddr), u16::from_be(p.sport), ip16(p.daddr), dport);
    if listener.is_null() {
        bump(Stat::TcNoListener);
        say(logged, Stat::TcNoListener, &s, sp, &d, dp);
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
        if p.v6 {
            bump(Stat::TcAssigned6);
        }
        Stat::TcAssigned
    } else {
        Stat::TcAssignFailed
    };
    bump(stat);
    say(logged, stat, &s, sp, &d, dp);
    Ok(())
}

/// A FIN sent by a paired socket that closed with redirected bytes unread, rewritten into
/// an RST in place (docs/architecture.md, "A paired socket closed with unread bytes").
///
/// The mark is the closing socket's own view in `UNREAD_CLOSES` (namespace 0, local =
/// this segment's source), written by `mesh_close_unread` before the kernel sent the FIN;
/// entries older than `UNREAD_CLOSE_FRESH_NS` are ignored. It is left in place: a FIN
/// retransmitted while the receiver's socket is open (the first RST lost, or judged out
/// of window) is rewritten again. Rewritten only while the receiver still has a socket
/// of this connection that is not in time-wait (`bpf_skc_lookup_tcp` in this
/// namespace): once the RST has closed it, a retransmitted FIN passes untouched and the
/// kernel answers it with its own RST, which ends the closing side's orphaned socket
/// (FIN_WAIT1) at its first retransmission instead of letting it retry until its timers
/// give up.
///
/// The segment keeps its sequence number (the closing socket's `snd_nxt` before the FIN:
/// the receiver's `rcv_nxt` once every byte before it arrived, which is what RFC 5961
/// asks of an RST to accept it outright) and its ACK (`RST|ACK`, as `tcp_send_active_reset`
/// sends); FIN, PSH, URG and the ECN bits are cleared. The checksum is updated for the
/// flags word (`bpf_l4_csum_replace`; the pseudo-header does not change, IPv4 and IPv6
/// alike; a `CHECKSUM_PARTIAL` segment from a local pod needs no update and gets none).
/// A payload on the FIN segment stays where it is; the receiver discards it with the
/// reset (a closing socket's unsent bytes are lost to an RST over plain TCP too).
#[inline(always)]
fn fin_to_rst(ctx: &TcContext, p: &Tcp) -> bool {
    // A load-time constant first: without the mark (before 6.9, forced off) the verifier
    // drops the rest.
    if !crate::close::marks_closes() {
        return false;
    }
    let Ok(word) = ctx.load::<[u8; 2]>(p.l4 + TCP_OFF_FLAGS_WORD) else {
        return false;
    };
    let flags = word[1];
    if flags & (TCP_FIN | TCP_SYN | TCP_RST) != TCP_FIN {
        return false;
    }
    let key = SockKey {
        netns: 0,
        local_ip: p.saddr,
        remote_ip: p.daddr,
        local_port: u16::from_be(p.sport),
        remote_port: u16::from_be(p.dport),
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    let Some(at_ns) = (unsafe { UNREAD_CLOSES.get(key) }).map(|v| v.at_ns) else {
        return false;
    };
    // SAFETY: helper without arguments.
    if unsafe { bpf_ktime_get_ns() }.saturating_sub(at_ns) >= UNREAD_CLOSE_FRESH_NS {
        return false;
    }
    let skb = ctx.skb.skb.cast();
    let mut t = tuple(p, p.dport);
    let len = if p.v6 { TUPLE_V6_LEN } else { TUPLE_V4_LEN };
    // SAFETY: helper call with a stack tuple of the stated length; released below.
    let sk = unsafe { bpf_skc_lookup_tcp(skb, &mut t, len, BPF_F_CURRENT_NETNS as u64, 0) };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a non-null socket from the lookup; `state` is readable on sock_common.
    let state = unsafe { (*sk).state };
    // SAFETY: releasing the lookup's reference.
    unsafe { bpf_sk_release(sk.cast()) };
    if state == BPF_TCP_LISTEN || state == BPF_TCP_TIME_WAIT {
        return false;
    }
    let new = [word[0], TCP_RST | (flags & TCP_ACK)];
    let off = p.l4 + TCP_OFF_FLAGS_WORD;
    // SAFETY: helper calls on this program's skb; offsets inside the TCP header the loads
    // above read (the kernel checks them against the packet again).
    let ok = unsafe {
        bpf_skb_store_bytes(ctx.skb.skb, off as u32, new.as_ptr().cast(), 2, 0) == 0
            && bpf_l4_csum_replace(
                ctx.skb.skb,
                (p.l4 + TCP_OFF_CSUM) as u32,
                u64::from(u16::from_ne_bytes(word)),
                u64::from(u16::from_ne_bytes(new)),
                2,
            ) == 0
    };
    if ok {
        bump(Stat::TcFinToRst);
    }
    ok
}

/// An IPv6 packet whose extension headers outrun the walk: a client that builds its own
/// packets (raw sockets) could otherwise put a connection to a captured pod behind seven
/// headers and past STRICT and policy. To a captured pod, while the agent's IPv6 listener
/// is there and no bypass is on, it is dropped (`tc_drop_ipv6_ext_chain`); a kernel TCP
/// socket adds at most four extension headers, so no ordinary client meets this.
/// Anything else passes as before (counted as `tc_pass_ipv6_ext_header`).
#[inline(always)]
fn long_chain(ctx: &TcContext, daddr: &Ip) -> i32 {
    let captured = inbound_of(daddr, true).is_some_and(|i| i.flags & inbound::CAPTURE != 0);
    if !captured || config().flags & cfg_flags::BYPASS != 0 {
        bump(Stat::TcPassIpv6ExtHeader);
        return TC_ACT_OK;
    }
    // The listener's lookup needs only its own address and port (the source is zero).
    // SAFETY: an all-zero tuple is valid.
    let mut l: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    l.__bindgen_anon_1.ipv6.daddr = *daddr;
    l.__bindgen_anon_1.ipv6.dport = inbound::PLAIN_PORT.to_be();
    // SAFETY: helper call with a stack tuple of the stated length; released below.
    let listener = unsafe {
        bpf_sk_lookup_tcp(
            ctx.skb.skb.cast(),
            &mut l,
            TUPLE_V6_LEN,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if listener.is_null() {
        // No agent: fail open, as for every other packet.
        bump(Stat::TcPassIpv6ExtHeader);
        return TC_ACT_OK;
    }
    // SAFETY: releasing the lookup's reference.
    unsafe { bpf_sk_release(listener.cast()) };
    bump(Stat::TcDropIpv6ExtChain);
    TC_ACT_SHOT
}

/// The decision log's record of a new inbound connection (two aya-log call sites in all:
/// `stat` is a variable at the second). Addresses as 16 bytes, IPv4 v4-mapped (the agent
/// shows those as dotted quads).
#[inline(always)]
fn say(logged: bool, stat: Stat, s: &[u8; 16], sp: u16, d: &[u8; 16], dp: u16) {
    if logged {
        log!(
            &(),
            Level::Debug,
            "{} {:i}:{} -> {:i}:{}",
            stat as u32,
            *s,
            sp,
            *d,
            dp
        );
    }
}
