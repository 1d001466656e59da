//! Per-request policy decisions: circuit-breaker slots, local rate-limit token buckets,
//! retry conditions and back-off, fault-injection dice.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use http::{HeaderMap, HeaderValue};
use tokio::{sync::Notify, time::Instant};

use crate::proxy::config::{RateLimit, RetryPolicy};

/// Circuit-breaker gauges of one cluster (Envoy's `DEFAULT` priority thresholds).
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub connections: AtomicU32,
    pub pending: AtomicU32,
    pub requests: AtomicU32,
    pub retries: AtomicU32,
    /// Woken when a connection closes or an idle one comes back, for pending requests.
    pub released: Notify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Gauge {
    Connections,
    Pending,
    Requests,
    Retries,
}

impl Counters {
    fn gauge(&self, g: Gauge) -> &AtomicU32 {
        match g {
            Gauge::Connections => &self.connections,
            Gauge::Pending => &self.pending,
            Gauge::Requests => &self.requests,
            Gauge::Retries => &self.retries,
        }
    }
}

/// One unit of a circuit-breaker gauge, given back on drop.
#[derive(Debug)]
pub(super) struct Slot {
    counters: Arc<Counters>,
    gauge: Gauge,
}

impl Slot {
    /// A unit of `gauge` if fewer than `max` are in use (the breaker is closed).
    pub fn acquire(counters: &Arc<Counters>, gauge: Gauge, max: u32) -> Option<Slot> {
        counters
            .gauge(gauge)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Slot {
            counters: counters.clone(),
            gauge,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counters
            .gauge(self.gauge)
            .fetch_sub(1, Ordering::AcqRel);
        if self.gauge == Gauge::Connections {
            self.counters.released.notify_waiters();
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: u32,
    last_fill: Instant,
}

/// Token buckets of the local rate limiters, by `RateLimit::key`, so a bucket keeps its
/// tokens across config pushes.
#[derive(Debug, Default)]
pub(super) struct Buckets {
    map: Mutex<HashMap<String, Bucket>>,
}

/// The outcome of taking a token, with what the `x-ratelimit-*` headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Taken {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Until the next fill.
    pub reset: Duration,
}

impl Taken {
    /// `x-ratelimit-*` headers (IETF draft 03, as Envoy's `DRAFT_VERSION_03`).
    pub fn apply(&self, h: &mut HeaderMap) {
        let secs = self.reset.as_secs() + u64::from(self.reset.subsec_nanos() > 0);
        h.insert("x-ratelimit-limit", HeaderValue::from(self.limit));
        h.insert("x-ratelimit-remaining", HeaderValue::from(self.remaining));
        h.insert("x-ratelimit-reset", HeaderValue::from(secs));
    }
}

impl Buckets {
    pub fn take(&self, rl: &RateLimit, now: Instant) -> Taken {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let b = match map.get_mut(rl.key.as_str()) {
            Some(b) => b,
            None => map.entry(rl.key.clone()).or_insert(Bucket {
                tokens: rl.max_tokens,
                last_fill: now,
            }),
        };
        let interval = rl.fill_interval.max(Duration::from_millis(1));
        let elapsed = now.saturating_duration_since(b.last_fill);
        let fills = u32::try_from(elapsed.as_nanos() / interval.as_nanos()).unwrap_or(u32::MAX);
        if fills > 0 {
            b.tokens = b
                .tokens
                .saturating_add(fills.saturating_mul(rl.tokens_per_fill));
            b.last_fill += interval * fills;
        }
        // A push may have lowered the limit.
        b.tokens = b.tokens.min(rl.max_tokens);
        let allowed = b.tokens > 0;
        if allowed {
            b.tokens -= 1;
        }
        Taken {
            allowed,
            limit: rl.max_tokens,
            remaining: b.tokens,
            reset: (b.last_fill + interval).saturating_duration_since(now),
        }
    }
}

/// What one try ended with, as retry conditions and outlier detection see it.
#[derive(Debug, Clone, Copy)]
pub(super) enum TryOutcome<'a> {
    Response(u16, &'a HeaderMap),
    ConnectFailure,
    /// Reset or closed before a response.
    Reset,
    /// The per-try timeout fired.
    Timeout,
}

impl TryOutcome<'_> {
    /// Counts towards `consecutive_5xx` (local-origin errors count as 5xx, as Envoy does
    /// without `split_external_local_origin_errors`).
    pub fn is_failure(&self) -> bool {
        match self {
            TryOutcome::Response(s, _) => *s >= 500,
            _ => true,
        }
    }
}

fn grpc_status(h: &HeaderMap) -> Option<u32> {
    h.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// Whether `retry_on` asks for another try after `outcome`.
pub(super) fn retriable(p: &RetryPolicy, outcome: TryOutcome<'_>) -> bool {
    let on = p.retry_on;
    match outcome {
        TryOutcome::Response(status, headers) => {
            (on.server_error && status >= 500)
                || (on.gateway_error && matches!(status, 502..=504))
                || (on.retriable_status_codes && p.retriable_status_codes.contains(&status))
                || match grpc_status(headers) {
                    Some(1) => on.grpc_cancelled,
                    Some(4) => on.grpc_deadline_exceeded,
                    Some(8) => on.grpc_resource_exhausted,
                    Some(14) => on.grpc_unavailable,
                    _ => false,
                }
        }
        TryOutcome::ConnectFailure => {
            on.server_error || on.gateway_error || on.reset || on.connect_failure
        }
        TryOutcome::Reset | TryOutcome::Timeout => on.server_error || on.gateway_error || on.reset,
    }
}

/// Envoy's fully jittered exponential back-off before retry number `n` (1-based): a random
/// time up to `(2^n - 1) * base`, capped at `max`.
pub(super) fn backoff(p: &RetryPolicy, n: u32) -> Duration {
    let factor = (1u32 << n.min(20)) - 1;
    let upper = p.backoff_base.saturating_mul(factor).min(p.backoff_max);
    let nanos = u64::try_from(upper.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..=nanos))
}

/// True for `ppm` parts per million of calls.
pub(super) fn roll(ppm: u32) -> bool {
    ppm >= 1_000_000 || fastrand::u32(0..1_000_000) < ppm
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::config::RetryOn;

    fn rl(max: u32, per_fill: u32, ms: u64) -> RateLimit {
        RateLimit {
            key: "k".into(),
            max_tokens: max,
            tokens_per_fill: per_fill,
            fill_interval: Duration::from_millis(ms),
            x_ratelimit_headers: true,
            status: 429,
        }
    }

    fn policy(on: RetryOn) -> RetryPolicy {
        RetryPolicy {
            retry_on: on,
            num_retries: 2,
            per_try_timeout: None,
            retriable_status_codes: vec![409],
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
        }
    }

    #[test]
    fn token_bucket_refills_per_interval() {
        let b = Buckets::default();
        let l = rl(2, 1, 1000);
        let t0 = Instant::now();
        assert!(b.take(&l, t0).allowed);
        let t = b.take(&l, t0);
        assert!(t.allowed && t.remaining == 0);
        let t = b.take(&l, t0 + Duration::from_millis(400));
        assert!(!t.allowed);
        assert_eq!(t.reset, Duration::from_millis(600));
        let mut h = HeaderMap::new();
        t.apply(&mut h);
        assert_eq!(h["x-ratelimit-limit"], "2");
        assert_eq!(h["x-ratelimit-remaining"], "0");
        assert_eq!(h["x-ratelimit-reset"], "1");
        // Two fills later: two tokens (capped at max), one taken.
        let t = b.take(&l, t0 + Duration::from_millis(2500));
        assert!(t.allowed);
        assert_eq!(t.remaining, 1);
        // A push that lowers the limit applies at once to the same key.
        assert_eq!(
            b.take(&rl(1, 1, 1000), t0 + Duration::from_millis(2500))
                .remaining,
            0
        );
    }

    #[test]
    fn retry_conditions() {
        let h = HeaderMap::new();
        let five = policy(RetryOn {
            server_error: true,
            ..RetryOn::default()
        });
        assert!(retriable(&five, TryOutcome::Response(500, &h)));
        assert!(!retriable(&five, TryOutcome::Response(404, &h)));
        assert!(retriable(&five, TryOutcome::ConnectFailure));
        assert!(retriable(&five, TryOutcome::Timeout));
        let gw = policy(RetryOn {
            gateway_error: true,
            ..RetryOn::default()
        });
        assert!(!retriable(&gw, TryOutcome::Response(500, &h)));
        assert!(retriable(&gw, TryOutcome::Response(503, &h)));
        let cf = policy(RetryOn {
            connect_failure: true,
            ..RetryOn::default()
        });
        assert!(retriable(&cf, TryOutcome::ConnectFailure));
        assert!(!retriable(&cf, TryOutcome::Reset));
        let codes = policy(RetryOn {
            retriable_status_codes: true,
            ..RetryOn::default()
        });
        assert!(retriable(&codes, TryOutcome::Response(409, &h)));
        assert!(!retriable(&codes, TryOutcome::Response(503, &h)));
        let grpc = policy(RetryOn {
            grpc_unavailable: true,
            ..RetryOn::default()
        });
        let mut g = HeaderMap::new();
        g.insert("grpc-status", HeaderValue::from_static("14"));
        assert!(retriable(&grpc, TryOutcome::Response(200, &g)));
        g.insert("grpc-status", HeaderValue::from_static("0"));
        assert!(!retriable(&grpc, TryOutcome::Response(200, &g)));
    }

    #[test]
    fn backoff_is_jittered_within_the_exponential_cap() {
        let p = policy(RetryOn::default());
        for _ in 0..200 {
            assert!(backoff(&p, 1) <= Duration::from_millis(25));
            assert!(backoff(&p, 2) <= Duration::from_millis(75));
            assert!(backoff(&p, 10) <= Duration::from_millis(250));
        }
        let spread: std::collections::HashSet<_> = (0..20).map(|_| backoff(&p, 3)).collect();
        assert!(spread.len() > 10, "jittered");
    }

    #[test]
    fn slots_cap_and_release() {
        let c = Arc::new(Counters::default());
        let a = Slot::acquire(&c, Gauge::Requests, 2).unwrap();
        let _b = Slot::acquire(&c, Gauge::Requests, 2).unwrap();
        assert!(Slot::acquire(&c, Gauge::Requests, 2).is_none());
        drop(a);
        assert!(Slot::acquire(&c, Gauge::Requests, 2).is_some());
        assert!(Slot::acquire(&c, Gauge::Pending, 0).is_none());
    }

    #[test]
    fn fault_dice_follow_the_fraction() {
        let hits = (0..100_000).filter(|_| roll(250_000)).count();
        assert!((23_000..27_000).contains(&hits), "{hits}");
        assert!(roll(1_000_000) && !roll(0));
    }
}
