//! A downstream connection driven to its end, told to wind down once the drain begins,
//! with the drain's wait polled only when its own wake-up fired.
//!
//! `tokio::select!` over the connection and `DrainWatch::signaled` polls both at every
//! wake-up of the connection's task; the drain's wait (`watch::Receiver::wait_for`)
//! re-checks its waker under the watch's lock each time (~500 instructions a request on
//! a keep-alive connection). Here the wait gets a waker of its own, which marks a flag and
//! wakes the task: the connection is polled at every wake-up, the wait only after its
//! flag was set (and once at the start, to register).

use std::{
    future::{poll_fn, Future},
    pin::pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll, Wake, Waker},
};

use crate::lifecycle::drain::DrainWatch;

/// The drain wait's waker: marks the wait as due and wakes the connection's task.
struct Due {
    fired: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Due {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = task.as_ref() {
            w.wake_by_ref();
        }
    }
}

/// Runs `conn` to its end; once `drain` is signaled, asks it to shut down gracefully
/// (`shutdown`: hyper's `graceful_shutdown` of its codec) and keeps driving it until it
/// has.
pub(super) async fn until_drained<C, E>(
    conn: C,
    drain: &DrainWatch,
    shutdown: impl FnOnce(std::pin::Pin<&mut C>),
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    let mut conn = pin!(conn);
    let mut signaled = pin!(drain.signaled());
    let due = Arc::new(Due {
        fired: AtomicBool::new(true),
        task: Mutex::new(None),
    });
    let waker = Waker::from(due.clone());
    // The task's waker `due` wakes, as last stored (compared without the lock).
    let mut stored: Option<Waker> = None;
    let done = poll_fn(|cx: &mut Context<'_>| {
        if let Poll::Ready(res) = conn.as_mut().poll(cx) {
            return Poll::Ready(Some(res));
        }
        if !stored.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            let w = cx.waker().clone();
            *due.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(w.clone());
            stored = Some(w);
        }
        if due.fired.swap(false, Ordering::AcqRel)
            && signaled
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_ready()
        {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await;
    if let Some(res) = done {
        return res;
    }
    shutdown(conn.as_mut());
    conn.await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::lifecycle::drain;

    /// A connection that ends when its sleep does: by itself, or once shut down (which
    /// takes `shutdown_takes`); Ok(true) when it was shut down.
    struct Conn {
        shut: bool,
        sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    }

    impl Future for Conn {
        type Output = Result<(), bool>;
        fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            match self.sleep.as_mut().poll(cx) {
                // Err(true): ended by the shutdown (the codec's result type is `()`).
                Poll::Ready(()) if self.shut => Poll::Ready(Err(true)),
                Poll::Ready(()) => Poll::Ready(Ok(())),
                Poll::Pending => Poll::Pending,
            }
        }
    }

    fn conn(secs: u64) -> Conn {
        Conn {
            shut: false,
            sleep: Box::pin(tokio::time::sleep(Duration::from_secs(secs))),
        }
    }

    fn shut_down(takes: Duration) -> impl FnOnce(std::pin::Pin<&mut Conn>) {
        move |mut c| {
            c.shut = true;
            c.sleep = Box::pin(tokio::time::sleep(takes));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_ends_by_itself_without_a_drain() {
        let (_trigger, watch) = drain::new();
        let res = until_drained(conn(5), &watch, |_| panic!("no drain, no shutdown")).await;
        assert_eq!(res, Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_asks_an_idle_connection_to_shut_down_and_waits_for_it() {
        let (trigger, watch) = drain::new();
        let task = tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let res = until_drained(conn(3600), &watch, shut_down(Duration::from_secs(1))).await;
            (res, start.elapsed())
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!task.is_finished());
        trigger.start();
        let (res, took) = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the drain's wake-up reached the idle connection")
            .expect("no panic");
        assert_eq!(res, Err(true), "ended by its shutdown");
        // Told at 10 s, done a second later.
        assert!(took >= Duration::from_secs(11) && took < Duration::from_secs(12));
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_begun_before_the_first_poll_is_seen_at_once() {
        let (trigger, watch) = drain::new();
        trigger.start();
        let res = until_drained(conn(3600), &watch, shut_down(Duration::ZERO)).await;
        assert_eq!(res, Err(true));
    }
}
