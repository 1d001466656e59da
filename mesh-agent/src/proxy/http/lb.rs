//! Load balancing and outlier detection: the runtime state of one cluster, kept by cluster
//! name across config pushes (round-robin weights, the hash ring, per-endpoint request
//! counts, ejections and connection pools).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicI64, AtomicU32, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use tokio::time::Instant;

use super::{
    policy::Counters,
    pool::{EndpointPool, TunnelPools},
    route::hash64,
};
use crate::proxy::config::{Cluster, Health, LbPolicy, OutlierDetection};

/// Envoy's `max_ejection_time` default: ejections grow with `times_ejected` up to this.
const MAX_EJECTION: Duration = Duration::from_secs(300);
/// Envoy's default `maximum_ring_size` is 8M entries; this proxy keeps rings smaller.
const MAX_RING: u64 = 1 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Default)]
struct Outlier {
    consecutive: u32,
    ejected_until: Option<Instant>,
    times_ejected: u32,
}

impl Outlier {
    fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|u| now < u)
    }
}

/// One endpoint's runtime state.
#[derive(Debug)]
pub(super) struct EndpointState {
    pub address: SocketAddr,
    /// Requests in flight (least-request balancing).
    pub active: AtomicU32,
    /// Smooth weighted round robin: the endpoint's current weight (changed only under
    /// the cluster state's lock; kept across pushes with the endpoint).
    rr: AtomicI64,
    outlier: Mutex<Outlier>,
    pub pool: EndpointPool,
    /// Connections through HBONE, per tunnel (when the endpoint is another node's mesh
    /// workload).
    pub tunnels: TunnelPools,
}

impl EndpointState {
    fn new(address: SocketAddr) -> Self {
        EndpointState {
            address,
            active: AtomicU32::new(0),
            rr: AtomicI64::new(0),
            outlier: Mutex::default(),
            pool: EndpointPool::default(),
            tunnels: TunnelPools::default(),
        }
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        lock(&self.outlier).is_ejected(now)
    }
}

#[derive(Debug)]
struct Ring {
    /// (hash, endpoint index in `Cluster::endpoints`), sorted by hash.
    entries: Vec<(u64, usize)>,
}

impl Ring {
    fn build(cluster: &Cluster, minimum: u64) -> Ring {
        let members: Vec<(usize, u64)> = cluster
            .endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| e.health != Health::Unhealthy)
            .map(|(i, e)| (i, u64::from(e.weight.max(1))))
            .collect();
        let total: u64 = members.iter().map(|(_, w)| w).sum();
        let size = minimum.clamp(1, MAX_RING);
        let mut entries = Vec::new();
        for (i, w) in members {
            // Entries in proportion to weight, at least one each.
            let n = (size * w).div_ceil(total).max(1);
            let addr = cluster.endpoints[i].address.to_string();
            for k in 0..n {
                entries.push((hash64(format!("{addr}_{k}").as_bytes()), i));
            }
        }
        entries.sort_unstable();
        Ring { entries }
    }

    /// The first eligible endpoint clockwise from `hash`.
    fn lookup(&self, hash: u64, eligible: &[bool]) -> Option<usize> {
        let start = self.entries.partition_point(|(h, _)| *h < hash);
        (0..self.entries.len())
            .map(|k| self.entries[(start + k) % self.entries.len()].1)
            .find(|i| eligible[*i])
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// The config version the state below was built for.
    cluster: Option<Arc<Cluster>>,
    endpoints: HashMap<SocketAddr, Arc<EndpointState>>,
    /// The state of each of `cluster`'s endpoints, by its index there: a pick reads no map.
    slots: Vec<Arc<EndpointState>>,
    ring: Option<Ring>,
}

/// The runtime state of one cluster.
#[derive(Debug, Default)]
pub(super) struct ClusterState {
    pub counters: Arc<Counters>,
    inner: Mutex<Inner>,
}

