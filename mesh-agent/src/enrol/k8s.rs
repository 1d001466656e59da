//! The Kubernetes source of enrolment and services.
//!
//! One client, one reflector per kind (kube's watcher: list, then watch from the list's
//! `resourceVersion`; on a dropped stream it resumes from the last version seen, on
//! `410 Gone` it lists again, and the store is swapped whole at the end of a re-list, so a
//! re-list neither loses nor duplicates an object):
//!
//! | kind | scope | used for |
//! |---|---|---|
//! | Namespace | all | the enrolment label |
//! | Pod | `spec.nodeName=<node>` | local workloads: IP, labels, UID (to find its netns) |
//! | Service | all | cluster IPs, ports, protocols |
//! | EndpointSlice | all | endpoints and their readiness |
//! | ServiceAccount | all | SPIFFE identities of local workloads |
//! | HTTPRoute, GRPCRoute | all | GAMMA routes on Services (optional: the CRDs may be absent) |
//! | AuthorizationPolicy, PeerAuthentication | all | Istio security policies (`security.istio.io/v1`, optional CRDs; `policies`) |
//!
//! Services and EndpointSlices are stored compact (`compact`: what the build reads, about
//! a tenth of the objects' size), the other kinds as kube's reflector keeps them, slimmed.
//!
//! Any change wakes one builder that turns the stores into a `Snapshot` (see `state`) and
//! publishes it if it differs; the map syncer and the embedded control plane read that.

pub mod compact;
mod podns;
pub mod policies;
pub mod routes;
pub mod state;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    hash::Hash,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Event as K8sEvent, Namespace, ObjectReference, Pod, Service, ServiceAccount},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{ApiResource, DynamicObject, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        reflector::{self, store::Writer, Store},
        watcher, WatchStreamExt as _,
    },
    Api, Client, Resource, ResourceExt as _,
};
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn, Instrument as _};

pub use podns::PodLocator;

use crate::enrol::{file::ExcludeRule, Snapshot};

/// At most one rebuild per this period: a burst of watch events (a re-list, a rollout)
/// coalesces into one rebuild per period, while a change after a quiet period is built at
/// once (it used to wait this long every time: 20 ms of every endpoint change).
const DEBOUNCE: Duration = Duration::from_millis(20);
/// How often pods whose network namespace was not found are looked up again.
const RESOLVE_RETRY: Duration = Duration::from_secs(1);
/// At most one log line per kind per this period for a failing watch.
const WATCH_ERROR_LOG_PERIOD: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("no Kubernetes credentials: not in a pod (no service account token) and no kubeconfig ({0}); pass --kubeconfig")]
    Infer(kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(kube::Error),
    #[error("the Kubernetes API server at {url} does not answer: {source} (check the server address in the kubeconfig or KUBERNETES_SERVICE_HOST, that this node reaches it, and the credentials)")]
    Unreachable { url: String, source: kube::Error },
}

/// The kinds watched, in the order of `Stats` arrays.
pub const KINDS: [&str; 9] = [
    "namespaces",
    "pods",
    "services",
    "endpointslices",
    "serviceaccounts",
    "httproutes",
    "grpcroutes",
    "authorizationpolicies",
    "peerauthentications",
];

/// Counters for /metrics and /k8s.
#[derive(Default)]
pub struct Stats {
    pub events: [AtomicU64; KINDS.len()],
    pub errors: [AtomicU64; KINDS.len()],
    /// Times a watch (re)started with a full list.
    pub relists: [AtomicU64; KINDS.len()],
    pub snapshots: AtomicU64,
    pub events_posted: AtomicU64,
    pub synced: AtomicBool,
}

