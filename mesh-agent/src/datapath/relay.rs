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
//! Each direction then switches in the kernel on its own (mesh-ebpf `sk_msg::relay`). The
//! proxy keeps relaying whatever still reaches its sockets and passes FIN and RST on as
//! before; when its relay ends it reads each sender's relayed bytes and removes both
//! entries.

use std::{os::fd::AsRawFd, sync::Mutex};

use aya::maps::{HashMap, MapData, SkStorage};
use mesh_common::{
    fallback, flow_flags,
    maps::{relay_state, RelayInfo, SockKey, SockState},
};

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

/// Handles on `RELAY` and on `SOCK_STATE` (a second handle, opened from its pin, so the
/// proxy's per-connection reads of the first one never wait for this writer).
pub struct RelayMaps {
    relay: Mutex<HashMap<MapData, SockKey, RelayInfo>>,
    sock_state: Mutex<SkStorage<MapData, SockState>>,
    /// Egress mode: the client's direction only, onto P_u's send path.
    egress: bool,
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
}

impl RelayMaps {
    pub fn new(
        relay: HashMap<MapData, SockKey, RelayInfo>,
        sock_state: SkStorage<MapData, SockState>,
        egress: bool,
    ) -> RelayMaps {
        RelayMaps {
            relay: Mutex::new(relay),
            sock_state: Mutex::new(sock_state),
            egress,
        }
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
            return self.arm_egress(upstream, client, upstream_key.in_netns(pu.own_netns), pu);
        }
        let armed = Armed {
            maps: self,
            client,
            server: Some(server),
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

    /// What the kernel moved for `armed`, read as its entries are removed.
    pub fn finish(&self, armed: Armed<'_>) -> Relayed {
        let m = self.relay.lock().unwrap_or_else(|e| e.into_inner());
        let c = m.get(&armed.client, 0).unwrap_or_default();
        let s = armed
            .server
            .and_then(|k| m.get(&k, 0).ok())
            .unwrap_or_default();
        drop(m);
        Relayed {
            // Egress mode: the last message's push is counted here (`RelayInfo::last`).
            from_client: c.relayed + u64::from(c.last),
            from_server: s.relayed,
            fallbacks: c.fallbacks + s.fallbacks,
            recoveries: c.recoveries + s.recoveries,
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
    }
}
