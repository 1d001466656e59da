//! `sockops`: records and pairs the sockets of captured connections.
//!
//! - ACTIVE_ESTABLISHED (client side, connect() completing): if connect4 left a
//!   `SOCK_STATE` on the socket, record `FLOWS[client view]` (the hand-off to the accepting
//!   socket, and the listing) and put the socket in `SOCKHASH`.
//! - PASSIVE_ESTABLISHED (server side: the node proxy, or the destination pod in direct
//!   mode): if `FLOWS` holds the reversed tuple, copy the flow into this socket's own
//!   `SOCK_STATE` (the proxy reads it there by its accepted socket, so an LRU eviction of
//!   the `FLOWS` entry later changes nothing) and pair it, which turns on the sk_msg
//!   short-circuit for the pair.
//! - TCP_CONNECT (a captured socket sends its SYN): ask for state callbacks.
//! - STATE_CB to TCP_CLOSE: drop the flow record (per-socket state dies with the socket).
//!
//! Telemetry of direct-mode flows (no proxy sees them): both ends are counted from
//! ESTABLISHED (`tel_flags::COUNTED`, both ends watch their state). The client writes an
//! `OPENED` record to `FLOW_EVENTS`; at its close each end writes what it sent, the
//! bytes sk_msg redirected (`SockState.redirected`) plus the TCP bytes the peer
//! acknowledged (`bytes_acked`, less the handshake's and the FIN's sequence numbers).
//!
//! Paired sockets are never taken out of the sockhash while they live: deleting one drops
//! its psock, which discards whatever a concurrent redirect from the peer queued there
//! (measured: 64 KiB lost in a 16 MiB echo when a socket was un-paired on its FIN).
//!
//! # Minimum kernel version
//!
//! 5.3 (`BPF_SOCK_OPS_STATE_CB`); sockhash 4.18; `bpf_sk_storage_get` from sockops is
//! verified on 5.10, the supported floor (docs/kernels.md, "Helpers by program type").

use core::{ffi::c_void, ptr::read_volatile};

use aya_ebpf::{
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, BPF_TCP_CLOSING, BPF_TCP_FIN_WAIT1, BPF_TCP_FIN_WAIT2, BPF_TCP_LAST_ACK,
    },
    helpers::{bpf_get_netns_cookie, bpf_ktime_get_ns},
    macros::sock_ops,
    programs::SockOpsContext,
};
use aya_log_ebpf::{log, macro_support::Level};
use mesh_common::{
    cfg_flags, decision, flow_flags, flow_record, log_level,
    maps::{relay_mode, FlowInfo, FlowRecord, Ip, MeshConfig, SockKey, SockState},
    socket_key, tcp_payload, tel_flags, Stat,
};

use crate::{
    log::{ip16, on, NONE},
    maps::{
        bump, config, flow_record, read_addressing, sock_state, stamped_netns, DESTS, FLOWS,
        KERNEL_RELAY, SOCKHASH, SOCKOPS_NETNS, SOCK_NETNS_STAMP,
    },
};

/// Callbacks a captured socket needs: state changes, for the flow clean-up on close.
const PAIRED_CB_FLAGS: u32 = BPF_SOCK_OPS_STATE_CB_FLAG;

// Keys carry a network namespace (docs/kernels.md, "Flow keys"): `FLOWS` the accepting
// side's (which the client side names: the proxy's, `CONFIG.proxy_netns`, or the
// destination pod's, `DESTS`; the accepting side reads its own, `accepting_netns`),
// `SOCKHASH` each socket's own (the client's from connect4/6, in its `SOCK_STATE`). Within
// one namespace a live 4-tuple is unique; every insert is still `BPF_NOEXIST`, so where an
// accepting namespace is derived from addresses (a socket without a stamp, < 5.15) a
// socket of another namespace with the same addresses can never take over a live flow's
// entry or sockhash slot (it stays unpaired on TCP, counted).

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    let mut rec = Rec::none();
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => active_established(&ctx, &mut rec),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => passive_established(&ctx, &mut rec),
        BPF_SOCK_OPS_STATE_CB => state_changed(&ctx, &mut rec),
        BPF_SOCK_OPS_TCP_CONNECT_CB => connecting(&ctx),
        _ => {}
    }
    rec.say();
    0
}