impl Stats {
    /// Prometheus series, appended to /metrics.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        for (name, help, values) in [
            (
                "mesh_k8s_watch_events_total",
                "Watch events received, per kind.",
                &self.events,
            ),
            (
                "mesh_k8s_watch_errors_total",
                "Failed watch or list requests (retried with back-off), per kind.",
                &self.errors,
            ),
            (
                "mesh_k8s_relists_total",
                "Full lists (start, 410 Gone, lost watch), per kind.",
                &self.relists,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (k, v) in KINDS.iter().zip(values) {
                let _ = writeln!(out, "{name}{{kind=\"{k}\"}} {}", v.load(Relaxed));
            }
        }
        let _ = writeln!(
            out,
            "# HELP mesh_k8s_snapshots_total Snapshots published from the Kubernetes state.\n# TYPE mesh_k8s_snapshots_total counter\nmesh_k8s_snapshots_total {}",
            self.snapshots.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP mesh_k8s_events_posted_total Kubernetes Events posted (pods whose network namespace is not found).\n# TYPE mesh_k8s_events_posted_total counter\nmesh_k8s_events_posted_total {}",
            self.events_posted.load(Relaxed)
        );
    }

    pub fn json(&self) -> serde_json::Value {
        let per_kind = |a: &[AtomicU64; KINDS.len()]| {
            KINDS
                .iter()
                .zip(a)
                .map(|(k, v)| (k.to_string(), serde_json::json!(v.load(Relaxed))))
                .collect::<serde_json::Map<_, _>>()
        };
        serde_json::json!({
            "synced": self.synced.load(Relaxed),
            "watch_events": per_kind(&self.events),
            "watch_errors": per_kind(&self.errors),
            "relists": per_kind(&self.relists),
            "snapshots": self.snapshots.load(Relaxed),
            "events_posted": self.events_posted.load(Relaxed),
        })
    }
}

pub struct Options {
    /// The node whose pods are workloads; `None` (a standalone control plane): no pods
    /// are watched, only what the control plane serves.
    pub node_name: Option<String>,
    pub trust_domain: String,
    pub excludes: Vec<ExcludeRule>,
    pub locator: PodLocator,
}

/// A client from `--kubeconfig`, else the in-cluster service account, else `KUBECONFIG`
/// or `~/.kube/config`; checked with one request so a wrong address fails at start.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client, Error> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
                path: path.to_owned(),
                source,
            })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| Error::Kubeconfig {
                    path: path.to_owned(),
                    source,
                })?
        }
        None => kube::Config::infer().await.map_err(Error::Infer)?,
    };
    let url = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(Error::Client)?;
    client
        .apiserver_version()
        .await
        .map_err(|source| Error::Unreachable { url, source })?;
    Ok(client)
}

fn http_route_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: routes::GROUP.into(),
        version: "v1".into(),
        api_version: format!("{}/v1", routes::GROUP),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// What the agent never reads is dropped before an object is stored: in a real cluster
/// most of an object is server-side apply's `managedFields`, kubectl's last-applied
/// annotation, container specs and statuses. Only what `state::build` reads stays.
/// (Services and EndpointSlices, every one of the cluster's, go further: `compact`.)
pub trait Slim: Resource + Sized {
    fn slim(&mut self) {
        slim_meta(self);
    }
}

impl Slim for Namespace {
    fn slim(&mut self) {
        slim_meta(self);
        self.spec = None;
        self.status = None;
    }
}

impl Slim for Pod {
    fn slim(&mut self) {
        slim_meta(self);
        if let Some(spec) = self.spec.as_mut() {
            spec.containers = Vec::new();
            spec.init_containers = None;
            spec.ephemeral_containers = None;
            spec.volumes = None;
            spec.affinity = None;
            spec.tolerations = None;
            spec.topology_spread_constraints = None;
        }
        if let Some(st) = self.status.as_mut() {
            st.container_statuses = None;
            st.init_container_statuses = None;
            st.ephemeral_container_statuses = None;
            st.conditions = None;
        }
    }
}

impl Slim for ServiceAccount {
    fn slim(&mut self) {
        slim_meta(self);
        self.secrets = None;
        self.image_pull_secrets = None;
    }
}

impl Slim for DynamicObject {
    fn slim(&mut self) {
        slim_meta(self);
        if let Some(o) = self.data.as_object_mut() {
            o.remove("status");
        }
    }
}

