//! The kernel relay's map side (`--kernel-relay`): what the node proxy writes once it has
//! decided a flow (endpoint picked, policy allowed, no L7 work) so that sk_msg moves the
//! steady-state bytes between the client's socket and the destination's socket, and what
//! it reads back when the flow ends.
//!
//! Arming a flow whose client socket is A (the proxy accepted it as P_a) and whose
//! destination socket is S (the proxy's leg to it is P_u):
//! - P_a's and P_u's sends are put on TCP for good (`fallback::RELAY_LEG` in their
//!   `SOCK_STATE`, written through the proxy's own fds before it sends anything on
//!   them), so the final reader's `copied_seq` counts every byte the proxy passed on;
//! - `RELAY[A] = {target: S, reader_base: P_u.snd_base}` and
//!   `RELAY[S] = {target: A, reader_base: P_a.snd_base}`, both `ARMED`.
//!
//! Egress mode (`--kernel-relay egress`, `egress`): sockops put P_u in the sockhash alone
//! (S is never paired, so its reads stay plain TCP); only
//! `RELAY[A] = {target: P_u, reader_base: P_u.snd_base}` is written, and only P_u's sends
//! are put on TCP (`relay_leg`). A's messages are then appended to P_u's write queue; the
//! direction S -> A stays on the proxied path (P_a still redirects into A).
//!
//! Egress mode, the destination's direction (`BackMaps`, when the kernel has the offsets
//! `mesh_relay_back` reads): `RELAY_ARMED[P_u] = 0` and `RELAY_BACK[P_u] = {target: P_a}`
//! are written, then P_u joins `RELAY_UP`, whose stream verdict moves S's segments onto
//! P_a's send path (mesh-ebpf `sk_skb`). S is still never in a sockhash. The proxy's copy
//! of that direction goes through a `BackGate`: it writes to P_a (and half-closes it)
//! only once P_a sent every byte the kernel relayed, and publishes its total after each
//! write, which is how the kernel knows it holds none of S's bytes.
//!
//! While that direction relays, the proxy does not watch P_u's receive queue
//! (`BackGate::quiet`): the psock still calls P_u's saved data-ready after each segment
//! it relays, which would otherwise wake the proxy once per round trip for nothing to
//! read. P_u's FIN and reset still reach it through its own epoll (`EPOLLRDHUP`,
//! `EPOLLERR`), and a segment the program hands to it comes with a `RELAY_WAKE` record
//! (`WakeDrain`, on a `ring::RingReader`; a lost record wakes every quiet flow).
//!
//! Each direction then switches in the kernel on its own (mesh-ebpf `sk_msg::relay`). The
//! proxy keeps relaying whatever still reaches its sockets and passes FIN and RST on as
//! before; when its relay ends it reads each sender's relayed bytes and removes both
//! entries.

use std::{
    collections::HashMap as StdHashMap,
    io,
    os::fd::{AsRawFd, RawFd},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf, SkStorage, SockHash};
use mesh_common::{
    fallback, flow_flags,
    maps::{
        relay_back_drained, relay_state, RelayBack, RelayInfo, SockKey, SockState,
        RELAY_ARMED_QUIET,
    },
    Stat,
};
use tokio::sync::Notify;

use super::ring::RingReader;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("the proxy's accepted socket is not paired with the client's (sk_msg off, or the sockhash was full)")]
    ClientNotPaired,
    #[error("the proxy's leg to the destination is not paired (not a same-node destination, or the sockhash was full)")]
    UpstreamNotPaired,
    #[error("{what}: {source}")]
    Map {
        what: &'static str,
        source: aya::maps::MapError,
    },
}

/// The egress relay's offsets (`OFF_TCP_SND_UNA`, `OFF_SK_SNDBUF`, `OFF_SK_SOCKET`,
/// `OFF_SOCKET_FILE`, `OFF_FILE_FLAGS` in mesh-ebpf's sk_msg), from the kernel's BTF; zeros (no egress relay: every byte takes
/// the proxied path) with a warning.
pub fn egress_offsets() -> [u32; 5] {
    let resolve = || -> Result<[u32; 5], String> {
        let btf = super::btf::KernelBtf::from_sys_fs().map_err(|e| e.to_string())?;
        let get = |s: &str, m: &str| btf.member_offset(s, m).map_err(|e| e.to_string());
        Ok([
            get("tcp_sock", "snd_una")?,
            get("sock", "sk_sndbuf")?,
            get("sock", "sk_socket")?,
            get("socket", "file")?,
            get("file", "f_flags")?,
        ])
    };
    resolve().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "egress kernel relay disabled: tcp_sock/sock/file offsets not found in the kernel's BTF");
        [0; 5]
    })
}

