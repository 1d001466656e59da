//! Map keys and values. Every type is `#[repr(C)]`, `Copy`, has no implicit padding, and
//! its layout is asserted at compile time: the kernel and the agent read the same bytes.

/// `WORKLOADS` value, keyed by the workload's network namespace cookie (`u64`, as
/// `SO_NETNS_COOKIE` and `bpf_get_netns_cookie` report it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadInfo {
    /// The workload's IPv4 address (network order).
    pub ip4: u32,
    /// Index of the workload in the agent's registry (metrics labels, CLI names).
    pub id: u32,
    /// `wl_flags::*`.
    pub flags: u32,
    pub _pad: u32,
}

/// `DESTS` value, keyed by a local workload's IPv4 address (network order `u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestInfo {
    pub id: u32,
    /// `wl_flags::*` (only `DIRECT` matters for destinations).
    pub flags: u32,
}

/// `CONFIG[0]`: node-wide knobs the agent may change at run time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshConfig {
    /// The node proxy's outbound listener (IPv4, network order) and port (host order).
    pub proxy_ip4: u32,
    pub proxy_port: u32,
    /// `cfg_flags::*`.
    pub flags: u32,
    /// The most verbose level of the datapath's decision log (`log_level::*`, 0: off).
    /// Every log site tests this before it formats anything; the agent sets it from its
    /// log filter at run time (`mesh_agent::datapath::events`).
    pub log_level: u32,
}

/// `EXCLUDES[i]`: destination CIDRs never captured. `prefix_len == 0 && ip4 == 0` with
/// `enabled == 0` marks an unused slot. The array holds two halves of
/// `capacity::EXCLUDES` slots; `EXCLUDES_GEN` says which one is in force
/// (`excludes_match`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExcludeCidr {
    pub ip4: u32,
    pub prefix_len: u32,
    /// Port to exclude on that CIDR, 0 = every port.
    pub port: u32,
    pub enabled: u32,
}

impl ExcludeCidr {
    /// Whether `ip4` (network order) and `port` (host order) fall in this entry.
    #[inline(always)]
    pub fn matches(&self, ip4: u32, port: u16) -> bool {
        if self.enabled == 0 {
            return false;
        }
        if self.port != 0 && self.port != port as u32 {
            return false;
        }
        let mask = prefix_mask(self.prefix_len);
        (u32::from_be(ip4) & mask) == (u32::from_be(self.ip4) & mask)
    }
}

/// First slot of the `EXCLUDES` half in force for generation `gen` (`EXCLUDES_GEN[0]`).
#[inline(always)]
pub fn exclude_half(gen: u32) -> u32 {
    (gen & 1) * crate::capacity::EXCLUDES
}

/// Reads of `EXCLUDES` tried before giving up on a writer that keeps flipping halves.
pub const EXCLUDE_READ_ATTEMPTS: u32 = 4;

/// Whether `ip4:port` is excluded by the rule set in force, or `None` if every attempt
/// raced with the writer. `gen()` reads `EXCLUDES_GEN[0]`, `slot(i)` reads `EXCLUDES[i]`
/// (`None` only out of bounds); connect4/6 and the agent's tests run this same code.
///
/// The rule set is replaced atomically from a reader's view, seqlock-style over a double
/// buffer. The agent (the single writer) fills the half *not* in force, then bumps the
/// generation (one aligned `u32` store: the flip), and only then clears the half it left.
/// So a half is written only while the generation is not its own: a reader that reads the
/// generation `g`, the rules of `exclude_half(g)` up to the first disabled slot, and then
/// `g` again has read a half nobody wrote meanwhile, i.e. exactly the old or the new set,
/// never a mix nor a torn slot. If the generation moved, it reads again (the new half is
/// complete by then).
#[inline(always)]
pub fn excludes_match(
    gen: impl Fn() -> u32,
    slot: impl Fn(u32) -> Option<ExcludeCidr>,
    ip4: u32,
    port: u16,
) -> Option<bool> {
    let mut attempt = 0;
    while attempt < EXCLUDE_READ_ATTEMPTS {
        let g = gen();
        let base = exclude_half(g);
        let mut hit = false;
        let mut i = 0;
        while i < crate::capacity::EXCLUDES {
            match slot(base + i) {
                // Slots are filled from the start of a half; the first empty one ends it.
                Some(e) if e.enabled != 0 => {
                    if e.matches(ip4, port) {
                        hit = true;
                        break;
                    }
                }
                _ => break,
            }
            i += 1;
        }
        if gen() == g {
            return Some(hit);
        }
        attempt += 1;
    }
    None
}