/// The metadata part of `Slim::slim`.
fn slim_meta<K: Resource>(o: &mut K) {
    let meta = o.meta_mut();
    meta.managed_fields = None;
    meta.owner_references = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// Runs one watch whose objects are kept compact in the returned store (`compact`): each
/// event's object is converted on arrival and dropped. Events as `spawn_reflector`'s.
fn spawn_compact<K, T>(
    kind: usize,
    api: Api<K>,
    hint: &'static str,
    notify: Arc<Notify>,
    stats: Arc<Stats>,
) -> compact::CompactStore<T>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    T: From<K> + compact::Keyed + PartialEq + Send + Sync + 'static,
{
    let store = compact::CompactStore::default();
    let writer = store.clone();
    let name = KINDS[kind];
    tokio::spawn(
        async move {
            let stream = watcher(api, watcher::Config::default()).default_backoff();
            futures_util::pin_mut!(stream);
            let mut last_log: Option<Instant> = None;
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(ev) => {
                        stats.events[kind].fetch_add(1, Relaxed);
                        let changed = match ev {
                            watcher::Event::Init => {
                                stats.relists[kind].fetch_add(1, Relaxed);
                                writer.relist_start();
                                false
                            }
                            watcher::Event::InitApply(o) => {
                                writer.relist_apply(T::from(o));
                                false
                            }
                            watcher::Event::InitDone => {
                                writer.relist_done();
                                true
                            }
                            // An event for a field the build does not read changes nothing.
                            watcher::Event::Apply(o) => writer.apply(T::from(o)),
                            watcher::Event::Delete(o) => writer.delete(&T::from(o)),
                        };
                        if changed {
                            notify.notify_one();
                        }
                    }
                    Err(e) => watch_failed(&stats, kind, &e, hint, &mut last_log),
                }
            }
        }
        .instrument(tracing::info_span!("watch", kind = name)),
    );
    store
}

/// Counts a failed watch of `KINDS[kind]` and logs it: a warning at most once per
/// `WATCH_ERROR_LOG_PERIOD` (`hint` ends it), debug lines in between.
fn watch_failed(
    stats: &Stats,
    kind: usize,
    e: &dyn std::fmt::Display,
    hint: &str,
    last_log: &mut Option<Instant>,
) {
    let name = KINDS[kind];
    stats.errors[kind].fetch_add(1, Relaxed);
    if last_log.is_none_or(|t| t.elapsed() > WATCH_ERROR_LOG_PERIOD) {
        *last_log = Some(Instant::now());
        warn!(kind = name, error = %e, "watch failed; retrying with back-off ({hint})");
    } else {
        debug!(kind = name, error = %e, "watch failed again");
    }
}

/// Waits until the store's first list ended. Polled (every 5 ms, at start-up only): the
/// watch's wake-up goes to the builder's `notify`, which must stay unconsumed until the
/// first build.
async fn compact_ready<T: compact::Keyed + PartialEq>(store: &compact::CompactStore<T>) {
    while !store.is_ready() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs one reflector writing `writer`'s store; `notify` is woken on every change.
/// `hint` ends the warning a failing watch logs (at most once per 30 s).
fn spawn_reflector<K>(
    kind: usize,
    api: Api<K>,
    writer: Writer<K>,
    config: watcher::Config,
    hint: &'static str,
    notify: Arc<Notify>,
    stats: Arc<Stats>,
) -> Store<K>
where
    K: Slim + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let reader = writer.as_reader();
    let name = KINDS[kind];
    tokio::spawn(
        async move {
            let stream = reflector::reflector(
                writer,
                watcher(api, config).default_backoff().modify(K::slim),
            );
            futures_util::pin_mut!(stream);
            let mut last_log: Option<Instant> = None;
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(ev) => {
                        stats.events[kind].fetch_add(1, Relaxed);
                        match ev {
                            watcher::Event::Init => {
                                stats.relists[kind].fetch_add(1, Relaxed);
                            }
                            watcher::Event::InitApply(_) => {}
                            _ => notify.notify_one(),
                        }
                    }
                    Err(e) => watch_failed(&stats, kind, &e, hint, &mut last_log),
                }
            }
        }
        .instrument(tracing::info_span!("watch", kind = name)),
    );
    reader
}

