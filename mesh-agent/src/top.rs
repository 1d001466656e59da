//! `mesh-agent top`: a live terminal inspector of a running agent, built on its admin
//! endpoint only (HTTP, through the CLI's admin helper), so it works the same against the
//! local agent and a remote one. Panes: Workloads, Connections (of the selected workload,
//! with their path), Services, xDS, Datapath counters with their rates; Enter shows the
//! joined view of `mesh-agent inspect`, rendered by the same code.
//!
//! Two threads: the fetcher (`fetch.rs`) asks the endpoint every interval and sends what
//! it got over a channel; this thread draws and reads keys, never waiting on the network.
//! The terminal (raw mode, alternate screen) is restored on every way out: quit, error,
//! panic (ratatui's hook), and SIGTERM, SIGHUP or SIGINT from outside (then the exit status
//! is 128 + the signal, as if it had killed the process).

mod fetch;
mod model;
mod view;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering::Relaxed},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use ratatui::crossterm::event::{self, Event, KeyEventKind};

/// Default refresh interval (milliseconds).
pub const DEFAULT_INTERVAL_MS: u64 = 1000;
/// Shortest refresh interval (milliseconds): each round asks several endpoints.
const MIN_INTERVAL_MS: u64 = 100;
/// How long one wait for a key lasts before answers are looked at again: bounds the delay
/// between a round's arrival and its drawing.
const TICK: Duration = Duration::from_millis(50);

#[derive(clap::Args, Debug, Clone)]
pub struct TopArgs {
    /// The agent's admin endpoint (a remote one too).
    #[arg(long, env = "MESH_ADMIN_ADDRESS", default_value = crate::config::DEFAULT_ADMIN_ADDRESS)]
    pub admin_address: SocketAddr,
    /// Refresh interval (milliseconds; at least 100).
    #[arg(long, env = "MESH_TOP_INTERVAL_MS", default_value_t = DEFAULT_INTERVAL_MS)]
    pub interval_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error("the terminal: {0} (mesh-agent top needs an interactive terminal)")]
    Terminal(#[source] std::io::Error),
    #[error("--interval-ms {0}: at least {MIN_INTERVAL_MS}")]
    Interval(u64),
}

/// Runs the inspector until `q` or Ctrl-C.
pub fn run(args: &TopArgs) -> Result<(), TopError> {
    if args.interval_ms < MIN_INTERVAL_MS {
        return Err(TopError::Interval(args.interval_ms));
    }
    let (want_tx, want_rx) = mpsc::channel();
    let (round_tx, round_rx) = mpsc::channel();
    let (admin, interval) = (args.admin_address, Duration::from_millis(args.interval_ms));
    // Not joined on exit: a round in flight may wait for its timeout, and ends with the
    // process.
    std::thread::Builder::new()
        .name("top-fetch".into())
        .spawn(move || fetch::run(admin, interval, want_rx, round_tx))
        .map_err(TopError::Terminal)?;
    // The signals that end a terminal program from outside: noted here, acted on by the
    // loop (within a TICK), which restores the terminal first.
    let caught = Arc::new(AtomicUsize::new(0));
    for sig in [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGINT,
    ] {
        signal_hook::flag::register_usize(sig, caught.clone(), sig as usize)
            .map_err(TopError::Terminal)?;
    }
    let mut terminal = ratatui::try_init().map_err(TopError::Terminal)?;
    let mut app = view::App::new(admin, args.interval_ms);
    let out = (|| -> std::io::Result<()> {
        let mut wanted = app.wanted();
        let _ = want_tx.send(wanted.clone());
        let mut dirty = true;
        while !app.quit && caught.load(Relaxed) == 0 {
            while let Ok(r) = round_rx.try_recv() {
                app.apply(r);
                dirty = true;
            }
            if dirty {
                terminal.draw(|f| app.draw(f))?;
                dirty = false;
            }
            let until = Instant::now() + TICK;
            while event::poll(until.saturating_duration_since(Instant::now()))? {
                match event::read()? {
                    Event::Key(k) if k.kind == KeyEventKind::Press => app.key(k),
                    Event::Resize(..) => {}
                    _ => continue,
                }
                dirty = true;
                if app.quit {
                    break;
                }
            }
            let now = app.wanted();
            if now != wanted {
                wanted = now;
                let _ = want_tx.send(wanted.clone());
            }
        }
        Ok(())
    })();
    ratatui::restore();
    match caught.load(Relaxed) {
        0 => out.map_err(TopError::Terminal),
        sig => std::process::exit(128 + sig as i32),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    #[test]
    fn top_parses_a_remote_endpoint_and_refuses_a_busy_interval() {
        let c = Cli::try_parse_from([
            "mesh-agent",
            "top",
            "--admin-address",
            "10.0.0.7:15020",
            "--interval-ms",
            "500",
        ])
        .unwrap();
        let Command::Top(a) = c.command else {
            panic!("{:?}", c.command)
        };
        assert_eq!(a.admin_address, "10.0.0.7:15020".parse().unwrap());
        assert_eq!(a.interval_ms, 500);
        let a = TopArgs {
            interval_ms: 10,
            ..a
        };
        assert!(matches!(run(&a), Err(TopError::Interval(10))));
    }

    #[test]
    fn a_round_against_no_agent_fails_once_per_round_not_per_request() {
        let wanted = fetch::Wanted {
            config_dump: true,
            pod: Some("shop/client".into()),
            detail: Some(fetch::Target::Service("backend/echo".into())),
        };
        let r = fetch::round("127.0.0.1:1".parse().unwrap(), &wanted);
        let e = r.workloads.unwrap_err();
        assert!(e.contains("127.0.0.1:1"), "{e}");
        assert_eq!(r.metrics.unwrap_err(), e);
        assert_eq!(r.config_dump.unwrap().unwrap_err(), e);
        assert_eq!(r.pod.unwrap().0, "shop/client");
        assert_eq!(r.detail.unwrap().0.path(), "/inspect/service/backend/echo");
    }
}
