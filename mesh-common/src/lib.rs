//! The contract between the mesh eBPF programs (`mesh-ebpf`) and the agent (`mesh-agent`):
//! every map key and value (`#[repr(C)]`, no implicit padding, sizes asserted at compile
//! time), the map names, flags, and the registry of datapath counters. Pure decision logic
//! (tuple normalisation, CIDR matching) lives here as plain functions so host unit tests
//! cover what the kernel side runs.
//!
//! Byte order: addresses are kept as the kernel hands them over (network order, in 16-byte
//! `maps::Ip` words with IPv4 v4-mapped; `INBOUND` keeps a plain IPv4 `u32`, so
//! `u32::from_ne_bytes(ip.octets())`, and `INBOUND6` the IPv6 addresses as `maps::Ip`); ports are always host order.
#![no_std]

pub mod maps;

/// Name of each pinned map (the file name under the pin folder, and the BPF map name).
pub mod map_names {
    pub const WORKLOADS: &str = "WORKLOADS";
    pub const DESTS: &str = "DESTS";
    pub const CONFIG: &str = "CONFIG";
    pub const EXCLUDES: &str = "EXCLUDES";
    /// The generation of the `EXCLUDES` double buffer (one `u32`): its parity names the
    /// active half (`maps::exclude_half`).
    pub const EXCLUDES_GEN: &str = "EXCLUDES_GEN";
    /// Per-socket state (`BPF_MAP_TYPE_SK_STORAGE`: dies with its socket, never evicted,
    /// not dumpable; user space reads one entry by a socket fd it holds).
    pub const SOCK_STATE: &str = "SOCK_STATE";
    pub const FLOWS: &str = "FLOWS";
    pub const SOCKHASH: &str = "SOCKHASH";
    pub const STATS: &str = "STATS";
    pub const NODE_ADDRS: &str = "NODE_ADDRS";
    pub const PROXY_HEALTH: &str = "PROXY_HEALTH";
    /// Local enrolled workloads by IPv4 address, for the TC inbound program.
    pub const INBOUND: &str = "INBOUND";
    /// Local enrolled workloads by IPv6 address (`maps::Ip`), for the TC inbound program's
    /// IPv6 path: the same flags as `INBOUND`.
    pub const INBOUND6: &str = "INBOUND6";
    /// Network-namespace cookies asked for by the agent on kernels without
    /// `SO_NETNS_COOKIE` (< 5.14): socket cookie -> netns cookie, filled by connect4.
    pub const NETNS_PROBE: &str = "NETNS_PROBE";
    /// Direct-mode flow records (`maps::FlowRecord`), a ring buffer read by the agent. Not
    /// pinned, like aya-log's `AYA_LOGS`: a ring has one reader, and during a hand-over
    /// two agents run.
    pub const FLOW_EVENTS: &str = "FLOW_EVENTS";
    /// The kernel relay's per-sender entries (`maps::RelayInfo`). Not pinned: after an
    /// agent restart the relayed flows go back to the proxied path (safe: the reader takes
    /// its redirect queue before TCP) and the draining proxy carries them.
    pub const RELAY: &str = "RELAY";
    /// Paired sockets closed with redirected bytes unread (`maps::UnreadClose`, by the
    /// closing socket's view, namespace 0), written by `mesh_close_unread` before the
    /// kernel sends their FIN; the proxy consumes an entry when it reads that FIN and
    /// resets the other side. Not pinned: its entries live for milliseconds.
    pub const UNREAD_CLOSES: &str = "UNREAD_CLOSES";
    /// When `mesh_close_unread` last wrote an `UNREAD_CLOSES` entry (`bpf_ktime_get_ns`,
    /// one `u64`; 0: never), in a memory-mappable array the proxy reads without a system
    /// call: while it is older than an entry stays fresh, a FIN the proxy reads needs no
    /// look-up. Not pinned, as `UNREAD_CLOSES`.
    pub const UNREAD_LAST: &str = "UNREAD_LAST";
    /// Every pinned map. The one map not pinned is `PEER_SK` (socket storage holding
    /// the kernel address of a sender's peer for the back-pressure check): kernel
    /// pointers never sit in a pinned map.
    /// Each TCP socket's network-namespace cookie, stamped at its creation by the
    /// `cgroup/sock_create` program (`prog_names::SOCK_NETNS`) and copied to the sockets a
    /// listener accepts (socket storage with `BPF_F_CLONE`): how sockops knows an
    /// accepting socket's namespace on kernels where it cannot ask (< 5.15). Not
    /// listable (socket storage); pinned so a stamp outlives an agent restart.
    pub const SOCK_NETNS: &str = "SOCK_NETNS";
    /// Egress kernel relay (`--kernel-relay egress`), the destination's direction: the
    /// proxy's legs P_u of armed flows (a sockhash with `mesh_relay_back` as its stream
    /// verdict; P_u stays in `SOCKHASH` too). Not pinned, not in `ALL`.
    pub const RELAY_UP: &str = "RELAY_UP";
    /// Per armed P_u (its view, namespace 0): `maps::RelayBack`, the program's counts.
    /// Not pinned.
    pub const RELAY_BACK: &str = "RELAY_BACK";
    /// Per armed P_u (its view, namespace 0): the bytes the proxy read from P_u and wrote
    /// to P_a, published when it holds none of them (the only writer: the proxy). Not
    /// pinned.
    pub const RELAY_ARMED: &str = "RELAY_ARMED";
    /// The egress relay's wake-ups (a ring buffer of P_u keys, `maps::SockKey`):
    /// `mesh_relay_back` writes one when it hands a segment to a proxy that is not
    /// watching P_u's receive queue (`maps::RELAY_ARMED_QUIET`). Not pinned, as
    /// `FLOW_EVENTS`.
    pub const RELAY_WAKE: &str = "RELAY_WAKE";
    pub const ALL: [&str; 15] = [
        WORKLOADS,
        DESTS,
        CONFIG,
        EXCLUDES,
        EXCLUDES_GEN,
        SOCK_STATE,
        FLOWS,
        SOCKHASH,
        STATS,
        NODE_ADDRS,
        PROXY_HEALTH,
        INBOUND,
        NETNS_PROBE,
        SOCK_NETNS,
        INBOUND6,
    ];
}

