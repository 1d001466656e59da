//! The node proxy's workers: one current-thread tokio runtime per thread (`mesh-proxy-N`),
//! `--proxy-workers` of them. Each worker accepts from listeners of its own (one
//! `SO_REUSEPORT` group per port: the kernel spreads new connections over the group, and
//! wakes one worker per connection), and a connection lives on the worker that accepted
//! it: no work stealing, no cross-thread wake-up, none of a multi-thread runtime's
//! bookkeeping per task poll.
//!
//! Listeners opened from elsewhere (the inbound capture's in-pod listeners, plaintext and
//! HBONE) are one socket each, served by every worker (`WorkerSet::serve_everywhere`): a
//! duplicate descriptor of it registered with each worker's runtime, each with its own
//! accept loop on the one accept queue. Not a `SO_REUSEPORT` group: the TC program assigns
//! each captured connection to the listener it looks up (`bpf_sk_assign`), which refuses
//! a `SO_REUSEPORT` socket before Linux 6.5 (5.10 and 6.1 are supported). The kernel wakes
//! every worker waiting on the socket; the first to call `accept` takes the connection,
//! the others find the queue empty (a spurious wake-up each, per burst of connections).
//!
//! Liveness: every worker stamps its slot every `HEARTBEAT_INTERVAL`; worker 0 writes the
//! proxy heartbeat (`PROXY_HEALTH`) only while every worker's stamp is fresh, so one stuck
//! worker (whose listener still gets its share of the connections) makes the datapath
//! fail open as a stuck proxy did.

use std::{
    io,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use tokio::{runtime::Handle, sync::oneshot, task::JoinHandle};
use tracing::warn;

/// How old a worker's liveness stamp may be for worker 0 to still beat for it.
const STAMP_FRESH: Duration = Duration::from_millis(600);

pub struct Workers {
    handles: Vec<Handle>,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stamps: Arc<[AtomicU64]>,
}

impl Workers {
    /// Starts `n` (at least 1) workers, each a thread running a current-thread runtime.
    pub fn start(n: usize) -> io::Result<Workers> {
        let n = n.max(1);
        let mut w = Workers {
            handles: Vec::with_capacity(n),
            stops: Vec::with_capacity(n),
            threads: Vec::with_capacity(n),
            stamps: (0..n).map(|_| AtomicU64::new(0)).collect(),
        };
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            w.handles.push(rt.handle().clone());
            w.stops.push(stop_tx);
            w.threads.push(
                std::thread::Builder::new()
                    .name(format!("mesh-proxy-{i}"))
                    .spawn(move || {
                        // Until told to stop (or the sender dropped: the agent is leaving).
                        let _ = rt.block_on(stop_rx);
                        // What is still running (relays past a drain deadline) is dropped,
                        // which resets its sockets.
                        rt.shutdown_timeout(Duration::from_millis(200));
                    })?,
            );
        }
        Ok(w)
    }

    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Worker `i`'s runtime.
    pub fn handle(&self, i: usize) -> &Handle {
        &self.handles[i % self.handles.len()]
    }

    /// The designated worker for tasks started from elsewhere that are not accept loops
    /// (the access log's scope follower, a pod's HBONE set-up): worker 0.
    pub fn first(&self) -> &Handle {
        &self.handles[0]
    }

    /// Every worker's runtime, to be held by whoever starts accept loops later (the
    /// inbound manager's thread, the HBONE wiring).
    pub fn set(&self) -> WorkerSet {
        WorkerSet(self.handles.iter().cloned().collect())
    }

    /// Runs `f` to completion on the calling thread, with worker 0's runtime as the
    /// context (its thread drives the I/O and timers).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.handles[0].block_on(f)
    }

    /// Starts the liveness stamps: a task on each worker, until `stop` resolves; worker 0's
    /// also calls `beat` while every worker's stamp is fresh.
    pub fn start_liveness<S, B>(&self, stop: S, beat: B)
    where
        S: Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
        B: Fn() + Send + 'static,
    {
        let mut beat = Some(beat);
        for (i, h) in self.handles.iter().enumerate() {
            let stamps = self.stamps.clone();
            let beat = if i == 0 { beat.take() } else { None };
            let stopped = stop();
            h.spawn(async move {
                let mut tick = tokio::time::interval(super::HEARTBEAT_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tokio::pin!(stopped);
                loop {
                    tokio::select! {
                        biased;
                        () = &mut stopped => return,
                        _ = tick.tick() => {}
                    }
                    let now = crate::sys::monotonic_ns();
                    stamps[i].store(now, Relaxed);
                    if let Some(beat) = &beat {
                        if all_fresh(&stamps, now) {
                            beat();
                        }
                    }
                }
            });
        }
    }

    /// Stops every worker: what still runs on them is dropped (sockets reset).
    pub fn shutdown(mut self) {
        for s in self.stops.drain(..) {
            let _ = s.send(());
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                warn!("a proxy worker panicked");
            }
        }
    }
}

/// The workers' runtimes (`Workers::set`): cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct WorkerSet(Arc<[Handle]>);

impl WorkerSet {
    pub fn count(&self) -> usize {
        self.0.len()
    }

    /// Worker 0's runtime.
    pub fn first(&self) -> &Handle {
        &self.0[0]
    }