/// The decision log's record of one callback, said once at the program's exit (one
/// aya-log call site for all of sockops' records). `key`: the client's view; fields not
/// known are 0.
struct Rec {
    level: u32,
    code: u32,
    paired: u32,
    netns: u64,
    key: SockKey,
    orig_ip: Ip,
    orig_port: u32,
}

impl Rec {
    #[inline(always)]
    fn none() -> Rec {
        Rec {
            level: log_level::OFF,
            code: NONE,
            paired: 0,
            netns: 0,
            key: SockKey::default(),
            orig_ip: [0; 4],
            orig_port: 0,
        }
    }

    #[inline(always)]
    fn say(&self) {
        if self.code == NONE || !on(self.level, log_level::DEBUG) {
            return;
        }
        let k = &self.key;
        log!(
            &(),
            Level::Debug,
            "{} paired={} netns={} [{:i}]:{} -> [{:i}]:{} orig=[{:i}]:{}",
            self.code,
            self.paired,
            self.netns,
            ip16(k.local_ip),
            k.local_port,
            ip16(k.remote_ip),
            k.remote_port,
            ip16(self.orig_ip),
            self.orig_port
        );
    }
}

/// This socket's (local, remote) view in namespace `netns` (IPv4 v4-mapped).
#[inline(always)]
fn sock_key(ctx: &SockOpsContext, netns: u64) -> Option<(SockKey, bool)> {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let (family, l4, r4, l6, r6, lport, rport) = unsafe { read_addressing!(ctx.ops) };
    socket_key(netns, family, l4, r4, l6, r6, lport, rport)
}

/// The network namespace of the accepting socket `sk`, whose local address is `local`:
/// the kernel's answer where sockops may ask (`bpf_get_netns_cookie`, 5.15+); else the
/// stamp `mesh_sock_netns` left on the socket (or its listener) at creation
/// (`SOCK_NETNS`, where the agent attached it); else derived as the client side names it
/// (the proxy's listener: `CONFIG.proxy_netns`; a local workload: `DESTS`), 0 if neither.
///
/// Accepted inexactness of the derived answer (no stamp: a socket made before the agent
/// first attached the stamping program, or no memory for the stamp): two namespaces
/// holding the same local address get the same derived namespace; `BPF_NOEXIST` keeps a
/// live flow's entries from being taken over there.
#[inline(always)]
fn accepting_netns(
    ctx: &SockOpsContext,
    sk: *mut c_void,
    local: &Ip,
    port: u16,
    cfg: &MeshConfig,
) -> u64 {
    if SOCKOPS_NETNS.load() != 0 {
        // SAFETY: helper call on the program's own context (allowed in sockops from 5.15;
        // with the global at 0 this code is dead and never verified).
        return unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    }
    let stamped = if SOCK_NETNS_STAMP.load() != 0 {
        // SAFETY: the context's own socket, checked non-null by the caller.
        unsafe { stamped_netns(sk) }
    } else {
        0
    };
    if cfg.is_proxy(local, port as u32) {
        // The proxy's own namespace is what the client side names; an agent that could
        // not read it (0) keys proxied flows by 0, so its listener must too.
        return if stamped != 0 && cfg.proxy_netns != 0 {
            stamped
        } else {
            cfg.proxy_netns
        };
    }
    if stamped != 0 {
        return stamped;
    }
    // SAFETY: the value is copied out at once.
    match unsafe { DESTS.get(local) } {
        Some(d) => d.netns,
        None => 0,
    }
}

/// The context's full socket, or null (sockops also runs on request and time-wait
/// sockets, which have no storage).
#[inline(always)]
fn ctx_sk(ctx: &SockOpsContext) -> *mut c_void {
    // SAFETY: the context pointer is valid for the program's lifetime.
    unsafe { read_volatile(&(*ctx.ops).__bindgen_anon_2.sk) }.cast()
}

