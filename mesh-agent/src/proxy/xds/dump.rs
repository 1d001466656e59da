//! The configuration in force as JSON, for `/config_dump`: what each listener, route and
//! cluster will do, resolved (after warming, with endpoints); and the workloads and
//! policies in force (`mesh`).

use std::{
    net::SocketAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Value};

use crate::proxy::config::{
    policy::MeshConfig, Cluster, Fault, FaultAbort, HeaderMutation, ListenerKind, PathMatch,
    ProxyConfig, RateLimit, RouteAction, StringMatch,
};

/// Workloads (by uid) and policies in force, as the proxy compiled them.
pub fn mesh(m: &MeshConfig) -> Value {
    json!({
        "version": m.version,
        "workloads": m.workloads.iter().map(|w| json!({
            "uid": w.uid,
            "name": w.name,
            "namespace": w.namespace,
            "ips": w.ips,
            "identity": w.identity.to_string(),
            "node": w.node,
            "hbone": w.hbone_addr().map(|a| a.to_string()),
            "authorization_policies": w.authorization_policies,
            "peer_authentications": w.peer_authentications,
            "app": w.telemetry.app,
            "version": w.telemetry.version,
            "access_log": w.telemetry.access_log,
        })).collect::<Vec<_>>(),
        "address_conflicts": m.workloads.conflicts,
        "authorization_policies": m.policies.authorizations,
        "peer_authentications": m.policies.peer_authentications,
    })
}

pub fn config(cfg: &ProxyConfig) -> Value {
    config_with(cfg, |_, _| None)
}

/// `config`, with the endpoints outlier detection keeps out (by cluster name and address,
/// until when) shown ejected rather than with the health the configuration gives them:
/// the proxy keeps that state, the configuration cannot say it.
pub fn config_with(
    cfg: &ProxyConfig,
    ejected_until: impl Fn(&str, SocketAddr) -> Option<SystemTime>,
) -> Value {
    let mut listeners: Vec<&_> = cfg.listeners.values().collect();
    listeners.sort_by(|a, b| a.name.cmp(&b.name));
    // A listener with `additional_addresses` is in the map once per address.
    listeners.dedup_by(|a, b| std::sync::Arc::ptr_eq(a, b));
    let mut clusters: Vec<&_> = cfg.clusters.values().collect();
    clusters.sort_by(|a, b| a.name.cmp(&b.name));
    json!({
        "version": cfg.version,
        "listeners": listeners.iter().map(|l| {
            let mut v = json!({ "name": l.name, "address": l.address.to_string() });
            match &l.kind {
                ListenerKind::Tcp { cluster } => v["tcp_proxy"] = json!({ "cluster": cluster }),
                ListenerKind::Http(h) => {
                    v["http"] = json!({
                        "stat_prefix": h.stat_prefix,
                        "codec": format!("{:?}", h.codec),
                        "max_request_headers_bytes": h.max_request_headers_bytes,
                        "rate_limit": h.rate_limit.as_deref().map(rate_limit),
                        "fault": h.fault.as_deref().map(fault),
                        "route_config": {
                            "name": h.route_config.name,
                            "virtual_hosts": h.route_config.virtual_hosts.iter().map(|vh| json!({
                                "name": vh.name,
                                "domains": vh.domains,
                                "routes": vh.routes.iter().map(|r| json!({
                                    "name": r.name,
                                    "match": {
                                        "path": path(&r.matcher.path),
                                        "case_sensitive": r.matcher.case_sensitive,
                                        "headers": r.matcher.headers.iter().map(|h| json!({
                                            "name": h.name, "match": string(&h.matcher), "invert": h.invert,
                                        })).collect::<Vec<_>>(),
                                        "query": r.matcher.query.iter().map(|q| json!({
                                            "name": q.name, "match": string(&q.matcher),
                                        })).collect::<Vec<_>>(),
                                        "grpc": r.matcher.grpc,
                                    },
                                    "action": action(&r.action),
                                    "request_headers": headers(&r.request_headers),
                                    "response_headers": headers(&r.response_headers),
                                    "rate_limit": r.rate_limit.as_deref().map(rate_limit),
                                    "fault": r.fault.as_deref().map(fault),
                                })).collect::<Vec<_>>(),
                            })).collect::<Vec<_>>(),
                        },
                    });
                }
            }
            if let Some(c) = &l.tcp_fallback {
                v["tcp_fallback"] = json!(c);
            }
            v
        }).collect::<Vec<_>>(),
        "clusters": clusters.iter().map(|c| cluster(c, &ejected_until)).collect::<Vec<_>>(),
    })
}