/// Watches the cluster and publishes snapshots on `tx` until the runtime stops. `synced`
/// is called once, after the first complete snapshot (every core kind listed).
pub async fn run(
    client: Client,
    opts: Options,
    tx: watch::Sender<Arc<Snapshot>>,
    stats: Arc<Stats>,
    synced: impl FnOnce(),
) {
    let notify = Arc::new(Notify::new());
    macro_rules! core_store {
        ($idx:expr, $ty:ty, $cfg:expr) => {
            spawn_reflector(
                $idx,
                Api::<$ty>::all(client.clone()),
                Writer::<$ty>::default(),
                $cfg,
                "the last state stays in force",
                notify.clone(),
                stats.clone(),
            )
        };
    }
    let namespaces = core_store!(0, Namespace, watcher::Config::default());
    let pods = opts.node_name.as_ref().map(|node| {
        core_store!(
            1,
            Pod,
            watcher::Config::default().fields(&format!("spec.nodeName={node}"))
        )
    });
    let node = opts.node_name.clone().unwrap_or_default();
    let services = spawn_compact::<Service, compact::ServiceObj>(
        2,
        Api::all(client.clone()),
        "the last state stays in force",
        notify.clone(),
        stats.clone(),
    );
    let slices = spawn_compact::<EndpointSlice, compact::SliceObj>(
        3,
        Api::all(client.clone()),
        "the last state stays in force",
        notify.clone(),
        stats.clone(),
    );
    let accounts = core_store!(4, ServiceAccount, watcher::Config::default());
    let mut route_stores = Vec::new();
    for (idx, kind, plural) in [
        (5, "HTTPRoute", "httproutes"),
        (6, "GRPCRoute", "grpcroutes"),
    ] {
        let ar = http_route_resource(kind, plural);
        route_stores.push(spawn_reflector(
            idx,
            Api::all_with(client.clone(), &ar),
            Writer::new(ar),
            watcher::Config::default(),
            "is the Gateway API CRD installed? Services are served without its routes",
            notify.clone(),
            stats.clone(),
        ));
    }

    let mut policy_stores = Vec::new();
    for (idx, kind, plural) in [
        (7, "AuthorizationPolicy", "authorizationpolicies"),
        (8, "PeerAuthentication", "peerauthentications"),
    ] {
        let ar = ApiResource {
            group: policies::GROUP.into(),
            version: "v1".into(),
            api_version: format!("{}/v1", policies::GROUP),
            kind: kind.into(),
            plural: plural.into(),
        };
        policy_stores.push(spawn_reflector(
            idx,
            Api::all_with(client.clone(), &ar),
            Writer::new(ar),
            watcher::Config::default(),
            "are Istio's security CRDs installed? No AuthorizationPolicy or PeerAuthentication applies without them",
            notify.clone(),
            stats.clone(),
        ));
    }

    // The first snapshot waits for every core kind: a partial one would release workloads.
    // Routes are optional (their CRDs may not be installed) and join when they arrive.
    let _ = namespaces.wait_until_ready().await;
    if let Some(pods) = &pods {
        let _ = pods.wait_until_ready().await;
    }
    compact_ready(&services).await;
    compact_ready(&slices).await;
    let _ = accounts.wait_until_ready().await;
    info!(node = %node, "kubernetes state listed");

    let mut synced = Some(synced);
    let mut reported: BTreeMap<String, String> = BTreeMap::new();
    let mut problems_seen: BTreeSet<String> = BTreeSet::new();
    let mut policy_problems_seen: BTreeSet<String> = BTreeSet::new();
    let mut retry = tokio::time::interval(RESOLVE_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Converted Services, kept across builds: a change converts what it touches only.
    let cache = Arc::new(std::sync::Mutex::new(state::ServiceCache::default()));
    loop {
        let built_at = tokio::time::Instant::now();
        // Objects and what changed since the last build, together: the build converts
        // what the changes touch (`state::ServiceCache::changes`).
        let (service_objs, service_changes) = services.state_and_changes();
        let (slice_objs, slice_changes) = slices.state_and_changes();
        let changes = match (service_changes, slice_changes) {
            (Some(services), Some(slices)) => Some(state::Changes { services, slices }),
            _ => None,
        };
        let cluster = state::Cluster {
            namespaces: namespaces.state(),
            pods: pods.as_ref().map(Store::state).unwrap_or_default(),
            services: service_objs,
            slices: slice_objs,
            service_accounts: accounts.state(),
            http_routes: route_stores[0].state(),
            grpc_routes: route_stores[1].state(),
        };
        let uids: BTreeSet<String> = cluster.pods.iter().filter_map(|p| p.uid()).collect();
        // Pod lookups walk cgroupfs and /proc: the build runs on a blocking thread.
        let (excludes, trust_domain) = (opts.excludes.clone(), opts.trust_domain.clone());
        let cache = cache.clone();
        let built = opts
            .locator
            .blocking(move |locator| {
                locator.retain(&uids);
                let opts = state::Options {
                    excludes: &excludes,
                    trust_domain: &trust_domain,
                };
                // Only this builder uses the cache: the lock is never contended.
                let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
                cache.changes = changes;
                state::build_cached(
                    &cluster,
                    &opts,
                    &mut |p| locator.netns(&p.uid().unwrap_or_default()),
                    &mut cache,
                )
            })
            .await;
        for p in &built.route_problems {
            if problems_seen.insert(p.clone()) {
                warn!(problem = %p, "route rule not applied");
            }
        }
        problems_seen.retain(|p| built.route_problems.contains(p));
        // One Kubernetes Event per pod and reason, so `kubectl describe pod` shows it.
        let now: BTreeMap<String, String> = built
            .unresolved
            .iter()
            .map(|u| (u.uid.clone(), u.reason.clone()))
            .collect();
        for u in &built.unresolved {
            if reported.get(&u.uid) != Some(&u.reason) {
                post_event(&client, &node, u, &stats);
            }
        }
        reported = now;
        let mut snap = built.snapshot;
        let mut policy_problems = Vec::new();
        let security = policies::security(
            &policy_stores[0].state(),
            &policy_stores[1].state(),
            &mut policy_problems,
        );
        for p in &policy_problems {
            if policy_problems_seen.insert(p.clone()) {
                warn!(problem = %p, "security policy not carried as written");
            }
        }
        policy_problems_seen.retain(|p| policy_problems.contains(p));
        // Kept by pointer while equal: the control plane then compares nothing.
        snap.security = match tx.borrow().security.clone() {
            cur if *cur == security => cur,
            _ => Arc::new(security),
        };
        tx.send_if_modified(|cur| {
            if cur.same_as(&snap) {
                return false;
            }
            stats.snapshots.fetch_add(1, Relaxed);
            info!(
                workloads = snap.workloads.len(),
                enrolled = snap.workloads.iter().filter(|w| w.enrolled).count(),
                unresolved = built.unresolved.len(),
                services = snap.services.len(),
                "kubernetes state changed"
            );
            *cur = Arc::new(snap);
            true
        });
        if let Some(f) = synced.take() {
            stats.synced.store(true, Relaxed);
            f();
        }
        // Wait for a change, or for an unresolved pod's lookup to give another answer (the
        // retry looks up those pods only; the whole state is rebuilt when one changed).
        loop {
            if reported.is_empty() {
                notify.notified().await;
                break;
            }
            tokio::select! {
                _ = notify.notified() => break,
                _ = retry.tick() => {
                    let reported = reported.clone();
                    let changed = opts.locator.blocking(move |locator| {
                        reported.iter().any(|(uid, reason)| {
                            locator.netns(uid).err().as_ref() != Some(reason)
                        })
                    }).await;
                    if changed {
                        break;
                    }
                }
            }
        }
        // Events that arrived together (one watch response, several stores woken) are
        // taken by one build: the reflectors run on this runtime, let them run first.
        tokio::task::yield_now().await;
        tokio::time::sleep_until(built_at + DEBOUNCE).await;
    }
}

fn post_event(client: &Client, node: &str, u: &state::Unresolved, stats: &Arc<Stats>) {
    let now =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let ev = K8sEvent {
        metadata: kube::api::ObjectMeta {
            generate_name: Some(format!("{}.", u.name)),
            namespace: Some(u.namespace.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(u.name.clone()),
            namespace: Some(u.namespace.clone()),
            uid: Some(u.uid.clone()),
            ..Default::default()
        },
        reason: Some("MeshNetnsUnresolved".into()),
        message: Some(format!(
            "mesh-agent on {node} cannot find the pod's network namespace, so its traffic is not captured yet (retrying every {}s): {}",
            RESOLVE_RETRY.as_secs(),
            u.reason
        )),
        type_: Some("Warning".into()),
        count: Some(1),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        reporting_component: Some("mesh-agent".into()),
        reporting_instance: Some(node.to_owned()),
        source: Some(k8s_openapi::api::core::v1::EventSource {
            component: Some("mesh-agent".into()),
            host: Some(node.to_owned()),
        }),
        ..Default::default()
    };
    let api: Api<K8sEvent> = Api::namespaced(client.clone(), &u.namespace);
    let stats = stats.clone();
    tokio::spawn(
        async move {
            match api.create(&PostParams::default(), &ev).await {
                Ok(_) => {
                    stats.events_posted.fetch_add(1, Relaxed);
                }
                Err(e) => debug!(error = %e, "could not post the event"),
            }
        }
        .instrument(tracing::info_span!("post_event")),
    );
}
