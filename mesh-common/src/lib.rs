//! The contract between the mesh eBPF programs (`mesh-ebpf`) and the agent (`mesh-agent`):
//! every map key and value (`#[repr(C)]`, no implicit padding, sizes asserted at compile
//! time), the map names, flags, and the registry of datapath counters. Pure decision logic
//! (tuple normalisation, CIDR matching) lives here as plain functions so host unit tests
//! cover what the kernel side runs.
//!
//! Byte order: IPv4 addresses are kept as the kernel hands them over (network order stored
//! in a `u32`, so `u32::from_ne_bytes(ip.octets())`); ports are always host order.
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
    pub const SOCK_ORIG: &str = "SOCK_ORIG";
    pub const FLOWS: &str = "FLOWS";
    pub const SOCKHASH: &str = "SOCKHASH";
    pub const STATS: &str = "STATS";
    pub const FALLBACK: &str = "FALLBACK";
    pub const SK_ADDR: &str = "SK_ADDR";
    pub const NODE_ADDRS: &str = "NODE_ADDRS";
    pub const PROXY_HEALTH: &str = "PROXY_HEALTH";
    /// Local enrolled workloads by IPv4 address, for the TC inbound program.
    pub const INBOUND: &str = "INBOUND";
    /// Network-namespace cookies asked for by the agent on kernels without
    /// `SO_NETNS_COOKIE` (< 5.14): socket cookie -> netns cookie, filled by connect4.
    pub const NETNS_PROBE: &str = "NETNS_PROBE";
    pub const ALL: [&str; 15] = [
        WORKLOADS,
        DESTS,
        CONFIG,
        EXCLUDES,
        EXCLUDES_GEN,
        SOCK_ORIG,
        FLOWS,
        SOCKHASH,
        STATS,
        FALLBACK,
        SK_ADDR,
        NODE_ADDRS,
        PROXY_HEALTH,
        INBOUND,
        NETNS_PROBE,
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
    pub const ALL: [&str; 7] = [
        CONNECT4,
        CONNECT6,
        SOCKOPS,
        SK_MSG,
        GETPEERNAME4,
        GETPEERNAME6,
        TC_INGRESS,
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
    pub const SOCK_ORIG: u32 = 131072;
    pub const FLOWS: u32 = 131072;
    pub const SOCKHASH: u32 = 131072;
    /// The node's own IPv4 addresses (a node with more, say kube-proxy in IPVS mode with a
    /// ClusterIP per service on `kube-ipvs0`, has that interface skipped: see
    /// docs/security.md).
    pub const NODE_ADDRS: u32 = 1024;
    /// Local enrolled workloads (`INBOUND`), as `WORKLOADS`.
    pub const INBOUND: u32 = 4096;
    /// Netns-cookie probes in flight (the agent resolves one namespace at a time).
    pub const NETNS_PROBE: u32 = 64;
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

/// Values of `FALLBACK`: why a sender's messages take the TCP path.
pub mod fallback {
    /// The peer was not in the sockhash: for good.
    pub const NO_PEER: u32 = 1;
    /// The peer's redirect queue was full: until everything sent over TCP has been read
    /// and the queue has drained (`msg_fallback_recovered`).
    pub const BACKPRESSURE: u32 = 2;
    pub const NAMES: [(u32, &str); 2] = [(NO_PEER, "no_peer"), (BACKPRESSURE, "backpressure")];
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
    pub const NAMES: [(u32, &str); 7] = [
        (PROXIED, "proxied"),
        (DIRECT, "direct"),
        (CLIENT_PAIRED, "client_paired"),
        (SERVER_PAIRED, "server_paired"),
        (CLIENT_V6, "client_v6"),
        (UPSTREAM, "upstream"),
        (FAIL_CLOSED, "fail_closed"),
    ];
}

/// Renders `flags` as `a|b|c` with the names of a flags module.
pub fn flag_names(flags: u32, names: &[(u32, &'static str)], out: &mut [&'static str; 8]) -> usize {
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
    /// TC ingress: IPv4 TCP packets looked at.
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
}

impl Stat {
    pub const COUNT: u32 = 39;
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
        }
    }
}

const _: () = assert!(Stat::ALL.len() == Stat::MsgFallbackRecovered as usize + 1);

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

/// A socket's `(local, remote)` key from the raw context fields (`bpf_sock_ops` and
/// `sk_msg_md` carry the same ones), with v4-mapped IPv6 folded to IPv4. Returns the key and
/// whether the socket is AF_INET6, or `None` for native IPv6 and other families.
#[inline(always)]
pub fn socket_key(
    family: u32,
    local_ip4: u32,
    remote_ip4: u32,
    local_ip6: [u32; 4],
    remote_ip6: [u32; 4],
    local_port: u32,
    remote_port: u32,
) -> Option<(maps::SockKey, bool)> {
    let (local, remote, v6) = match family {
        AF_INET => (local_ip4, remote_ip4, false),
        AF_INET6 => (v4_mapped(local_ip6)?, v4_mapped(remote_ip6)?, true),
        _ => return None,
    };
    Some((
        maps::SockKey {
            local_ip4: local,
            remote_ip4: remote,
            local_port: local_port as u16,
            remote_port: remote_port_host(remote_port),
        },
        v6,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_key_folds_v4_mapped_and_rejects_native_v6() {
        let (a, b) = (
            u32::from_ne_bytes([10, 0, 0, 2]),
            u32::from_ne_bytes([10, 0, 0, 3]),
        );
        let port = (u32::from(8080_u16.to_be())) << 16;
        let (k, v6) = socket_key(AF_INET, a, b, [0; 4], [0; 4], 40000, port).unwrap();
        assert!(!v6);
        assert_eq!(
            (k.local_ip4, k.remote_ip4, k.local_port, k.remote_port),
            (a, b, 40000, 8080)
        );
        let m = |ip| [0, 0, 0xffff_u32.to_be(), ip];
        let (k6, v6) = socket_key(AF_INET6, 0, 0, m(a), m(b), 40000, port).unwrap();
        assert!(v6);
        assert_eq!(k6, k);
        assert!(socket_key(AF_INET6, 0, 0, [1, 0, 0, 1], m(b), 40000, port).is_none());
        assert!(socket_key(1, a, b, [0; 4], [0; 4], 1, 1).is_none());
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
        let mut out = [""; 8];
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
    fn stat_names_are_unique() {
        for (i, a) in Stat::ALL.iter().enumerate() {
            assert_eq!(*a as usize, i);
            for b in &Stat::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }
}
