//! Which virtual host, route and weighted cluster a request takes, and the request the
//! upstream gets (rewrites, header mutations, hop-by-hop headers removed).
//!
//! Matching follows Envoy's `RouteConfiguration` semantics: virtual hosts by domain (exact,
//! then the longest `*.suffix`, then the longest `prefix*`, then `*`), then the first route
//! whose path, header, query and gRPC matchers all hold.

use http::{
    header::{self, HeaderName},
    request, HeaderMap, HeaderValue, Method, Request, Uri, Version,
};

use crate::proxy::config::{
    Forward, HeaderMutation, PathMatch, Route, RouteConfig, RouteMatch, StringMatch,
    UpstreamProtocol, VirtualHost, WeightedCluster,
};

/// Headers that describe one hop's connection, never forwarded (RFC 9110 7.6.1; `te` is
/// kept as `te: trailers`, which gRPC needs end to end).
pub(super) const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "http2-settings",
];

/// The request's authority: the URI's (HTTP/2, absolute-form HTTP/1) or the `Host` header.
pub(super) fn authority<B>(req: &Request<B>) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}

fn strip_port(host: &str) -> Option<&str> {
    // The port: the digits after the last `:`, at least one (read from the end: a host
    // without a port costs a byte or two, not a search for its last `:`).
    let digits = host.bytes().rev().take_while(u8::is_ascii_digit).count();
    let colon = host.len().checked_sub(digits + 1)?;
    if digits == 0 || host.as_bytes()[colon] != b':' {
        return None;
    }
    // `[v6]:port` keeps its brackets; a bare IPv6 address has no port to strip.
    let h = &host[..colon];
    (!h.ends_with(':')).then_some(h)
}

/// Envoy's virtual host selection; `host` is compared case-insensitively. No allocation:
/// the domains are compared in place, ASCII case folded byte by byte (the usual table is
/// one `*` domain, which every request used to reach only after lowercasing the host and
/// each domain into new strings).
pub(super) fn virtual_host<'a>(rc: &'a RouteConfig, host: &str) -> Option<&'a VirtualHost> {
    // The host as given, then without its port.
    let candidates = [Some(host), strip_port(host)];
    let candidates = || candidates.iter().flatten();
    for h in candidates() {
        if let Some(v) = rc
            .virtual_hosts
            .iter()
            .find(|v| v.domains.iter().any(|d| d.eq_ignore_ascii_case(h)))
        {
            return Some(v);
        }
    }
    // Longest wildcard wins; a wildcard stands for at least one character.
    let best = |suffix: bool| -> Option<&'a VirtualHost> {
        let mut best: Option<(usize, &VirtualHost)> = None;
        for h in candidates() {
            let h = h.as_bytes();
            for v in &rc.virtual_hosts {
                for d in &v.domains {
                    let len = if suffix {
                        match d.strip_prefix('*').map(str::as_bytes) {
                            Some(s)
                                if !s.is_empty()
                                    && h.len() > s.len()
                                    && h[h.len() - s.len()..].eq_ignore_ascii_case(s) =>
                            {
                                s.len()
                            }
                            _ => continue,
                        }
                    } else {
                        match d.strip_suffix('*').map(str::as_bytes) {
                            Some(p)
                                if !p.is_empty()
                                    && h.len() > p.len()
                                    && h[..p.len()].eq_ignore_ascii_case(p) =>
                            {
                                p.len()
                            }
                            _ => continue,
                        }
                    };
                    if best.is_none_or(|(l, _)| len > l) {
                        best = Some((len, v));
                    }
                }
            }
            if best.is_some() {
                break;
            }
        }
        best.map(|(_, v)| v)
    };
    best(true).or_else(|| best(false)).or_else(|| {
        rc.virtual_hosts
            .iter()
            .find(|v| v.domains.iter().any(|d| d == "*"))
    })
}

/// The first route of `vhost` that matches.
pub(super) fn find<'a, B>(vhost: &'a VirtualHost, req: &Request<B>) -> Option<&'a Route> {
    vhost.routes.iter().find(|r| matches(&r.matcher, req))
}

fn starts_with(s: &str, prefix: &str, case_sensitive: bool) -> bool {
    if case_sensitive {
        s.starts_with(prefix)
    } else {
        s.len() >= prefix.len()
            && s.is_char_boundary(prefix.len())
            && s[..prefix.len()].eq_ignore_ascii_case(prefix)
    }
}

fn path_matches(m: &PathMatch, path: &str, case_sensitive: bool) -> bool {
    match m {
        PathMatch::Prefix(p) => starts_with(path, p, case_sensitive),
        PathMatch::Exact(p) if case_sensitive => path == p,
        PathMatch::Exact(p) => path.eq_ignore_ascii_case(p),
        // A search, checked to cover the whole path, so unanchored patterns behave like
        // Envoy's full match too.
        PathMatch::Regex(re) => re
            .find(path)
            .is_some_and(|m| m.start() == 0 && m.end() == path.len()),
        PathMatch::SeparatedPrefix(p) => {
            starts_with(path, p, case_sensitive)
                && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
        }
    }
}

