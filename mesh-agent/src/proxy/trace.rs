//! Distributed traces: OpenTelemetry spans of what the proxy does, exported over OTLP/gRPC.
//!
//! - L7: a server span per HTTP request (`RequestSpan`), and a client span per try of it
//!   (retries show as sibling tries, `http.request.resend_count` 1, 2, ...). The request
//!   span continues the trace the request arrived with (`traceparent`, or B3 single or
//!   multi-header, `propagation`); each try sends the trace on with the try as parent.
//! - L4: a span per proxied TCP connection (`Tracer::connection`), from the same record
//!   the access log writes: bytes each way, the path taken, the endpoint, the outcome.
//!
//! Sampling is parent-based: a request whose caller decided (W3C sampled flag, B3
//! `X-B3-Sampled`/`d`) follows that decision; otherwise the trace id decides against
//! `--trace-sampling` (OpenTelemetry's `TraceIdRatioBased`, so every proxy of the mesh
//! agrees on a trace). An unsampled request costs one header lookup and is forwarded with
//! its headers as they came.
//!
//! The data path never waits for the exporter: a finished span goes into a bounded queue
//! (`QUEUE_CAPACITY`, dropped and counted in `mesh_trace_spans_dropped_total` when full);
//! one thread (`trace-export`) takes up to `MAX_BATCH` spans every `EXPORT_TICK` and sends
//! them with opentelemetry-otlp's gRPC exporter (tonic) on its own small runtime. Off by
//! default, and then free: the proxy holds no `Tracer` and checks only for its absence.

pub mod propagation;

use std::{
    borrow::Cow,
    net::SocketAddr,
    sync::{
        atomic::Ordering::Relaxed,
        mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError},
        Arc,
    },
    time::{Duration, SystemTime},
};

use http::{HeaderMap, Method, Request, Version};
use opentelemetry::{
    trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
    InstrumentationScope, KeyValue,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    resource::{EnvResourceDetector, TelemetryResourceDetector},
    trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks},
    Resource,
};

use self::propagation::{Format, Incoming};
use crate::{
    metrics::Metrics,
    proxy::accesslog::{Addr, Entry, Flags, PathTaken},
};

/// Spans the queue holds before new ones are dropped (OpenTelemetry's default
/// `max_queue_size` is 2048; a request makes two spans or more).
pub const QUEUE_CAPACITY: usize = 4096;
/// Most spans sent in one export call (OpenTelemetry's default `max_export_batch_size`).
pub const MAX_BATCH: usize = 512;
/// How often the exporter takes the queued spans when fewer than `MAX_BATCH` wait.
const EXPORT_TICK: Duration = Duration::from_millis(200);
/// Deadline of one export call (each try of the exporter's own retries).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest attribute text the proxy takes from a request or an error (bytes).
pub const MAX_ATTR_LEN: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("--trace-otlp {endpoint:?}: {reason} (expected http://host:port of an OTLP/gRPC receiver, e.g. an OpenTelemetry Collector on 4317)")]
    Endpoint { endpoint: String, reason: String },
    #[error("starting the trace exporter thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// What the tracer is started with (`--trace-otlp`, `--trace-sampling`, the node).
#[derive(Debug, Clone)]
pub struct TraceOptions {
    /// `http://host:port` of the OTLP/gRPC receiver.
    pub endpoint: String,
    /// Share of traces started here that are recorded, 0.0 to 1.0.
    pub sampling: f64,
    /// This node's name (`service.instance.id`, `k8s.node.name`).
    pub node_name: String,
}

/// The proxy's handle on tracing: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Tracer {
    inner: Arc<Inner>,
}

struct Inner {
    tx: SyncSender<SpanData>,
    /// `TraceIdRatioBased`'s bound: sampled when the trace id's low 63 bits are below it.
    threshold: u64,
    metrics: Arc<Metrics>,
    scope: InstrumentationScope,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tracer")
    }
}

/// The resource every span of this agent carries: `service.name` (`mesh-agent`),
/// `service.version`, `service.instance.id` and `k8s.node.name` (the node), `host.name`,
/// the SDK's `telemetry.sdk.*`; `OTEL_RESOURCE_ATTRIBUTES` adds or overrides, and
/// `OTEL_SERVICE_NAME` names the service, as in every OpenTelemetry SDK.
pub fn resource(node_name: &str) -> Resource {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let mut b = Resource::builder_empty()
        .with_detector(Box::new(TelemetryResourceDetector))
        .with_attributes([
            KeyValue::new("service.name", "mesh-agent"),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", node_name.to_owned()),
            KeyValue::new("k8s.node.name", node_name.to_owned()),
            KeyValue::new("host.name", host),
        ])
        .with_detector(Box::new(EnvResourceDetector::new()));
    if let Some(name) = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
    {
        b = b.with_service_name(name);
    }
    b.build()
}

/// `TraceIdRatioBased`'s threshold for `ratio` (clamped to 0..=1).
fn threshold(ratio: f64) -> u64 {
    (ratio.clamp(0.0, 1.0) * (1u64 << 63) as f64) as u64
}

fn nonzero_u128() -> u128 {
    loop {
        let v = fastrand::u128(..);
        if v != 0 {
            return v;
        }
    }
}

