//! One capturing pod: the thread in its network namespace, its listeners, its TC link.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::PathBuf,
    sync::Arc,
};

use mesh_common::{
    flow_flags,
    inbound::{HBONE_PORT, PLAIN_PORT},
    maps::{FlowInfo, SockKey},
};
use tokio::net::{TcpSocket, TcpStream};

use crate::{
    datapath::{
        tc::{TcLink, TcProgram},
        Maps,
    },
    sys::NetnsWorker,
};

/// A pod whose inbound traffic the agent captures, as handlers see it. Holds a thread in
/// the pod's network namespace (for `connect_in`) for as long as anyone holds the pod.
pub struct InPod {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address on a dual-stack node: captured too (a listener of its own).
    pub ip6: Option<Ipv6Addr>,
    pub netns: PathBuf,
    worker: NetnsWorker,
    /// Sockets made in the pod's namespace for the next `connect_in`s, IPv4 ones and IPv6
    /// ones (`[0]`, `[1]`): one trip to the namespace's thread makes `SPARE_SOCKETS` of a
    /// family, so a new connection does not cost two thread switches (on one vCPU, a good
    /// part of a tunnelled connection's set-up).
    spare: [std::sync::Mutex<Vec<TcpSocket>>; 2],
    /// Set when delivery legs are paired in the sockhash (`--skmsg-upstream`, and the
    /// kernel pairs sockets at all): see `connect_in`.
    pair: Option<Arc<Maps>>,
    /// Flipped to `true` when the pod leaves (no longer enrolled, or gone) or the agent
    /// stops capturing: whoever took the pod's HBONE listener closes it then.
    closed: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for InPod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InPod")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("ip", &self.ip)
            .field("ip6", &self.ip6)
            .finish()
    }
}

impl InPod {
    pub(super) fn open(
        namespace: String,
        name: String,
        ip: Ipv4Addr,
        ip6: Option<Ipv6Addr>,
        netns: PathBuf,
        pair: Option<Arc<Maps>>,
    ) -> io::Result<Arc<InPod>> {
        let worker = NetnsWorker::spawn(&netns, format!("inpod-{ip}"))?;
        Ok(Arc::new(InPod {
            namespace,
            name,
            ip,
            ip6,
            netns,
            worker,
            spare: Default::default(),
            pair,
            closed: tokio::sync::watch::Sender::new(false),
        }))
    }

    /// `namespace/name`.
    pub fn display_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Connects to `dst` from inside the pod's network namespace (the socket is created
    /// there, so the pod's own address and routes apply; connecting to the pod's own
    /// address goes over its loopback and the application sees that address as the peer).
    /// With pairing on (`pair`), the leg is announced in `FLOWS` first, as the node proxy
    /// announces its same-node upstreams, so sockops pairs both ends
    /// (docs/architecture.md, "Inbound capture"). `dst` of either family: an IPv6 one is
    /// the pod's own IPv6 address (a tunnelled stream to a dual-stack pod's IPv6 address,
    /// the caller checked it), connected over the pod's loopback as IPv4 is. Must be
    /// called within a tokio runtime.
    pub async fn connect_in(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        let family = &self.spare[usize::from(dst.is_ipv6())];
        let spare = family.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let sock = match spare {
            Some(s) => s,
            None => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let v6 = dst.is_ipv6();
                self.worker.submit(Box::new(move || {
                    let made: io::Result<Vec<TcpSocket>> = (0..SPARE_SOCKETS)
                        .map(|_| {
                            if v6 {
                                TcpSocket::new_v6()
                            } else {
                                TcpSocket::new_v4()
                            }
                        })
                        .collect();
                    let _ = tx.send(made);
                }))?;
                let mut made = rx
                    .await
                    .map_err(|_| io::Error::other("the pod's namespace thread is gone"))??;
                let sock = made.pop().expect("SPARE_SOCKETS > 0");
                let mut spare = family.lock().unwrap_or_else(|e| e.into_inner());
                // Bounded: callers that raced each bring a batch; the extra ones close.
                let room = SPARE_SOCKETS.saturating_sub(spare.len());
                spare.extend(made.into_iter().take(room));
                sock
            }
        };
        match &self.pair {
            Some(maps) => connect_paired(sock, dst, maps).await,
            None => sock.connect(dst).await,
        }
    }

    /// Resolves once the pod stopped being captured.
    pub async fn closed(&self) {
        let mut rx = self.closed.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    pub(super) fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Whether `ip` is one of the pod's addresses.
    pub fn owns(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => a == self.ip,
            IpAddr::V6(a) => Some(a) == self.ip6,
        }
    }

    /// Opens the listeners in the pod (std sockets, non-blocking: registered with the
    /// proxy runtime by the caller): plaintext and HBONE on IPv4, and plaintext on the
    /// pod's IPv6 address when it has one (`Listeners`).
    pub(super) fn listen(&self) -> io::Result<Listeners> {
        let ip6 = self.ip6;
        self.worker.run(move || {
            let open = |addr: SocketAddr| -> io::Result<std::net::TcpListener> {
                let l = std::net::TcpListener::bind(addr).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("binding {addr} in the pod (does the application use the port? 15006 and 15008 are the mesh's): {e}"),
                    )
                })?;
                l.set_nonblocking(true)?;
                Ok(l)
            };
            // std sets SO_REUSEADDR; 0.0.0.0 so the pod's address may change under us
            // (and loopback reaches it too, which changes nothing: see `accept_plain`).
            let any = |port| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
            // IPv6 on the pod's own address: a `[::]` listener would be dual-stack (std
            // cannot set IPV6_V6ONLY) and collide with `0.0.0.0:15006`. The TC program
            // looks the listener up by the packet's destination, this address; a change
            // of address sets the pod up again (`InboundPod` differs).
            let plain6 = ip6
                .map(|a| open(SocketAddr::V6(SocketAddrV6::new(a, PLAIN_PORT, 0, 0))))
                .transpose()?;
            Ok(Listeners {
                plain: open(any(PLAIN_PORT))?,
                plain6,
                hbone: open(any(HBONE_PORT))?,
            })
        })
    }

    /// Attaches the TC program to the interface holding the pod's address.
    pub(super) fn attach(&self, tc: Arc<TcProgram>) -> io::Result<TcLink> {
        let ip = self.ip;
        self.worker.run(move || {
            let iface = crate::sys::ipv4_interface_name(ip)?.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no interface holds {ip} in the pod's network namespace"),
                )
            })?;
            tc.attach_here(&iface).map_err(io::Error::other)
        })
    }

    /// Detaches, in the pod's namespace (where a clsact filter's interface index means
    /// the right interface).
    pub(super) fn detach(&self, link: TcLink) -> io::Result<()> {
        self.worker
            .run(move || link.detach_here().map_err(io::Error::other))
    }
}