pub(super) fn string_matches(m: &StringMatch, v: Option<&str>) -> bool {
    let fold = |s: &str, ic: bool| {
        if ic {
            s.to_ascii_lowercase()
        } else {
            s.to_owned()
        }
    };
    match (m, v) {
        (StringMatch::Present(want), v) => v.is_some() == *want,
        (_, None) => false,
        (StringMatch::Exact { value, ignore_case }, Some(v)) => {
            fold(v, *ignore_case) == fold(value, *ignore_case)
        }
        (StringMatch::Prefix { value, ignore_case }, Some(v)) => {
            fold(v, *ignore_case).starts_with(&fold(value, *ignore_case))
        }
        (StringMatch::Suffix { value, ignore_case }, Some(v)) => {
            fold(v, *ignore_case).ends_with(&fold(value, *ignore_case))
        }
        (StringMatch::Contains { value, ignore_case }, Some(v)) => {
            fold(v, *ignore_case).contains(&fold(value, *ignore_case))
        }
        (StringMatch::Regex(re), Some(v)) => re
            .find(v)
            .is_some_and(|m| m.start() == 0 && m.end() == v.len()),
    }
}

/// A header's value as Envoy matches it: pseudo-headers from the request line, repeated
/// headers joined with `,`.
fn header_value<B>(req: &Request<B>, name: &str) -> Option<String> {
    match name {
        ":authority" => authority(req).map(str::to_owned),
        ":method" => Some(req.method().as_str().to_owned()),
        ":path" => req.uri().path_and_query().map(|p| p.as_str().to_owned()),
        ":scheme" => Some(req.uri().scheme_str().unwrap_or("http").to_owned()),
        _ => {
            let mut vals = req.headers().get_all(name).iter();
            let first = vals.next()?;
            let mut s = String::from_utf8_lossy(first.as_bytes()).into_owned();
            for v in vals {
                s.push(',');
                s.push_str(&String::from_utf8_lossy(v.as_bytes()));
            }
            Some(s)
        }
    }
}

fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

pub(super) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

pub(super) fn matches<B>(m: &RouteMatch, req: &Request<B>) -> bool {
    path_matches(&m.path, req.uri().path(), m.case_sensitive)
        && (!m.grpc || is_grpc(req.headers()))
        && m.headers
            .iter()
            .all(|h| string_matches(&h.matcher, header_value(req, &h.name).as_deref()) != h.invert)
        && m.query.iter().all(|q| {
            string_matches(
                &q.matcher,
                req.uri().query().and_then(|s| query_param(s, &q.name)),
            )
        })
}

/// A weighted cluster, at random by weight.
pub(super) fn pick_weighted(fwd: &Forward) -> Option<&WeightedCluster> {
    if fwd.clusters.len() <= 1 || fwd.total_weight == 0 {
        return fwd.clusters.first();
    }
    let mut n = fastrand::u32(0..fwd.total_weight);
    for c in &fwd.clusters {
        if n < c.weight {
            return Some(c);
        }
        n -= c.weight;
    }
    fwd.clusters.last()
}

/// 64-bit FNV-1a with a final avalanche (murmur3's fmix64), so nearby inputs such as
/// `10.0.0.1:80_1` and `_2` land far apart on the ring.
pub(super) fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The ring-hash key of a request: its hash-policy headers combined in order as Envoy
/// does (rotate, xor); `None` when none is present (the balancer then picks at random).
pub(super) fn request_hash(names: &[String], headers: &HeaderMap) -> Option<u64> {
    let mut out: Option<u64> = None;
    for n in names {
        let mut vals = headers.get_all(n.as_str()).iter().peekable();
        if vals.peek().is_none() {
            continue;
        }
        let mut buf = Vec::new();
        for (i, v) in vals.enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            buf.extend_from_slice(v.as_bytes());
        }
        let h = hash64(&buf);
        out = Some(out.map_or(h, |o| o.rotate_left(1) ^ h));
    }
    out
}

/// Envoy order: removals, then additions; `append: false` replaces.
pub(super) fn apply_mutation(m: &HeaderMutation, headers: &mut HeaderMap) {
    for name in &m.remove {
        headers.remove(name.as_str());
    }
    for (name, value, append) in &m.add {
        // The translation validated names and values; anything unrepresentable is skipped
        // rather than failing the request.
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) else {
            continue;
        };
        if *append {
            headers.append(name, value);
        } else {
            headers.insert(name, value);
        }
    }
}

