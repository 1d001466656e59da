//! Envoy v3 resources -> the proxy's own model (`proxy::config`), with validation.
//!
//! Each resource is checked on its own when it arrives, so a NACK names the resource and
//! the field at fault and the other resources of the same response can still be judged.
//! Fields this proxy does not implement are refused when they would change behaviour
//! (an unknown filter, a cluster specifier plugin); purely informational ones are ignored.
//! `docs/xds.md` lists both. Workloads and policies (`wire::istio`) are converted at the
//! end of the file.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3 as ec, core::v3 as core, endpoint::v3 as ee, listener::v3 as el,
            route::v3 as er,
        },
        extensions::filters::{
            common::fault::v3 as common_fault,
            http::{fault::v3 as hfault, local_ratelimit::v3 as hrl},
            listener::http_inspector::v3::HttpInspector,
            network::{http_connection_manager::v3 as hcm, tcp_proxy::v3 as tcp},
        },
        r#type::{matcher::v3 as matcher, v3 as etype},
    },
    google::protobuf::{Any, Duration as PbDuration},
};
use prost::{Message, Name};
use regex_lite::Regex;

use crate::proxy::config::{
    self as model, Cluster, Codec, Endpoint, Fault, FaultAbort, Forward, HeaderMatch,
    HeaderMutation, Health, HttpListener, LbPolicy, Listener, ListenerKind, OutlierDetection,
    PathMatch, ProxyConfig, QueryMatch, RateLimit, RetryOn, RetryPolicy, Route, RouteAction,
    RouteConfig, RouteMatch, StringMatch, UpstreamProtocol, VirtualHost, WeightedCluster,
};
use crate::proxy::config::{
    policy::{
        Action as PolicyAction, Cidr, Clause as PolicyClause, HeaderCond, Match as PolicyMatch,
        MeshConfig, MtlsMode, PeerAuthn, Policies, Policy, Rule as PolicyRule, Scope, StrMatch,
    },
    workloads::{Telemetry, WorkloadIndex, WorkloadInfo, MAX_TELEMETRY_VALUE},
};

use crate::wire::istio;
pub use crate::wire::{
    FAULT_FILTER, HCM_FILTER, RATE_LIMIT_FILTER, ROUTER_FILTER, TCP_PROXY_FILTER,
};

/// Envoy's default route timeout.
const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest inline direct-response body (Envoy's default `max_direct_response_body_size_bytes`).
const MAX_DIRECT_RESPONSE_BODY: usize = 4096;
/// Shortest token-bucket fill interval (Envoy's local rate limit refuses shorter ones).
const MIN_FILL_INTERVAL: Duration = Duration::from_millis(50);
/// Largest protobuf Duration (10,000 years), as Envoy checks.
const MAX_PB_DURATION_SECS: i64 = 315_576_000_000;
/// RE2's limit on counted repetition (`x{n}`), which Envoy enforces.
const MAX_REGEX_REPEAT: u32 = 1000;

/// Envoy's default `max_request_headers_kb`.
const DEFAULT_MAX_HEADERS_KB: u32 = 60;

/// Why a resource was rejected: which resource, which field, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name:?}: {field}: {reason}")]
pub struct Invalid {
    pub kind: &'static str,
    pub name: String,
    pub field: String,
    pub reason: String,
}

struct Ctx<'a> {
    kind: &'static str,
    name: &'a str,
}