#[inline(always)]
fn active_established(ctx: &SockOpsContext, rec: &mut Rec) {
    let sk = ctx_sk(ctx);
    if sk.is_null() {
        return;
    }
    // SAFETY: the context's own socket, checked non-null.
    let st = match unsafe { sock_state(sk, false) } {
        Some(st) if st.flags & (flow_flags::PROXIED | flow_flags::DIRECT) != 0 => st,
        _ => {
            upstream_established(ctx, sk, rec);
            return;
        }
    };
    // Its own namespace (connect4/6 read it), and the flow's key under the namespace of
    // the socket that will accept it (which connect4/6 named).
    let Some((key, v6)) = sock_key(ctx, st.own_netns) else {
        return;
    };
    let flow_key = key.in_netns(st.peer_netns);
    if v6 {
        st.flags |= flow_flags::CLIENT_V6;
    }
    st.snd_base = snd_base(ctx);
    let cfg = config();
    let pair = (st.flags & flow_flags::DIRECT != 0 || cfg.flags & cfg_flags::SKMSG != 0)
        && cfg.flags & cfg_flags::NO_PAIRING == 0;
    // Watch the socket's state for the clean-up at close.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | PAIRED_CB_FLAGS) as i32);
    // Into the sockhash first, so `client_paired` in the record is the truth; the peer
    // only pairs when it finds the record, which does not exist yet.
    if pair {
        // SAFETY: the context pointer is valid for the program's lifetime.
        if SOCKHASH
            .update(key, unsafe { &mut *ctx.ops }, BPF_NOEXIST as u64)
            .is_ok()
        {
            st.flags |= flow_flags::CLIENT_PAIRED;
            bump(Stat::SockopsClientPaired);
            // SAFETY: the context's own socket, checked non-null.
            unsafe { crate::close::remember_psock(sk) };
        } else {
            // A full sockhash (or no memory): the flow runs over TCP, unpaired.
            bump(Stat::SockhashUpdateFailed);
        }
    }
    let info = FlowInfo {
        orig_ip: st.orig_ip,
        orig_port: st.orig_port,
        flags: st.flags & !(flow_flags::RECORDED | flow_flags::SERVER_SIDE),
        src_id: st.src_id,
        dst_id: st.dst_id,
        netns: st.netns,
    };
    // Accepted race: the accepting side reads this entry at its PASSIVE_ESTABLISHED,
    // which follows this callback (the ACK that completes its handshake is sent after
    // it). An LRU eviction in between would need a map's worth of new flows within that
    // window; the proxy then resets the connection (`flow_handoff_missed`), never guesses.
    let stored = FLOWS.insert(flow_key, info, BPF_NOEXIST as u64).is_ok();
    if stored {
        st.flags |= flow_flags::RECORDED;
    } else {
        bump(Stat::FlowStoreFailed);
    }
    if st.flags & flow_flags::DIRECT != 0 {
        // A flow no proxy will see: count it from here (paired or not).
        start_counting(ctx, st);
        flow_record(&FlowRecord {
            kind: flow_record::OPENED,
            flags: st.flags,
            src_id: st.src_id,
            dst_id: st.dst_id,
            key: flow_key,
            netns: st.netns,
            ..FlowRecord::default()
        });
    }
    *rec = Rec {
        level: cfg.log_level,
        code: if !stored {
            Stat::FlowStoreFailed as u32
        } else if pair && st.flags & flow_flags::CLIENT_PAIRED == 0 {
            Stat::SockhashUpdateFailed as u32
        } else if st.flags & flow_flags::PROXIED != 0 {
            decision::FLOW_RECORDED_PROXIED
        } else {
            decision::FLOW_RECORDED_DIRECT
        },
        paired: (st.flags & flow_flags::CLIENT_PAIRED != 0) as u32,
        netns: st.netns,
        key: flow_key,
        orig_ip: st.orig_ip,
        orig_port: st.orig_port,
    };
}