fn nonzero_u64() -> u64 {
    loop {
        let v = fastrand::u64(..);
        if v != 0 {
            return v;
        }
    }
}

/// `s`, cut to at most `MAX_ATTR_LEN` bytes at a character boundary.
fn bounded(s: &str) -> String {
    let mut end = s.len().min(MAX_ATTR_LEN);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// A method name for span names and attributes: one of HTTP's, or `_OTHER`
/// (OpenTelemetry's convention, which also keeps span names few).
fn method_name(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

fn path_taken(p: PathTaken) -> &'static str {
    match p {
        PathTaken::Proxied => "proxied",
        PathTaken::ProxiedSkMsg => "proxied+sk_msg",
        PathTaken::Tunnel => "tunnel",
        PathTaken::Inbound => "inbound",
        PathTaken::InboundTunnel => "inbound+tunnel",
    }
}

fn flags_text(f: Flags) -> Option<String> {
    if f.is_empty() {
        return None;
    }
    serde_json::to_value(f)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
}

fn addr_attrs(attrs: &mut Vec<KeyValue>, prefix: &'static str, a: SocketAddr) {
    let (ip, port) = match prefix {
        "client" => ("client.address", "client.port"),
        "server" => ("server.address", "server.port"),
        _ => ("network.peer.address", "network.peer.port"),
    };
    attrs.push(KeyValue::new(ip, a.ip().to_string()));
    attrs.push(KeyValue::new(port, i64::from(a.port())));
}

impl Tracer {
    /// Starts the exporter thread (`trace-export`) towards `opts.endpoint`. It ends, after
    /// sending what is queued, once every handle is dropped.
    pub fn start(opts: &TraceOptions, metrics: Arc<Metrics>) -> Result<Tracer, TraceError> {
        check_endpoint(&opts.endpoint)?;
        let (tracer, rx) = Tracer::channel(QUEUE_CAPACITY, opts.sampling, metrics.clone());
        let resource = resource(&opts.node_name);
        let endpoint = opts.endpoint.clone();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("trace-export".into())
            .spawn(move || export_thread(rx, endpoint, resource, metrics, ready_tx))
            .map_err(TraceError::Thread)?;
        // The exporter is built on its thread (tonic needs a runtime); its verdict on the
        // endpoint comes back here so that a bad one fails the start.
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(tracer),
            Ok(Err(reason)) => Err(TraceError::Endpoint {
                endpoint: opts.endpoint.clone(),
                reason,
            }),
            Err(_) => Err(TraceError::Endpoint {
                endpoint: opts.endpoint.clone(),
                reason: "the exporter thread ended before it started".into(),
            }),
        }
    }

    fn channel(
        capacity: usize,
        sampling: f64,
        metrics: Arc<Metrics>,
    ) -> (Tracer, Receiver<SpanData>) {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let scope = InstrumentationScope::builder("mesh-agent")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        let inner = Inner {
            tx,
            threshold: threshold(sampling),
            metrics,
            scope,
        };
        (
            Tracer {
                inner: Arc::new(inner),
            },
            rx,
        )
    }

    /// A tracer whose spans the test reads from the receiver (no exporter thread).
    #[cfg(test)]
    pub(crate) fn for_tests(sampling: f64) -> (Tracer, Receiver<SpanData>) {
        Tracer::channel(QUEUE_CAPACITY, sampling, Arc::new(Metrics::default()))
    }

    /// Whether a trace of this id is recorded when nobody upstream decided.
    fn ratio_sampled(&self, trace_id: u128) -> bool {
        ((trace_id as u64) >> 1) < self.inner.threshold
    }

    /// Queues a finished span; drops it (counted) if the queue is full or the exporter
    /// is gone.
    fn send(&self, span: SpanData) {
        match self.inner.tx.try_send(span) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.inner.metrics.trace_spans_dropped.fetch_add(1, Relaxed);
            }
        }
    }

    #[expect(clippy::too_many_arguments, reason = "one span's whole record")]
    fn span(
        &self,
        trace_id: u128,
        span_id: u64,
        parent: Option<(u64, bool)>,
        kind: SpanKind,
        name: Cow<'static, str>,
        start: SystemTime,
        attributes: Vec<KeyValue>,
        status: Status,
    ) -> SpanData {
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(trace_id),
                SpanId::from(span_id),
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            ),
            parent_span_id: parent.map_or(SpanId::INVALID, |p| SpanId::from(p.0)),
            parent_span_is_remote: parent.is_some_and(|p| p.1),
            span_kind: kind,
            name,
            start_time: start,
            end_time: SystemTime::now().max(start),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.inner.scope.clone(),
        }
    }

    /// The span of a request arriving from `d`, if its trace is sampled (None: nothing is
    /// recorded and the request's own propagation headers pass through untouched).
    pub fn request<B>(&self, req: &Request<B>, d: Downstream<'_>) -> Option<RequestSpan> {
        let incoming = propagation::extract(req.headers());
        let (trace_id, parent) = match incoming.parent {
            Some(p) => (p.trace_id, Some(p)),
            None => (nonzero_u128(), None),
        };
        let sampled = match incoming {
            Incoming {
                sampled: Some(s), ..
            } => s,
            Incoming { sampled: None, .. } => self.ratio_sampled(trace_id),
        };
        if !sampled {
            return None;
        }
        let method = method_name(req.method());
        let mut attrs = Vec::with_capacity(16);
        attrs.push(KeyValue::new("http.request.method", method));
        attrs.push(KeyValue::new("url.path", bounded(req.uri().path())));
        if let Some(a) = d.authority {
            attrs.push(KeyValue::new("server.address", bounded(a)));
        }
        attrs.push(KeyValue::new(
            "network.protocol.version",
            match req.version() {
                Version::HTTP_2 => "2",
                Version::HTTP_10 | Version::HTTP_09 => "1.0",
                _ => "1.1",
            },
        ));
        match (d.peer, d.client_ip) {
            (Some(p), _) => addr_attrs(&mut attrs, "client", p),
            (None, Some(ip)) => attrs.push(KeyValue::new("client.address", ip.to_string())),
            (None, None) => {}
        }
        attrs.push(KeyValue::new("mesh.source.workload", d.source.to_owned()));
        attrs.push(KeyValue::new("mesh.destination.address", d.dst.to_string()));
        attrs.push(KeyValue::new(
            "mesh.destination.service",
            d.service.to_owned(),
        ));
        attrs.push(KeyValue::new(
            "mesh.path_taken",
            if d.skmsg { "proxied+sk_msg" } else { "proxied" },
        ));
        Some(RequestSpan {
            tracer: self.clone(),
            trace_id,
            span_id: nonzero_u64(),
            parent: parent.map(|p| p.span_id),
            format: parent.map(|p| (p.format, p.short_trace_id)),
            method,
            start: SystemTime::now(),
            attrs,
            tries: 0,
            current: None,
            name: None,
            inbound: false,
        })
    }

    /// The span of a request the destination node terminates (`proxy::secure::http`:
    /// an L7 AuthorizationPolicy applies to the pod's port), if its trace is sampled:
    /// parented by the caller's `traceparent`/B3 context as `request` is, sampled by the
    /// same rules. The request's propagation headers are rewritten to name this span as
    /// the parent, so the application's own span hangs under it; an unsampled request
    /// keeps its headers as they came.
    pub fn inbound_request<B>(
        &self,
        req: &mut Request<B>,
        d: InboundDownstream<'_>,
    ) -> Option<RequestSpan> {
        let incoming = propagation::extract(req.headers());
        let (trace_id, parent) = match incoming.parent {
            Some(p) => (p.trace_id, Some(p)),
            None => (nonzero_u128(), None),
        };
        let sampled = incoming
            .sampled
            .unwrap_or_else(|| self.ratio_sampled(trace_id));
        if !sampled {
            return None;
        }
        let method = method_name(req.method());
        let mut attrs = Vec::with_capacity(16);
        attrs.push(KeyValue::new("http.request.method", method));
        attrs.push(KeyValue::new("url.path", bounded(req.uri().path())));
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| req.headers().get(http::header::HOST)?.to_str().ok());
        if let Some(a) = authority {
            attrs.push(KeyValue::new("server.address", bounded(a)));
        }
        attrs.push(KeyValue::new(
            "network.protocol.version",
            match req.version() {
                Version::HTTP_2 => "2",
                Version::HTTP_10 | Version::HTTP_09 => "1.0",
                _ => "1.1",
            },
        ));
        attrs.push(KeyValue::new("client.address", d.source_ip.to_string()));
        attrs.push(KeyValue::new("mesh.reporter", "destination"));
        attrs.push(KeyValue::new(
            "mesh.path_taken",
            if d.tunnel {
                "inbound+tunnel"
            } else {
                "inbound"
            },
        ));
        if let Some(p) = d.source_principal {
            attrs.push(KeyValue::new("mesh.source.principal", bounded(p)));
        }
        if let Some(w) = d.source_workload {
            attrs.push(KeyValue::new("mesh.source.workload", bounded(w)));
        }
        attrs.push(KeyValue::new("mesh.destination.address", d.dst.to_string()));
        attrs.push(KeyValue::new(
            "mesh.destination.workload",
            d.destination.to_owned(),
        ));
        let span_id = nonzero_u64();
        let format = parent.map(|p| (p.format, p.short_trace_id));
        // B3's parent of the application's span is this span's own parent (none: a root).
        propagation::inject(
            req.headers_mut(),
            trace_id,
            span_id,
            parent.map_or(span_id, |p| p.span_id),
            format,
        );
        if parent.is_none() {
            propagation::drop_b3_parent(req.headers_mut(), trace_id, span_id);
        }
        Some(RequestSpan {
            tracer: self.clone(),
            trace_id,
            span_id,
            parent: parent.map(|p| p.span_id),
            format,
            method,
            start: SystemTime::now(),
            attrs,
            tries: 0,
            current: None,
            name: Some(Cow::Owned(format!("{method} {}", d.destination))),
            inbound: true,
        })
    }

    /// The span of a proxied TCP connection, from its access-log record once it ended
    /// (`Entry::finish` called): a root of its own trace, sampled by the ratio.
    pub fn connection(&self, e: &Entry) {
        self.connection_span(e, false);
    }

    /// The span of an inbound TCP connection the destination node delivered into a pod
    /// (plain text, or an HBONE stream), from its record once it ended: as `connection`,
    /// with `mesh.reporter=destination`.
    pub fn destination_connection(&self, e: &Entry) {
        self.connection_span(e, true);
    }

    fn connection_span(&self, e: &Entry, destination: bool) {
        let trace_id = nonzero_u128();
        if !self.ratio_sampled(trace_id) {
            return;
        }
        let mut attrs = Vec::with_capacity(20);
        attrs.push(KeyValue::new("network.transport", "tcp"));
        match e.source_address {
            Some(Addr::Sock(a)) => addr_attrs(&mut attrs, "client", a),
            Some(Addr::Ip(ip)) => attrs.push(KeyValue::new("client.address", ip.to_string())),
            None => {}
        }
        if let Some(d) = e.destination_address {
            addr_attrs(&mut attrs, "server", d);
        }
        if let Some(u) = e.upstream_host {
            addr_attrs(&mut attrs, "peer", u);
        }
        attrs.push(KeyValue::new("mesh.path_taken", path_taken(e.path_taken)));
        if destination {
            attrs.push(KeyValue::new("mesh.reporter", "destination"));
        }
        let mut text = |k: &'static str, v: &Option<String>| {
            if let Some(v) = v {
                attrs.push(KeyValue::new(k, bounded(v)));
            }
        };
        text("mesh.source.workload", &e.source_workload);
        text("mesh.source.principal", &e.source_principal);
        text("mesh.destination.workload", &e.destination_workload);
        text("mesh.destination.principal", &e.destination_principal);
        text("mesh.destination.service", &e.destination_service);
        text("mesh.upstream_cluster", &e.upstream_cluster);
        text("mesh.policy", &e.policy_name);
        // Unknown (None) on the tunnel path, whose relay counts per series only.
        for (k, v) in [
            ("mesh.bytes_received", e.bytes_received),
            ("mesh.bytes_sent", e.bytes_sent),
        ] {
            if let Some(v) = v {
                attrs.push(KeyValue::new(k, i64::try_from(v).unwrap_or(i64::MAX)));
            }
        }
        let flags = flags_text(e.response_flags);
        if let Some(f) = &flags {
            attrs.push(KeyValue::new("mesh.response_flags", f.clone()));
        }
        let status = match (&e.connection_termination_details, flags) {
            (Some(d), _) => Status::error(bounded(d)),
            (None, Some(f)) => Status::error(f),
            (None, None) => Status::Unset,
        };
        let span = self.span(
            trace_id,
            nonzero_u64(),
            None,
            SpanKind::Server,
            Cow::Borrowed("tcp"),
            e.start_time,
            attrs,
            status,
        );
        self.send(span);
    }
}