impl Ctx<'_> {
    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> Invalid {
        Invalid {
            kind: self.kind,
            name: self.name.to_owned(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Decodes an `Any` of the expected type.
pub fn unpack<T: Message + Name + Default>(any: &Any) -> Result<T, String> {
    if any.type_url != T::type_url() {
        return Err(format!(
            "type {:?}, expected {:?}",
            any.type_url,
            T::type_url()
        ));
    }
    T::decode(any.value.as_slice()).map_err(|e| format!("undecodable {}: {e}", T::NAME))
}

/// A valid, non-negative protobuf Duration (at most 10,000 years, nanos below 1e9).
fn duration(d: &PbDuration) -> Option<Duration> {
    ((0..=MAX_PB_DURATION_SECS).contains(&d.seconds) && (0..1_000_000_000).contains(&d.nanos))
        .then(|| Duration::new(d.seconds as u64, d.nanos as u32))
}

fn opt_duration(
    cx: &Ctx<'_>,
    field: &str,
    d: Option<&PbDuration>,
) -> Result<Option<Duration>, Invalid> {
    d.map(|d| duration(d).ok_or_else(|| cx.err(field, "negative or out-of-range duration")))
        .transpose()
}

/// Parts per million of a `FractionalPercent`.
fn ppm(p: Option<&etype::FractionalPercent>) -> u32 {
    let Some(p) = p else { return 0 };
    let per = match p.denominator {
        0 => 100u64,
        1 => 10_000,
        _ => 1_000_000,
    };
    ((p.numerator as u64 * 1_000_000 / per).min(1_000_000)) as u32
}

fn compile(cx: &Ctx<'_>, field: &str, re: &str) -> Result<Regex, Invalid> {
    if let Some(n) = counted_repeats(re).find(|n| *n > MAX_REGEX_REPEAT) {
        return Err(cx.err(
            field,
            format!("invalid regex {re:?}: invalid repetition size {{{n}}} (at most {MAX_REGEX_REPEAT}, as in RE2)"),
        ));
    }
    // Envoy's safe_regex matches the whole value: anchor it.
    Regex::new(&format!("^(?:{re})$"))
        .map_err(|e| cx.err(field, format!("invalid regex {re:?}: {e}")))
}

/// The numbers in `{n}`, `{n,}` and `{n,m}` of a regex (escaped braces skipped).
fn counted_repeats(re: &str) -> impl Iterator<Item = u32> + '_ {
    let b = re.as_bytes();
    (0..b.len())
        .filter(move |&i| b[i] == b'{' && (i == 0 || b[i - 1] != b'\\'))
        .flat_map(move |i| {
            let body = &re[i + 1..];
            let end = body.find('}').unwrap_or(0);
            body[..end]
                .split(',')
                .filter_map(|n| n.trim().parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
}

fn socket_address(
    cx: &Ctx<'_>,
    field: &str,
    a: Option<&core::Address>,
) -> Result<SocketAddr, Invalid> {
    use core::{address::Address as A, socket_address::PortSpecifier};
    let Some(A::SocketAddress(sa)) = a.and_then(|a| a.address.as_ref()) else {
        return Err(cx.err(field, "a socket_address is required"));
    };
    let ip: IpAddr = sa.address.parse().map_err(|_| {
        cx.err(
            format!("{field}.address"),
            format!("{:?} is not an IP address", sa.address),
        )
    })?;
    let port = match sa.port_specifier {
        Some(PortSpecifier::PortValue(p)) if (1..=65535).contains(&p) => p as u16,
        _ => {
            return Err(cx.err(
                format!("{field}.port_value"),
                "a port in 1..65535 is required",
            ))
        }
    };
    Ok(SocketAddr::new(ip, port))
}

// ---------------------------------------------------------------------------------------
// Listeners

/// A checked listener, with its route configuration still a reference when it comes by RDS.
#[derive(Debug, Clone)]
pub struct ListenerSpec {
    pub address: SocketAddr,
    /// `additional_addresses` (istiod's dual-stack listeners): the listener serves
    /// connections to these as to `address`.
    pub additional: Vec<SocketAddr>,
    pub kind: ListenerSpecKind,
    pub tcp_fallback: Option<String>,
}

#[derive(Debug, Clone)]
pub enum ListenerSpecKind {
    /// An API listener (proxyless gRPC): accepted, not served by this proxy.
    Api,
    Tcp {
        cluster: String,
    },
    Http {
        stat_prefix: String,
        codec: Codec,
        routes: RouteSource,
        max_request_headers_bytes: usize,
        request_timeout: Option<Duration>,
        rate_limit: Option<Arc<RateLimit>>,
        fault: Option<Arc<Fault>>,
    },
}

#[derive(Debug, Clone)]
pub enum RouteSource {
    Rds(String),
    Inline(Arc<RouteConfig>),
}

impl ListenerSpec {
    /// The RDS name this listener waits for, if any.
    pub fn rds_name(&self) -> Option<&str> {
        match &self.kind {
            ListenerSpecKind::Http {
                routes: RouteSource::Rds(n),
                ..
            } => Some(n),
            _ => None,
        }
    }
}

pub fn listener(l: &el::Listener) -> Result<ListenerSpec, Invalid> {
    let cx = Ctx {
        kind: "listener",
        name: &l.name,
    };
    if l.name.is_empty() {
        return Err(cx.err("name", "is empty"));
    }
    if l.api_listener.is_some() {
        // For proxyless gRPC clients; nothing for this proxy to listen for.
        return Ok(ListenerSpec {
            address: SocketAddr::from(([0, 0, 0, 0], 0)),
            additional: Vec::new(),
            kind: ListenerSpecKind::Api,
            tcp_fallback: None,
        });
    }
    let address = socket_address(&cx, "address", l.address.as_ref())?;
    let mut additional = Vec::with_capacity(l.additional_addresses.len());
    for (i, a) in l.additional_addresses.iter().enumerate() {
        let field = format!("additional_addresses[{i}].address");
        let at = socket_address(&cx, &field, a.address.as_ref())?;
        if at == address || additional.contains(&at) {
            return Err(cx.err(field, format!("{at} is already an address of the listener")));
        }
        additional.push(at);
    }
    let mut sniff = false;
    for (i, f) in l.listener_filters.iter().enumerate() {
        let ok = matches!(&f.config_type,
            Some(el::listener_filter::ConfigType::TypedConfig(a)) if a.type_url == HttpInspector::type_url());
        if !ok {
            return Err(cx.err(
                format!("listener_filters[{i}]"),
                "only envoy.filters.listener.http_inspector is supported",
            ));
        }
        sniff = true;
    }
    let (kind, tcp_fallback) = match (l.filter_chains.as_slice(), sniff) {
        ([chain], _) => (filter_chain(&cx, 0, chain)?, None),
        ([http, tcp], true) => {
            let protos = http
                .filter_chain_match
                .as_ref()
                .map(|m| m.application_protocols.clone())
                .unwrap_or_default();
            if !protos.iter().any(|p| p.starts_with("http/1") || p == "h2c") {
                return Err(cx.err(
                    "filter_chains[0].filter_chain_match.application_protocols",
                    "with http_inspector, the first chain must match http/1.1 or h2c",
                ));
            }
            if tcp.filter_chain_match.is_some() {
                return Err(cx.err("filter_chains[1].filter_chain_match", "the fallback chain must match everything"));
            }
            let http = filter_chain(&cx, 0, http)?;
            let ListenerSpecKind::Tcp { cluster } = filter_chain(&cx, 1, tcp)? else {
                return Err(cx.err("filter_chains[1]", "the fallback chain must be a tcp_proxy"));
            };
            if matches!(http, ListenerSpecKind::Tcp { .. }) {
                return Err(cx.err("filter_chains[0]", "the matched chain must be an HTTP connection manager"));
            }
            (http, Some(cluster))
        }
        (chains, _) => {
            return Err(cx.err(
                "filter_chains",
                format!(
                    "one filter chain, or an HTTP and a TCP chain behind http_inspector, is supported; got {}",
                    chains.len()
                ),
            ))
        }
    };
    Ok(ListenerSpec {
        address,
        additional,
        kind,
        tcp_fallback,
    })
}

fn filter_chain(
    cx: &Ctx<'_>,
    i: usize,
    chain: &el::FilterChain,
) -> Result<ListenerSpecKind, Invalid> {
    if chain.transport_socket.is_some() {
        return Err(cx.err(
            format!("filter_chains[{i}].transport_socket"),
            "TLS termination is not supported yet",
        ));
    }
    let [filter] = chain.filters.as_slice() else {
        return Err(cx.err(
            format!("filter_chains[{i}].filters"),
            format!(
                "exactly one network filter is supported, got {}",
                chain.filters.len()
            ),
        ));
    };
    let field = format!("filter_chains[{i}].filters[0].typed_config");
    let field = field.as_str();
    let Some(el::filter::ConfigType::TypedConfig(any)) = &filter.config_type else {
        return Err(cx.err(field, "typed_config is required"));
    };
    if any.type_url == tcp::TcpProxy::type_url() {
        let t: tcp::TcpProxy = unpack(any).map_err(|e| cx.err(field, e))?;
        match t.cluster_specifier {
            Some(tcp::tcp_proxy::ClusterSpecifier::Cluster(c)) if !c.is_empty() => {
                Ok(ListenerSpecKind::Tcp { cluster: c })
            }
            _ => Err(cx.err(format!("{field}.cluster"), "one cluster name is required")),
        }
    } else if any.type_url == hcm::HttpConnectionManager::type_url() {
        let h: hcm::HttpConnectionManager = unpack(any).map_err(|e| cx.err(field, e))?;
        http_connection_manager(cx, field, h)
    } else {
        Err(cx.err(
            field,
            format!(
                "unsupported network filter {:?} (supported: {HCM_FILTER}, {TCP_PROXY_FILTER})",
                any.type_url
            ),
        ))
    }
}

fn http_connection_manager(
    cx: &Ctx<'_>,
    field: &str,
    h: hcm::HttpConnectionManager,
) -> Result<ListenerSpecKind, Invalid> {
    use hcm::http_connection_manager::{CodecType, RouteSpecifier};
    let codec = match CodecType::try_from(h.codec_type) {
        Ok(CodecType::Auto) => Codec::Auto,
        Ok(CodecType::Http1) => Codec::Http1,
        Ok(CodecType::Http2) => Codec::Http2,
        _ => {
            return Err(cx.err(
                format!("{field}.codec_type"),
                "only AUTO, HTTP1 and HTTP2 are supported",
            ))
        }
    };
    let routes = match h.route_specifier {
        Some(RouteSpecifier::Rds(rds)) => {
            if rds.route_config_name.is_empty() {
                return Err(cx.err(format!("{field}.rds.route_config_name"), "is empty"));
            }
            RouteSource::Rds(rds.route_config_name)
        }
        Some(RouteSpecifier::RouteConfig(rc)) => RouteSource::Inline(Arc::new(route_config(&rc)?)),
        _ => {
            return Err(cx.err(
                format!("{field}.route_specifier"),
                "rds or route_config is required",
            ))
        }
    };
    let mut rate_limit = None;
    let mut fault = None;
    let mut router = false;
    for (i, f) in h.http_filters.iter().enumerate() {
        let ffield = format!("{field}.http_filters[{i}]");
        if router {
            return Err(cx.err(ffield, "the router must be the last HTTP filter"));
        }
        let any = match &f.config_type {
            Some(hcm::http_filter::ConfigType::TypedConfig(a)) => a,
            _ => {
                return Err(cx.err(
                    ffield,
                    format!("filter {:?}: typed_config is required", f.name),
                ))
            }
        };
        let tf = format!("{ffield}.typed_config");
        if any.type_url
            == envoy_types::pb::envoy::extensions::filters::http::router::v3::Router::type_url()
        {
            router = true;
        } else if any.type_url == hrl::LocalRateLimit::type_url() {
            let c: hrl::LocalRateLimit = unpack(any).map_err(|e| cx.err(&tf, e))?;
            rate_limit = local_rate_limit(cx, &tf, &c, &format!("{}/{}", cx.name, h.stat_prefix))?;
        } else if any.type_url == hfault::HttpFault::type_url() {
            let c: hfault::HttpFault = unpack(any).map_err(|e| cx.err(&tf, e))?;
            fault = Some(Arc::new(http_fault(cx, &tf, &c)?));
        } else if f.is_optional {
            continue;
        } else {
            return Err(cx.err(
                tf,
                format!(
                    "unsupported HTTP filter {:?} (supported: {FAULT_FILTER}, {RATE_LIMIT_FILTER}, {ROUTER_FILTER}; mark it is_optional to skip it)",
                    any.type_url
                ),
            ));
        }
    }
    if !router {
        return Err(cx.err(
            format!("{field}.http_filters"),
            format!("the last HTTP filter must be {ROUTER_FILTER}"),
        ));
    }
    let kb = h
        .max_request_headers_kb
        .as_ref()
        .map_or(DEFAULT_MAX_HEADERS_KB, |v| v.value);
    if kb == 0 || kb > 8192 {
        return Err(cx.err(
            format!("{field}.max_request_headers_kb"),
            "must be in 1..8192",
        ));
    }
    let request_timeout = opt_duration(
        cx,
        &format!("{field}.request_timeout"),
        h.request_timeout.as_ref(),
    )?
    .filter(|d| !d.is_zero());
    Ok(ListenerSpecKind::Http {
        stat_prefix: h.stat_prefix,
        codec,
        routes,
        max_request_headers_bytes: kb as usize * 1024,
        request_timeout,
        rate_limit,
        fault,
    })
}

fn local_rate_limit(
    cx: &Ctx<'_>,
    field: &str,
    c: &hrl::LocalRateLimit,
    key: &str,
) -> Result<Option<Arc<RateLimit>>, Invalid> {
    // Without a token bucket (or with filter_enabled at 0%) the filter only passes through.
    let Some(tb) = &c.token_bucket else {
        return Ok(None);
    };
    let enabled = c
        .filter_enabled
        .as_ref()
        .map(|r| ppm(r.default_value.as_ref()))
        .unwrap_or(0);
    if enabled == 0 {
        return Ok(None);
    }
    if tb.max_tokens == 0 {
        return Err(cx.err(format!("{field}.token_bucket.max_tokens"), "must be > 0"));
    }
    let fill_interval = opt_duration(
        cx,
        &format!("{field}.token_bucket.fill_interval"),
        tb.fill_interval.as_ref(),
    )?
    .filter(|d| *d >= MIN_FILL_INTERVAL)
    .ok_or_else(|| {
        cx.err(
            format!("{field}.token_bucket.fill_interval"),
            "must be >= 50ms",
        )
    })?;
    let status = c
        .status
        .as_ref()
        .map(|s| s.code as u16)
        .filter(|s| *s >= 400)
        .unwrap_or(429);
    Ok(Some(Arc::new(RateLimit {
        key: key.to_owned(),
        max_tokens: tb.max_tokens,
        tokens_per_fill: tb.tokens_per_fill.as_ref().map_or(1, |v| v.value),
        fill_interval,
        x_ratelimit_headers: c.enable_x_ratelimit_headers != 0,
        status,
    })))
}

fn http_fault(cx: &Ctx<'_>, field: &str, c: &hfault::HttpFault) -> Result<Fault, Invalid> {
    let delay = match &c.delay {
        None => None,
        Some(d) => match &d.fault_delay_secifier {
            Some(common_fault::fault_delay::FaultDelaySecifier::FixedDelay(fd)) => {
                let dur = duration(fd).ok_or_else(|| {
                    cx.err(
                        format!("{field}.delay.fixed_delay"),
                        "negative or out-of-range duration",
                    )
                })?;
                Some((dur, ppm(d.percentage.as_ref())))
            }
            _ => return Err(cx.err(format!("{field}.delay"), "only fixed_delay is supported")),
        },
    };
    let abort = match &c.abort {
        None => None,
        Some(a) => {
            use hfault::fault_abort::ErrorType;
            let kind = match &a.error_type {
                Some(ErrorType::HttpStatus(s)) if (200..600).contains(s) => {
                    FaultAbort::Http(*s as u16)
                }
                Some(ErrorType::GrpcStatus(s)) => FaultAbort::Grpc(*s),
                _ => {
                    return Err(cx.err(
                        format!("{field}.abort"),
                        "http_status in 200..599 or grpc_status is required",
                    ))
                }
            };
            Some((kind, ppm(a.percentage.as_ref())))
        }
    };
    Ok(Fault { delay, abort })
}

// ---------------------------------------------------------------------------------------
// Routes

pub fn route_config(rc: &er::RouteConfiguration) -> Result<RouteConfig, Invalid> {
    let cx = Ctx {
        kind: "route_configuration",
        name: &rc.name,
    };
    if rc.name.is_empty() {
        return Err(cx.err("name", "is empty"));
    }
    let mut virtual_hosts = Vec::with_capacity(rc.virtual_hosts.len());
    let mut seen = BTreeMap::new();
    for (i, vh) in rc.virtual_hosts.iter().enumerate() {
        let field = format!("virtual_hosts[{i}]");
        for d in &vh.domains {
            if let Some(j) = seen.insert(d.to_ascii_lowercase(), i) {
                return Err(cx.err(
                    format!("{field}.domains"),
                    format!("domain {d:?} is also in virtual_hosts[{j}]"),
                ));
            }
        }
        virtual_hosts.push(virtual_host(&cx, &field, vh)?);
    }
    Ok(RouteConfig {
        name: rc.name.clone(),
        virtual_hosts,
        request_headers: headers(
            &cx,
            "request_headers_to_add",
            &rc.request_headers_to_add,
            &rc.request_headers_to_remove,
        )?,
        response_headers: headers(
            &cx,
            "response_headers_to_add",
            &rc.response_headers_to_add,
            &rc.response_headers_to_remove,
        )?,
    })
}

#[expect(
    deprecated,
    reason = "deprecated Envoy fields are still accepted by Envoy and by us"
)]
fn headers(
    cx: &Ctx<'_>,
    field: &str,
    add: &[core::HeaderValueOption],
    remove: &[String],
) -> Result<HeaderMutation, Invalid> {
    let mut m = HeaderMutation::default();
    for (i, h) in add.iter().enumerate() {
        let Some(hv) = &h.header else {
            return Err(cx.err(format!("{field}[{i}].header"), "is required"));
        };
        let name = hv.key.to_ascii_lowercase();
        if protected_header(&name) {
            return Err(cx.err(
                format!("{field}[{i}].header.key"),
                format!(
                    "{:?}: ':'-prefixed or host headers may not be modified",
                    hv.key
                ),
            ));
        }
        // Stricter than Envoy (which takes any name without NUL, CR, LF): a name that is
        // not an HTTP token could not be sent, so it is refused rather than dropped.
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(cx.err(
                format!("{field}[{i}].header.key"),
                format!("{:?} is not a valid header name", hv.key),
            ));
        }
        let value = if hv.raw_value.is_empty() {
            hv.value.clone()
        } else {
            String::from_utf8(hv.raw_value.clone())
                .map_err(|_| cx.err(format!("{field}[{i}].header.raw_value"), "not UTF-8"))?
        };
        if http::HeaderValue::from_str(&value).is_err() {
            return Err(cx.err(
                format!("{field}[{i}].header.value"),
                "not a valid header value",
            ));
        }
        // Deprecated `append` wins when set; else append_action (0 = append, else replace
        // or add-if-absent, which both keep one value).
        let append = match &h.append {
            Some(b) => b.value,
            None => h.append_action == 0,
        };
        m.add.push((name, value, append));
    }
    for (i, r) in remove.iter().enumerate() {
        let name = r.to_ascii_lowercase();
        if protected_header(&name) {
            let rfield = field.replace("_to_add", "_to_remove");
            return Err(cx.err(
                format!("{rfield}[{i}]"),
                format!("{r:?}: ':'-prefixed or host headers may not be removed"),
            ));
        }
        m.remove.push(name);
    }
    Ok(m)
}

/// Pseudo-headers and `host` are the routing key, not something a route rewrites this
/// way (Envoy refuses them too; `host_rewrite_literal` exists for the authority).
fn protected_header(name: &str) -> bool {
    name.starts_with(':') || name == "host"
}

/// Per-route (or virtual host) overrides of the rate limit and fault filters.
type FilterOverrides = (Option<Arc<RateLimit>>, Option<Arc<Fault>>);

fn per_filter(
    cx: &Ctx<'_>,
    field: &str,
    cfg: &HashMap<String, Any>,
    key: &str,
) -> Result<FilterOverrides, Invalid> {
    let mut rl = None;
    let mut fault = None;
    for (name, any) in cfg {
        let f = format!("{field}[{name:?}]");
        if any.type_url == hrl::LocalRateLimit::type_url() {
            let c: hrl::LocalRateLimit = unpack(any).map_err(|e| cx.err(&f, e))?;
            rl = local_rate_limit(cx, &f, &c, key)?;
        } else if any.type_url == hfault::HttpFault::type_url() {
            let c: hfault::HttpFault = unpack(any).map_err(|e| cx.err(&f, e))?;
            fault = Some(Arc::new(http_fault(cx, &f, &c)?));
        } else {
            return Err(cx.err(
                f,
                format!("unsupported per-filter config {:?}", any.type_url),
            ));
        }
    }
    Ok((rl, fault))
}

fn virtual_host(cx: &Ctx<'_>, field: &str, vh: &er::VirtualHost) -> Result<VirtualHost, Invalid> {
    if vh.domains.is_empty() {
        return Err(cx.err(
            format!("{field}.domains"),
            "at least one domain is required",
        ));
    }
    for (i, d) in vh.domains.iter().enumerate() {
        if d.is_empty() || (d.len() > 1 && d[1..d.len() - 1].contains('*')) {
            return Err(cx.err(
                format!("{field}.domains[{i}]"),
                format!("{d:?}: a wildcard may only lead or trail"),
            ));
        }
    }
    let key = format!("{}/{}", cx.name, vh.name);
    let (rate_limit, _) = per_filter(
        cx,
        &format!("{field}.typed_per_filter_config"),
        &vh.typed_per_filter_config,
        &key,
    )?;
    let retry_policy = vh
        .retry_policy
        .as_ref()
        .map(|r| retry_policy(cx, &format!("{field}.retry_policy"), r).map(Arc::new))
        .transpose()?;
    let mut routes = Vec::with_capacity(vh.routes.len());
    for (i, r) in vh.routes.iter().enumerate() {
        routes.push(route(
            cx,
            &format!("{field}.routes[{i}]"),
            &vh.name,
            i,
            r,
            retry_policy.as_ref(),
        )?);
    }
    Ok(VirtualHost {
        name: vh.name.clone(),
        domains: vh.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
        routes,
        request_headers: headers(
            cx,
            &format!("{field}.request_headers_to_add"),
            &vh.request_headers_to_add,
            &vh.request_headers_to_remove,
        )?,
        response_headers: headers(
            cx,
            &format!("{field}.response_headers_to_add"),
            &vh.response_headers_to_add,
            &vh.response_headers_to_remove,
        )?,
        retry_policy,
        rate_limit,
    })
}

fn route(
    cx: &Ctx<'_>,
    field: &str,
    vh_name: &str,
    index: usize,
    r: &er::Route,
    vh_retry: Option<&Arc<RetryPolicy>>,
) -> Result<Route, Invalid> {
    let name = if r.name.is_empty() {
        format!("{vh_name}/{index}")
    } else {
        r.name.clone()
    };
    let Some(m) = &r.r#match else {
        return Err(cx.err(format!("{field}.match"), "is required"));
    };
    let matcher = route_match(cx, &format!("{field}.match"), m)?;
    let action = match &r.action {
        Some(er::route::Action::Route(a)) => {
            RouteAction::Forward(route_action(cx, &format!("{field}.route"), a, vh_retry)?)
        }
        Some(er::route::Action::DirectResponse(d)) => {
            if !(200..600).contains(&d.status) {
                return Err(cx.err(
                    format!("{field}.direct_response.status"),
                    "must be in 200..599",
                ));
            }
            let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                None => String::new(),
                Some(core::data_source::Specifier::InlineString(s)) => s.clone(),
                Some(core::data_source::Specifier::InlineBytes(b)) => {
                    String::from_utf8_lossy(b).into_owned()
                }
                Some(_) => {
                    return Err(cx.err(
                        format!("{field}.direct_response.body"),
                        "only inline bodies are supported",
                    ))
                }
            };
            if body.len() > MAX_DIRECT_RESPONSE_BODY {
                return Err(cx.err(
                    format!("{field}.direct_response.body"),
                    format!(
                        "response body size is {} bytes; maximum is {MAX_DIRECT_RESPONSE_BODY}",
                        body.len()
                    ),
                ));
            }
            RouteAction::Respond {
                status: d.status as u16,
                body,
            }
        }
        Some(er::route::Action::Redirect(rd)) => {
            use er::redirect_action::{PathRewriteSpecifier, RedirectResponseCode};
            let status = match RedirectResponseCode::try_from(rd.response_code) {
                Ok(RedirectResponseCode::MovedPermanently) => 301,
                Ok(RedirectResponseCode::Found) => 302,
                Ok(RedirectResponseCode::SeeOther) => 303,
                Ok(RedirectResponseCode::TemporaryRedirect) => 307,
                Ok(RedirectResponseCode::PermanentRedirect) => 308,
                Err(_) => {
                    return Err(cx.err(format!("{field}.redirect.response_code"), "unknown code"))
                }
            };
            let path = match &rd.path_rewrite_specifier {
                None => None,
                Some(PathRewriteSpecifier::PathRedirect(p)) => Some(p.clone()),
                Some(_) => {
                    return Err(cx.err(
                        format!("{field}.redirect"),
                        "only path_redirect is supported",
                    ))
                }
            };
            RouteAction::Redirect {
                status,
                host: (!rd.host_redirect.is_empty()).then(|| rd.host_redirect.clone()),
                path,
            }
        }
        _ => {
            return Err(cx.err(
                field,
                "a route, direct_response or redirect action is required",
            ))
        }
    };
    let key = format!("{}/{}", cx.name, name);
    let (rate_limit, fault) = per_filter(
        cx,
        &format!("{field}.typed_per_filter_config"),
        &r.typed_per_filter_config,
        &key,
    )?;
    Ok(Route {
        name,
        matcher,
        action,
        request_headers: headers(
            cx,
            &format!("{field}.request_headers_to_add"),
            &r.request_headers_to_add,
            &r.request_headers_to_remove,
        )?,
        response_headers: headers(
            cx,
            &format!("{field}.response_headers_to_add"),
            &r.response_headers_to_add,
            &r.response_headers_to_remove,
        )?,
        rate_limit,
        fault,
    })
}

