//! Kubernetes callers of the embedded CA, as istiod authenticates them: a bearer token that
//! is not a node credential is a projected ServiceAccount token, checked with a
//! `TokenReview` (authentication.k8s.io/v1) for the CA's audience through the agent's own
//! kube client. It must be authenticated, belong to the mesh agent's ServiceAccount, and be
//! bound to a pod; that pod's node is the caller's node:
//!
//! - `status.user.extra["authentication.kubernetes.io/node-name"]` when the API server puts
//!   it there (Kubernetes 1.30+, pod-bound tokens);
//! - else the bound pod (`.../pod-name`, `.../pod-uid`, in the ServiceAccount's namespace)
//!   is read and its `spec.nodeName` taken (the UID must match: a pod re-created under the
//!   same name is another pod).
//!
//! What runs on that node is the service accounts of its pods
//! (`fieldSelector=spec.nodeName=<node>`, finished pods left out), listed on demand.
//!
//! **Caches**, both bounded and short, so a burst of CSRs (an agent starting with many
//! pods) costs one review and one list, while a deleted pod or a revoked token stops
//! counting within seconds: reviews by SHA-256 of the token (`REVIEW_TTL`; the token itself
//! is not kept), node listings for `PODS_TTL`. Only successes are cached.
//!
//! **Errors.** A token the API server does not accept, of another ServiceAccount or not
//! bound to a pod: `UNAUTHENTICATED` with the reason. The API server unreachable, failing,
//! or refusing the agent (RBAC: the agent needs `create` on `tokenreviews`, e.g. the
//! `system:auth-delegator` ClusterRole, and `get`/`list` on pods): `UNAVAILABLE`.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{SelfSubjectReview, TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{
    api::{ListParams, PostParams},
    Api, Client,
};
use tokio::sync::OnceCell;
use tracing::{debug, info};

use super::CaError;
use crate::identity::SpiffeId;

/// The audience a caller's token must be for, by default (istiod's).
pub const DEFAULT_AUDIENCE: &str = "istio-ca";
/// How long a successful review is reused.
pub const REVIEW_TTL: Duration = Duration::from_secs(10);
/// Most reviews held.
pub const MAX_REVIEWS: usize = 4096;
/// How long a node's listing of pods is reused.
pub const PODS_TTL: Duration = Duration::from_secs(2);
/// Most nodes' listings held.
pub const MAX_NODES: usize = 1024;
/// How long one API request of a review may take: the kube client retries 429/503/504
/// with back-off by itself, and a CSR must fail (`UNAVAILABLE`) well before its caller's
/// own deadline (10 s for ours) rather than hang.
pub const API_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest token sent for review (bytes); projected tokens are about 1 KiB.
pub const MAX_TOKEN_BYTES: usize = 16 << 10;
/// The TokenReview's `status.user.extra` keys of a pod-bound token.
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const SA_PREFIX: &str = "system:serviceaccount:";

/// Who may call: the options of `KubeCallers`.
#[derive(Debug, Clone)]
pub struct KubeCallerOptions {
    /// The audience tokens must be issued for.
    pub audience: String,
    /// The mesh agent's ServiceAccount (namespace, name); `None`: the one this agent runs
    /// as, asked of the API server (`SelfSubjectReview`) at the first request.
    pub service_account: Option<(String, String)>,
    pub trust_domain: String,
}

/// The Kubernetes half of the CA's authentication (see the module documentation).
pub struct KubeCallers {
    client: Client,
    opts: KubeCallerOptions,
    agent_sa: OnceCell<(String, String)>,
    reviews: Mutex<HashMap<[u8; 32], (Instant, String)>>,
    pods: Mutex<HashMap<String, (Instant, NodeIds)>>,
}

/// The identities of one node's pods.
type NodeIds = Arc<BTreeSet<SpiffeId>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// SHA-256 (ring's, through rustls: the one crypto stack of the binary).
fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    if let Some(suite) = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256.tls13() {
        let h = suite.common.hash_provider.hash(data);
        out.copy_from_slice(&h.as_ref()[..32]);
    }
    out
}

/// `system:serviceaccount:<ns>:<name>` -> (ns, name).
pub fn service_account_of(username: &str) -> Option<(String, String)> {
    let (ns, name) = username.strip_prefix(SA_PREFIX)?.split_once(':')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains(':'))
        .then(|| (ns.to_owned(), name.to_owned()))
}

