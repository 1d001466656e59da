//! `sk_msg` on `SOCKHASH`: a send on one end of a paired connection goes straight into the
//! peer socket's receive queue (`bpf_msg_redirect_hash` with `BPF_F_INGRESS`), skipping the
//! TCP/IP stack.
//!
//! Per-socket state (`SOCK_STATE`, socket storage): each sender's fallback, never evicted.
//!
//! Back-pressure: an ingress redirect does not wait for the reader, so a fast sender could
//! queue without bound into a slow reader (and writes then fail with ENOMEM). Before each
//! redirect we read how many bytes already wait in the peer's queue (`sk_psock.msg_tot_len`,
//! at offsets the agent resolves from the kernel's BTF) and, above the limit, send this and
//! later messages of this socket over plain TCP instead (sticky, so bytes are never
//! reordered: the reader drains the redirect queue before the TCP queue). TCP then provides
//! the back-pressure. Once the reader has read every byte sent over TCP (its `copied_seq`
//! reaches the sender's `write_seq`), the sender goes back to redirecting (`drained`).
//! The peer's address comes from the kernel itself: after a redirect, `struct
//! sk_msg.sk_redir` names the peer socket; the sender keeps it in its own socket storage
//! (`PEER_SK`, not pinned), so no kernel pointer sits in a map a dump can read.
//!
//! Kernel relay (`--kernel-relay`, `KERNEL_RELAY`): a sender the node proxy armed in
//! `RELAY` (the client's socket of a decided proxied flow, and the destination's socket)
//! sends straight into the other end's receive queue once nothing it sent is still on the
//! proxied path (`relay`); the proxy's own sockets stay on TCP (`fallback::RELAY_LEG`).
//! In egress mode (`relay_mode::EGRESS`, `--kernel-relay egress`) only the client's socket
//! is armed here, its target is the proxy's leg P_u, and the redirect goes onto P_u's send
//! path (no `BPF_F_INGRESS`): the destination's socket is never in the sockhash, and P_u's
//! TCP flow control is the back-pressure (`relay_egress`). The destination's direction is
//! `sk_skb::mesh_relay_back`'s (a stream verdict on P_u, onto P_a's send path).
//!
//! # Minimum kernel version
//!
//! sk_msg is 4.17; `bpf_sk_storage_get` and the `sk` field in sk_msg programs are
//! verified on 5.10, the supported floor (docs/kernels.md, "Helpers by program type"). The back-pressure check needs `sk_psock.msg_tot_len` (6.9) and
//! `bpf_probe_read_kernel` (5.8); on older kernels the agent leaves the offsets at 0,
//! which disables the check. The kernel relay needs the same offsets plus `tcp_sock`'s; the
//! agent turns it on only where all are there (6.9+).

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{
        sk_action::{SK_DROP, SK_PASS},
        BPF_F_INGRESS,
    },
    macros::sk_msg,
    programs::SkMsgContext,
    Global,
};
use aya_log_ebpf::{log, macro_support::Level};
use mesh_common::{
    decision, fallback, flow_flags, log_level,
    maps::{relay_drained, relay_mode, relay_state, RelayInfo, SockKey, SockState},
    socket_key, Stat,
};

use crate::{
    log::{ip16, on, NONE},
    maps::{
        add, bump, config, peer_sk, queue_check_enabled, read_addressing, read_u32, read_u64,
        sock_state, socket_queue, PeerSk, FLOWS, KERNEL_RELAY, OFF_MSG_SK, OFF_MSG_SK_REDIR,
        OFF_TCP_COPIED_SEQ, OFF_TCP_WRITE_SEQ, QUEUE_LIMIT_FLOOR, RELAY, SOCKHASH,
    },
};

#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    // A sender changing path is said once, here (one aya-log call site); on every other
    // message this is one compare of a register.
    let mut rec = MsgRec {
        code: NONE,
        netns: 0,
        me: SockKey::default(),
    };
    let verdict = on_msg(&ctx, &mut rec);
    if rec.code != NONE {
        rec.say();
    }
    verdict
}

