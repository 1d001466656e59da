//! `sk_skb` stream verdict on `RELAY_UP` (`mesh_relay_back`): the egress kernel relay's
//! destination direction (`--kernel-relay egress`). The proxy's leg P_u of an armed flow
//! receives the destination's bytes over plain TCP (the destination's socket S is never
//! in a sockhash); this program moves each segment onto the send path of the proxy's
//! client socket P_a (`bpf_sk_redirect_hash` without `BPF_F_INGRESS`: linux queues it on
//! P_a's psock backlog, and a kworker sends it through P_a's `sendmsg`, where P_a's own
//! sk_msg hands it to the client as before). The proxy never reads those bytes.
//!
//! The switch (`RELAY_BACK[P_u].state`): a segment is relayed only while the proxy holds
//! none of the destination's bytes: every byte this program passed to the proxy
//! (`passed`) has been written to P_a (`RELAY_ARMED[P_u]`, published by the proxy after
//! each write). Otherwise it is passed to the proxy and counted. Once relaying, nothing is
//! passed again (the proxy's reads of P_u then see only EOF or an error) until P_a's
//! backlog queue holds `RELAY_BACK_QLEN` segments: the next segment goes to the proxy
//! (`relay_fallback`), which writes it to P_a only once P_a sent everything relayed
//! before it (a wait that holds the proxy's reads of P_u, so TCP's flow control holds the
//! destination), and publishes its total; equal counts bring the relay back
//! (`relay_recovered`). A FIN (an empty segment) always goes to the proxy: it reads EOF,
//! waits until P_a sent every relayed byte, and only then half-closes P_a. When a send from
//! P_a's backlog fails hard (the client reset P_a), the kernel stops P_a's psock and drops
//! whatever is redirected to it later: the program sees that after its next redirect
//! (`relay_state::BACK_BROKEN`) and passes every later segment to the proxy, whose gate
//! then resets both ends at once (the destination's writes fail as through a proxy).
//!
//! The proxy's wake-up: while the flow relays, the proxy does not watch P_u's receive
//! queue (P_u is in its epoll without `EPOLLIN`, `RELAY_ARMED_QUIET` set in its total), so
//! the data-ready that follows each relayed segment (the psock calls the socket's saved
//! one) wakes no thread. A segment this program hands to such a proxy (a fallback, a
//! broken P_a, the relay off) comes with a `RELAY_WAKE` record, the proxy's wake-up; a
//! FIN or a reset reaches it through epoll (`EPOLLRDHUP`, `EPOLLERR`).
//!
//! # Minimum kernel version
//!
//! The parser-less stream verdict (`sk_psock_verdict_data_ready`) is 5.13+; loaded only in
//! egress mode (6.9+, `features::KERNEL_RELAY`).

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::sk_action::SK_PASS, macros::stream_verdict, programs::SkBuffContext, Global,
};
use mesh_common::{
    maps::{relay_state, RelayBack, SockKey, RELAY_ARMED_QUIET},
    socket_key, Stat,
};

use crate::maps::{
    add, bump, read_addressing, read_u32, read_u64, OFF_SK_USER_DATA, RELAY_ARMED, RELAY_BACK,
    RELAY_WAKE, SOCKHASH,
};

/// `struct sk_buff`'s `_sk_redir` (the redirect target the helper just set, flag bits in
/// its low bits), and `struct sk_psock`'s `ingress_skb.qlen` (the segments waiting on
/// P_a's backlog queue). Zero: no back-pressure check (the agent does not load the
/// program then).
#[unsafe(no_mangle)]
pub static OFF_SKB_SK_REDIR: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OFF_PSOCK_INGRESS_QLEN: Global<u32> = Global::new(0);
/// `struct sk_psock`'s `state` (its `SK_PSOCK_TX_ENABLED` bit). Zero: not checked (a
/// broken P_a is then found by the proxy at its next look, the FIN or a fallback).
#[unsafe(no_mangle)]
pub static OFF_PSOCK_STATE: Global<u32> = Global::new(0);
/// Segments on P_a's backlog queue at which the destination's direction goes back to the
/// proxy (each segment is at most a GSO size, 64 KiB on loopback).
#[unsafe(no_mangle)]
pub static RELAY_BACK_QLEN: Global<u32> = Global::new(32);