/// One of `HOP_BY_HOP` (a `match`: the compiler sorts the names by length, no loop of
/// comparisons per name).
fn is_hop_by_hop(k: &HeaderName) -> bool {
    let hop = matches!(
        k.as_str(),
        "connection"
            | "proxy-connection"
            | "keep-alive"
            | "transfer-encoding"
            | "upgrade"
            | "te"
            | "trailer"
            | "http2-settings"
    );
    debug_assert_eq!(hop, HOP_BY_HOP.contains(&k.as_str()));
    hop
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    // Most messages carry none: one pass over the few names present instead of a lookup
    // (and a name parse) per hop-by-hop name.
    let mut hop = headers.keys().filter(|k| is_hop_by_hop(k));
    let Some(first) = hop.next() else {
        return;
    };
    // gRPC's `te: trailers` and nothing else hop-by-hop: the message stays as it is (what
    // removing and putting back `te: trailers` would give), with no list built.
    if keep_te_trailers && *first == header::TE && hop.next().is_none() {
        let mut te = headers.get_all(header::TE).iter();
        if te.next().is_some_and(|v| v == "trailers") && te.next().is_none() {
            return;
        }
    }
    // The names the `Connection` header lists (tokens, any case).
    let listed = headers.get_all(header::CONNECTION);
    let tokens = || {
        listed
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
    };
    // Usually it lists only `keep-alive` or `upgrade`: names removed anyway; then no
    // other name is checked against the list.
    let lists_others =
        tokens().any(|t| !t.is_empty() && !HOP_BY_HOP.iter().any(|h| t.eq_ignore_ascii_case(h)));
    let named = |k: &HeaderName| tokens().any(|t| t.eq_ignore_ascii_case(k.as_str()));
    // Only the names present are removed, by name (no parse of a name that is not
    // there): a response with `Connection: keep-alive` costs one or two removals. The
    // names are distinct, so without others listed they fit on the stack (no `Vec`).
    let mut few: [Option<HeaderName>; HOP_BY_HOP.len()] = Default::default();
    let mut doomed = Vec::new();
    if lists_others {
        doomed.extend(
            headers
                .keys()
                .filter(|k| is_hop_by_hop(k) || named(k))
                .cloned(),
        );
    } else {
        for (slot, k) in few
            .iter_mut()
            .zip(headers.keys().filter(|k| is_hop_by_hop(k)))
        {
            *slot = Some(k.clone());
        }
    }
    let trailers = keep_te_trailers
        && headers.get_all(header::TE).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.to_ascii_lowercase().contains("trailers"))
        });
    for n in few.iter().flatten().chain(&doomed) {
        headers.remove(n);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// What every try of a forwarded request sends, minus the body.
#[derive(Debug, Clone)]
pub(super) struct Upstream {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
}

impl Upstream {
    pub fn request<B>(&self, body: B) -> Request<B> {
        let mut r = Request::new(body);
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        r
    }

    /// The request of the last try: the head moves into it instead of being copied.
    pub fn take_request<B>(&mut self, body: B) -> Request<B> {
        let mut r = Request::new(body);
        *r.method_mut() = std::mem::take(&mut self.method);
        *r.uri_mut() = std::mem::take(&mut self.uri);
        *r.version_mut() = self.version;
        *r.headers_mut() = std::mem::take(&mut self.headers);
        r
    }
}

/// Builds the upstream request head: rewrites, then the header mutations in Envoy's order
/// (`levels` from the most specific: weighted cluster, route, virtual host, route config,
/// so the least specific level has the last word on replaced values).
pub(super) fn upstream(
    parts: request::Parts,
    route: &Route,
    fwd: &Forward,
    levels: [&HeaderMutation; 4],
    protocol: UpstreamProtocol,
) -> Upstream {
    let request::Parts {
        method,
        uri,
        mut headers,
        ..
    } = parts;
    // HTTP/1.1 in and out, nothing rewritten: the origin-form URI and the `Host` value go
    // on as they came (the same result as below, without building and parsing them again).
    let host = headers.get(header::HOST).filter(|h| h.to_str().is_ok());
    if protocol == UpstreamProtocol::Http1
        && fwd.host_rewrite.is_none()
        && fwd.prefix_rewrite.is_none()
        && uri.scheme().is_none()
        && uri.authority().is_none()
        && uri.path().starts_with('/')
        && host.is_some()
    {
        strip_hop_by_hop(&mut headers, true);
        // Without mutations (the common case) `Host` stays where it is.
        if levels
            .iter()
            .any(|m| !m.add.is_empty() || !m.remove.is_empty())
        {
            let host = headers.remove(header::HOST);
            for m in levels {
                apply_mutation(m, &mut headers);
            }
            if let Some(h) = host {
                headers.insert(header::HOST, h);
            }
        }
        return Upstream {
            method,
            uri,
            version: Version::HTTP_11,
            headers,
        };
    }
    // HTTP/2 in and out, nothing rewritten: the absolute URI hyper's HTTP/2 server built
    // from `:scheme`, `:authority` and `:path` is the one the formatting below would build
    // and parse again.
    if protocol == UpstreamProtocol::Http2
        && fwd.host_rewrite.is_none()
        && fwd.prefix_rewrite.is_none()
        && uri.scheme_str() == Some("http")
        && uri.authority().is_some()
        && uri.path().starts_with('/')
    {
        strip_hop_by_hop(&mut headers, true);
        headers.remove(header::HOST);
        for m in levels {
            apply_mutation(m, &mut headers);
        }
        return Upstream {
            method,
            uri,
            version: Version::HTTP_2,
            headers,
        };
    }
    let authority = fwd.host_rewrite.clone().or_else(|| {
        uri.authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| headers.get(header::HOST)?.to_str().ok().map(str::to_owned))
    });
    let authority = authority.unwrap_or_else(|| "unknown".to_owned());
    let path = uri.path();
    let mut path_and_query = match (&fwd.prefix_rewrite, &route.matcher.path) {
        (Some(rw), PathMatch::Prefix(p) | PathMatch::SeparatedPrefix(p))
            if path.len() >= p.len() && path.is_char_boundary(p.len()) =>
        {
            format!("{rw}{}", &path[p.len()..])
        }
        (Some(rw), PathMatch::Exact(_)) => rw.clone(),
        _ => path.to_owned(),
    };
    if !path_and_query.starts_with('/') {
        path_and_query.insert(0, '/');
    }
    if let Some(q) = uri.query() {
        path_and_query.push('?');
        path_and_query.push_str(q);
    }
    strip_hop_by_hop(&mut headers, true);
    headers.remove(header::HOST);
    for m in levels {
        apply_mutation(m, &mut headers);
    }
    let (uri, version) = match protocol {
        UpstreamProtocol::Http1 => {
            if let Ok(v) = HeaderValue::from_str(&authority) {
                headers.insert(header::HOST, v);
            }
            (path_and_query.parse(), Version::HTTP_11)
        }
        // h2 carries the authority in `:authority`, taken from an absolute URI.
        UpstreamProtocol::Http2 => (
            format!("http://{authority}{path_and_query}").parse(),
            Version::HTTP_2,
        ),
    };
    Upstream {
        method,
        uri: uri.unwrap_or_else(|_| Uri::from_static("/")),
        version,
        headers,
    }
}

