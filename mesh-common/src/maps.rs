//! Map keys and values. Every type is `#[repr(C)]`, `Copy`, has no implicit padding, and
//! its layout is asserted at compile time: the kernel and the agent read the same bytes.

/// An address as every map holds it: 16 bytes, four `u32` words each in network order
/// (the layout of `bpf_sock_addr.user_ip6` and `bpf_sock_ops.remote_ip6`). IPv4 is stored
/// v4-mapped (`::ffff:a.b.c.d`, `ip4_mapped`), so a connection of an AF_INET socket and
/// one of a dual-stack AF_INET6 socket to the same IPv4 peer have the same key. All zero:
/// no address.
pub type Ip = [u32; 4];

/// The v4-mapped form (`::ffff:a.b.c.d`) of an IPv4 address in network order.
#[inline(always)]
pub const fn ip4_mapped(ip4: u32) -> Ip {
    [0, 0, 0xffff_u32.to_be(), ip4]
}

/// An `Ip` from an address (IPv4 v4-mapped; a v4-mapped IPv6 address is the same value).
pub fn ip_from(ip: core::net::IpAddr) -> Ip {
    match ip {
        core::net::IpAddr::V4(a) => ip4_mapped(u32::from_ne_bytes(a.octets())),
        core::net::IpAddr::V6(a) => ip6_words(a.octets()),
    }
}

/// The words of an IPv6 address given as its 16 bytes in network order.
#[inline(always)]
pub fn ip6_words(b: [u8; 16]) -> Ip {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

/// The 16 bytes (network order) of an `Ip`.
#[inline(always)]
pub fn ip_bytes(ip: Ip) -> [u8; 16] {
    let (a, b, c, d) = (
        ip[0].to_ne_bytes(),
        ip[1].to_ne_bytes(),
        ip[2].to_ne_bytes(),
        ip[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// An `Ip` as an address: a v4-mapped one as IPv4.
pub fn ip_addr(ip: Ip) -> core::net::IpAddr {
    let v6 = core::net::Ipv6Addr::from(ip_bytes(ip));
    match v6.to_ipv4_mapped() {
        Some(v4) => core::net::IpAddr::V4(v4),
        None => core::net::IpAddr::V6(v6),
    }
}

/// `WORKLOADS` value, keyed by the workload's network namespace cookie (`u64`, as
/// `SO_NETNS_COOKIE` and `bpf_get_netns_cookie` report it). A dual-stack workload has
/// both addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadInfo {
    /// The workload's IPv4 address, v4-mapped (zero: none).
    pub ip4: Ip,
    /// The workload's IPv6 address (zero: none).
    pub ip6: Ip,
    /// Index of the workload in the agent's registry (metrics labels, CLI names).
    pub id: u32,
    /// `wl_flags::*`.
    pub flags: u32,
}

/// `DESTS` value, keyed by a local workload's address (`Ip`; a dual-stack workload has
/// an entry for each of its addresses).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestInfo {
    pub id: u32,
    /// `wl_flags::*` (only `DIRECT` matters for destinations).
    pub flags: u32,
    /// The destination's network-namespace cookie (0: not known; such a destination is
    /// never `DIRECT`): the namespace of the socket that accepts a direct-mode flow, the
    /// first word of its `FLOWS` key.
    pub netns: u64,
}

/// `CONFIG[0]`: node-wide knobs the agent may change at run time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshConfig {
    /// The node proxy's outbound listener for IPv4 (v4-mapped) and its port (host order).
    pub proxy_ip: Ip,
    /// The node proxy's outbound listener for native IPv6 and its port; port 0: native
    /// IPv6 is not captured (left alone, `connect_not_ipv4`).
    pub proxy_ip6: Ip,
    pub proxy_port: u32,
    pub proxy_port6: u32,
    /// `cfg_flags::*`.
    pub flags: u32,
    /// The most verbose level of the datapath's decision log (`log_level::*`, 0: off).
    /// Every log site tests this before it formats anything; the agent sets it from its
    /// log filter at run time (`mesh_agent::datapath::events`).
    pub log_level: u32,
    /// The node proxy's network-namespace cookie: the namespace of the socket that
    /// accepts a proxied flow (the first word of its `FLOWS` key).
    pub proxy_netns: u64,
}

impl MeshConfig {
    /// Whether `ip:port` (port host order) is one of the proxy's outbound listeners.
    #[inline(always)]
    pub fn is_proxy(&self, ip: &Ip, port: u32) -> bool {
        (port == self.proxy_port && ip_eq(ip, &self.proxy_ip))
            | (self.proxy_port6 != 0 && port == self.proxy_port6 && ip_eq(ip, &self.proxy_ip6))
    }
}

/// `EXCLUDES[i]`: destination CIDRs never captured. An IPv4 CIDR is stored v4-mapped
/// with its prefix length plus 96; an IPv6 one as it is. `enabled == 0` marks an unused
/// slot. The array holds two halves of `capacity::EXCLUDES` slots; `EXCLUDES_GEN` says
/// which one is in force (`excludes_match`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExcludeCidr {
    pub ip: Ip,
    /// The netmask of `prefix_len` (network order words), written by the agent: the
    /// programs match without branches (each branch would multiply the paths the
    /// verifier walks over 16 slots and 4 read attempts).
    pub mask: Ip,
    /// 0-128, over the 16-byte address (for the listing).
    pub prefix_len: u32,
    /// Port to exclude on that CIDR, 0 = every port.
    pub port: u32,
    pub enabled: u32,
    pub _pad: u32,
}