/// The node proxy's connection to a local destination, announced by the proxy in `FLOWS`
/// (flag `upstream`) before it connected: pair it like a client.
#[inline(always)]
fn upstream_established(ctx: &SockOpsContext, sk: *mut c_void, rec: &mut Rec) {
    let cfg = config();
    // The proxy's own socket (its namespace), to a local workload (the accepting side's
    // namespace, from `DESTS`): every other connection on the node stops at a lookup.
    let Some((key, _)) = sock_key(ctx, cfg.proxy_netns) else {
        return;
    };
    // SAFETY: the value is copied out at once.
    let dest_netns = match unsafe { DESTS.get(key.remote_ip) } {
        Some(d) if d.netns != 0 => d.netns,
        _ => return,
    };
    let flow_key = key.in_netns(dest_netns);
    let Some(flow) = FLOWS.get_ptr_mut(flow_key) else {
        return;
    };
    // SAFETY: map value pointer returned by the kernel, valid during this program run.
    let flow = unsafe { &mut *flow };
    if flow.flags & flow_flags::UPSTREAM == 0 || cfg.flags & cfg_flags::NO_PAIRING != 0 {
        return;
    }
    let _ = ctx.set_cb_flags((ctx.cb_flags() | PAIRED_CB_FLAGS) as i32);
    // The egress kernel relay (`--kernel-relay egress`) puts the proxy's leg in the
    // sockhash alone: without `client_paired` in the flow's entry the destination's
    // socket is not paired, so its reads stay plain TCP (blocking readers unaffected).
    let solo = KERNEL_RELAY.load() == relay_mode::EGRESS;
    let mut paired = 0;
    // SAFETY: the context pointer is valid for the program's lifetime.
    if SOCKHASH
        .update(key, unsafe { &mut *ctx.ops }, BPF_NOEXIST as u64)
        .is_ok()
    {
        paired = flow_flags::CLIENT_PAIRED;
        if !solo {
            flow.flags |= flow_flags::CLIENT_PAIRED;
        }
        bump(Stat::SockopsClientPaired);
        // SAFETY: the context's own socket, checked non-null by the caller.
        unsafe { crate::close::remember_psock(sk) };
    } else {
        bump(Stat::SockhashUpdateFailed);
    }
    // SAFETY: the context's own socket, checked non-null by the caller.
    if let Some(st) = unsafe { sock_state(sk, true) } {
        *st = SockState {
            orig_ip: flow.orig_ip,
            orig_port: flow.orig_port,
            flags: flow.flags | flow_flags::RECORDED | paired,
            src_id: flow.src_id,
            dst_id: flow.dst_id,
            fallback: 0,
            netns: flow.netns,
            own_netns: cfg.proxy_netns,
            peer_netns: dest_netns,
            snd_base: snd_base(ctx),
            ..SockState::default()
        };
    }
    *rec = Rec {
        level: cfg.log_level,
        code: decision::UPSTREAM_ESTABLISHED,
        paired: (paired != 0) as u32,
        netns: flow.netns,
        key: flow_key,
        orig_ip: flow.orig_ip,
        orig_port: flow.orig_port,
    };
}