/// The downstream side of a request, as the L7 engine knows it at arrival.
#[derive(Debug, Clone, Copy)]
pub struct Downstream<'a> {
    pub peer: Option<SocketAddr>,
    pub client_ip: Option<std::net::IpAddr>,
    /// `ns/name` or `unknown`.
    pub source: &'a str,
    /// The original destination.
    pub dst: SocketAddr,
    /// The listener's (service's) name.
    pub service: &'a str,
    pub authority: Option<&'a str>,
    pub skmsg: bool,
}

/// A request the destination node terminates, as it knows it at arrival.
#[derive(Debug, Clone, Copy)]
pub struct InboundDownstream<'a> {
    /// The source's address: the source pod's (believed `Forwarded: for=`, or plain
    /// text's peer), else the sending node's.
    pub source_ip: std::net::IpAddr,
    /// The tunnel peer's verified identity; None: plain text.
    pub source_principal: Option<&'a str>,
    /// `ns/name` of the source workload, when the destination knows it.
    pub source_workload: Option<&'a str>,
    /// `ns/name` of the pod the request is for.
    pub destination: &'a str,
    /// The pod's address and port.
    pub dst: SocketAddr,
    /// Arrived through the HBONE tunnel.
    pub tunnel: bool,
}

/// One try in flight.
struct Try {
    span_id: u64,
    start: SystemTime,
    attrs: Vec<KeyValue>,
    name: Cow<'static, str>,
    /// The response head's status, once it came.
    status: Option<u16>,
}