/// `mesh_relay_back`'s offsets (`OFF_SKB_SK_REDIR`, `OFF_PSOCK_INGRESS_QLEN`,
/// `OFF_PSOCK_STATE`), from the kernel's BTF; `None` (no destination direction: it stays
/// on the proxied path) with a warning.
pub fn back_offsets() -> Option<[u32; 3]> {
    let resolve = || -> Result<[u32; 3], String> {
        let btf = super::btf::KernelBtf::from_sys_fs().map_err(|e| e.to_string())?;
        let get = |s: &str, m: &str| btf.member_offset(s, m).map_err(|e| e.to_string());
        Ok([
            get("sk_buff", "_sk_redir")?,
            get("sk_psock", "ingress_skb")? + get("sk_buff_head", "qlen")?,
            get("sk_psock", "state")?,
        ])
    };
    resolve()
        .map_err(|e| tracing::warn!(error = %e, "egress kernel relay: the destination's direction stays on the proxy (sk_buff/sk_psock offsets not found in the kernel's BTF)"))
        .ok()
}

/// The egress relay's destination direction: `RELAY_UP` (the P_u legs, `mesh_relay_back`
/// attached), `RELAY_BACK` (the program's counts), `RELAY_ARMED` (the proxy's totals) and
/// `RELAY_WAKE` (the program's wake-ups of quiet flows, read by `WakeDrain`).
pub struct BackMaps {
    pub up: SockHash<MapData, SockKey>,
    pub back: HashMap<MapData, SockKey, RelayBack>,
    pub armed: HashMap<MapData, SockKey, u64>,
    pub wake: RingBuf<MapData>,
    /// `STATS`, a second handle (`relay_wake_dropped`: lost records wake every quiet
    /// flow); `None`: not opened (then no wake-up reader starts: no flow goes quiet).
    pub stats: Option<PerCpuArray<MapData, u64>>,
}

/// `BackMaps` without the ring (its reader owns it).
struct Back {
    up: SockHash<MapData, SockKey>,
    back: HashMap<MapData, SockKey, RelayBack>,
    armed: HashMap<MapData, SockKey, u64>,
}

/// Quiet flows' wake-ups, by P_u's key (`RELAY_WAKE` records).
type Wakes = Arc<Mutex<StdHashMap<SockKey, Arc<Notify>>>>;

/// Forgets `key`'s wake-up if it is still `mine`: a newer flow with the same 4-tuple,
/// armed before this one's end, keeps its own.
fn forget_wake(wakes: &Wakes, key: &SockKey, mine: &Arc<Notify>) {
    let mut w = wakes.lock().unwrap_or_else(|e| e.into_inner());
    if w.get(key).is_some_and(|n| Arc::ptr_eq(n, mine)) {
        w.remove(key);
    }
}

/// The end of `RELAY_WAKE`'s reader, on any path (an error, a panic, the stop): dropped
/// with its drain, after the reader's `alive` turned false (no flow goes quiet from then
/// on); every registered flow is woken, so that a quiet one looks at its socket at once
/// instead of at its slow look.
struct ReaderEnd {
    wakes: Wakes,
}

impl Drop for ReaderEnd {
    fn drop(&mut self) {
        wake_all(&self.wakes);
    }
}

/// Wakes every registered flow (a quiet one looks at its socket at once).
fn wake_all(wakes: &Wakes) {
    let w = wakes.lock().unwrap_or_else(|e| e.into_inner());
    for n in w.values() {
        n.notify_one();
    }
}

/// `RELAY_WAKE`'s drain: wakes the flow each record names; and every registered flow
/// when the program counted a record it could not write (`relay_wake_dropped` grew since
/// the last drain: the ring was full, and which flow lost its record is not known).
struct WakeDrain {
    wakes: Wakes,
    /// `STATS` (`relay_wake_dropped`; `None` only in tests: without it no reader starts).
    stats: Option<PerCpuArray<MapData, u64>>,
    dropped: u64,
}

impl WakeDrain {
    fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        while let Some(item) = ring.next() {
            let Some(key) = parse_wake(&item) else {
                continue;
            };
            let w = self.wakes.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = w.get(&key) {
                n.notify_one();
            }
        }
        // After the records: a record is dropped only while the ring is full, i.e. with
        // records unread, so the drain that reads those sees the count grown.
        let dropped = self.stats.as_ref().map_or(0, |s| {
            s.get(&(Stat::RelayWakeDropped as u32), 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0)
        });
        self.saw_dropped(dropped);
    }

    /// Wakes every flow if `dropped` (the program's count of lost records) grew.
    fn saw_dropped(&mut self, dropped: u64) {
        if dropped > self.dropped {
            tracing::debug!(
                lost = dropped - self.dropped,
                "egress kernel relay: wake-up records lost (RELAY_WAKE full); waking every quiet flow"
            );
            wake_all(&self.wakes);
        }
        self.dropped = self.dropped.max(dropped);
    }
}