#[inline(always)]
fn on_msg(ctx: &SkMsgContext, rec: &mut MsgRec) -> u32 {
    let md = ctx.msg;
    // SAFETY: the context pointer is valid for the program's lifetime.
    let ((family, l4, r4, l6, r6, lport, rport), size, sk) = unsafe {
        (
            read_addressing!(md),
            read_volatile(&(*md).size),
            read_volatile(&(*md).__bindgen_anon_3.sk),
        )
    };
    let sk: *mut core::ffi::c_void = sk.cast();
    if sk.is_null() {
        bump(Stat::MsgPassUnpaired);
        return SK_PASS;
    }
    // The state sockops created when it paired this socket (before any send). Without
    // one (never the case for a paired socket) nothing is redirected, ever, so nothing
    // can be reordered either.
    // SAFETY: the context's own socket, checked non-null.
    let Some(st) = (unsafe { sock_state(sk, false) }) else {
        bump(Stat::MsgPassUnpaired);
        return SK_PASS;
    };
    // This socket's key under its own namespace, and its peer's under the peer's: both
    // from its state (sk_msg has no `bpf_get_netns_cookie` before 5.15).
    let Some((me, _)) = socket_key(st.own_netns, family, l4, r4, l6, r6, lport, rport) else {
        bump(Stat::MsgPassUnpaired);
        return SK_PASS;
    };
    // SAFETY: as above. `None` (no memory for it): no back-pressure check for this socket.
    let mut addrs = unsafe { peer_sk(sk) };
    let peer = me.reversed().in_netns(st.peer_netns);
    // The kernel relay (`--kernel-relay`; a load-time constant, so with it off the
    // verifier never walks this): a sender the node proxy armed may send straight to the
    // flow's other end.
    if KERNEL_RELAY.load() != 0 {
        if let Some(r) = RELAY.get_ptr_mut(me) {
            // SAFETY: map value pointer returned by the kernel, valid during this program
            // run; only this sender writes it, under its socket lock.
            let r = unsafe { &mut *r };
            if let Some(verdict) = relay(ctx, st, addrs.as_deref_mut(), r, size, &me, rec) {
                return verdict;
            }
        }
    }
    // Only a sender that knows its peer's address follows (it must be able to tell when
    // it may come back); one that has not redirected yet leaves the signal for later.
    let knows_peer = addrs.as_deref().is_some_and(|a| a.peer != 0);
    if st.fallback == 0 && knows_peer && queue_check_enabled() && peer_fell_back(st, &me) {
        // Follow the other direction onto TCP; `drained` below decides at once whether
        // this one may stay on the redirect path (nothing of it is on TCP yet).
        st.fallback = fallback::BACKPRESSURE;
        bump(Stat::MsgPassBackpressure);
        *rec = MsgRec::new(decision::BACKPRESSURE_FOLLOWED, &me, st.netns);
    }
    match st.fallback {
        0 => {}
        fallback::BACKPRESSURE if drained(md as u64, addrs.as_deref_mut()) => {
            // Accepted race: none. This sender's socket lock is held (we run inside its
            // sendmsg), so no byte of it can enter TCP between the check and the redirect.
            st.fallback = 0;
            bump(Stat::MsgFallbackRecovered);
            *rec = MsgRec::new(Stat::MsgFallbackRecovered as u32, &me, st.netns);
        }
        _ => {
            bump(Stat::MsgPassFallback);
            return SK_PASS;
        }
    }
    if let Some(a) = addrs.as_deref() {
        if peer_queue_full(a.peer) {
            // This sender leaves the redirect path until the reader catches up; TCP's own
            // flow control takes over. The other direction follows at its next send
            // (`peer_fell_back`); each comes back on its own.
            st.fallback = fallback::BACKPRESSURE;
            mark_flow(st, &me);
            bump(Stat::MsgPassBackpressure);
            *rec = MsgRec::new(Stat::MsgPassBackpressure as u32, &me, st.netns);
            return SK_PASS;
        }
    }
    let mut key = peer;
    if SOCKHASH.redirect_msg(ctx, &mut key, BPF_F_INGRESS as u64) as u32 != SK_PASS {
        // The peer is not in the sockhash (established before the agent started, its
        // insert failed, or it just closed). The helper set no redirect, so returning
        // SK_PASS sends this message over TCP; stay there for good so later messages
        // cannot overtake it.
        st.fallback = fallback::NO_PEER;
        mark_flow(st, &me);
        bump(Stat::MsgPassNoPeer);
        *rec = MsgRec::new(Stat::MsgPassNoPeer as u32, &me, st.netns);
        return SK_PASS;
    }
    // Learn the peer's address from the redirect the kernel just set up, for the check
    // of the next message (the first message of a connection goes unchecked).
    if let Some(a) = addrs {
        if a.peer == 0 && queue_check_enabled() {
            a.peer = read_u64(ctx_addr(md as u64, a), OFF_MSG_SK_REDIR.load());
        }
    }
    bump(Stat::MsgRedirected);
    add(Stat::MsgRedirectedBytes, size as u64);
    // This sender's share of its flow's telemetry (`SockState.redirected`; read by sockops
    // at close). Under the sender's socket lock: no other writer.
    st.redirected += size as u64;
    SK_PASS
}