/// Program names as they appear in `bpftool prog show` (kernel truncates to 15 bytes).
pub mod prog_names {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const CONNECT6: &str = "mesh_connect6";
    pub const SOCKOPS: &str = "mesh_sockops";
    pub const SK_MSG: &str = "mesh_sk_msg";
    pub const GETPEERNAME4: &str = "mesh_peername4";
    pub const GETPEERNAME6: &str = "mesh_peername6";
    /// TC ingress on each capturing pod's interface (attached per pod, not per cgroup).
    pub const TC_INGRESS: &str = "mesh_tc_ingress";
    /// `cgroup/sock_create`: stamps each new TCP socket with its namespace (`SOCK_NETNS`).
    /// Loaded on every kernel; attached only where sockops cannot read a socket's
    /// namespace itself (< 5.15).
    pub const SOCK_NETNS: &str = "mesh_sock_netns";
    /// `tp_btf/inet_sock_set_state`: notes a paired socket closed with redirected bytes
    /// unread (`map_names::UNREAD_CLOSES`). Loaded and attached where the kernel has
    /// `sk_psock.msg_tot_len` (6.9+); not in `ALL` (no cgroup link).
    pub const CLOSE_UNREAD: &str = "mesh_close_unread";
    /// `sk_skb/stream_verdict` on `RELAY_UP` (`--kernel-relay egress` only): the
    /// destination's bytes arriving at the proxy's leg go onto the proxy's client socket's
    /// send path. Not in `ALL` (no cgroup link).
    pub const RELAY_BACK: &str = "mesh_relay_back";
    pub const ALL: [&str; 8] = [
        CONNECT4,
        CONNECT6,
        SOCKOPS,
        SK_MSG,
        GETPEERNAME4,
        GETPEERNAME6,
        TC_INGRESS,
        SOCK_NETNS,
    ];
}

/// Inbound capture: the ports of the agent's listeners inside each capturing pod's network
/// namespace (ztunnel's numbers), and `InboundInfo::flags`.
pub mod inbound {
    /// Plaintext inbound: the TC program assigns captured connections to this listener.
    pub const PLAIN_PORT: u16 = 15006;
    /// HBONE (mTLS, HTTP/2 CONNECT): reached directly, never redirected.
    pub const HBONE_PORT: u16 = 15008;
    /// The workload is enrolled: as a source, its connections were already handled by the
    /// connect hooks (proxied ones arrive from the node, direct ones stay direct).
    pub const ENROLLED: u32 = 1 << 0;
    /// The agent's listeners are open in the workload's network namespace and the TC
    /// program is (being) attached there: connections to it are captured.
    pub const CAPTURE: u32 = 1 << 1;
    pub const NAMES: [(u32, &str); 2] = [(ENROLLED, "enrolled"), (CAPTURE, "capture")];
}

/// Capacities of the maps (entries).
pub mod capacity {
    pub const WORKLOADS: u32 = 4096;
    pub const DESTS: u32 = 16384;
    /// Exclusion rules in force at once.
    pub const EXCLUDES: u32 = 16;
    /// Slots of the `EXCLUDES` array: two halves of `EXCLUDES` (double buffer, see
    /// `maps::excludes_match`).
    pub const EXCLUDE_SLOTS: u32 = 2 * EXCLUDES;
    /// Default size of `FLOWS` (an LRU cache: the listing of live flows and the hand-off
    /// to the accepting socket; the agent may load it smaller or larger, `--flows-capacity`).
    pub const FLOWS: u32 = 131072;
    /// Default size of `SOCKHASH` (`--sockhash-capacity`): paired sockets, two per flow.
    pub const SOCKHASH: u32 = 131072;
    /// The node's own IPv4 addresses (a node with more, say kube-proxy in IPVS mode with a
    /// ClusterIP per service on `kube-ipvs0`, has that interface skipped: see
    /// docs/security.md).
    pub const NODE_ADDRS: u32 = 1024;
    /// Local enrolled workloads (`INBOUND`), as `WORKLOADS`.
    pub const INBOUND: u32 = 4096;
    /// Netns-cookie probes in flight (the agent resolves one namespace at a time).
    pub const NETNS_PROBE: u32 = 64;
    /// Kernel-relayed flows' ends (`RELAY`, two per flow) when `--kernel-relay` is on
    /// (otherwise the map is loaded with one entry). Full: the proxy relays the flow in
    /// user space, as without the flag.
    pub const RELAY: u32 = 16384;
    /// `FLOW_EVENTS` size in bytes (a power of two, page multiple): 256 KiB hold about
    /// 2,500 records (96 bytes plus an 8-byte header each). A full ring drops records,
    /// counted as `telemetry_dropped`.
    pub const FLOW_EVENTS_BYTES: u32 = 256 * 1024;
    /// The programs wake `FLOW_EVENTS`' reader only when its unread data crosses a multiple
    /// of this (an eighth of the ring: about 315 records of 96 bytes plus the header); the
    /// reader also drains the ring every `FLOW_EVENTS_DRAIN_MS`.
    pub const FLOW_EVENTS_WAKE_BYTES: u32 = FLOW_EVENTS_BYTES / 8;
    /// How often `FLOW_EVENTS`' reader drains the ring without being woken (ms).
    pub const FLOW_EVENTS_DRAIN_MS: u64 = 100;
    /// `RELAY_WAKE` size in bytes with the egress relay's destination direction on (a
    /// record is a 48-byte key plus the 8-byte header: about 1,170 flows woken at once; a
    /// record is written only when a quiet flow's segment goes to the proxy, and a quiet
    /// flow also looks on its own slow timer, so a dropped record delays, never loses).
    pub const RELAY_WAKE_BYTES: u32 = 64 * 1024;
    /// Paired sockets closed with bytes unread, not yet seen by the proxy
    /// (`UNREAD_CLOSES`, LRU: the proxy reads each entry within milliseconds).
    pub const UNREAD_CLOSES: u32 = 4096;
}

/// `WorkloadInfo::flags` and `DestInfo::flags`.
pub mod wl_flags {
    /// Outbound connections from this workload are captured.
    pub const ENROLLED: u32 = 1 << 0;
    /// As a destination: same-node flows from enrolled workloads skip the proxy and are
    /// paired socket to socket in the kernel.
    pub const DIRECT: u32 = 1 << 1;
    /// Fail closed: while the proxy cannot take this workload's connections (not ready,
    /// or its heartbeat is stale), they are refused instead of going around the mesh; and
    /// the proxy refuses them while their configuration is unknown.
    pub const FAIL_CLOSED: u32 = 1 << 2;
    /// Bypass: this workload's connections are left alone (namespace or pod switch).
    pub const BYPASS: u32 = 1 << 3;
    pub const NAMES: [(u32, &str); 4] = [
        (ENROLLED, "enrolled"),
        (DIRECT, "direct"),
        (FAIL_CLOSED, "fail_closed"),
        (BYPASS, "bypass"),
    ];
}

