//! What the destination node reports for the connections and requests it terminates:
//! Istio's `reporter="destination"` series (`metrics::istio`) and spans (`proxy::trace`).
//!
//! Three inbound paths report here: HBONE streams relayed into a pod
//! (`proxy::hbone::server`, judged by `proxy::secure::TunnelHandler`), plain-text
//! connections TC steered to a pod and delivered (`proxy::inbound::Deliver`), and the
//! requests the destination terminates where an L7 AuthorizationPolicy applies
//! (`proxy::secure::http`).
//!
//! Who the source is, as the destination knows it: over HBONE, the principal of the
//! peer's verified certificate; its workload (and namespace) when the source address is
//! one the destination believes (`Forwarded: for=` naming a workload of that identity,
//! `authz::tunnel_source`), else only the namespace the SPIFFE ID names. Plain text
//! proves nothing: the source is `unknown` (a plain-text address is not an identity).
//!
//! Cost: a TCP connection resolves its label set once (one handle, bumped at its close);
//! an HTTP connection resolves its source once and caches its request handles
//! (`istio::HttpConn`), so a request builds no label string.

use std::{
    borrow::Cow,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use http::Request;

use crate::{
    identity::SpiffeId,
    metrics::{
        istio::{self, HttpConn, IstioLabels, Peer, Resolve, TcpSeries},
        Metrics,
    },
    proxy::{
        accesslog::{Addr, Entry, Flags, PathTaken, Protocol, Verdict},
        config::workloads::{WorkloadIndex, WorkloadInfo},
        trace::{InboundDownstream, RequestEnd, RequestSpan, Tracer},
    },
};

/// The source of an inbound connection: `identity` is the peer's verified identity (None:
/// plain text, an unknown source), `src_ip` the source address the destination believes
/// (the source pod's when `Forwarded: for=` was believed, else the sending node's).
pub fn source_peer(workloads: &WorkloadIndex, identity: Option<&SpiffeId>, src_ip: IpAddr) -> Peer {
    let Some(id) = identity else {
        return Peer::default();
    };
    let mut p = Peer::from_identity(id);
    // The workload at the address, only if it is the identity the peer proved: the
    // sending node's own address, or a claim not believed, names no workload.
    if let Some(w) = workloads.by_ip(src_ip).filter(|w| w.identity == *id) {
        p.workload = w.name.clone();
        p.namespace = w.namespace.clone();
        w.label_peer(&mut p);
    }
    p
}

/// The destination pod as the mesh's workloads describe it.
pub fn destination_peer(w: &WorkloadInfo) -> Peer {
    let mut p = Peer {
        workload: w.name.clone(),
        namespace: w.namespace.clone(),
        principal: w.identity.to_string(),
        ..Peer::default()
    };
    w.label_peer(&mut p);
    p
}

/// `namespace/name` of a peer whose workload is known.
fn qualified(p: &Peer) -> Option<String> {
    (p.workload != istio::UNKNOWN).then(|| format!("{}/{}", p.namespace, p.workload))
}

/// Envoy's flags as Istio's `response_flags` label (`-` for none).
pub fn flags_label(f: Flags) -> Cow<'static, str> {
    if f.is_empty() {
        return Cow::Borrowed("-");
    }
    // Rare (a refused or failed connection or request): Envoy's comma-separated codes.
    serde_json::to_value(f)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .map_or(Cow::Borrowed("-"), Cow::Owned)
}

/// One inbound TCP connection the destination reports: counted opened when made, closed
/// when dropped; bytes and the span at `finish`.
pub struct InboundConn {
    series: Arc<TcpSeries>,
    /// The span's record (tracing on): what the access log would say of the connection.
    span: Option<(Tracer, Box<Entry>)>,
}

/// How an inbound TCP connection ended, for `InboundConn::finish`.
#[derive(Debug, Clone, Default)]
pub struct ConnEnd {
    /// Bytes from the source (request direction) and to it.
    pub received: u64,
    pub sent: u64,
    /// Why it ended other than cleanly (a reset, the failure to reach the pod).
    pub error: Option<String>,
}