/// A `RELAY_WAKE` record: P_u's key (`SockKey`'s layout, native endian).
fn parse_wake(b: &[u8]) -> Option<SockKey> {
    if b.len() != std::mem::size_of::<SockKey>() {
        return None;
    }
    let u16_at = |o: usize| u16::from_ne_bytes([b[o], b[o + 1]]);
    let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
    let ip_at = |o: usize| [u32_at(o), u32_at(o + 4), u32_at(o + 8), u32_at(o + 12)];
    Some(SockKey {
        netns: u64::from_ne_bytes(b[0..8].try_into().unwrap_or([0; 8])),
        local_ip: ip_at(8),
        remote_ip: ip_at(24),
        local_port: u16_at(40),
        remote_port: u16_at(42),
        _pad: u32_at(44),
    })
}

/// Handles on `RELAY` and on `SOCK_STATE` (a second handle, opened from its pin, so the
/// proxy's per-connection reads of the first one never wait for this writer).
pub struct RelayMaps {
    relay: Mutex<HashMap<MapData, SockKey, RelayInfo>>,
    sock_state: Mutex<SkStorage<MapData, SockState>>,
    /// Egress mode: the client's direction, onto P_u's send path.
    egress: bool,
    /// Egress mode, the destination's direction (`None`: it stays on the proxied path).
    back: Option<Mutex<Back>>,
    /// Quiet flows' wake-ups, and their reader (`None`: no flow goes quiet).
    wakes: Wakes,
    wake_reader: Option<RingReader>,
}

/// What the kernel moved for one flow (`RelayMaps::finish`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    /// Client to destination (request direction).
    pub from_client: u64,
    /// Destination to client.
    pub from_server: u64,
    /// Fallbacks to the proxied path and returns from it, both directions.
    pub fallbacks: u32,
    pub recoveries: u32,
}

/// An armed flow: both `RELAY` entries, removed when dropped.
pub struct Armed<'a> {
    maps: &'a RelayMaps,
    client: SockKey,
    /// `None` in egress mode (the destination's socket is not armed).
    server: Option<SockKey>,
    /// Egress mode, the destination's direction: P_u's key in `RELAY_UP`, `RELAY_BACK`
    /// and `RELAY_ARMED`, P_a's fd (the gate reads its counts), and the flow's wake-up
    /// (`None`: it never goes quiet).
    back: Option<(SockKey, RawFd, Option<Arc<Notify>>)>,
}

impl<'a> Armed<'a> {
    /// The gate of the destination's direction (egress mode, armed): what the proxy's copy
    /// from P_u to P_a must go through.
    pub fn back_gate(&self) -> Option<BackGate<'a>> {
        let (pu, pa, wake) = self.back.clone()?;
        Some(BackGate {
            maps: self.maps,
            pu,
            pa,
            wake,
        })
    }
}

/// The proxy's side of the destination's direction of an egress-relayed flow: before it
/// writes bytes it read from P_u to P_a, or half-closes P_a, P_a must have sent every
/// byte the kernel relayed (they sit in P_a's backlog queue until a kworker sends them);
/// after each write it publishes its total (`RELAY_ARMED`), so the kernel may relay again
/// once it passed nothing more.
pub struct BackGate<'a> {
    maps: &'a RelayMaps,
    pu: SockKey,
    pa: RawFd,
    wake: Option<Arc<Notify>>,
}