/// `MeshConfig::flags`.
pub mod cfg_flags {
    /// Global bypass: nothing is captured, every connection goes direct.
    pub const BYPASS: u32 = 1 << 0;
    /// The node proxy's outbound listener accepts connections; until then, fail open.
    pub const PROXY_READY: u32 = 1 << 1;
    /// Pair app and proxy sockets with sk_msg (off: captured flows cross the TCP stack).
    pub const SKMSG: u32 = 1 << 2;
    /// Never pair sockets (no sk_msg short-circuit, direct mode over TCP): set on kernels
    /// without the back-pressure check (< 6.9), where a redirect could queue into a slow
    /// reader without a limit, unless the operator accepts that.
    pub const NO_PAIRING: u32 = 1 << 3;
    pub const NAMES: [(u32, &str); 4] = [
        (BYPASS, "bypass"),
        (PROXY_READY, "proxy_ready"),
        (SKMSG, "skmsg"),
        (NO_PAIRING, "no_pairing"),
    ];
}

/// `MeshConfig::log_level`: the decision log's levels, numbered as `aya_log_common::Level`
/// (so a record's level compares with them directly). Off is the default: the programs
/// then pay one load and one branch at a decision, and format nothing.
pub mod log_level {
    pub const OFF: u32 = 0;
    pub const ERROR: u32 = 1;
    pub const WARN: u32 = 2;
    pub const INFO: u32 = 3;
    /// Per-connection decisions: captured, direct, excluded and why, paired, fell back.
    pub const DEBUG: u32 = 4;
    /// Also connections of sockets that are not enrolled, and other stream protocols.
    pub const TRACE: u32 = 5;
    pub const NAMES: [(u32, &str); 6] = [
        (OFF, "off"),
        (ERROR, "error"),
        (WARN, "warn"),
        (INFO, "info"),
        (DEBUG, "debug"),
        (TRACE, "trace"),
    ];

    /// Whether a record at `level` is wanted when the map says `current`.
    #[inline(always)]
    pub fn enabled(current: u32, level: u32) -> bool {
        level != OFF && level <= current
    }
}

/// The decision log's record codes. A record of the programs starts with one: the index of
/// a `Stat` (the decision also counted under that name) or one of the log-only codes below;
/// the agent shows it as `name: why` (`describe`), so the programs carry one format per
/// record shape rather than one text per decision.
pub mod decision {
    use super::Stat;

    /// sockops, a captured client's socket established: its flow recorded (proxied).
    pub const FLOW_RECORDED_PROXIED: u32 = 1000;
    /// The same, direct mode.
    pub const FLOW_RECORDED_DIRECT: u32 = 1001;
    /// sockops, the accepting end found its flow and took it over.
    pub const FLOW_ACCEPTED: u32 = 1002;
    /// sockops, the node proxy's own leg to a local destination established.
    pub const UPSTREAM_ESTABLISHED: u32 = 1003;
    /// connect4/6 with the node-wide bypass on (`connect_bypass`, trace).
    pub const NODE_BYPASS: u32 = 1004;
    /// sk_msg, a sender following the other direction onto TCP (`msg_pass_backpressure`).
    pub const BACKPRESSURE_FOLLOWED: u32 = 1005;

    /// `(name, why)` of a record code; `None` for a code this build does not know.
    pub fn describe(code: u32) -> Option<(&'static str, &'static str)> {
        Some(match code {
            FLOW_RECORDED_PROXIED => ("flow_recorded", "proxied client established"),
            FLOW_RECORDED_DIRECT => ("flow_recorded", "direct client established"),
            FLOW_ACCEPTED => ("flow_accepted", "the accepting end took the flow over"),
            UPSTREAM_ESTABLISHED => (
                "upstream_established",
                "the node proxy's leg to a local destination",
            ),
            NODE_BYPASS => ("connect_bypass", "not captured, the node-wide bypass is on"),
            BACKPRESSURE_FOLLOWED => (
                "msg_pass_backpressure",
                "fell back to TCP, following the other direction",
            ),
            c if c < Stat::COUNT => {
                let s = Stat::ALL[c as usize];
                (s.name(), s.why())
            }
            _ => return None,
        })
    }
}

/// Values of `SockState::fallback`: why a sender's messages take the TCP path.
pub mod fallback {
    /// The peer was not in the sockhash: for good.
    pub const NO_PEER: u32 = 1;
    /// The peer's redirect queue was full: until everything sent over TCP has been read
    /// and the queue has drained (`msg_fallback_recovered`).
    pub const BACKPRESSURE: u32 = 2;
    /// A node proxy socket of a kernel-relayed flow (`--kernel-relay`): its sends always
    /// take TCP, so the reader's `copied_seq` counts every byte the proxy passed on (set
    /// by the proxy through the socket's storage before it sends anything).
    pub const RELAY_LEG: u32 = 3;
    pub const NAMES: [(u32, &str); 3] = [
        (NO_PEER, "no_peer"),
        (BACKPRESSURE, "backpressure"),
        (RELAY_LEG, "relay_leg"),
    ];
}