/// `RelayBack::state` after a fallback's first segment went to the proxy: relaying again
/// once the proxy has written everything passed to it (as from `ARMED`, counted as a
/// recovery).
const DRAINING: u32 = 4;

#[stream_verdict]
pub fn mesh_relay_back(ctx: SkBuffContext) -> u32 {
    on_skb(&ctx)
}

#[inline(always)]
fn on_skb(ctx: &SkBuffContext) -> u32 {
    let skb = ctx.skb.skb;
    // SAFETY: the context pointer is valid for the program's lifetime.
    let ((family, l4, r4, l6, r6, lport, rport), len) =
        unsafe { (read_addressing!(skb), read_volatile(&(*skb).len)) };
    // A FIN without payload: the proxy reads it as EOF and half-closes P_a behind every
    // relayed byte (a redirected empty segment would read as a failed send on P_a).
    if len == 0 {
        return SK_PASS;
    }
    // P_u's view; the proxy's sockets share one namespace, keyed as 0.
    let Some((me, _)) = socket_key(0, family, l4, r4, l6, r6, lport, rport) else {
        return SK_PASS;
    };
    let Some(b) = RELAY_BACK.get_ptr_mut(me) else {
        return SK_PASS;
    };
    // SAFETY: map value pointer returned by the kernel, valid during this program run;
    // only this program writes it after the proxy's insert, under P_u's socket lock.
    let b: &mut RelayBack = unsafe { &mut *b };
    let relay = match b.state {
        relay_state::ON => true,
        // FALLBACK: this segment goes to the proxy (DRAINING then), which writes it only
        // once P_a's backlog has drained.
        relay_state::ARMED | DRAINING => {
            // SAFETY: map value pointer, read once.
            RELAY_ARMED
                .get_ptr(me)
                .is_some_and(|a| unsafe { read_volatile(a) } & !RELAY_ARMED_QUIET == b.passed)
        }
        _ => false,
    };
    if relay {
        let mut key = b.target;
        if SOCKHASH.redirect_skb(ctx, &mut key, 0) as u32 == SK_PASS {
            if b.state != relay_state::ON {
                if b.state == relay_state::ARMED {
                    bump(Stat::RelayStarted);
                } else {
                    b.recoveries += 1;
                    bump(Stat::RelayRecovered);
                }
                b.state = relay_state::ON;
            }
            match backlog(skb as u64) {
                Backlog::Broken => {
                    // The kernel drops this segment (its redirect is set) and every later
                    // one: not counted as relayed; the rest goes to the proxy, whose gate
                    // sees the state and resets both ends (the stream to the client
                    // cannot complete).
                    b.state = relay_state::BACK_BROKEN;
                    wake_if_quiet(me);
                    return SK_PASS;
                }
                Backlog::Full => {
                    // This segment still goes (its redirect is set); the next ones go to
                    // the proxy, which writes them behind it.
                    b.state = relay_state::FALLBACK;
                    b.fallbacks += 1;
                    bump(Stat::RelayFallback);
                }
                Backlog::Room => {}
            }
            b.relayed += len as u64;
            bump(Stat::SkbRelayed);
            add(Stat::SkbRelayedBytes, len as u64);
            return SK_PASS;
        }
        // P_a left the sockhash (it closed): the proxy carries the rest, for good.
        b.state = 0;
    } else if b.state == relay_state::FALLBACK {
        b.state = DRAINING;
    }
    b.passed += len as u64;
    // Accepted race: a proxy that sets `RELAY_ARMED_QUIET` while this runs (after the
    // read below) finds the segment itself: it looks at P_u's counts and receive queue
    // only after taking P_u's socket lock, which this program holds (`BackGate::quiet`).
    wake_if_quiet(me);
    SK_PASS
}

