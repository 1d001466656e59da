//! The zero-trust path: which way a flow travels between mesh workloads, and whether
//! policy lets it. It joins the pieces the proxy has for this:
//!
//! - the mesh's workloads and policies in force (`proxy::config::workloads`,
//!   `proxy::config::policy`, from xDS), judged by `proxy::authz`;
//! - the HBONE tunnel (`proxy::hbone`) with certificates of the node's identities
//!   (`identity::Certificates`);
//! - inbound capture (`proxy::inbound`): plaintext connections TC steered to a pod's
//!   listener, and the pod's HBONE listener.
//!
//! Outbound (`Secure::outbound`): a destination that is a mesh workload on another node
//! goes through the tunnel, from the source workload's identity to the destination's
//! expected identity; policy is the destination node's to apply. A same-node mesh
//! destination is judged here, with the source identity known locally. Anything else
//! (outside the mesh, or a source the mesh does not know) stays plain.
//!
//! Inbound (`InboundPolicy`, `TunnelHandler`): PeerAuthentication first (a plain-text
//! connection to a STRICT port is refused), then AuthorizationPolicy; a denial resets the
//! connection (plain) or answers 403 (tunnel), counted with the policy's name and logged.
//! Each decision reads the configuration in force when the connection arrives, so a
//! policy change applies to the next connection.
//!
//! Where a policy with HTTP attributes applies to the destination port
//! (`authz::needs_http`), the connection is not judged whole: `http` terminates its HTTP
//! and judges every request (403 `RBAC: access denied` when denied), with the
//! configuration in force at that request. STRICT still refuses plain text at the
//! connection.

use std::{
    cell::RefCell,
    future::Future,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    pin::Pin,
    sync::{Arc, Weak},
    time::Duration,
};

// `::http`: the crate, not this module's `http` child.
use ::http::StatusCode;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::hbone::server::Opened;
use super::{
    authz::{self, ConnCtx, Verdict},
    config::{policy::MeshConfig, workloads::WorkloadInfo},
    hbone::{ConnectHandler, HboneClient, HboneError, HboneStream, PeerInfo, Refusal},
    inbound::{telemetry::TunnelReport, Deliver, InPod, Judged, PlainHandler},
    xds::client::XdsClient,
};
use crate::{
    identity::SpiffeId,
    metrics::Metrics,
    proxy::{
        accesslog::{self, AccessLog, Entry, Flags, PathTaken, Protocol},
        trace::Tracer,
    },
    sys,
};

pub mod http;

/// How long an inbound connection waits for its pod to appear in the workloads in force
/// (the configuration arrives over xDS just after the pod is enrolled).
const MESH_CONFIG_WAIT: Duration = Duration::from_secs(2);

/// Which way an outbound flow goes.
#[derive(Debug)]
pub enum Path {
    /// Plain TCP to the target (not a mesh destination, or allowed on this node).
    Plain,
    /// Through HBONE to a workload of another node.
    Tunnel {
        src: SpiffeId,
        dst: Arc<WorkloadInfo>,
        hbone: SocketAddr,
    },
    /// Refused by policy (same-node destination).
    Denied(Verdict),
}

pub struct Secure {
    node: String,
    xds: Arc<XdsClient>,
    pub hbone: Arc<HboneClient>,
    metrics: Arc<Metrics>,
}

impl Secure {
    pub fn new(
        node: String,
        xds: Arc<XdsClient>,
        hbone: Arc<HboneClient>,
        metrics: Arc<Metrics>,
    ) -> Arc<Secure> {
        Arc::new(Secure {
            node,
            xds,
            hbone,
            metrics,
        })
    }

    /// The path for a flow from the local workload at `client` to `target` (an endpoint
    /// picked, or the original destination); `client` of either family (an IPv6 client on a dual-stack node is found by its
    /// IPv6 address).
    pub fn outbound(&self, client: impl Into<IpAddr>, target: SocketAddr) -> Path {
        let client: IpAddr = client.into();
        let mesh = self.xds.mesh_now();
        let (Some(dst), Some(src)) = ends(&mesh, client, target.ip()) else {
            return Path::Plain;
        };
        let (dst, src) = (&dst, &src);
        if dst.node == self.node || dst.node.is_empty() {
            let ctx = ConnCtx::new(client, Some(&src.identity), dst, target);
            let v = authz::authorize(&mesh.policies, &ctx);
            self.metrics
                .authz
                .count("outbound", v.allowed, v.policy_name.as_deref());
            if !v.allowed {
                log_denial("same-node", &ctx, &v);
                return Path::Denied(v);
            }
            return Path::Plain;
        }
        match dst.hbone_addr() {
            Some(hbone) => Path::Tunnel {
                src: src.identity.clone(),
                dst: dst.clone(),
                hbone,
            },
            None => Path::Plain,
        }
    }

