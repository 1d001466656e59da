//! The node proxy's configuration in force: what the accepted xDS resources mean, checked
//! and resolved once when they are accepted (regexes compiled, weights summed, references
//! between resources followed) so the request path only reads it.
//!
//! Built by `xds::convert` from Envoy v3 resources; immutable once built. A new version
//! replaces the whole `ProxyConfig` (an `Arc` swap); runtime state that must outlive a
//! config change (token buckets, load-balancer cursors, outlier counters, connection
//! pools) lives in the proxy, keyed by the names below.
//!
//! Workloads (`workloads`: identity, node, HBONE) and authorization and peer
//! authentication policies (`policy`) are a second value, `policy::MeshConfig`, published
//! next to `ProxyConfig` (`XdsClient::mesh`): they change on their own schedule, and the
//! L4 path reads them without the listeners.

pub mod policy;
pub mod workloads;

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use regex_lite::Regex;

/// Everything the proxy needs, keyed the way the request path looks it up.
#[derive(Debug, Default)]
pub struct ProxyConfig {
    /// Active listeners by the address clients dial (a service VIP and port, or a pod
    /// address and port): the original destination of a captured connection. Warming
    /// listeners (a route configuration they name has not arrived) are not here.
    pub listeners: HashMap<SocketAddr, Arc<Listener>>,
    /// Clusters by name, with their endpoints (empty until the endpoints arrive).
    pub clusters: HashMap<String, Arc<Cluster>>,
    /// Which configuration this is: 1, 2, 3... in the order the xDS client published them
    /// (it publishes one per accepted response that changed something); 0 until the
    /// first. Per agent process, not the control plane's `version_info`.
    pub version: u64,
}

impl ProxyConfig {
    pub fn listener(&self, dst: SocketAddr) -> Option<&Arc<Listener>> {
        self.listeners.get(&dst)
    }
    pub fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.get(name)
    }
}

#[derive(Debug)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    pub kind: ListenerKind,
    /// Protocol sniffing (`http_inspector` with an HTTP chain and a TCP chain): a
    /// connection that does not start like HTTP/1.x or h2c goes to this cluster as TCP.
    pub tcp_fallback: Option<String>,
}

#[derive(Debug)]
pub enum ListenerKind {
    /// `envoy.filters.network.tcp_proxy`: bytes to one cluster.
    Tcp { cluster: String },
    /// `envoy.filters.network.http_connection_manager`.
    Http(HttpListener),
}

/// Downstream HTTP codec (`HttpConnectionManager.codec_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Sniff: the HTTP/2 connection preface means h2 (prior knowledge), else HTTP/1.x
    /// (which may upgrade to h2c).
    Auto,
    Http1,
    Http2,
}

#[derive(Debug)]
pub struct HttpListener {
    pub stat_prefix: String,
    pub codec: Codec,
    pub route_config: Arc<RouteConfig>,
    /// `max_request_headers_kb` (Envoy's default 60 KiB): larger request headers get 431.
    pub max_request_headers_bytes: usize,
    /// `stream_idle_timeout` / `request_timeout` of the connection manager, if set.
    pub request_timeout: Option<Duration>,
    /// Connection-manager level filters (`http_filters`), applied before the route's
    /// own overrides (`typed_per_filter_config`).
    pub rate_limit: Option<Arc<RateLimit>>,
    pub fault: Option<Arc<Fault>>,
}

#[derive(Debug)]
pub struct RouteConfig {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
    pub request_headers: HeaderMutation,
    pub response_headers: HeaderMutation,
}

#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    /// Envoy domain rules: exact, `*.suffix`, `prefix*`, or `*`. Ports in the authority
    /// are matched as written, then without the port.
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
    pub request_headers: HeaderMutation,
    pub response_headers: HeaderMutation,
    pub retry_policy: Option<Arc<RetryPolicy>>,
    pub rate_limit: Option<Arc<RateLimit>>,
}

#[derive(Debug)]
pub struct Route {
    /// The route's `name`, or `<virtual host>/<index>`; a metrics label.
    pub name: String,
    pub matcher: RouteMatch,
    pub action: RouteAction,
    pub request_headers: HeaderMutation,
    pub response_headers: HeaderMutation,
    /// Per-route filter overrides (`typed_per_filter_config`).
    pub rate_limit: Option<Arc<RateLimit>>,
    pub fault: Option<Arc<Fault>>,
}

#[derive(Debug)]
pub struct RouteMatch {
    pub path: PathMatch,
    /// `case_sensitive` (default true) for exact and prefix paths.
    pub case_sensitive: bool,
    pub headers: Vec<HeaderMatch>,
    pub query: Vec<QueryMatch>,
    /// `grpc: {}`: only requests with `content-type: application/grpc*`.
    pub grpc: bool,
}

#[derive(Debug)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
    /// Whole-path match (Envoy's `safe_regex` matches the full path, without the query).
    Regex(Regex),
    /// `path_separated_prefix`: the prefix followed by `/`, `?` or the end.
    SeparatedPrefix(String),
}

#[derive(Debug)]
pub struct HeaderMatch {
    /// Lower-case header name (`:authority`, `:method`, `:path` are pseudo-headers).
    pub name: String,
    pub matcher: StringMatch,
    pub invert: bool,
}

#[derive(Debug)]
pub struct QueryMatch {
    pub name: String,
    pub matcher: StringMatch,
}

