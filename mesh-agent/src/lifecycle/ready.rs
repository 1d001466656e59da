//! Readiness as guards: whatever keeps the agent from serving takes a `BlockReady` and
//! drops it when the condition is gone. The agent is ready iff no guard is outstanding, so
//! readiness can be lost again (the xDS stream drops, a drain starts) by taking a new one,
//! and a piece that fails or forgets cannot mark the agent ready by accident: a guard is
//! released only by going out of scope.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use tracing::info;

/// The agent's readiness: a set of outstanding named guards. Cloning shares the set.
#[derive(Clone, Default)]
pub struct Ready {
    inner: Arc<Mutex<Guards>>,
    /// Woken each time the last outstanding guard is released (`ready`).
    became_ready: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct Guards {
    next: u64,
    /// Outstanding guards by id (ids grow, so this is also the order they were taken in).
    held: BTreeMap<u64, &'static str>,
}

impl Ready {
    pub fn new() -> Ready {
        Ready::default()
    }

    /// Keeps the agent not ready until the returned guard is dropped. Several guards may
    /// share a name; the name stays listed while any of them is held.
    #[must_use = "readiness is blocked only while the guard lives"]
    pub fn block(&self, name: &'static str) -> BlockReady {
        let mut g = self.lock();
        let id = g.next;
        g.next += 1;
        g.held.insert(id, name);
        BlockReady {
            ready: self.clone(),
            id,
            name,
        }
    }

    /// Whether no guard is outstanding.
    pub fn is_ready(&self) -> bool {
        self.lock().held.is_empty()
    }

    /// Waits until no guard is outstanding (at once if none is).
    pub async fn ready(&self) {
        loop {
            let woken = self.became_ready.notified();
            tokio::pin!(woken);
            // Registered before the check: a release between the check and the wait
            // still wakes it.
            woken.as_mut().enable();
            if self.is_ready() {
                return;
            }
            woken.await;
        }
    }

    /// The names of the outstanding guards, each once, in the order they were first taken.
    pub fn pending(&self) -> Vec<&'static str> {
        let g = self.lock();
        let mut names: Vec<&'static str> = Vec::with_capacity(g.held.len());
        for name in g.held.values() {
            if !names.contains(name) {
                names.push(name);
            }
        }
        names
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Guards> {
        // A panic while holding the lock leaves the map consistent (single inserts and
        // removes): keep using it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One reason the agent is not ready; dropping it releases that reason.
#[must_use = "dropping the guard releases it at once"]
pub struct BlockReady {
    ready: Ready,
    id: u64,
    name: &'static str,
}

impl BlockReady {
    pub fn name(&self) -> &'static str {
        self.name
    }
}

impl std::fmt::Debug for BlockReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("BlockReady").field(&self.name).finish()
    }
}

impl Drop for BlockReady {
    fn drop(&mut self) {
        let left = {
            let mut g = self.ready.lock();
            g.held.remove(&self.id);
            g.held.len()
        };
        if left == 0 {
            self.ready.became_ready.notify_waiters();
            info!(released = self.name, "ready");
        } else {
            info!(
                released = self.name,
                still_blocking = left,
                "readiness guard released"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_once_every_guard_is_dropped() {
        let ready = Ready::new();
        assert!(ready.is_ready(), "no guard: ready");
        let bpf = ready.block("bpf attached");
        let xds = ready.block("xds stream open");
        assert!(!ready.is_ready());
        assert_eq!(ready.pending(), ["bpf attached", "xds stream open"]);
        drop(bpf);
        assert!(!ready.is_ready());
        assert_eq!(ready.pending(), ["xds stream open"]);
        drop(xds);
        assert!(ready.is_ready());
        assert!(ready.pending().is_empty());
    }

    #[test]
    fn a_new_guard_makes_a_ready_agent_not_ready_again() {
        let ready = Ready::new();
        drop(ready.block("start-up"));
        assert!(ready.is_ready());
        let draining = ready.block("draining");
        assert!(!ready.is_ready());
        assert_eq!(ready.pending(), ["draining"]);
        // Clones share the set: the admin endpoint sees what the wiring takes.
        let seen_by_admin = ready.clone();
        assert_eq!(seen_by_admin.pending(), ["draining"]);
        drop(draining);
        assert!(seen_by_admin.is_ready());
    }

    #[test]
    fn guards_sharing_a_name_are_counted_apart() {
        let ready = Ready::new();
        let a = ready.block("xds stream open");
        let b = ready.block("xds stream open");
        assert_eq!(ready.pending(), ["xds stream open"], "listed once");
        drop(a);
        assert!(
            !ready.is_ready(),
            "the other guard of that name still blocks"
        );
        assert_eq!(b.name(), "xds stream open");
        drop(b);
        assert!(ready.is_ready());
    }

    #[tokio::test]
    async fn waiting_for_readiness_ends_when_the_last_guard_goes() {
        let ready = Ready::new();
        // No guard: at once.
        ready.ready().await;
        let bpf = ready.block("bpf attached");
        let xds = ready.block("xds stream open");
        let waiter = tokio::spawn({
            let ready = ready.clone();
            async move { ready.ready().await }
        });
        drop(bpf);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one guard is still held");
        std::thread::spawn(move || drop(xds)).join().unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken once the last guard went")
            .unwrap();
    }

    #[test]
    fn guards_can_be_released_from_other_threads() {
        let ready = Ready::new();
        let guards: Vec<_> = (0..8).map(|_| ready.block("worker")).collect();
        let threads: Vec<_> = guards
            .into_iter()
            .map(|g| std::thread::spawn(move || drop(g)))
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(ready.is_ready());
    }
}