/// The decision log's record of a sender changing path (rare: never per redirected
/// message). `me`: the sender's view.
struct MsgRec {
    code: u32,
    netns: u64,
    me: SockKey,
}

impl MsgRec {
    #[inline(always)]
    fn new(code: u32, me: &SockKey, netns: u64) -> MsgRec {
        MsgRec {
            code,
            netns,
            me: *me,
        }
    }

    #[inline(always)]
    fn say(&self) {
        if !on(config().log_level, log_level::DEBUG) {
            return;
        }
        let m = &self.me;
        log!(
            &(),
            Level::Debug,
            "{} netns={} sender [{:i}]:{} -> [{:i}]:{}",
            self.code,
            self.netns,
            ip16(m.local_ip),
            m.local_port,
            ip16(m.remote_ip),
            m.remote_port
        );
    }
}

/// The context pointer as a number (the kernel's `struct sk_msg`), for probe reads of its
/// fields: stored and loaded back through the map value, so the verifier sees a scalar.
#[inline(always)]
fn ctx_addr(ctx: u64, scratch: &mut PeerSk) -> u64 {
    // SAFETY: plain volatile store and load of a field of our own map value; volatile so
    // the compiler keeps both.
    unsafe {
        write_volatile(&mut scratch.ctx, ctx);
        read_volatile(&scratch.ctx)
    }
}

/// The sender's flow's `FLOWS` key (the accepting side's namespace, the client's view)
/// and whether the sender is the accepting side.
#[inline(always)]
fn flow_key(st: &SockState, me: &SockKey) -> (SockKey, bool) {
    if st.flags & flow_flags::SERVER_SIDE != 0 {
        (me.reversed(), true)
    } else {
        (me.in_netns(st.peer_netns), false)
    }
}

/// Marks the flow's listing entry (`FLOWS`) with the sender's fallback. Display only: the
/// state that decides is the sender's `SOCK_STATE`.
#[inline(always)]
fn mark_flow(st: &SockState, me: &SockKey) {
    let (view, server) = flow_key(st, me);
    let bit = if server {
        flow_flags::SERVER_FALLBACK
    } else {
        flow_flags::CLIENT_FALLBACK
    };
    if let Some(f) = FLOWS.get_ptr_mut(view) {
        // SAFETY: map value pointer returned by the kernel, valid during this program run.
        unsafe { (*f).flags |= bit };
    }
}

