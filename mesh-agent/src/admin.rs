//! The admin endpoint (local, plain HTTP/1.1 served by hyper; GET and HEAD): `/metrics`
//! (Prometheus), `/ready` (200 while no readiness guard is outstanding, else 503 naming
//! the outstanding ones: a start-up step, the xDS stream down, a drain), `/config` (the
//! runtime configuration, JSON), `/workloads` (the snapshot in force, JSON) and `/certs`
//! (the workload certificates held: identity, serial, validity, chain; never a key);
//! `/inspect/pod|service/NS/NAME` (one object joined end to end: `inspect`), `/logging`
//! (the log filter; POST `?level=` or `?filter=` changes it: `logging`);
//! `/debug/profile?seconds=N` (a CPU profile of the agent's threads as folded stacks) and
//! `/debug/heap` (the allocator's view beside the RSS): `profile`.

pub mod inspect;
pub mod logging;
pub mod profile;

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{
    header::{ALLOW, CONTENT_TYPE},
    HeaderValue, Method, Request, Response, StatusCode,
};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::watch};
use tracing::{debug, Instrument};

use crate::{datapath::Maps, enrol::Snapshot, lifecycle::ready::Ready, metrics::Metrics};

pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub maps: Arc<Maps>,
    /// Outstanding readiness guards (start-up steps, the xDS stream, a drain).
    pub ready: Ready,
    /// The runtime configuration (`config::RunConfig`), as JSON.
    pub config_json: String,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub xds: Arc<crate::proxy::xds::client::XdsClient>,
    /// The proxy's L7 engine: the configuration in force with its live endpoint state.
    pub l7: Arc<crate::proxy::http::L7>,
    /// The embedded control plane's counters, when it runs.
    pub ads_stats: Option<Arc<crate::control::server::ServerStats>>,
    /// The Kubernetes watchers' counters, with `--source kubernetes`.
    pub k8s: Option<Arc<crate::enrol::k8s::Stats>>,
    /// The workload certificates this agent holds.
    pub certs: Option<Arc<crate::identity::certs::CertManager>>,
    /// The pin folder: `/inspect` reads `FLOWS`, `SOCKHASH`, `FALLBACK` and `WORKLOADS`
    /// from their pins, never through the handles the proxy looks flows up with.
    pub pin_path: std::path::PathBuf,
}

impl Admin {
    /// The snapshot in force, where a workload the map writer could not put in
    /// `WORKLOADS` (its namespace's cookie unreadable) is reported `unresolved` with the
    /// error: the status never says captured for a workload the maps do not hold.
    fn workloads_json(&self) -> String {
        let mut v = serde_json::to_value(&**self.snapshot.borrow()).unwrap_or_default();
        let failures = self
            .maps
            .cookie_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(ws) = v.get_mut("workloads").and_then(|w| w.as_array_mut()) {
            for w in ws {
                let key = format!(
                    "{}/{}",
                    w["namespace"].as_str().unwrap_or_default(),
                    w["name"].as_str().unwrap_or_default()
                );
                if let Some(reason) = failures.get(&key) {
                    if w["unresolved"].is_null() {
                        w["unresolved"] = reason.clone().into();
                    }
                }
            }
        }
        serde_json::to_string_pretty(&v).unwrap_or_default()
    }

    /// The xDS series: the proxy's verdicts, and the embedded control plane's streams.
    fn render_xds(&self, out: &mut String) {
        use std::{fmt::Write as _, sync::atomic::Ordering::Relaxed};
        let (acks, nacks) = self.xds.verdict_counts();
        let _ = writeln!(
            out,
            "# HELP mesh_xds_responses_total xDS responses the proxy judged: accepted (ack) or refused (nack, the last good configuration stays).\n\
             # TYPE mesh_xds_responses_total counter\n\
             mesh_xds_responses_total{{verdict=\"ack\"}} {acks}\n\
             mesh_xds_responses_total{{verdict=\"nack\"}} {nacks}"
        );
        if let Some(s) = &self.ads_stats {
            let _ = writeln!(
                out,
                "# HELP mesh_xds_server_nacks_total NACKs the embedded control plane received.\n\
                 # TYPE mesh_xds_server_nacks_total counter\n\
                 mesh_xds_server_nacks_total {}\n\
                 # HELP mesh_xds_server_streams_open ADS streams open on the embedded control plane.\n\
                 # TYPE mesh_xds_server_streams_open gauge\n\
                 mesh_xds_server_streams_open {}\n\
                 # HELP mesh_xds_server_streams_refused_total ADS streams refused: no or wrong credentials (unauthenticated), too many streams (capacity), an unreadable or oversized request (bad_request).\n\
                 # TYPE mesh_xds_server_streams_refused_total counter\n\
                 mesh_xds_server_streams_refused_total{{reason=\"unauthenticated\"}} {}\n\
                 mesh_xds_server_streams_refused_total{{reason=\"capacity\"}} {}\n\
                 mesh_xds_server_streams_refused_total{{reason=\"bad_request\"}} {}",
                s.nacks.load(Relaxed),
                s.open.load(Relaxed),
                s.rejected.load(Relaxed),
                s.over_capacity.load(Relaxed),
                s.bad_requests.load(Relaxed),
            );
        }
    }
}