    /// The workloads and policies `outbound` judges by now: a path it gave stays right
    /// while their `version` is in force (the L7 engine caches paths per connection on it).
    pub fn mesh_now(&self) -> Arc<MeshConfig> {
        self.xds.mesh_now()
    }

    /// Opens a tunnel stream as `src` through `hbone` (which must prove `dst_id`) to
    /// `authority`, naming the source workload's address `source` (`Forwarded: for=`, as
    /// the L4 path names its connections' sources), counted as the L4 path counts its
    /// streams.
    pub async fn open_tunnel(
        &self,
        src: &SpiffeId,
        source: IpAddr,
        hbone: SocketAddr,
        dst_id: &SpiffeId,
        authority: SocketAddr,
    ) -> Result<HboneStream, HboneError> {
        use std::sync::atomic::Ordering::Relaxed;
        let r = self
            .hbone
            .connect_from_ip(src, source, hbone, dst_id, authority)
            .await;
        match &r {
            Ok(_) => self.metrics.authz.tunnel_out.fetch_add(1, Relaxed),
            Err(_) => self.metrics.authz.tunnel_out_failures.fetch_add(1, Relaxed),
        };
        r
    }
}

/// The workloads at both ends of the last flow `ends` looked up on this thread. A proxy
/// worker's connections mostly repeat a flow (one client pod calling one destination),
/// and the two hashed look-ups were ~470 instructions a connection (issue 13, item 3).
struct LastEnds {
    /// The configuration they were found in: `Weak`, so a replaced configuration is not
    /// kept alive by an idle worker, while its address (what is compared) is not reused.
    mesh: Weak<MeshConfig>,
    client: IpAddr,
    target: IpAddr,
    src: Option<Arc<WorkloadInfo>>,
    dst: Option<Arc<WorkloadInfo>>,
}

thread_local! {
    static LAST_ENDS: RefCell<Option<LastEnds>> = const { RefCell::new(None) };
}

/// The mesh workloads at `target` and at `client` in `mesh` (the client's looked up only
/// when the target is one), kept for the next flow of this thread.
fn ends(
    mesh: &Arc<MeshConfig>,
    client: IpAddr,
    target: IpAddr,
) -> (Option<Arc<WorkloadInfo>>, Option<Arc<WorkloadInfo>>) {
    let look = || {
        let dst = mesh.workloads.by_ip(target).cloned();
        let src = dst.as_ref().and(mesh.workloads.by_ip(client).cloned());
        (dst, src)
    };
    // (`try_with`: a thread tearing down its locals just looks up.)
    LAST_ENDS
        .try_with(|last| {
            let mut last = last.borrow_mut();
            match last.as_ref() {
                Some(l)
                    if l.client == client
                        && l.target == target
                        && std::ptr::eq(l.mesh.as_ptr(), Arc::as_ptr(mesh)) =>
                {
                    (l.dst.clone(), l.src.clone())
                }
                _ => {
                    let (dst, src) = look();
                    *last = Some(LastEnds {
                        mesh: Arc::downgrade(mesh),
                        client,
                        target,
                        src: src.clone(),
                        dst: dst.clone(),
                    });
                    (dst, src)
                }
            }
        })
        .unwrap_or_else(|_| look())
}

fn log_denial(direction: &str, ctx: &ConnCtx<'_>, v: &Verdict) {
    info!(
        target: "mesh_agent::authz",
        direction,
        source = %ctx.src_ip,
        principal = ctx.src_identity.map(|i| i.to_string()).unwrap_or_default(),
        destination = %ctx.dst.name,
        namespace = %ctx.dst.namespace,
        port = ctx.dst_port,
        policy = v.policy_name.as_deref().unwrap_or("-"),
        reason = v.reason.as_str(),
        "connection denied"
    );
}

