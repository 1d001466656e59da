//! xDS protocol tests: the proxy's client against the embedded server over real gRPC on
//! loopback, in both protocol variants, and against a scripted server that misbehaves on
//! purpose.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{atomic::Ordering::Relaxed, Arc, Mutex},
    time::Duration,
};

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3 as ec, core::v3 as core, endpoint::v3 as ee, listener::v3 as el,
            route::v3 as er,
        },
        extensions::filters::network::http_connection_manager::v3 as hcm,
        service::discovery::v3::{
            aggregated_discovery_service_server::AggregatedDiscoveryService, DeltaDiscoveryRequest,
            DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        },
    },
    google::protobuf::Any,
};
use envoy_types::util::pack_any;
use prost::Name;
use tokio::{net::TcpListener, sync::watch};
use tokio_stream::{wrappers::TcpListenerStream, StreamExt as _};

use super::{
    server::{AdsServer, ServerStats, Snapshot},
    translate,
};
use crate::{
    enrol::file::MeshFile,
    proxy::{
        config::ListenerKind,
        xds::client::{ClientOptions, Mode, XdsClient},
    },
};

const BASE: &str = "\
namespaces:
  - { name: shop }
workloads:
  - { name: r1, namespace: shop, ip: 10.0.0.2, netns: /run/netns/r1, labels: { app: reviews } }
services:
  - name: reviews
    namespace: shop
    vip: 10.96.0.10
    ports: [ { port: 80, target_port: 8080, protocol: http } ]
    selector: { app: reviews }
  - name: db
    namespace: shop
    vip: 10.96.0.12
    ports: [ { port: 5432, protocol: tcp } ]
    endpoints: [ { ip: 10.0.0.4 } ]
";

fn resources(yaml: &str) -> Vec<(String, Any)> {
    translate::resources(&MeshFile::parse(Path::new("t.yaml"), yaml).unwrap())
}

/// The embedded server on a runtime of its own, so stopping it closes its connections
/// like a crashed control plane would.
struct Embedded {
    addr: SocketAddr,
    tx: watch::Sender<Arc<Snapshot>>,
    stats: Arc<ServerStats>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Embedded {
    fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn embedded_on(listener: TcpListener, tx: watch::Sender<Arc<Snapshot>>) -> Embedded {
    let addr = listener.local_addr().unwrap();
    let listener = listener.into_std().unwrap();
    let server = AdsServer::new(tx.subscribe());
    let stats = server.stats.clone();
    let stats_for_access = stats.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = TcpListener::from_std(listener).unwrap();
            let serve = tonic::transport::Server::builder()
                .add_service(
                    server.into_service(crate::control::auth::Access::new(None, stats_for_access)),
                )
                .serve_with_incoming(TcpListenerStream::new(listener));
            tokio::select! {
                _ = serve => {}
                _ = stopped => {}
            }
        });
        // Dropping the runtime ends every connection task.
    });
    Embedded {
        addr,
        tx,
        stats,
        stop: Some(stop),
        thread: Some(thread),
    }
}

async fn embedded(yaml: &str) -> Embedded {
    let (tx, _) = watch::channel(Arc::new(Snapshot::default().next(resources(yaml))));
    embedded_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), tx).await
}