fn route_match(cx: &Ctx<'_>, field: &str, m: &er::RouteMatch) -> Result<RouteMatch, Invalid> {
    use er::route_match::PathSpecifier as P;
    let path = match &m.path_specifier {
        Some(P::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(P::Path(p)) => PathMatch::Exact(p.clone()),
        Some(P::SafeRegex(r)) => {
            PathMatch::Regex(compile(cx, &format!("{field}.safe_regex.regex"), &r.regex)?)
        }
        Some(P::PathSeparatedPrefix(p)) => {
            if !p.starts_with('/') || p.ends_with('/') || p.contains(['?', '#']) {
                return Err(cx.err(
                    format!("{field}.path_separated_prefix"),
                    "must start with '/', not end with '/', and hold no query",
                ));
            }
            PathMatch::SeparatedPrefix(p.clone())
        }
        _ => {
            return Err(cx.err(
                field,
                "prefix, path, safe_regex or path_separated_prefix is required",
            ))
        }
    };
    let mut headers = Vec::new();
    for (i, h) in m.headers.iter().enumerate() {
        headers.push(header_match(cx, &format!("{field}.headers[{i}]"), h)?);
    }
    let mut query = Vec::new();
    for (i, q) in m.query_parameters.iter().enumerate() {
        use er::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
        let f = format!("{field}.query_parameters[{i}]");
        let matcher = match &q.query_parameter_match_specifier {
            Some(Q::StringMatch(s)) => string_match(cx, &format!("{f}.string_match"), s)?,
            Some(Q::PresentMatch(p)) => StringMatch::Present(*p),
            None => StringMatch::Present(true),
        };
        query.push(QueryMatch {
            name: q.name.clone(),
            matcher,
        });
    }
    if m.runtime_fraction.is_some() || !m.dynamic_metadata.is_empty() || m.tls_context.is_some() {
        return Err(cx.err(
            field,
            "runtime_fraction, dynamic_metadata and tls_context matches are not supported",
        ));
    }
    Ok(RouteMatch {
        path,
        case_sensitive: m.case_sensitive.as_ref().is_none_or(|b| b.value),
        headers,
        query,
        grpc: m.grpc.is_some(),
    })
}

#[expect(
    deprecated,
    reason = "deprecated Envoy fields are still accepted by Envoy and by us"
)]
fn header_match(cx: &Ctx<'_>, field: &str, h: &er::HeaderMatcher) -> Result<HeaderMatch, Invalid> {
    use er::header_matcher::HeaderMatchSpecifier as H;
    let plain = |v: &String| StringMatch::Exact {
        value: v.clone(),
        ignore_case: false,
    };
    let matcher = match &h.header_match_specifier {
        None => StringMatch::Present(true),
        Some(H::ExactMatch(v)) => plain(v),
        Some(H::SafeRegexMatch(r)) => {
            StringMatch::Regex(compile(cx, &format!("{field}.safe_regex_match"), &r.regex)?)
        }
        Some(H::PresentMatch(p)) => StringMatch::Present(*p),
        Some(H::PrefixMatch(v)) => StringMatch::Prefix {
            value: v.clone(),
            ignore_case: false,
        },
        Some(H::SuffixMatch(v)) => StringMatch::Suffix {
            value: v.clone(),
            ignore_case: false,
        },
        Some(H::ContainsMatch(v)) => StringMatch::Contains {
            value: v.clone(),
            ignore_case: false,
        },
        Some(H::StringMatch(s)) => string_match(cx, &format!("{field}.string_match"), s)?,
        Some(H::RangeMatch(_)) => {
            return Err(cx.err(format!("{field}.range_match"), "is not supported"))
        }
    };
    if h.name.is_empty() {
        return Err(cx.err(format!("{field}.name"), "is empty"));
    }
    Ok(HeaderMatch {
        name: h.name.to_ascii_lowercase(),
        matcher,
        invert: h.invert_match,
    })
}

