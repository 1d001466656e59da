//! A paired socket closed with bytes unread must end in a reset on the other side, not a
//! clean end of stream (docs/architecture.md, "A paired socket closed with unread bytes").
//!
//! `mesh_close_unread` (mesh-ebpf `close`, `tp_btf/inet_sock_set_state`) writes an entry
//! into `UNREAD_CLOSES` when a paired TCP socket closes with redirected bytes still
//! queued, in the closing task, before the kernel sends its FIN. The node proxy, when it reads a FIN
//! on one of its sockets, asks here whether the far end closed that way
//! ([`take_unread`]); if so it resets the other leg instead of passing a half-close.
//!
//! A FIN that no proxy reads (direct mode: two enrolled pods paired with each other) is
//! rewritten into an RST by `mesh_tc_ingress` in the receiving pod (mesh-ebpf `tc`,
//! `fin_to_rst`, counted as `tc_fin_to_rst`), from the same map; nothing here takes part.
//!
//! The map is process-wide state (one datapath per agent process): the proxy's relay is a
//! free function shared by every listener, and a lookup it cannot make (no datapath, an
//! older kernel) simply answers "no". Look-ups share a read lock (concurrent relays do
//! not queue behind each other's system call); only a hit takes the write lock, to
//! remove its entry.
//!
//! Most FINs are ordinary: the look-up would fail (`ENOENT`), a `bpf()` call per proxied
//! close for nothing. The program also stamps `UNREAD_LAST` (an array the agent maps into
//! its memory) after each entry it writes; while that stamp is older than an entry stays
//! fresh (plus a margin), no entry can be, and the proxy answers "no" without a system
//! call (nor the `getsockname`/`getpeername` that build the key of a [`Far::Ask`]).

use std::{
    net::SocketAddr,
    os::fd::AsFd,
    sync::{OnceLock, RwLock},
};

use aya::{
    maps::{HashMap, Map, MapData},
    programs::BtfTracePoint,
    Btf, Ebpf,
};
use mesh_common::{
    map_names,
    maps::{SockKey, UnreadClose, UNREAD_CLOSE_FRESH_NS},
    prog_names,
};
use tracing::{info, warn};

use super::{btf, features};
use crate::sys::mapped::MappedU64;

/// Entries older than this are ignored (and dropped): a reader looks within milliseconds
/// of the close, so an old entry is one no proxy socket consumed (direct mode, where TC
/// ingress reads it and leaves it for retransmitted FINs; a socket paired with another
/// program's) and could only match a later flow reusing its 4-tuple. The same bound as
/// TC ingress's.
const FRESH_NS: u64 = UNREAD_CLOSE_FRESH_NS;

/// How much older than `FRESH_NS` the `UNREAD_LAST` stamp must be before a FIN is let
/// through without a look-up: room for the program's accepted race (two CPUs stamping at
/// once may leave the earlier stamp; they are microseconds apart).
const LAST_MARGIN_NS: u64 = 1_000_000_000;

static UNREAD: OnceLock<Unread> = OnceLock::new();

/// The program's map, and its `UNREAD_LAST` stamp where the kernel let us map it.
struct Unread {
    map: RwLock<HashMap<MapData, SockKey, UnreadClose>>,
    /// `None`: the array could not be mapped (every FIN is looked up, as before).
    last: Option<MappedU64>,
}

impl Unread {
    /// Whether an entry written by the program may still be fresh at `now` (monotonic
    /// ns, the clock of `bpf_ktime_get_ns`). Conservative: `true` unless the stamp shows
    /// that none can be.
    fn may_be_fresh(&self, now: u64) -> bool {
        may_be_fresh(self.last.as_ref().map(MappedU64::get), now)
    }
}

/// Whether an `UNREAD_CLOSES` entry may be fresh at `now`, given the program's last
/// stamp (`None`: not known, so yes).
fn may_be_fresh(last: Option<u64>, now: u64) -> bool {
    last.is_none_or(|l| now.saturating_sub(l) < FRESH_NS + LAST_MARGIN_NS)
}