#[inline(always)]
fn passive_established(ctx: &SockOpsContext, rec: &mut Rec) {
    let sk = ctx_sk(ctx);
    if sk.is_null() {
        return;
    }
    let Some((view, _)) = sock_key(ctx, 0) else {
        return;
    };
    let cfg = config();
    let own = accepting_netns(ctx, sk, &view.local_ip, view.local_port, &cfg);
    let key = view.in_netns(own);
    // The flow's key: this side's namespace, the client's view.
    let client_view = key.reversed();
    let Some(flow) = FLOWS.get_ptr_mut(client_view) else {
        if cfg.is_proxy(&key.local_ip, key.local_port as u32) {
            // A connection to the proxy's listener without its record: evicted before
            // this end was established (or someone dialled the listener directly).
            bump(Stat::FlowHandoffMissed);
            *rec = Rec {
                level: cfg.log_level,
                code: Stat::FlowHandoffMissed as u32,
                key: client_view,
                ..Rec::none()
            };
        }
        return;
    };
    // SAFETY: map value pointer returned by the kernel, valid during this program run.
    let flow = unsafe { &mut *flow };
    // SAFETY: the context's own socket, checked non-null.
    let Some(st) = (unsafe { sock_state(sk, true) }) else {
        // No memory for the state: the proxy still finds the flow in `FLOWS` while it is
        // there; nothing is paired.
        bump(Stat::SockStateFailed);
        return;
    };
    *st = SockState {
        orig_ip: flow.orig_ip,
        orig_port: flow.orig_port,
        flags: flow.flags | flow_flags::SERVER_SIDE,
        src_id: flow.src_id,
        dst_id: flow.dst_id,
        fallback: 0,
        netns: flow.netns,
        own_netns: own,
        // The client's namespace (the proxy's, for its leg to a local destination).
        peer_netns: flow.netns,
        snd_base: snd_base(ctx),
        ..SockState::default()
    };
    if flow.flags & flow_flags::DIRECT != 0 {
        // The destination pod's end of a direct-mode flow: its sends are the response.
        let _ = ctx.set_cb_flags((ctx.cb_flags() | PAIRED_CB_FLAGS) as i32);
        start_counting(ctx, st);
    }
    if flow.flags & flow_flags::CLIENT_PAIRED != 0 {
        // SAFETY: the context pointer is valid for the program's lifetime.
        if SOCKHASH
            .update(key, unsafe { &mut *ctx.ops }, BPF_NOEXIST as u64)
            .is_ok()
        {
            // Accepted race: a concurrent reader of `FLOWS` (the CLI) may see the flag a
            // moment late; it only labels the listing.
            flow.flags |= flow_flags::SERVER_PAIRED;
            st.flags |= flow_flags::SERVER_PAIRED;
            bump(Stat::SockopsServerPaired);
            // SAFETY: the context's own socket, checked non-null.
            unsafe { crate::close::remember_psock(sk) };
        } else {
            bump(Stat::SockhashUpdateFailed);
        }
    }
    *rec = Rec {
        level: cfg.log_level,
        code: decision::FLOW_ACCEPTED,
        paired: (st.flags & flow_flags::SERVER_PAIRED != 0) as u32,
        netns: st.netns,
        key: client_view,
        orig_ip: st.orig_ip,
        orig_port: st.orig_port,
    };
}

/// The socket's first payload sequence number (`SockState::snd_base`): at ESTABLISHED the
/// SYN is acknowledged and nothing else was sent, so `snd_una` is the ISN plus one.
/// Accepted inexactness: data sent with a TCP Fast Open SYN is not counted; such a flow's
/// kernel relay never finds its counts equal and stays on the proxied path (safe).
#[inline(always)]
fn snd_base(ctx: &SockOpsContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's lifetime; ESTABLISHED
    // callbacks run on full sockets.
    unsafe { read_volatile(&(*ctx.ops).snd_una) }
}

/// A connect the connect hooks decided on is starting: watch its state, so the close of
/// a connect that never completes is seen too.
#[inline(always)]
fn connecting(ctx: &SockOpsContext) {
    let sk = ctx_sk(ctx);
    if sk.is_null() {
        return;
    }
    // SAFETY: the context's own socket, checked non-null; presence test only.
    if unsafe { sock_state(sk, false) }.is_some() {
        let _ = ctx.set_cb_flags((ctx.cb_flags() | PAIRED_CB_FLAGS) as i32);
    }
}

/// Marks a direct-mode end as counted: the clock and the handshake's share of
/// `bytes_acked` (taken off at close).
#[inline(always)]
fn start_counting(ctx: &SockOpsContext, st: &mut SockState) {
    // SAFETY: the context pointer is valid for the program's lifetime; a full socket's
    // field (ESTABLISHED callbacks run on full sockets).
    let acked = unsafe { read_volatile(&(*ctx.ops).bytes_acked) };
    st.acked_base = acked as u32;
    // SAFETY: helper call without arguments.
    st.opened_ns = unsafe { bpf_ktime_get_ns() };
    st.redirected = 0;
    st.tel = tel_flags::COUNTED;
}