/// Writes P_u's key to `RELAY_WAKE` when the proxy does not watch P_u's receive queue
/// (`RELAY_ARMED_QUIET`): it reads a segment this program hands to it only once woken.
/// Rare (a fallback, a broken P_a, the relay off), so the record wakes the reader at once.
/// The flag is cleared with the record: one record per quiet spell, not one per segment
/// until the proxy runs. A lost record (the ring full, counted) makes the reader wake
/// every quiet flow. A plain read-modify-write of the value: this program's runs on P_u
/// are serialized by P_u's socket lock, and the proxy never writes the value in place (a
/// map update from user space puts a new element in its place), so no other write can
/// fall between the read and the store. (The bpf target has no atomic read-modify-write
/// without a nightly feature; it is not needed here.)
#[inline(always)]
fn wake_if_quiet(me: SockKey) {
    let Some(a) = RELAY_ARMED.get_ptr_mut(me) else {
        return;
    };
    // SAFETY: map value pointer (a `u64`, 8-byte aligned), valid during this run.
    let v = unsafe { read_volatile(a) };
    if v & RELAY_ARMED_QUIET == 0 {
        return;
    }
    // SAFETY: as above.
    unsafe { write_volatile(a, v & !RELAY_ARMED_QUIET) };
    if RELAY_WAKE.output(me, 0).is_ok() {
        bump(Stat::RelayWake);
    } else {
        // Still quiet: the flow's next segment writes a record again (and the reader,
        // seeing the count grow, wakes every quiet flow meanwhile).
        // SAFETY: as above.
        unsafe { write_volatile(a, v) };
        bump(Stat::RelayWakeDropped);
    }
}

/// What the redirect's target P_a can take (read from the skb, whose redirect target the
/// helper just set).
#[derive(PartialEq, Eq)]
enum Backlog {
    /// Below `RELAY_BACK_QLEN` segments (or unreadable: the kernel never faults on a probe
    /// read; the bound then is the proxy's next check).
    Room,
    /// `RELAY_BACK_QLEN` segments or more wait on P_a's backlog queue.
    Full,
    /// P_a's psock stopped sending (`SK_PSOCK_TX_ENABLED` clear: a send from its backlog
    /// failed hard, P_a reset by the client): the kernel drops every segment redirected
    /// to it from now on.
    Broken,
}

/// `SK_PSOCK_TX_ENABLED`, bit 0 of `struct sk_psock`'s `state`.
const PSOCK_TX_ENABLED: u32 = 1;

#[inline(always)]
fn backlog(skb: u64) -> Backlog {
    let (redir, qlen, pstate) = (
        OFF_SKB_SK_REDIR.load(),
        OFF_PSOCK_INGRESS_QLEN.load(),
        OFF_PSOCK_STATE.load(),
    );
    if redir == 0 || qlen == 0 {
        return Backlog::Room;
    }
    // The context pointer spilled to a stack slot and copied into another by a probe read
    // (the verifier types the copy as a number, which the probe reads below take). No
    // kernel address is stored in a map (the project rule: dumpable maps hold none).
    let spilled: u64 = skb;
    let addr = read_u64(&spilled as *const u64 as u64, 0);
    if addr == 0 {
        return Backlog::Room;
    }
    let sk = read_u64(addr, redir) & !3;
    if sk == 0 {
        return Backlog::Room;
    }
    let psock = read_u64(sk, OFF_SK_USER_DATA.load()) & !7;
    if psock == 0 {
        return Backlog::Room;
    }
    // Its low 32 bits (little-endian) hold the bit; an unreadable state is not taken as
    // broken (that would reset a healthy flow).
    if pstate != 0 && matches!(read_u32(psock, pstate), Some(s) if s & PSOCK_TX_ENABLED == 0) {
        return Backlog::Broken;
    }
    match read_u32(psock, qlen) {
        Some(n) if n >= RELAY_BACK_QLEN.load() => Backlog::Full,
        _ => Backlog::Room,
    }
}