/// How a request ended, for its span.
#[derive(Debug, Clone, Copy)]
pub struct RequestEnd<'a> {
    /// The status sent downstream (0: none).
    pub status: u16,
    pub route: &'a str,
    /// `unknown` when no cluster was picked.
    pub cluster: &'a str,
    pub flags: Flags,
    pub received: u64,
    pub sent: u64,
}

/// A sampled request's span and its tries; ends with `finish` (when the response's last
/// frame went out, or the proxy's own reply was made).
pub struct RequestSpan {
    tracer: Tracer,
    trace_id: u128,
    span_id: u64,
    /// The caller's span (remote).
    parent: Option<u64>,
    /// The B3 format (and trace-id width) to answer in; None: W3C only.
    format: Option<(Format, bool)>,
    method: &'static str,
    start: SystemTime,
    attrs: Vec<KeyValue>,
    tries: u32,
    current: Option<Try>,
    /// The span's name when it is not `METHOD service` (the destination's spans).
    name: Option<Cow<'static, str>>,
    /// Made by the destination for a request it terminates: no tries, no attempts.
    inbound: bool,
}

impl RequestSpan {
    pub fn trace_id(&self) -> u128 {
        self.trace_id
    }

    pub fn span_id(&self) -> u64 {
        self.span_id
    }