/// Host-order netmask for a prefix length (values above 32 act as 32).
#[inline(always)]
pub fn prefix_mask(prefix_len: u32) -> u32 {
    if prefix_len == 0 {
        0
    } else if prefix_len >= 32 {
        u32::MAX
    } else {
        u32::MAX << (32 - prefix_len)
    }
}

/// `SOCK_STATE` value: the per-socket state of a captured connection, in socket storage
/// (`BPF_MAP_TYPE_SK_STORAGE`), so it lives exactly as long as its socket and is never
/// evicted. On the client socket connect4/6 write it (the original destination), sockops
/// completes it, getpeername4/6 answer from it; on the accepting socket sockops copies the
/// flow in from `FLOWS` at PASSIVE_ESTABLISHED, and the node proxy reads it by its
/// accepted socket's fd. sk_msg keeps each sender's fallback state here.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    /// The original destination (IPv4, network order; port host order).
    pub orig_ip4: u32,
    pub orig_port: u32,
    /// `flow_flags::*`.
    pub flags: u32,
    pub src_id: u32,
    pub dst_id: u32,
    /// `fallback::*` of this socket as a sender; 0 while its sends may be redirected.
    pub fallback: u32,
    /// The network-namespace cookie of the flow's client (connect4/6 read it; the
    /// accepting end copies it from `FLOWS`): for the decision log and the listing.
    pub netns: u64,
    /// Telemetry of a direct-mode end (`tel_flags::COUNTED`), which no proxy sees: bytes
    /// of this socket's sends that sk_msg redirected to the peer (counted at the verdict,
    /// under the sender's socket lock).
    pub redirected: u64,
    /// CLOCK_MONOTONIC nanoseconds at ESTABLISHED (the flow's duration at close).
    pub opened_ns: u64,
    /// `bpf_sock_ops.bytes_acked` at ESTABLISHED: the handshake's share (the SYN may
    /// count 1), taken off at close.
    pub acked_base: u32,
    /// `tel_flags::*`.
    pub tel: u32,
    /// The socket's first sequence number of payload (`snd_una` at ESTABLISHED, the ISN
    /// plus one): `write_seq - snd_base` is every byte it ever put into TCP, and for its
    /// peer `copied_seq - snd_base` every byte the peer read of them. Recorded by sockops
    /// on every socket it establishes; the kernel relay counts with it.
    pub snd_base: u32,
    pub _pad: u32,
}

/// A TCP 4-tuple as seen from one socket: `(local, remote)`. Used as `SOCKHASH` key (each
/// socket under its own view) and as `FLOWS` key (the client's view).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockKey {
    pub local_ip4: u32,
    pub remote_ip4: u32,
    pub local_port: u16,
    pub remote_port: u16,
}