fn string_match(
    cx: &Ctx<'_>,
    field: &str,
    s: &matcher::StringMatcher,
) -> Result<StringMatch, Invalid> {
    use matcher::string_matcher::MatchPattern as M;
    let ignore_case = s.ignore_case;
    Ok(match &s.match_pattern {
        Some(M::Exact(v)) => StringMatch::Exact {
            value: v.clone(),
            ignore_case,
        },
        Some(M::Prefix(v)) => StringMatch::Prefix {
            value: v.clone(),
            ignore_case,
        },
        Some(M::Suffix(v)) => StringMatch::Suffix {
            value: v.clone(),
            ignore_case,
        },
        Some(M::Contains(v)) => StringMatch::Contains {
            value: v.clone(),
            ignore_case,
        },
        Some(M::SafeRegex(r)) => {
            StringMatch::Regex(compile(cx, &format!("{field}.safe_regex"), &r.regex)?)
        }
        _ => {
            return Err(cx.err(
                field,
                "exact, prefix, suffix, contains or safe_regex is required",
            ))
        }
    })
}

fn route_action(
    cx: &Ctx<'_>,
    field: &str,
    a: &er::RouteAction,
    vh_retry: Option<&Arc<RetryPolicy>>,
) -> Result<Forward, Invalid> {
    use er::route_action::{ClusterSpecifier as C, HostRewriteSpecifier as HR};
    let clusters = match &a.cluster_specifier {
        Some(C::Cluster(c)) if !c.is_empty() => vec![WeightedCluster {
            name: c.clone(),
            weight: 1,
            request_headers: HeaderMutation::default(),
            response_headers: HeaderMutation::default(),
        }],
        Some(C::WeightedClusters(w)) => {
            let mut v = Vec::new();
            for (i, c) in w.clusters.iter().enumerate() {
                let f = format!("{field}.weighted_clusters.clusters[{i}]");
                if c.name.is_empty() {
                    return Err(cx.err(format!("{f}.name"), "is empty (cluster_header is not supported)"));
                }
                let weight = c.weight.as_ref().map_or(0, |w| w.value);
                v.push(WeightedCluster {
                    name: c.name.clone(),
                    weight,
                    request_headers: headers(cx, &format!("{f}.request_headers_to_add"), &c.request_headers_to_add, &c.request_headers_to_remove)?,
                    response_headers: headers(cx, &format!("{f}.response_headers_to_add"), &c.response_headers_to_add, &c.response_headers_to_remove)?,
                });
            }
            v
        }
        _ => return Err(cx.err(field, "cluster or weighted_clusters is required (cluster_header and plugins are not supported)")),
    };
    let total_weight: u64 = clusters.iter().map(|c| c.weight as u64).sum();
    if total_weight == 0 || total_weight > u32::MAX as u64 {
        return Err(cx.err(
            format!("{field}.weighted_clusters"),
            "the weights must add up to more than 0",
        ));
    }
    let timeout = match &a.timeout {
        None => Some(DEFAULT_ROUTE_TIMEOUT),
        Some(d) => Some(duration(d).ok_or_else(|| {
            cx.err(
                format!("{field}.timeout"),
                "negative or out-of-range duration",
            )
        })?)
        .filter(|d| !d.is_zero()),
    };
    let retry_policy = match &a.retry_policy {
        Some(r) => Some(Arc::new(retry_policy(
            cx,
            &format!("{field}.retry_policy"),
            r,
        )?)),
        None => vh_retry.cloned(),
    };
    let mut hash_headers = Vec::new();
    for (i, h) in a.hash_policy.iter().enumerate() {
        match &h.policy_specifier {
            Some(er::route_action::hash_policy::PolicySpecifier::Header(hd)) => {
                if hd.header_name.is_empty() {
                    return Err(cx.err(
                        format!("{field}.hash_policy[{i}].header.header_name"),
                        "is empty",
                    ));
                }
                hash_headers.push(hd.header_name.to_ascii_lowercase())
            }
            _ => {
                return Err(cx.err(
                    format!("{field}.hash_policy[{i}]"),
                    "only header hash policies are supported",
                ))
            }
        }
    }
    let host_rewrite = match &a.host_rewrite_specifier {
        None => None,
        Some(HR::HostRewriteLiteral(h)) => Some(h.clone()),
        Some(_) => {
            return Err(cx.err(
                format!("{field}.host_rewrite_specifier"),
                "only host_rewrite_literal is supported",
            ))
        }
    };
    Ok(Forward {
        clusters,
        total_weight: total_weight as u32,
        timeout,
        retry_policy,
        hash_headers,
        prefix_rewrite: (!a.prefix_rewrite.is_empty()).then(|| a.prefix_rewrite.clone()),
        host_rewrite,
    })
}

