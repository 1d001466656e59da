//! The client's pool of HTTP/2 connections, keyed by (source identity, destination HBONE
//! address, expected destination identity): a stream goes on a connection of its key with
//! a free stream slot, or a new connection is dialled within the caps.
//!
//! Bounded: at most `max_per_key` connections per key and `max_total` in all (dials in
//! progress count); at the total cap an idle connection of another key is closed to make
//! room, and when none is idle the stream is refused. A connection without streams for
//! `idle_timeout` is closed (`sweep`). A connection's streams are counted by guards the
//! `HboneStream`s hold, so the count cannot leak.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;

use super::HboneError;
use crate::identity::SpiffeId;

/// Streams we open at most on one connection, whatever the peer allows.
pub const MAX_STREAMS_PER_CONNECTION: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src: SpiffeId,
    pub dst: SocketAddr,
    pub dst_id: SpiffeId,
}

pub(crate) struct Conn {
    pub(crate) id: u64,
    pub(crate) send: h2::client::SendRequest<Bytes>,
    /// Streams open (or being opened) on it.
    active: AtomicUsize,
    last_used: Mutex<Instant>,
    /// Set by the connection's task when it ended, or when a stream found it broken.
    pub(crate) closed: Arc<AtomicBool>,
}

impl Conn {
    pub(crate) fn new(
        id: u64,
        send: h2::client::SendRequest<Bytes>,
        closed: Arc<AtomicBool>,
    ) -> Conn {
        Conn {
            id,
            send,
            active: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
            closed,
        }
    }

    fn limit(&self) -> usize {
        self.send
            .current_max_send_streams()
            .min(MAX_STREAMS_PER_CONNECTION)
    }

    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn idle_since(&self) -> Option<Instant> {
        (self.active.load(SeqCst) == 0)
            .then(|| *self.last_used.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// One stream's hold on its connection (held by the `HboneStream`).
pub(crate) struct StreamGuard(pub(crate) Arc<Conn>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active.fetch_sub(1, SeqCst);
    }
}

#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    pub max_per_key: usize,
    pub max_total: usize,
    pub idle_timeout: Duration,
}

#[derive(Default)]
struct State {
    conns: HashMap<PoolKey, Vec<Arc<Conn>>>,
    /// Dials in progress, per key.
    dialing: HashMap<PoolKey, usize>,
    /// Connections plus dials in progress.
    total: usize,
}

pub(crate) struct Pool {
    limits: PoolLimits,
    state: Mutex<State>,
}

pub(crate) enum Checkout<'a> {
    /// A stream slot on a pooled connection.
    Ready(StreamGuard),
    /// Room to dial a new connection for the key.
    Dial(Reservation<'a>),
}

/// Room for one connection being dialled; given back if dropped unused.
pub(crate) struct Reservation<'a> {
    pool: &'a Pool,
    key: PoolKey,
    used: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.used {
            let mut s = self.pool.lock();
            s.total -= 1;
            dial_done(&mut s, &self.key);
        }
    }
}

fn dial_done(s: &mut State, key: &PoolKey) {
    if let Some(n) = s.dialing.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            s.dialing.remove(key);
        }
    }
}

impl Pool {
    pub(crate) fn new(limits: PoolLimits) -> Pool {
        Pool {
            limits,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn checkout(&self, key: &PoolKey) -> Result<Checkout<'_>, HboneError> {
        let mut s = self.lock();
        if let Some(list) = s.conns.get(key) {
            for c in list {
                if c.closed.load(SeqCst) {
                    continue;
                }
                // Claim a slot unless the connection is full (peer's SETTINGS or ours).
                // Slots are claimed under the pool's lock only (released anywhere).
                let limit = c.limit();
                if c.active
                    .fetch_update(SeqCst, SeqCst, |n| (n < limit).then_some(n + 1))
                    .is_ok()
                {
                    return Ok(Checkout::Ready(StreamGuard(c.clone())));
                }
            }
        }
        // Forget the closed connections before counting.
        let before = s.conns.get(key).map_or(0, Vec::len);
        if let Some(list) = s.conns.get_mut(key) {
            list.retain(|c| !c.closed.load(SeqCst));
        }
        let after = s.conns.get(key).map_or(0, Vec::len);
        s.total -= before - after;
        let per_key = after + s.dialing.get(key).copied().unwrap_or(0);
        if per_key >= self.limits.max_per_key {
            return Err(HboneError::PoolFull(per_key));
        }
        if s.total >= self.limits.max_total && !evict_one_idle(&mut s) {
            return Err(HboneError::PoolFull(s.total));
        }
        s.total += 1;
        *s.dialing.entry(key.clone()).or_default() += 1;
        Ok(Checkout::Dial(Reservation {
            pool: self,
            key: key.clone(),
            used: false,
        }))
    }

    /// A dialled connection joins the pool with one stream claimed.
    pub(crate) fn insert(&self, mut r: Reservation<'_>, conn: Conn) -> StreamGuard {
        r.used = true;
        conn.active.store(1, SeqCst);
        let conn = Arc::new(conn);
        let mut s = self.lock();
        dial_done(&mut s, &r.key);
        s.conns.entry(r.key.clone()).or_default().push(conn.clone());
        StreamGuard(conn)
    }

    /// Closes connections idle longer than the timeout, and forgets closed ones.
    pub(crate) fn sweep(&self, now: Instant) {
        let idle = self.limits.idle_timeout;
        let mut s = self.lock();
        let mut removed = 0;
        s.conns.retain(|_, list| {
            let before = list.len();
            list.retain(|c| {
                !c.closed.load(SeqCst)
                    && c.idle_since()
                        .is_none_or(|t| now.saturating_duration_since(t) < idle)
            });
            removed += before - list.len();
            !list.is_empty()
        });
        s.total -= removed;
    }

    /// Connections in the pool (dials in progress included).
    pub(crate) fn len(&self) -> usize {
        self.lock().total
    }
}

/// Closes the connection idle the longest, if any is idle.
fn evict_one_idle(s: &mut State) -> bool {
    let victim = s
        .conns
        .iter()
        .flat_map(|(k, list)| list.iter().map(move |c| (k, c)))
        .filter_map(|(k, c)| c.idle_since().map(|t| (t, k.clone(), c.id)))
        .min_by_key(|(t, _, _)| *t);
    let Some((_, key, id)) = victim else {
        return false;
    };
    if let Some(list) = s.conns.get_mut(&key) {
        list.retain(|c| c.id != id);
        if list.is_empty() {
            s.conns.remove(&key);
        }
    }
    s.total -= 1;
    true
}