/// Inserts into a bounded map of timed entries: expired entries go first, and when every
/// entry is still fresh the map is emptied (a burst of distinct callers only costs them a
/// new review).
fn insert_bounded<K: std::hash::Hash + Eq, V>(
    map: &mut HashMap<K, (Instant, V)>,
    max: usize,
    ttl: Duration,
    key: K,
    value: V,
) {
    if map.len() >= max {
        map.retain(|_, (at, _)| at.elapsed() < ttl);
        if map.len() >= max {
            map.clear();
        }
    }
    map.insert(key, (Instant::now(), value));
}

/// `call` within `API_TIMEOUT`, its errors as `UNAVAILABLE`.
async fn api_call<T>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, CaError> {
    match tokio::time::timeout(API_TIMEOUT, call).await {
        Ok(r) => r.map_err(unavailable(what)),
        Err(_) => Err(CaError::Unavailable(format!(
            "{what}: the Kubernetes API server did not answer within {API_TIMEOUT:?}"
        ))),
    }
}

fn unavailable(what: &str) -> impl FnOnce(kube::Error) -> CaError + '_ {
    move |e| {
        let hint = match &e {
            kube::Error::Api(s) if s.code == 401 || s.code == 403 => {
                " (the agent's ServiceAccount needs `create` on tokenreviews, e.g. the \
                 system:auth-delegator ClusterRole, and `get`/`list` on pods)"
            }
            _ => "",
        };
        CaError::Unavailable(format!("{what}: {e}{hint}"))
    }
}

impl KubeCallers {
    pub fn new(client: Client, opts: KubeCallerOptions) -> KubeCallers {
        KubeCallers {
            client,
            opts,
            agent_sa: OnceCell::new(),
            reviews: Mutex::default(),
            pods: Mutex::default(),
        }
    }

    /// The ServiceAccount callers must be: configured, else this agent's own.
    async fn agent_service_account(&self) -> Result<&(String, String), CaError> {
        self.agent_sa
            .get_or_try_init(|| async {
                if let Some(sa) = &self.opts.service_account {
                    return Ok(sa.clone());
                }
                let me = api_call(
                    "asking the API server who this agent is (SelfSubjectReview)",
                    Api::<SelfSubjectReview>::all(self.client.clone())
                        .create(&PostParams::default(), &SelfSubjectReview::default()),
                )
                .await?;
                let user = me
                    .status
                    .and_then(|s| s.user_info)
                    .and_then(|u| u.username)
                    .unwrap_or_default();
                let sa = service_account_of(&user).ok_or_else(|| {
                    CaError::Unavailable(format!(
                        "this agent runs as {user:?}, not a ServiceAccount: name the agents' one \
                         with --ca-k8s-service-account NAMESPACE/NAME"
                    ))
                })?;
                info!(namespace = %sa.0, name = %sa.1, "CA callers must be this ServiceAccount");
                Ok(sa)
            })
            .await
    }