fn retry_policy(cx: &Ctx<'_>, field: &str, r: &er::RetryPolicy) -> Result<RetryPolicy, Invalid> {
    let mut on = RetryOn::default();
    for cond in r
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        match cond {
            "5xx" => on.server_error = true,
            "gateway-error" => on.gateway_error = true,
            "reset" | "reset-before-request" => on.reset = true,
            "connect-failure" => on.connect_failure = true,
            "retriable-status-codes" => on.retriable_status_codes = true,
            "cancelled" => on.grpc_cancelled = true,
            "deadline-exceeded" => on.grpc_deadline_exceeded = true,
            "resource-exhausted" => on.grpc_resource_exhausted = true,
            "unavailable" => on.grpc_unavailable = true,
            // Refused streams are resets to us.
            "refused-stream" => on.reset = true,
            // Envoy ignores conditions it does not know (newer ones, typos); so do we,
            // visibly in the log.
            other => tracing::warn!(
                resource = cx.name,
                field = %format!("{field}.retry_on"),
                condition = other,
                "unknown retry condition ignored"
            ),
        }
    }
    let mut retriable_status_codes = Vec::new();
    for c in &r.retriable_status_codes {
        if !(100..600).contains(c) {
            return Err(cx.err(
                format!("{field}.retriable_status_codes"),
                format!("{c} is not an HTTP status"),
            ));
        }
        retriable_status_codes.push(*c as u16);
    }
    let (mut base, mut max) = (Duration::from_millis(25), None);
    if let Some(b) = &r.retry_back_off {
        if let Some(d) = opt_duration(
            cx,
            &format!("{field}.retry_back_off.base_interval"),
            b.base_interval.as_ref(),
        )? {
            if d.is_zero() {
                return Err(cx.err(
                    format!("{field}.retry_back_off.base_interval"),
                    "must be > 0",
                ));
            }
            base = d;
        }
        max = opt_duration(
            cx,
            &format!("{field}.retry_back_off.max_interval"),
            b.max_interval.as_ref(),
        )?;
    }
    let max = max.unwrap_or(base * 10);
    if max < base {
        return Err(cx.err(
            format!("{field}.retry_back_off.max_interval"),
            "must be >= base_interval",
        ));
    }
    Ok(RetryPolicy {
        retry_on: on,
        num_retries: r.num_retries.as_ref().map_or(1, |v| v.value),
        per_try_timeout: opt_duration(
            cx,
            &format!("{field}.per_try_timeout"),
            r.per_try_timeout.as_ref(),
        )?
        .filter(|d| !d.is_zero()),
        retriable_status_codes,
        backoff_base: base,
        backoff_max: max,
    })
}

// ---------------------------------------------------------------------------------------
// Clusters and endpoints

/// A checked cluster; its endpoints come from EDS (`eds_name`) or inline.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub cluster: Arc<Cluster>,
    /// The ClusterLoadAssignment name to subscribe to, for EDS clusters.
    pub eds_name: Option<String>,
}