/// Longest a client may take to send a request head, from the moment the connection waits
/// for one (a new connection, or an idle keep-alive one): bounds slow clients (slowloris)
/// and idle connections alike. Requests are tiny; 5 s is generous for a local scraper.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head accepted (bytes): hyper's read buffer limit (its floor, 8 KiB); a
/// longer head is answered with 431.
const MAX_HEAD: usize = 8192;
/// Most header fields in a request (hyper answers more with 431).
const MAX_HEADERS: usize = 32;

/// `(status line, content type, body)` for a GET path.
pub type Reply = (&'static str, &'static str, String);
/// Answers `(method, path)`; the method is GET or HEAD (hyper leaves the body out of a
/// HEAD response), the path has no query.
pub type Handler = Arc<dyn Fn(&str, &str) -> Reply + Send + Sync>;
/// Answers a request that needs its query `(method, path, query)`: any POST, and the GETs
/// that take parameters; `None`: not one of those (a POST is then 405, a GET goes to the
/// `Handler`).
pub type PostHandler = Arc<dyn Fn(&Method, &str, &str) -> Option<Reply> + Send + Sync>;

/// Serves GET and HEAD requests on a local listener with `handler(method, path)`: HTTP/1.1
/// with keep-alive (hyper), other methods 405, an unparsable request 400, an oversized
/// head 431, and a connection that does not send a whole request head within
/// `HEADER_READ_TIMEOUT` is closed.
pub async fn serve_http(listener: TcpListener, handler: Handler) {
    serve_http_with(listener, handler, Arc::new(|_, _, _| None)).await
}

/// `serve_http`, and POST requests (and GETs with parameters) with `post(method, path,
/// query)` (the request body is not read: a POST says what it wants in its query, as
/// Envoy's `/logging?level=debug`).
pub async fn serve_http_with(listener: TcpListener, handler: Handler, post: PostHandler) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, most likely: back off instead of spinning.
                debug!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (handler, post) = (handler.clone(), post.clone());
        tokio::spawn(
            async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    // Rendering reads maps (system calls) and may serialise the whole
                    // configuration: blocking work, kept off the control runtime.
                    let (handler, method) = (handler.clone(), req.method().clone());
                    let post = post.clone();
                    let path = req.uri().path().to_owned();
                    let query = req.uri().query().unwrap_or_default().to_owned();
                    async move {
                        let resp = tokio::task::spawn_blocking(move || {
                            respond(&*handler, &*post, &method, &path, &query)
                        })
                        .await
                        .unwrap_or_else(|e| {
                            debug!(error = %e, "admin handler failed");
                            let mut r = Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                            r
                        });
                        Ok::<_, Infallible>(resp)
                    }
                });
                let served = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .max_buf_size(MAX_HEAD)
                    .max_headers(MAX_HEADERS)
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(conn), svc)
                    .await;
                if let Err(e) = served {
                    debug!(error = %e, "admin connection ended");
                }
            }
            .instrument(tracing::debug_span!("admin", %peer)),
        );
    }
}

