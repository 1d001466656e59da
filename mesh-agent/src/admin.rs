//! The admin endpoint (local, plain HTTP/1.1, GET only): `/metrics` (Prometheus),
//! `/ready` (200 once every readiness guard is up, else 503 naming what is missing),
//! `/config` (the resolved settings, JSON) and `/workloads` (the snapshot in force, JSON).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{debug, Instrument};

use crate::{bpf::Maps, metrics::Metrics, workload::Snapshot};

/// Named readiness guards; ready when all are set.
#[derive(Default)]
pub struct Readiness {
    pending: Mutex<Vec<&'static str>>,
}

impl Readiness {
    pub fn new(guards: &[&'static str]) -> Arc<Self> {
        Arc::new(Readiness {
            pending: Mutex::new(guards.to_vec()),
        })
    }
    pub fn set(&self, guard: &'static str) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|g| *g != guard);
    }
    pub fn missing(&self) -> Vec<&'static str> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub maps: Arc<Maps>,
    pub readiness: Arc<Readiness>,
    pub config_json: String,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub xds: Arc<crate::xds::client::XdsClient>,
    /// The embedded control plane's counters, when it runs.
    pub ads_stats: Option<Arc<crate::xds::server::ServerStats>>,
    /// The Kubernetes watchers' counters, with `--source kubernetes`.
    pub k8s: Option<Arc<crate::k8s::Stats>>,
}

/// Largest request head accepted (bytes).
const MAX_HEAD: usize = 8192;

/// `(status line, content type, body)` for a GET path.
pub type Reply = (&'static str, &'static str, String);
/// Answers `(method, path)`.
pub type Handler = Arc<dyn Fn(&str, &str) -> Reply + Send + Sync>;

/// Serves GET requests on a local listener with `handler(method, path)`; one request per
/// connection (plain HTTP/1.1, `connection: close`).
pub async fn serve_http(listener: TcpListener, handler: Handler) {
    loop {
        let Ok((conn, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(
            async move {
                if let Err(e) = handle(conn, &*handler).await {
                    debug!(error = %e, "admin request failed");
                }
            }
            .instrument(tracing::debug_span!("admin", %peer)),
        );
    }
}

async fn handle(
    mut conn: TcpStream,
    handler: &(dyn Fn(&str, &str) -> Reply + Send + Sync),
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).await?;
            if n == 0 || head.len() + n > MAX_HEAD {
                return Err(std::io::Error::other("incomplete or oversized request"));
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok(())
    })
    .await;
    let (status, ctype, body) = match read {
        Ok(Ok(())) => {
            let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            let mut parts = line.split(' ');
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if method != "GET" {
                (
                    "405 Method Not Allowed",
                    "text/plain",
                    "only GET is served\n".into(),
                )
            } else {
                handler(method, path.split('?').next().unwrap_or(""))
            }
        }
        _ => ("400 Bad Request", "text/plain", "bad request\n".to_owned()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(resp.as_bytes()).await?;
    conn.shutdown().await
}

impl Admin {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let me = self.clone();
        serve_http(listener, Arc::new(move |_, path| me.route(path))).await
    }

    fn route(&self, path: &str) -> Reply {
        match path {
            "/metrics" => {
                let mut text = self.metrics.render(&self.maps.stats());
                if let Some(k) = &self.k8s {
                    k.render(&mut text);
                }
                ("200 OK", "text/plain; version=0.0.4", text)
            }
            "/healthz" => ("200 OK", "text/plain", "ok\n".into()),
            "/k8s" => match &self.k8s {
                Some(k) => (
                    "200 OK",
                    "application/json",
                    serde_json::to_string_pretty(&k.json()).unwrap_or_default(),
                ),
                None => (
                    "404 Not Found",
                    "text/plain",
                    "the agent runs with --source file\n".into(),
                ),
            },
            "/ready" => {
                let missing = self.readiness.missing();
                if missing.is_empty() {
                    ("200 OK", "text/plain", "ready\n".into())
                } else {
                    (
                        "503 Service Unavailable",
                        "text/plain",
                        format!("not ready: {}\n", missing.join(", ")),
                    )
                }
            }
            "/config" => ("200 OK", "application/json", self.config_json.clone()),
            "/config_dump" => {
                let mut v = self.xds.dump();
                if let Some(s) = &self.ads_stats {
                    use std::sync::atomic::Ordering::Relaxed;
                    v["embedded_control_plane"] = serde_json::json!({
                        "streams": s.streams.load(Relaxed),
                        "responses": s.responses.load(Relaxed),
                        "resources_sent": s.resources_sent.load(Relaxed),
                        "bytes_sent": s.bytes_sent.load(Relaxed),
                        "acks": s.acks.load(Relaxed),
                        "nacks": s.nacks.load(Relaxed),
                    });
                }
                (
                    "200 OK",
                    "application/json",
                    serde_json::to_string_pretty(&v).unwrap_or_default(),
                )
            }
            "/workloads" => (
                "200 OK",
                "application/json",
                serde_json::to_string_pretty(&**self.snapshot.borrow()).unwrap_or_default(),
            ),
            _ => (
                "404 Not Found",
                "text/plain",
                "try /metrics, /ready, /healthz, /config, /config_dump, /workloads, /k8s\n".into(),
            ),
        }
    }
}