/// Upgrade protocols never spliced: `h2c` would carry the requests after it past routing
/// and per-request policy (RFC 9113 drops it too; it is answered over HTTP/1.1).
const NOT_SPLICED: [&str; 1] = ["h2c"];

/// The protocols an HTTP/1.1 request asks to switch to (RFC 9110 7.8) and the engine
/// passes on: `Connection` names `upgrade` and `Upgrade` offers at least one protocol
/// besides those of `NOT_SPLICED` (which are left out). None: an ordinary request, its
/// `Upgrade` removed with the other hop-by-hop headers.
pub(super) fn upgrade_offered(headers: &HeaderMap, version: Version) -> Option<HeaderValue> {
    // The common case costs one lookup.
    if version != Version::HTTP_11 || !headers.contains_key(header::UPGRADE) {
        return None;
    }
    if !tokens(headers, header::CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade")) {
        return None;
    }
    let offered: Vec<&str> = tokens(headers, header::UPGRADE)
        .filter(|p| {
            !NOT_SPLICED
                .iter()
                .any(|n| protocol_name(p).eq_ignore_ascii_case(n))
        })
        .collect();
    if offered.is_empty() {
        return None;
    }
    HeaderValue::from_str(&offered.join(", ")).ok()
}

/// The protocol a `101` switched to, if it is one `offered` (by name and version, any
/// case): exactly one protocol. None: a switch nobody asked for, never passed on.
pub(super) fn upgrade_switched(headers: &HeaderMap, offered: &HeaderValue) -> Option<HeaderValue> {
    let mut chosen = tokens(headers, header::UPGRADE);
    let (Some(p), None) = (chosen.next(), chosen.next()) else {
        return None;
    };
    let offered = offered.to_str().ok()?;
    offered
        .split(',')
        .any(|o| o.trim().eq_ignore_ascii_case(p))
        .then(|| HeaderValue::from_str(p).ok())
        .flatten()
}

/// Puts back the hop-by-hop headers of an upgrade (`strip_hop_by_hop` removed them): the
/// upgrade request's, toward the upstream, and the `101`'s, toward the client.
pub(super) fn keep_upgrade(headers: &mut HeaderMap, protocols: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocols);
}