fn cluster(c: &Cluster, ejected_until: impl Fn(&str, SocketAddr) -> Option<SystemTime>) -> Value {
    json!({
        "name": c.name,
        "lb": format!("{:?}", c.lb),
        "protocol": format!("{:?}", c.protocol),
        "connect_timeout_ms": c.connect_timeout.as_millis() as u64,
        "circuit_breaker": {
            "max_connections": c.circuit_breaker.max_connections,
            "max_pending_requests": c.circuit_breaker.max_pending_requests,
            "max_requests": c.circuit_breaker.max_requests,
            "max_retries": c.circuit_breaker.max_retries,
        },
        "outlier_detection": c.outlier.map(|o| json!({
            "consecutive_5xx": o.consecutive_5xx,
            "base_ejection_ms": o.base_ejection_time.as_millis() as u64,
            "max_ejection_percent": o.max_ejection_percent,
        })),
        "endpoints_known": c.endpoints_known,
        "endpoints": c.endpoints.iter().map(|e| {
            let mut v = json!({
                "address": e.address.to_string(), "weight": e.weight, "health": format!("{:?}", e.health),
            });
            if let Some(until) = ejected_until(&c.name, e.address) {
                v["configured_health"] = v["health"].take();
                v["health"] = json!("Ejected");
                v["ejected_until_unix_ms"] = json!(until
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64));
            }
            v
        }).collect::<Vec<_>>(),
    })
}

fn path(p: &PathMatch) -> Value {
    match p {
        PathMatch::Prefix(s) => json!({ "prefix": s }),
        PathMatch::Exact(s) => json!({ "path": s }),
        PathMatch::Regex(r) => json!({ "safe_regex": r.as_str() }),
        PathMatch::SeparatedPrefix(s) => json!({ "path_separated_prefix": s }),
    }
}

fn string(m: &StringMatch) -> Value {
    match m {
        StringMatch::Exact { value, ignore_case } => {
            json!({ "exact": value, "ignore_case": ignore_case })
        }
        StringMatch::Prefix { value, ignore_case } => {
            json!({ "prefix": value, "ignore_case": ignore_case })
        }
        StringMatch::Suffix { value, ignore_case } => {
            json!({ "suffix": value, "ignore_case": ignore_case })
        }
        StringMatch::Contains { value, ignore_case } => {
            json!({ "contains": value, "ignore_case": ignore_case })
        }
        StringMatch::Regex(r) => json!({ "safe_regex": r.as_str() }),
        StringMatch::Present(p) => json!({ "present": p }),
    }
}

fn action(a: &RouteAction) -> Value {
    match a {
        RouteAction::Forward(f) => json!({
            "clusters": f.clusters.iter().map(|c| json!({ "name": c.name, "weight": c.weight })).collect::<Vec<_>>(),
            "timeout_ms": f.timeout.map(|t| t.as_millis() as u64),
            "retry_policy": f.retry_policy.as_ref().map(|r| json!({
                "retry_on": format!("{:?}", r.retry_on),
                "num_retries": r.num_retries,
                "per_try_timeout_ms": r.per_try_timeout.map(|t| t.as_millis() as u64),
                "retriable_status_codes": r.retriable_status_codes,
            })),
            "hash_headers": f.hash_headers,
            "prefix_rewrite": f.prefix_rewrite,
            "host_rewrite": f.host_rewrite,
        }),
        RouteAction::Respond { status, body } => {
            json!({ "direct_response": { "status": status, "body": body } })
        }
        RouteAction::Redirect { status, host, path } => {
            json!({ "redirect": { "status": status, "host": host, "path": path } })
        }
    }
}

fn headers(h: &HeaderMutation) -> Value {
    json!({
        "add": h.add.iter().map(|(k, v, append)| json!({ "name": k, "value": v, "append": append })).collect::<Vec<_>>(),
        "remove": h.remove,
    })
}

fn rate_limit(r: &RateLimit) -> Value {
    json!({
        "max_tokens": r.max_tokens,
        "tokens_per_fill": r.tokens_per_fill,
        "fill_interval_ms": r.fill_interval.as_millis() as u64,
        "status": r.status,
    })
}

fn fault(f: &Fault) -> Value {
    json!({
        "delay": f.delay.map(|(d, ppm)| json!({ "ms": d.as_millis() as u64, "percent": ppm as f64 / 10_000.0 })),
        "abort": f.abort.map(|(a, ppm)| json!({
            "http_status": match a { FaultAbort::Http(s) => Some(s), FaultAbort::Grpc(_) => None },
            "grpc_status": match a { FaultAbort::Grpc(s) => Some(s), FaultAbort::Http(_) => None },
            "percent": ppm as f64 / 10_000.0,
        })),
    })
}
