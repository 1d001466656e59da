//! Route timeouts without a timer per request.
//!
//! Every forwarded request has a deadline (the route's timeout, 15 s by default), and
//! nearly none is ever reached. Arming a tokio `Sleep` per request costs an allocation and
//! two trips through the timer wheel's lock (insert, then remove on drop) for nothing. So
//! the requests of one HTTP/1.1 downstream connection, which come one at a time, share one
//! `Sleep`, armed lazily: it is moved only when a request needs it earlier than it is set,
//! and when it fires before the deadline of the request waiting on it, it is set again to
//! that deadline. With a fixed route timeout a busy connection re-arms it once per timeout
//! period, not once per request. An HTTP/2 connection's requests run in tasks of their own
//! (hyper spawns one per stream), so each gets a `Timer` of its own, armed on first use.

use std::{
    future::Future,
    pin::{pin, Pin},
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
};

use tokio::time::{Instant, Sleep};

/// One `Sleep`, shared by requests that are never waiting at the same time.
#[derive(Debug, Default)]
pub(super) struct Timer {
    armed: Mutex<Armed>,
}

#[derive(Debug, Default)]
struct Armed {
    sleep: Option<Pin<Box<Sleep>>>,
    /// The waker the `Sleep` holds: the one it last returned `Pending` to, since it was
    /// last set. While the same task asks again for a deadline no earlier, and the `Sleep`
    /// has not fired, polling it would only register that waker again (about 130
    /// instructions, twice per HTTP/1.1 request: the route deadline and the next head's).
    waker: Option<Waker>,
}

impl Timer {
    pub fn new() -> Arc<Timer> {
        Arc::default()
    }

    /// Ready once `deadline` has passed; registers the caller's waker otherwise. The shared
    /// `Sleep` never sits later than `deadline` while this waits, so it cannot fire late.
    pub fn poll_expired(&self, deadline: Instant, cx: &mut Context<'_>) -> Poll<()> {
        let mut armed = self.armed.lock().unwrap_or_else(|e| e.into_inner());
        let Armed { sleep, waker } = &mut *armed;
        let sleep = sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() > deadline {
            sleep.as_mut().reset(deadline);
            *waker = None;
        } else if waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) && !sleep.is_elapsed() {
            // Set no later than `deadline`, not fired, and it wakes this task when it does.
            return Poll::Pending;
        }
        loop {
            // Unconstrained: a `Sleep` out of the task's cooperative budget returns
            // `Pending` without registering the waker, which `waker` must not then claim.
            match pin!(tokio::task::unconstrained(sleep.as_mut())).poll(cx) {
                Poll::Pending => {
                    if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *waker = Some(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
                // tokio fires a `Sleep` at or after its deadline, never before.
                Poll::Ready(()) if sleep.deadline() >= deadline => {
                    *waker = None;
                    return Poll::Ready(());
                }
                // Set for an earlier request: move it to this one's deadline.
                Poll::Ready(()) => {
                    sleep.as_mut().reset(deadline);
                    *waker = None;
                }
            }
        }
    }

    /// Runs `fut` until it finishes (Some) or `deadline` passes (None). The engine polls
    /// its tries against `poll_expired` in place instead (`forward`: a try is large, and
    /// handing it over by value copied it twice per request); the tests use this.
    #[cfg(test)]
    pub async fn timeout<F: Future>(&self, deadline: Instant, fut: F) -> Option<F::Output> {
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(v) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(v));
            }
            self.poll_expired(deadline, cx).map(|()| None)
        })
        .await
    }
}

/// hyper's timer for a downstream HTTP/1.1 connection: hyper arms a header-read timeout
/// (30 s) each time it waits for the next request head, and drops it once the head is in,
/// so with tokio's timer every keep-alive request paid for a `Sleep` in the wheel. These
/// sleeps all wait on one lazily armed `Timer` of the connection (hyper waits for one head
/// at a time), and cost a small allocation each.
#[derive(Debug, Clone, Default)]
pub(super) struct ConnTimer(Arc<Timer>);

struct LazySleep {
    deadline: Instant,
    timer: Arc<Timer>,
}

impl Future for LazySleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.timer.poll_expired(self.deadline, cx)
    }
}

impl hyper::rt::Sleep for LazySleep {}

impl hyper::rt::Timer for ConnTimer {
    fn sleep(&self, d: std::time::Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until((Instant::now() + d).into_std())
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(LazySleep {
            deadline: deadline.into(),
            timer: self.0.clone(),
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: std::time::Instant) {
        match sleep.as_mut().downcast_mut_pin::<LazySleep>() {
            Some(s) => s.get_mut().deadline = new_deadline.into(),
            None => *sleep = self.sleep_until(new_deadline),
        }
    }

    // tokio's clock, so paused-time tests see the same time as the sleeps.
    fn now(&self) -> std::time::Instant {
        Instant::now().into_std()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_shared_timer_fires_at_each_requests_own_deadline() {
        let t = Timer::new();
        let start = Instant::now();
        // First request: finishes well before its deadline.
        let first = t
            .timeout(start + Duration::from_secs(15), async { 1 })
            .await;
        assert_eq!(first, Some(1));
        // A later request with a later deadline: the timer armed for the first one fires
        // first and must not end this one early.
        tokio::time::advance(Duration::from_secs(10)).await;
        let second_deadline = Instant::now() + Duration::from_secs(15);
        let r = t
            .timeout(second_deadline, std::future::pending::<()>())
            .await;
        assert_eq!(r, None);
        assert!(Instant::now() >= second_deadline);
        assert!(Instant::now() < second_deadline + Duration::from_millis(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_deadline_asked_by_the_same_task_is_not_lost() {
        let t = Timer::new();
        let start = Instant::now();
        let (first, second) = (
            start + Duration::from_secs(1),
            start + Duration::from_secs(2),
        );
        // Armed for `first`; then the same task asks for `second`, which skips the poll
        // (the `Sleep` wakes this task at `first`, and is moved to `second` then).
        let mut polls = 0;
        let waited = tokio::time::timeout(
            Duration::from_secs(10),
            std::future::poll_fn(|cx| {
                polls += 1;
                if polls == 1 {
                    assert!(t.poll_expired(first, cx).is_pending());
                }
                t.poll_expired(second, cx)
            }),
        )
        .await;
        assert!(waited.is_ok(), "the wake-up at the first deadline was lost");
        assert!(Instant::now() >= second && Instant::now() < second + Duration::from_millis(5));
        assert!(
            polls >= 2,
            "woken at the first deadline, then moved to the second"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_moves_the_shared_timer_forward() {
        let t = Timer::new();
        let now = Instant::now();
        let _ = t.timeout(now + Duration::from_secs(15), async {}).await;
        let short = now + Duration::from_millis(200);
        assert_eq!(t.timeout(short, std::future::pending::<()>()).await, None);
        let waited = Instant::now() - now;
        assert!(waited >= Duration::from_millis(200) && waited < Duration::from_millis(210));
    }
}