    /// Adds an attribute learnt after the span started (cut to `MAX_ATTR_LEN`).
    pub fn set_attribute(&mut self, key: &'static str, value: &str) {
        self.attrs.push(KeyValue::new(key, bounded(value)));
    }

    /// A try begins towards `endpoint` of `cluster` (through the HBONE tunnel when
    /// `tunnel`): its span starts, and `headers` (the upstream request's, and the kept
    /// request of a try that never left, `unsent`) carry it as the parent.
    pub fn start_try(
        &mut self,
        headers: &mut HeaderMap,
        unsent: Option<&mut HeaderMap>,
        cluster: &str,
        endpoint: SocketAddr,
        tunnel: bool,
    ) {
        self.end_try(Err("abandoned"));
        let span_id = nonzero_u64();
        propagation::inject(headers, self.trace_id, span_id, self.span_id, self.format);
        if let Some(h) = unsent {
            propagation::inject(h, self.trace_id, span_id, self.span_id, self.format);
        }
        let mut attrs = Vec::with_capacity(10);
        attrs.push(KeyValue::new("http.request.method", self.method));
        addr_attrs(&mut attrs, "server", endpoint);
        attrs.push(KeyValue::new("mesh.upstream_cluster", cluster.to_owned()));
        attrs.push(KeyValue::new(
            "mesh.path_taken",
            if tunnel { "tunnel" } else { "proxied" },
        ));
        if self.tries > 0 {
            attrs.push(KeyValue::new(
                "http.request.resend_count",
                i64::from(self.tries),
            ));
        }
        self.tries += 1;
        self.current = Some(Try {
            span_id,
            start: SystemTime::now(),
            attrs,
            name: Cow::Owned(format!("{} {cluster}", self.method)),
            status: None,
        });
    }

    /// The try in flight got a response head (`Ok(status)`) or failed (`Err(why)`:
    /// `timeout`, `connect_failure`, `reset`, ...). A try that failed ends here; one that
    /// got a response stays open until the response ends (`finish`), unless another try
    /// follows.
    pub fn try_result(&mut self, result: Result<u16, &'static str>) {
        let Some(t) = self.current.as_mut() else {
            return;
        };
        match result {
            Ok(status) => {
                t.status = Some(status);
                t.attrs.push(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status),
                ));
                if status >= 400 {
                    t.attrs
                        .push(KeyValue::new("error.type", status.to_string()));
                }
            }
            Err(why) => self.end_try(Err(why)),
        }
    }

    /// Ends the try in flight, if any; `Err(why)` marks it failed unless it already had a
    /// response.
    fn end_try(&mut self, result: Result<(), &'static str>) {
        let Some(mut t) = self.current.take() else {
            return;
        };
        let status = match (t.status, result) {
            (Some(s), _) if s >= 400 => Status::error(format!("HTTP {s}")),
            (Some(_), _) | (None, Ok(())) => Status::Unset,
            (None, Err(why)) => {
                t.attrs.push(KeyValue::new("error.type", why));
                Status::error(why)
            }
        };
        let span = self.tracer.span(
            self.trace_id,
            t.span_id,
            Some((self.span_id, false)),
            SpanKind::Client,
            t.name,
            t.start,
            t.attrs,
            status,
        );
        self.tracer.send(span);
    }

    /// The request ended: the last try (if still open) and the request's span are sent.
    pub fn finish(mut self, end: RequestEnd<'_>) {
        self.end_try(Ok(()));
        let mut attrs = std::mem::take(&mut self.attrs);
        if end.status != 0 {
            attrs.push(KeyValue::new(
                "http.response.status_code",
                i64::from(end.status),
            ));
        }
        if !end.route.is_empty() {
            attrs.push(KeyValue::new("mesh.route", end.route.to_owned()));
        }
        if end.cluster != "unknown" {
            attrs.push(KeyValue::new(
                "mesh.upstream_cluster",
                end.cluster.to_owned(),
            ));
        }
        if !self.inbound {
            attrs.push(KeyValue::new("mesh.attempts", i64::from(self.tries)));
        }
        let flags = flags_text(end.flags);
        if let Some(f) = &flags {
            attrs.push(KeyValue::new("mesh.response_flags", f.clone()));
        }
        let size = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        attrs.push(KeyValue::new("http.request.body.size", size(end.received)));
        attrs.push(KeyValue::new("http.response.body.size", size(end.sent)));
        // A server span is in error for 5xx only (OpenTelemetry's HTTP conventions).
        let status = if end.status >= 500 || end.status == 0 {
            attrs.push(KeyValue::new(
                "error.type",
                if end.status == 0 {
                    "no_response".to_owned()
                } else {
                    end.status.to_string()
                },
            ));
            Status::error(flags.unwrap_or_else(|| format!("HTTP {}", end.status)))
        } else {
            Status::Unset
        };
        let name = match self.name.take() {
            Some(n) => n,
            None => match attrs
                .iter()
                .find(|kv| kv.key.as_str() == "mesh.destination.service")
            {
                Some(kv) => Cow::Owned(format!("{} {}", self.method, kv.value)),
                None => Cow::Borrowed(self.method),
            },
        };
        let span = self.tracer.span(
            self.trace_id,
            self.span_id,
            self.parent.map(|p| (p, true)),
            SpanKind::Server,
            name,
            self.start,
            attrs,
            status,
        );
        self.tracer.send(span);
    }
}