/// `FlowInfo::flags`.
pub mod flow_flags {
    /// The client was redirected to the node proxy.
    pub const PROXIED: u32 = 1 << 0;
    /// Direct mode: client and server talk socket to socket.
    pub const DIRECT: u32 = 1 << 1;
    /// The client socket is in the sockhash.
    pub const CLIENT_PAIRED: u32 = 1 << 2;
    /// The server (or proxy) socket is in the sockhash: sk_msg short-circuits the flow.
    pub const SERVER_PAIRED: u32 = 1 << 3;
    /// The client side socket was created as AF_INET6 (v4-mapped addresses).
    pub const CLIENT_V6: u32 = 1 << 4;
    /// The node proxy's own connection to a local destination (written by the proxy before
    /// it connects, so sockops pairs both ends of the second leg too).
    pub const UPSTREAM: u32 = 1 << 5;
    /// The client's workload fails closed (copied from `wl_flags::FAIL_CLOSED`).
    pub const FAIL_CLOSED: u32 = 1 << 6;
    /// A sender of this flow moved to the TCP path (`fallback::*`): set in `FLOWS` by
    /// sk_msg for the listing, the per-socket truth is in `SOCK_STATE`.
    pub const CLIENT_FALLBACK: u32 = 1 << 7;
    pub const SERVER_FALLBACK: u32 = 1 << 8;
    /// `SockState` only: this socket is the accepting end of the flow (the proxy's, or the
    /// destination pod's in direct mode).
    pub const SERVER_SIDE: u32 = 1 << 9;
    /// `SockState` only: sockops recorded the flow in `FLOWS` for this client socket (so a
    /// missing entry at close means the LRU evicted it: `flow_evicted`).
    pub const RECORDED: u32 = 1 << 10;
    pub const NAMES: [(u32, &str); 11] = [
        (PROXIED, "proxied"),
        (DIRECT, "direct"),
        (CLIENT_PAIRED, "client_paired"),
        (SERVER_PAIRED, "server_paired"),
        (CLIENT_V6, "client_v6"),
        (UPSTREAM, "upstream"),
        (FAIL_CLOSED, "fail_closed"),
        (CLIENT_FALLBACK, "client_fallback"),
        (SERVER_FALLBACK, "server_fallback"),
        (SERVER_SIDE, "server_side"),
        (RECORDED, "recorded"),
    ];
}

/// `SockState.tel`: telemetry of a direct-mode end (`maps::FlowRecord`).
pub mod tel_flags {
    /// This socket is a counted end of a direct-mode flow (set at ESTABLISHED).
    pub const COUNTED: u32 = 1 << 0;
    /// This socket sent its FIN (it entered FIN_WAIT1 or LAST_ACK).
    pub const FIN_SENT: u32 = 1 << 1;
    /// The peer acknowledged that FIN (it counts one in `bytes_acked`).
    pub const FIN_ACKED: u32 = 1 << 2;
    /// The close record was written (or dropped): never twice.
    pub const CLOSED: u32 = 1 << 3;
}

/// `FlowRecord.kind`.
pub mod flow_record {
    /// A direct-mode client's connection is established (and paired when it could be).
    pub const OPENED: u32 = 1;
    /// The client end closed: its sent bytes are the request direction. One per flow:
    /// the `closed` count.
    pub const CLIENT_CLOSED: u32 = 2;
    /// The accepting end closed: its sent bytes are the response direction. Not written
    /// when it sent nothing.
    pub const SERVER_CLOSED: u32 = 3;
}

/// TCP payload bytes acknowledged, from `bpf_sock_ops.bytes_acked` at close (which counts
/// sequence numbers): the value at ESTABLISHED (`base`, the handshake's share) and our
/// FIN, when it was acknowledged, taken off.
#[inline(always)]
pub fn tcp_payload(now: u64, base: u32, fin: bool) -> u64 {
    now.saturating_sub(base as u64).saturating_sub(fin as u64)
}