impl InboundConn {
    /// Counts a connection opened from `source` to `destination` with Envoy's `flags`
    /// (`RBAC` denied, `UF` the pod did not answer); `mtls`: it arrived through HBONE.
    /// `entry` is the span's record, asked for only when `tracer` is set and the span
    /// would be sampled.
    pub fn open(
        metrics: &Metrics,
        tracer: Option<&Tracer>,
        source: &Peer,
        destination: &Peer,
        mtls: bool,
        flags: Flags,
        entry: impl FnOnce() -> Entry,
    ) -> InboundConn {
        let labels = IstioLabels::new(istio::DESTINATION, source, destination, None, "tcp", mtls)
            .with_flags(&flags_label(flags));
        let series = metrics.l7.istio.tcp(labels);
        series.opened.inc();
        let span = tracer.map(|t| {
            let mut e = entry();
            e.response_flags = flags;
            if e.source_principal.is_none() && source.principal != istio::UNKNOWN {
                e.source_principal = Some(source.principal.clone());
            }
            if e.source_workload.is_none() {
                e.source_workload = qualified(source);
            }
            if e.destination_workload.is_none() {
                e.destination_workload = qualified(destination);
            }
            if e.destination_principal.is_none() && destination.principal != istio::UNKNOWN {
                e.destination_principal = Some(destination.principal.clone());
            }
            (t.clone(), Box::new(e))
        });
        InboundConn { series, span }
    }

    /// The connection ended: its bytes are counted and its span sent (the connection is
    /// counted closed as `self` drops).
    pub fn finish(mut self, end: ConnEnd) {
        self.series.received.inc_by(end.received);
        self.series.sent.inc_by(end.sent);
        if let Some((tracer, mut e)) = self.span.take() {
            e.bytes_received = Some(end.received);
            e.bytes_sent = Some(end.sent);
            if end.error.is_some() {
                e.connection_termination_details = end.error;
            }
            e.finish();
            tracer.destination_connection(&e);
        }
    }
}

impl Drop for InboundConn {
    fn drop(&mut self) {
        self.series.closed.inc();
    }
}

impl std::fmt::Debug for InboundConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundConn").finish_non_exhaustive()
    }
}

/// An HBONE stream judged at the destination (`proxy::secure::TunnelHandler`), before it
/// is refused or relayed: who its source is, the pod it is for.
pub struct TunnelReport<'a> {
    metrics: &'a Metrics,
    tracer: Option<&'a Tracer>,
    source: Peer,
    destination: Peer,
    src_ip: IpAddr,
    authority: SocketAddr,
}

impl<'a> TunnelReport<'a> {
    /// `src_ip`: the source address the destination believes (`authz::tunnel_source`).
    pub fn new(
        metrics: &'a Metrics,
        tracer: Option<&'a Tracer>,
        workloads: &WorkloadIndex,
        peer_identity: &SpiffeId,
        src_ip: IpAddr,
        dst: &WorkloadInfo,
        authority: SocketAddr,
    ) -> TunnelReport<'a> {
        TunnelReport {
            metrics,
            tracer,
            source: source_peer(workloads, Some(peer_identity), src_ip),
            destination: destination_peer(dst),
            src_ip,
            authority,
        }
    }

    fn entry(&self, allowed: Option<bool>, policy: Option<&str>) -> Entry {
        let mut e = Entry::new(Protocol::Tcp, PathTaken::InboundTunnel);
        e.source_address = Some(Addr::Ip(self.src_ip));
        e.destination_address = Some(self.authority);
        e.upstream_host = Some(self.authority);
        e.policy_verdict = allowed.map(|a| if a { Verdict::Allow } else { Verdict::Deny });
        e.policy_name = policy.map(str::to_owned);
        e
    }

    /// The stream was refused (`RBAC`: by policy; `UF`: the pod did not answer): counted
    /// opened and closed, with its span.
    pub fn refused(self, flags: Flags, policy: Option<&str>, why: String) {
        let denied = flags.contains(Flags::RBAC);
        InboundConn::open(
            self.metrics,
            self.tracer,
            &self.source,
            &self.destination,
            true,
            flags,
            || self.entry(denied.then_some(false), policy),
        )
        .finish(ConnEnd {
            error: Some(why),
            ..ConnEnd::default()
        });
    }

    /// The stream is relayed into the pod: counted opened now; `finish` it when the
    /// relay ends.
    pub fn relayed(self, policy: Option<&str>) -> InboundConn {
        InboundConn::open(
            self.metrics,
            self.tracer,
            &self.source,
            &self.destination,
            true,
            Flags::default(),
            || self.entry(Some(true), policy),
        )
    }
}

/// One inbound HTTP connection whose requests the destination terminates: its source
/// resolved once, its request handles cached.
pub struct HttpReport {
    conn: HttpConn,
    tracer: Option<Tracer>,
    mtls: bool,
    source_ip: IpAddr,
    source_principal: Option<String>,
    source_workload: Option<String>,
    /// `namespace/name` of the pod (for spans).
    destination: String,
    dst: SocketAddr,
}