/// A counted end's state change: whether its FIN was sent and acknowledged (one sequence
/// number in `bytes_acked` that is not payload), and at the close its record.
#[inline(always)]
fn count_state(ctx: &SockOpsContext, st: &mut SockState, old: u32, new: u32) {
    match new {
        BPF_TCP_FIN_WAIT1 | BPF_TCP_LAST_ACK => st.tel |= tel_flags::FIN_SENT,
        // The kernel leaves FIN_WAIT1 for FIN_WAIT2 only once everything up to the FIN
        // (`write_seq`) is acknowledged.
        BPF_TCP_FIN_WAIT2 if old == BPF_TCP_FIN_WAIT1 => st.tel |= tel_flags::FIN_ACKED,
        BPF_TCP_CLOSE if st.tel & tel_flags::CLOSED == 0 => {
            // SAFETY: the context pointer is valid for the program's lifetime; STATE_CB
            // runs on the full socket.
            let (acked, una, nxt) = unsafe {
                (
                    read_volatile(&(*ctx.ops).bytes_acked),
                    read_volatile(&(*ctx.ops).snd_una),
                    read_volatile(&(*ctx.ops).snd_nxt),
                )
            };
            // From CLOSING or LAST_ACK the close follows the FIN's acknowledgement, or a
            // reset or timeout: acknowledged when nothing sent is outstanding. Accepted
            // inexactness: a FIN held back by a zero window when a reset arrives, with all
            // payload acknowledged, takes one byte too many off.
            if (old == BPF_TCP_CLOSING || old == BPF_TCP_LAST_ACK) && una == nxt {
                st.tel |= tel_flags::FIN_ACKED;
            }
            st.tel |= tel_flags::CLOSED;
            let server = st.flags & flow_flags::SERVER_SIDE != 0;
            let sent_tcp = tcp_payload(acked, st.acked_base, st.tel & tel_flags::FIN_ACKED != 0);
            if server && st.redirected == 0 && sent_tcp == 0 {
                return;
            }
            let Some((me, _)) = sock_key(ctx, st.own_netns) else {
                return;
            };
            // SAFETY: helper call without arguments.
            let now = unsafe { bpf_ktime_get_ns() };
            flow_record(&FlowRecord {
                kind: if server {
                    flow_record::SERVER_CLOSED
                } else {
                    flow_record::CLIENT_CLOSED
                },
                flags: st.flags,
                src_id: st.src_id,
                dst_id: st.dst_id,
                // The flow's `FLOWS` key: the accepting side's namespace, the client's view.
                key: if server {
                    me.reversed()
                } else {
                    me.in_netns(st.peer_netns)
                },
                netns: st.netns,
                sent_redirected: st.redirected,
                sent_tcp,
                duration_ns: now.saturating_sub(st.opened_ns),
            });
        }
        _ => {}
    }
}

#[inline(always)]
fn state_changed(ctx: &SockOpsContext, rec: &mut Rec) {
    // arg 0 is the old state, arg 1 the new one.
    let (old, new) = (ctx.arg(0), ctx.arg(1));
    let sk = ctx_sk(ctx);
    if sk.is_null() {
        return;
    }
    // Only sockets with state watch their state (`PAIRED_CB_FLAGS`), and only they can
    // have a flow record.
    // SAFETY: the context's own socket, checked non-null.
    let Some(st) = (unsafe { sock_state(sk, false) }) else {
        return;
    };
    if st.tel & tel_flags::COUNTED != 0 {
        count_state(ctx, st, old, new);
    }
    if new != BPF_TCP_CLOSE || st.flags & flow_flags::SERVER_SIDE != 0 {
        return;
    }
    let Some((me, _)) = sock_key(ctx, st.own_netns) else {
        return;
    };
    // The kernel removes closed sockets from SOCKHASH itself and frees their socket
    // storage; the flow record is keyed by the client's view (under the accepting side's
    // namespace), so the client's close removes it.
    let key = me.in_netns(st.peer_netns);
    if FLOWS.remove(key).is_ok() {
        bump(Stat::FlowClosed);
        return;
    }
    if st.flags & flow_flags::RECORDED != 0 {
        st.flags &= !flow_flags::RECORDED;
        bump(Stat::FlowEvicted);
        *rec = Rec {
            level: config().log_level,
            code: Stat::FlowEvicted as u32,
            paired: 0,
            netns: st.netns,
            key,
            orig_ip: st.orig_ip,
            orig_port: st.orig_port,
        };
    }
}
