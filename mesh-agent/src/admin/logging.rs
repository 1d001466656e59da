//! The log filter of a running agent (`/logging`, `mesh-agent log-level`), as Envoy's and
//! ztunnel's `/logging`: the process's subscriber filters through a reload layer, so an
//! operator turns on `debug` for one module while a problem is live and back off again,
//! without a restart (which would drop the very connections being looked at).
//!
//! The filter is process-wide state (one subscriber per process), so its handle is too:
//! `init` installs the subscriber and keeps the handle; the admin endpoint reads and
//! replaces the filter through `current` and `set`.
//!
//! The filter also decides the eBPF programs' decision log (`datapath::events`): the
//! datapath registers an `on_change` hook that writes the level the filter allows for
//! `mesh_agent::datapath::events` into the kernel's map, so
//! `mesh-agent log-level mesh_agent::datapath::events=debug,info` turns the kernel side
//! on, and any filter without it turns it off.

use std::sync::{Mutex, OnceLock};

use tracing_subscriber::{
    fmt, layer::SubscriberExt as _, reload, util::SubscriberInitExt as _, EnvFilter, Registry,
};

/// The filter used when `--log` does not parse.
pub const FALLBACK_FILTER: &str = "info";

/// Levels `?level=` takes (EnvFilter's own names).
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

struct Control {
    handle: reload::Handle<EnvFilter, Registry>,
    /// The filter the process started with (`?reset`).
    initial: String,
}

static CONTROL: OnceLock<Control> = OnceLock::new();

/// Called after every change of the filter (`on_change`).
type Hook = Box<dyn Fn() + Send + Sync>;
static HOOK: Mutex<Option<Hook>> = Mutex::new(None);

/// Runs `hook` now and after every change of the filter (replacing an earlier hook): how
/// the datapath's kernel-side log level follows the filter.
pub fn on_change(hook: Hook) {
    let mut h = HOOK.lock().unwrap_or_else(|e| e.into_inner());
    hook();
    *h = Some(hook);
}

fn changed() {
    if let Some(h) = HOOK.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        h();
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogError {
    #[error("invalid log filter {filter:?}: {reason} (the filter in force is kept)")]
    Invalid { filter: String, reason: String },
    #[error("invalid log level {0:?}: one of trace, debug, info, warn, error, off (the filter in force is kept)")]
    Level(String),
    #[error("say what to set: ?level=LEVEL (every module), ?filter=DIRECTIVES (EnvFilter syntax, e.g. mesh_agent::proxy=debug,info) or ?reset (the filter the agent started with)")]
    Usage,
    #[error("this process's log filter cannot be changed (no reloadable subscriber)")]
    NotReloadable,
    #[error("changing the log filter: {0}")]
    Reload(String),
}

/// A filter from EnvFilter directives; an empty one is refused (EnvFilter would read it
/// as "errors only", surely not what was meant).
pub fn parse(filter: &str) -> Result<EnvFilter, LogError> {
    let invalid = |reason: String| LogError::Invalid {
        filter: filter.to_owned(),
        reason,
    };
    if filter.trim().is_empty() {
        return Err(invalid("empty".into()));
    }
    EnvFilter::builder()
        .parse(filter)
        .map_err(|e| invalid(e.to_string()))
}

/// Installs the process's subscriber: text lines on stderr (colours when `ansi`), filtered
/// by `filter` (EnvFilter syntax) through a reload layer. A filter that does not parse
/// falls back to `info`, and says so once the subscriber is up.
pub fn init(filter: &str, ansi: bool) {
    let (env, bad) = match parse(filter) {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new(FALLBACK_FILTER), Some(e)),
    };
    let initial = if bad.is_some() {
        FALLBACK_FILTER.to_owned()
    } else {
        filter.to_owned()
    };
    let (layer, handle) = reload::Layer::new(env);
    tracing_subscriber::registry()
        .with(layer)
        .with(fmt::layer().with_writer(std::io::stderr).with_ansi(ansi))
        .init();
    let _ = CONTROL.set(Control { handle, initial });
    if let Some(e) = bad {
        tracing::warn!(error = %e, "--log: using {FALLBACK_FILTER}");
    }
}

/// The filter in force (EnvFilter's rendering of it).
pub fn current() -> Result<String, LogError> {
    let c = CONTROL.get().ok_or(LogError::NotReloadable)?;
    c.handle
        .with_current(|f| f.to_string())
        .map_err(|e| LogError::Reload(e.to_string()))
}

/// Replaces the filter; on any error the filter in force stays. Returns the new one.
pub fn set(filter: &str) -> Result<String, LogError> {
    let env = parse(filter)?;
    let c = CONTROL.get().ok_or(LogError::NotReloadable)?;
    let before = current()?;
    c.handle
        .reload(env)
        .map_err(|e| LogError::Reload(e.to_string()))?;
    let now = current()?;
    changed();
    tracing::info!(from = %before, to = %now, "log filter changed");
    Ok(now)
}

/// What a `POST /logging?...` asks for: the filter to set, from `level=LEVEL`,
/// `filter=DIRECTIVES` or `reset` (the query's values percent-decoded; `+` is a space).
pub fn requested(query: &str) -> Result<String, LogError> {
    let mut out = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        out = Some(match k {
            "level" => {
                let l = v.trim().to_ascii_lowercase();
                if !LEVELS.contains(&l.as_str()) {
                    return Err(LogError::Level(v));
                }
                l
            }
            "filter" => v,
            "reset" => CONTROL
                .get()
                .map(|c| c.initial.clone())
                .ok_or(LogError::NotReloadable)?,
            _ => return Err(LogError::Usage),
        });
    }
    out.ok_or(LogError::Usage)
}

/// `%XX` escapes and `+` (a space, as HTML forms send it) decoded; a malformed escape is
/// kept as it is (the filter check then names it).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `s` with every byte but RFC 3986's unreserved ones percent-encoded: safe in a query.
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|c| match c {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (c as char).to_string()
            }
            c => format!("%{c:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_or_say_why() {
        assert!(parse("info").is_ok());
        assert!(parse("mesh_agent::proxy=debug,info").is_ok());
        for bad in ["", "  ", "mesh_agent=loud", "a=b=c"] {
            match parse(bad) {
                Err(LogError::Invalid { filter, reason }) => {
                    assert_eq!(filter, bad);
                    assert!(!reason.is_empty());
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_query_names_a_level_a_filter_or_a_reset() {
        assert_eq!(requested("level=DEBUG").unwrap(), "debug");
        assert_eq!(
            requested("filter=mesh_agent%3A%3Aproxy%3Ddebug%2Cinfo").unwrap(),
            "mesh_agent::proxy=debug,info"
        );
        assert_eq!(requested("filter=a=debug").unwrap(), "a=debug");
        assert_eq!(
            requested("level=loud").unwrap_err(),
            LogError::Level("loud".into())
        );
        assert_eq!(requested("").unwrap_err(), LogError::Usage);
        assert_eq!(requested("colour=blue").unwrap_err(), LogError::Usage);
        // No subscriber in unit tests: nothing to reset to.
        assert_eq!(requested("reset").unwrap_err(), LogError::NotReloadable);
    }

    #[test]
    fn percent_coding_round_trips() {
        for s in [
            "mesh_agent::proxy=debug,info",
            "a[span{x=\"y z\"}]=trace",
            "100%",
        ] {
            assert_eq!(percent_decode(&percent_encode(s)), s);
        }
        assert_eq!(percent_decode("a+b%2"), "a b%2");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