impl ExcludeCidr {
    /// An enabled rule for `ip/prefix_len` (a 16-byte prefix), `port` (0: every port).
    pub fn new(ip: Ip, prefix_len: u32, port: u32) -> ExcludeCidr {
        let mut mask = [0; 4];
        for (i, m) in mask.iter_mut().enumerate() {
            *m = prefix_mask(prefix_len.saturating_sub(32 * i as u32)).to_be();
        }
        ExcludeCidr {
            ip,
            mask,
            prefix_len,
            port,
            enabled: 1,
            _pad: 0,
        }
    }

    /// Whether `ip` and `port` (host order) fall in this entry.
    #[inline(always)]
    pub fn matches(&self, ip: &Ip, port: u16) -> bool {
        let m = &self.mask;
        let diff = ((ip[0] ^ self.ip[0]) & m[0])
            | ((ip[1] ^ self.ip[1]) & m[1])
            | ((ip[2] ^ self.ip[2]) & m[2])
            | ((ip[3] ^ self.ip[3]) & m[3]);
        self.enabled != 0 && (self.port == 0 || self.port == port as u32) && diff == 0
    }
}

/// Whether two addresses are equal, without branches (see `ExcludeCidr::mask`).
#[inline(always)]
pub fn ip_eq(a: &Ip, b: &Ip) -> bool {
    ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])) == 0
}

/// First slot of the `EXCLUDES` half in force for generation `gen` (`EXCLUDES_GEN[0]`).
#[inline(always)]
pub fn exclude_half(gen: u32) -> u32 {
    (gen & 1) * crate::capacity::EXCLUDES
}

/// Reads of `EXCLUDES` tried before giving up on a writer that keeps flipping halves.
pub const EXCLUDE_READ_ATTEMPTS: u32 = 4;

/// Whether `ip:port` is excluded by the rule set in force, or `None` if every attempt
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
    ip: &Ip,
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
                    if e.matches(ip, port) {
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
/// accepted socket's fd. sk_msg keeps each sender's fallback state here, and takes its
/// own and its peer's `SOCKHASH` keys' namespaces from it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    /// The original destination (port host order).
    pub orig_ip: Ip,
    pub orig_port: u32,
    /// `flow_flags::*`.
    pub flags: u32,
    pub src_id: u32,
    pub dst_id: u32,
    /// `fallback::*` of this socket as a sender; 0 while its sends may be redirected.
    pub fallback: u32,
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
    /// The network-namespace cookie of the flow's client (connect4/6 read it; the
    /// accepting end copies it from `FLOWS`): for the decision log and the listing.
    pub netns: u64,
    /// This socket's own network namespace (the first word of its `SOCKHASH` key).
    pub own_netns: u64,
    /// The namespace of the other local end of the flow (the accepting socket's, as the
    /// client names it: the proxy's or the destination pod's; the client's, on the
    /// accepting socket): the first word of the peer's `SOCKHASH` key, which sk_msg
    /// redirects to.
    pub peer_netns: u64,
    /// Telemetry of a direct-mode end (`tel_flags::COUNTED`), which no proxy sees: bytes
    /// of this socket's sends that sk_msg redirected to the peer (counted at the verdict,
    /// under the sender's socket lock).
    pub redirected: u64,
    /// CLOCK_MONOTONIC nanoseconds at ESTABLISHED (the flow's duration at close).
    pub opened_ns: u64,
}