impl ClusterState {
    /// Brings the endpoint table up to date with a new config version: endpoints that
    /// left are dropped (closing their idle connections), new ones start clean.
    fn sync<'a>(inner: &'a mut Inner, cluster: &Arc<Cluster>) -> &'a mut Inner {
        if !inner
            .cluster
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, cluster))
        {
            let keep: std::collections::HashSet<SocketAddr> =
                cluster.endpoints.iter().map(|e| e.address).collect();
            inner.endpoints.retain(|a, _| keep.contains(a));
            // An ejection is the verdict of one policy: when the policy changes or goes,
            // nothing may keep an endpoint out (Envoy drops its detector with the policy).
            if inner
                .cluster
                .as_ref()
                .is_some_and(|c| c.outlier != cluster.outlier)
            {
                for e in inner.endpoints.values() {
                    *lock(&e.outlier) = Outlier::default();
                }
            }
            for a in &keep {
                inner
                    .endpoints
                    .entry(*a)
                    .or_insert_with(|| Arc::new(EndpointState::new(*a)));
            }
            let slots = cluster
                .endpoints
                .iter()
                .filter_map(|e| inner.endpoints.get(&e.address).cloned())
                .collect();
            inner.slots = slots;
            inner.ring = None;
            inner.cluster = Some(cluster.clone());
        }
        inner
    }

    /// Picks an endpoint by the cluster's policy among healthy, non-ejected endpoints
    /// (degraded ones only when no healthy one is left). `hash` feeds ring hash.
    pub fn pick(&self, cluster: &Arc<Cluster>, hash: Option<u64>) -> Option<Arc<EndpointState>> {
        self.pick_at(cluster, hash, Instant::now())
    }

    /// `pick` at `now` (the caller's clock read).
    pub fn pick_at(
        &self,
        cluster: &Arc<Cluster>,
        hash: Option<u64>,
        now: Instant,
    ) -> Option<Arc<EndpointState>> {
        let mut guard = lock(&self.inner);
        let inner = Self::sync(&mut guard, cluster);
        let eps = &cluster.endpoints;
        let slots = &inner.slots;
        // One endpoint (a service with one pod, the common case): no sets to build.
        if let ([e], [s]) = (&eps[..], &slots[..]) {
            let ok = matches!(e.health, Health::Healthy | Health::Degraded) && !s.is_ejected(now);
            return ok.then(|| s.clone());
        }
        let usable = |want: Health| -> Vec<bool> {
            eps.iter()
                .zip(slots)
                .map(|(e, s)| e.health == want && !s.is_ejected(now))
                .collect()
        };
        let mut eligible = usable(Health::Healthy);
        if !eligible.contains(&true) {
            eligible = usable(Health::Degraded);
        }
        let set: Vec<usize> = (0..eps.len()).filter(|i| eligible[*i]).collect();
        if set.is_empty() {
            return None;
        }
        let weight = |i: usize| i64::from(eps[i].weight.max(1));
        let chosen = match cluster.lb {
            LbPolicy::RoundRobin => {
                let total: i64 = set.iter().map(|i| weight(*i)).sum();
                let mut best: Option<(i64, usize)> = None;
                for &i in &set {
                    let cur = slots[i].rr.fetch_add(weight(i), Ordering::Relaxed) + weight(i);
                    if best.is_none_or(|(b, _)| cur > b) {
                        best = Some((cur, i));
                    }
                }
                let (_, i) = best?;
                slots[i].rr.fetch_sub(total, Ordering::Relaxed);
                i
            }
            LbPolicy::LeastRequest { choice_count } => {
                let load = |i: usize| {
                    let a = slots[i].active.load(Ordering::Relaxed);
                    (i64::from(a), weight(i))
                };
                // Fewer requests per unit of weight wins: a/w < b/v as a*v < b*w.
                let better = |a: usize, b: usize| {
                    let ((la, wa), (lb, wb)) = (load(a), load(b));
                    la * wb < lb * wa
                };
                let n = choice_count.max(1) as usize;
                let candidates: Vec<usize> = if n >= set.len() {
                    set.clone()
                } else {
                    (0..n).map(|_| set[fastrand::usize(..set.len())]).collect()
                };
                candidates
                    .into_iter()
                    .reduce(|a, b| if better(b, a) { b } else { a })?
            }
            LbPolicy::Random => weighted_random(&set, weight),
            LbPolicy::RingHash { minimum_ring_size } => match hash {
                Some(h) => {
                    let ring = inner
                        .ring
                        .get_or_insert_with(|| Ring::build(cluster, minimum_ring_size));
                    ring.lookup(h, &eligible)
                        .unwrap_or_else(|| weighted_random(&set, weight))
                }
                None => weighted_random(&set, weight),
            },
        };
        slots.get(chosen).cloned()
    }

    /// The endpoints of `cluster` outlier detection keeps out, with when each comes back.
    pub fn ejections(&self, cluster: &Arc<Cluster>) -> HashMap<SocketAddr, Instant> {
        let now = Instant::now();
        let mut guard = lock(&self.inner);
        // Synced first: a push that removed the policy has ended its ejections already,
        // even if no request came since.
        let inner = Self::sync(&mut guard, cluster);
        inner
            .endpoints
            .iter()
            .filter_map(|(a, e)| {
                let o = lock(&e.outlier);
                o.is_ejected(now).then_some((*a, o.ejected_until?))
            })
            .collect()
    }

    /// Feeds outlier detection with one try's result; true when it ejected the endpoint.
    pub fn report(&self, cluster: &Cluster, ep: &EndpointState, failed: bool) -> bool {
        self.report_at(cluster, ep, failed, Instant::now())
    }

    fn report_at(&self, cluster: &Cluster, ep: &EndpointState, failed: bool, now: Instant) -> bool {
        let Some(od) = cluster.outlier else {
            return false;
        };
        let inner = lock(&self.inner);
        // A try that began before a push changed the policy is no evidence under the new one.
        if inner
            .cluster
            .as_ref()
            .is_some_and(|c| c.outlier != cluster.outlier)
        {
            return false;
        }
        {
            let mut o = lock(&ep.outlier);
            if !failed {
                o.consecutive = 0;
                return false;
            }
            o.consecutive += 1;
            if o.consecutive < od.consecutive_5xx.max(1) || o.is_ejected(now) {
                return false;
            }
        }
        let total = inner.endpoints.len().max(1);
        let ejected = inner
            .endpoints
            .values()
            .filter(|e| !std::ptr::eq(Arc::as_ptr(e), ep) && e.is_ejected(now))
            .count();
        // Envoy: at most `max_ejection_percent`, but one ejection is always allowed.
        if ejected > 0 && (ejected + 1) * 100 > total * od.max_ejection_percent as usize {
            return false;
        }
        eject(&mut lock(&ep.outlier), &od, now);
        true
    }
}