/// The endpoint as the exporter takes it: `http://host:port` (TLS is not built in).
fn check_endpoint(endpoint: &str) -> Result<(), TraceError> {
    let bad = |reason: &str| TraceError::Endpoint {
        endpoint: endpoint.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: http::Uri = endpoint.parse().map_err(|_| bad("not a URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(bad(
                "https is not supported: run a local collector (or a node-local one) and send it plaintext",
            ))
        }
        _ => return Err(bad("the scheme must be http://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    Ok(())
}

/// The exporter thread: builds the OTLP/gRPC exporter on a current-thread runtime, then
/// every `EXPORT_TICK` (at once when a full batch waits) sends what is queued, at most
/// `MAX_BATCH` spans a call. Counts exported and failed spans. Polls rather than blocks
/// for the same reason as the access log's writer: a blocked receiver makes every
/// `try_send` a wake-up.
fn export_thread(
    rx: Receiver<SpanData>,
    endpoint: String,
    resource: Resource,
    metrics: Arc<Metrics>,
    ready: SyncSender<Result<(), String>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("a runtime for the exporter: {e}")));
            return;
        }
    };
    rt.block_on(async move {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build();
        let mut exporter = match exporter {
            Ok(e) => e,
            Err(e) => {
                let _ = ready.send(Err(e.to_string()));
                return;
            }
        };
        exporter.set_resource(&resource);
        let _ = ready.send(Ok(()));
        let mut warned = false;
        loop {
            let mut batch = Vec::new();
            let gone = loop {
                if batch.len() >= MAX_BATCH {
                    break false;
                }
                match rx.try_recv() {
                    Ok(s) => batch.push(s),
                    Err(TryRecvError::Empty) => break false,
                    Err(TryRecvError::Disconnected) => break true,
                }
            };
            let full = batch.len() >= MAX_BATCH;
            if !batch.is_empty() {
                let n = batch.len() as u64;
                match exporter.export(batch).await {
                    Ok(()) => {
                        metrics.trace_spans_exported.fetch_add(n, Relaxed);
                        warned = false;
                    }
                    Err(e) => {
                        metrics.trace_spans_failed.fetch_add(n, Relaxed);
                        if !std::mem::replace(&mut warned, true) {
                            tracing::warn!(error = %e, "exporting spans failed (the next failures are counted, not logged, until one succeeds)");
                        }
                    }
                }
            }
            if gone {
                let _ = exporter.shutdown();
                return;
            }
            if !full {
                tokio::time::sleep(EXPORT_TICK).await;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use opentelemetry::Value;

    use super::*;

    fn attr<'a>(s: &'a SpanData, key: &str) -> Option<&'a Value> {
        s.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| &kv.value)
    }

    fn downstream() -> Downstream<'static> {
        Downstream {
            peer: Some("10.0.0.2:40000".parse().unwrap()),
            client_ip: None,
            source: "shop/client",
            dst: "10.96.0.10:80".parse().unwrap(),
            service: "reviews",
            authority: Some("reviews"),
            skmsg: true,
        }
    }

    fn get(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get("/items?x=1");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn the_ratio_threshold_matches_trace_id_ratio_based() {
        let (all, _rx) = Tracer::for_tests(1.0);
        let (none, _rx2) = Tracer::for_tests(0.0);
        for id in [1u128, u128::MAX, 1 << 64, u64::MAX as u128] {
            assert!(all.ratio_sampled(id));
            assert!(!none.ratio_sampled(id));
        }
        let (half, _rx3) = Tracer::for_tests(0.5);
        // Decided by the low 64 bits, so every proxy agrees on a trace.
        assert!(half.ratio_sampled(0x10));
        assert!(!half.ratio_sampled(u64::MAX as u128));
        let n = (0..10_000)
            .filter(|_| half.ratio_sampled(nonzero_u128()))
            .count();
        assert!((4_500..5_500).contains(&n), "{n}");
    }

    #[test]
    fn an_incoming_decision_wins_over_the_ratio() {
        let tid = "4bf92f3577b34da6a3ce929d0e0e4736";
        let (never, _rx) = Tracer::for_tests(0.0);
        let tp = format!("00-{tid}-00f067aa0ba902b7-01");
        let span = never.request(&get(&[("traceparent", &tp)]), downstream());
        assert_eq!(format!("{:032x}", span.unwrap().trace_id()), tid);
        assert!(never.request(&get(&[]), downstream()).is_none());
        let (always, _rx) = Tracer::for_tests(1.0);
        let tp = format!("00-{tid}-00f067aa0ba902b7-00");
        assert!(always
            .request(&get(&[("traceparent", &tp)]), downstream())
            .is_none());
        assert!(always.request(&get(&[("b3", "0")]), downstream()).is_none());
        assert!(always.request(&get(&[]), downstream()).is_some());
    }

    #[test]
    fn a_request_with_a_retry_makes_one_server_span_and_two_client_spans() {
        let (t, rx) = Tracer::for_tests(0.0);
        let tid = "4bf92f3577b34da6a3ce929d0e0e4736";
        let req = get(&[("traceparent", &format!("00-{tid}-00f067aa0ba902b7-01"))]);
        let mut span = t.request(&req, downstream()).unwrap();
        let mut up = req.headers().clone();
        span.start_try(
            &mut up,
            None,
            "reviews",
            "10.0.0.3:8080".parse().unwrap(),
            false,
        );
        let first = up["traceparent"].to_str().unwrap().to_owned();
        span.try_result(Err("connect_failure"));
        let mut kept = HeaderMap::new();
        span.start_try(
            &mut up,
            Some(&mut kept),
            "reviews",
            "10.0.0.4:8080".parse().unwrap(),
            true,
        );
        let second = up["traceparent"].to_str().unwrap().to_owned();
        assert_eq!(kept["traceparent"], second);
        assert_ne!(first, second);
        span.try_result(Ok(200));
        span.finish(RequestEnd {
            status: 200,
            route: "default",
            cluster: "reviews",
            flags: Flags::default(),
            received: 0,
            sent: 12,
        });
        let spans: Vec<SpanData> = rx.try_iter().collect();
        assert_eq!(spans.len(), 3);
        let (try1, try2, server) = (&spans[0], &spans[1], &spans[2]);
        assert_eq!(server.span_kind, SpanKind::Server);
        assert_eq!(server.parent_span_id, SpanId::from(0x00f0_67aa_0ba9_02b7));
        assert!(server.parent_span_is_remote);
        assert_eq!(server.name, "GET reviews");
        for (t, tp) in [(try1, &first), (try2, &second)] {
            assert_eq!(t.span_kind, SpanKind::Client);
            assert_eq!(t.parent_span_id, server.span_context.span_id());
            assert_eq!(t.span_context.trace_id(), server.span_context.trace_id());
            assert_eq!(
                *tp,
                format!("00-{tid}-{}-01", t.span_context.span_id()),
                "the upstream sees the try as its parent"
            );
        }
        assert_eq!(
            attr(try1, "error.type"),
            Some(&Value::from("connect_failure"))
        );
        assert!(matches!(try1.status, Status::Error { .. }));
        assert_eq!(attr(try1, "http.request.resend_count"), None);
        assert_eq!(
            attr(try2, "http.request.resend_count"),
            Some(&Value::I64(1))
        );
        assert_eq!(attr(try2, "mesh.path_taken"), Some(&Value::from("tunnel")));
        assert_eq!(
            attr(try2, "http.response.status_code"),
            Some(&Value::I64(200))
        );
        assert_eq!(try2.status, Status::Unset);
        assert_eq!(
            attr(server, "http.response.status_code"),
            Some(&Value::I64(200))
        );
        assert_eq!(attr(server, "mesh.attempts"), Some(&Value::I64(2)));
        assert_eq!(
            attr(server, "http.response.body.size"),
            Some(&Value::I64(12))
        );
        assert_eq!(attr(server, "url.path"), Some(&Value::from("/items")));
        assert_eq!(
            attr(server, "mesh.path_taken"),
            Some(&Value::from("proxied+sk_msg"))
        );
        assert_eq!(attr(server, "client.port"), Some(&Value::I64(40000)));
    }

    #[test]
    fn a_local_reply_is_a_server_span_without_tries() {
        let (t, rx) = Tracer::for_tests(1.0);
        let span = t.request(&get(&[]), downstream()).unwrap();
        let mut flags = Flags::default();
        flags.insert(Flags::UH);
        span.finish(RequestEnd {
            status: 503,
            route: "",
            cluster: "reviews",
            flags,
            received: 0,
            sent: 19,
        });
        let spans: Vec<SpanData> = rx.try_iter().collect();
        assert_eq!(spans.len(), 1);
        let s = &spans[0];
        assert_eq!(s.parent_span_id, SpanId::INVALID);
        assert_eq!(attr(s, "mesh.response_flags"), Some(&Value::from("UH")));
        assert_eq!(attr(s, "mesh.attempts"), Some(&Value::I64(0)));
        assert!(matches!(&s.status, Status::Error { description } if description == "UH"));
    }

    #[test]
    fn a_connection_span_carries_bytes_and_the_path() {
        let (t, rx) = Tracer::for_tests(1.0);
        let mut e = Entry::new(crate::proxy::accesslog::Protocol::Tcp, PathTaken::Tunnel);
        e.source_address = Some(Addr::Sock("10.0.0.2:40000".parse().unwrap()));
        e.destination_address = Some("10.0.1.5:9000".parse().unwrap());
        e.upstream_host = e.destination_address;
        e.bytes_received = Some(12345);
        e.bytes_sent = Some(678);
        e.connection_termination_details = Some("x".repeat(1000));
        e.finish();
        t.connection(&e);
        let s = rx.try_recv().unwrap();
        assert_eq!(s.name, "tcp");
        assert_eq!(attr(&s, "mesh.path_taken"), Some(&Value::from("tunnel")));
        assert_eq!(attr(&s, "mesh.bytes_received"), Some(&Value::I64(12345)));
        assert_eq!(attr(&s, "mesh.bytes_sent"), Some(&Value::I64(678)));
        assert_eq!(attr(&s, "server.port"), Some(&Value::I64(9000)));
        assert!(
            matches!(&s.status, Status::Error { description } if description.len() == MAX_ATTR_LEN)
        );
        // Unsampled: nothing.
        let (never, rx) = Tracer::for_tests(0.0);
        never.connection(&e);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let metrics = Arc::new(Metrics::default());
        let (t, rx) = Tracer::channel(2, 1.0, metrics.clone());
        let e = Entry::new(crate::proxy::accesslog::Protocol::Tcp, PathTaken::Proxied);
        for _ in 0..5 {
            t.connection(&e);
        }
        assert_eq!(metrics.trace_spans_dropped.load(Relaxed), 3);
        assert_eq!(rx.try_iter().count(), 2);
        drop(rx);
        t.connection(&e);
        assert_eq!(metrics.trace_spans_dropped.load(Relaxed), 4);
    }

    fn inbound() -> InboundDownstream<'static> {
        InboundDownstream {
            source_ip: "10.0.0.2".parse().unwrap(),
            source_principal: Some("spiffe://cluster.local/ns/shop/sa/web"),
            source_workload: Some("shop/client-a"),
            destination: "backend/server-b",
            dst: "10.0.1.2:8081".parse().unwrap(),
            tunnel: true,
        }
    }

    #[test]
    fn the_destination_continues_b3_in_kind_and_parents_the_application() {
        let (t, rx) = Tracer::for_tests(0.0);
        let mut req = get(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-sampled", "1"),
        ]);
        let span = t.inbound_request(&mut req, inbound()).unwrap();
        let h = req.headers();
        let sid = format!("{:016x}", span.span_id());
        assert_eq!(h["x-b3-traceid"], "a3ce929d0e0e4736", "64-bit stays 64-bit");
        assert_eq!(h["x-b3-spanid"], sid.as_str());
        assert_eq!(h["x-b3-parentspanid"], "00f067aa0ba902b7");
        assert!(h["traceparent"].to_str().unwrap().contains(&sid));
        span.finish(RequestEnd {
            status: 200,
            route: "",
            cluster: "unknown",
            flags: Flags::default(),
            received: 0,
            sent: 2,
        });
        let s = rx.try_recv().unwrap();
        assert_eq!(s.parent_span_id, SpanId::from(0x00f0_67aa_0ba9_02b7));
        assert_eq!(s.span_kind, SpanKind::Server);
        assert_eq!(attr(&s, "mesh.reporter"), Some(&Value::from("destination")));
        assert_eq!(
            attr(&s, "mesh.path_taken"),
            Some(&Value::from("inbound+tunnel"))
        );
        assert_eq!(attr(&s, "mesh.attempts"), None);
        // No context and a ratio of 0: nothing recorded, headers as they came.
        let mut quiet = get(&[("x-b3-spanid", "zz")]);
        assert!(t.inbound_request(&mut quiet, inbound()).is_none());
        assert!(quiet.headers().get("traceparent").is_none());
        // A root (ratio 1) with an unreadable B3 header: no B3 parent is made up.
        let (all, _rx) = Tracer::for_tests(1.0);
        let mut root = get(&[("b3", "not-a-context")]);
        let span = all.inbound_request(&mut root, inbound()).unwrap();
        let b3 = root.headers()["b3"].to_str().unwrap().to_owned();
        assert_eq!(
            b3,
            format!("{:032x}-{:016x}-1", span.trace_id(), span.span_id())
        );
        assert!(root.headers().get("x-b3-parentspanid").is_none());
    }

    #[test]
    fn endpoints_are_checked() {
        assert!(check_endpoint("http://127.0.0.1:4317").is_ok());
        assert!(check_endpoint("http://collector.observability:4317").is_ok());
        for bad in ["", "127.0.0.1:4317", "https://c:4317", "ftp://c", "http://"] {
            assert!(check_endpoint(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_resource_names_the_service_and_the_node() {
        let r = resource("node-7");
        let get = |k: &str| r.get(&opentelemetry::Key::from(k.to_owned()));
        assert_eq!(get("k8s.node.name"), Some(Value::from("node-7")));
        assert_eq!(get("service.instance.id"), Some(Value::from("node-7")));
        assert!(get("service.name").is_some());
        assert!(get("telemetry.sdk.name").is_some());
    }

    #[test]
    fn long_texts_are_cut_at_a_character_boundary() {
        let s = "é".repeat(MAX_ATTR_LEN);
        let b = bounded(&s);
        assert!(b.len() <= MAX_ATTR_LEN && s.starts_with(&b));
    }
}