    /// Serves one listening socket from every worker: worker `i` accepts from a duplicate
    /// descriptor of it, registered with its own runtime, in the task `serve(i, listener)`
    /// (spawned there). The socket closes once every task has dropped its descriptor: a
    /// caller that closes it (a pod leaving) ends or aborts them all. Callable from any
    /// thread, and from within another runtime's task.
    pub fn serve_everywhere<F, Fut>(
        &self,
        listener: std::net::TcpListener,
        serve: F,
    ) -> io::Result<Vec<JoinHandle<()>>>
    where
        F: Fn(usize, tokio::net::TcpListener) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        listener.set_nonblocking(true)?;
        // Every duplicate first: a failure leaves nothing running.
        let mut socks = Vec::with_capacity(self.0.len());
        for _ in 1..self.0.len() {
            socks.push(listener.try_clone()?);
        }
        socks.push(listener);
        let mut tasks = Vec::with_capacity(socks.len());
        for (i, (h, s)) in self.0.iter().zip(socks).enumerate() {
            let l = {
                // Registered with worker `i`'s I/O driver: its thread polls the socket.
                let _rt = h.enter();
                tokio::net::TcpListener::from_std(s)
            };
            match l {
                Ok(l) => tasks.push(h.spawn(serve(i, l))),
                Err(e) => {
                    for t in &tasks {
                        t.abort();
                    }
                    return Err(e);
                }
            }
        }
        Ok(tasks)
    }
}

fn all_fresh(stamps: &[AtomicU64], now: u64) -> bool {
    let fresh = STAMP_FRESH.as_nanos() as u64;
    stamps
        .iter()
        .all(|s| now.saturating_sub(s.load(Relaxed)) <= fresh)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[test]
    fn each_worker_is_a_thread_of_its_own_and_a_stuck_one_stops_the_beat() {
        let w = Workers::start(2).unwrap();
        let names: Vec<String> = (0..2)
            .map(|i| {
                w.handle(i)
                    .block_on(
                        w.handle(i)
                            .spawn(async { std::thread::current().name().unwrap().to_string() }),
                    )
                    .unwrap()
            })
            .collect();
        assert_eq!(names, ["mesh-proxy-0", "mesh-proxy-1"]);
        let beats = Arc::new(AtomicUsize::new(0));
        let b = beats.clone();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        w.start_liveness(
            move || {
                let mut rx = stop_rx.clone();
                Box::pin(async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
            },
            move || {
                b.fetch_add(1, Relaxed);
            },
        );
        std::thread::sleep(Duration::from_millis(700));
        assert!(beats.load(Relaxed) >= 2, "{}", beats.load(Relaxed));
        // Worker 1 blocked: worker 0 stops beating once its stamp is stale.
        w.handle(1).spawn(async {
            std::thread::sleep(Duration::from_millis(1500));
        });
        std::thread::sleep(Duration::from_millis(800));
        let before = beats.load(Relaxed);
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            beats.load(Relaxed),
            before,
            "no beat while a worker is stuck"
        );
        std::thread::sleep(Duration::from_millis(800));
        assert!(beats.load(Relaxed) > before, "the beat resumes");
        stop_tx.send_replace(true);
        w.shutdown();
    }

    /// One listening socket, an accept loop on each worker: a worker that is busy leaves
    /// the connections to the other, so each worker takes some; closing the loops (a pod
    /// leaving) closes the socket.
    #[test]
    fn every_worker_accepts_from_a_shared_listener_and_the_socket_closes_with_the_loops() {
        use std::{net::TcpStream, sync::Mutex};

        let w = Workers::start(2).unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let took: Arc<Mutex<Vec<(usize, String)>>> = Arc::default();
        let (close_tx, close_rx) = tokio::sync::watch::channel(false);
        let t = took.clone();
        let tasks = w
            .set()
            .serve_everywhere(l, move |i, l| {
                let (t, mut close) = (t.clone(), close_rx.clone());
                async move {
                    let mut held = Vec::new();
                    loop {
                        tokio::select! {
                            r = l.accept() => {
                                let (c, _) = r.unwrap();
                                let me = std::thread::current().name().unwrap().to_string();
                                t.lock().unwrap().push((i, me));
                                held.push(c);
                            }
                            _ = close.wait_for(|c| *c) => return,
                        }
                    }
                }
            })
            .unwrap();
        assert_eq!(tasks.len(), 2);
        let mut clients = Vec::new();
        for busy in [0, 1] {
            // Worker `busy` is stuck for a while: the other takes every connection.
            w.handle(busy)
                .spawn(async { std::thread::sleep(Duration::from_millis(400)) });
            std::thread::sleep(Duration::from_millis(50));
            for _ in 0..5 {
                clients.push(TcpStream::connect(addr).unwrap());
            }
            std::thread::sleep(Duration::from_millis(200));
            let other = 1 - busy;
            let got: Vec<(usize, String)> = std::mem::take(&mut *took.lock().unwrap());
            assert_eq!(got.len(), 5, "{got:?}");
            for (i, thread) in &got {
                assert_eq!(*i, other, "{got:?}");
                assert_eq!(*thread, format!("mesh-proxy-{other}"));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        // Both loops end: nobody holds the socket any more, new connections are refused.
        close_tx.send_replace(true);
        for t in tasks {
            w.block_on(t).unwrap();
        }
        let refused = TcpStream::connect(addr).unwrap_err();
        assert_eq!(
            refused.kind(),
            io::ErrorKind::ConnectionRefused,
            "{refused}"
        );
        w.shutdown();
    }
}