/// Whether a sender in back-pressure fallback may go back to redirecting without
/// reordering: the reader has read every byte this sender ever put into TCP (the
/// reader's `copied_seq` equals the sender's `write_seq`: both count the sender's sequence
/// space, so nothing is queued, in flight, in the peer's backlog or receive queue, or
/// unread). The reader takes the redirect queue before the TCP queue, so a redirect made
/// now cannot overtake an older byte; and with all the TCP bytes read, the redirect queue
/// (read before them) is empty too. Acknowledgements are not waited for: a byte the
/// reader has copied is ordered whatever ACK is still on its way, and under continuous
/// sending "everything acknowledged" rarely holds at the start of a send.
#[inline(always)]
fn drained(ctx: u64, addrs: Option<&mut PeerSk>) -> bool {
    let (wseq, copied) = (OFF_TCP_WRITE_SEQ.load(), OFF_TCP_COPIED_SEQ.load());
    if wseq == 0 || copied == 0 || !queue_check_enabled() {
        return false;
    }
    let Some(a) = addrs else {
        return false;
    };
    let theirs = a.peer;
    let mine = read_u64(ctx_addr(ctx, a), OFF_MSG_SK.load());
    if mine == 0 || theirs == 0 {
        return false;
    }
    match (read_u32(mine, wseq), read_u32(theirs, copied)) {
        (Some(w), Some(c)) => w == c,
        _ => false,
    }
}

/// Whether the other end of this flow moved to the TCP path since this sender last
/// looked: its fallback bit in the flow's `FLOWS` entry, cleared here (a one-shot signal).
/// Both directions then leave the redirect path together, so a slow reader's own replies
/// get TCP's flow control too. A hint only: if the LRU evicted the entry, this direction
/// keeps its own check.
#[inline(always)]
fn peer_fell_back(st: &SockState, me: &SockKey) -> bool {
    let (view, server) = flow_key(st, me);
    let bit = if server {
        flow_flags::CLIENT_FALLBACK
    } else {
        flow_flags::SERVER_FALLBACK
    };
    let Some(f) = FLOWS.get_ptr_mut(view) else {
        return false;
    };
    // SAFETY: map value pointer returned by the kernel, valid during this program run.
    // Accepted race: two senders of one flow updating `flags` at once can lose a bit;
    // the bits are hints (the listing, this signal), never what ordering depends on.
    unsafe {
        if (*f).flags & bit == 0 {
            return false;
        }
        (*f).flags &= !bit;
    }
    true
}

/// The most bytes a redirect queue may hold: half the peer's `SO_RCVBUF`, at least the
/// floor. Half, because the kernel counts redirected bytes in the reader's `sk_rmem_alloc`
/// (6.x): TCP must keep room in that buffer for what the sender puts on it after a
/// fallback. A full buffer makes the reader drop those segments (`RcvPruned`) and the
/// sender wait out a retransmission timeout (200 ms) at every fallback. And the kernel
/// grows `sk_rcvbuf` to what is allocated when a segment finds it full
/// (`tcp_clamp_window`): a limit of the whole buffer followed it up to `tcp_rmem[2]`.
#[inline(always)]
fn queue_limit(rcvbuf: i32) -> u32 {
    let floor = QUEUE_LIMIT_FLOOR.load();
    let half = if rcvbuf > 0 { rcvbuf as u32 / 2 } else { 0 };
    if half > floor {
        half
    } else {
        floor
    }
}

/// Whether more bytes than the limit already wait in the redirect queue of the peer at
/// kernel address `addr` (0: not learnt yet, no check).
#[inline(always)]
fn peer_queue_full(addr: u64) -> bool {
    if !queue_check_enabled() || addr == 0 {
        return false;
    }
    let (rcvbuf, queued) = socket_queue(addr);
    queued > queue_limit(rcvbuf)
}