#[expect(
    deprecated,
    reason = "deprecated Envoy fields are still accepted by Envoy and by us"
)]
pub fn cluster(c: &ec::Cluster) -> Result<ClusterSpec, Invalid> {
    use ec::cluster::{ClusterDiscoveryType, DiscoveryType, LbConfig, LbPolicy as P};
    let cx = Ctx {
        kind: "cluster",
        name: &c.name,
    };
    if c.name.is_empty() {
        return Err(cx.err("name", "is empty"));
    }
    let (eds_name, endpoints, endpoints_known) = match c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32 => {
            let n = c
                .eds_cluster_config
                .as_ref()
                .map(|e| e.service_name.clone())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| c.name.clone());
            (Some(n), Vec::new(), false)
        }
        Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Static as i32 => {
            let Some(la) = &c.load_assignment else {
                return Err(cx.err(
                    "load_assignment",
                    "a STATIC cluster needs its endpoints inline",
                ));
            };
            (None, endpoints_of(&cx, "load_assignment", la)?, true)
        }
        None => {
            return Err(cx.err("type", "EDS or STATIC is required"));
        }
        _ => return Err(cx.err("type", "only EDS and STATIC clusters are supported")),
    };
    let lb = match P::try_from(c.lb_policy) {
        Ok(P::RoundRobin) => LbPolicy::RoundRobin,
        Ok(P::LeastRequest) => LbPolicy::LeastRequest {
            choice_count: match &c.lb_config {
                Some(LbConfig::LeastRequestLbConfig(l)) => {
                    l.choice_count.as_ref().map_or(2, |v| v.value).max(2)
                }
                _ => 2,
            },
        },
        Ok(P::Random) => LbPolicy::Random,
        Ok(P::RingHash) => LbPolicy::RingHash {
            minimum_ring_size: match &c.lb_config {
                Some(LbConfig::RingHashLbConfig(r)) => r
                    .minimum_ring_size
                    .as_ref()
                    .map_or(1024, |v| v.value)
                    .clamp(1, 1 << 23),
                _ => 1024,
            },
        },
        _ => {
            return Err(cx.err(
                "lb_policy",
                "ROUND_ROBIN, LEAST_REQUEST, RANDOM or RING_HASH is required",
            ))
        }
    };
    let protocol = if c.http2_protocol_options.is_some()
        || c.typed_extension_protocol_options
            .keys()
            .any(|k| k == "envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
            && http2_typed(&c.typed_extension_protocol_options)
    {
        UpstreamProtocol::Http2
    } else {
        UpstreamProtocol::Http1
    };
    let connect_timeout = opt_duration(&cx, "connect_timeout", c.connect_timeout.as_ref())?
        .unwrap_or(Duration::from_secs(5));
    if connect_timeout.is_zero() {
        return Err(cx.err("connect_timeout", "must be greater than 0s"));
    }
    let mut circuit_breaker = model::CircuitBreaker::default();
    if let Some(cb) = &c.circuit_breakers {
        for (i, t) in cb.thresholds.iter().enumerate() {
            // DEFAULT priority (0) only; HIGH is not distinguished by this proxy.
            if t.priority != 0 {
                continue;
            }
            let v = |o: &Option<envoy_types::pb::google::protobuf::UInt32Value>, d: u32| {
                o.as_ref().map_or(d, |v| v.value)
            };
            circuit_breaker = model::CircuitBreaker {
                max_connections: v(&t.max_connections, 1024),
                max_pending_requests: v(&t.max_pending_requests, 1024),
                max_requests: v(&t.max_requests, 1024),
                max_retries: v(&t.max_retries, 3),
            };
            if t.retry_budget.is_some() {
                return Err(cx.err(
                    format!("circuit_breakers.thresholds[{i}].retry_budget"),
                    "is not supported; use max_retries",
                ));
            }
        }
    }
    if let Some(o) = &c.outlier_detection {
        if o.max_ejection_percent
            .as_ref()
            .is_some_and(|v| v.value > 100)
        {
            return Err(cx.err("outlier_detection.max_ejection_percent", "must be <= 100"));
        }
        if o.interval
            .as_ref()
            .is_some_and(|d| d.seconds == 0 && d.nanos == 0)
        {
            return Err(cx.err("outlier_detection.interval", "must be greater than 0s"));
        }
        if o.base_ejection_time
            .as_ref()
            .is_some_and(|d| d.seconds == 0 && d.nanos == 0)
        {
            return Err(cx.err(
                "outlier_detection.base_ejection_time",
                "must be greater than 0s",
            ));
        }
    }
    let outlier = match &c.outlier_detection {
        None => None,
        Some(o) => Some(OutlierDetection {
            consecutive_5xx: o.consecutive_5xx.as_ref().map_or(5, |v| v.value),
            base_ejection_time: opt_duration(
                &cx,
                "outlier_detection.base_ejection_time",
                o.base_ejection_time.as_ref(),
            )?
            .unwrap_or(Duration::from_secs(30)),
            max_ejection_percent: o.max_ejection_percent.as_ref().map_or(10, |v| v.value),
            interval: opt_duration(&cx, "outlier_detection.interval", o.interval.as_ref())?
                .unwrap_or(Duration::from_secs(10)),
        }),
    };
    Ok(ClusterSpec {
        cluster: Arc::new(Cluster {
            name: c.name.clone(),
            lb,
            protocol,
            connect_timeout,
            circuit_breaker,
            outlier,
            endpoints,
            endpoints_known,
        }),
        eds_name,
    })
}

/// The typed `HttpProtocolOptions` asks for HTTP/2 (explicit `http2_protocol_options`).
fn http2_typed(opts: &HashMap<String, Any>) -> bool {
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
        http_protocol_options::{explicit_http_config::ProtocolConfig, UpstreamProtocolOptions},
        HttpProtocolOptions,
    };
    opts.values().any(|a| {
        unpack::<HttpProtocolOptions>(a).is_ok_and(|o| {
            matches!(
                o.upstream_protocol_options,
                Some(UpstreamProtocolOptions::ExplicitHttpConfig(ref e))
                    if matches!(e.protocol_config, Some(ProtocolConfig::Http2ProtocolOptions(_)))
            )
        })
    })
}

pub fn load_assignment(la: &ee::ClusterLoadAssignment) -> Result<Vec<Endpoint>, Invalid> {
    let cx = Ctx {
        kind: "cluster_load_assignment",
        name: &la.cluster_name,
    };
    if la.cluster_name.is_empty() {
        return Err(cx.err("cluster_name", "is empty"));
    }
    endpoints_of(&cx, "", la)
}

