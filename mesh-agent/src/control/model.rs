//! The control plane's model of services: what it translates to xDS. Sources produce it
//! (the standalone file's `services:` section is written in it; the Kubernetes source
//! builds it from Services, EndpointSlices and routes), and of workloads' identities and
//! the security policies that apply to them (`security`).

pub mod security;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde::{Deserialize, Serialize};

/// A workload as the control plane sees it: what service selectors match, and the address
/// its endpoints then have. Node-local details (network namespace, capture mode) belong to
/// the datapath, not here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address on a dual-stack node; the proxy then knows it by either.
    pub ip6: Option<Ipv6Addr>,
    pub labels: BTreeMap<String, String>,
    /// Its identity is `spiffe://<trust domain>/ns/<namespace>/sa/<service_account>`.
    pub service_account: String,
    /// The node it runs on (empty: unknown).
    pub node: String,
    /// In the mesh (captured, reachable over HBONE at its own address, port 15008), not
    /// merely known.
    pub hbone: bool,
    /// Istio's `app` of its telemetry (`app.kubernetes.io/name`, else `app`; at most
    /// `MAX_LABEL_VALUE` bytes); empty: not said.
    pub app: String,
    /// Istio's `version` (`app.kubernetes.io/version`, else `version`); empty: not said.
    pub version: String,
    /// Its namespace asks for access logs (`mesh-agent.io/access-log: "true"`).
    pub access_log: bool,
}

/// The longest label value Kubernetes accepts (bytes), and so the longest `app` and
/// `version` the control plane passes on.
pub const MAX_LABEL_VALUE: usize = 63;