impl BackGate<'_> {
    /// The program's entry for this flow (its counts and state).
    fn entry(&self) -> RelayBack {
        let Some(b) = &self.maps.back else {
            return RelayBack::default();
        };
        let b = b.lock().unwrap_or_else(|e| e.into_inner());
        b.back.get(&self.pu, 0).unwrap_or_default()
    }

    /// Bytes the kernel relayed onto P_a's send path so far.
    pub fn relayed(&self) -> u64 {
        self.entry().relayed
    }

    /// Whether P_a can no longer send what the kernel relayed to it: the program found
    /// its psock stopped (`BACK_BROKEN`: a send from P_a's backlog failed hard, and the
    /// kernel drops whatever is still redirected to it), or P_a has an error pending or
    /// was reset (`POLLERR`, `POLLHUP`: a zero-timeout poll, which leaves the error for
    /// the proxy's next read). Its relayed bytes will then never all be sent.
    fn broken(&self, state: u32) -> bool {
        if state == relay_state::BACK_BROKEN {
            return true;
        }
        crate::sys::failed_or_hung_up(self.pa)
    }

    /// Every byte P_a sent so far: what its sk_msg redirected into the client
    /// (`SockState.redirected`) plus its TCP bytes (acknowledged, and still in its send
    /// queue). The two TCP reads are taken acknowledged first: a sum that can only fall
    /// short, never overstate.
    fn pa_sent(&self) -> io::Result<u64> {
        let redirected = {
            let ss = self
                .maps
                .sock_state
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            ss.get(&self.pa, 0).map(|s| s.redirected).unwrap_or(0)
        };
        let acked = crate::sys::tcp_bytes_acked(self.pa)?;
        let queued = crate::sys::tcp_outq(self.pa)?;
        Ok(redirected + acked + queued)
    }

    /// Whether P_a sent every byte put on its send path: the proxy's own writes
    /// (`written`) and the kernel's relayed bytes; with what P_a sent so far, and the
    /// program's state of the flow.
    fn drained(&self, written: u64) -> io::Result<(bool, u64, u32)> {
        let RelayBack { relayed, state, .. } = self.entry();
        if relayed == 0 && state != relay_state::BACK_BROKEN {
            // Only the proxy's writes, each complete when its call returned.
            return Ok((true, 0, state));
        }
        let sent = self.pa_sent()?;
        Ok((relay_back_drained(sent, written, relayed), sent, state))
    }

    /// Waits until P_a sent every byte put on its send path, polling (the kworker that
    /// empties P_a's backlog wakes no one); `false` when P_a failed (at once: `broken`),
    /// or sent nothing for `stall` (a client that stopped reading).
    pub async fn wait_drained(&self, written: u64, stall: Option<Duration>) -> bool {
        let mut since = Instant::now();
        let mut last = 0;
        let mut pause = Duration::from_micros(200);
        loop {
            match self.drained(written) {
                Ok((true, _, state)) => return state != relay_state::BACK_BROKEN,
                Ok((false, _, state)) if self.broken(state) => return false,
                Ok((false, sent, _)) if sent != last => {
                    last = sent;
                    since = Instant::now();
                }
                Ok(_) => {}
                Err(_) => return false,
            }
            if stall.is_some_and(|l| since.elapsed() >= l) {
                return false;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }

    /// At P_u's EOF: whether the proxy read and wrote every byte the program passed to
    /// it (`RelayBack::passed` against `written`), and if not what to do, `since` the
    /// first short EOF (`None`: this is it). A passed segment can reach P_u's receive
    /// queue after the FIN (the kernel deferred it to the psock's worker, e.g. with P_u's
    /// receive memory full), so a clean FIN then would end the client's stream short.
    pub fn at_eof(&self, written: u64, since: Option<Instant>) -> AtEof {
        at_eof(
            self.entry().passed,
            written,
            since.map_or(Duration::ZERO, |t| t.elapsed()),
        )
    }

    /// The flow's wake-up from `RELAY_WAKE` (`None`: the flow never goes quiet).
    pub fn wake(&self) -> Option<&Arc<Notify>> {
        self.wake.as_ref()
    }

    /// Stops watching P_u's receive queue if the kernel relays the destination's next
    /// segment (the proxy has written everything the program passed to it, and the
    /// relay is neither off nor broken), or else the program wakes the proxy with a
    /// `RELAY_WAKE` record. The caller has taken P_u's receive readiness out of its epoll
    /// already (so a segment that came before the flag was seen is found below). `pu` is
    /// P_u's fd. `false`: keep watching (the total is published without
    /// `RELAY_ARMED_QUIET` again).
    pub fn quiet(&self, written: u64, pu: RawFd) -> bool {
        // Fail-open: without a live reader a record would wake no one.
        if self.wake.is_none() || !self.maps.wakes_read() || !self.may_quiet(written) {
            return false;
        }
        self.publish(written | RELAY_ARMED_QUIET);
        // `TCP_INFO` takes P_u's socket lock, under which `mesh_relay_back` runs: a run
        // that read the total before the flag was set has finished now, and what it
        // passed is counted (and queued) when looked at below.
        let locked = crate::sys::tcp_bytes_acked(pu).is_ok();
        if locked && self.may_quiet(written) && !crate::sys::readable_now(pu) {
            return true;
        }
        self.publish(written);
        false
    }

    /// Whether the program relays P_u's next segment with the proxy's total at `written`:
    /// relaying, or armed and not started. Not in a fallback (its segments come to the
    /// proxy, which would be woken by a record for each quiet spell; the relay comes back
    /// at the next segment after the proxy's last write, whose data-ready wakes the proxy
    /// once, and it goes quiet then), nor off, nor broken.
    fn may_quiet(&self, written: u64) -> bool {
        let e = self.entry();
        matches!(e.state, relay_state::ON | relay_state::ARMED) && e.passed == written
    }

    /// Publishes the proxy's total written to P_a (it holds none of S's bytes now).
    pub fn publish(&self, written: u64) {
        if let Some(b) = &self.maps.back {
            let mut b = b.lock().unwrap_or_else(|e| e.into_inner());
            let _ = b.armed.insert(self.pu, written, 0);
        }
    }
}

/// What the destination's pipe does at P_u's EOF (`BackGate::at_eof`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtEof {
    /// Every passed byte was written: the FIN may follow (behind the relayed bytes).
    Complete,
    /// `unread` passed bytes not read yet: read again after a short wait.
    Retry { unread: u64 },
    /// Still short after `EOF_UNREAD_WAIT`: the flow ends with a reset both ways, never a
    /// clean FIN short of bytes.
    Short { unread: u64 },
}