#[derive(Debug)]
pub enum StringMatch {
    Exact {
        value: String,
        ignore_case: bool,
    },
    Prefix {
        value: String,
        ignore_case: bool,
    },
    Suffix {
        value: String,
        ignore_case: bool,
    },
    Contains {
        value: String,
        ignore_case: bool,
    },
    Regex(Regex),
    /// `present_match`: true means the header/parameter must be present, false absent.
    Present(bool),
}

#[derive(Debug)]
pub enum RouteAction {
    Forward(Forward),
    /// `direct_response`.
    Respond {
        status: u16,
        body: String,
    },
    /// `redirect` (host and/or path, with a 3xx code).
    Redirect {
        status: u16,
        host: Option<String>,
        path: Option<String>,
    },
}

#[derive(Debug)]
pub struct Forward {
    /// `cluster` (one entry, weight 1) or `weighted_clusters`.
    pub clusters: Vec<WeightedCluster>,
    /// Sum of the weights (> 0).
    pub total_weight: u32,
    /// `timeout` (Envoy's default 15 s; `None` when set to 0 = disabled).
    pub timeout: Option<Duration>,
    pub retry_policy: Option<Arc<RetryPolicy>>,
    /// `hash_policy`: request headers whose values feed ring-hash load balancing, in order.
    pub hash_headers: Vec<String>,
    pub prefix_rewrite: Option<String>,
    pub host_rewrite: Option<String>,
}

#[derive(Debug)]
pub struct WeightedCluster {
    pub name: String,
    pub weight: u32,
    pub request_headers: HeaderMutation,
    pub response_headers: HeaderMutation,
}

/// Envoy's `retry_on` conditions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// `5xx`: any 5xx response, a reset, a connect failure.
    pub server_error: bool,
    /// `gateway-error`: 502, 503, 504.
    pub gateway_error: bool,
    /// `reset`: the upstream reset or closed before a response.
    pub reset: bool,
    /// `connect-failure`.
    pub connect_failure: bool,
    /// `retriable-status-codes` (with `retriable_status_codes`).
    pub retriable_status_codes: bool,
    /// gRPC status in trailers/headers: `cancelled`, `deadline-exceeded`,
    /// `resource-exhausted`, `unavailable`.
    pub grpc_cancelled: bool,
    pub grpc_deadline_exceeded: bool,
    pub grpc_resource_exhausted: bool,
    pub grpc_unavailable: bool,
}

#[derive(Debug)]
pub struct RetryPolicy {
    pub retry_on: RetryOn,
    /// `num_retries` (default 1).
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub retriable_status_codes: Vec<u16>,
    /// `retry_back_off` (Envoy's defaults: 25 ms base, 10x base max), jittered.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderMutation {
    /// (name lower-case, value, append: false replaces an existing value).
    pub add: Vec<(String, String, bool)>,
    pub remove: Vec<String>,
}

/// `envoy.extensions.filters.http.fault.v3.HTTPFault`.
#[derive(Debug)]
pub struct Fault {
    /// Fixed delay, for this fraction of requests (parts per million).
    pub delay: Option<(Duration, u32)>,
    /// Abort with this HTTP status (or gRPC status when set), for this fraction (ppm).
    pub abort: Option<(FaultAbort, u32)>,
}

#[derive(Debug, Clone, Copy)]
pub enum FaultAbort {
    Http(u16),
    Grpc(u32),
}

/// `envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit`: a token bucket.
/// The bucket's state lives in the proxy, keyed by `key` (stat prefix and where the
/// filter is configured), so it survives config pushes that do not change it.
#[derive(Debug)]
pub struct RateLimit {
    pub key: String,
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval: Duration,
    /// Response headers `x-ratelimit-*` (`enable_x_ratelimit_headers: DRAFT_VERSION_03`).
    pub x_ratelimit_headers: bool,
    /// Status of a limited request (`status`, default 429).
    pub status: u16,
}

#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub lb: LbPolicy,
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
    pub circuit_breaker: CircuitBreaker,
    pub outlier: Option<OutlierDetection>,
    /// Endpoints from EDS (or inline `load_assignment`). Unhealthy endpoints are kept
    /// (and skipped), so config dumps show them.
    pub endpoints: Vec<Endpoint>,
    /// Whether the endpoints have arrived yet (EDS clusters warm until they do).
    pub endpoints_known: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LbPolicy {
    RoundRobin,
    /// Power of `choice_count` (default 2) choices.
    LeastRequest {
        choice_count: u32,
    },
    Random,
    RingHash {
        minimum_ring_size: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    /// `http2_protocol_options` (or the typed `HttpProtocolOptions`): h2c to the upstream.
    Http2,
}

/// `circuit_breakers.thresholds[DEFAULT]` (Envoy's defaults: 1024 each, retries 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitBreaker {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
        }
    }
}

/// `outlier_detection`: consecutive 5xx ejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierDetection {
    /// `consecutive_5xx` (default 5).
    pub consecutive_5xx: u32,
    /// `base_ejection_time` (default 30 s), multiplied by the times ejected.
    pub base_ejection_time: Duration,
    /// `max_ejection_percent` (default 10).
    pub max_ejection_percent: u32,
    /// `interval` (default 10 s): how often ejections are re-evaluated.
    pub interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: SocketAddr,
    /// `load_balancing_weight` (default 1).
    pub weight: u32,
    pub health: Health,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// HEALTHY or UNKNOWN: receives traffic.
    Healthy,
    /// UNHEALTHY, DRAINING, TIMEOUT: skipped.
    Unhealthy,
    /// DEGRADED: used only when no healthy endpoint is left.
    Degraded,
}