/// The kernel relay of one sender (`RELAY[me]`, written by the node proxy once it decided
/// the flow): `Some(verdict)` when this message is settled here, `None` when it takes
/// the proxied path (the code after the call: a redirect to the proxy's socket, or TCP).
///
/// The sender switches to the target only at a send that finds nothing of it in flight
/// (`relay_ready`): every byte it ever sent through the proxy has been read by the target,
/// and the target's redirect queue is empty. Then nothing older than this message can
/// still reach the target, so nothing is reordered. A target whose queue is over its limit
/// sends the sender back to the proxied path (the proxy's sockets give TCP's flow
/// control), and the same check brings it back. Going back to the proxied path is always
/// safe: whatever the relay queued is in the target's redirect queue, which its reader
/// takes before anything that arrives by TCP.
#[inline(always)]
fn relay(
    ctx: &SkMsgContext,
    st: &mut SockState,
    addrs: Option<&mut PeerSk>,
    r: &mut RelayInfo,
    size: u32,
    me: &SockKey,
    rec: &mut MsgRec,
) -> Option<u32> {
    if !queue_check_enabled() || OFF_TCP_WRITE_SEQ.load() == 0 || OFF_TCP_COPIED_SEQ.load() == 0 {
        return None;
    }
    // No room for this sender's addresses: no relay (nothing can be checked).
    let a = addrs?;
    let md = ctx.msg as u64;
    if KERNEL_RELAY.load() == relay_mode::EGRESS {
        return relay_egress(ctx, st, a, r, size, me, rec);
    }
    match r.state {
        relay_state::ON => {
            if peer_queue_full(a.relay_peer) {
                r.state = relay_state::FALLBACK;
                r.fallbacks += 1;
                bump(Stat::RelayFallback);
                *rec = MsgRec::new(Stat::RelayFallback as u32, me, st.netns);
                return None;
            }
            let mut key = r.target;
            if SOCKHASH.redirect_msg(ctx, &mut key, BPF_F_INGRESS as u64) as u32 != SK_PASS {
                // The target left the sockhash (it closed): the proxied path carries the
                // rest (the proxy passes the close on). The helper set no redirect.
                r.state = relay_state::FALLBACK;
                return None;
            }
            relayed(r, size);
            Some(SK_PASS)
        }
        relay_state::ARMED | relay_state::FALLBACK => {
            // The target's address is learnt from a redirect to it (the kernel names the
            // socket in `sk_msg.sk_redir`); until the check passes, a second redirect to
            // the proxy's socket replaces it. So learning needs this message to be a
            // redirect to the proxy anyway: the sender is not on TCP.
            let known = a.relay_peer != 0;
            if !known && st.fallback != 0 {
                return None;
            }
            let mut key = r.target;
            if !known {
                if SOCKHASH.redirect_msg(ctx, &mut key, BPF_F_INGRESS as u64) as u32 != SK_PASS {
                    // The target is not paired (yet): no redirect was set.
                    return None;
                }
                a.relay_peer = read_u64(ctx_addr(md, a), OFF_MSG_SK_REDIR.load());
            }
            if a.relay_peer != 0 && relay_ready(md, st, a, r) {
                if known
                    && SOCKHASH.redirect_msg(ctx, &mut key, BPF_F_INGRESS as u64) as u32 != SK_PASS
                {
                    return None;
                }
                switch_on(r, st, me, rec);
                relayed(r, size);
                return Some(SK_PASS);
            }
            if known {
                return None;
            }
            // Learnt, but bytes are still in flight: this message goes to the proxy,
            // replacing the redirect to the target.
            Some(back_to_proxy(ctx, st, a, size, me))
        }
        _ => None,
    }
}

/// A sender switching to the relay: its first switch (`relay_started`) or a return after
/// a fallback (`relay_recovered`), counted and recorded.
#[inline(always)]
fn switch_on(r: &mut RelayInfo, st: &SockState, me: &SockKey, rec: &mut MsgRec) {
    let stat = if r.state == relay_state::ARMED {
        Stat::RelayStarted
    } else {
        r.recoveries += 1;
        Stat::RelayRecovered
    };
    r.state = relay_state::ON;
    bump(stat);
    *rec = MsgRec::new(stat as u32, me, st.netns);
}