/// The comma-separated, trimmed, non-empty tokens of every `name` value.
fn tokens(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// `name` of a `name/version` protocol.
fn protocol_name(p: &str) -> &str {
    p.split('/').next().unwrap_or(p).trim()
}

/// `Location` of a redirect: the new host and/or path, the rest as requested.
pub(super) fn redirect_location<B>(
    req: &Request<B>,
    host: Option<&str>,
    path: Option<&str>,
) -> String {
    let host = host.or_else(|| authority(req)).unwrap_or("");
    let path = match path {
        Some(p) if p.contains('?') => p.to_owned(),
        Some(p) => match req.uri().query() {
            Some(q) => format!("{p}?{q}"),
            None => p.to_owned(),
        },
        None => req
            .uri()
            .path_and_query()
            .map_or("/".to_owned(), |p| p.as_str().to_owned()),
    };
    format!("http://{host}{path}")
}

#[cfg(test)]
mod tests {
    use regex_lite::Regex;

    use super::*;
    use crate::proxy::config::{HeaderMatch, QueryMatch, RouteAction};

    fn vh(name: &str, domains: &[&str]) -> VirtualHost {
        VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| (*d).into()).collect(),
            routes: vec![],
            request_headers: HeaderMutation::default(),
            response_headers: HeaderMutation::default(),
            retry_policy: None,
            rate_limit: None,
        }
    }

    fn rc(vhosts: Vec<VirtualHost>) -> RouteConfig {
        RouteConfig {
            name: "rc".into(),
            virtual_hosts: vhosts,
            request_headers: HeaderMutation::default(),
            response_headers: HeaderMutation::default(),
        }
    }

    fn m(path: PathMatch) -> RouteMatch {
        RouteMatch {
            path,
            case_sensitive: true,
            headers: vec![],
            query: vec![],
            grpc: false,
        }
    }

    /// A route of `prefix` that answers itself (`upstream` reads only its rewrites and
    /// mutations, not its action).
    fn respond_route(prefix: &str) -> Route {
        Route {
            name: "r".into(),
            matcher: m(PathMatch::Prefix(prefix.into())),
            action: RouteAction::Respond {
                status: 200,
                body: String::new(),
            },
            request_headers: HeaderMutation::default(),
            response_headers: HeaderMutation::default(),
            rate_limit: None,
            fault: None,
        }
    }

    fn req(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn virtual_hosts_follow_envoy_domain_order() {
        let rc = rc(vec![
            vh("any", &["*"]),
            vh("prefix", &["api.*"]),
            vh("short", &["*.com"]),
            vh("long", &["*.example.com"]),
            vh("exact", &["www.example.com", "svc:8080"]),
        ]);
        let pick = |h: &str| virtual_host(&rc, h).map(|v| v.name.as_str());
        assert_eq!(pick("www.example.com"), Some("exact"));
        assert_eq!(pick("WWW.Example.com:80"), Some("exact"), "port stripped");
        assert_eq!(pick("svc:8080"), Some("exact"), "port kept when written");
        assert_eq!(pick("a.example.com"), Some("long"));
        assert_eq!(pick("a.other.com"), Some("short"));
        assert_eq!(pick("api.internal"), Some("prefix"));
        // Wildcards fold case too, with or without the port (no lowercased copies).
        assert_eq!(pick("A.EXAMPLE.Com:8080"), Some("long"));
        assert_eq!(pick("API.Internal"), Some("prefix"));
        let upper = super::tests::rc(vec![vh("u", &["*.Example.COM"]), vh("p", &["API.*"])]);
        let pick_u = |h: &str| virtual_host(&upper, h).map(|v| v.name.as_str());
        assert_eq!(pick_u("a.example.com"), Some("u"));
        assert_eq!(pick_u("api.x"), Some("p"));
        assert_eq!(pick("example.com"), Some("short"), "suffix wildcard");
        assert_eq!(
            pick(".com"),
            Some("any"),
            "a wildcard stands for one char at least"
        );
        assert_eq!(pick("elsewhere"), Some("any"));
        let none = super::tests::rc(vec![vh("x", &["x"])]);
        assert!(virtual_host(&none, "y").is_none());
    }

    #[test]
    fn a_port_is_the_digits_after_the_last_colon() {
        // What `rsplit_once(':')` and a digits check said, read from the end instead.
        fn reference(host: &str) -> Option<&str> {
            let (h, port) = host.rsplit_once(':')?;
            (!port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':'))
                .then_some(h)
        }
        for host in [
            "svc",
            "svc:80",
            "svc:",
            ":80",
            "80",
            "",
            ":",
            "a:8x0",
            "a:x80",
            "a:80x",
            "a::80",
            "::1",
            "[::1]",
            "[::1]:8080",
            "[::1]:",
            "10.96.206.1",
            "10.96.206.1:80",
            "a:b:80",
            "a.b:0",
            "a:٣",
        ] {
            assert_eq!(strip_port(host), reference(host), "{host:?}");
        }
    }

    #[test]
    fn path_matchers() {
        let r = req("/api/v1?x=1", &[]);
        assert!(matches(&m(PathMatch::Prefix("/api".into())), &r));
        assert!(!matches(&m(PathMatch::Prefix("/API".into())), &r));
        let mut ci = m(PathMatch::Prefix("/API".into()));
        ci.case_sensitive = false;
        assert!(matches(&ci, &r));
        assert!(matches(&m(PathMatch::Exact("/api/v1".into())), &r));
        assert!(!matches(&m(PathMatch::Exact("/api".into())), &r));
        assert!(matches(
            &m(PathMatch::Regex(Regex::new("/api/v[0-9]").unwrap())),
            &r
        ));
        assert!(
            !matches(&m(PathMatch::Regex(Regex::new("/api").unwrap())), &r),
            "full match"
        );
        assert!(matches(&m(PathMatch::SeparatedPrefix("/api".into())), &r));
        assert!(matches(
            &m(PathMatch::SeparatedPrefix("/api/v1".into())),
            &r
        ));
        assert!(!matches(&m(PathMatch::SeparatedPrefix("/ap".into())), &r));
    }

    #[test]
    fn header_query_and_grpc_matchers() {
        let mut rm = m(PathMatch::Prefix("/".into()));
        rm.headers = vec![
            HeaderMatch {
                name: "x-env".into(),
                matcher: StringMatch::Exact {
                    value: "CANARY".into(),
                    ignore_case: true,
                },
                invert: false,
            },
            HeaderMatch {
                name: "x-debug".into(),
                matcher: StringMatch::Present(true),
                invert: true,
            },
            HeaderMatch {
                name: ":method".into(),
                matcher: StringMatch::Exact {
                    value: "GET".into(),
                    ignore_case: false,
                },
                invert: false,
            },
        ];
        rm.query = vec![QueryMatch {
            name: "v".into(),
            matcher: StringMatch::Prefix {
                value: "2".into(),
                ignore_case: false,
            },
        }];
        assert!(matches(&rm, &req("/x?a=1&v=2.1", &[("x-env", "canary")])));
        assert!(!matches(&rm, &req("/x?v=1", &[("x-env", "canary")])));
        assert!(!matches(&rm, &req("/x?v=2", &[("x-env", "prod")])));
        assert!(!matches(
            &rm,
            &req("/x?v=2", &[("x-env", "canary"), ("x-debug", "1")])
        ));
        let mut g = m(PathMatch::Prefix("/".into()));
        g.grpc = true;
        assert!(matches(
            &g,
            &req("/svc/M", &[("content-type", "application/grpc+proto")])
        ));
        assert!(!matches(
            &g,
            &req("/svc/M", &[("content-type", "text/plain")])
        ));
        // Repeated headers match as one comma-joined value.
        let mut rep = m(PathMatch::Prefix("/".into()));
        rep.headers = vec![HeaderMatch {
            name: "x-a".into(),
            matcher: StringMatch::Exact {
                value: "1,2".into(),
                ignore_case: false,
            },
            invert: false,
        }];
        assert!(matches(&rep, &req("/", &[("x-a", "1"), ("x-a", "2")])));
    }

    #[test]
    fn rewrites_and_mutations_in_envoy_order() {
        let fwd = Forward {
            clusters: vec![],
            total_weight: 1,
            timeout: None,
            retry_policy: None,
            hash_headers: vec![],
            prefix_rewrite: Some("/v2/".into()),
            host_rewrite: Some("backend.internal".into()),
        };
        let route = respond_route("/api/");
        let most = HeaderMutation {
            add: vec![("x-level".into(), "cluster".into(), false)],
            remove: vec!["x-secret".into()],
        };
        let least = HeaderMutation {
            add: vec![
                ("x-level".into(), "config".into(), false),
                ("x-multi".into(), "b".into(), true),
            ],
            remove: vec![],
        };
        let none = HeaderMutation::default();
        let r = req(
            "/api/users?id=7",
            &[
                ("host", "front:80"),
                ("x-secret", "s"),
                ("x-multi", "a"),
                ("connection", "keep-alive, x-hop"),
                ("x-hop", "1"),
                ("te", "trailers"),
            ],
        );
        let (parts, ()) = r.into_parts();
        let up = upstream(
            parts.clone(),
            &route,
            &fwd,
            [&most, &none, &none, &least],
            UpstreamProtocol::Http1,
        );
        assert_eq!(up.uri, "/v2/users?id=7");
        assert_eq!(up.headers["host"], "backend.internal");
        assert_eq!(up.headers["x-level"], "config", "least specific level wins");
        let multi: Vec<_> = up.headers.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["a", "b"]);
        assert!(up.headers.get("x-secret").is_none());
        assert!(up.headers.get("x-hop").is_none() && up.headers.get("connection").is_none());
        assert_eq!(up.headers["te"], "trailers");
        let h2 = upstream(parts, &route, &fwd, [&none; 4], UpstreamProtocol::Http2);
        assert_eq!(h2.uri, "http://backend.internal/v2/users?id=7");
        assert!(h2.headers.get("host").is_none());
    }

    #[test]
    fn http2_without_rewrites_keeps_the_absolute_uri_as_the_general_path_builds_it() {
        let fwd = |prefix: Option<&str>| Forward {
            clusters: vec![],
            total_weight: 1,
            timeout: None,
            retry_policy: None,
            hash_headers: vec![],
            prefix_rewrite: prefix.map(Into::into),
            host_rewrite: None,
        };
        let route = respond_route("/");
        let add = HeaderMutation {
            add: vec![("x-added".into(), "1".into(), false)],
            remove: vec!["x-secret".into()],
        };
        let none = HeaderMutation::default();
        for uri in [
            "http://svc.ns:8080/bench.Echo/Call",
            "http://user@svc/a/b?x=1&y=%20",
            "http://svc/",
        ] {
            let r = req(
                uri,
                &[
                    ("host", "other"),
                    ("te", "trailers"),
                    ("x-secret", "s"),
                    ("content-type", "application/grpc"),
                ],
            );
            let (parts, ()) = r.into_parts();
            // The fast path (absolute http URI, nothing rewritten) against the general one
            // (a prefix rewrite of "/" to "/" changes nothing but takes the long way).
            let fast = upstream(
                parts.clone(),
                &route,
                &fwd(None),
                [&add, &none, &none, &none],
                UpstreamProtocol::Http2,
            );
            let long = upstream(
                parts,
                &route,
                &fwd(Some("/")),
                [&add, &none, &none, &none],
                UpstreamProtocol::Http2,
            );
            assert_eq!(fast.uri, long.uri, "{uri}");
            assert_eq!(fast.uri.to_string(), uri);
            assert_eq!(fast.version, Version::HTTP_2);
            assert_eq!(fast.headers, long.headers, "{uri}");
            assert!(fast.headers.get("host").is_none());
            assert!(fast.headers.get("x-secret").is_none());
            assert_eq!(fast.headers["x-added"], "1");
            assert_eq!(fast.headers["te"], "trailers");
        }
    }

    #[test]
    fn te_trailers_alone_stays_and_other_te_values_become_trailers_or_go() {
        for (te, want) in [
            (&["trailers"][..], Some("trailers")),
            (&["Trailers"][..], Some("trailers")),
            (&["trailers, deflate"][..], Some("trailers")),
            (&["trailers", "trailers"][..], Some("trailers")),
            (&["deflate"][..], None),
        ] {
            let mut h = HeaderMap::new();
            h.insert("content-type", HeaderValue::from_static("application/grpc"));
            for v in te {
                h.append(header::TE, HeaderValue::from_static(v));
            }
            strip_hop_by_hop(&mut h, true);
            let got: Vec<_> = h.get_all(header::TE).iter().collect();
            assert_eq!(got.first().map(|v| v.to_str().unwrap()), want, "{te:?}");
            assert!(got.len() <= 1, "{te:?}: {got:?}");
            assert_eq!(h["content-type"], "application/grpc");
            let mut h = HeaderMap::new();
            for v in te {
                h.append(header::TE, HeaderValue::from_static(v));
            }
            strip_hop_by_hop(&mut h, false);
            assert!(h.get(header::TE).is_none(), "{te:?}: no trailers asked for");
        }
    }

    #[test]
    fn ring_hash_keys_are_stable_and_combine_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(request_hash(&["x-user".into()], &h), None);
        h.insert("x-user", HeaderValue::from_static("alice"));
        let a = request_hash(&["x-user".into()], &h);
        assert_eq!(a, request_hash(&["x-user".into()], &h));
        h.insert("x-user", HeaderValue::from_static("bob"));
        assert_ne!(a, request_hash(&["x-user".into()], &h));
        h.insert("x-tenant", HeaderValue::from_static("t"));
        assert_ne!(
            request_hash(&["x-user".into()], &h),
            request_hash(&["x-user".into(), "x-tenant".into()], &h)
        );
    }

    #[test]
    fn redirect_keeps_what_it_does_not_replace() {
        let r = req("/old?q=1", &[("host", "a.example")]);
        assert_eq!(
            redirect_location(&r, Some("b.example"), None),
            "http://b.example/old?q=1"
        );
        assert_eq!(
            redirect_location(&r, None, Some("/new")),
            "http://a.example/new?q=1"
        );
    }

    #[test]
    fn hop_by_hop_headers_and_the_names_connection_lists_go() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("host", "a.example"),
            ("content-type", "text/plain"),
            ("connection", "Keep-Alive, X-Private ,"),
            ("connection", "upgrade"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("x-other", "2"),
            ("upgrade", "websocket"),
            ("te", "Trailers, gzip"),
            ("trailer", "grpc-status"),
            ("proxy-connection", "close"),
        ] {
            h.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        let mut kept = h.clone();
        strip_hop_by_hop(&mut kept, true);
        let mut names: Vec<_> = kept.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-type", "host", "te", "x-other"]);
        assert_eq!(kept.get_all(header::TE).iter().count(), 1);
        assert_eq!(kept[header::TE], "trailers");
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-type", "host", "x-other"]);
        // A list of hop-by-hop names only (the usual `keep-alive`): those go, the others
        // stay.
        let mut ka = HeaderMap::new();
        ka.insert(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        ka.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        ka.insert("x-private", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut ka, false);
        assert_eq!(
            ka.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["x-private"]
        );
        // Nothing hop-by-hop: untouched.
        let mut plain = HeaderMap::new();
        plain.insert(header::HOST, HeaderValue::from_static("a"));
        strip_hop_by_hop(&mut plain, false);
        assert_eq!(plain.len(), 1);
    }

    fn heads(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn an_upgrade_is_offered_only_with_connection_upgrade_on_http11_and_never_h2c() {
        let h11 = Version::HTTP_11;
        for (pairs, version, want) in [
            (
                &[("connection", "Upgrade"), ("upgrade", "websocket")][..],
                h11,
                Some("websocket"),
            ),
            (
                &[
                    ("connection", "keep-alive, upgrade"),
                    ("upgrade", "echo-proto"),
                ][..],
                h11,
                Some("echo-proto"),
            ),
            (
                &[("connection", "upgrade"), ("upgrade", "h2c, websocket/13")][..],
                h11,
                Some("websocket/13"),
            ),
            (
                &[
                    ("connection", "upgrade"),
                    ("upgrade", "a"),
                    ("upgrade", "b/2"),
                ][..],
                h11,
                Some("a, b/2"),
            ),
            (
                &[("connection", "upgrade"), ("upgrade", "H2C")][..],
                h11,
                None,
            ),
            (
                &[
                    ("connection", "upgrade, http2-settings"),
                    ("upgrade", "h2c"),
                ][..],
                h11,
                None,
            ),
            (&[("upgrade", "websocket")][..], h11, None),
            (
                &[("connection", "keep-alive"), ("upgrade", "websocket")][..],
                h11,
                None,
            ),
            (&[("connection", "upgrade")][..], h11, None),
            (
                &[("connection", "upgrade"), ("upgrade", " , ")][..],
                h11,
                None,
            ),
            (
                &[("connection", "upgrade"), ("upgrade", "websocket")][..],
                Version::HTTP_10,
                None,
            ),
            (
                &[("connection", "upgrade"), ("upgrade", "websocket")][..],
                Version::HTTP_2,
                None,
            ),
        ] {
            let got = upgrade_offered(&heads(pairs), version);
            assert_eq!(
                got.as_ref().map(|v| v.to_str().unwrap()),
                want,
                "{pairs:?} {version:?}"
            );
        }
    }

    #[test]
    fn a_switch_must_name_one_offered_protocol() {
        let offered = HeaderValue::from_static("websocket/13, echo-proto");
        for (pairs, want) in [
            (&[("upgrade", "echo-proto")][..], Some("echo-proto")),
            (&[("upgrade", "WebSocket/13")][..], Some("WebSocket/13")),
            (&[("upgrade", "websocket")][..], None),
            (&[("upgrade", "h2c")][..], None),
            (&[("upgrade", "echo-proto, websocket/13")][..], None),
            (
                &[("upgrade", "echo-proto"), ("upgrade", "echo-proto")][..],
                None,
            ),
            (&[][..], None),
        ] {
            let got = upgrade_switched(&heads(pairs), &offered);
            assert_eq!(got.as_ref().map(|v| v.to_str().unwrap()), want, "{pairs:?}");
        }
    }

    #[test]
    fn an_upgrade_request_keeps_its_upgrade_headers_and_loses_the_other_hop_by_hop_ones() {
        let mut h = heads(&[
            ("host", "a.example"),
            ("connection", "Upgrade, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("upgrade", "h2c, echo-proto"),
            ("sec-websocket-key", "k"),
        ]);
        let offered = upgrade_offered(&h, Version::HTTP_11).unwrap();
        strip_hop_by_hop(&mut h, true);
        keep_upgrade(&mut h, offered);
        let mut names: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["connection", "host", "sec-websocket-key", "upgrade"]
        );
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "echo-proto");
    }
}
