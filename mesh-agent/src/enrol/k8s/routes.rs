//! Gateway API mesh routing (GAMMA): `HTTPRoute` and `GRPCRoute` whose parent is a
//! Service, turned into the services' `RouteSpec`s that the embedded control plane
//! translates to RDS.
//!
//! Only the fields used are declared; unknown fields are ignored, as a controller must for
//! forward compatibility. What cannot be carried (mirrors, redirects, rewrites, extension
//! filters) makes the rule skipped with a reason, never silently half-applied.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::control::model::{BackendSpec, HeadersSpec, KvMatchSpec, MatchSpec, RouteSpec};

pub const GROUP: &str = "gateway.networking.k8s.io";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteObject {
    #[serde(default)]
    pub spec: RouteSpecK8s,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpecK8s {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

impl ParentRef {
    /// A Service parent (GAMMA): group "" (core) and kind Service. Gateway parents are
    /// for ingress controllers, not for the mesh.
    pub fn is_service(&self) -> bool {
        self.group.as_deref().unwrap_or(GROUP).is_empty() && self.kind.as_deref() == Some("Service")
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<RouteMatch>,
    #[serde(default)]
    pub filters: Vec<Filter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default)]
    pub timeouts: Option<Timeouts>,
}

/// HTTPRouteMatch and GRPCRouteMatch in one: `path`/`method` differ in shape.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    #[serde(default)]
    pub path: Option<PathMatch>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    #[serde(default)]
    pub query_params: Vec<ValueMatch>,
    /// HTTP: a string (`GET`); gRPC: `{type, service, method}`.
    #[serde(default)]
    pub method: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PathMatch {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ValueMatch {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Filter {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifier>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct HeaderModifier {
    #[serde(default)]
    pub set: Vec<NameValue>,
    #[serde(default)]
    pub add: Vec<NameValue>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct NameValue {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub weight: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Timeouts {
    #[serde(default)]
    pub request: Option<String>,
}

/// Which flavour of route: they differ in how matches read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    Http,
    Grpc,
}

/// One route rule as our routes, one per match (matches are ORed), and the order key the
/// Gateway API's precedence rules give it.
pub struct Converted {
    pub route: RouteSpec,
    pub precedence: Precedence,
}

/// Gateway API precedence, most specific first: exact path, longest prefix, method,
/// most header matches, most query matches; then the older route, then its name (the
/// caller adds those two).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Precedence {
    exact: bool,
    prefix_len: usize,
    method: bool,
    headers: usize,
    query: usize,
}

/// Converts one rule of a route `route` (namespace/name) attached to a service in
/// `namespace`. `Err` carries why the rule cannot be carried.
pub fn convert_rule(
    flavour: Flavour,
    namespace: &str,
    route: &str,
    index: usize,
    rule: &Rule,
) -> Result<Vec<Converted>, String> {
    let mut base = RouteSpec {
        name: Some(match &rule.name {
            Some(n) => format!("{route}/{n}"),
            None => format!("{route}/{index}"),
        }),
        ..Default::default()
    };
    for f in &rule.filters {
        match f.kind.as_str() {
            "RequestHeaderModifier" => {
                base.request_headers = Some(headers(f.request_header_modifier.as_ref())?)
            }
            "ResponseHeaderModifier" => {
                base.response_headers = Some(headers(f.response_header_modifier.as_ref())?)
            }
            other => return Err(format!("filter {other} is not supported by the mesh")),
        }
    }
    for b in &rule.backend_refs {
        let group = b.group.as_deref().unwrap_or("");
        let kind = b.kind.as_deref().unwrap_or("Service");
        if !group.is_empty() || kind != "Service" {
            return Err(format!(
                "backendRef {group}/{kind} {}: only Services",
                b.name
            ));
        }
        let weight = b.weight.unwrap_or(1);
        if weight == 0 {
            continue;
        }
        let ns = b.namespace.as_deref().unwrap_or(namespace);
        base.backends.push(BackendSpec {
            service: format!("{}.{ns}", b.name),
            weight: Some(weight),
            port: b.port,
        });
    }
    if !rule.backend_refs.is_empty() && base.backends.is_empty() {
        // Every backend has weight 0: the Gateway API answers 500.
        base.direct_response = Some(crate::control::model::DirectResponseSpec {
            status: 500,
            body: String::new(),
        });
    }
    if let Some(t) = rule.timeouts.as_ref().and_then(|t| t.request.as_deref()) {
        base.timeout_ms = Some(parse_duration_ms(t)?);
    }
    let matches = if rule.matches.is_empty() {
        vec![RouteMatch::default()]
    } else {
        rule.matches.clone()
    };
    matches
        .iter()
        .map(|m| {
            let (matcher, precedence) = match flavour {
                Flavour::Http => http_match(m)?,
                Flavour::Grpc => grpc_match(m)?,
            };
            let route = RouteSpec {
                matcher,
                ..base.clone()
            };
            proxy_takes(&route)?;
            Ok(Converted { route, precedence })
        })
        .collect()
}

/// Refuses a rule the proxy would refuse: it would NACK the service's whole route
/// configuration for it, so one bad rule would take every route of the service down.
fn proxy_takes(route: &RouteSpec) -> Result<(), String> {
    let mut problems = Vec::new();
    for (what, h) in [
        ("RequestHeaderModifier", &route.request_headers),
        ("ResponseHeaderModifier", &route.response_headers),
    ] {
        if let Some(h) = h {
            crate::control::model::check_headers(what, h, &mut |m| problems.push(m));
        }
    }
    let m = &route.matcher;
    let regexes = m
        .regex
        .iter()
        .chain(m.headers.iter().filter_map(|h| h.regex.as_ref()))
        .chain(m.query.iter().filter_map(|q| q.regex.as_ref()));
    for re in regexes {
        if let Err(e) = regex_lite::Regex::new(re) {
            problems.push(format!("invalid regex {re:?}: {e}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

fn headers(m: Option<&HeaderModifier>) -> Result<HeadersSpec, String> {
    let m = m.ok_or("a header modifier filter without its configuration")?;
    let mut add = BTreeMap::new();
    for nv in m.set.iter().chain(&m.add) {
        add.insert(nv.name.to_ascii_lowercase(), nv.value.clone());
    }
    Ok(HeadersSpec {
        add,
        remove: m.remove.iter().map(|h| h.to_ascii_lowercase()).collect(),
    })
}

fn value_match(v: &ValueMatch) -> Result<KvMatchSpec, String> {
    let mut m = KvMatchSpec {
        name: v.name.to_ascii_lowercase(),
        ..Default::default()
    };
    match v.kind.as_deref().unwrap_or("Exact") {
        "Exact" => m.exact = Some(v.value.clone()),
        "RegularExpression" => m.regex = Some(v.value.clone()),
        other => return Err(format!("match type {other} is not supported")),
    }
    Ok(m)
}

fn http_match(m: &RouteMatch) -> Result<(MatchSpec, Precedence), String> {
    let mut out = MatchSpec::default();
    let mut p = Precedence {
        exact: false,
        prefix_len: 0,
        method: false,
        headers: m.headers.len(),
        query: m.query_params.len(),
    };
    let path = m.path.clone().unwrap_or_default();
    let value = path.value.unwrap_or_else(|| "/".into());
    match path.kind.as_deref().unwrap_or("PathPrefix") {
        "Exact" => {
            p.exact = true;
            out.path = Some(value);
        }
        "PathPrefix" => {
            // Gateway prefixes match whole segments: `/api` matches `/api` and `/api/x`,
            // not `/apix`.
            let trimmed = value.trim_end_matches('/');
            p.prefix_len = trimmed.len().max(1);
            if !trimmed.is_empty() {
                out.regex = Some(format!("{}(/.*)?", regex_escape(trimmed)));
            }
        }
        "RegularExpression" => out.regex = Some(value),
        other => return Err(format!("path match type {other} is not supported")),
    }
    for h in &m.headers {
        out.headers.push(value_match(h)?);
    }
    for q in &m.query_params {
        let mut k = value_match(q)?;
        k.name = q.name.clone();
        out.query.push(k);
    }
    if let Some(method) = &m.method {
        let method = method.as_str().ok_or("method must be a string")?;
        p.method = true;
        out.headers.push(KvMatchSpec {
            name: ":method".into(),
            exact: Some(method.to_owned()),
            ..Default::default()
        });
    }
    Ok((out, p))
}

fn grpc_match(m: &RouteMatch) -> Result<(MatchSpec, Precedence), String> {
    let mut out = MatchSpec::default();
    let mut p = Precedence {
        exact: false,
        prefix_len: 0,
        method: false,
        headers: m.headers.len(),
        query: 0,
    };
    if let Some(method) = &m.method {
        let field = |k: &str| method.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        let kind = field("type").unwrap_or_else(|| "Exact".into());
        let (service, name) = (field("service"), field("method"));
        match (kind.as_str(), service, name) {
            ("Exact", Some(s), Some(n)) => {
                p.exact = true;
                out.path = Some(format!("/{s}/{n}"));
            }
            ("Exact", Some(s), None) => {
                p.prefix_len = s.len() + 2;
                out.prefix = Some(format!("/{s}/"));
            }
            ("Exact", None, Some(n)) => {
                p.method = true;
                out.regex = Some(format!("/[^/]+/{}", regex_escape(&n)));
            }
            ("RegularExpression", s, n) => {
                p.method = true;
                out.regex = Some(format!(
                    "/{}/{}",
                    s.unwrap_or_else(|| "[^/]+".into()),
                    n.unwrap_or_else(|| "[^/]+".into())
                ));
            }
            (k, _, _) => return Err(format!("gRPC method match {k} needs a service or method")),
        }
    }
    for h in &m.headers {
        out.headers.push(value_match(h)?);
    }
    Ok((out, p))
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Gateway API durations: `1h`, `10s`, `500ms`, combinations like `1m30s`; `0s` disables.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let bad = || format!("timeout {s:?} is not a Gateway API duration (e.g. 10s, 500ms)");
    let mut total = 0u64;
    let mut rest = s;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('s') {
            (1000, 1)
        } else {
            return Err(bad());
        };
        total = total.saturating_add(n.saturating_mul(unit));
        rest = &rest[len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(yaml: &str) -> Rule {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("10s"), Ok(10_000));
        assert_eq!(parse_duration_ms("1m30s"), Ok(90_000));
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("0s"), Ok(0));
        assert!(parse_duration_ms("10").is_err());
        assert!(parse_duration_ms("s").is_err());
        assert!(parse_duration_ms("1d").is_err());
    }

    #[test]
    fn http_rule_with_matches_filters_weights_and_timeout() {
        let r = rule(
            "matches:\n- path: {type: PathPrefix, value: /api/}\n  headers: [{name: X-User, value: ann}]\n  method: GET\n\
             - path: {type: Exact, value: /health}\n\
             filters:\n- type: RequestHeaderModifier\n  requestHeaderModifier: {set: [{name: X-Via, value: mesh}], remove: [X-Debug]}\n\
             backendRefs:\n- {name: reviews-v1, port: 9080, weight: 90}\n- {name: reviews-v2, namespace: other, port: 9080, weight: 10}\n- {name: off, port: 1, weight: 0}\n\
             timeouts: {request: 2s}\n",
        );
        let out = convert_rule(Flavour::Http, "shop", "shop/reviews", 0, &r).unwrap();
        assert_eq!(out.len(), 2);
        let a = &out[0].route;
        assert_eq!(a.matcher.regex.as_deref(), Some("/api(/.*)?"));
        assert_eq!(a.matcher.headers[0].name, "x-user");
        assert_eq!(a.matcher.headers[1].name, ":method");
        assert_eq!(a.timeout_ms, Some(2000));
        assert_eq!(a.backends.len(), 2);
        assert_eq!(a.backends[0].service, "reviews-v1.shop");
        assert_eq!(a.backends[1].service, "reviews-v2.other");
        assert_eq!(a.request_headers.as_ref().unwrap().remove, vec!["x-debug"]);
        assert_eq!(out[1].route.matcher.path.as_deref(), Some("/health"));
        assert!(out[1].precedence > out[0].precedence, "exact before prefix");
    }

    #[test]
    fn unsupported_filters_and_backends_are_refused_with_a_reason() {
        let r = rule("filters: [{type: RequestMirror}]\n");
        let e = convert_rule(Flavour::Http, "a", "a/r", 0, &r)
            .err()
            .unwrap();
        assert!(e.contains("RequestMirror"), "{e}");
        let r = rule("backendRefs: [{group: example.com, kind: Bucket, name: b}]\n");
        assert!(convert_rule(Flavour::Http, "a", "a/r", 0, &r).is_err());
    }

    #[test]
    fn grpc_methods_become_paths() {
        let r = rule("matches:\n- method: {service: shop.Cart, method: Add}\n- method: {service: shop.Cart}\n");
        let out = convert_rule(Flavour::Grpc, "a", "a/r", 0, &r).unwrap();
        assert_eq!(out[0].route.matcher.path.as_deref(), Some("/shop.Cart/Add"));
        assert_eq!(out[1].route.matcher.prefix.as_deref(), Some("/shop.Cart/"));
    }

    #[test]
    fn only_core_service_parents_are_mesh_parents() {
        let p: ParentRef = serde_yaml::from_str("{group: '', kind: Service, name: r}").unwrap();
        assert!(p.is_service());
        let p: ParentRef = serde_yaml::from_str("{name: gw}").unwrap();
        assert!(!p.is_service());
    }
}