impl SockState {
    /// The original destination.
    pub fn orig_dst(&self) -> core::net::SocketAddr {
        core::net::SocketAddr::new(ip_addr(self.orig_ip), self.orig_port as u16)
    }
}

/// A TCP connection as seen from one socket, with a network namespace: the `SOCKHASH`
/// key (each socket under its own namespace and its own (local, remote) view) and the
/// `FLOWS` key (the namespace of the socket that *accepts* the flow, which the client
/// side names and the accepting side knows as its own, with the client's view). Keys of
/// two namespaces holding the same addresses never collide.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockKey {
    pub netns: u64,
    pub local_ip: Ip,
    pub remote_ip: Ip,
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u32,
}

impl SockKey {
    /// The key of `local` -> `remote` in namespace `netns` (IPv4 v4-mapped).
    pub fn new(netns: u64, local: core::net::SocketAddr, remote: core::net::SocketAddr) -> Self {
        SockKey {
            netns,
            local_ip: ip_from(local.ip()),
            remote_ip: ip_from(remote.ip()),
            local_port: local.port(),
            remote_port: remote.port(),
            _pad: 0,
        }
    }

    /// The same connection as seen from the other end (the namespace is kept: set the
    /// other end's with `in_netns`).
    #[inline(always)]
    pub fn reversed(&self) -> SockKey {
        SockKey {
            netns: self.netns,
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            local_port: self.remote_port,
            remote_port: self.local_port,
            _pad: 0,
        }
    }

    /// The same view in namespace `netns`.
    #[inline(always)]
    pub fn in_netns(&self, netns: u64) -> SockKey {
        SockKey { netns, ..*self }
    }

    pub fn local(&self) -> core::net::SocketAddr {
        core::net::SocketAddr::new(ip_addr(self.local_ip), self.local_port)
    }

    pub fn remote(&self) -> core::net::SocketAddr {
        core::net::SocketAddr::new(ip_addr(self.remote_ip), self.remote_port)
    }
}

/// `FLOWS` value, keyed by the accepting side's namespace and the client's view: the
/// original destination of a captured connection (read by the proxy after `accept`) and
/// how it is carried.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowInfo {
    pub orig_ip: Ip,
    pub orig_port: u32,
    /// `flow_flags::*`.
    pub flags: u32,
    pub src_id: u32,
    pub dst_id: u32,
    /// The client's network-namespace cookie (for an upstream leg, the proxy's).
    pub netns: u64,
}

impl FlowInfo {
    /// The original destination.
    pub fn orig_dst(&self) -> core::net::SocketAddr {
        core::net::SocketAddr::new(ip_addr(self.orig_ip), self.orig_port as u16)
    }
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
    /// The flow's `FLOWS` key: the accepting side's namespace, the client's view (local =
    /// client).
    pub key: SockKey,
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
    /// Egress mode: `target` is P_u, and this is P_u's `snd_base` plus every byte the
    /// relay put into P_u (`P_u.write_seq - reader_base`: what the proxy wrote there).
    pub reader_base: u32,
    /// `relay_state::*`.
    pub state: u32,
    /// Times this sender left the relay for the proxied path (the target's queue full).
    pub fallbacks: u32,
    /// Times it came back (the first switch not counted).
    pub recoveries: u32,
    /// Bytes this sender moved straight into `target`.
    pub relayed: u64,
    /// Egress mode (`relay_mode::EGRESS`) only: the size of this sender's last message
    /// relayed (its push into `target` completes after sk_msg returns, so `relayed`
    /// counts it at the next message, from `target`'s `write_seq`; the proxy adds this at
    /// the end of the flow).
    pub last: u32,
    /// Egress mode only: `target`'s `write_seq` when `relayed` was last brought up to
    /// date (while on, only the relay writes into `target`).
    pub seq: u32,
}