/// A relaying sender whose target is learnt but not yet safe (bytes in flight, or no
/// room): the message goes to the proxy's socket (the sender's usual redirect), replacing
/// the redirect to the target. The proxy's socket gone (the flow is being torn down): the
/// message must not reach the target ahead of bytes in flight, so it is dropped and the
/// application's send fails.
#[inline(always)]
fn back_to_proxy(
    ctx: &SkMsgContext,
    st: &mut SockState,
    a: &mut PeerSk,
    size: u32,
    me: &SockKey,
) -> u32 {
    let mut back = me.reversed().in_netns(st.peer_netns);
    if SOCKHASH.redirect_msg(ctx, &mut back, BPF_F_INGRESS as u64) as u32 != SK_PASS {
        return SK_DROP;
    }
    if a.peer == 0 {
        a.peer = read_u64(ctx_addr(ctx.msg as u64, a), OFF_MSG_SK_REDIR.load());
    }
    bump(Stat::MsgRedirected);
    add(Stat::MsgRedirectedBytes, size as u64);
    st.redirected += size as u64;
    SK_PASS
}

/// `struct tcp_sock`'s `snd_una` and `struct sock`'s `sk_sndbuf` (the egress relay's
/// room check; the agent resolves them from BTF with `--kernel-relay egress`). Zero: no
/// egress relay.
#[unsafe(no_mangle)]
pub static OFF_TCP_SND_UNA: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_SK_SNDBUF: Global<u32> = Global::new(0);
/// `sock.sk_socket`, `socket.file`, `file.f_flags`: whether the sender's file is
/// non-blocking (`egress_room`). Zero: every sender is taken as non-blocking.
#[unsafe(no_mangle)]
pub static OFF_SK_SOCKET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_SOCKET_FILE: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_FILE_FLAGS: Global<u32> = Global::new(0);
/// `O_NONBLOCK` (linux, every architecture we build for).
const O_NONBLOCK: u32 = 0o4000;