/// Renders `flags` as `a|b|c` with the names of a flags module.
pub fn flag_names(
    flags: u32,
    names: &[(u32, &'static str)],
    out: &mut [&'static str; 12],
) -> usize {
    let mut n = 0;
    for (bit, name) in names {
        if flags & bit != 0 && n < out.len() {
            out[n] = name;
            n += 1;
        }
    }
    n
}

/// One registry of datapath events and verdict reasons. The eBPF side bumps a per-CPU
/// counter at each index; the agent exports them as `mesh_datapath_events_total{event=..}`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    ConnectSeen = 0,
    ConnectRedirected,
    ConnectDirect,
    ConnectNotEnrolled,
    ConnectExcluded,
    ConnectBypass,
    ConnectProxyNotReady,
    ConnectToProxy,
    ConnectNotIpv4,
    ConnectOrigStoreFailed,
    SockopsClientPaired,
    SockopsServerPaired,
    SockhashUpdateFailed,
    FlowStoreFailed,
    FlowClosed,
    MsgRedirected,
    MsgRedirectedBytes,
    MsgPassNoPeer,
    MsgPassUnpaired,
    MsgPassBackpressure,
    MsgPassFallback,
    ConnectLocalScope,
    ConnectNodeAddress,
    ConnectProxyStale,
    ConnectRefused,
    /// Every read of `EXCLUDES` raced with the agent rewriting it; the connection was
    /// treated as not excluded (captured).
    ConnectExcludesRaced,
    /// A workload connecting to its own address (left alone: also how the agent's own
    /// in-pod delivery sockets reach the application).
    ConnectSelf,
    /// TC ingress: TCP packets looked at (IPv4, and IPv6 with the extension headers it walks).
    TcSeen,
    /// A new connection assigned to the in-pod plaintext listener.
    TcAssigned,
    /// A packet of a connection that already has a socket (established, handshaking,
    /// time-wait): passed.
    TcPassEstablished,
    /// To the agent's own ports (15006, 15008): passed.
    TcPassMeshPort,
    /// From one of the node's addresses (the node proxy, kubelet probes): passed.
    TcPassNodeSource,
    /// From a local enrolled workload (its outbound was handled by the connect hooks).
    TcPassMeshSource,
    /// To an address without capture (not an enrolled pod, or capture off): passed.
    TcPassNotCaptured,
    /// No in-pod listener found (the agent is not running): passed, fail open.
    TcNoListener,
    /// `bpf_sk_assign` failed: passed.
    TcAssignFailed,
    /// Global bypass: passed.
    TcPassBypass,
    /// A stream socket of another protocol than TCP (SCTP): left alone.
    ConnectNotTcp,
    /// A sender in back-pressure fallback went back to the redirect path: every byte it
    /// sent over TCP was acknowledged and read, and the peer's redirect queue drained.
    MsgFallbackRecovered,
    /// A client socket closed whose `FLOWS` entry was gone: the LRU evicted it to make
    /// room (the listing lost it; the connection kept its state in `SOCK_STATE`).
    FlowEvicted,
    /// A captured socket's `SOCK_STATE` could not be created (kernel memory): the
    /// connection was left alone (fail-open) or refused (fail-closed).
    SockStateFailed,
    /// The accepting end of a flow found no `FLOWS` entry to take over (evicted before
    /// the handshake finished): the proxy resets such a connection.
    FlowHandoffMissed,
    /// A direct-mode flow record could not be written: `FLOW_EVENTS` was full (the agent
    /// reads slower than flows open and close). That flow's counts are missing from the
    /// `istio_tcp_*` series.
    TelemetryDropped,
    /// Kernel relay: a sender of a proxied flow switched to sending straight into the
    /// other end's socket (the first time, per sender).
    RelayStarted,
    /// Kernel relay: a message (and its bytes) moved straight to the other end.
    MsgRelayed,
    MsgRelayedBytes,
    /// Kernel relay: the other end's redirect queue was over its limit; the sender went
    /// back to the proxied path.
    RelayFallback,
    /// Kernel relay: a sender back on the direct path after a fallback.
    RelayRecovered,
    ClosedUnread,
    /// TC ingress: a new IPv6 connection assigned to the in-pod plaintext listener (also
    /// counted in `TcAssigned`).
    TcAssigned6,
    /// TC ingress: an IPv6 packet whose extension headers were not walked to their end
    /// (more than the program walks, or one it does not follow: AH, ESP, mobility, ...):
    /// passed, not captured.
    TcPassIpv6ExtHeader,
    /// TC ingress: an IPv6 packet to a captured pod whose hop-by-hop, routing,
    /// destination-options or fragment headers run past what the program walks, while the
    /// agent's listener is there: dropped (a bypass of capture otherwise).
    TcDropIpv6ExtChain,
    /// TC ingress: a FIN from a paired socket that closed with bytes unread
    /// (`UNREAD_CLOSES`), to a pod whose socket of that connection is still open,
    /// rewritten into an RST (a direct-mode peer then reads a reset, as over plain TCP).
    TcFinToRst,
    /// Egress kernel relay, the destination's direction (`mesh_relay_back`): a segment
    /// the destination sent to the proxy's leg P_u moved onto the send path of the
    /// proxy's client socket P_a in the kernel (the proxy never read it), and its bytes.
    SkbRelayed,
    SkbRelayedBytes,
    /// Egress kernel relay, the destination's direction: a segment went to a proxy that
    /// was not watching P_u's receive queue (`maps::RELAY_ARMED_QUIET`), which a
    /// `RELAY_WAKE` record wakes; and such a record lost to a full ring (the proxy then
    /// finds the segment at its own slow look).
    RelayWake,
    RelayWakeDropped,
}

impl Stat {
    pub const COUNT: u32 = 57;
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Stat::ConnectSeen,
        Stat::ConnectRedirected,
        Stat::ConnectDirect,
        Stat::ConnectNotEnrolled,
        Stat::ConnectExcluded,
        Stat::ConnectBypass,
        Stat::ConnectProxyNotReady,
        Stat::ConnectToProxy,
        Stat::ConnectNotIpv4,
        Stat::ConnectOrigStoreFailed,
        Stat::SockopsClientPaired,
        Stat::SockopsServerPaired,
        Stat::SockhashUpdateFailed,
        Stat::FlowStoreFailed,
        Stat::FlowClosed,
        Stat::MsgRedirected,
        Stat::MsgRedirectedBytes,
        Stat::MsgPassNoPeer,
        Stat::MsgPassUnpaired,
        Stat::MsgPassBackpressure,
        Stat::MsgPassFallback,
        Stat::ConnectLocalScope,
        Stat::ConnectNodeAddress,
        Stat::ConnectProxyStale,
        Stat::ConnectRefused,
        Stat::ConnectExcludesRaced,
        Stat::ConnectSelf,
        Stat::TcSeen,
        Stat::TcAssigned,
        Stat::TcPassEstablished,
        Stat::TcPassMeshPort,
        Stat::TcPassNodeSource,
        Stat::TcPassMeshSource,
        Stat::TcPassNotCaptured,
        Stat::TcNoListener,
        Stat::TcAssignFailed,
        Stat::TcPassBypass,
        Stat::ConnectNotTcp,
        Stat::MsgFallbackRecovered,
        Stat::FlowEvicted,
        Stat::SockStateFailed,
        Stat::FlowHandoffMissed,
        Stat::TelemetryDropped,
        Stat::RelayStarted,
        Stat::MsgRelayed,
        Stat::MsgRelayedBytes,
        Stat::RelayFallback,
        Stat::RelayRecovered,
        Stat::ClosedUnread,
        Stat::TcAssigned6,
        Stat::TcPassIpv6ExtHeader,
        Stat::TcDropIpv6ExtChain,
        Stat::TcFinToRst,
        Stat::SkbRelayed,
        Stat::SkbRelayedBytes,
        Stat::RelayWake,
        Stat::RelayWakeDropped,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Stat::ConnectSeen => "connect_seen",
            Stat::ConnectRedirected => "connect_redirected",
            Stat::ConnectDirect => "connect_direct",
            Stat::ConnectNotEnrolled => "connect_not_enrolled",
            Stat::ConnectExcluded => "connect_excluded",
            Stat::ConnectBypass => "connect_bypass",
            Stat::ConnectProxyNotReady => "connect_proxy_not_ready",
            Stat::ConnectToProxy => "connect_to_proxy",
            Stat::ConnectNotIpv4 => "connect_not_ipv4",
            Stat::ConnectOrigStoreFailed => "connect_orig_store_failed",
            Stat::SockopsClientPaired => "sockops_client_paired",
            Stat::SockopsServerPaired => "sockops_server_paired",
            Stat::SockhashUpdateFailed => "sockhash_update_failed",
            Stat::FlowStoreFailed => "flow_store_failed",
            Stat::FlowClosed => "flow_closed",
            Stat::MsgRedirected => "msg_redirected",
            Stat::MsgRedirectedBytes => "msg_redirected_bytes",
            Stat::MsgPassNoPeer => "msg_pass_no_peer",
            Stat::MsgPassUnpaired => "msg_pass_unpaired",
            Stat::MsgPassBackpressure => "msg_pass_backpressure",
            Stat::MsgPassFallback => "msg_pass_fallback",
            Stat::ConnectLocalScope => "connect_local_scope",
            Stat::ConnectNodeAddress => "connect_node_address",
            Stat::ConnectProxyStale => "connect_proxy_stale",
            Stat::ConnectRefused => "connect_refused",
            Stat::ConnectExcludesRaced => "connect_excludes_raced",
            Stat::ConnectSelf => "connect_self",
            Stat::TcSeen => "tc_seen",
            Stat::TcAssigned => "tc_assigned",
            Stat::TcPassEstablished => "tc_pass_established",
            Stat::TcPassMeshPort => "tc_pass_mesh_port",
            Stat::TcPassNodeSource => "tc_pass_node_source",
            Stat::TcPassMeshSource => "tc_pass_mesh_source",
            Stat::TcPassNotCaptured => "tc_pass_not_captured",
            Stat::TcNoListener => "tc_no_listener",
            Stat::TcAssignFailed => "tc_assign_failed",
            Stat::TcPassBypass => "tc_pass_bypass",
            Stat::ConnectNotTcp => "connect_not_tcp",
            Stat::MsgFallbackRecovered => "msg_fallback_recovered",
            Stat::FlowEvicted => "flow_evicted",
            Stat::SockStateFailed => "sock_state_failed",
            Stat::FlowHandoffMissed => "flow_handoff_missed",
            Stat::TelemetryDropped => "telemetry_dropped",
            Stat::RelayStarted => "relay_started",
            Stat::MsgRelayed => "msg_relayed",
            Stat::MsgRelayedBytes => "msg_relayed_bytes",
            Stat::RelayFallback => "relay_fallback",
            Stat::RelayRecovered => "relay_recovered",
            Stat::ClosedUnread => "closed_unread",
            Stat::TcAssigned6 => "tc_assigned6",
            Stat::TcPassIpv6ExtHeader => "tc_pass_ipv6_ext_header",
            Stat::TcDropIpv6ExtChain => "tc_drop_ipv6_ext_chain",
            Stat::TcFinToRst => "tc_fin_to_rst",
            Stat::SkbRelayed => "skb_relayed",
            Stat::SkbRelayedBytes => "skb_relayed_bytes",
            Stat::RelayWake => "relay_wake",
            Stat::RelayWakeDropped => "relay_wake_dropped",
        }
    }
}