/// `RELAY_BACK` value, keyed by the proxy's leg P_u (its own view, namespace 0): the
/// egress relay's destination direction (`--kernel-relay egress`). The proxy writes it
/// once, before P_u joins `RELAY_UP`; then only `mesh_relay_back` writes it (under P_u's
/// socket lock), and the proxy reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayBack {
    /// The proxy's client socket P_a under its own view (its `SOCKHASH` key).
    pub target: SockKey,
    /// Bytes the program passed to the proxy (P_u's receive path).
    pub passed: u64,
    /// Bytes the program moved onto P_a's send path.
    pub relayed: u64,
    /// `relay_state::*`.
    pub state: u32,
    /// Times the destination's direction went back to the proxy (P_a's backlog full).
    pub fallbacks: u32,
    /// Times it came back (the first switch not counted).
    pub recoveries: u32,
    pub _pad: u32,
}

/// Whether the proxy's client socket P_a has sent everything that was put on its send
/// path: `pa_sent` (P_a's redirects into the client plus its TCP bytes) covers the
/// proxy's own writes and the program's relayed bytes. Then no byte of the destination
/// waits in P_a's backlog queue and a FIN (or a proxy write) cannot overtake one.
#[inline(always)]
pub fn relay_back_drained(pa_sent: u64, proxy_written: u64, relayed: u64) -> bool {
    pa_sent >= proxy_written + relayed
}

/// `RELAY_ARMED`'s top bit: the proxy does not watch P_u's receive queue (P_u is
/// registered with its epoll without `EPOLLIN`, so the data-ready of each segment
/// `mesh_relay_back` relays wakes no one); a segment the program hands to the proxy then
/// comes with a `RELAY_WAKE` record. The other bits are the proxy's total written.
pub const RELAY_ARMED_QUIET: u64 = 1 << 63;

/// `KERNEL_RELAY` (the eBPF's load-time constant): which kernel relay runs.
pub mod relay_mode {
    /// `--kernel-relay true`: both directions, into the far end's receive queue (S is
    /// paired too).
    pub const INGRESS: u32 = 1;
    /// `--kernel-relay egress`: the client's direction only, onto the send path of the
    /// proxy's leg P_u (S is never in the sockhash).
    pub const EGRESS: u32 = 2;
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
    /// `RelayBack::state` only: the proxy's client socket P_a stopped sending from its
    /// backlog (a hard error, such as the client's reset): the kernel would drop what is
    /// redirected to it, so every segment goes to the proxy, which resets both ends.
    pub const BACK_BROKEN: u32 = 5;
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

/// `INBOUND` value, keyed by a local enrolled workload's IPv4 address (network order, a
/// plain `u32`), and `INBOUND6` value, keyed by its IPv6 address (`Ip`): read by the TC
/// inbound program, written by the agent's inbound manager.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundInfo {
    /// `inbound::*` flags.
    pub flags: u32,
    pub _pad: u32,
}

/// A paired socket closed with bytes redirected to it still unread (`UNREAD_CLOSES`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnreadClose {
    /// `bpf_ktime_get_ns` at the close (CLOCK_MONOTONIC): readers ignore old entries.
    pub at_ns: u64,
    /// Bytes left in the socket's redirect queue (`sk_psock.msg_tot_len`).
    pub unread: u32,
    pub _pad: u32,
}

/// `UNREAD_CLOSES` entries older than this (nanoseconds) are ignored, by the proxy and by
/// TC ingress alike: a reader looks within milliseconds of the close, and a FIN
/// retransmitted later than this is answered by the peer's kernel anyway.
pub const UNREAD_CLOSE_FRESH_NS: u64 = 5_000_000_000;