fn eject(o: &mut Outlier, od: &OutlierDetection, now: Instant) {
    // Envoy lowers `times_ejected` by one per `interval` spent back in service.
    if let Some(back) = o.ejected_until {
        let interval = od.interval.max(Duration::from_millis(1));
        let ticks = now.saturating_duration_since(back).as_nanos() / interval.as_nanos();
        o.times_ejected = o
            .times_ejected
            .saturating_sub(u32::try_from(ticks).unwrap_or(u32::MAX));
    }
    o.times_ejected += 1;
    let cap = MAX_EJECTION.max(od.base_ejection_time);
    o.ejected_until = Some(
        now + od
            .base_ejection_time
            .saturating_mul(o.times_ejected)
            .min(cap),
    );
    o.consecutive = 0;
}

fn weighted_random(set: &[usize], weight: impl Fn(usize) -> i64) -> usize {
    let total: i64 = set.iter().map(|i| weight(*i)).sum();
    let mut n = fastrand::i64(0..total.max(1));
    for &i in set {
        if n < weight(i) {
            return i;
        }
        n -= weight(i);
    }
    set[set.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::config::{CircuitBreaker, Endpoint, UpstreamProtocol};

    fn cluster(lb: LbPolicy, eps: &[(u16, u32, Health)]) -> Arc<Cluster> {
        Arc::new(Cluster {
            name: "c".into(),
            lb,
            protocol: UpstreamProtocol::Http1,
            connect_timeout: Duration::from_secs(1),
            circuit_breaker: CircuitBreaker::default(),
            outlier: Some(OutlierDetection {
                consecutive_5xx: 2,
                base_ejection_time: Duration::from_secs(10),
                max_ejection_percent: 10,
                interval: Duration::from_secs(10),
            }),
            endpoints: eps
                .iter()
                .map(|(port, weight, health)| Endpoint {
                    address: SocketAddr::from(([10, 0, 0, 1], *port)),
                    weight: *weight,
                    health: *health,
                })
                .collect(),
            endpoints_known: true,
        })
    }

    fn counts(
        s: &ClusterState,
        c: &Arc<Cluster>,
        n: usize,
        hash: Option<u64>,
    ) -> HashMap<u16, usize> {
        counts_at(s, c, n, hash, Instant::now())
    }

    fn counts_at(
        s: &ClusterState,
        c: &Arc<Cluster>,
        n: usize,
        hash: Option<u64>,
        now: Instant,
    ) -> HashMap<u16, usize> {
        let mut m = HashMap::new();
        for _ in 0..n {
            if let Some(e) = s.pick_at(c, hash, now) {
                *m.entry(e.address.port()).or_default() += 1;
            }
        }
        m
    }

    #[test]
    fn weighted_round_robin_is_exact_and_skips_unhealthy() {
        let c = cluster(
            LbPolicy::RoundRobin,
            &[
                (1, 3, Health::Healthy),
                (2, 1, Health::Healthy),
                (3, 1, Health::Unhealthy),
            ],
        );
        let s = ClusterState::default();
        let m = counts(&s, &c, 400, None);
        assert_eq!(m.get(&1), Some(&300));
        assert_eq!(m.get(&2), Some(&100));
        assert_eq!(m.get(&3), None);
    }

    #[test]
    fn degraded_only_when_nothing_healthy() {
        let c = cluster(
            LbPolicy::Random,
            &[(1, 1, Health::Degraded), (2, 1, Health::Healthy)],
        );
        let s = ClusterState::default();
        assert_eq!(counts(&s, &c, 50, None).get(&2), Some(&50));
        let c = cluster(
            LbPolicy::Random,
            &[(1, 1, Health::Degraded), (2, 1, Health::Unhealthy)],
        );
        assert_eq!(counts(&s, &c, 50, None).get(&1), Some(&50));
        let c = cluster(LbPolicy::Random, &[(2, 1, Health::Unhealthy)]);
        assert!(s.pick(&c, None).is_none());
    }

    #[test]
    fn a_single_endpoint_is_picked_while_usable() {
        let s = ClusterState::default();
        let now = Instant::now();
        for (health, lb) in [
            (Health::Healthy, LbPolicy::RoundRobin),
            (Health::Degraded, LbPolicy::Random),
            (Health::Healthy, LbPolicy::LeastRequest { choice_count: 2 }),
        ] {
            let c = cluster(lb, &[(1, 1, health)]);
            assert_eq!(counts_at(&s, &c, 5, None, now).get(&1), Some(&5));
        }
        let c = cluster(LbPolicy::RoundRobin, &[(1, 1, Health::Unhealthy)]);
        assert!(s.pick_at(&c, None, now).is_none());
        // Ejected by outlier detection (two 5xx in a row): out until the ejection ends.
        let c = cluster(LbPolicy::RoundRobin, &[(1, 1, Health::Healthy)]);
        let ep = s.pick_at(&c, None, now).unwrap();
        assert!(!s.report_at(&c, &ep, true, now));
        assert!(s.report_at(&c, &ep, true, now));
        assert!(s.pick_at(&c, None, now).is_none());
        let back = now + Duration::from_secs(10);
        assert_eq!(
            s.pick_at(&c, None, back).map(|e| e.address),
            Some(ep.address)
        );
    }

    #[test]
    fn least_request_prefers_idle_endpoints() {
        let c = cluster(
            LbPolicy::LeastRequest { choice_count: 2 },
            &[(1, 1, Health::Healthy), (2, 1, Health::Healthy)],
        );
        let s = ClusterState::default();
        let busy = s.pick(&c, None).unwrap();
        let busy = lock(&s.inner).endpoints[&busy.address].clone();
        busy.active.store(5, Ordering::Relaxed);
        let m = counts(&s, &c, 50, None);
        assert_eq!(m.get(&busy.address.port()), None, "{m:?}");
    }

    #[test]
    fn ring_hash_is_consistent_and_spreads() {
        let c = cluster(
            LbPolicy::RingHash {
                minimum_ring_size: 1024,
            },
            &[
                (1, 1, Health::Healthy),
                (2, 1, Health::Healthy),
                (3, 1, Health::Healthy),
            ],
        );
        let s = ClusterState::default();
        let mut seen = std::collections::HashSet::new();
        for k in 0..100u64 {
            let h = hash64(&k.to_le_bytes());
            let first = s.pick(&c, Some(h)).unwrap().address;
            for _ in 0..3 {
                assert_eq!(s.pick(&c, Some(h)).unwrap().address, first);
            }
            seen.insert(first);
        }
        assert_eq!(seen.len(), 3);
        // A new config version with the same endpoints maps keys the same way.
        let again = cluster(
            LbPolicy::RingHash {
                minimum_ring_size: 1024,
            },
            &[
                (1, 1, Health::Healthy),
                (2, 1, Health::Healthy),
                (3, 1, Health::Healthy),
            ],
        );
        let h = hash64(b"alice");
        assert_eq!(
            s.pick(&c, Some(h)).unwrap().address,
            s.pick(&again, Some(h)).unwrap().address
        );
    }

    #[test]
    fn outlier_ejection_caps_and_returns() {
        let c = cluster(
            LbPolicy::RoundRobin,
            &[
                (1, 1, Health::Healthy),
                (2, 1, Health::Healthy),
                (3, 1, Health::Healthy),
            ],
        );
        let s = ClusterState::default();
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        s.pick_at(&c, None, t0);
        let ep = |p: u16| lock(&s.inner).endpoints[&SocketAddr::from(([10, 0, 0, 1], p))].clone();
        let (a, b) = (ep(1), ep(2));
        assert!(!s.report_at(&c, &a, true, t0));
        assert!(
            !s.report_at(&c, &a, false, t0),
            "a success resets the count"
        );
        assert!(!s.report_at(&c, &a, true, t0));
        assert!(
            s.report_at(&c, &a, true, t0),
            "second consecutive failure ejects"
        );
        assert_eq!(counts_at(&s, &c, 20, None, t0).get(&1), None);
        // 10% of 3 rounds to zero, yet the first ejection was allowed; a second is not.
        assert!(!s.report_at(&c, &b, true, t0));
        assert!(!s.report_at(&c, &b, true, t0));
        assert!(!b.is_ejected(t0));
        assert!(a.is_ejected(at(9)));
        assert!(
            counts_at(&s, &c, 30, None, at(10)).contains_key(&1),
            "back after the ejection time"
        );
        // Ejected again right away: twice as long.
        s.report_at(&c, &a, true, at(10));
        assert!(s.report_at(&c, &a, true, at(10)));
        assert!(a.is_ejected(at(29)));
        assert!(!a.is_ejected(at(30)));
        // After three quiet intervals the multiplier has decayed back to one.
        s.report_at(&c, &a, true, at(70));
        assert!(s.report_at(&c, &a, true, at(70)));
        assert!(!a.is_ejected(at(80)));
    }

    #[test]
    fn tries_under_a_replaced_outlier_policy_eject_nothing() {
        let eps = [(1, 1, Health::Healthy), (2, 1, Health::Healthy)];
        let old = cluster(LbPolicy::RoundRobin, &eps);
        let s = ClusterState::default();
        let t0 = Instant::now();
        let a = s.pick_at(&old, None, t0).unwrap();
        let mut new = Arc::into_inner(cluster(LbPolicy::RoundRobin, &eps)).unwrap();
        new.outlier = None;
        s.pick_at(&Arc::new(new), None, t0);
        // Tries that were in flight across the push report under the old policy.
        assert!(!s.report_at(&old, &a, true, t0));
        assert!(!s.report_at(&old, &a, true, t0));
        assert!(!a.is_ejected(t0));
    }
}