impl Stat {
    /// What the decision means, for the decision log (`decision::describe`).
    pub const fn why(self) -> &'static str {
        match self {
            Stat::ConnectSeen => "a TCP connect seen",
            Stat::ConnectRedirected => "captured, sent to the node proxy",
            Stat::ConnectDirect => {
                "captured, direct mode (same-node destination, paired socket to socket)"
            }
            Stat::ConnectNotEnrolled => {
                "not captured, the network namespace is not an enrolled workload's"
            }
            Stat::ConnectExcluded => "not captured, an exclusion rule (--exclude) matches",
            Stat::ConnectBypass => "not captured, the workload (or its namespace) is bypassed",
            Stat::ConnectProxyNotReady => {
                "not captured, the node proxy is not ready (fail open)"
            }
            Stat::ConnectToProxy => "not captured, already to the node proxy",
            Stat::ConnectNotIpv4 => "left alone, native IPv6 is not captured (no IPv6 proxy listener, --proxy-redirect6)",
            Stat::ConnectOrigStoreFailed => "the original destination could not be stored",
            Stat::SockopsClientPaired => "client socket paired",
            Stat::SockopsServerPaired => "accepting socket paired",
            Stat::SockhashUpdateFailed => {
                "not paired (SOCKHASH full, or the slot taken), the flow stays on TCP"
            }
            Stat::FlowStoreFailed => {
                "FLOWS refused the record (an entry with the same addresses exists, or no memory): the accepting end will not find it"
            }
            Stat::FlowClosed => "flow closed",
            Stat::MsgRedirected => "message redirected",
            Stat::MsgRedirectedBytes => "bytes redirected",
            Stat::MsgPassNoPeer => {
                "fell back to TCP for good, the peer socket is not in SOCKHASH"
            }
            Stat::MsgPassUnpaired => "a message of an unpaired socket",
            Stat::MsgPassBackpressure => {
                "fell back to TCP, the reader's redirect queue is over its limit"
            }
            Stat::MsgPassFallback => "a message on the TCP path (fallback)",
            Stat::ConnectLocalScope => {
                "not captured, a this-host or this-link address (loopback, link-local, multicast)"
            }
            Stat::ConnectNodeAddress => "not captured, one of the node's own addresses",
            Stat::ConnectProxyStale => {
                "not captured, the node proxy's heartbeat is stale (fail open)"
            }
            Stat::ConnectRefused => "refused (fail closed), the node proxy cannot take it",
            Stat::ConnectExcludesRaced => {
                "the exclusion rules changed under every read; captured"
            }
            Stat::ConnectSelf => "not captured, the workload calls its own address",
            Stat::TcSeen => "an inbound packet seen",
            Stat::TcAssigned => "inbound captured, assigned to the agent's in-pod listener",
            Stat::TcPassEstablished => "inbound packet of a connection that has a socket",
            Stat::TcPassMeshPort => "inbound to the agent's own ports",
            Stat::TcPassNodeSource => "inbound from one of the node's addresses",
            Stat::TcPassMeshSource => "inbound from a local enrolled workload",
            Stat::TcPassNotCaptured => "inbound to an address without capture",
            Stat::TcNoListener => {
                "inbound not captured, no agent listener in the pod (fail open)"
            }
            Stat::TcAssignFailed => "inbound not captured, bpf_sk_assign failed",
            Stat::TcPassBypass => "inbound not captured, the node-wide bypass is on",
            Stat::ConnectNotTcp => "left alone, a stream protocol other than TCP",
            Stat::MsgFallbackRecovered => "back on the redirect path, the reader caught up",
            Stat::FlowEvicted => {
                "a captured client closed after FLOWS evicted its record (the listing lost it; the connection was not affected)"
            }
            Stat::SockStateFailed => {
                "no socket storage (kernel memory): left alone, or refused when fail-closed"
            }
            Stat::FlowHandoffMissed => {
                "the proxy accepted a connection without a FLOWS record (evicted, or dialled directly): the proxy resets it"
            }
            Stat::TelemetryDropped => {
                "a direct-mode flow record was dropped, FLOW_EVENTS was full (its counts are missing from istio_tcp_*)"
            }
            Stat::RelayStarted => {
                "kernel relay: the sender's bytes now go straight to the other end (nothing of it was in flight)"
            }
            Stat::MsgRelayed => "kernel relay: a message moved straight to the other end",
            Stat::MsgRelayedBytes => "kernel relay: bytes moved straight to the other end",
            Stat::RelayFallback => {
                "kernel relay: the other end's redirect queue is over its limit, back to the proxied path"
            }
            Stat::RelayRecovered => {
                "kernel relay: back on the direct path, the reader caught up"
            }
            Stat::ClosedUnread => {
                "a paired socket closed with redirected bytes unread (UNREAD_CLOSES): the proxy resets the other side (direct mode: TC ingress turns its FIN into a reset)"
            }
            Stat::TcAssigned6 => {
                "inbound IPv6 captured, assigned to the agent's in-pod listener"
            }
            Stat::TcPassIpv6ExtHeader => {
                "inbound IPv6 with extension headers not walked to their end: passed (not captured)"
            }
            Stat::TcDropIpv6ExtChain => {
                "inbound IPv6 to a captured pod behind more extension headers than the TC program walks: dropped"
            }
            Stat::TcFinToRst => {
                "a FIN from a paired socket closed with bytes unread, rewritten into a reset at the receiving pod (UNREAD_CLOSES)"
            }
            Stat::SkbRelayed => {
                "egress kernel relay: the destination's segment moved onto the proxy's client socket in the kernel"
            }
            Stat::SkbRelayedBytes => {
                "egress kernel relay: the destination's bytes moved onto the proxy's client socket in the kernel"
            }
            Stat::RelayWake => {
                "egress kernel relay: a segment of the destination went to a proxy not watching its socket, which a RELAY_WAKE record wakes"
            }
            Stat::RelayWakeDropped => {
                "egress kernel relay: a wake-up record was lost, RELAY_WAKE was full (the reader then wakes every quiet flow)"
            }
        }
    }
}