/// `CLOSE_OFFSETS` (mesh-ebpf `close`) from the running kernel's BTF: `sock_common`'s
/// addresses, ports and family, `sock.sk_protocol` and `sk_shutdown`, `sk_psock.sk`.
/// The reason where one is missing.
pub(super) fn offsets() -> Result<[u32; 10], String> {
    let btf = btf::KernelBtf::from_sys_fs().map_err(|e| e.to_string())?;
    let common = |m: &str| {
        btf.member_offset("sock_common", m)
            .map_err(|e| e.to_string())
    };
    // `struct sock` starts with its `sock_common` (`__sk_common`).
    let base = btf
        .member_offset("sock", "__sk_common")
        .map_err(|e| e.to_string())?;
    Ok([
        base + common("skc_daddr")?,
        base + common("skc_rcv_saddr")?,
        base + common("skc_dport")?,
        base + common("skc_num")?,
        base + common("skc_family")?,
        base + common("skc_v6_daddr")?,
        base + common("skc_v6_rcv_saddr")?,
        btf.member_offset("sock", "sk_protocol")
            .map_err(|e| e.to_string())?,
        btf.member_offset("sock", "sk_shutdown")
            .map_err(|e| e.to_string())?,
        btf.member_offset("sk_psock", "sk")
            .map_err(|e| e.to_string())?,
    ])
}

/// Loads and attaches `mesh_close_unread` (when `wanted`: the kernel has the queue length
/// and the offsets resolved) and opens `UNREAD_CLOSES` for the proxy. Returns whether it
/// runs; a failure is logged and leaves the proxy passing FINs as before.
pub(super) fn attach(ebpf: &mut Ebpf, wanted: bool) -> bool {
    if !wanted {
        return false;
    }
    let mut run = || -> Result<Unread, String> {
        let btf = Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {e}"))?;
        let p: &mut BtfTracePoint = ebpf
            .program_mut(prog_names::CLOSE_UNREAD)
            .ok_or("program missing from the object")?
            .try_into()
            .map_err(|e| format!("{e}"))?;
        p.load("inet_sock_set_state", &btf)
            .map_err(|e| format!("loading: {e}"))?;
        // The link lives as long as the program, held by the datapath's `Ebpf`.
        p.attach().map_err(|e| format!("attaching: {e}"))?;
        let map = ebpf
            .take_map(map_names::UNREAD_CLOSES)
            .ok_or("map UNREAD_CLOSES missing from the object")?;
        let map = HashMap::try_from(map).map_err(|e| format!("map UNREAD_CLOSES: {e}"))?;
        // Without the stamp every FIN is looked up, as before: slower, still right.
        let last = match ebpf.take_map(map_names::UNREAD_LAST) {
            Some(Map::Array(m)) => MappedU64::map(m.fd().as_fd()).map_err(|e| format!("mmap: {e}")),
            Some(_) => Err("not an array".to_owned()),
            None => Err("missing from the object".to_owned()),
        }
        .inspect_err(|e| warn!(error = %e, "UNREAD_LAST not mapped: every FIN the proxy reads from a paired socket's far end costs a look-up"))
        .ok();
        Ok(Unread {
            map: RwLock::new(map),
            last,
        })
    };
    match run() {
        Ok(unread) => {
            if UNREAD.set(unread).is_err() {
                warn!("a second datapath in this process: its unread-close map is not used");
            }
            info!("paired sockets closed with unread bytes end in a reset of the proxied flow, or of the direct-mode flow at the receiving pod's TC ingress (tp_btf/inet_sock_set_state)");
            true
        }
        Err(e) => {
            warn!(error = %e, "mesh_close_unread (tp_btf/inet_sock_set_state) not attached: a paired socket closed with unread bytes ends its proxied or direct-mode flow with a FIN, not a reset");
            false
        }
    }
}

/// The `/kernel` entry.
pub(super) fn feature(available: bool) -> features::Feature {
    features::Feature {
        name: features::CLOSE_UNREAD_RESET,
        since: "6.9",
        available,
        fallback: "a paired socket closed with redirected bytes unread ends its proxied or direct-mode flow with a FIN (a clean end of stream on the other side) instead of a reset",
    }
}

/// Whether the program is attached (`take_unread` can find anything): callers skip the
/// look-up, and the system calls that build its key, when it is not.
pub fn enabled() -> bool {
    UNREAD.get().is_some()
}

/// Whether the far end of the proxy's socket (`local`, connected to `peer`) was a paired
/// socket closed with bytes unread: the unread byte count, the entry consumed. Call it
/// after reading that socket's end of stream. `None` without the program, or for any
/// other end.
pub fn take_unread(local: SocketAddr, peer: SocketAddr) -> Option<u32> {
    let u = UNREAD.get()?;
    let now = crate::sys::monotonic_ns();
    if !u.may_be_fresh(now) {
        return None;
    }
    look_up(u, local, peer, now)
}