impl SockKey {
    /// The same connection as seen from the other end.
    #[inline(always)]
    pub fn reversed(&self) -> SockKey {
        SockKey {
            local_ip4: self.remote_ip4,
            remote_ip4: self.local_ip4,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// `FLOWS` value, keyed by the client's `SockKey`: the original destination of a captured
/// connection (read by the proxy after `accept`) and how it is carried.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowInfo {
    pub orig_ip4: u32,
    pub orig_port: u32,
    /// `flow_flags::*`.
    pub flags: u32,
    pub src_id: u32,
    pub dst_id: u32,
    pub _pad: u32,
    /// The client's network-namespace cookie (0: not known, e.g. an upstream leg).
    pub netns: u64,
}

/// A record of `FLOW_EVENTS` (ring buffer): a direct-mode flow opened, or one of its local
/// ends closed, with what that end counted (`flow_record::*` says which). The agent turns
/// them into the `istio_tcp_*` series of flows that skip the proxy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowRecord {
    /// `flow_record::*`.
    pub kind: u32,
    /// The end's `flow_flags::*`.
    pub flags: u32,
    pub src_id: u32,
    pub dst_id: u32,
    /// The flow's 4-tuple as the client sees it (local = client).
    pub key: SockKey,
    pub _pad: u32,
    /// The client's network-namespace cookie.
    pub netns: u64,
    /// Bytes this end sent that sk_msg redirected to the peer socket.
    pub sent_redirected: u64,
    /// Bytes this end sent over TCP that the peer acknowledged (handshake and FIN taken
    /// off). Both ends of a direct-mode flow are local, so each direction is counted at
    /// its sender: redirected plus acknowledged.
    pub sent_tcp: u64,
    /// ESTABLISHED to close, nanoseconds (0 in an `OPENED` record).
    pub duration_ns: u64,
}

/// `RELAY` value, keyed by a sender's `SockKey` (its own view): the kernel relay of a
/// proxied flow (`--kernel-relay`). The node proxy writes one for each end of a flow it
/// decided at set-up (the client's socket and the destination's), each naming the other
/// end; sk_msg moves that sender's bytes straight into `target`'s receive queue once
/// nothing it sent is still on the proxied path (docs/architecture.md, "Kernel relay").
/// Only the sender's sk_msg writes `state` and the counters (under its socket lock);
/// the proxy reads them when the flow ends and removes the entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayInfo {
    /// The other end's socket, under its own view (its `SOCKHASH` key).
    pub target: SockKey,
    /// `snd_base` of the proxy socket that feeds `target` (the proxy's leg to it):
    /// `target.copied_seq - reader_base` is every byte `target` read from the proxy.
    pub reader_base: u32,
    /// `relay_state::*`.
    pub state: u32,
    /// Times this sender left the relay for the proxied path (the target's queue full).
    pub fallbacks: u32,
    /// Times it came back (the first switch not counted).
    pub recoveries: u32,
    pub _pad: u32,
    /// Bytes this sender moved straight into `target`.
    pub relayed: u64,
}

/// `RelayInfo::state`.
pub mod relay_state {
    /// Written by the proxy: this sender's bytes still take the proxied path; it switches
    /// at the first send that finds nothing of it in flight.
    pub const ARMED: u32 = 1;
    /// Its sends go straight to the target.
    pub const ON: u32 = 2;
    /// Back on the proxied path (the target's queue was full); it returns as from `ARMED`.
    pub const FALLBACK: u32 = 3;
    pub const NAMES: [(u32, &str); 3] = [(ARMED, "armed"), (ON, "on"), (FALLBACK, "fallback")];
}

/// Whether a relay sender may switch to the direct path without reordering: every byte
/// it ever sent (`via_proxy`: its redirects to the proxy plus its TCP bytes,
/// `write_seq - snd_base`) has been read by the final reader (`reader_copied -
/// reader_base`, the reader's TCP reads from the proxy's leg, which carries nothing but
/// this sender's bytes), and the reader's redirect queue is empty (`reader_queued`).
/// Sequence numbers wrap: the differences are taken modulo 2^32, as TCP does.
#[inline(always)]
pub fn relay_drained(
    via_proxy: u64,
    reader_copied: u32,
    reader_base: u32,
    reader_queued: u32,
) -> bool {
    reader_queued == 0 && reader_copied.wrapping_sub(reader_base) == via_proxy as u32
}

/// `PROXY_HEALTH[0]`: the node proxy's heartbeat. Written by the proxy's own runtime, so a
/// proxy that is stuck or starved (not only a dead one) stops refreshing it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyHealth {
    /// CLOCK_MONOTONIC nanoseconds of the last beat (`bpf_ktime_get_ns`'s clock).
    pub heartbeat_ns: u64,
    /// Older than this (nanoseconds), the proxy is taken as unable to serve; 0: no check.
    pub stale_after_ns: u64,
}