const _: () = assert!(Stat::ALL.len() == Stat::RelayWakeDropped as usize + 1);

/// Whether the proxy can take connections now: the agent marked it ready, and its
/// heartbeat (`ProxyHealth`, CLOCK_MONOTONIC nanoseconds as `bpf_ktime_get_ns` reads it)
/// is fresh. A zero `stale_after_ns` turns the heartbeat check off.
#[inline(always)]
pub fn proxy_alive(ready: bool, health: &maps::ProxyHealth, now_ns: u64) -> bool {
    ready
        && (health.stale_after_ns == 0
            || now_ns.saturating_sub(health.heartbeat_ns) <= health.stale_after_ns)
}

/// Whether an IPv4 address (network order, as stored) names this host or this link rather
/// than a peer: `0.0.0.0/8` (Linux connects `0.0.0.0` to the local host), loopback
/// `127.0.0.0/8`, link-local `169.254.0.0/16` (cloud metadata, node-local caches), and
/// multicast, reserved and broadcast `224.0.0.0/3`. Such a destination means something
/// different in the node's network namespace than in the pod's, so a connection to it is
/// never captured and the proxy never dials it on a workload's behalf: enrolment must not
/// widen what a pod can reach.
#[inline(always)]
pub fn local_scope_ipv4(ip: u32) -> bool {
    let h = u32::from_be(ip);
    let first = h >> 24;
    first == 0 || first == 127 || h >> 16 == 0xa9fe || first >= 224
}

/// Whether an address (`maps::Ip`) names this host or this link rather than a peer:
/// for IPv4 (v4-mapped) `local_scope_ipv4`; for IPv6 the unspecified `::`, loopback
/// `::1`, link-local `fe80::/10` and multicast `ff00::/8`. Never captured, for the same
/// reason as their IPv4 counterparts.
#[inline(always)]
pub fn local_scope(ip: &maps::Ip) -> bool {
    if let Some(v4) = v4_mapped(*ip) {
        return local_scope_ipv4(v4);
    }
    let first = u32::from_be(ip[0]);
    let zero3 = ip[0] == 0 && ip[1] == 0 && ip[2] == 0;
    (zero3 && (ip[3] == 0 || u32::from_be(ip[3]) == 1))
        || first >> 22 == 0xfe80 >> 6
        || first >> 24 == 0xff
}

/// Extracts the IPv4 address from a v4-mapped IPv6 address (`::ffff:a.b.c.d`), with the
/// words as the kernel stores them (network order per 32-bit word).
#[inline(always)]
pub fn v4_mapped(words: [u32; 4]) -> Option<u32> {
    if words[0] == 0 && words[1] == 0 && words[2] == 0xffff_u32.to_be() {
        Some(words[3])
    } else {
        None
    }
}

/// Converts a port as the kernel stores it in `bpf_sock_ops.remote_port` and
/// `sk_msg_md.remote_port` (network order in the upper half of a little-endian u32 load,
/// i.e. `u32::from_be` gives the host-order port) to host order.
#[inline(always)]
pub fn remote_port_host(raw: u32) -> u16 {
    u32::from_be(raw) as u16
}

/// Converts a host-order port to the form `bpf_sock_addr.user_port` expects (network
/// order in the low 16 bits).
#[inline(always)]
pub fn user_port_raw(port: u16) -> u32 {
    port.to_be() as u32
}