/// Connects a delivery socket so that sockops pairs it with the pod's accepted socket:
/// bind to the destination's address (the pod's own, which an unbound socket would take
/// as its source anyway, so the application sees the same peer), announce
/// `FLOWS[pod's namespace, our 4-tuple]` with flag `upstream` (the record
/// `Maps::announce_upstream` writes for the node proxy's same-node legs: sockops'
/// `upstream_established` puts this socket in `SOCKHASH` under the proxy's namespace, and
/// the pod's `PASSIVE_ESTABLISHED` finds the record and joins it), then connect. From then
/// on sk_msg redirects each send into the other socket's receive queue, with the
/// sockhash's back-pressure fallback, half-close and reset semantics. Anything failing
/// before the connect (the pod not in `DESTS`, a full map): the socket connects unpaired.
/// The record is removed by sockops at the socket's close, or here when the connect fails
/// or is given up. IPv6 the same way: the maps hold 16-byte addresses, `DESTS` has both
/// addresses of a workload, and sockops keys both families alike.
async fn connect_paired(sock: TcpSocket, dst: SocketAddr, maps: &Maps) -> io::Result<TcpStream> {
    let ip = dst.ip();
    let announced = maps.dest(ip).and_then(|d| {
        sock.bind(SocketAddr::new(ip, 0)).ok()?;
        let local = sock.local_addr().ok()?;
        let info = FlowInfo {
            orig_ip: mesh_common::maps::ip_from(ip),
            orig_port: u32::from(dst.port()),
            flags: flow_flags::PROXIED | flow_flags::UPSTREAM,
            src_id: u32::MAX,
            dst_id: d.id,
            netns: 0,
        };
        maps.announce_upstream(SockKey::new(0, local, dst), info)
            .ok()
    });
    let mut guard = Announced {
        maps,
        key: announced,
    };
    let r = sock.connect(dst).await;
    if r.is_ok() {
        // Established: sockops owns the record now (removed at the socket's close).
        guard.key = None;
    }
    r
}

/// A `FLOWS` record announced for a delivery leg that is not connected (yet): removed if
/// the connect fails or its future is dropped (a timeout), so no record outlives its
/// socket.
struct Announced<'a> {
    maps: &'a Maps,
    key: Option<SockKey>,
}

impl Drop for Announced<'_> {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            self.maps.forget_flow(k);
        }
    }
}

/// A pod's listeners (`InPod::listen`).
pub(super) struct Listeners {
    /// `0.0.0.0:15006`.
    pub plain: std::net::TcpListener,
    /// `[pod's IPv6 address]:15006`, on a dual-stack pod.
    pub plain6: Option<std::net::TcpListener>,
    /// `0.0.0.0:15008`.
    pub hbone: std::net::TcpListener,
}

/// Sockets one trip to a pod's namespace thread makes for `InPod::connect_in` (each an
/// open file until used; at most this many wait per pod).
const SPARE_SOCKETS: usize = 8;