impl HttpReport {
    /// `source` as `source_peer` resolves it, `destination` the pod's workload (None: not
    /// in the configuration), `resolve` the pod's workload at a request's end (it may have
    /// changed); `mtls`: the connection arrived through HBONE.
    #[expect(clippy::too_many_arguments, reason = "one connection's whole context")]
    pub fn new(
        metrics: &Metrics,
        tracer: Option<Tracer>,
        source: Peer,
        source_ip: IpAddr,
        destination: Option<&WorkloadInfo>,
        dst: SocketAddr,
        resolve: Resolve,
        mtls: bool,
    ) -> HttpReport {
        let source_principal =
            (source.principal != istio::UNKNOWN).then(|| source.principal.clone());
        let source_workload = qualified(&source);
        HttpReport {
            conn: HttpConn::new(
                metrics.l7.istio.clone(),
                istio::DESTINATION,
                source,
                resolve,
            ),
            tracer,
            mtls,
            source_ip,
            source_principal,
            source_workload,
            destination: destination.map_or_else(
                || istio::UNKNOWN.to_owned(),
                |w| format!("{}/{}", w.namespace, w.name),
            ),
            dst,
        }
    }

    /// The report of a connection `proxy::secure::http` terminates, its source and the
    /// pod resolved in the configuration in force.
    pub fn of(t: &crate::proxy::secure::http::Terminate) -> HttpReport {
        let mesh = (t.mesh)();
        let source = source_peer(&mesh.workloads, t.src_identity.as_ref(), t.src_ip);
        let pod = t.dst.ip();
        let now = t.mesh.clone();
        let resolve: Resolve = Arc::new(move |ep: SocketAddr| {
            now()
                .workloads
                .by_ip(ep.ip())
                .map(|w| destination_peer(w))
                .unwrap_or_default()
        });
        HttpReport::new(
            &t.metrics,
            t.tracer.clone(),
            source,
            t.src_ip,
            mesh.workloads.by_ip(pod).map(|w| &**w),
            t.dst,
            resolve,
            t.src_identity.is_some(),
        )
    }

    /// A request arrived: its clock starts, and its span if the trace is sampled (the
    /// request's propagation headers then name that span as the parent).
    pub fn request<B: http_body::Body>(&self, req: &mut Request<B>) -> RequestReport {
        let grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let span = self.tracer.as_ref().and_then(|t| {
            t.inbound_request(
                req,
                InboundDownstream {
                    source_ip: self.source_ip,
                    source_principal: self.source_principal.as_deref(),
                    source_workload: self.source_workload.as_deref(),
                    destination: &self.destination,
                    dst: self.dst,
                    tunnel: self.mtls,
                },
            )
        });
        RequestReport {
            start: Instant::now(),
            grpc,
            request_bytes: req.body().size_hint().exact().unwrap_or(0),
            span,
        }
    }
}

impl std::fmt::Debug for HttpReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpReport")
            .field("destination", &self.destination)
            .finish_non_exhaustive()
    }
}

/// One request on its way; `finish` counts it and ends its span.
pub struct RequestReport {
    start: Instant,
    grpc: bool,
    /// The request body's length as its head declares it (`content-length`; 0 when it
    /// streams without one).
    request_bytes: u64,
    span: Option<RequestSpan>,
}

impl RequestReport {
    /// The request ended (its response's last byte went out, the destination answered
    /// itself, or the client went away): `e` says how it was judged and forwarded,
    /// `code` the status sent (0: none), `sent` the response body's bytes.
    pub fn finish(mut self, report: &HttpReport, e: &Entry, code: u16, sent: u64) {
        let flags = flags_label(e.response_flags);
        report.conn.record(
            Some(report.dst),
            istio::UNKNOWN,
            self.grpc,
            report.mtls,
            code,
            &flags,
            self.start.elapsed(),
            self.request_bytes,
            sent,
        );
        if let Some(mut span) = self.span.take() {
            if let Some(p) = &e.destination_principal {
                span.set_attribute("mesh.destination.principal", p);
            }
            if let Some(p) = &e.policy_name {
                span.set_attribute("mesh.policy", p);
            }
            span.finish(RequestEnd {
                status: code,
                route: "",
                cluster: istio::UNKNOWN,
                flags: e.response_flags,
                received: self.request_bytes,
                sent,
            });
        }
    }
}

/// A response body that tells `count` the size of each data frame as it goes out, and
/// keeps the inner body's size hint and end (so its framing, `content-length` or not, is
/// what it would be without the count; `map_frame` loses the hint and turns a sized body
/// into a chunked one).
pub struct Counted<B, C> {
    inner: B,
    count: C,
}