/// Converts `bpf_sock_addr.user_port` to host order.
#[inline(always)]
pub fn user_port_host(raw: u32) -> u16 {
    u16::from_be(raw as u16)
}

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// A socket's `(local, remote)` key in namespace `netns` from the raw context fields
/// (`bpf_sock_ops` and `sk_msg_md` carry the same ones): IPv4 v4-mapped, IPv6 as it is (a
/// dual-stack socket's v4-mapped addresses are then the same key as an AF_INET socket's).
/// Returns the key and whether the socket is AF_INET6, or `None` for other families.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "the context's fields, read up front"
)]
pub fn socket_key(
    netns: u64,
    family: u32,
    local_ip4: u32,
    remote_ip4: u32,
    local_ip6: [u32; 4],
    remote_ip6: [u32; 4],
    local_port: u32,
    remote_port: u32,
) -> Option<(maps::SockKey, bool)> {
    let (local, remote, v6) = match family {
        AF_INET => (
            maps::ip4_mapped(local_ip4),
            maps::ip4_mapped(remote_ip4),
            false,
        ),
        AF_INET6 => (local_ip6, remote_ip6, true),
        _ => return None,
    };
    Some((
        maps::SockKey {
            netns,
            local_ip: local,
            remote_ip: remote,
            local_port: local_port as u16,
            remote_port: remote_port_host(remote_port),
            _pad: 0,
        },
        v6,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_payload_takes_off_the_handshake_and_the_fin() {
        // bytes_acked counts sequence numbers: the SYN (when it counted at ESTABLISHED,
        // base 1) and an acknowledged FIN are not payload.
        assert_eq!(tcp_payload(1 + 4096 + 1, 1, true), 4096);
        assert_eq!(tcp_payload(4096, 0, false), 4096);
        assert_eq!(tcp_payload(1, 1, false), 0);
        // Never below zero (a counter read before the base, a reset socket).
        assert_eq!(tcp_payload(0, 1, true), 0);
    }

    #[test]
    fn socket_key_maps_ipv4_and_keeps_native_v6() {
        let (a, b) = (
            u32::from_ne_bytes([10, 0, 0, 2]),
            u32::from_ne_bytes([10, 0, 0, 3]),
        );
        let port = (u32::from(8080_u16.to_be())) << 16;
        let (k, v6) = socket_key(7, AF_INET, a, b, [0; 4], [0; 4], 40000, port).unwrap();
        assert!(!v6);
        let m = maps::ip4_mapped;
        assert_eq!(
            (
                k.netns,
                k.local_ip,
                k.remote_ip,
                k.local_port,
                k.remote_port
            ),
            (7, m(a), m(b), 40000, 8080)
        );
        // A dual-stack socket's v4-mapped addresses: the same key.
        let (k6, v6) = socket_key(7, AF_INET6, 0, 0, m(a), m(b), 40000, port).unwrap();
        assert!(v6);
        assert_eq!(k6, k);
        let native = [0x20010db8_u32.to_be(), 0, 0, 1_u32.to_be()];
        let (n, _) = socket_key(7, AF_INET6, 0, 0, native, m(b), 40000, port).unwrap();
        assert_eq!(n.local_ip, native);
        assert!(socket_key(7, 1, a, b, [0; 4], [0; 4], 1, 1).is_none());
    }

    #[test]
    fn local_scope_covers_ipv6_this_host_and_this_link() {
        let w = |s: &str| maps::ip6_words(s.parse::<core::net::Ipv6Addr>().unwrap().octets());
        for a in [
            "::",
            "::1",
            "fe80::1",
            "febf::1",
            "ff02::1",
            "ff05::2",
            "::ffff:127.0.0.1",
        ] {
            assert!(local_scope(&w(a)), "{a}");
        }
        for a in [
            "fd00::1",
            "2001:db8::1",
            "fec0::1",
            "::2",
            "::ffff:10.0.0.1",
            "64:ff9b::1",
        ] {
            assert!(!local_scope(&w(a)), "{a}");
        }
    }

    #[test]
    fn v4_mapped_extracts_only_mapped_addresses() {
        let ip = u32::from_ne_bytes([10, 1, 2, 3]);
        assert_eq!(v4_mapped([0, 0, 0xffff_u32.to_be(), ip]), Some(ip));
        assert_eq!(v4_mapped([0, 0, 0, ip]), None);
        assert_eq!(
            v4_mapped([0x20010db8_u32.to_be(), 0, 0xffff_u32.to_be(), ip]),
            None
        );
    }

    #[test]
    fn ports_round_trip() {
        assert_eq!(user_port_host(user_port_raw(15001)), 15001);
        // sock_ops loads the 16-bit big-endian port and shifts it left by 16.
        let raw = (u32::from(8080_u16.to_be())) << 16;
        assert_eq!(remote_port_host(raw), 8080);
    }

    #[test]
    fn flag_names_lists_set_bits() {
        let mut out = [""; 12];
        let n = flag_names(
            flow_flags::PROXIED | flow_flags::SERVER_PAIRED,
            &flow_flags::NAMES,
            &mut out,
        );
        assert_eq!(&out[..n], &["proxied", "server_paired"]);
    }

    #[test]
    fn local_scope_covers_this_host_and_this_link_only() {
        let ip = |a: [u8; 4]| u32::from_ne_bytes(a);
        for a in [
            [0, 0, 0, 0],
            [0, 1, 2, 3],
            [127, 0, 0, 1],
            [127, 255, 255, 254],
            [169, 254, 169, 254],
            [169, 254, 0, 1],
            [224, 0, 0, 1],
            [239, 1, 1, 1],
            [240, 0, 0, 1],
            [255, 255, 255, 255],
        ] {
            assert!(local_scope_ipv4(ip(a)), "{a:?}");
        }
        for a in [
            [10, 0, 0, 1],
            [1, 0, 0, 0],
            [126, 255, 255, 255],
            [128, 0, 0, 1],
            [169, 253, 0, 1],
            [169, 255, 0, 1],
            [172, 16, 0, 1],
            [192, 168, 1, 1],
            [223, 255, 255, 255],
        ] {
            assert!(!local_scope_ipv4(ip(a)), "{a:?}");
        }
    }

    #[test]
    fn proxy_alive_needs_ready_and_a_fresh_heartbeat() {
        let h = maps::ProxyHealth {
            heartbeat_ns: 10_000,
            stale_after_ns: 1_000,
        };
        assert!(proxy_alive(true, &h, 10_500));
        assert!(proxy_alive(true, &h, 11_000));
        assert!(!proxy_alive(true, &h, 11_001));
        assert!(!proxy_alive(false, &h, 10_500));
        // A heartbeat "from the future" (written between two clock reads) is fresh.
        assert!(proxy_alive(true, &h, 9_000));
        let off = maps::ProxyHealth {
            stale_after_ns: 0,
            ..h
        };
        assert!(proxy_alive(true, &off, u64::MAX));
    }

    #[test]
    fn log_levels_gate_from_off_to_trace() {
        use log_level::*;
        assert!(!enabled(OFF, DEBUG));
        assert!(!enabled(OFF, ERROR));
        assert!(!enabled(INFO, DEBUG));
        assert!(enabled(DEBUG, DEBUG));
        assert!(enabled(TRACE, DEBUG));
        assert!(!enabled(DEBUG, TRACE));
        assert!(!enabled(TRACE, OFF));
    }

    #[test]
    fn every_record_code_is_described() {
        for s in Stat::ALL {
            assert_eq!(decision::describe(s as u32).map(|d| d.0), Some(s.name()));
            assert!(!s.why().is_empty());
        }
        for c in 1000..=1005 {
            assert!(decision::describe(c).is_some(), "{c}");
        }
        assert_eq!(decision::describe(Stat::COUNT), None);
        assert_eq!(decision::describe(1006), None);
    }

    #[test]
    fn stat_names_are_unique() {
        for (i, a) in Stat::ALL.iter().enumerate() {
            assert_eq!(*a as usize, i);
            for b in &Stat::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }
}