/// The service account of a workload that names none.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// A service: the addresses clients dial (`vip`, and `vip6` when it is dual-stack), its
/// ports, its endpoints (workloads selected by label, and/or explicit addresses), its
/// traffic policy and HTTP routes.
///
/// `vip` stays required: an IPv6-only service is not served (a pod without IPv4 is not a
/// workload either, and listeners, inspection and the Kubernetes source name a service by
/// its IPv4 address).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    pub vip: Ipv4Addr,
    /// The service's IPv6 cluster IP: `[vip6]:port` routes as `vip:port` does (same
    /// cluster, routes and protocol handling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip6: Option<Ipv6Addr>,
    pub ports: Vec<ServicePort>,
    /// Workloads of the service's namespace whose labels include all of these.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
    #[serde(default)]
    pub lb: LbSpec,
    #[serde(default)]
    pub connect_timeout_ms: Option<u64>,
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierSpec>,
    /// A token bucket for every request to this service (per node proxy).
    #[serde(default)]
    pub rate_limit: Option<RateLimitSpec>,
    /// Largest request header block accepted, in KiB (Envoy's default 60); larger: 431.
    #[serde(default)]
    pub max_request_headers_kb: Option<u32>,
    /// HTTP routes, first match wins; none: every request goes to this service.
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    /// The endpoints' port (default: `port`).
    #[serde(default)]
    pub target_port: Option<u16>,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Sniffed per connection: HTTP/1.x, the HTTP/2 preface, else opaque TCP.
    #[default]
    Auto,
    Http,
    Http2,
    Grpc,
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// IPv4 or IPv6: the proxy dials either.
    pub ip: IpAddr,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub weight: Option<u32>,
    /// healthy (default), unhealthy, degraded, draining
    #[serde(default)]
    pub health: Option<String>,
    /// Only this service port is served by the endpoint (a multi-port service whose ports
    /// map to different endpoint ports, as EndpointSlices say); absent: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_port: Option<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct LbSpec {
    #[serde(default)]
    pub policy: LbPolicySpec,
    /// ring_hash: the request header hashed.
    #[serde(default)]
    pub hash_header: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicySpec {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
    RingHash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerSpec {
    #[serde(default)]
    pub max_connections: Option<u32>,
    #[serde(default)]
    pub max_pending_requests: Option<u32>,
    #[serde(default)]
    pub max_requests: Option<u32>,
    #[serde(default)]
    pub max_retries: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierSpec {
    #[serde(default)]
    pub consecutive_5xx: Option<u32>,
    #[serde(default)]
    pub base_ejection_ms: Option<u64>,
    #[serde(default)]
    pub max_ejection_percent: Option<u32>,
    #[serde(default)]
    pub interval_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    pub max_tokens: u32,
    #[serde(default)]
    pub tokens_per_fill: Option<u32>,
    pub fill_interval_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matcher: MatchSpec,
    /// Where matching requests go: services of the same namespace (`name`) or another
    /// (`name.namespace`), by weight. None: this service.
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub retries: Option<RetrySpec>,
    #[serde(default)]
    pub fault: Option<FaultSpec>,
    #[serde(default)]
    pub rate_limit: Option<RateLimitSpec>,
    #[serde(default)]
    pub request_headers: Option<HeadersSpec>,
    #[serde(default)]
    pub response_headers: Option<HeadersSpec>,
    #[serde(default)]
    pub direct_response: Option<DirectResponseSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
    #[serde(default)]
    pub headers: Vec<KvMatchSpec>,
    #[serde(default)]
    pub query: Vec<KvMatchSpec>,
}

/// One of `exact`, `prefix`, `regex`, `present` (default: present).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KvMatchSpec {
    pub name: String,
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
    #[serde(default)]
    pub present: Option<bool>,
    #[serde(default)]
    pub invert: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    pub service: String,
    #[serde(default)]
    pub weight: Option<u32>,
    /// The backend service's port; default: the port of the same number, else its first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    pub attempts: u32,
    /// Envoy `retry_on` conditions, e.g. `5xx,reset,connect-failure`.
    #[serde(default)]
    pub on: Option<String>,
    #[serde(default)]
    pub per_try_timeout_ms: Option<u64>,
    #[serde(default)]
    pub statuses: Vec<u32>,
    #[serde(default)]
    pub backoff_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    #[serde(default)]
    pub delay_ms: Option<u64>,
    #[serde(default)]
    pub delay_percent: Option<f64>,
    #[serde(default)]
    pub abort_status: Option<u32>,
    #[serde(default)]
    pub abort_grpc_status: Option<u32>,
    #[serde(default)]
    pub abort_percent: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeadersSpec {
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DirectResponseSpec {
    pub status: u32,
    #[serde(default)]
    pub body: String,
}

/// Why `ip` cannot be a service's or an endpoint's IPv6 address, if it cannot: the scopes
/// the datapath never captures (`::`, `::1`, link-local, multicast) and v4-mapped forms
/// (an IPv4 address belongs in `vip` / is written as IPv4).
pub fn not_a_service_ip6(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if first & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if ip.to_ipv4_mapped().is_some() {
        Some("an IPv4-mapped address: write it as IPv4")
    } else {
        None
    }
}

/// Header rewrites the proxy can carry out (the xDS conversion refuses the others, which
/// would leave the whole route configuration out): names are HTTP tokens, values valid
/// header values, and neither pseudo-headers nor `host` are touched.
pub(crate) fn check_headers(field: &str, h: &HeadersSpec, bad: &mut dyn FnMut(String)) {
    let protected = |n: &str| n.starts_with(':') || n.eq_ignore_ascii_case("host");
    for (name, value) in &h.add {
        if protected(name) {
            bad(format!(
                "{field}.add: {name:?}: ':'-prefixed or host headers may not be modified"
            ));
        } else if http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).is_err() {
            bad(format!("{field}.add: {name:?} is not a valid header name"));
        }
        if http::HeaderValue::from_str(value).is_err() {
            bad(format!(
                "{field}.add: the value of {name:?} is not a valid header value"
            ));
        }
    }
    for name in &h.remove {
        if protected(name) {
            bad(format!(
                "{field}.remove: {name:?}: ':'-prefixed or host headers may not be removed"
            ));
        }
    }
}
