//! Drain as a type: one `DrainTrigger` and any number of `DrainWatch`es cloned from the
//! first. Whatever must finish before the process may go (the accept loop, each proxied
//! connection) holds a watch, learns from it that the drain began (`signaled`), winds down
//! its own way and drops it. The trigger starts the drain and waits until every watch is
//! gone, bounded by a deadline: what still holds one then is cut by the caller.

use std::{
    sync::{Arc, Weak},
    time::Duration,
};

use tokio::sync::watch;

/// A new drain: the trigger, and the first watch to clone for everything that takes part.
pub fn new() -> (DrainTrigger, DrainWatch) {
    let (tx, rx) = watch::channel(false);
    let holder = Arc::new(());
    let trigger = DrainTrigger {
        signal: tx,
        holders: Arc::downgrade(&holder),
    };
    (
        trigger,
        DrainWatch {
            _holder: holder,
            signal: rx,
        },
    )
}

/// Starts the drain and waits for it. Dropping the trigger signals the watches too (no one
/// could wait for them any more, so they had better finish).
#[derive(Debug)]
pub struct DrainTrigger {
    signal: watch::Sender<bool>,
    /// Counts the watches (a `signaled` future's own receiver is not one).
    holders: Weak<()>,
}

impl DrainTrigger {
    /// Tells every watch, present and future, that the drain began. Idempotent.
    pub fn start(&self) {
        self.signal.send_replace(true);
    }

    /// How many watches are held.
    pub fn live(&self) -> usize {
        self.holders.strong_count()
    }

    /// Waits until every watch has been dropped, or `deadline` passes; returns how many
    /// are still held. (The channel closes once every receiver is gone: the watches', and
    /// those of `signaled` futures, which only a watch's holder can own.)
    pub async fn wait(&self, deadline: Duration) -> usize {
        let _ = tokio::time::timeout(deadline, self.signal.closed()).await;
        self.live()
    }

    /// `start`, then `wait`.
    pub async fn start_and_wait(self, deadline: Duration) -> usize {
        self.start();
        self.wait(deadline).await
    }
}

/// Held by whatever the drain waits for; cloning registers one more holder. Drop it when
/// done.
#[derive(Debug, Clone)]
pub struct DrainWatch {
    /// Held, never read: the trigger counts these. Declared first so it is dropped first:
    /// the trigger's wait ends when the last receiver (`signal`) goes, and must then count
    /// no holder left (the other order let a watch dropped on another thread be counted
    /// as still held, and a finished drain be reported as cut at its deadline).
    _holder: Arc<()>,
    signal: watch::Receiver<bool>,
}

impl DrainWatch {
    /// Whether the drain began.
    pub fn is_signaled(&self) -> bool {
        *self.signal.borrow()
    }

    /// Resolves once the drain began (at once if it already has, or if the trigger is
    /// gone). Cancel-safe: a `select!` may drop it and call again.
    pub async fn signaled(&self) {
        // A receiver of its own, so `&self` is enough (a `select!` loop can clone the
        // watch for a new connection in another branch).
        let mut rx = self.signal.clone();
        // Err: the trigger was dropped, which counts as a drain.
        let _ = rx.wait_for(|draining| *draining).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicBool, Ordering::SeqCst},
        Arc,
    };

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_trigger_waits_for_every_watch_to_be_dropped() {
        let (trigger, watch) = new();
        let finished = Arc::new(AtomicBool::new(false));
        // A connection that needs 3 s to finish once told.
        let conn = watch.clone();
        let f = finished.clone();
        tokio::spawn(async move {
            conn.signaled().await;
            tokio::time::sleep(Duration::from_secs(3)).await;
            f.store(true, SeqCst);
            drop(conn);
        });
        // The accept loop stops at once.
        tokio::spawn(async move { watch.signaled().await });
        tokio::task::yield_now().await;
        assert_eq!(trigger.live(), 2);
        let left = trigger.start_and_wait(Duration::from_secs(10)).await;
        assert_eq!(left, 0);
        assert!(
            finished.load(SeqCst),
            "returned only after the connection finished"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_bounds_the_wait_and_reports_what_is_left() {
        let (trigger, watch) = new();
        let stubborn = watch.clone();
        drop(watch);
        let start = tokio::time::Instant::now();
        trigger.start();
        assert!(stubborn.is_signaled());
        let left = trigger.wait(Duration::from_secs(5)).await;
        assert_eq!(left, 1, "the watch that ignores the drain is reported");
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        drop(stubborn);
        assert_eq!(trigger.wait(Duration::from_secs(5)).await, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn signaled_waits_for_the_start_and_a_late_watch_sees_it_at_once() {
        let (trigger, watch) = new();
        assert!(!watch.is_signaled());
        let early = tokio::time::timeout(Duration::from_secs(1), watch.signaled()).await;
        assert!(early.is_err(), "no drain yet");
        trigger.start();
        watch.signaled().await;
        // A watch cloned after the start (a connection accepted just before the listener
        // stopped) is signaled already.
        let late = watch.clone();
        assert!(late.is_signaled());
        late.signaled().await;
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_trigger_signals_the_watches() {
        let (trigger, watch) = new();
        drop(trigger);
        tokio::time::timeout(Duration::from_secs(1), watch.signaled())
            .await
            .expect("a watch without a trigger is told to finish");
    }
}
