//! A ring buffer's reader on a thread of its own (its own current-thread runtime): the
//! datapath's decision log (`events::EventReader`), the direct-mode flow records
//! (`events::FlowReader`) and the egress relay's wake-ups (`relay`'s `WakeReader`).
//!
//! The thread waits until the ring is readable (the programs' wake-up) and hands the ring
//! to its `drain`, which takes every record; with `every`, it drains on that tick as well
//! (rings whose programs do not wake the reader per record); at the stop it drains once
//! more, then ends. `drain` is dropped when the thread ends, for any reason (a read
//! error, a panic in `drain`, the stop), after [`RingReader::alive`] turned false: a
//! value it owns can act on the reader's end.

use std::{
    io,
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

/// A running ring reader; stops (after a last drain) and joins its thread on drop.
pub struct RingReader {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    alive: Arc<AtomicBool>,
}

/// Clears the reader's `alive` at its thread's end.
struct Ended(Arc<AtomicBool>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// The ring registered with the thread's reactor.
#[expect(
    deprecated,
    reason = "tokio deprecates with_interest for I/O safety (a registered fd closed elsewhere); \
              the ring owns its fd for as long as the AsyncFd holds it, and \
              register_with_interest would need unsafe outside the sys module"
)]
fn watch<T: AsRawFd>(ring: T) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    tokio::io::unix::AsyncFd::with_interest(ring, tokio::io::Interest::READABLE)
}

impl RingReader {
    /// Starts reading `ring` on a thread named `name`; returns once the thread watches
    /// it, or with the error that stopped it. `what` names the records in the warnings
    /// (and what their loss means).
    pub fn start<T, D>(
        name: &str,
        what: &'static str,
        ring: T,
        every: Option<Duration>,
        drain: D,
    ) -> io::Result<RingReader>
    where
        T: AsRawFd + Send + 'static,
        D: FnMut(&mut T) + Send + 'static,
    {
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<io::Result<()>>(1);
        let alive = Arc::new(AtomicBool::new(false));
        let live = alive.clone();
        let span = tracing::info_span!("ring", name);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _enter = span.enter();
                let mut drain = drain;
                // Declared after `drain`: dropped (alive cleared) before it.
                let _end = Ended(live.clone());
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .enable_time()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async {
                    let mut fd = match watch(ring) {
                        Ok(fd) => fd,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    live.store(true, Ordering::SeqCst);
                    let _ = ready_tx.send(Ok(()));
                    let mut tick = every.map(|d| {
                        let mut t = tokio::time::interval(d);
                        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        t
                    });
                    loop {
                        tokio::select! {
                            r = fd.readable_mut() => match r {
                                Ok(mut guard) => {
                                    drain(guard.get_inner_mut());
                                    guard.clear_ready();
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "reading {what} failed");
                                    return;
                                }
                            },
                            _ = async { tick.as_mut()?.tick().await; Some(()) }, if tick.is_some() => {
                                drain(fd.get_mut());
                            }
                            _ = &mut stopped => {
                                // What is left in the ring, then stop.
                                drain(fd.get_mut());
                                return;
                            }
                        }
                    }
                });
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(RingReader {
                stop: Some(stop),
                thread: Some(thread),
                alive,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(io::Error::other(format!(
                    "the reader of {what} ended before it watched its ring"
                )))
            }
        }
    }

    /// Whether the reader still watches its ring.
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }
}

impl Drop for RingReader {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::{Read, Write},
        os::unix::net::UnixStream,
        sync::Mutex,
    };

    /// Everything readable now.
    fn read_all(s: &mut UnixStream) -> usize {
        let mut buf = [0u8; 64];
        let mut n = 0;
        while let Ok(k) = s.read(&mut buf) {
            if k == 0 {
                break;
            }
            n += k;
        }
        n
    }

    /// Pushes `usize::MAX` (minus 1 if the reader was still alive) when dropped.
    struct OnEnd(Arc<Mutex<Vec<usize>>>, Arc<Mutex<Option<Arc<AtomicBool>>>>);

    impl Drop for OnEnd {
        fn drop(&mut self) {
            let alive = self.1.lock().unwrap().clone().unwrap();
            self.0
                .lock()
                .unwrap()
                .push(usize::MAX - usize::from(alive.load(Ordering::SeqCst)));
        }
    }

    /// A wake-up (the ring readable) drains at once; the stop drains what is left; the
    /// drain's values go at the thread's end, after `alive` turned false.
    #[test]
    fn a_reader_drains_on_wake_ups_and_at_its_stop_and_ends_not_alive() {
        let (ring, mut w) = UnixStream::pair().unwrap();
        ring.set_nonblocking(true).unwrap();
        let got = Arc::new(Mutex::new(Vec::<usize>::new()));
        let alive_slot = Arc::new(Mutex::new(None));
        let end = OnEnd(got.clone(), alive_slot.clone());
        let g = got.clone();
        let r = RingReader::start(
            "ring-test",
            "test records",
            ring,
            Some(Duration::from_millis(50)),
            move |s: &mut UnixStream| {
                let _ = &end;
                let n = read_all(s);
                if n > 0 {
                    g.lock().unwrap().push(n);
                }
            },
        )
        .expect("start");
        *alive_slot.lock().unwrap() = Some(r.alive.clone());
        assert!(r.alive());
        w.write_all(b"abc").unwrap();
        let t0 = std::time::Instant::now();
        while got.lock().unwrap().is_empty() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(*got.lock().unwrap(), vec![3]);
        drop(r);
        assert_eq!(*got.lock().unwrap(), vec![3, usize::MAX]);
    }
}