fn endpoints_of(
    cx: &Ctx<'_>,
    prefix: &str,
    la: &ee::ClusterLoadAssignment,
) -> Result<Vec<Endpoint>, Invalid> {
    let dot = if prefix.is_empty() { "" } else { "." };
    let mut out = Vec::new();
    for (i, loc) in la.endpoints.iter().enumerate() {
        for (j, lb) in loc.lb_endpoints.iter().enumerate() {
            let f = format!("{prefix}{dot}endpoints[{i}].lb_endpoints[{j}]");
            let Some(ee::lb_endpoint::HostIdentifier::Endpoint(ep)) = &lb.host_identifier else {
                return Err(cx.err(format!("{f}.endpoint"), "is required"));
            };
            let address =
                socket_address(cx, &format!("{f}.endpoint.address"), ep.address.as_ref())?;
            let health = match core::HealthStatus::try_from(lb.health_status) {
                Ok(core::HealthStatus::Unknown | core::HealthStatus::Healthy) => Health::Healthy,
                Ok(core::HealthStatus::Degraded) => Health::Degraded,
                _ => Health::Unhealthy,
            };
            let weight = lb.load_balancing_weight.as_ref().map_or(1, |w| w.value);
            if weight == 0 {
                return Err(cx.err(format!("{f}.load_balancing_weight"), "must be >= 1"));
            }
            out.push(Endpoint {
                address,
                weight,
                health,
            });
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Assembly

/// Accepted, checked resources by name; the client keeps these and rebuilds the
/// `ProxyConfig` from them after every accepted change.
#[derive(Debug, Default, Clone)]
pub struct Accepted {
    pub listeners: BTreeMap<String, Arc<ListenerSpec>>,
    pub routes: BTreeMap<String, Arc<RouteConfig>>,
    pub clusters: BTreeMap<String, ClusterSpec>,
    pub endpoints: BTreeMap<String, Arc<Vec<Endpoint>>>,
    /// Workloads by uid (`istio.workload.Address`; services are not kept).
    pub workloads: BTreeMap<String, Arc<WorkloadInfo>>,
    pub authorizations: BTreeMap<String, Arc<Policy>>,
    pub peer_authentications: BTreeMap<String, Arc<PeerAuthn>>,
}

/// An EDS cluster as last built: (the cluster, its endpoints, the two joined).
type BuiltCluster = (Arc<Cluster>, Arc<Vec<Endpoint>>, Arc<Cluster>);
/// A listener as last built: (its spec, the route configuration it used, the result).
type BuiltListener = (Arc<ListenerSpec>, Option<Arc<RouteConfig>>, Arc<Listener>);

/// Clusters and listeners as last built, by name.
#[derive(Debug, Default)]
pub struct BuildMemo {
    clusters: HashMap<String, BuiltCluster>,
    listeners: HashMap<String, BuiltListener>,
}

/// What is not in force yet and why (config dump, readiness).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Warming {
    /// Listener name -> the route configuration it waits for.
    pub listeners: BTreeMap<String, String>,
    /// EDS clusters whose endpoints have not arrived.
    pub clusters: Vec<String>,
}

impl Accepted {
    /// Builds the configuration in force. A listener naming a route configuration that
    /// has not arrived stays out (warming); an EDS cluster without its assignment is in
    /// force with no endpoints and listed as warming (requests to it get 503).
    pub fn build(&self) -> (ProxyConfig, Warming) {
        self.build_with(&mut BuildMemo::default())
    }

    /// `build`, reusing from `memo` each EDS cluster whose cluster and endpoints are the
    /// same `Arc`s as last time: an endpoint change rebuilds that cluster only, not the
    /// 10k others (which would copy every endpoint list).
    pub fn build_with(&self, memo: &mut BuildMemo) -> (ProxyConfig, Warming) {
        let mut warming = Warming::default();
        let mut clusters = HashMap::with_capacity(self.clusters.len());
        let mut next = HashMap::with_capacity(memo.clusters.len());
        for (name, spec) in &self.clusters {
            let c = match &spec.eds_name {
                None => spec.cluster.clone(),
                Some(eds) => match self.endpoints.get(eds) {
                    Some(eps) => {
                        let built = match memo.clusters.remove(name) {
                            Some((c, e, b))
                                if Arc::ptr_eq(&c, &spec.cluster) && Arc::ptr_eq(&e, eps) =>
                            {
                                b
                            }
                            _ => Arc::new(Cluster {
                                endpoints: eps.as_ref().clone(),
                                endpoints_known: true,
                                ..clone_cluster(&spec.cluster)
                            }),
                        };
                        next.insert(
                            name.clone(),
                            (spec.cluster.clone(), eps.clone(), built.clone()),
                        );
                        built
                    }
                    None => {
                        warming.clusters.push(name.clone());
                        spec.cluster.clone()
                    }
                },
            };
            clusters.insert(name.clone(), c);
        }
        memo.clusters = next;
        let mut listeners = HashMap::with_capacity(self.listeners.len());
        let mut next = HashMap::with_capacity(memo.listeners.len());
        for (name, l) in &self.listeners {
            // What the listener reads besides its spec: its route configuration.
            let route = match &l.kind {
                ListenerSpecKind::Api => continue,
                ListenerSpecKind::Tcp { .. } => None,
                ListenerSpecKind::Http { routes, .. } => match routes {
                    RouteSource::Inline(rc) => Some(rc.clone()),
                    RouteSource::Rds(n) => match self.routes.get(n) {
                        Some(rc) => Some(rc.clone()),
                        None => {
                            warming.listeners.insert(name.clone(), n.clone());
                            continue;
                        }
                    },
                },
            };
            let reused = memo.listeners.remove(name).filter(|(spec, r, _)| {
                Arc::ptr_eq(spec, l)
                    && match (r, &route) {
                        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                        (None, None) => true,
                        _ => false,
                    }
            });
            let built = match reused {
                Some((_, _, built)) => built,
                None => {
                    let kind = match (&l.kind, &route) {
                        (ListenerSpecKind::Tcp { cluster }, _) => ListenerKind::Tcp {
                            cluster: cluster.clone(),
                        },
                        (
                            ListenerSpecKind::Http {
                                stat_prefix,
                                codec,
                                max_request_headers_bytes,
                                request_timeout,
                                rate_limit,
                                fault,
                                ..
                            },
                            Some(route_config),
                        ) => ListenerKind::Http(HttpListener {
                            stat_prefix: stat_prefix.clone(),
                            codec: *codec,
                            route_config: route_config.clone(),
                            max_request_headers_bytes: *max_request_headers_bytes,
                            request_timeout: *request_timeout,
                            rate_limit: rate_limit.clone(),
                            fault: fault.clone(),
                        }),
                        _ => continue,
                    };
                    Arc::new(Listener {
                        name: name.clone(),
                        address: l.address,
                        kind,
                        tcp_fallback: l.tcp_fallback.clone(),
                    })
                }
            };
            next.insert(name.clone(), (l.clone(), route, built.clone()));
            for at in &l.additional {
                listeners.insert(*at, built.clone());
            }
            listeners.insert(l.address, built);
        }
        memo.listeners = next;
        (
            ProxyConfig {
                listeners,
                clusters,
                // Numbered by the client when it publishes the configuration.
                version: 0,
            },
            warming,
        )
    }

    /// The resource names the accepted resources refer to: RDS names of listeners, EDS
    /// names of clusters, and clusters named by routes and TCP listeners.
    pub fn references(&self) -> (Vec<String>, Vec<String>, Vec<String>) {
        let mut rds: Vec<String> = self
            .listeners
            .values()
            .filter_map(|l| l.rds_name().map(str::to_owned))
            .collect();
        let mut cds = Vec::new();
        for l in self.listeners.values() {
            cds.extend(l.tcp_fallback.clone());
            match &l.kind {
                ListenerSpecKind::Tcp { cluster } => cds.push(cluster.clone()),
                ListenerSpecKind::Http {
                    routes: RouteSource::Inline(rc),
                    ..
                } => clusters_of(rc, &mut cds),
                _ => {}
            }
        }
        for rc in self.routes.values() {
            clusters_of(rc, &mut cds);
        }
        let mut eds: Vec<String> = self
            .clusters
            .values()
            .filter_map(|c| c.eds_name.clone())
            .collect();
        for v in [&mut rds, &mut cds, &mut eds] {
            v.sort();
            v.dedup();
        }
        (rds, cds, eds)
    }
}

fn clusters_of(rc: &RouteConfig, out: &mut Vec<String>) {
    for vh in &rc.virtual_hosts {
        for r in &vh.routes {
            if let RouteAction::Forward(f) = &r.action {
                out.extend(f.clusters.iter().map(|c| c.name.clone()));
            }
        }
    }
}

fn clone_cluster(c: &Cluster) -> Cluster {
    Cluster {
        name: c.name.clone(),
        lb: c.lb,
        protocol: c.protocol,
        connect_timeout: c.connect_timeout,
        circuit_breaker: c.circuit_breaker,
        outlier: c.outlier,
        endpoints: c.endpoints.clone(),
        endpoints_known: c.endpoints_known,
    }
}

// ---------------------------------------------------------------------------------------
// Workloads and policies (`wire::istio`)

/// The mesh trust domain when a workload elides its own (ztunnel's default).
pub use crate::wire::istio::DEFAULT_TRUST_DOMAIN;

/// What an `istio.workload.Address` carries that the proxy keeps: a workload, or a
/// service (recognised, not used: services come as listeners and clusters).
pub enum AddressSpec {
    Workload(Arc<WorkloadInfo>),
    Service,
}

/// The resource name of an Address (the workload's uid, or `namespace/hostname`) and
/// what it means.
pub fn address(a: &istio::Address) -> Result<(String, AddressSpec), Invalid> {
    match &a.r#type {
        None => Err(Invalid {
            kind: "Address",
            name: String::new(),
            field: "type".into(),
            reason: "neither a workload nor a service".into(),
        }),
        Some(istio::address::Type::Service(s)) => Ok((
            format!("{}/{}", s.namespace, s.hostname),
            AddressSpec::Service,
        )),
        Some(istio::address::Type::Workload(w)) => {
            let cx = Ctx {
                kind: "Workload",
                name: &w.uid,
            };
            if w.uid.is_empty() {
                return Err(cx.err("uid", "empty"));
            }
            let mut ips = Vec::with_capacity(w.addresses.len());
            for (i, b) in w.addresses.iter().enumerate() {
                ips.push(ip_of(b).ok_or_else(|| {
                    cx.err(
                        format!("addresses[{i}]"),
                        format!("{} bytes; an address is 4 or 16", b.len()),
                    )
                })?);
            }
            let td = if w.trust_domain.is_empty() {
                DEFAULT_TRUST_DOMAIN
            } else {
                &w.trust_domain
            };
            let sa = if w.service_account.is_empty() {
                "default"
            } else {
                &w.service_account
            };
            let identity = crate::identity::SpiffeId::new(td, &w.namespace, sa)
                .map_err(|e| cx.err("trust_domain/namespace/service_account", e.to_string()))?;
            let hbone = match istio::TunnelProtocol::try_from(w.tunnel_protocol) {
                Ok(istio::TunnelProtocol::Hbone) => true,
                Ok(istio::TunnelProtocol::None) => false,
                Err(_) => {
                    return Err(cx.err(
                        "tunnel_protocol",
                        format!("{} is not NONE or HBONE", w.tunnel_protocol),
                    ))
                }
            };
            let sorted = |v: &[String]| {
                let mut v = v.to_vec();
                v.sort();
                v.dedup();
                v
            };
            let bounded = |field: &str, v: &str| {
                if v.len() > MAX_TELEMETRY_VALUE {
                    Err(cx.err(
                        field,
                        format!("{} bytes, at most {MAX_TELEMETRY_VALUE}", v.len()),
                    ))
                } else {
                    Ok(v.to_owned())
                }
            };
            let telemetry = Telemetry {
                app: bounded("canonical_name", &w.canonical_name)?,
                version: bounded("canonical_revision", &w.canonical_revision)?,
                access_log: w.access_log,
            };
            Ok((
                w.uid.clone(),
                AddressSpec::Workload(Arc::new(WorkloadInfo {
                    uid: w.uid.clone(),
                    name: w.name.clone(),
                    namespace: w.namespace.clone(),
                    ips,
                    identity,
                    node: w.node.clone(),
                    hbone,
                    authorization_policies: sorted(&w.authorization_policies),
                    peer_authentications: sorted(&w.peer_authentications),
                    telemetry,
                })),
            ))
        }
    }
}

fn ip_of(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

fn str_matches(
    cx: &Ctx<'_>,
    field: &str,
    v: &[istio::StringMatch],
    lower: bool,
) -> Result<Vec<StrMatch>, Invalid> {
    use istio::string_match::MatchType;
    let norm = |s: &str| {
        if lower {
            s.to_ascii_lowercase()
        } else {
            s.to_owned()
        }
    };
    v.iter()
        .enumerate()
        .map(|(i, m)| match &m.match_type {
            Some(MatchType::Exact(s)) => Ok(StrMatch::Exact(norm(s))),
            Some(MatchType::Prefix(s)) => Ok(StrMatch::Prefix(norm(s))),
            Some(MatchType::Suffix(s)) => Ok(StrMatch::Suffix(norm(s))),
            Some(MatchType::Presence(_)) => Ok(StrMatch::Presence),
            None => Err(cx.err(format!("{field}[{i}]"), "no match type")),
        })
        .collect()
}

fn cidrs(cx: &Ctx<'_>, field: &str, v: &[istio::IpBlock]) -> Result<Vec<Cidr>, Invalid> {
    v.iter()
        .enumerate()
        .map(|(i, b)| {
            let addr = ip_of(&b.address).ok_or_else(|| {
                cx.err(
                    format!("{field}[{i}].address"),
                    format!("{} bytes; an address is 4 or 16", b.address.len()),
                )
            })?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            if b.length > max {
                return Err(cx.err(
                    format!("{field}[{i}].length"),
                    format!("{} is longer than the address ({max})", b.length),
                ));
            }
            Ok(Cidr {
                addr,
                len: b.length as u8,
            })
        })
        .collect()
}

fn ports_of(cx: &Ctx<'_>, field: &str, v: &[u32]) -> Result<Vec<u16>, Invalid> {
    v.iter()
        .map(|p| {
            u16::try_from(*p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| cx.err(field, format!("{p} is not a port")))
        })
        .collect()
}

fn scope_of(cx: &Ctx<'_>, v: i32) -> Result<Scope, Invalid> {
    Ok(match istio::Scope::try_from(v) {
        Ok(istio::Scope::Global) => Scope::Global,
        Ok(istio::Scope::Namespace) => Scope::Namespace,
        Ok(istio::Scope::WorkloadSelector) => Scope::WorkloadSelector,
        Err(_) => return Err(cx.err("scope", format!("unknown scope {v}"))),
    })
}

fn policy_match(cx: &Ctx<'_>, f: &str, m: &istio::Match) -> Result<PolicyMatch, Invalid> {
    let s = |n: &str, v: &[istio::StringMatch]| str_matches(cx, &format!("{f}.{n}"), v, false);
    let h = |n: &str, v: &[istio::StringMatch]| str_matches(cx, &format!("{f}.{n}"), v, true);
    let c = |n: &str, v: &[istio::IpBlock]| cidrs(cx, &format!("{f}.{n}"), v);
    let mut headers = Vec::with_capacity(m.headers.len());
    for (i, hc) in m.headers.iter().enumerate() {
        let name = hc.name.to_ascii_lowercase();
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(cx.err(
                format!("{f}.headers[{i}].name"),
                format!("{:?} is not a header name", hc.name),
            ));
        }
        headers.push(HeaderCond {
            name,
            values: s(&format!("headers[{i}].values"), &hc.values)?,
            not_values: s(&format!("headers[{i}].not_values"), &hc.not_values)?,
        });
    }
    Ok(PolicyMatch {
        namespaces: s("namespaces", &m.namespaces)?,
        not_namespaces: s("not_namespaces", &m.not_namespaces)?,
        principals: s("principals", &m.principals)?,
        not_principals: s("not_principals", &m.not_principals)?,
        source_ips: c("source_ips", &m.source_ips)?,
        not_source_ips: c("not_source_ips", &m.not_source_ips)?,
        destination_ips: c("destination_ips", &m.destination_ips)?,
        not_destination_ips: c("not_destination_ips", &m.not_destination_ips)?,
        destination_ports: ports_of(cx, &format!("{f}.destination_ports"), &m.destination_ports)?,
        not_destination_ports: ports_of(
            cx,
            &format!("{f}.not_destination_ports"),
            &m.not_destination_ports,
        )?,
        methods: s("methods", &m.methods)?,
        not_methods: s("not_methods", &m.not_methods)?,
        paths: s("paths", &m.paths)?,
        not_paths: s("not_paths", &m.not_paths)?,
        hosts: h("hosts", &m.hosts)?,
        not_hosts: h("not_hosts", &m.not_hosts)?,
        headers,
    })
}

/// An `istio.security.Authorization`, compiled; refused if it uses what cannot be
/// honoured (an unknown action, such as CUSTOM from a newer control plane, or scope).
pub fn authorization(a: &istio::Authorization) -> Result<(String, Policy), Invalid> {
    let key = format!("{}/{}", a.namespace, a.name);
    let cx = Ctx {
        kind: "Authorization",
        name: &key,
    };
    if a.name.is_empty() {
        return Err(cx.err("name", "empty"));
    }
    let action = match istio::Action::try_from(a.action) {
        Ok(istio::Action::Allow) => PolicyAction::Allow,
        Ok(istio::Action::Deny) => PolicyAction::Deny,
        Ok(istio::Action::Audit) => PolicyAction::Audit,
        Err(_) => {
            return Err(cx.err(
                "action",
                format!(
                    "unknown action {} (ALLOW, DENY and AUDIT are enforced)",
                    a.action
                ),
            ))
        }
    };
    let scope = scope_of(&cx, a.scope)?;
    let mut rules = Vec::with_capacity(a.rules.len());
    for (i, r) in a.rules.iter().enumerate() {
        let mut clauses = Vec::with_capacity(r.clauses.len());
        let mut has_l7 = false;
        for (j, c) in r.clauses.iter().enumerate() {
            let mut matches = Vec::with_capacity(c.matches.len());
            for (k, m) in c.matches.iter().enumerate() {
                let m = policy_match(&cx, &format!("rules[{i}].clauses[{j}].matches[{k}]"), m)?;
                has_l7 |= m.has_l7();
                matches.push(m);
            }
            clauses.push(PolicyClause { matches });
        }
        rules.push(PolicyRule { clauses, has_l7 });
    }
    Ok((
        key.clone(),
        Policy {
            key: key.into(),
            namespace: a.namespace.clone(),
            scope,
            action,
            rules,
        },
    ))
}

fn mtls_of(cx: &Ctx<'_>, field: &str, v: i32) -> Result<MtlsMode, Invalid> {
    Ok(match istio::MtlsMode::try_from(v) {
        Ok(istio::MtlsMode::Unset) => MtlsMode::Unset,
        Ok(istio::MtlsMode::Disable) => MtlsMode::Disable,
        Ok(istio::MtlsMode::Permissive) => MtlsMode::Permissive,
        Ok(istio::MtlsMode::Strict) => MtlsMode::Strict,
        Err(_) => return Err(cx.err(field, format!("unknown mode {v}"))),
    })
}

pub fn peer_authentication(p: &istio::PeerAuthentication) -> Result<(String, PeerAuthn), Invalid> {
    let key = format!("{}/{}", p.namespace, p.name);
    let cx = Ctx {
        kind: "PeerAuthentication",
        name: &key,
    };
    if p.name.is_empty() {
        return Err(cx.err("name", "empty"));
    }
    let scope = scope_of(&cx, p.scope)?;
    let mut port_level = BTreeMap::new();
    for (i, pl) in p.port_level.iter().enumerate() {
        let port = u16::try_from(pl.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                cx.err(
                    format!("port_level[{i}].port"),
                    format!("{} is not a port", pl.port),
                )
            })?;
        port_level.insert(
            port,
            mtls_of(&cx, &format!("port_level[{i}].mode"), pl.mode)?,
        );
    }
    if !port_level.is_empty() && scope != Scope::WorkloadSelector {
        return Err(cx.err(
            "port_level",
            "only a selector-based policy may set port-level modes",
        ));
    }
    let mode = mtls_of(&cx, "mode", p.mode)?;
    Ok((
        key.clone(),
        PeerAuthn {
            key: key.into(),
            namespace: p.namespace.clone(),
            scope,
            mode,
            port_level,
        },
    ))
}

impl Accepted {
    /// The workloads and policies in force.
    pub fn build_mesh(&self) -> MeshConfig {
        MeshConfig {
            workloads: WorkloadIndex::new(self.workloads.values()),
            policies: Policies::new(&self.authorizations, &self.peer_authentications),
            version: 0,
        }
    }
}