/// The workload at `ip` once the configuration in force names it (waits up to
/// `MESH_CONFIG_WAIT`); with it, the configuration it was found in.
async fn workload_at(xds: &XdsClient, ip: IpAddr) -> Option<(Arc<MeshConfig>, Arc<WorkloadInfo>)> {
    let mut rx = xds.mesh();
    let found = |m: &Arc<MeshConfig>| m.workloads.by_ip(ip).cloned().map(|w| (m.clone(), w));
    if let Some(x) = found(&rx.borrow_and_update()) {
        return Some(x);
    }
    tokio::time::timeout(MESH_CONFIG_WAIT, async {
        while rx.changed().await.is_ok() {
            if let Some(x) = found(&rx.borrow_and_update()) {
                return Some(x);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

/// Judges plaintext connections TC steered to a pod's listener, then delivers them.
pub struct InboundPolicy {
    xds: Arc<XdsClient>,
    metrics: Arc<Metrics>,
    deliver: Arc<Deliver>,
}

impl InboundPolicy {
    pub fn new(xds: Arc<XdsClient>, metrics: Arc<Metrics>) -> Arc<InboundPolicy> {
        let deliver = Deliver::new(metrics.clone());
        Arc::new(InboundPolicy {
            xds,
            metrics,
            deliver,
        })
    }

    /// Writes an access-log line per delivered or refused connection.
    pub fn set_access_log(&self, log: AccessLog) {
        self.deliver.set_access_log(log);
    }

    /// Sends a span per delivered or refused connection, and per request judged.
    pub fn set_tracer(&self, t: Tracer) {
        self.deliver.set_tracer(t);
    }
}

type UnitFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

impl PlainHandler for InboundPolicy {
    fn serve(
        &self,
        conn: TcpStream,
        peer: SocketAddr,
        orig_dst: SocketAddr,
        pod: Arc<InPod>,
    ) -> UnitFuture {
        let (xds, metrics, deliver) =
            (self.xds.clone(), self.metrics.clone(), self.deliver.clone());
        Box::pin(async move {
            let Some((mesh, dst)) = workload_at(&xds, orig_dst.ip()).await else {
                // Enrolled here but not (yet) in the configuration: no policy can be
                // judged. Counted; the pod's own fail mode applies on its outbound side.
                metrics
                    .authz
                    .unknown
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                debug!(%peer, %orig_dst, "no workload in force for the destination; delivering without policy");
                deliver.serve(conn, peer, orig_dst, pod).await;
                return;
            };
            let ctx = ConnCtx {
                src_ip: peer.ip(),
                src_identity: None,
                dst: &dst,
                dst_ip: orig_dst.ip(),
                dst_port: orig_dst.port(),
                tls: false,
            };
            // Plain text to a STRICT port is refused first (`authz::authorize`).
            let v = authz::authorize(&mesh.policies, &ctx);
            if v.reason != authz::Reason::MtlsRequired
                && authz::needs_http(&mesh.policies, &dst, orig_dst.port())
            {
                // Judged per request (counted there); the connection-level verdict on an
                // L7 port is only the fail-closed approximation.
                drop(mesh);
                metrics
                    .authz
                    .http_plain
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = conn.set_nodelay(true);
                let src = peer.ip();
                let mut t = terminate(&xds, &metrics, pod, orig_dst, src, None, "inbound-plain");
                t.access_log = deliver.access_log().cloned();
                t.tracer = deliver.tracer().cloned();
                http::serve(conn, t).await;
                return;
            }
            metrics
                .authz
                .count("inbound", v.allowed, v.policy_name.as_deref());
            if !v.allowed {
                log_denial("inbound-plain", &ctx, &v);
                metrics
                    .inbound
                    .refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = sys::set_linger_zero(conn.as_fd());
                deliver.report_denied(peer, orig_dst, &dst, v.policy_name.as_deref());
                if let Some(log) = deliver.access_log() {
                    let mut e = Entry::new(Protocol::Tcp, PathTaken::Inbound);
                    e.source_address = Some(accesslog::Addr::Sock(peer));
                    e.destination_address = Some(orig_dst);
                    e.destination_workload = Some(format!("{}/{}", dst.namespace, dst.name));
                    e.destination_principal = Some(dst.identity.to_string());
                    e.flag(accesslog::Flags::RBAC);
                    e.policy_verdict = Some(accesslog::Verdict::Deny);
                    e.policy_name = v.policy_name.as_deref().map(str::to_owned);
                    e.connection_termination_details = Some(format!("denied: {v}"));
                    log.send(Box::new(e));
                }
                return;
            }
            let judged = Judged {
                policy: v.policy_name.as_deref().map(str::to_owned),
                destination: dst.clone(),
            };
            deliver
                .serve_judged(conn, peer, orig_dst, pod, Some(judged))
                .await;
        })
    }
}

/// Opens CONNECT streams that arrive on a pod's HBONE listener: only to that pod (its
/// IPv4 address, or its IPv6 one on a dual-stack node), only where policy allows the
/// peer's identity.
pub struct TunnelHandler {
    pub pod: Arc<InPod>,
    pub xds: Arc<XdsClient>,
    pub metrics: Arc<Metrics>,
    /// A line per request served as HTTP (`http::serve`) when set.
    pub access_log: Option<AccessLog>,
    /// Spans of the streams relayed and the requests served as HTTP, when set.
    pub tracer: Option<Tracer>,
}

type OpenFuture = Pin<Box<dyn Future<Output = Result<TcpStream, Refusal>> + Send + 'static>>;
type AcceptFuture = Pin<Box<dyn Future<Output = Result<Opened, Refusal>> + Send + 'static>>;

/// The state of one inbound connection whose HTTP `http::serve` terminates: policies read
/// from `xds` at each request, the pod dialled from inside.
fn terminate(
    xds: &Arc<XdsClient>,
    metrics: &Arc<Metrics>,
    pod: Arc<InPod>,
    dst: SocketAddr,
    src_ip: IpAddr,
    src_identity: Option<SpiffeId>,
    path: &'static str,
) -> http::Terminate {
    let xds = xds.clone();
    http::Terminate {
        mesh: Arc::new(move || xds.mesh_now()),
        dial: Arc::new(move || {
            let pod = pod.clone();
            Box::pin(async move { pod.connect_in(dst).await })
        }),
        metrics: metrics.clone(),
        src_ip,
        src_identity,
        dst,
        path,
        access_log: None,
        tracer: None,
    }
}

impl TunnelHandler {
    /// Judges a CONNECT and opens it: relayed to a connection into the pod or, where a
    /// policy with HTTP attributes applies to the port and `l7` is set, served as HTTP
    /// (`http::serve`) with each request judged.
    fn judge(&self, peer: PeerInfo, authority: SocketAddr, l7: bool) -> AcceptFuture {
        let (pod, xds, metrics) = (self.pod.clone(), self.xds.clone(), self.metrics.clone());
        let access_log = self.access_log.clone();
        let tracer = self.tracer.clone();
        Box::pin(async move {
            // The agent's own in-pod ports: a stream there would loop back into it.
            if authority.port() == mesh_common::inbound::PLAIN_PORT
                || authority.port() == mesh_common::inbound::HBONE_PORT
            {
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    format!("{authority} is the mesh's own port"),
                ));
            }
            // This listener serves its own pod; any other target would make the agent a
            // relay into (or out of) the pod's network. An IPv4 authority must be the
            // pod's address; an IPv6 one the pod's IPv6 address, which the workload in
            // force names (checked below, once it is known).
            let not_this_pod = || {
                Refusal::new(
                    StatusCode::BAD_REQUEST,
                    format!("{authority} is not this pod ({})", pod.ip),
                )
            };
            if authority.ip().is_ipv4() && authority.ip() != IpAddr::V4(pod.ip) {
                return Err(not_this_pod());
            }
            let Some((mesh, dst)) = workload_at(&xds, IpAddr::V4(pod.ip)).await else {
                metrics
                    .authz
                    .unknown
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "destination workload not in the configuration yet",
                ));
            };
            if !own_address(&dst, authority.ip()) {
                return Err(not_this_pod());
            }
            let dst_addr = authority;
            let src_ip = tunnel_source_ip(&mesh, &peer, &metrics);
            if l7 && authz::needs_http(&mesh.policies, &dst, dst_addr.port()) {
                // Every request is judged (and counted) by `http::serve`.
                for n in [&metrics.authz.http_tunnel, &metrics.authz.tunnel_in] {
                    n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let mut t = terminate(
                    &xds,
                    &metrics,
                    pod,
                    dst_addr,
                    src_ip,
                    Some(peer.identity),
                    "inbound-tunnel",
                );
                t.access_log = access_log;
                t.tracer = tracer;
                return Ok(Opened::Serve(Box::new(
                    move |tunnel: super::hbone::HboneStream| Box::pin(http::serve(tunnel, t)),
                )));
            }
            let ctx = ConnCtx {
                src_ip,
                src_identity: Some(&peer.identity),
                dst: &dst,
                dst_ip: dst_addr.ip(),
                dst_port: dst_addr.port(),
                tls: true,
            };
            let v = authz::authorize(&mesh.policies, &ctx);
            metrics
                .authz
                .count("inbound", v.allowed, v.policy_name.as_deref());
            let report = TunnelReport::new(
                &metrics,
                tracer.as_ref(),
                &mesh.workloads,
                &peer.identity,
                src_ip,
                &dst,
                authority,
            );
            if !v.allowed {
                log_denial("inbound-tunnel", &ctx, &v);
                report.refused(
                    Flags::RBAC,
                    v.policy_name.as_deref(),
                    format!("denied: {v}"),
                );
                return Err(Refusal::new(
                    StatusCode::FORBIDDEN,
                    format!(
                        "denied by {}",
                        v.policy_name.as_deref().unwrap_or(v.reason.as_str())
                    ),
                ));
            }
            match tokio::time::timeout(Duration::from_secs(10), pod.connect_in(dst_addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    metrics
                        .authz
                        .tunnel_in
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let conn = report.relayed(v.policy_name.as_deref());
                    Ok(Opened::Reported(s, Box::new(move |end| conn.finish(end))))
                }
                Ok(Err(e)) => {
                    report.refused(Flags::UF, None, format!("delivering into the pod: {e}"));
                    Err(Refusal::new(StatusCode::BAD_GATEWAY, e.to_string()))
                }
                Err(_) => {
                    report.refused(Flags::UF, None, "delivering into the pod: timed out".into());
                    Err(Refusal::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "the destination did not answer",
                    ))
                }
            }
        })
    }
}

/// Whether `ip` is one of `w`'s own addresses (its IPv4 one, or on a dual-stack node its
/// IPv6 one): what a CONNECT to the pod's HBONE listener may name.
fn own_address(w: &WorkloadInfo, ip: IpAddr) -> bool {
    !ip.is_unspecified() && !ip.is_loopback() && w.ips.contains(&ip)
}

/// The source address a tunnelled stream is judged and logged by: the source pod's, as
/// the CONNECT names it, if the peer's identity owns that address
/// (`authz::tunnel_source`); else the sending node's. A claim not believed is counted and
/// logged.
fn tunnel_source_ip(mesh: &MeshConfig, peer: &PeerInfo, metrics: &Metrics) -> IpAddr {
    use std::sync::atomic::Ordering::Relaxed;
    let (ip, origin) = authz::tunnel_source(
        &mesh.workloads,
        &peer.identity,
        peer.addr.ip(),
        peer.forwarded_for,
    );
    match origin {
        authz::SourceOrigin::Peer => {}
        authz::SourceOrigin::Forwarded => {
            metrics.authz.source_forwarded.fetch_add(1, Relaxed);
        }
        authz::SourceOrigin::Untrusted => {
            metrics.authz.source_untrusted.fetch_add(1, Relaxed);
            warn!(
                target: "mesh_agent::authz",
                peer = %peer.addr,
                principal = %peer.identity,
                claimed = ?peer.forwarded_for,
                "tunnel source address not believed: no workload of the peer's identity has it; judging by the peer's address"
            );
        }
    }
    ip
}

impl ConnectHandler for TunnelHandler {
    /// The connection-level path only (a policy with HTTP attributes fails closed here).
    fn open(&self, peer: PeerInfo, authority: SocketAddr) -> OpenFuture {
        let judged = self.judge(peer, authority, false);
        Box::pin(async move {
            match judged.await? {
                // (Counted opened; closed as the report drops, without bytes.)
                Opened::Relay(s) | Opened::Reported(s, _) => Ok(s),
                Opened::Serve(_) => unreachable!("a tunnel is served only when asked for L7"),
            }
        })
    }

    fn accept(&self, peer: PeerInfo, authority: SocketAddr) -> AcceptFuture {
        self.judge(peer, authority, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tunnel_may_name_either_address_of_its_pod_and_nothing_else() {
        let w = WorkloadInfo {
            uid: "Kubernetes//Pod/backend/server-b".into(),
            name: "server-b".into(),
            namespace: "backend".into(),
            // IPv6 first, as a control plane of an IPv6-primary cluster may list them.
            ips: vec!["fd00:1::2".parse().unwrap(), "10.0.1.2".parse().unwrap()],
            identity: "spiffe://cluster.local/ns/backend/sa/echo".parse().unwrap(),
            node: "n1".into(),
            hbone: true,
            authorization_policies: vec![],
            peer_authentications: vec![],
            telemetry: Default::default(),
        };
        for ip in ["10.0.1.2", "fd00:1::2"] {
            assert!(own_address(&w, ip.parse().unwrap()), "{ip}");
        }
        // Another pod's address (of either family), the pod's loopback, the wildcard.
        for ip in ["10.0.1.3", "fd00:1::3", "::1", "::", "127.0.0.1", "0.0.0.0"] {
            assert!(!own_address(&w, ip.parse().unwrap()), "{ip}");
        }
        // The tunnel goes to the IPv4 address (the in-pod listener, 0.0.0.0:15008),
        // whichever family the destination is.
        assert_eq!(w.hbone_addr(), Some("10.0.1.2:15008".parse().unwrap()));
    }

    fn mesh(pods: &[(&str, &str)]) -> Arc<MeshConfig> {
        let ws: Vec<Arc<WorkloadInfo>> = pods
            .iter()
            .map(|(name, ip)| {
                Arc::new(WorkloadInfo {
                    uid: format!("Kubernetes//Pod/shop/{name}"),
                    name: (*name).into(),
                    namespace: "shop".into(),
                    ips: vec![ip.parse().unwrap()],
                    identity: SpiffeId::new("cluster.local", "shop", name).unwrap(),
                    node: String::new(),
                    hbone: true,
                    authorization_policies: vec![],
                    peer_authentications: vec![],
                    telemetry: Default::default(),
                })
            })
            .collect();
        Arc::new(MeshConfig {
            workloads: super::super::config::workloads::WorkloadIndex::new(&ws),
            ..Default::default()
        })
    }

    /// The ends kept from the last flow are those of the configuration asked about: a new
    /// configuration (even at the same address range) or another flow looks up again.
    #[test]
    fn kept_ends_follow_the_configuration_and_the_flow() {
        let name = |w: &Option<Arc<WorkloadInfo>>| w.as_ref().map(|w| w.name.clone());
        let (cli, srv, other) = (
            "10.0.0.2".parse().unwrap(),
            "10.0.0.3".parse().unwrap(),
            "10.0.0.4".parse().unwrap(),
        );
        let one = mesh(&[("cli", "10.0.0.2"), ("srv", "10.0.0.3")]);
        for _ in 0..2 {
            let (dst, src) = ends(&one, cli, srv);
            assert_eq!(
                (name(&dst), name(&src)),
                (Some("srv".into()), Some("cli".into()))
            );
        }
        // Not a mesh destination: the client is not looked up.
        let (dst, src) = ends(&one, cli, other);
        assert!(dst.is_none() && src.is_none());
        // The same flow in a configuration where the server moved away and another pod
        // took its address; then one without the client.
        let two = mesh(&[("cli", "10.0.0.2"), ("new", "10.0.0.3")]);
        let (dst, src) = ends(&two, cli, srv);
        assert_eq!(
            (name(&dst), name(&src)),
            (Some("new".into()), Some("cli".into()))
        );
        drop(one);
        let three = mesh(&[("new", "10.0.0.3")]);
        let (dst, src) = ends(&three, cli, srv);
        assert_eq!((name(&dst), name(&src)), (Some("new".into()), None));
        // And the first answer again for the first configuration's twin.
        let again = mesh(&[("cli", "10.0.0.2"), ("srv", "10.0.0.3")]);
        let (dst, _) = ends(&again, cli, srv);
        assert_eq!(name(&dst), Some("srv".into()));
    }
}