/// `INBOUND` value, keyed by a local enrolled workload's IPv4 address (network order):
/// read by the TC inbound program, written by the agent's inbound manager.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundInfo {
    /// `inbound::*` flags.
    pub flags: u32,
    pub _pad: u32,
}

macro_rules! assert_layout {
    ($t:ty, $size:expr, $align:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $size);
        const _: () = assert!(core::mem::align_of::<$t>() == $align);
    };
}
assert_layout!(WorkloadInfo, 16, 4);
assert_layout!(DestInfo, 8, 4);
assert_layout!(MeshConfig, 16, 4);
assert_layout!(ExcludeCidr, 16, 4);
assert_layout!(SockState, 64, 8);
assert_layout!(RelayInfo, 40, 8);
assert_layout!(FlowRecord, 64, 8);
assert_layout!(SockKey, 12, 4);
assert_layout!(FlowInfo, 32, 8);
assert_layout!(ProxyHealth, 16, 8);
assert_layout!(InboundInfo, 8, 4);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type above is `repr(C)`, `Copy`, and has no padding (asserted), so
    // any byte pattern of the right size is a valid value.
    macro_rules! pod {
        ($($t:ty),*) => { $( #[expect(unsafe_code, reason = "Pod is an unsafe trait")] unsafe impl aya::Pod for $t {} )* };
    }
    pod!(
        WorkloadInfo,
        DestInfo,
        MeshConfig,
        ExcludeCidr,
        SockState,
        FlowRecord,
        SockKey,
        FlowInfo,
        ProxyHealth,
        InboundInfo,
        RelayInfo
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    #[test]
    fn exclude_matches_cidr_and_port() {
        let e = ExcludeCidr {
            ip4: ip([10, 96, 0, 0]),
            prefix_len: 12,
            port: 0,
            enabled: 1,
        };
        assert!(e.matches(ip([10, 96, 1, 2]), 80));
        assert!(e.matches(ip([10, 111, 255, 255]), 80));
        assert!(!e.matches(ip([10, 112, 0, 1]), 80));
        let p = ExcludeCidr { port: 53, ..e };
        assert!(p.matches(ip([10, 96, 0, 10]), 53));
        assert!(!p.matches(ip([10, 96, 0, 10]), 80));
        let off = ExcludeCidr { enabled: 0, ..e };
        assert!(!off.matches(ip([10, 96, 1, 2]), 80));
    }

    #[test]
    fn prefix_mask_edges() {
        assert_eq!(prefix_mask(0), 0);
        assert_eq!(prefix_mask(8), 0xff00_0000);
        assert_eq!(prefix_mask(32), u32::MAX);
        assert_eq!(prefix_mask(40), u32::MAX);
    }

    #[test]
    fn relay_drained_needs_every_byte_read_and_an_empty_queue() {
        // Nothing sent, nothing read.
        assert!(relay_drained(0, 1000, 1000, 0));
        // 10 bytes sent, 10 read.
        assert!(relay_drained(10, 1010, 1000, 0));
        // Read fewer, or bytes still queued: not yet.
        assert!(!relay_drained(10, 1009, 1000, 0));
        assert!(!relay_drained(10, 1010, 1000, 1));
        // Sequence numbers wrap.
        assert!(relay_drained(20, 10, u32::MAX - 9, 0));
        assert!(!relay_drained(21, 10, u32::MAX - 9, 0));
    }

    #[test]
    fn reversed_swaps_ends() {
        let k = SockKey {
            local_ip4: 1,
            remote_ip4: 2,
            local_port: 3,
            remote_port: 4,
        };
        assert_eq!(
            k.reversed(),
            SockKey {
                local_ip4: 2,
                remote_ip4: 1,
                local_port: 4,
                remote_port: 3
            }
        );
        assert_eq!(k.reversed().reversed(), k);
    }
}