/// How long the pipe reads again at an EOF short of passed bytes before it resets.
pub const EOF_UNREAD_WAIT: Duration = Duration::from_secs(1);

/// How often the wake-up reader also drains without a record (and reads the count of
/// lost ones): the bound on a lost record the drain after it could not see.
const WAKE_TICK: Duration = Duration::from_secs(1);

/// `BackGate::at_eof` for `passed` bytes passed, `written` written, `waited` since the
/// first short EOF. More written than passed (bytes read before P_u's verdict ran) is
/// complete: no wait can change it, and nothing passed is missing.
fn at_eof(passed: u64, written: u64, waited: Duration) -> AtEof {
    match passed.saturating_sub(written) {
        0 => AtEof::Complete,
        unread if waited < EOF_UNREAD_WAIT => AtEof::Retry { unread },
        unread => AtEof::Short { unread },
    }
}

impl RelayMaps {
    pub fn new(
        relay: HashMap<MapData, SockKey, RelayInfo>,
        sock_state: SkStorage<MapData, SockState>,
        egress: bool,
        back: Option<BackMaps>,
    ) -> RelayMaps {
        let wakes = Wakes::default();
        let (back, wake_reader) = match back {
            // Without `STATS` a lost record could go unseen: no reader, so no flow goes
            // quiet (each watches its socket, as without the wake-ups).
            Some(BackMaps {
                up,
                back,
                armed,
                stats: None,
                ..
            }) => {
                tracing::warn!("egress kernel relay: the STATS map is not readable; no wake-up reader, the proxy watches every relayed flow's socket");
                (Some(Mutex::new(Back { up, back, armed })), None)
            }
            Some(BackMaps {
                up,
                back,
                armed,
                wake,
                stats,
            }) => {
                let dropped = stats
                    .as_ref()
                    .and_then(|s| s.get(&(Stat::RelayWakeDropped as u32), 0).ok())
                    .map_or(0, |v| v.iter().sum());
                let mut d = WakeDrain {
                    wakes: wakes.clone(),
                    stats,
                    dropped,
                };
                let end = ReaderEnd {
                    wakes: wakes.clone(),
                };
                let reader = RingReader::start(
                    "relay-wakes",
                    "the egress relay's wake-ups (relayed flows watch their sockets from now on)",
                    wake,
                    // A tick as well: a record lost just after a drain read the count is
                    // seen within a second, not at the next record.
                    Some(WAKE_TICK),
                    move |ring: &mut RingBuf<MapData>| {
                        let _ = &end;
                        d.drain(ring);
                    },
                )
                .map_err(|e| tracing::warn!(error = %e, "egress kernel relay: no wake-up reader; the proxy watches every relayed flow's socket"))
                    .ok();
                (Some(Mutex::new(Back { up, back, armed })), reader)
            }
            None => (None, None),
        };
        RelayMaps {
            relay: Mutex::new(relay),
            sock_state: Mutex::new(sock_state),
            egress,
            back,
            wakes,
            wake_reader,
        }
    }

    /// Whether `RELAY_WAKE`'s reader is alive (a flow may go quiet).
    fn wakes_read(&self) -> bool {
        self.wake_reader.as_ref().is_some_and(RingReader::alive)
    }

    /// Whether the destination's direction is relayed too (egress mode).
    pub fn back(&self) -> bool {
        self.back.is_some()
    }

    /// Whether this is the egress relay (`--kernel-relay egress`).
    pub fn egress(&self) -> bool {
        self.egress
    }