/// The look-up itself (one `bpf()` call; a hit takes and removes its entry).
fn look_up(u: &Unread, local: SocketAddr, peer: SocketAddr, now: u64) -> Option<u32> {
    // The closing socket's view: its local address is our peer.
    let key = SockKey::new(0, canonical(peer), canonical(local));
    let v = u
        .map
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key, 0)
        .ok()?;
    let _ = u
        .map
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&key);
    let age = now.saturating_sub(v.at_ns);
    (age < FRESH_NS).then_some(v.unread)
}

/// What a relay knows about the far end of one of its sockets, for [`take_far_unread`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Far {
    /// The proxy's socket was never paired: no redirect could have queued bytes at the
    /// far end, so no close there is marked. Nothing to ask.
    Unpaired,
    /// The proxy's socket, `local` connected to `peer`, as the caller already knows them
    /// (no `getsockname`/`getpeername`).
    Addrs { local: SocketAddr, peer: SocketAddr },
    /// Not known: the addresses are asked of the socket when the question comes.
    Ask,
}

/// [`take_unread`] for a relay that read its socket's end of stream: `(peer, unread
/// bytes)` if the far end closed with bytes unread. Nothing is asked (no system call)
/// while the program is not attached, for an [`Far::Unpaired`] socket, or while no entry
/// can be fresh (`UNREAD_LAST`); `addrs` (the socket's own `(local, peer)`) is called
/// only for [`Far::Ask`], and only when the map is looked in.
pub fn take_far_unread(
    far: Far,
    addrs: impl FnOnce() -> Option<(SocketAddr, SocketAddr)>,
) -> Option<(SocketAddr, u32)> {
    let u = UNREAD.get()?;
    if far == Far::Unpaired {
        return None;
    }
    let now = crate::sys::monotonic_ns();
    if !u.may_be_fresh(now) {
        return None;
    }
    let (local, peer) = match far {
        Far::Unpaired => return None,
        Far::Addrs { local, peer } => (local, peer),
        Far::Ask => addrs()?,
    };
    look_up(u, local, peer, now).map(|n| (peer, n))
}

/// A v4-mapped IPv6 address as the IPv4 one (the datapath's keys map IPv4 the same way
/// either way; this keeps the two spellings from ever differing).
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every machine this project supports has kernel BTF with `struct sock`: the offsets
    /// resolve, and `sock_common`'s address fields sit where its layout puts them
    /// (`skc_daddr` first, `skc_rcv_saddr` right after).
    #[test]
    fn the_offsets_resolve_from_the_running_kernel() {
        let o = offsets().unwrap();
        assert_eq!(o[1], o[0] + 4);
        assert!(o[7] > o[4] && o[8] > o[4], "{o:?}");
        assert_eq!(o[9], 0, "sk_psock.sk is its first member");
    }

    /// The stamp lets a FIN through without a look-up only once no entry can be fresh:
    /// never without a stamp, and not for a second past an entry's freshness (the
    /// program's accepted race); a stamp of 0 (no entry ever written) on a host up for
    /// seconds skips.
    #[test]
    fn the_stamp_skips_the_look_up_only_when_no_entry_can_be_fresh() {
        let s = 1_000_000_000;
        let t = 100 * s;
        assert!(may_be_fresh(None, t));
        assert!(may_be_fresh(Some(t), t));
        assert!(
            may_be_fresh(Some(t - FRESH_NS), t),
            "stale by the entry's own age, within the margin"
        );
        assert!(may_be_fresh(Some(t - FRESH_NS - LAST_MARGIN_NS + 1), t));
        assert!(!may_be_fresh(Some(t - FRESH_NS - LAST_MARGIN_NS), t));
        assert!(!may_be_fresh(Some(0), t));
        // A stamp from the future (read across CPUs): looked up.
        assert!(may_be_fresh(Some(t + s), t));
        // A host up for less than freshness plus the margin: every FIN is looked up.
        assert!(may_be_fresh(Some(0), 3 * s));
    }

    /// Without a loaded program the proxy's question has an answer: no.
    #[test]
    fn without_the_program_nothing_is_unread() {
        let a: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:2000".parse().unwrap();
        assert_eq!(take_unread(a, b), None);
        // Nor is any socket asked for its addresses.
        for far in [Far::Unpaired, Far::Addrs { local: a, peer: b }, Far::Ask] {
            assert_eq!(take_far_unread(far, || panic!("asked the socket")), None);
        }
    }
}
