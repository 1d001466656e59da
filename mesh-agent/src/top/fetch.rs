//! The fetcher: a thread that asks the admin endpoint every interval (and at once when the
//! view wants something new) and sends each round's answers over a channel, so a slow or
//! unreachable agent never stalls drawing or keys. Each request has the admin helper's
//! timeouts (connect and read).

use std::{
    net::SocketAddr,
    sync::mpsc::{Receiver, RecvTimeoutError, Sender},
    time::{Duration, Instant, SystemTime},
};

use serde_json::Value;

/// An object the joined view (`/inspect/...`) shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Pod(String),
    Service(String),
}

impl Target {
    pub fn path(&self) -> String {
        match self {
            Target::Pod(k) => format!("/inspect/pod/{k}"),
            Target::Service(k) => format!("/inspect/service/{k}"),
        }
    }

    pub fn label(&self) -> String {
        match self {
            Target::Pod(k) => format!("pod {k}"),
            Target::Service(k) => format!("service {k}"),
        }
    }
}

/// What the view shows now, so each round fetches only that: `/config_dump` (the whole
/// configuration in force) only for the Services and xDS panes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    pub config_dump: bool,
    /// The pod whose connections are listed.
    pub pod: Option<String>,
    /// The object drilled into.
    pub detail: Option<Target>,
}

/// One round's answers. `None`: not asked this round; `Err`: asked, and why it failed.
#[derive(Debug)]
pub struct Round {
    pub at: SystemTime,
    pub taken: Instant,
    pub workloads: Result<Value, String>,
    pub metrics: Result<String, String>,
    pub config_dump: Option<Result<Value, String>>,
    pub pod: Option<(String, Result<Value, String>)>,
    pub detail: Option<(Target, Result<Value, String>)>,
}

/// `GET path`: the body of a 200; otherwise the agent's message, or why it did not answer.
fn get(admin: SocketAddr, path: &str) -> Result<String, String> {
    match crate::cli::admin_request(admin, "GET", path) {
        Ok((200, body)) => Ok(body),
        Ok((status, body)) => Err(format!("GET {path}: {status} {}", body.trim())),
        Err(e) => Err(e.to_string()),
    }
}

fn get_json(admin: SocketAddr, path: &str) -> Result<Value, String> {
    let body = get(admin, path)?;
    serde_json::from_str(&body).map_err(|e| format!("GET {path}: {e}"))
}

/// One round of requests for `wanted`.
pub fn round(admin: SocketAddr, wanted: &Wanted) -> Round {
    let workloads = get_json(admin, "/workloads");
    // An agent that does not answer does not answer the rest either: one timeout, not five.
    let down = workloads
        .as_ref()
        .err()
        .filter(|e| !e.starts_with("GET "))
        .cloned();
    let ask = |path: &str| match &down {
        Some(e) => Err(e.clone()),
        None => get_json(admin, path),
    };
    Round {
        at: SystemTime::now(),
        taken: Instant::now(),
        metrics: match &down {
            Some(e) => Err(e.clone()),
            None => get(admin, "/metrics"),
        },
        config_dump: wanted.config_dump.then(|| ask("/config_dump")),
        pod: wanted
            .pod
            .as_ref()
            .map(|p| (p.clone(), ask(&Target::Pod(p.clone()).path()))),
        detail: wanted.detail.as_ref().map(|t| (t.clone(), ask(&t.path()))),
        workloads,
    }
}

/// Runs rounds until the view goes away (either channel closed): one every `interval`,
/// and one at once when a new `Wanted` arrives.
pub fn run(admin: SocketAddr, interval: Duration, wants: Receiver<Wanted>, out: Sender<Round>) {
    let mut wanted = Wanted::default();
    loop {
        // The newest wish wins.
        while let Ok(w) = wants.try_recv() {
            wanted = w;
        }
        if out.send(round(admin, &wanted)).is_err() {
            return;
        }
        match wants.recv_timeout(interval) {
            Ok(w) => wanted = w,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}