    /// The node of the agent that presented `token` (a projected ServiceAccount token).
    pub async fn node_of(&self, token: &[u8]) -> Result<String, CaError> {
        let Ok(token) = std::str::from_utf8(token) else {
            return Err(CaError::Unauthenticated(
                "the bearer token is not text".into(),
            ));
        };
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(CaError::Unauthenticated(format!(
                "a bearer token of {} bytes (at most {MAX_TOKEN_BYTES})",
                token.len()
            )));
        }
        let key = sha256(token.as_bytes());
        if let Some((at, node)) = lock(&self.reviews).get(&key) {
            if at.elapsed() < REVIEW_TTL {
                return Ok(node.clone());
            }
        }
        let want = self.agent_service_account().await?.clone();
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.opts.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let status = api_call(
            "TokenReview",
            Api::<TokenReview>::all(self.client.clone()).create(&PostParams::default(), &review),
        )
        .await?
        .status
        .unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(CaError::Unauthenticated(format!(
                "the API server does not accept the token for audience {:?}: {}",
                self.opts.audience,
                status.error.as_deref().unwrap_or("not authenticated")
            )));
        }
        // An API server that ignores `spec.audiences` (none does since 1.13) must not let
        // a token for another audience through.
        if let Some(auds) = &status.audiences {
            if !auds.contains(&self.opts.audience) {
                return Err(CaError::Unauthenticated(format!(
                    "the token is for {auds:?}, not {:?}",
                    self.opts.audience
                )));
            }
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some(sa) = service_account_of(&username) else {
            return Err(CaError::Unauthenticated(format!(
                "{username:?} is not a ServiceAccount"
            )));
        };
        if sa != want {
            return Err(CaError::Unauthenticated(format!(
                "ServiceAccount {}/{} is not the mesh agent's ({}/{})",
                sa.0, sa.1, want.0, want.1
            )));
        }
        let extra = user.extra.unwrap_or_default();
        let one = |k: &str| {
            extra
                .get(k)
                .and_then(|v| v.first())
                .filter(|v| !v.is_empty())
        };
        let node = match (
            one(EXTRA_NODE_NAME),
            one(EXTRA_POD_NAME),
            one(EXTRA_POD_UID),
        ) {
            (Some(node), _, _) => node.clone(),
            (None, Some(pod), Some(uid)) => self.node_of_pod(&sa.0, pod, uid).await?,
            _ => {
                return Err(CaError::Unauthenticated(format!(
                    "the token of {username} is not bound to a pod (use a projected \
                     ServiceAccount token with audience {:?})",
                    self.opts.audience
                )))
            }
        };
        debug!(%username, %node, "CA caller authenticated by TokenReview");
        insert_bounded(
            &mut lock(&self.reviews),
            MAX_REVIEWS,
            REVIEW_TTL,
            key,
            node.clone(),
        );
        Ok(node)
    }

    async fn node_of_pod(&self, ns: &str, pod: &str, uid: &str) -> Result<String, CaError> {
        let p = api_call(
            "reading the token's pod",
            Api::<Pod>::namespaced(self.client.clone(), ns).get_opt(pod),
        )
        .await?
        .ok_or_else(|| {
            CaError::Unauthenticated(format!("the token's pod {ns}/{pod} does not exist"))
        })?;
        if p.metadata.uid.as_deref() != Some(uid) {
            return Err(CaError::Unauthenticated(format!(
                "the token's pod {ns}/{pod} (uid {uid}) does not exist any more"
            )));
        }
        p.spec
            .and_then(|s| s.node_name)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                CaError::Unauthenticated(format!("the token's pod {ns}/{pod} is on no node yet"))
            })
    }

    /// The identities of the pods on `node` (finished pods left out).
    pub async fn identities_on(&self, node: &str) -> Result<NodeIds, CaError> {
        if let Some((at, ids)) = lock(&self.pods).get(node) {
            if at.elapsed() < PODS_TTL {
                return Ok(ids.clone());
            }
        }
        let params = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let pods = api_call(
            "listing the caller's node's pods",
            Api::<Pod>::all(self.client.clone()).list(&params),
        )
        .await?;
        let ids: BTreeSet<SpiffeId> = pods
            .items
            .iter()
            // The server filters; this guards against one that ignores the selector.
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
            .filter(|p| {
                let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
                !matches!(phase, Some("Succeeded" | "Failed"))
            })
            .filter_map(|p| {
                let ns = p.metadata.namespace.as_deref()?;
                let sa = p
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.as_deref())
                    .filter(|s| !s.is_empty())
                    .unwrap_or("default");
                SpiffeId::new(&self.opts.trust_domain, ns, sa).ok()
            })
            .collect();
        let ids = Arc::new(ids);
        insert_bounded(
            &mut lock(&self.pods),
            MAX_NODES,
            PODS_TTL,
            node.to_owned(),
            ids.clone(),
        );
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_usernames() {
        assert_eq!(
            service_account_of("system:serviceaccount:mesh-system:mesh-agent"),
            Some(("mesh-system".into(), "mesh-agent".into()))
        );
        for bad in [
            "system:serviceaccount:ns",
            "system:serviceaccount::x",
            "system:serviceaccount:ns:",
            "system:serviceaccount:a:b:c",
            "kubernetes-admin",
            "system:node:n1",
        ] {
            assert_eq!(service_account_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn caches_are_bounded_and_hash_tokens() {
        let mut m = HashMap::new();
        for i in 0..10 {
            insert_bounded(&mut m, 4, Duration::from_secs(60), i, i);
            assert!(m.len() <= 4);
        }
        assert_eq!(m.get(&9).map(|(_, v)| *v), Some(9));
        assert_ne!(sha256(b"a"), sha256(b"b"));
        assert_ne!(sha256(b"a"), [0; 32]);
    }
}
