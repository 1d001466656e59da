//! The proxy's side of the kernel relay (`--kernel-relay`, docs/architecture.md "Kernel
//! relay"): once a TCP flow to a same-node destination is decided (endpoint picked,
//! policy allowed, no L7 work), the proxy arms it in the datapath's maps and then relays
//! as always. The kernel moves each direction straight between the client's and the
//! destination's sockets as soon as nothing of that direction is in flight through the
//! proxy; whatever still reaches the proxy's sockets (the first bytes, a fallback under
//! back-pressure, FIN and RST) the user-space relay carries. When it ends, the bytes the
//! kernel moved are added to the flow's counts.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::atomic::Ordering::Relaxed,
};

use mesh_common::{
    flow_flags,
    maps::{FlowInfo, SockKey},
};
use tokio::net::{TcpSocket, TcpStream};
use tracing::debug;

use super::{Outbound, RelayEnd};
use crate::{
    datapath::{relay::Armed, Maps},
    metrics::{istio::TcpSeries, FlowCounters},
};

/// The view of a connection from the socket at `local` (its namespace left 0: the
/// datapath's calls set the one each map needs). A v4-mapped address is the IPv4 one.
pub(super) fn sock_key(local: SocketAddr, remote: SocketAddr) -> SockKey {
    SockKey::new(0, local, remote)
}

impl Outbound {
    /// Whether decided flows are handed to the kernel.
    pub(super) fn kernel_relay(&self) -> bool {
        self.maps.relay.is_some()
    }

    /// Connects to a service's endpoint. With the kernel relay on and a same-node
    /// endpoint, the leg is announced in `FLOWS` (flag `upstream`) before connecting, as
    /// `connect_upstream` does for a workload dialled directly, so sockops pairs the
    /// endpoint's socket: the relay's target must be in the sockhash.
    pub(super) async fn connect_endpoint(&self, ep: SocketAddr) -> io::Result<TcpStream> {
        let src = match ep {
            SocketAddr::V4(_) => self.upstream_source.get().map(|a| IpAddr::V4(*a)),
            SocketAddr::V6(_) => self.upstream_source6.get().map(|a| IpAddr::V6(*a)),
        };
        let (Some(src), Some(dest)) = (src, self.maps.dest(ep.ip())) else {
            return TcpStream::connect(ep).await;
        };
        let sock = match ep {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        sock.bind(SocketAddr::new(src, 0))?;
        let key = sock_key(sock.local_addr()?, ep);
        let info = FlowInfo {
            orig_ip: mesh_common::maps::ip_from(ep.ip()),
            orig_port: u32::from(ep.port()),
            flags: flow_flags::PROXIED | flow_flags::UPSTREAM,
            src_id: u32::MAX,
            dst_id: dest.id,
            netns: 0,
        };
        let Ok(key) = self.maps.announce_upstream(key, info) else {
            return sock.connect(ep).await;
        };
        let r = sock.connect(ep).await;
        if r.is_err() {
            self.maps.forget_flow(key);
        }
        r
    }
}

/// Arms the kernel relay of a decided flow: `client` is the proxy's accepted socket,
/// `upstream` its connected leg, `client_key` the client's view of the flow. `None`
/// (relay off, not same-node, not paired, bytes already written upstream, a full map):
/// the user-space relay carries every byte, as without the flag.
pub(super) fn arm<'a>(
    maps: &'a Maps,
    client: &TcpStream,
    upstream: &TcpStream,
    client_key: SockKey,
    written_upstream: usize,
) -> Option<Armed<'a>> {
    let relay = maps.relay.as_ref()?;
    // Bytes the proxy already wrote upstream (a sniffed prefix) went over the paired leg
    // uncounted: the counts could never match, so do not arm.
    if written_upstream != 0 {
        return None;
    }
    let upstream_key = sock_key(upstream.local_addr().ok()?, upstream.peer_addr().ok()?);
    match relay.arm(client, upstream, client_key, upstream_key) {
        Ok(a) => Some(a),
        Err(e) => {
            debug!(error = %e, "kernel relay not armed; relaying in user space");
            None
        }
    }
}

/// Adds what the kernel moved for an armed flow to its counts (the flow's series, its
/// Istio series, and the access log's `end`), and disarms it.
pub(super) fn finish(
    maps: &Maps,
    armed: Option<Armed<'_>>,
    end: RelayEnd,
    c: &FlowCounters,
    istio: Option<&TcpSeries>,
) -> RelayEnd {
    let (Some(armed), Some(relay)) = (armed, maps.relay.as_ref()) else {
        return end;
    };
    let r = relay.finish(armed);
    c.received.fetch_add(r.from_client, Relaxed);
    c.sent.fetch_add(r.from_server, Relaxed);
    if let Some(i) = istio {
        i.received.inc_by(r.from_client);
        i.sent.inc_by(r.from_server);
    }
    debug!(
        from_client = r.from_client,
        from_server = r.from_server,
        fallbacks = r.fallbacks,
        recoveries = r.recoveries,
        "kernel relay ended"
    );
    RelayEnd {
        received: end.received + r.from_client,
        sent: end.sent + r.from_server,
        reset: end.reset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_sockets_own_view_with_mapped_addresses_folded() {
        let k = sock_key(
            "10.0.0.1:40000".parse().unwrap(),
            "[::ffff:10.0.0.2]:8080".parse().unwrap(),
        );
        let plain = sock_key(
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.2:8080".parse().unwrap(),
        );
        assert_eq!(k, plain, "a v4-mapped peer is the IPv4 one");
        assert_eq!((k.local_port, k.remote_port), (40000, 8080));
        let v6 = sock_key(
            "[fd00::1]:40000".parse().unwrap(),
            "[fd00::2]:8080".parse().unwrap(),
        );
        assert_eq!(
            mesh_common::maps::ip_addr(v6.remote_ip),
            "fd00::2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(v6.reversed().local_port, 8080);
    }
}