/// The egress relay of the client's socket A (`relay_mode::EGRESS`): `r.target` is the
/// proxy's leg P_u (its own `SOCKHASH` key; P_u carries nothing but A's bytes), and a
/// relayed message is appended to P_u's write queue (`bpf_msg_redirect_hash` without
/// `BPF_F_INGRESS`: linux `tcp_bpf_sendmsg_redir` -> `tcp_bpf_push_locked`).
///
/// The switch waits until every byte A ever sent through the proxy (its redirects to P_a
/// plus its TCP bytes) is in P_u's write queue: `P_u.write_seq - reader_base`, where
/// `reader_base` is P_u's `snd_base` plus every byte the relay put into P_u. Then nothing
/// of A is in P_a's queues or the proxy's buffer, and a message appended now cannot
/// overtake anything.
///
/// Room: a blocking sender's message is always relayed (a push into a full P_u waits for
/// room: TCP's back-pressure). A non-blocking sender's only if P_u has room
/// (`egress_room`). Otherwise it
/// takes the proxied path (`relay_fallback`) and the same check brings the sender back
/// (`relay_recovered`). Why: a push into a full P_u returns EAGAIN to a non-blocking A
/// while A itself stays writable (its own send buffer is empty) and nothing wakes A when
/// P_u drains: an event-loop writer would spin (level-triggered) or stall for good
/// (edge-triggered). On the proxied path A's flow control is its own again. Accepted
/// inexactness: a blocking socket's `send(MSG_DONTWAIT)` is taken as blocking (sk_msg does
/// not see the call's flags); it can get EAGAIN while A polls writable.
///
/// Counts: while on, only the relay writes into P_u, so the growth of P_u's `write_seq`
/// seen at each message (`seq`) is what the earlier pushes moved (exact, even for a short
/// write); `last` is the message in hand, which the proxy adds when the flow ends.
#[inline(always)]
fn relay_egress(
    ctx: &SkMsgContext,
    st: &mut SockState,
    a: &mut PeerSk,
    r: &mut RelayInfo,
    size: u32,
    me: &SockKey,
    rec: &mut MsgRec,
) -> Option<u32> {
    if OFF_TCP_SND_UNA.load() == 0 || OFF_SK_SNDBUF.load() == 0 {
        return None;
    }
    let md = ctx.msg as u64;
    let mut key = r.target;
    match r.state {
        relay_state::ON => {
            // Unreadable (never seen): as if P_u were full. Never `None` while on: a
            // message on the proxied path with the state still on would let the next
            // one overtake it.
            let w = read_u32(a.relay_peer, OFF_TCP_WRITE_SEQ.load()).unwrap_or(r.seq);
            let moved = w.wrapping_sub(r.seq);
            r.relayed += moved as u64;
            r.reader_base = r.reader_base.wrapping_add(moved);
            r.seq = w;
            r.last = 0;
            let mine = read_u64(ctx_addr(md, a), OFF_MSG_SK.load());
            if !(sender_blocks(mine) || egress_room(a.relay_peer, w, size))
                || SOCKHASH.redirect_msg(ctx, &mut key, 0) as u32 != SK_PASS
            {
                // P_u is full (or left the sockhash: it closed): this message and the
                // next take the proxied path, behind everything already in P_u.
                r.state = relay_state::FALLBACK;
                r.fallbacks += 1;
                bump(Stat::RelayFallback);
                *rec = MsgRec::new(Stat::RelayFallback as u32, me, st.netns);
                return None;
            }
            r.last = size;
            bump(Stat::MsgRelayed);
            add(Stat::MsgRelayedBytes, size as u64);
            Some(SK_PASS)
        }
        relay_state::ARMED | relay_state::FALLBACK => {
            // P_u's address is learnt from a redirect to it (`sk_msg.sk_redir`); while the
            // check fails, a second redirect to P_a replaces it. So learning needs this
            // message to be a redirect to the proxy anyway: the sender is not on TCP.
            let known = a.relay_peer != 0;
            if !known {
                if st.fallback != 0 || SOCKHASH.redirect_msg(ctx, &mut key, 0) as u32 != SK_PASS {
                    return None;
                }
                a.relay_peer = read_u64(ctx_addr(md, a), OFF_MSG_SK_REDIR.load());
            }
            if let Some(w) = egress_ready(md, st, a, r) {
                let mine = read_u64(ctx_addr(md, a), OFF_MSG_SK.load());
                if (sender_blocks(mine) || egress_room(a.relay_peer, w, size))
                    && (!known || SOCKHASH.redirect_msg(ctx, &mut key, 0) as u32 == SK_PASS)
                {
                    switch_on(r, st, me, rec);
                    r.seq = w;
                    r.last = size;
                    bump(Stat::MsgRelayed);
                    add(Stat::MsgRelayedBytes, size as u64);
                    return Some(SK_PASS);
                }
            }
            if known {
                return None;
            }
            // Learnt, but bytes are still in flight (or no room): this message goes to
            // the proxy, replacing the redirect to P_u.
            Some(back_to_proxy(ctx, st, a, size, me))
        }
        _ => None,
    }
}

/// Whether P_u (kernel address `pu`, its `write_seq` `w`) has room: its unacknowledged
/// and unsent bytes below three quarters of its `sk_sndbuf` (the queue's memory also
/// counts each buffer's overhead, about 2% with the pushed pages), so a push moves at
/// least one byte and never returns EAGAIN with nothing sent. A message larger than the room is pushed in part (a short write
/// for a non-blocking sender, a wait for a blocking one); the sender's next message then
/// finds no room and takes the proxied path, so no sender retries into a full P_u.
#[inline(always)]
fn egress_room(pu: u64, w: u32, size: u32) -> bool {
    let (Some(una), Some(sndbuf)) = (
        read_u32(pu, OFF_TCP_SND_UNA.load()),
        read_u32(pu, OFF_SK_SNDBUF.load()),
    ) else {
        return false;
    };
    let _ = size;
    w.wrapping_sub(una) < sndbuf / 4 * 3
}