/// The response to one request: the handler's reply for GET and HEAD, the POST
/// handler's for a POST it takes, 405 otherwise.
fn respond(
    handler: &(dyn Fn(&str, &str) -> Reply + Send + Sync),
    post: &(dyn Fn(&Method, &str, &str) -> Option<Reply> + Send + Sync),
    method: &Method,
    path: &str,
    query: &str,
) -> Response<Full<Bytes>> {
    let posted = if *method == Method::POST || *method == Method::GET {
        post(method, path, query)
    } else {
        None
    };
    let allowed = *method == Method::GET || *method == Method::HEAD || posted.is_some();
    let (status, ctype, body) = if let Some(reply) = posted {
        reply
    } else if allowed {
        handler(method.as_str(), path)
    } else {
        (
            "405 Method Not Allowed",
            "text/plain",
            "only GET is served\n".into(),
        )
    };
    let code = status
        .split(' ')
        .next()
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    debug!(%method, path, status = code.as_u16(), "admin request");
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    if !allowed {
        h.insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    resp
}

impl Admin {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let me = self.clone();
        serve_http_with(
            listener,
            Arc::new(move |_, path| me.route(path)),
            Arc::new(|method, path, query| match (method.as_str(), path) {
                ("POST", "/logging") => Some(logging_reply(
                    logging::requested(query).and_then(|f| logging::set(&f)),
                )),
                // Holds this blocking-pool thread for the profile's seconds.
                ("GET", "/debug/profile") => Some(profile_reply(query)),
                _ => None,
            }),
        )
        .await
    }

    fn route(&self, path: &str) -> Reply {
        match path {
            "/metrics" => {
                let mut text = self.metrics.render(&self.maps.stats());
                self.render_xds(&mut text);
                if let Some(k) = &self.k8s {
                    k.render(&mut text);
                }
                if let Some(c) = &self.certs {
                    c.render_metrics(&mut text);
                }
                self.maps.features.render(&mut text);
                // Istio's standard series, encoded by prometheus-client.
                self.metrics.l7.istio.encode(&mut text);
                ("200 OK", "text/plain; version=0.0.4", text)
            }
            "/healthz" => ("200 OK", "text/plain", "ok\n".into()),
            "/debug/heap" => match profile::heap() {
                Ok(h) => (
                    "200 OK",
                    "application/json",
                    serde_json::to_string_pretty(&h).unwrap_or_default() + "\n",
                ),
                Err(e) => (e.status(), "text/plain", format!("{e}\n")),
            },
            "/logging" => logging_reply(logging::current()),
            p if p.starts_with("/inspect/") => self.inspect(&p["/inspect/".len()..]),
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
                let missing = self.ready.pending();
                // Missing kernel features do not make the agent unready (it takes their
                // fallback), but whoever looks at readiness sees them.
                let degraded = self.maps.features.degraded_lines();
                if missing.is_empty() {
                    ("200 OK", "text/plain", format!("ready\n{degraded}"))
                } else {
                    (
                        "503 Service Unavailable",
                        "text/plain",
                        format!("not ready: {}\n{degraded}", missing.join(", ")),
                    )
                }
            }
            "/kernel" => (
                "200 OK",
                "application/json",
                serde_json::to_string_pretty(&self.maps.features).unwrap_or_default(),
            ),
            "/config" => ("200 OK", "application/json", self.config_json.clone()),
            "/config_dump" => {
                let mut v = self.xds.dump();
                // Ejections live in the engine, not in the configuration.
                v["in_force"] = self.l7.config_dump();
                if let Some(s) = &self.ads_stats {
                    use std::sync::atomic::Ordering::Relaxed;
                    v["embedded_control_plane"] = serde_json::json!({
                        "streams": s.streams.load(Relaxed),
                        "responses": s.responses.load(Relaxed),
                        "resources_sent": s.resources_sent.load(Relaxed),
                        "bytes_sent": s.bytes_sent.load(Relaxed),
                        "acks": s.acks.load(Relaxed),
                        "nacks": s.nacks.load(Relaxed),
                        "rejected": s.rejected.load(Relaxed),
                        "open_streams": s.open.load(Relaxed),
                        "over_capacity": s.over_capacity.load(Relaxed),
                        "bad_requests": s.bad_requests.load(Relaxed),
                    });
                }
                (
                    "200 OK",
                    "application/json",
                    serde_json::to_string_pretty(&v).unwrap_or_default(),
                )
            }
            "/certs" => (
                "200 OK",
                "application/json",
                serde_json::to_string_pretty(
                    &self
                        .certs
                        .as_ref()
                        .map(|c| c.snapshot())
                        .unwrap_or_default(),
                )
                .unwrap_or_default(),
            ),
            "/workloads" => (
                "200 OK",
                "application/json",
                self.workloads_json(),
            ),
            _ => (
                "404 Not Found",
                "text/plain",
                "try /metrics, /ready, /healthz, /config, /config_dump, /workloads, /certs, /k8s, /kernel, /inspect, /logging, /debug/profile, /debug/heap\n"
                    .into(),
            ),
        }
    }
}

/// `/debug/profile?seconds=N[&format=json]`: the folded stacks (text, flame graph input)
/// or the whole profile with its counts (JSON); a refusal says why (busy, bad seconds,
/// the kernel's denial).
fn profile_reply(query: &str) -> Reply {
    let r = profile::parse_query(query).and_then(|(seconds, json)| {
        let p = profile::cpu(seconds)?;
        tracing::info!(
            seconds,
            samples = p.samples,
            lost = p.lost,
            threads = p.threads,
            "CPU profile taken"
        );
        Ok(if json {
            serde_json::to_string(&p).unwrap_or_default() + "\n"
        } else {
            p.folded_text()
        })
    });
    match r {
        Ok(body) => (
            "200 OK",
            if body.starts_with('{') {
                "application/json"
            } else {
                "text/plain"
            },
            body,
        ),
        Err(e) => (e.status(), "text/plain", format!("{e}\n")),
    }
}

/// `/logging`'s answer: the filter in force, or why a change was refused (400: the filter
/// in force stays).
fn logging_reply(r: Result<String, logging::LogError>) -> Reply {
    match r {
        Ok(f) => ("200 OK", "text/plain", format!("{f}\n")),
        Err(e @ logging::LogError::NotReloadable) | Err(e @ logging::LogError::Reload(_)) => {
            ("500 Internal Server Error", "text/plain", format!("{e}\n"))
        }
        Err(e) => ("400 Bad Request", "text/plain", format!("{e}\n")),
    }
}