macro_rules! assert_layout {
    ($t:ty, $size:expr, $align:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $size);
        const _: () = assert!(core::mem::align_of::<$t>() == $align);
    };
}
assert_layout!(WorkloadInfo, 40, 4);
assert_layout!(DestInfo, 16, 8);
assert_layout!(MeshConfig, 56, 8);
assert_layout!(ExcludeCidr, 48, 4);
assert_layout!(SockState, 88, 8);
assert_layout!(RelayInfo, 80, 8);
assert_layout!(RelayBack, 80, 8);
assert_layout!(FlowRecord, 96, 8);
assert_layout!(SockKey, 48, 8);
assert_layout!(FlowInfo, 40, 8);
assert_layout!(ProxyHealth, 16, 8);
assert_layout!(InboundInfo, 8, 4);
assert_layout!(UnreadClose, 16, 8);

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
        RelayInfo,
        RelayBack,
        UnreadClose
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(a: [u8; 4]) -> Ip {
        ip4_mapped(u32::from_ne_bytes(a))
    }

    fn ip6(s: &str) -> Ip {
        ip6_words(s.parse::<core::net::Ipv6Addr>().unwrap().octets())
    }

    #[test]
    fn exclude_matches_cidr_and_port() {
        let e = ExcludeCidr::new(ip([10, 96, 0, 0]), 96 + 12, 0);
        assert!(e.matches(&ip([10, 96, 1, 2]), 80));
        assert!(e.matches(&ip([10, 111, 255, 255]), 80));
        assert!(!e.matches(&ip([10, 112, 0, 1]), 80));
        // A v4 rule never matches a native IPv6 address.
        assert!(!e.matches(&ip6("fd00::a60:102"), 80));
        let p = ExcludeCidr { port: 53, ..e };
        assert!(p.matches(&ip([10, 96, 0, 10]), 53));
        assert!(!p.matches(&ip([10, 96, 0, 10]), 80));
        let off = ExcludeCidr { enabled: 0, ..e };
        assert!(!off.matches(&ip([10, 96, 1, 2]), 80));
    }

    #[test]
    fn exclude_matches_ipv6_prefixes() {
        let e = ExcludeCidr::new(ip6("fd00:10:96::"), 48, 0);
        assert!(e.matches(&ip6("fd00:10:96::1"), 1));
        assert!(e.matches(&ip6("fd00:10:96:ffff::1"), 1));
        assert!(!e.matches(&ip6("fd00:10:97::1"), 1));
        assert!(!e.matches(&ip([10, 96, 0, 1]), 1));
        let host = ExcludeCidr::new(ip6("fd00::5"), 128, 0);
        assert!(host.matches(&ip6("fd00::5"), 1));
        assert!(!host.matches(&ip6("fd00::6"), 1));
        let all = ExcludeCidr::new(ip6("fd00::"), 0, 0);
        assert!(all.matches(&ip6("2001:db8::1"), 1));
    }

    #[test]
    fn addresses_round_trip_and_v4_is_mapped() {
        use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(ip_from(v4), ip([10, 0, 0, 2]));
        assert_eq!(ip_addr(ip_from(v4)), v4);
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 2).to_ipv6_mapped());
        assert_eq!(ip_from(mapped), ip_from(v4));
        let v6 = IpAddr::V6("fd00::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(ip_addr(ip_from(v6)), v6);
        let k = SockKey::new(
            7,
            "10.0.0.2:40000".parse().unwrap(),
            "[fd00::3]:80".parse().unwrap(),
        );
        assert_eq!(k.local(), "10.0.0.2:40000".parse().unwrap());
        assert_eq!(k.remote(), "[fd00::3]:80".parse().unwrap());
        assert_eq!(k.netns, 7);
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
            netns: 9,
            local_ip: [1; 4],
            remote_ip: [2; 4],
            local_port: 3,
            remote_port: 4,
            _pad: 0,
        };
        assert_eq!(
            k.reversed(),
            SockKey {
                netns: 9,
                local_ip: [2; 4],
                remote_ip: [1; 4],
                local_port: 4,
                remote_port: 3,
                _pad: 0,
            }
        );
        assert_eq!(k.reversed().in_netns(5).netns, 5);
        assert_eq!(k.reversed().reversed(), k);
    }
}