/// Whether the sender (kernel address `me`) has a blocking file: its push into a full P_u
/// then waits for room there, as a write into its own full socket would.
#[inline(always)]
fn sender_blocks(me: u64) -> bool {
    let (so, fi, fl) = (
        OFF_SK_SOCKET.load(),
        OFF_SOCKET_FILE.load(),
        OFF_FILE_FLAGS.load(),
    );
    if so == 0 || fi == 0 || fl == 0 || me == 0 {
        return false;
    }
    let socket = read_u64(me, so);
    if socket == 0 {
        return false;
    }
    let file = read_u64(socket, fi);
    if file == 0 {
        return false;
    }
    matches!(read_u32(file, fl), Some(f) if f & O_NONBLOCK == 0)
}

/// Egress mode: P_u's `write_seq` when every byte A sent through the proxy (its redirects
/// to P_a, `SockState.redirected`, plus its TCP bytes, `write_seq - snd_base`) is in P_u's
/// write queue (`P_u.write_seq - reader_base`: P_u carries only A's bytes, and
/// `reader_base` leaves out those the relay put there); `None` otherwise. A's socket lock
/// is held, so its side cannot move; the proxy writes into P_u only bytes it read from
/// P_a, so the equality stays true until this message is pushed.
#[inline(always)]
fn egress_ready(md: u64, st: &SockState, a: &mut PeerSk, r: &RelayInfo) -> Option<u32> {
    if a.relay_peer == 0 {
        return None;
    }
    let mine = read_u64(ctx_addr(md, a), OFF_MSG_SK.load());
    if mine == 0 {
        return None;
    }
    let w = read_u32(mine, OFF_TCP_WRITE_SEQ.load())?;
    let wu = read_u32(a.relay_peer, OFF_TCP_WRITE_SEQ.load())?;
    let via_proxy = st.redirected + w.wrapping_sub(st.snd_base) as u64;
    relay_drained(via_proxy, wu, r.reader_base, 0).then_some(wu)
}

/// Counts a message the relay moved (under the sender's socket lock: no other writer of
/// `r`).
#[inline(always)]
fn relayed(r: &mut RelayInfo, size: u32) {
    r.relayed += size as u64;
    bump(Stat::MsgRelayed);
    add(Stat::MsgRelayedBytes, size as u64);
}

/// Whether nothing this sender sent is in flight on the proxied path: the bytes it
/// redirected to the proxy (`SockState.redirected`, relay bytes not included) plus those
/// it put into TCP (`write_seq - snd_base`) equal what the target read from the proxy's
/// leg (`copied_seq - reader_base`; that leg carries this sender's bytes only, over TCP:
/// `fallback::RELAY_LEG`), and the target's redirect queue is empty. This sender's socket
/// lock is held (we run in its sendmsg), so its side cannot move; the target's counts
/// only grow towards equality and its queue only drains, so a true answer stays true
/// until this message is queued.
///
/// Accepted race: `relay_peer` is a kernel address learnt earlier; if the target closed
/// and its memory was reused, the reads are garbage (`bpf_probe_read_kernel` never
/// faults), but the redirect that follows goes through `SOCKHASH` by key, which no longer
/// holds the closed target.
#[inline(always)]
fn relay_ready(md: u64, st: &SockState, a: &mut PeerSk, r: &RelayInfo) -> bool {
    let mine = read_u64(ctx_addr(md, a), OFF_MSG_SK.load());
    if mine == 0 {
        return false;
    }
    let (Some(w), Some(c)) = (
        read_u32(mine, OFF_TCP_WRITE_SEQ.load()),
        read_u32(a.relay_peer, OFF_TCP_COPIED_SEQ.load()),
    ) else {
        return false;
    };
    let (_, queued) = socket_queue(a.relay_peer);
    let via_proxy = st.redirected + w.wrapping_sub(st.snd_base) as u64;
    relay_drained(via_proxy, c, r.reader_base, queued)
}