impl<B, C> Counted<B, C> {
    pub fn new(inner: B, count: C) -> Self {
        Counted { inner, count }
    }
}

impl<B, C> http_body::Body for Counted<B, C>
where
    B: http_body::Body + Unpin,
    C: FnMut(usize) + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                (self.count)(bytes::Buf::remaining(d));
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, ns: &str, sa: &str, ip: &str) -> Arc<WorkloadInfo> {
        Arc::new(WorkloadInfo {
            uid: format!("Kubernetes//Pod/{ns}/{name}"),
            name: name.into(),
            namespace: ns.into(),
            ips: vec![ip.parse().unwrap()],
            identity: format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
                .parse()
                .unwrap(),
            node: "n0".into(),
            hbone: true,
            authorization_policies: vec![],
            peer_authentications: vec![],
            telemetry: Default::default(),
        })
    }

    #[test]
    fn the_source_is_the_workload_only_where_its_address_is_believed() {
        let client = workload("client-a", "shop", "web", "10.0.0.2");
        let ix = WorkloadIndex::new([&client]);
        let web = client.identity.clone();
        // The believed source pod's address: its workload.
        let p = source_peer(&ix, Some(&web), "10.0.0.2".parse().unwrap());
        assert_eq!(
            (p.workload.as_str(), p.namespace.as_str()),
            ("client-a", "shop")
        );
        assert_eq!(p.principal, "spiffe://cluster.local/ns/shop/sa/web");
        // The sending node's address: the identity's namespace, no workload.
        let p = source_peer(&ix, Some(&web), "192.168.0.1".parse().unwrap());
        assert_eq!(
            (p.workload.as_str(), p.namespace.as_str()),
            ("unknown", "shop")
        );
        // An address whose workload has another identity is not the source's.
        let other: SpiffeId = "spiffe://cluster.local/ns/data/sa/batch".parse().unwrap();
        let p = source_peer(&ix, Some(&other), "10.0.0.2".parse().unwrap());
        assert_eq!(
            (p.workload.as_str(), p.namespace.as_str()),
            ("unknown", "data")
        );
        // Plain text: nothing is known.
        assert_eq!(
            source_peer(&ix, None, "10.0.0.2".parse().unwrap()),
            Peer::default()
        );
    }

    fn text(m: &Metrics) -> String {
        let mut s = String::new();
        m.l7.istio.encode(&mut s);
        s
    }

    #[test]
    fn a_connection_counts_opened_bytes_and_closed_and_sends_its_span() {
        let m = Metrics::default();
        let (tracer, rx) = Tracer::for_tests(1.0);
        let client = workload("client-a", "shop", "web", "10.0.0.2");
        let server = workload("server-b", "backend", "echo", "10.0.1.2");
        let src = destination_peer(&client);
        let dst = destination_peer(&server);
        let c = InboundConn::open(
            &m,
            Some(&tracer),
            &src,
            &dst,
            true,
            Flags::default(),
            || Entry::new(Protocol::Tcp, PathTaken::InboundTunnel),
        );
        let t = text(&m);
        assert!(t.contains("istio_tcp_connections_opened_total{reporter=\"destination\",source_workload=\"client-a\",source_workload_namespace=\"shop\",source_principal=\"spiffe://cluster.local/ns/shop/sa/web\""), "{t}");
        assert!(
            t.contains("connection_security_policy=\"mutual_tls\"} 1"),
            "{t}"
        );
        // The first sample of `name` under the destination reporter.
        let value = |t: &str, name: &str| -> u64 {
            let prefix = format!("{name}{{reporter=\"destination\"");
            t.lines()
                .find(|l| l.starts_with(&prefix))
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
                .unwrap_or_else(|| panic!("no {name}: {t}"))
        };
        assert_eq!(value(&t, "istio_tcp_connections_closed_total"), 0);
        c.finish(ConnEnd {
            received: 100,
            sent: 7,
            error: None,
        });
        let t = text(&m);
        assert_eq!(value(&t, "istio_tcp_connections_closed_total"), 1);
        assert_eq!(value(&t, "istio_tcp_received_bytes_total"), 100);
        assert_eq!(value(&t, "istio_tcp_sent_bytes_total"), 7);
        let s = rx.try_recv().unwrap();
        let attr = |k: &str| {
            s.attributes
                .iter()
                .find(|kv| kv.key.as_str() == k)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(attr("mesh.path_taken").as_deref(), Some("inbound+tunnel"));
        assert_eq!(attr("mesh.reporter").as_deref(), Some("destination"));
        assert_eq!(attr("mesh.bytes_received").as_deref(), Some("100"));
        assert_eq!(
            attr("mesh.source.principal").as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/web")
        );
        assert_eq!(
            attr("mesh.destination.workload").as_deref(),
            Some("backend/server-b")
        );
        // A plain-text connection the pod did not answer: `none`, `UF`.
        InboundConn::open(
            &m,
            None,
            &Peer::default(),
            &dst,
            false,
            Flags::UF,
            || unreachable!(),
        )
        .finish(ConnEnd::default());
        let t = text(&m);
        assert!(
            t.contains("response_flags=\"UF\",connection_security_policy=\"none\"} 1"),
            "{t}"
        );
    }

    #[test]
    fn requests_count_under_the_destination_reporter_with_their_span_parented() {
        let m = Metrics::default();
        let (tracer, rx) = Tracer::for_tests(0.0);
        let client = workload("client-a", "shop", "web", "10.0.0.2");
        let server = workload("server-b", "backend", "echo", "10.0.1.2");
        let dst: SocketAddr = "10.0.1.2:8080".parse().unwrap();
        let resolved = destination_peer(&server);
        let r = HttpReport::new(
            &m,
            Some(tracer),
            destination_peer(&client),
            "10.0.0.2".parse().unwrap(),
            Some(&server),
            dst,
            Arc::new(move |_| resolved.clone()),
            true,
        );
        let tid = "4bf92f3577b34da6a3ce929d0e0e4736";
        let mut req = Request::get("/items")
            .header("traceparent", format!("00-{tid}-00f067aa0ba902b7-01"))
            .header("content-length", "5")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"hello",
            )))
            .unwrap();
        let rr = r.request(&mut req);
        let tp = req.headers()["traceparent"].to_str().unwrap().to_owned();
        let mut e = Entry::new(Protocol::Http11, PathTaken::InboundTunnel);
        e.destination_principal = Some("spiffe://cluster.local/ns/backend/sa/echo".into());
        rr.finish(&r, &e, 200, 12);
        // Unsampled (a caller's decision): counted, no span, headers untouched.
        let mut quiet = Request::get("/q")
            .header("traceparent", format!("00-{tid}-00f067aa0ba902b7-00"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let rr = r.request(&mut quiet);
        assert_eq!(
            quiet.headers()["traceparent"],
            format!("00-{tid}-00f067aa0ba902b7-00").as_str()
        );
        let mut denied = e.clone();
        denied.flag(Flags::RBAC);
        rr.finish(&r, &denied, 403, 19);
        let t = text(&m);
        assert!(
            t.contains(
                "istio_requests_total{reporter=\"destination\",source_workload=\"client-a\""
            ),
            "{t}"
        );
        assert!(t.contains("response_flags=\"-\",connection_security_policy=\"mutual_tls\",response_code=\"200\"} 1"), "{t}");
        assert!(t.contains("response_flags=\"RBAC\",connection_security_policy=\"mutual_tls\",response_code=\"403\"} 1"), "{t}");
        assert!(
            t.contains("istio_request_bytes_sum{reporter=\"destination\""),
            "{t}"
        );
        let spans: Vec<_> = rx.try_iter().collect();
        assert_eq!(spans.len(), 1);
        let s = &spans[0];
        assert_eq!(format!("{:032x}", s.span_context.trace_id()), tid);
        assert_eq!(
            s.parent_span_id,
            opentelemetry::trace::SpanId::from(0x00f0_67aa_0ba9_02b7)
        );
        assert_eq!(s.name, "GET backend/server-b");
        // The application sees this span as its parent.
        assert_eq!(tp, format!("00-{tid}-{}-01", s.span_context.span_id()));
        assert!(!s
            .attributes
            .iter()
            .any(|kv| kv.key.as_str() == "mesh.attempts"));
    }

    #[tokio::test]
    async fn a_counted_body_keeps_its_length_and_counts_its_bytes() {
        use http_body::Body as _;
        use http_body_util::BodyExt;
        let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = n.clone();
        let body = Counted::new(
            http_body_util::Full::new(bytes::Bytes::from_static(b"RBAC: access denied")),
            move |k| {
                seen.fetch_add(k, std::sync::atomic::Ordering::Relaxed);
            },
        );
        assert_eq!(body.size_hint().exact(), Some(19));
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"RBAC: access denied");
        assert_eq!(n.load(std::sync::atomic::Ordering::Relaxed), 19);
    }
}