    /// Arms the relay of a flow: `accepted` is the proxy's socket of the client whose view
    /// is `client`, `upstream` the proxy's connected leg to the destination, whose view
    /// is `upstream_key`. Nothing has been sent on either proxy socket yet. The keys'
    /// namespaces are taken from the proxy sockets' states (each knows its peer's): the
    /// `RELAY` keys are the client's and the destination's `SOCKHASH` keys.
    pub fn arm(
        &self,
        accepted: &impl AsRawFd,
        upstream: &impl AsRawFd,
        client: SockKey,
        upstream_key: SockKey,
    ) -> Result<Armed<'_>, RelayError> {
        let (pa, pu) = {
            let ss = self.sock_state.lock().unwrap_or_else(|e| e.into_inner());
            let pa = ss.get(accepted, 0).ok();
            let pu = ss.get(upstream, 0).ok();
            (pa, pu)
        };
        let pa = pa
            .filter(|s| s.flags & flow_flags::SERVER_PAIRED != 0)
            .ok_or(RelayError::ClientNotPaired)?;
        let pu = pu
            .filter(|s| {
                s.flags & (flow_flags::UPSTREAM | flow_flags::CLIENT_PAIRED)
                    == flow_flags::UPSTREAM | flow_flags::CLIENT_PAIRED
            })
            .ok_or(RelayError::UpstreamNotPaired)?;
        let client = client.in_netns(pa.peer_netns);
        let server = upstream_key.reversed().in_netns(pu.peer_netns);
        if self.egress {
            let mut armed =
                self.arm_egress(upstream, client, upstream_key.in_netns(pu.own_netns), pu)?;
            // P_a's key: the client's view reversed, in P_a's own namespace.
            let pa_key = client.reversed().in_netns(pa.own_netns);
            armed.back = self.arm_back(accepted, upstream, upstream_key.in_netns(0), pa_key);
            return Ok(armed);
        }
        let armed = Armed {
            maps: self,
            client,
            server: Some(server),
            back: None,
        };
        {
            let mut m = self.relay.lock().unwrap_or_else(|e| e.into_inner());
            let entry = |target: SockKey, reader_base: u32| RelayInfo {
                target,
                reader_base,
                state: relay_state::ARMED,
                ..RelayInfo::default()
            };
            // Flags 0: an entry left by a flow with the same addresses whose proxy never
            // finished (killed) is replaced.
            m.insert(client, entry(server, pu.snd_base), 0)
                .and_then(|()| m.insert(server, entry(client, pa.snd_base), 0))
                .map_err(|source| RelayError::Map {
                    what: "RELAY insert (full?)",
                    source,
                })?;
        }
        // The proxy's legs on TCP for good. Until this is written no relay direction can
        // find its counts equal... except with nothing sent at all, which is equal and
        // right: the proxy has not sent on either socket yet (it arms before relaying).
        let mut ss = self.sock_state.lock().unwrap_or_else(|e| e.into_inner());
        for (fd, st) in [(accepted.as_raw_fd(), pa), (upstream.as_raw_fd(), pu)] {
            ss.insert(
                &fd,
                SockState {
                    fallback: fallback::RELAY_LEG,
                    ..st
                },
                0,
            )
            .map_err(|source| RelayError::Map {
                what: "SOCK_STATE update of a proxy socket",
                source,
            })?;
        }
        Ok(armed)
    }

    /// Egress mode: `RELAY[A] = {target: P_u (its own key, as sockops put it in the
    /// sockhash), reader_base: P_u.snd_base}`, and P_u's sends on TCP for good.
    fn arm_egress(
        &self,
        upstream: &impl AsRawFd,
        client: SockKey,
        pu_key: SockKey,
        pu: SockState,
    ) -> Result<Armed<'_>, RelayError> {
        let armed = Armed {
            maps: self,
            client,
            server: None,
            back: None,
        };
        {
            let mut m = self.relay.lock().unwrap_or_else(|e| e.into_inner());
            let entry = RelayInfo {
                target: pu_key,
                reader_base: pu.snd_base,
                state: relay_state::ARMED,
                ..RelayInfo::default()
            };
            m.insert(client, entry, 0)
                .map_err(|source| RelayError::Map {
                    what: "RELAY insert (full?)",
                    source,
                })?;
        }
        let mut ss = self.sock_state.lock().unwrap_or_else(|e| e.into_inner());
        ss.insert(
            &upstream.as_raw_fd(),
            SockState {
                fallback: fallback::RELAY_LEG,
                ..pu
            },
            0,
        )
        .map_err(|source| RelayError::Map {
            what: "SOCK_STATE update of a proxy socket",
            source,
        })?;
        Ok(armed)
    }

    /// Egress mode, the destination's direction: `RELAY_ARMED[P_u] = 0` (the proxy has
    /// written nothing to P_a), `RELAY_BACK[P_u] = {target: P_a}`, then P_u into
    /// `RELAY_UP` (from then on every byte P_u receives goes through `mesh_relay_back`:
    /// the proxy has read nothing from P_u yet, and bytes already queued are run through
    /// the verdict at its first read). `None` (not available, or a map full): that
    /// direction stays on the proxied path.
    fn arm_back(
        &self,
        accepted: &impl AsRawFd,
        upstream: &impl AsRawFd,
        pu: SockKey,
        pa_key: SockKey,
    ) -> Option<(SockKey, RawFd, Option<Arc<Notify>>)> {
        let b = self.back.as_ref()?;
        let mut b = b.lock().unwrap_or_else(|e| e.into_inner());
        let entry = RelayBack {
            target: pa_key,
            state: relay_state::ARMED,
            ..RelayBack::default()
        };
        let r = b
            .armed
            .insert(pu, 0, 0)
            .and_then(|()| b.back.insert(pu, entry, 0))
            .and_then(|()| b.up.insert(pu, upstream.as_raw_fd(), 0));
        match r {
            Ok(()) => {
                let wake = self.wakes_read().then(|| {
                    let n = Arc::new(Notify::new());
                    let mut w = self.wakes.lock().unwrap_or_else(|e| e.into_inner());
                    w.insert(pu, n.clone());
                    n
                });
                Some((pu, accepted.as_raw_fd(), wake))
            }
            Err(e) => {
                tracing::debug!(error = %e, "egress kernel relay: the destination's direction not armed");
                let _ = b.armed.remove(&pu);
                let _ = b.back.remove(&pu);
                None
            }
        }
    }

    /// What the kernel moved for `armed`, read as its entries are removed.
    pub fn finish(&self, armed: Armed<'_>) -> Relayed {
        let m = self.relay.lock().unwrap_or_else(|e| e.into_inner());
        let c = m.get(&armed.client, 0).unwrap_or_default();
        let s = armed
            .server
            .and_then(|k| m.get(&k, 0).ok())
            .unwrap_or_default();
        drop(m);
        let back = match (&self.back, &armed.back) {
            (Some(b), Some((pu, _, _))) => {
                let b = b.lock().unwrap_or_else(|e| e.into_inner());
                b.back.get(pu, 0).unwrap_or_default()
            }
            _ => RelayBack::default(),
        };
        Relayed {
            // Egress mode: the last message's push is counted here (`RelayInfo::last`).
            from_client: c.relayed + u64::from(c.last),
            from_server: s.relayed + back.relayed,
            fallbacks: c.fallbacks + s.fallbacks + back.fallbacks,
            recoveries: c.recoveries + s.recoveries + back.recoveries,
        }
        // `armed` dropped here: the entries go.
    }

    /// Entries in `RELAY` (tests, `/inspect`).
    pub fn entries(&self) -> usize {
        let m = self.relay.lock().unwrap_or_else(|e| e.into_inner());
        m.keys().count()
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        // Removing an entry sends its sender back to the proxied path at its next send,
        // which is always safe (the reader takes its redirect queue before TCP).
        let mut m = self.maps.relay.lock().unwrap_or_else(|e| e.into_inner());
        let _ = m.remove(&self.client);
        if let Some(s) = &self.server {
            let _ = m.remove(s);
        }
        drop(m);
        if let (Some(b), Some((pu, _, wake))) = (&self.maps.back, &self.back) {
            // P_u leaves `RELAY_UP` first (its verdict stops), then its entries.
            let mut b = b.lock().unwrap_or_else(|e| e.into_inner());
            let _ = b.up.remove(pu);
            let _ = b.back.remove(pu);
            let _ = b.armed.remove(pu);
            drop(b);
            if let Some(n) = wake {
                forget_wake(&self.maps.wakes, pu, n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> SockKey {
        SockKey {
            netns: 1,
            local_ip: [1, 0, 0, 0],
            remote_ip: [2, 0, 0, 0],
            local_port: port,
            remote_port: 80,
            _pad: 0,
        }
    }

    /// A flow's end forgets its own wake-up only: a newer flow with the same 4-tuple,
    /// armed before the older one's end, keeps being woken.
    #[test]
    fn a_flow_end_leaves_a_newer_flows_wake_up_with_the_same_key() {
        let wakes = Wakes::default();
        let (old, new) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        wakes.lock().unwrap().insert(key(1), old.clone());
        // The newer flow armed (its entry replaces the older one's), then the older ends.
        wakes.lock().unwrap().insert(key(1), new.clone());
        forget_wake(&wakes, &key(1), &old);
        assert!(wakes
            .lock()
            .unwrap()
            .get(&key(1))
            .is_some_and(|n| Arc::ptr_eq(n, &new)));
        forget_wake(&wakes, &key(1), &new);
        assert!(wakes.lock().unwrap().is_empty());
    }

    /// Whether each of `flows` has a wake-up waiting (its stored permit), taking it.
    fn woken(flows: &[Arc<Notify>]) -> Vec<bool> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        flows
            .iter()
            .map(|n| {
                // The permit is stored: the wait ends at its first poll.
                rt.block_on(async { tokio::time::timeout(Duration::ZERO, n.notified()).await })
                    .is_ok()
            })
            .collect()
    }

    fn registered(n: usize) -> (Wakes, Vec<Arc<Notify>>) {
        let wakes = Wakes::default();
        let flows: Vec<Arc<Notify>> = (0..n).map(|_| Arc::new(Notify::new())).collect();
        for (i, f) in flows.iter().enumerate() {
            wakes.lock().unwrap().insert(key(i as u16), f.clone());
        }
        (wakes, flows)
    }

    /// The reader's end, for any reason: every registered flow is woken (a quiet one
    /// looks at its socket at once).
    #[test]
    fn the_wake_readers_end_wakes_every_flow() {
        let (wakes, flows) = registered(3);
        drop(ReaderEnd {
            wakes: wakes.clone(),
        });
        assert_eq!(woken(&flows), [true; 3], "a registered flow was not woken");
    }

    /// A record lost to a full ring (`relay_wake_dropped` grew since the last drain):
    /// which flow lost it is not known, so every registered flow is woken; a count that
    /// did not grow wakes none.
    #[test]
    fn a_lost_wake_up_record_wakes_every_flow() {
        let (wakes, flows) = registered(3);
        let mut d = WakeDrain {
            wakes,
            stats: None,
            dropped: 5,
        };
        d.saw_dropped(5);
        assert_eq!(woken(&flows), [false; 3], "woken with no record lost");
        d.saw_dropped(7);
        assert_eq!(
            woken(&flows),
            [true; 3],
            "a flow not woken after lost records"
        );
        d.saw_dropped(7);
        assert_eq!(
            woken(&flows),
            [false; 3],
            "woken again for the same lost records"
        );
    }

    /// At P_u's EOF the pipe may half-close P_a only once it wrote every byte the
    /// program passed to it; short, it reads again for up to `EOF_UNREAD_WAIT`, then
    /// resets (a segment deferred behind the FIN must not vanish behind a clean FIN).
    #[test]
    fn an_eof_short_of_passed_bytes_is_retried_then_reset_never_a_clean_end() {
        let ms = Duration::from_millis;
        assert_eq!(at_eof(100, 100, ms(0)), AtEof::Complete);
        assert_eq!(at_eof(0, 0, ms(5000)), AtEof::Complete);
        // Read before the verdict ran (written ahead of passed): nothing passed is missing.
        assert_eq!(at_eof(100, 130, ms(0)), AtEof::Complete);
        assert_eq!(at_eof(164, 100, ms(0)), AtEof::Retry { unread: 64 });
        assert_eq!(at_eof(164, 100, ms(999)), AtEof::Retry { unread: 64 });
        assert_eq!(
            at_eof(164, 100, EOF_UNREAD_WAIT),
            AtEof::Short { unread: 64 }
        );
        assert_eq!(at_eof(164, 100, ms(5000)), AtEof::Short { unread: 64 });
    }

    /// A `RELAY_WAKE` record is `SockKey` as the program lays it out: a record decoded
    /// into another key would wake no flow (it would then wait for its slow look).
    #[test]
    fn a_wake_record_decodes_into_the_key_it_was_written_from() {
        let key = SockKey {
            netns: 0x0102_0304_0506_0708,
            local_ip: [1, 2, 3, 4],
            remote_ip: [5, 6, 7, 8],
            local_port: 15001,
            remote_port: 9000,
            _pad: 0,
        };
        let mut b = Vec::new();
        b.extend_from_slice(&key.netns.to_ne_bytes());
        for w in key.local_ip.iter().chain(key.remote_ip.iter()) {
            b.extend_from_slice(&w.to_ne_bytes());
        }
        b.extend_from_slice(&key.local_port.to_ne_bytes());
        b.extend_from_slice(&key.remote_port.to_ne_bytes());
        b.extend_from_slice(&key._pad.to_ne_bytes());
        assert_eq!(b.len(), std::mem::size_of::<SockKey>());
        assert_eq!(parse_wake(&b), Some(key));
        assert_eq!(parse_wake(&b[..40]), None);
    }
}