fn client(addr: SocketAddr, mode: Mode, on_demand: bool) -> Arc<XdsClient> {
    let c = XdsClient::new(ClientOptions {
        address: format!("http://{addr}"),
        token: None,
        node_id: "test-node".into(),
        cluster: "test".into(),
        mode,
        on_demand,
        on_demand_timeout: Duration::from_secs(2),
    });
    tokio::spawn(c.clone().run());
    c
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn vip(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

async fn on_demand_then_update(mode: Mode) {
    let cp = embedded(BASE).await;
    let c = client(cp.addr, mode, true);
    until("the stream", || c.connected()).await;
    // Nothing is pushed before a workload calls something.
    assert!(c.config().borrow().listeners.is_empty());
    let l = c
        .listener_for(vip("10.96.0.10:80"))
        .await
        .expect("listener on demand");
    let ListenerKind::Http(h) = &l.kind else {
        panic!("{l:?}")
    };
    assert_eq!(h.route_config.name, "reviews.shop:80");
    let cfg = c.config().borrow().clone();
    let cluster = cfg
        .cluster("outbound|80||reviews.shop")
        .expect("cluster followed");
    assert_eq!(cluster.endpoints[0].address, vip("10.0.0.2:8080"));
    // Only what this node calls: the db service was not sent.
    assert!(cfg.cluster("outbound|5432||db.shop").is_none());
    assert_eq!(cfg.listeners.len(), 1);
    // An address without a listener is answered at once, and stays answered.
    assert!(c.listener_for(vip("10.0.0.99:80")).await.is_none());
    assert!(c.dump()["on_demand"]["absent"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v == "10.0.0.99:80"));

    // One endpoint change: one resource on the wire (SotW sends every subscribed load
    // assignment, and on demand that is only the one this node uses).
    let before = cp.stats.resources_sent.load(Relaxed);
    let changed = BASE.replace(
        "endpoints: [ { ip: 10.0.0.4 } ]",
        "endpoints: [ { ip: 10.0.0.4 } ]\n  - name: extra\n    namespace: shop\n    vip: 10.96.0.13\n    ports: [ { port: 81 } ]",
    );
    let changed = changed.replace(
        "  - { name: r1, namespace: shop, ip: 10.0.0.2, netns: /run/netns/r1, labels: { app: reviews } }",
        "  - { name: r1, namespace: shop, ip: 10.0.0.2, netns: /run/netns/r1, labels: { app: reviews } }\n  - { name: r2, namespace: shop, ip: 10.0.0.3, netns: /run/netns/r2, labels: { app: reviews } }",
    );
    cp.tx
        .send_modify(|s| *s = Arc::new(s.next(resources(&changed))));
    let mut cfg_rx = c.config();
    until("the new endpoint", || {
        cfg_rx
            .borrow_and_update()
            .cluster("outbound|80||reviews.shop")
            .is_some_and(|c| c.endpoints.len() == 2)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sent = cp.stats.resources_sent.load(Relaxed) - before;
    // The new service is not subscribed by this node: nothing of it is sent. The new
    // workload's address is (addresses are subscribed to as a whole; SotW sends the
    // whole set of them: r1's too).
    let addresses = if mode == Mode::Sotw { 2 } else { 1 };
    assert_eq!(
        sent,
        1 + addresses,
        "only the changed load assignment and the addresses"
    );
    assert!(c
        .config()
        .borrow()
        .cluster("outbound|81||extra.shop")
        .is_none());
    let dump = c.dump();
    assert_eq!(dump["xds"]["nacks"], 0, "{dump}");
    assert!(cp.stats.acks.load(Relaxed) >= 4);
}

/// Issue 11: workloads and policies reach the proxy over the same stream, wildcard,
/// even with on-demand listeners; an edit of one policy reaches it too.
async fn workloads_and_policies_arrive(mode: Mode) {
    const POLICY: &str = "\
authorization_policies:
  - metadata: { name: r1-allow, namespace: shop }
    spec:
      selector: { matchLabels: { app: reviews } }
      rules: [ { from: [ { source: { namespaces: [ shop ] } } ] } ]
peer_authentications:
  - metadata: { name: default, namespace: istio-system }
    spec: { mtls: { mode: STRICT } }
";
    let cp = embedded(&format!("{BASE}{POLICY}")).await;
    let c = client(cp.addr, mode, true);
    let mut mesh = c.mesh();
    until("workloads and policies", || {
        let m = mesh.borrow_and_update();
        m.workloads.len() == 1
            && m.policies.authorizations.contains_key("shop/r1-allow")
            && m.policies
                .peer_authentications
                .contains_key("istio-system/default")
    })
    .await;
    let m = c.mesh_now();
    let r1 = m.workloads.by_ip("10.0.0.2".parse().unwrap()).unwrap();
    assert_eq!(r1.authorization_policies, vec!["shop/r1-allow"]);
    assert_eq!(
        crate::proxy::authz::mtls_mode(&m.policies, r1, 8080),
        crate::proxy::authz::Mtls::Strict
    );
    // On demand: no listener was asked for, none was sent.
    assert!(c.config().borrow().listeners.is_empty());
    let edited = format!("{BASE}{POLICY}").replace("mode: STRICT", "mode: PERMISSIVE");
    cp.tx
        .send_modify(|s| *s = Arc::new(s.next(resources(&edited))));
    until("the edited policy", || {
        let m = mesh.borrow_and_update();
        m.policies
            .peer_authentications
            .get("istio-system/default")
            .is_some_and(|p| p.mode == crate::proxy::config::policy::MtlsMode::Permissive)
    })
    .await;
    assert_eq!(c.dump()["xds"]["nacks"], 0);
}

#[tokio::test]
async fn sotw_workloads_and_policies_arrive() {
    workloads_and_policies_arrive(Mode::Sotw).await;
}

#[tokio::test]
async fn delta_workloads_and_policies_arrive() {
    workloads_and_policies_arrive(Mode::Delta).await;
}

#[tokio::test]
async fn sotw_on_demand_subscription_and_endpoint_update() {
    on_demand_then_update(Mode::Sotw).await;
}

#[tokio::test]
async fn delta_on_demand_subscription_and_endpoint_update() {
    on_demand_then_update(Mode::Delta).await;
}

/// A listener whose filter this proxy does not implement.
fn bad_listener(name: &str) -> (String, Any) {
    let l = el::Listener {
        name: name.into(),
        address: Some(core::Address {
            address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                address: "10.96.0.10".into(),
                port_specifier: Some(core::socket_address::PortSpecifier::PortValue(80)),
                ..Default::default()
            })),
        }),
        filter_chains: vec![el::FilterChain {
            filters: vec![el::Filter {
                name: "envoy.filters.network.redis_proxy".into(),
                config_type: Some(el::filter::ConfigType::TypedConfig(Any {
                    type_url: "type.googleapis.com/envoy.extensions.filters.network.redis_proxy.v3.RedisProxy".into(),
                    value: vec![],
                })),
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    (name.into(), pack_any(l))
}

async fn nack_keeps_last_good(mode: Mode) {
    let cp = embedded(BASE).await;
    let c = client(cp.addr, mode, false);
    until("wildcard listeners", || {
        c.config().borrow().listeners.len() == 2
    })
    .await;
    // Replace the reviews listener with one we cannot serve.
    let mut res = resources(BASE);
    res.retain(|(n, a)| !(n == "10.96.0.10:80" && a.type_url == el::Listener::type_url()));
    res.push(bad_listener("10.96.0.10:80"));
    cp.tx.send_modify(|s| *s = Arc::new(s.next(res)));
    until("the NACK", || cp.stats.nacks.load(Relaxed) == 1).await;
    let dump = c.dump();
    let reason = dump["xds"]["last_nack"]["reason"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        reason.contains("listener \"10.96.0.10:80\"")
            && reason.contains("filter_chains[0].filters[0].typed_config")
            && reason.contains("redis_proxy"),
        "{reason}"
    );
    // The last good listener stays in force.
    let l = c.config().borrow().listener(vip("10.96.0.10:80")).cloned();
    assert!(matches!(
        l.as_deref().map(|l| &l.kind),
        Some(ListenerKind::Http(_))
    ));
    // A fix is accepted.
    cp.tx.send_modify(|s| {
        *s = Arc::new(s.next(resources(&BASE.replace("port: 5432", "port: 5433"))))
    });
    until("the fix", || {
        c.config()
            .borrow()
            .listener(vip("10.96.0.12:5433"))
            .is_some()
    })
    .await;
    assert_eq!(
        cp.stats.nacks.load(Relaxed),
        1,
        "the bad version is not resent"
    );
}

#[tokio::test]
async fn sotw_nack_names_resource_and_field_and_keeps_last_good() {
    nack_keeps_last_good(Mode::Sotw).await;
}

#[tokio::test]
async fn delta_nack_names_resource_and_field_and_keeps_last_good() {
    nack_keeps_last_good(Mode::Delta).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_stream_resumes_with_initial_versions_after_a_restart() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, _) = watch::channel(Arc::new(Snapshot::default().next(resources(BASE))));
    let cp = embedded_on(listener, tx).await;
    let c = client(addr, Mode::Delta, false);
    // Everything, routes and endpoints included, before the control plane goes away.
    until("the whole config", || {
        let cfg = c.config().borrow().clone();
        cfg.listener(vip("10.96.0.10:80")).is_some()
            && cfg.clusters.len() == 2
            && cfg.clusters.values().all(|c| c.endpoints_known)
    })
    .await;
    // The control plane goes away; the proxy keeps its configuration.
    let mut cp = cp;
    tokio::task::block_in_place(|| cp.stop());
    until("the disconnect", || !c.connected()).await;
    assert_eq!(c.config().borrow().clusters.len(), 2);
    // It comes back with one endpoint changed.
    let changed = BASE.replace("{ ip: 10.0.0.4 }", "{ ip: 10.0.0.5 }");
    let next = cp.tx.borrow().next(resources(&changed));
    let (tx2, _) = watch::channel(Arc::new(next));
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let cp2 = embedded_on(listener, tx2).await;
    until("the changed endpoint", || {
        c.config()
            .borrow()
            .cluster("outbound|5432||db.shop")
            .is_some_and(|c| c.endpoints.first().map(|e| e.address) == Some(vip("10.0.0.5:5432")))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        cp2.stats.resources_sent.load(Relaxed),
        1,
        "a resumed stream gets only what changed: {}",
        c.dump()["recent_verdicts"]
    );
}

#[tokio::test]
async fn a_listener_waits_for_its_routes() {
    let (tx, _) = watch::channel(Arc::new(Snapshot::default()));
    let cp = embedded_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), tx).await;
    let c = client(cp.addr, Mode::Delta, false);
    until("the stream", || c.connected()).await;
    let mut res = resources(BASE);
    res.retain(|(_, a)| a.type_url != er::RouteConfiguration::type_url());
    cp.tx.send_modify(|s| *s = Arc::new(s.next(res)));
    until("the tcp listener", || {
        c.config()
            .borrow()
            .listener(vip("10.96.0.12:5432"))
            .is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        c.config().borrow().listener(vip("10.96.0.10:80")).is_none(),
        "warming"
    );
    assert_eq!(
        c.dump()["warming"]["listeners"]["10.96.0.10:80"],
        "reviews.shop:80"
    );
    cp.tx
        .send_modify(|s| *s = Arc::new(s.next(resources(BASE))));
    until("the route, then the listener", || {
        c.config().borrow().listener(vip("10.96.0.10:80")).is_some()
    })
    .await;
}

/// A connection that meets a listener already in force but not complete (its clusters
/// have not arrived) waits for them like the lookup that subscribed it, instead of being
/// served at once and answered 503 (no cluster): the soak's first-request 503, where the
/// second of two clients calling a new service met the first one's half-arrived listener.
async fn a_second_lookup_waits_for_the_clusters(mode: Mode) {
    let is = |t: String| move |(_, a): &(String, Any)| a.type_url == t;
    let mut without_clusters = resources(BASE);
    without_clusters.retain(|r| {
        !is(ec::Cluster::type_url())(r) && !is(ee::ClusterLoadAssignment::type_url())(r)
    });
    let (tx, _) = watch::channel(Arc::new(Snapshot::default().next(without_clusters)));
    let cp = embedded_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), tx).await;
    let c = XdsClient::new(ClientOptions {
        address: format!("http://{}", cp.addr),
        token: None,
        node_id: "test-node".into(),
        cluster: "test".into(),
        mode,
        on_demand: true,
        on_demand_timeout: Duration::from_secs(5),
    });
    tokio::spawn(c.clone().run());
    until("the stream", || c.connected()).await;
    let dst = vip("10.96.0.10:80");
    let first = tokio::spawn({
        let c = c.clone();
        async move { c.lookup(dst).await.found() }
    });
    until("the listener in force", || {
        c.config().borrow().listener(dst).is_some()
    })
    .await;
    let second = tokio::spawn({
        let c = c.clone();
        async move { c.lookup(dst).await.found() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "the second lookup returned a listener whose clusters have not arrived"
    );
    assert!(!first.is_finished());
    cp.tx
        .send_modify(|s| *s = Arc::new(s.next(resources(BASE))));
    for (who, lookup) in [("first", first), ("second", second)] {
        let l = tokio::time::timeout(Duration::from_secs(3), lookup)
            .await
            .unwrap_or_else(|_| panic!("the {who} lookup did not end"))
            .unwrap();
        assert!(l.is_some(), "{who}");
        let cfg = c.config().borrow().clone();
        let cluster = cfg
            .cluster("outbound|80||reviews.shop")
            .unwrap_or_else(|| panic!("{who}: no cluster when the lookup ended"));
        assert!(cluster.endpoints_known, "{who}");
    }
}

#[tokio::test]
async fn sotw_a_second_lookup_waits_for_the_clusters() {
    a_second_lookup_waits_for_the_clusters(Mode::Sotw).await;
}

#[tokio::test]
async fn delta_a_second_lookup_waits_for_the_clusters() {
    a_second_lookup_waits_for_the_clusters(Mode::Delta).await;
}

/// A listener that stayed incomplete past the on-demand timeout is served at once: what
/// it lacks is not coming soon, and waiting would only delay every connection to it.
#[tokio::test]
async fn a_listener_incomplete_past_the_timeout_is_served_at_once() {
    let mut without_clusters = resources(BASE);
    without_clusters.retain(|(_, a)| a.type_url != ec::Cluster::type_url());
    let (tx, _) = watch::channel(Arc::new(Snapshot::default().next(without_clusters)));
    let cp = embedded_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), tx).await;
    let c = XdsClient::new(ClientOptions {
        address: format!("http://{}", cp.addr),
        token: None,
        node_id: "test-node".into(),
        cluster: "test".into(),
        mode: Mode::Delta,
        on_demand: true,
        on_demand_timeout: Duration::from_millis(300),
    });
    tokio::spawn(c.clone().run());
    until("the stream", || c.connected()).await;
    let dst = vip("10.96.0.10:80");
    let started = tokio::time::Instant::now();
    assert!(c.lookup(dst).await.found().is_some(), "incomplete, in time");
    assert!(started.elapsed() >= Duration::from_millis(250));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = tokio::time::Instant::now();
    assert!(c.lookup(dst).await.found().is_some());
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// A server that misbehaves on purpose.

/// What the scripted server was sent.
#[derive(Default)]
struct Seen {
    sotw: Vec<DiscoveryRequest>,
    delta: Vec<DeltaDiscoveryRequest>,
}

struct Rogue {
    seen: Arc<Mutex<Seen>>,
}

fn by_type(res: &[(String, Any)], t: &str) -> Vec<(String, Any)> {
    res.iter()
        .filter(|(_, a)| a.type_url == t)
        .cloned()
        .collect()
}

/// The script: an unknown type, routes before the listener that needs them, a duplicate
/// nonce, endpoints before their cluster, and the same bad listener as the NACK tests.
/// One scripted response: type URL, resources, nonce.
type Step = (String, Vec<(String, Any)>, &'static str);

fn script() -> Vec<Step> {
    let res = resources(BASE);
    let unknown = vec![(
        "x".to_string(),
        Any {
            type_url: "type.googleapis.com/example.Unknown".into(),
            value: vec![1, 2, 3],
        },
    )];
    vec![
        ("type.googleapis.com/example.Unknown".into(), unknown, "1"),
        (
            er::RouteConfiguration::type_url(),
            by_type(&res, &er::RouteConfiguration::type_url()),
            "2",
        ),
        (
            el::Listener::type_url(),
            by_type(&res, &el::Listener::type_url()),
            "2",
        ),
        (
            ee::ClusterLoadAssignment::type_url(),
            by_type(&res, &ee::ClusterLoadAssignment::type_url()),
            "3",
        ),
        (
            ec::Cluster::type_url(),
            by_type(&res, &ec::Cluster::type_url()),
            "4",
        ),
        (
            el::Listener::type_url(),
            vec![bad_listener("10.96.0.10:80")],
            "5",
        ),
    ]
}

type Out<T> = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<T, tonic::Status>> + Send>>;

/// Sends the responses a little apart, then keeps the stream open.
fn scripted<T: Send + 'static>(items: Vec<Result<T, tonic::Status>>) -> Out<T> {
    let (tx, rx) = tokio::sync::mpsc::channel(items.len().max(1));
    tokio::spawn(async move {
        for i in items {
            tokio::time::sleep(Duration::from_millis(30)).await;
            if tx.send(i).await.is_err() {
                return;
            }
        }
        tx.closed().await;
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Rogue {
    type StreamAggregatedResourcesStream = Out<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Out<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        req: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamAggregatedResourcesStream>, tonic::Status> {
        let mut inbound = req.into_inner();
        let seen = self.seen.clone();
        tokio::spawn(async move {
            while let Some(Ok(r)) = inbound.next().await {
                seen.lock().unwrap().sotw.push(r);
            }
        });
        let out = script().into_iter().map(|(t, res, nonce)| {
            Ok(DiscoveryResponse {
                version_info: format!("v{nonce}"),
                resources: res.into_iter().map(|(_, a)| a).collect(),
                type_url: t,
                nonce: nonce.into(),
                ..Default::default()
            })
        });
        Ok(tonic::Response::new(scripted(out.collect())))
    }

    async fn delta_aggregated_resources(
        &self,
        req: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        let mut inbound = req.into_inner();
        let seen = self.seen.clone();
        tokio::spawn(async move {
            while let Some(Ok(r)) = inbound.next().await {
                seen.lock().unwrap().delta.push(r);
            }
        });
        let out = script().into_iter().map(|(t, res, nonce)| {
            Ok(DeltaDiscoveryResponse {
                system_version_info: format!("v{nonce}"),
                resources: res
                    .into_iter()
                    .map(
                        |(name, a)| envoy_types::pb::envoy::service::discovery::v3::Resource {
                            name,
                            version: format!("v{nonce}"),
                            resource: Some(a),
                            ..Default::default()
                        },
                    )
                    .collect(),
                type_url: t,
                nonce: nonce.into(),
                ..Default::default()
            })
        });
        Ok(tonic::Response::new(scripted(out.collect())))
    }
}

/// (nonce, NACK reason or None) of every answer the client gave, in order.
fn answers(seen: &Seen, delta: bool) -> Vec<(String, Option<String>)> {
    if delta {
        seen.delta
            .iter()
            .filter(|r| !r.response_nonce.is_empty())
            .map(|r| {
                (
                    r.response_nonce.clone(),
                    r.error_detail.as_ref().map(|e| e.message.clone()),
                )
            })
            .collect()
    } else {
        seen.sotw
            .iter()
            .filter(|r| !r.response_nonce.is_empty())
            .map(|r| {
                (
                    r.response_nonce.clone(),
                    r.error_detail.as_ref().map(|e| e.message.clone()),
                )
            })
            .collect()
    }
}

async fn against_rogue(mode: Mode) -> Vec<(String, Option<String>)> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer::new(Rogue { seen: seen.clone() });
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    let c = client(addr, mode, false);
    // The server has the answer to the last scripted response (the client's verdict is
    // not enough: its request may still be on the way).
    until("the last scripted response to be answered", || {
        let s = seen.lock().unwrap();
        let nacked_5 = |nonce: &str, e: bool| nonce == "5" && e;
        if mode == Mode::Delta {
            s.delta
                .iter()
                .any(|r| nacked_5(&r.response_nonce, r.error_detail.is_some()))
        } else {
            s.sotw
                .iter()
                .any(|r| nacked_5(&r.response_nonce, r.error_detail.is_some()))
        }
    })
    .await;
    let cfg = c.config().borrow().clone();
    // Out of order was fine: the routes that came first serve the listener, the
    // endpoints that came before their cluster fill it.
    let l = cfg
        .listener(vip("10.96.0.10:80"))
        .expect("last good listener");
    assert!(matches!(l.kind, ListenerKind::Http(_)));
    assert_eq!(
        cfg.cluster("outbound|5432||db.shop").unwrap().endpoints[0].address,
        vip("10.0.0.4:5432")
    );
    let dump = c.dump();
    assert_eq!(dump["xds"]["nacks"], 2, "{dump}");
    task.abort();
    let s = seen.lock().unwrap();
    answers(&s, mode == Mode::Delta)
}

fn check_answers(a: &[(String, Option<String>)]) {
    let find = |nonce: &str| a.iter().filter(|(n, _)| n == nonce).collect::<Vec<_>>();
    let unknown = find("1");
    assert!(
        unknown.iter().any(|(_, e)| e
            .as_deref()
            .is_some_and(|e| e.contains("unknown resource type"))),
        "{a:?}"
    );
    // Both responses that carried nonce 2 were answered, both ACKed.
    assert!(
        find("2").len() >= 2 && find("2").iter().all(|(_, e)| e.is_none()),
        "{a:?}"
    );
    assert!(
        find("3").iter().all(|(_, e)| e.is_none()) && !find("3").is_empty(),
        "{a:?}"
    );
    assert!(
        find("4").iter().all(|(_, e)| e.is_none()) && !find("4").is_empty(),
        "{a:?}"
    );
    assert!(
        find("5")
            .iter()
            .any(|(_, e)| e.as_deref().is_some_and(|e| e.contains("redis_proxy"))),
        "{a:?}"
    );
}

#[tokio::test]
async fn sotw_client_survives_a_misbehaving_server() {
    let a = against_rogue(Mode::Sotw).await;
    check_answers(&a);
}

#[tokio::test]
async fn delta_client_survives_a_misbehaving_server_and_judges_like_sotw() {
    let d = against_rogue(Mode::Delta).await;
    check_answers(&d);
    let s = against_rogue(Mode::Sotw).await;
    let verdicts = |v: &[(String, Option<String>)]| {
        let mut x: Vec<(String, bool)> = v.iter().map(|(n, e)| (n.clone(), e.is_some())).collect();
        x.sort();
        x.dedup();
        x
    };
    assert_eq!(
        verdicts(&d),
        verdicts(&s),
        "SotW and delta ACK and NACK the same responses"
    );
}

#[test]
fn hcm_type_url_is_the_v3_one() {
    assert_eq!(
        hcm::HttpConnectionManager::type_url(),
        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    );
}

/// Issue 10, item 4: every distinct address a pod dials must not add a subscription for
/// good. Past `MAX_ABSENT_LISTENERS` the oldest absent names are forgotten and
/// unsubscribed; a service stays subscribed, and a forgotten address asked again is
/// answered again.
async fn absent_destinations_are_bounded(mode: Mode) {
    use crate::proxy::xds::client::MAX_ABSENT_LISTENERS;
    let cp = embedded(BASE).await;
    let c = client(cp.addr, mode, true);
    until("the stream", || c.connected()).await;
    assert!(c.listener_for(vip("10.96.0.10:80")).await.is_some());
    let dials = MAX_ABSENT_LISTENERS + 200;
    for i in 0..dials {
        let dst = SocketAddr::from(([10, 9, (i / 250) as u8, (i % 250) as u8], 9000));
        assert!(c.listener_for(dst).await.is_none());
    }
    let names = |v: &serde_json::Value| v.as_array().map(Vec::len).unwrap_or(0);
    let dump = c.dump();
    assert_eq!(names(&dump["on_demand"]["absent"]), MAX_ABSENT_LISTENERS);
    assert_eq!(
        names(&dump["on_demand"]["requested"]),
        MAX_ABSENT_LISTENERS + 1,
        "the absent ones and the service"
    );
    // What the server holds for this stream follows (unsubscriptions were sent).
    until("the server to drop the forgotten names", || {
        let subs = names(&c.dump()["resources"]["listener"]["subscribed"]);
        subs == MAX_ABSENT_LISTENERS + 1
    })
    .await;
    assert!(c.config().borrow().listener(vip("10.96.0.10:80")).is_some());
    // The first address was forgotten; dialled again it is asked and answered again.
    assert!(c.listener_for(vip("10.9.0.0:9000")).await.is_none());
    assert!(c.dump()["on_demand"]["absent"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v == "10.9.0.0:9000"));
    assert_eq!(c.dump()["xds"]["nacks"], 0);
}

#[tokio::test]
async fn sotw_absent_destinations_are_bounded() {
    absent_destinations_are_bounded(Mode::Sotw).await;
}

#[tokio::test]
async fn delta_absent_destinations_are_bounded() {
    absent_destinations_are_bounded(Mode::Delta).await;
}

/// Issue 10, item 4: a request over the size cap is refused before it is buffered, the
/// call ends with an error status (it ended with grpc-status 0), and the refusal is
/// counted; the server keeps serving others.
#[tokio::test]
async fn an_oversized_request_ends_the_stream_with_an_error() {
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    let cp = embedded(BASE).await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw = AggregatedDiscoveryServiceClient::new(ch).max_encoding_message_size(64 << 20);
    let huge = DiscoveryRequest {
        type_url: el::Listener::type_url(),
        resource_names: vec!["x".repeat(super::server::MAX_REQUEST_BYTES + 1)],
        ..Default::default()
    };
    let mut responses = raw
        .stream_aggregated_resources(tokio_stream::iter([huge]))
        .await
        .expect("the call opens")
        .into_inner();
    let end = tokio::time::timeout(Duration::from_secs(10), responses.next())
        .await
        .expect("an answer");
    let status = match end {
        Some(Err(s)) => s,
        other => panic!("expected an error status, got {other:?}"),
    };
    assert!(
        matches!(
            status.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{status:?}"
    );
    assert_eq!(cp.stats.bad_requests.load(Relaxed), 1);
    // Others are still served.
    let c = client(cp.addr, Mode::Delta, true);
    until("the stream", || c.connected()).await;
    assert!(c.listener_for(vip("10.96.0.10:80")).await.is_some());
}

/// Issue 10, item 4: the number of streams a control plane serves at once is bounded; the
/// one past the bound is refused with RESOURCE_EXHAUSTED (counted), and a freed slot is
/// served again.
#[tokio::test]
async fn streams_past_the_cap_are_refused_and_counted() {
    use super::server::MAX_STREAMS;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    let cp = embedded(BASE).await;
    // Several connections, as many clients would open (HTTP/2 caps streams per connection).
    let mut channels = Vec::new();
    for _ in 0..16 {
        channels.push(
            tonic::transport::Endpoint::from_shared(format!("http://{}", cp.addr))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    let open = |i: usize| {
        let mut c = AggregatedDiscoveryServiceClient::new(channels[i % channels.len()].clone());
        async move {
            let (tx, rx) = tokio::sync::mpsc::channel::<DiscoveryRequest>(1);
            let r = c
                .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await;
            (r, tx)
        }
    };
    let mut held = Vec::new();
    for i in 0..MAX_STREAMS as usize {
        let (r, tx) = open(i).await;
        let stream = r.unwrap_or_else(|e| panic!("stream {i}: {e}")).into_inner();
        held.push((stream, tx));
    }
    assert_eq!(cp.stats.open.load(Relaxed), MAX_STREAMS);
    let (r, _tx) = open(0).await;
    let e = r.expect_err("one past the cap");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert_eq!(cp.stats.over_capacity.load(Relaxed), 1);
    // A stream that ends frees its slot.
    drop(held.pop());
    until("a freed slot", || cp.stats.open.load(Relaxed) < MAX_STREAMS).await;
    let (r, _tx) = open(1).await;
    assert!(r.is_ok());
}

/// The embedded server fed the way the agent feeds it: `BASE` through the incremental
/// parser and translator, which the test keeps for its edits.
async fn incremental(
    path: &Path,
) -> (
    Embedded,
    crate::enrol::file::FileParser,
    translate::Translator,
) {
    let mut parser = crate::enrol::file::FileParser::default();
    let mut translator = translate::Translator::default();
    let file = parser.parse(path, BASE).unwrap();
    let first = translator.update(&file.services, &file.members());
    let (tx, _) = watch::channel(Arc::new(Snapshot::default().apply(&first)));
    let cp = embedded_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), tx).await;
    (cp, parser, translator)
}

/// The incremental path end to end: a file edit of one service is parsed as that item,
/// translated as that service, applied to the served snapshot as that resource, and sent
/// only to the client that subscribed to it.
#[tokio::test]
async fn one_edit_reaches_only_its_subscribers_as_one_resource() {
    let path = Path::new("t.yaml");
    let (cp, mut parser, mut translator) = incremental(path).await;
    let reviews = client(cp.addr, Mode::Delta, true);
    let db = client(cp.addr, Mode::Delta, true);
    until("the streams", || reviews.connected() && db.connected()).await;
    assert!(reviews.listener_for(vip("10.96.0.10:80")).await.is_some());
    assert!(db.listener_for(vip("10.96.0.12:5432")).await.is_some());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (reviews_acks, _) = reviews.verdict_counts();
    let before = cp.stats.resources_sent.load(Relaxed);

    let edited = BASE.replace(
        "endpoints: [ { ip: 10.0.0.4 } ]",
        "endpoints: [ { ip: 10.0.0.5 } ]",
    );
    let parsed = parser.items_parsed();
    let file = parser.parse(path, &edited).unwrap();
    assert_eq!(
        parser.items_parsed(),
        parsed + 1,
        "only db's item is parsed"
    );
    let delta = translator.update(&file.services, &file.members());
    assert_eq!(delta.upserts.len(), 1, "{:?}", delta.upserts);
    cp.tx.send_modify(|s| *s = Arc::new(s.apply(&delta)));
    let mut cfg = db.config();
    until("db's new endpoint", || {
        cfg.borrow_and_update()
            .cluster("outbound|5432||db.shop")
            .is_some_and(|c| {
                c.endpoints
                    .first()
                    .is_some_and(|e| e.address == vip("10.0.0.5:5432"))
            })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        cp.stats.resources_sent.load(Relaxed) - before,
        1,
        "one resource, to db's client only"
    );
    assert_eq!(
        reviews.verdict_counts().0,
        reviews_acks,
        "nothing was pushed to the client that does not use db"
    );
}

/// Streams compare only the names a snapshot step changed when they had reconciled the
/// step before, and everything otherwise (several steps coalesced): either way a
/// wildcard client ends with exactly what is served, removals included.
async fn successive_edits_end_in_what_is_served(mode: Mode) {
    let path = Path::new("t.yaml");
    let (cp, mut parser, mut translator) = incremental(path).await;
    let c = client(cp.addr, mode, false);
    let mut cfg = c.config();
    until("the full configuration", || {
        cfg.borrow_and_update()
            .cluster("outbound|5432||db.shop")
            .is_some()
    })
    .await;
    let edit =
        |text: &str, t: &mut translate::Translator, p: &mut crate::enrol::file::FileParser| {
            let f = p.parse(path, text).unwrap();
            t.update(&f.services, &f.members())
        };
    // One step, seen alone.
    let v1 = BASE.replace("{ ip: 10.0.0.4 }", "{ ip: 10.0.0.5 }");
    let d = edit(&v1, &mut translator, &mut parser);
    cp.tx.send_modify(|s| *s = Arc::new(s.apply(&d)));
    until("db's endpoint moved", || {
        cfg.borrow_and_update()
            .cluster("outbound|5432||db.shop")
            .is_some_and(|c| {
                c.endpoints
                    .first()
                    .is_some_and(|e| e.address == vip("10.0.0.5:5432"))
            })
    })
    .await;
    // Two steps at once (the stream sees only the second): db goes, then its endpoint
    // would have changed again; reviews' port changes.
    let without_db = v1.split("  - name: db").next().unwrap().to_owned();
    let d2 = edit(&without_db, &mut translator, &mut parser);
    let v3 = without_db.replace("target_port: 8080", "target_port: 8081");
    let d3 = edit(&v3, &mut translator, &mut parser);
    cp.tx.send_modify(|s| {
        let mid = s.apply(&d2);
        *s = Arc::new(mid.apply(&d3));
    });
    until("db gone and reviews moved", || {
        let cfg = cfg.borrow_and_update();
        cfg.cluster("outbound|5432||db.shop").is_none()
            && cfg.cluster("outbound|80||reviews.shop").is_some_and(|c| {
                c.endpoints
                    .first()
                    .is_some_and(|e| e.address == vip("10.0.0.2:8081"))
            })
    })
    .await;
    // Envoy's types only: workload addresses are served besides.
    let served: usize = cp
        .tx
        .borrow()
        .types
        .iter()
        .filter(|(t, _)| t.starts_with("type.googleapis.com/envoy."))
        .map(|(_, m)| m.len())
        .sum();
    let cfg = c.config().borrow().clone();
    assert_eq!(cfg.listeners.len(), 1, "{cfg:?}");
    assert_eq!(cfg.clusters.len(), 1);
    assert_eq!(
        served, 5,
        "listener, route, API listener, cluster, endpoints of reviews"
    );
    assert_eq!(c.dump()["xds"]["nacks"], 0);
}

#[tokio::test]
async fn sotw_successive_edits_end_in_what_is_served() {
    successive_edits_end_in_what_is_served(Mode::Sotw).await;
}

#[tokio::test]
async fn delta_successive_edits_end_in_what_is_served() {
    successive_edits_end_in_what_is_served(Mode::Delta).await;
}

/// The bench's 10k-service file (xtask/bench-xds.py `write_config`), service s0's first
/// endpoint on `port0`.
fn bench_file(n: usize, port0: u16) -> String {
    let mut out = String::from("namespaces:\n  - { name: b }\nservices:\n");
    for i in 0..n {
        let (hi, lo) = (i >> 8, i & 255);
        let eps: Vec<String> = (0..10)
            .map(|j| {
                let port = if i == 0 && j == 0 { port0 } else { 8080 };
                format!("{{ ip: 10.{}.{hi}.{lo}, port: {port} }}", 100 + j)
            })
            .collect();
        out.push_str(&format!(
            "  - {{ name: s{i}, namespace: b, vip: 127.96.{hi}.{lo}, ports: [ {{ port: 80, target_port: 8080, protocol: http }} ], endpoints: [ {} ] }}\n",
            eps.join(", ")
        ));
    }
    out
}

/// Each stage of an endpoint change does work for the one service it touches, not for
/// the mesh: the file parser parses and checks one item, the translator translates one
/// service, the ADS snapshot copies one chunk of the changed type's map and names one
/// changed resource; and the result is what a parse and translation from scratch serve.
/// Counters, not timings (`change_cost_at_10k` times the same path at 10k).
#[test]
fn one_change_costs_one_service_at_every_stage() {
    use crate::enrol::{file::FileParser, LocalNode, Snapshot as Enrolment};
    let n = 600;
    let local = LocalNode {
        node: "n".into(),
        trust_domain: "cluster.local".into(),
    };
    let path = Path::new("bench.yaml");
    let mut parser = FileParser::default();
    let mut translator = translate::Translator::default();
    let f = parser.parse(path, &bench_file(n, 8080)).unwrap();
    assert_eq!((parser.items_parsed(), parser.services_checked), (600, 600));
    let enrol = Enrolment::from_file_on(&f, &local);
    let mut served = Snapshot::default().apply(&translator.update_mesh(
        &enrol.services,
        &enrol.declared,
        &enrol.security,
    ));
    let translated = translator.translated;
    let cla = envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment::type_url();
    for (k, port) in [8081, 8082, 8080].into_iter().enumerate() {
        let k = k as u64 + 1;
        let text = bench_file(n, port);
        let f = parser.parse(path, &text).unwrap();
        assert_eq!(parser.items_parsed(), 600 + k, "one item parsed");
        assert_eq!(parser.services_checked, 600 + k, "one service checked");
        let enrol = Enrolment::from_file_on(&f, &local);
        let delta = translator.update_mesh(&enrol.services, &enrol.declared, &enrol.security);
        assert_eq!(
            translator.translated,
            translated + k,
            "one service translated"
        );
        let next = served.apply(&delta);
        assert_eq!(next.version, served.version + 1);
        let changed: Vec<(&String, usize)> =
            next.changed.iter().map(|(t, v)| (t, v.len())).collect();
        assert_eq!(changed, vec![(&cla, 1)], "one resource changed");
        for (t, m) in &next.types {
            let copied = m.chunks_not_shared_with(&served.types[t]);
            assert!(
                copied <= usize::from(*t == cla),
                "{t}: {copied} chunks copied"
            );
        }
        // What a fresh parse and translation serve.
        let whole = MeshFile::parse_whole(path, &text).unwrap();
        assert_eq!(f, whole);
        let fresh = Enrolment::from_file_on(&whole, &local);
        let scratch = Snapshot::default()
            .next(translate::Translator::default().resources(&fresh.services, &fresh.declared));
        for (t, m) in &scratch.types {
            let ours: Vec<_> = next.types[t].iter().map(|(n, e)| (n, &e.version)).collect();
            let theirs: Vec<_> = m.iter().map(|(n, e)| (n, &e.version)).collect();
            assert!(
                ours == theirs,
                "{t} differs from a translation from scratch"
            );
        }
        served = next;
    }
    // A change the checks refuse (a second service on s1's address) goes through the
    // whole check for its message; the next good change is checked alone again.
    let bad = bench_file(n, 8080).replace("vip: 127.96.0.2,", "vip: 127.96.0.1,");
    let e = parser.parse(path, &bad).unwrap_err().to_string();
    assert_eq!(
        e,
        MeshFile::parse_whole(path, &bad).unwrap_err().to_string()
    );
    assert!(
        e.contains("127.96.0.1:80 is also served by services[1]"),
        "{e}"
    );
    let checked = parser.services_checked;
    assert!(checked >= 600 + 3 + 600, "the bad file checked whole");
    parser.parse(path, &bench_file(n, 8080)).unwrap();
    assert_eq!(
        parser.services_checked,
        checked + 600,
        "after an error, whole again"
    );
    parser.parse(path, &bench_file(n, 8083)).unwrap();
    assert_eq!(
        parser.services_checked,
        checked + 601,
        "then one service again"
    );
}

/// One endpoint change at 10k services, in one process, stage by stage (no I/O): what
/// the file source and the control plane spend between the file's new text and the ADS
/// server's new snapshot. `cargo test --release -p mesh-agent --lib change_cost --
/// --ignored --nocapture` (MESH_CHANGES sets the number of changes timed).
#[test]
#[ignore = "a measurement, not a check"]
fn change_cost_at_10k() {
    use crate::enrol::{file::FileParser, LocalNode, Snapshot as Enrolment};
    use std::time::Instant;
    let n = 10_000;
    let changes: usize = std::env::var("MESH_CHANGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let local = LocalNode {
        node: "n".into(),
        trust_domain: "cluster.local".into(),
    };
    let path = Path::new("bench.yaml");
    let mut parser = FileParser::default();
    let mut translator = crate::control::translate::Translator::default();
    let text = bench_file(n, 8080);
    let f = parser.parse(path, &text).unwrap();
    let mut last = Arc::new(Enrolment::from_file_on(&f, &local));
    let mut served = crate::control::server::Snapshot::default().apply(&translator.update_mesh(
        &last.services,
        &last.declared,
        &last.security,
    ));
    drop(f);
    let texts = [bench_file(n, 8081), bench_file(n, 8080)];
    let mut rows: Vec<[f64; 5]> = Vec::new();
    for k in 0..changes {
        let text = &texts[k % 2];
        let t0 = Instant::now();
        let f = parser.parse(path, text).unwrap();
        let t1 = Instant::now();
        let snap = Arc::new(Enrolment::from_file_on(&f, &local));
        assert!(!snap.same_as(&last));
        let t2 = Instant::now();
        let delta = translator.update_mesh(&snap.services, &snap.declared, &snap.security);
        let t3 = Instant::now();
        let next = served.apply(&delta);
        let t4 = Instant::now();
        assert_eq!(next.version, served.version + 1);
        served = next;
        last = snap;
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        rows.push([ms(t0, t1), ms(t1, t2), ms(t2, t3), ms(t3, t4), ms(t0, t4)]);
    }
    let names = ["parse", "snapshot", "translate", "apply", "total"];
    for (c, name) in names.iter().enumerate() {
        let mut v: Vec<f64> = rows.iter().map(|r| r[c]).collect();
        v.sort_by(f64::total_cmp);
        println!(
            "{name:10} median {:7.2} ms  min {:7.2}  max {:7.2}",
            v[v.len() / 2],
            v[0],
            v[v.len() - 1]
        );
    }
}
