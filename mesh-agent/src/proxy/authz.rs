//! Authorization: Istio AuthorizationPolicy and PeerAuthentication semantics, evaluated at
//! the destination's node proxy against the policies in force (`config::policy`).
//!
//! - PeerAuthentication first: a connection without mTLS to a port whose mode is STRICT
//!   is refused. Mode precedence: the workload's selector-based policy (its port-level
//!   mode, then its own) > its namespace's > the mesh-wide one (root namespace, no
//!   selector) > PERMISSIVE; UNSET inherits.
//! - AUDIT policies that match are logged (target `mesh_agent::authz`), never refuse.
//! - DENY policies next: any match refuses.
//! - Then ALLOW: if any ALLOW policy applies to the workload, the connection must match
//!   one; if none applies, it is allowed.
//! - CUSTOM is not supported: the file check refuses it and the xDS client NACKs an
//!   unknown action, so it never reaches evaluation.
//!
//! Matching, as Istio: `namespaces` are the source identity's namespace; `principals`
//! are SPIFFE IDs without `spiffe://` (`cluster.local/ns/a/sa/b`), `*` alone meaning any
//! authenticated source, `prefix*` and `*suffix` wildcards; a source without identity
//! (plain text) matches no positive principal or namespace and every `not` form.
//!
//! Rules with HTTP attributes (methods, paths, hosts, `request.headers`) can only be
//! evaluated per request. A port where such a rule may apply answers `needs_http`: the
//! proxy then terminates HTTP there and calls `authorize_request` for every request
//! (which evaluates everything, L4 and L7) instead of `authorize`. Where the proxy only
//! sees the connection (`authorize`), Istio's rule for ztunnel applies
//! (istio.io, "Use Layer 4 security policy": policies with L7 attributes fail closed at
//! an L4-only enforcement point): in an ALLOW policy a rule with HTTP attributes matches
//! nothing; in a DENY (or AUDIT) policy its HTTP attributes are left out, so the rule
//! refuses every connection its L4 attributes match.
//!
//! Evaluation allocates nothing: principals are compared piecewise against the identity's
//! parts, hosts without regard to case in place, verdicts name policies by a shared
//! `Arc<str>`.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tracing::info;

use super::config::{
    policy::{Action, Match, MtlsMode, PeerAuthn, Policies, Policy, Rule, Scope, StrMatch},
    workloads::WorkloadInfo,
};
use crate::identity::SpiffeId;

/// Where a tunnelled connection's source address (`ConnCtx::src_ip`: ipBlocks,
/// `source.ip`, access logs) came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceOrigin {
    /// The CONNECT named no source: the tunnel's own peer address (the sending node).
    Peer,
    /// The CONNECT's `Forwarded: for=`, believed: a workload at that address has the
    /// peer certificate's identity.
    Forwarded,
    /// The CONNECT named an address no workload of the peer's identity has: not believed,
    /// the peer address is used (counted and logged by the caller).
    Untrusted,
}

/// The source address a tunnelled connection is judged by. The sending agent names the
/// source pod's address (`Forwarded: for=`); it is believed only if the configuration in
/// force has a workload at that address whose identity is the one the peer proved with
/// its certificate, so a node can claim only addresses of identities it holds keys for
/// (which it could act as anyway). Anything else falls back to the peer's address.
pub fn tunnel_source(
    workloads: &super::config::workloads::WorkloadIndex,
    peer_identity: &SpiffeId,
    peer_addr: IpAddr,
    forwarded: Option<IpAddr>,
) -> (IpAddr, SourceOrigin) {
    let Some(claimed) = forwarded else {
        return (peer_addr, SourceOrigin::Peer);
    };
    match workloads.by_ip(claimed) {
        Some(w) if w.identity == *peer_identity => (claimed, SourceOrigin::Forwarded),
        _ => (peer_addr, SourceOrigin::Untrusted),
    }
}

/// A connection as the destination's proxy sees it.
#[derive(Debug, Clone, Copy)]
pub struct ConnCtx<'a> {
    pub src_ip: IpAddr,
    /// The peer's verified identity (mTLS); `None`: plain text.
    pub src_identity: Option<&'a SpiffeId>,
    pub dst: &'a WorkloadInfo,
    /// The address dialled (one of `dst.ips`).
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    /// Arrived over mutual TLS (HBONE).
    pub tls: bool,
}

impl<'a> ConnCtx<'a> {
    /// A connection from `src_ip` to `dst` at `dst_addr`; over mutual TLS exactly when
    /// the peer's identity was verified (`src_identity`).
    pub fn new(
        src_ip: IpAddr,
        src_identity: Option<&'a SpiffeId>,
        dst: &'a WorkloadInfo,
        dst_addr: SocketAddr,
    ) -> ConnCtx<'a> {
        ConnCtx {
            src_ip,
            src_identity,
            dst,
            dst_ip: dst_addr.ip(),
            dst_port: dst_addr.port(),
            tls: src_identity.is_some(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No ALLOW policy applies and nothing denied.
    NoPolicy,
    /// An ALLOW policy matched (`policy_name`).
    Allowed,
    /// A DENY policy matched (`policy_name`).
    Denied,
    /// ALLOW policies apply and none matched (`policy_name`: the first of them).
    NoAllowMatch,
    /// The port's mTLS mode is STRICT and the connection is plain text (`policy_name`:
    /// the PeerAuthentication).
    MtlsRequired,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoPolicy => "no policy applies",
            Reason::Allowed => "allowed by an ALLOW policy",
            Reason::Denied => "denied by a DENY policy",
            Reason::NoAllowMatch => "ALLOW policies apply and none matched",
            Reason::MtlsRequired => "mutual TLS is required (PeerAuthentication STRICT)",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// The deciding policy, `namespace/name`.
    pub policy_name: Option<Arc<str>>,
    pub reason: Reason,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason.as_str())?;
        if let Some(p) = &self.policy_name {
            write!(f, " ({p})")?;
        }
        Ok(())
    }
}

/// The mTLS mode in force for a workload's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mtls {
    Strict,
    Permissive,
    Disable,
}

/// The connection-level check (see the module documentation for rules with HTTP
/// attributes: on ports where `needs_http` is true, use `authorize_request` instead).
pub fn authorize(p: &Policies, ctx: &ConnCtx<'_>) -> Verdict {
    evaluate(p, ctx, None)
}

/// The check of one request on a connection whose HTTP the proxy terminates: every
/// attribute, L4 and L7.
pub fn authorize_request(p: &Policies, ctx: &ConnCtx<'_>, req: &http::request::Parts) -> Verdict {
    evaluate(p, ctx, Some(req))
}

/// Whether a policy that applies to `w` has a rule with HTTP attributes that may apply
/// on `port`: the proxy must then terminate HTTP on that port and authorize requests.
pub fn needs_http(p: &Policies, w: &WorkloadInfo, port: u16) -> bool {
    applicable(p, w).any(|pol| {
        pol.rules.iter().any(|r| {
            r.has_l7
                && r.clauses
                    .iter()
                    .all(|c| c.matches.iter().any(|m| m.admits_port(port)))
        })
    })
}

/// The mTLS mode in force for `w`'s `port`.
pub fn mtls_mode(p: &Policies, w: &WorkloadInfo, port: u16) -> Mtls {
    mtls_with_source(p, w, port).0
}

fn resolved(m: MtlsMode) -> Option<Mtls> {
    match m {
        MtlsMode::Unset => None,
        MtlsMode::Disable => Some(Mtls::Disable),
        MtlsMode::Permissive => Some(Mtls::Permissive),
        MtlsMode::Strict => Some(Mtls::Strict),
    }
}

fn mtls_with_source<'p>(
    p: &'p Policies,
    w: &WorkloadInfo,
    port: u16,
) -> (Mtls, Option<&'p Arc<PeerAuthn>>) {
    // The first selector-based policy naming the workload (sorted by key) decides at the
    // workload level, as Istio lets one (the oldest) decide.
    let own = w
        .peer_authentications
        .iter()
        .filter_map(|k| p.peer_authentications.get(k))
        .find(|pa| pa.scope == Scope::WorkloadSelector);
    if let Some(pa) = own {
        let port_mode = pa.port_level.get(&port).copied().and_then(resolved);
        if let Some(m) = port_mode.or_else(|| resolved(pa.mode)) {
            return (m, Some(pa));
        }
    }
    if let Some(pa) = p.namespace_peer.get(w.namespace.as_str()) {
        if let Some(m) = resolved(pa.mode) {
            return (m, Some(pa));
        }
    }
    if let Some(pa) = &p.mesh_peer {
        if let Some(m) = resolved(pa.mode) {
            return (m, Some(pa));
        }
    }
    (Mtls::Permissive, None)
}

/// The policies that apply to `w`: mesh-wide, its namespace's, and the selector-based
/// ones it names.
fn applicable<'p>(p: &'p Policies, w: &'p WorkloadInfo) -> impl Iterator<Item = &'p Arc<Policy>> {
    p.global
        .iter()
        .chain(
            p.by_namespace
                .get(w.namespace.as_str())
                .into_iter()
                .flatten(),
        )
        .chain(
            w.authorization_policies
                .iter()
                .filter_map(|k| p.authorizations.get(k))
                .filter(|a| a.scope == Scope::WorkloadSelector),
        )
}

fn evaluate(p: &Policies, ctx: &ConnCtx<'_>, req: Option<&http::request::Parts>) -> Verdict {
    let verdict = |allowed, pol: Option<&Arc<str>>, reason| Verdict {
        allowed,
        policy_name: pol.cloned(),
        reason,
    };
    if !ctx.tls {
        if let (Mtls::Strict, pa) = mtls_with_source(p, ctx.dst, ctx.dst_port) {
            return verdict(false, pa.map(|pa| &pa.key), Reason::MtlsRequired);
        }
    }
    for pol in applicable(p, ctx.dst).filter(|a| a.action == Action::Audit) {
        if policy_matches(pol, ctx, req) {
            info!(
                target: "mesh_agent::authz",
                policy = %pol.key,
                src = %ctx.src_ip,
                principal = ?ctx.src_identity.map(|i| i.to_string()),
                dst = %ctx.dst.uid,
                port = ctx.dst_port,
                "AUDIT policy matched"
            );
        }
    }
    if let Some(pol) = applicable(p, ctx.dst)
        .filter(|a| a.action == Action::Deny)
        .find(|a| policy_matches(a, ctx, req))
    {
        return verdict(false, Some(&pol.key), Reason::Denied);
    }
    // A refusal for want of a matching ALLOW names the first ALLOW policy that applies,
    // so the denial is counted and logged under a policy an operator can look up.
    let mut first_allow = None;
    for pol in applicable(p, ctx.dst).filter(|a| a.action == Action::Allow) {
        first_allow.get_or_insert(&pol.key);
        if policy_matches(pol, ctx, req) {
            return verdict(true, Some(&pol.key), Reason::Allowed);
        }
    }
    if let Some(key) = first_allow {
        verdict(false, Some(key), Reason::NoAllowMatch)
    } else {
        verdict(true, None, Reason::NoPolicy)
    }
}

fn policy_matches(pol: &Policy, ctx: &ConnCtx<'_>, req: Option<&http::request::Parts>) -> bool {
    pol.rules
        .iter()
        .any(|r| rule_matches(r, pol.action, ctx, req))
}

fn rule_matches(
    r: &Rule,
    action: Action,
    ctx: &ConnCtx<'_>,
    req: Option<&http::request::Parts>,
) -> bool {
    // At the connection level a rule with HTTP attributes fails closed (module docs).
    let ignore_l7 = req.is_none() && r.has_l7;
    if ignore_l7 && action == Action::Allow {
        return false;
    }
    r.clauses.iter().all(|c| {
        c.matches
            .iter()
            .any(|m| match_matches(m, ctx, req, ignore_l7))
    })
}

/// A value string matchers compare against without building it.
trait Text {
    fn len(&self) -> usize;
    fn eq(&self, s: &str) -> bool;
    fn starts_with(&self, s: &str) -> bool;
    fn ends_with(&self, s: &str) -> bool;
}

impl Text for &str {
    fn len(&self) -> usize {
        str::len(self)
    }
    fn eq(&self, s: &str) -> bool {
        *self == s
    }
    fn starts_with(&self, s: &str) -> bool {
        str::starts_with(self, s)
    }
    fn ends_with(&self, s: &str) -> bool {
        str::ends_with(self, s)
    }
}

/// Compared without regard to ASCII case (hosts; the patterns are stored lower case).
struct NoCase<'a>(&'a str);

impl Text for NoCase<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn eq(&self, s: &str) -> bool {
        self.0.eq_ignore_ascii_case(s)
    }
    fn starts_with(&self, s: &str) -> bool {
        let b = self.0.as_bytes();
        b.len() >= s.len() && b[..s.len()].eq_ignore_ascii_case(s.as_bytes())
    }
    fn ends_with(&self, s: &str) -> bool {
        let b = self.0.as_bytes();
        b.len() >= s.len() && b[b.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
    }
}

/// `<trust domain>/ns/<namespace>/sa/<account>`, in pieces.
struct Principal<'a>([&'a str; 5]);

impl<'a> Principal<'a> {
    fn of(id: &'a SpiffeId) -> Principal<'a> {
        Principal([
            id.trust_domain(),
            "/ns/",
            id.namespace(),
            "/sa/",
            id.service_account(),
        ])
    }
}

impl Text for Principal<'_> {
    fn len(&self) -> usize {
        self.0.iter().map(|p| p.len()).sum()
    }
    fn eq(&self, s: &str) -> bool {
        self.len() == s.len() && self.starts_with(s)
    }
    fn starts_with(&self, s: &str) -> bool {
        let mut rest = s.as_bytes();
        for p in self.0 {
            let p = p.as_bytes();
            if rest.len() <= p.len() {
                return p.starts_with(rest);
            }
            if !rest.starts_with(p) {
                return false;
            }
            rest = &rest[p.len()..];
        }
        rest.is_empty()
    }
    fn ends_with(&self, s: &str) -> bool {
        let mut rest = s.as_bytes();
        for p in self.0.iter().rev() {
            let p = p.as_bytes();
            if rest.len() <= p.len() {
                return p.ends_with(rest);
            }
            if !rest.ends_with(p) {
                return false;
            }
            rest = &rest[..rest.len() - p.len()];
        }
        rest.is_empty()
    }
}

fn str_match(m: &StrMatch, v: &impl Text) -> bool {
    match m {
        StrMatch::Exact(s) => v.eq(s),
        StrMatch::Prefix(s) => v.starts_with(s),
        StrMatch::Suffix(s) => v.ends_with(s),
        StrMatch::Presence => v.len() > 0,
    }
}

/// An empty list does not constrain; an absent value matches no pattern.
fn positive<T: Text>(list: &[StrMatch], v: Option<&T>) -> bool {
    list.is_empty() || v.is_some_and(|v| list.iter().any(|m| str_match(m, v)))
}

fn negative<T: Text>(list: &[StrMatch], v: Option<&T>) -> bool {
    list.is_empty() || !v.is_some_and(|v| list.iter().any(|m| str_match(m, v)))
}

fn match_matches(
    m: &Match,
    ctx: &ConnCtx<'_>,
    req: Option<&http::request::Parts>,
    ignore_l7: bool,
) -> bool {
    let ns = ctx.src_identity.map(|i| i.namespace());
    let principal = ctx.src_identity.map(Principal::of);
    let l4 = positive(&m.namespaces, ns.as_ref())
        && negative(&m.not_namespaces, ns.as_ref())
        && positive(&m.principals, principal.as_ref())
        && negative(&m.not_principals, principal.as_ref())
        && (m.source_ips.is_empty() || m.source_ips.iter().any(|c| c.contains(ctx.src_ip)))
        && !m.not_source_ips.iter().any(|c| c.contains(ctx.src_ip))
        && (m.destination_ips.is_empty()
            || m.destination_ips.iter().any(|c| c.contains(ctx.dst_ip)))
        && !m.not_destination_ips.iter().any(|c| c.contains(ctx.dst_ip))
        && m.admits_port(ctx.dst_port);
    if !l4 {
        return false;
    }
    if ignore_l7 || !m.has_l7() {
        return true;
    }
    let Some(req) = req else {
        return false;
    };
    let method = req.method.as_str();
    let path = req.uri.path();
    let host = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .map(NoCase);
    positive(&m.methods, Some(&method))
        && negative(&m.not_methods, Some(&method))
        && positive(&m.paths, Some(&path))
        && negative(&m.not_paths, Some(&path))
        && positive(&m.hosts, host.as_ref())
        && negative(&m.not_hosts, host.as_ref())
        && m.headers.iter().all(|h| {
            let v = req
                .headers
                .get(h.name.as_str())
                .and_then(|v| v.to_str().ok());
            positive(&h.values, v.as_ref()) && negative(&h.not_values, v.as_ref())
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{path::Path, sync::Arc};

    use prost::Message;

    use super::*;
    use crate::{
        control::translate::Translator,
        enrol::file::MeshFile,
        proxy::{
            config::policy::MeshConfig,
            xds::convert::{self, Accepted, AddressSpec},
        },
        wire::istio,
    };

    const BASE: &str = "\
namespaces:
  - name: shop
    labels: { mesh-agent.io/dataplane-mode: ambient }
  - name: other
    labels: { mesh-agent.io/dataplane-mode: ambient }
workloads:
  - { name: web, namespace: shop, ip: 10.0.0.2, ip6: 'fd00::2', netns: /n/web, service_account: web, labels: { app: web } }
  - { name: db, namespace: shop, ip: 10.0.0.3, ip6: 'fd00::3', netns: /n/db, service_account: db, labels: { app: db } }
  - { name: client, namespace: other, ip: 10.0.1.2, ip6: 'fd00:1::2', netns: /n/c, service_account: client, node: node-b }
";

    /// The file's policies through the whole path: the file check, the control plane's
    /// translation, the wire, the proxy's conversion. Workloads (dual-stack): shop/web
    /// (`app: web`, 10.0.0.2 and fd00::2), shop/db (`app: db`, 10.0.0.3 and fd00::3),
    /// other/client (10.0.1.2 and fd00:1::2, on node-b).
    pub(crate) fn mesh(policies: &str) -> MeshConfig {
        let text = format!("{BASE}{policies}");
        let f = MeshFile::parse(Path::new("t.yaml"), &text).unwrap();
        let mut t = Translator::default();
        let d = t.update_mesh(
            &f.services,
            &f.members_on("node-a"),
            &Arc::new(f.security()),
        );
        let mut acc = Accepted::default();
        for (name, any) in d.upserts {
            let v = any.value.as_slice();
            match any.type_url.as_str() {
                istio::ADDRESS_TYPE_URL => {
                    let (n, spec) = convert::address(&istio::Address::decode(v).unwrap()).unwrap();
                    assert_eq!(n, name);
                    if let AddressSpec::Workload(w) = spec {
                        acc.workloads.insert(n, w);
                    }
                }
                istio::AUTHORIZATION_TYPE_URL => {
                    let (n, p) =
                        convert::authorization(&istio::Authorization::decode(v).unwrap()).unwrap();
                    assert_eq!(n, name);
                    acc.authorizations.insert(n, Arc::new(p));
                }
                istio::PEER_AUTHENTICATION_TYPE_URL => {
                    let (n, p) = convert::peer_authentication(
                        &istio::PeerAuthentication::decode(v).unwrap(),
                    )
                    .unwrap();
                    acc.peer_authentications.insert(n, Arc::new(p));
                }
                _ => {}
            }
        }
        acc.build_mesh()
    }

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    #[test]
    fn a_forwarded_source_is_believed_only_from_its_own_identity() {
        let m = mesh("");
        let node: IpAddr = "192.168.0.9".parse().unwrap();
        let client = id("spiffe://cluster.local/ns/other/sa/client");
        let web = id("spiffe://cluster.local/ns/shop/sa/web");
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        // The peer proves `client`, and names client's address: believed.
        assert_eq!(
            tunnel_source(&m.workloads, &client, node, Some(ip("10.0.1.2"))),
            (ip("10.0.1.2"), SourceOrigin::Forwarded)
        );
        // It names web's address (another identity), or an address no workload has:
        // the node's address stands.
        for claimed in ["10.0.0.2", "10.9.9.9"] {
            assert_eq!(
                tunnel_source(&m.workloads, &client, node, Some(ip(claimed))),
                (node, SourceOrigin::Untrusted),
                "{claimed}"
            );
        }
        assert_eq!(
            tunnel_source(&m.workloads, &web, node, Some(ip("10.0.0.2"))),
            (ip("10.0.0.2"), SourceOrigin::Forwarded)
        );
        assert_eq!(
            tunnel_source(&m.workloads, &web, node, None),
            (node, SourceOrigin::Peer)
        );
        // The believed address is what ipBlocks see.
        let m = mesh(
            "authorization_policies:\n\
             \x20 - metadata: { name: one-pod, namespace: shop }\n\
             \x20   spec: { action: ALLOW, rules: [ { from: [ { source: { ipBlocks: [ 10.0.1.2/32 ] } } ] } ] }\n",
        );
        let judge = |src: IpAddr| {
            let dst_ip = ip("10.0.0.3");
            authorize(
                &m.policies,
                &ConnCtx {
                    src_ip: src,
                    src_identity: Some(&client),
                    dst: m.workloads.by_ip(dst_ip).unwrap(),
                    dst_ip,
                    dst_port: 80,
                    tls: true,
                },
            )
            .allowed
        };
        let (believed, _) = tunnel_source(&m.workloads, &client, node, Some(ip("10.0.1.2")));
        assert!(judge(believed));
        let (refused, _) = tunnel_source(&m.workloads, &client, node, Some(ip("10.0.0.2")));
        assert!(!judge(refused));
    }

    struct Case<'a> {
        src_ip: &'a str,
        src: Option<&'a str>,
        dst: &'a str,
        port: u16,
        tls: bool,
    }

    fn conn<'a>(m: &'a MeshConfig, src_id: Option<&'a SpiffeId>, c: &Case<'_>) -> ConnCtx<'a> {
        let dst_ip: IpAddr = c.dst.parse().unwrap();
        ConnCtx {
            src_ip: c.src_ip.parse().unwrap(),
            src_identity: src_id,
            dst: m.workloads.by_ip(dst_ip).expect("a workload"),
            dst_ip,
            dst_port: c.port,
            tls: c.tls,
        }
    }

    /// (source identity, destination, port) -> allowed, over a table.
    fn check(m: &MeshConfig, table: &[(Option<&str>, &str, u16, bool)]) {
        for (src, dst, port, want) in table {
            let sid = src.map(id);
            let c = Case {
                src_ip: "10.0.1.2",
                src: *src,
                dst,
                port: *port,
                tls: sid.is_some(),
            };
            let v = authorize(&m.policies, &conn(m, sid.as_ref(), &c));
            assert_eq!(v.allowed, *want, "{:?} -> {dst}:{port}: {v}", c.src);
        }
    }

    const CLIENT: &str = "spiffe://cluster.local/ns/other/sa/client";
    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

    #[test]
    fn the_index_knows_workloads_of_every_node() {
        let m = mesh("");
        let c = m.workloads.by_ip("10.0.1.2".parse().unwrap()).unwrap();
        assert_eq!(c.identity.to_string(), CLIENT);
        assert_eq!(c.node, "node-b");
        assert_eq!(c.hbone_addr(), Some("10.0.1.2:15008".parse().unwrap()));
        assert_eq!(
            m.workloads.by_ip("10.0.0.2".parse().unwrap()).unwrap().node,
            "node-a"
        );
        assert!(m.workloads.by_ip("10.9.9.9".parse().unwrap()).is_none());
    }

    #[test]
    fn no_policy_allows_everything() {
        let m = mesh("");
        check(
            &m,
            &[
                (None, "10.0.0.2", 80, true),
                (Some(CLIENT), "10.0.0.3", 5432, true),
            ],
        );
    }

    #[test]
    fn allow_by_principal_with_wildcards_denies_the_rest_of_the_selected_workload() {
        let m = mesh(
            "authorization_policies:
  - metadata: { name: web-from-client, namespace: shop }
    spec:
      selector: { matchLabels: { app: web } }
      action: ALLOW
      rules:
        - from: [ { source: { principals: [ cluster.local/ns/other/sa/client, \"*/sa/admin\", \"spiffe://cluster.local/ns/ops/*\" ] } } ]
",
        );
        check(
            &m,
            &[
                (Some(CLIENT), "10.0.0.2", 80, true),
                (Some("spiffe://td2/ns/x/sa/admin"), "10.0.0.2", 80, true),
                (
                    Some("spiffe://cluster.local/ns/ops/sa/any"),
                    "10.0.0.2",
                    80,
                    true,
                ),
                (Some(WEB), "10.0.0.2", 80, false),
                (None, "10.0.0.2", 80, false),
                // db is not selected: no policy applies to it.
                (Some(WEB), "10.0.0.3", 80, true),
            ],
        );
        let sid = id(CLIENT);
        let c = Case {
            src_ip: "10.0.1.2",
            src: Some(CLIENT),
            dst: "10.0.0.2",
            port: 80,
            tls: true,
        };
        let v = authorize(&m.policies, &conn(&m, Some(&sid), &c));
        assert_eq!(v.policy_name.as_deref(), Some("shop/web-from-client"));
        assert_eq!(v.reason, Reason::Allowed);
        let w = id(WEB);
        let v = authorize(&m.policies, &conn(&m, Some(&w), &c));
        assert_eq!(
            (v.allowed, v.reason, v.policy_name.as_deref()),
            (false, Reason::NoAllowMatch, Some("shop/web-from-client"))
        );
    }

    #[test]
    fn deny_by_namespace_and_not_principals_star_refuses_plain_text() {
        let m = mesh(
            "authorization_policies:
  - metadata: { name: no-other, namespace: shop }
    spec:
      action: DENY
      rules: [ { from: [ { source: { namespaces: [ other ] } } ] } ]
  - metadata: { name: mtls-only, namespace: shop }
    spec:
      action: DENY
      rules: [ { from: [ { source: { notPrincipals: [ \"*\" ] } } ] } ]
",
        );
        check(
            &m,
            &[
                (Some(CLIENT), "10.0.0.2", 80, false),
                (Some(WEB), "10.0.0.3", 80, true),
                (None, "10.0.0.3", 80, false),
            ],
        );
    }

    #[test]
    fn not_namespaces_ip_blocks_and_ports() {
        let m = mesh(
            "authorization_policies:
  - metadata: { name: db-allow, namespace: shop }
    spec:
      selector: { matchLabels: { app: db } }
      rules:
        - from: [ { source: { notNamespaces: [ other ] } }, { source: { ipBlocks: [ 10.0.1.0/24 ], notIpBlocks: [ 10.0.1.2 ] } } ]
          to: [ { operation: { ports: [ \"5432\" ] } } ]
        - to: [ { operation: { notPorts: [ 5432, 9000 ] } } ]
",
        );
        let sid = id(CLIENT);
        let web = id(WEB);
        let table = [
            // shop/web: notNamespaces other -> yes, on 5432 only by the first rule.
            ("10.0.0.2", Some(&web), 5432, true),
            ("10.0.0.2", Some(&web), 9000, false),
            // The second rule: any port but 5432 and 9000.
            ("10.0.0.2", Some(&web), 8080, true),
            // other/client from 10.0.1.2: excluded by namespace and by notIpBlocks.
            ("10.0.1.2", Some(&sid), 5432, false),
            // other/client from 10.0.1.3: ipBlocks.
            ("10.0.1.3", Some(&sid), 5432, true),
        ];
        for (src_ip, s, port, want) in table {
            let c = Case {
                src_ip,
                src: None,
                dst: "10.0.0.3",
                port,
                tls: true,
            };
            let v = authorize(&m.policies, &conn(&m, s, &c));
            assert_eq!(v.allowed, want, "{src_ip} {port}: {v}");
        }
    }

    #[test]
    fn ipv6_clients_are_found_by_their_ipv6_address_and_judged_by_ipv6_blocks() {
        // The workload table indexes both addresses: identity and namespace of an IPv6
        // client are found as those of its IPv4 address.
        let m = mesh("");
        for (v4, v6) in [("10.0.0.2", "fd00::2"), ("10.0.1.2", "fd00:1::2")] {
            let (a, b) = (
                m.workloads.by_ip(v4.parse().unwrap()).expect(v4),
                m.workloads.by_ip(v6.parse().unwrap()).expect(v6),
            );
            assert!(Arc::ptr_eq(a, b), "{v4} and {v6} are one workload");
        }
        let web = id(WEB);
        let judge = |m: &MeshConfig, src_ip: &str, s: &SpiffeId| {
            let c = Case {
                src_ip,
                src: None,
                dst: "fd00::3",
                port: 5432,
                tls: true,
            };
            authorize(&m.policies, &conn(m, Some(s), &c))
        };
        // ALLOW from an IPv6 block: web's IPv6 address is in it, its IPv4 one and other
        // IPv6 addresses are not (source.ip is the address the connection came from).
        let allow = mesh(
            "authorization_policies:
  - metadata: { name: db-from-v6, namespace: shop }
    spec:
      selector: { matchLabels: { app: db } }
      rules: [ { from: [ { source: { ipBlocks: [ 'fd00::/64' ] } } ] } ]
",
        );
        for (src_ip, want) in [
            ("fd00::2", true),
            ("fd00::99", true),
            ("10.0.0.2", false),
            ("fd00:1::2", false),
        ] {
            let v = judge(&allow, src_ip, &web);
            assert_eq!(v.allowed, want, "ALLOW {src_ip}: {v}");
        }
        // DENY an IPv6 block (and notIpBlocks naming one address of it).
        let deny = mesh(
            "authorization_policies:
  - metadata: { name: no-v6-web, namespace: shop }
    spec:
      selector: { matchLabels: { app: db } }
      action: DENY
      rules: [ { from: [ { source: { ipBlocks: [ 'fd00::/64' ], notIpBlocks: [ 'fd00::99' ] } } ] } ]
",
        );
        for (src_ip, want) in [
            ("fd00::2", false),
            ("fd00::99", true),
            ("10.0.0.2", true),
            ("fd00:1::2", true),
        ] {
            let v = judge(&deny, src_ip, &web);
            assert_eq!(v.allowed, want, "DENY {src_ip}: {v}");
            if !want {
                assert_eq!(v.policy_name.as_deref(), Some("shop/no-v6-web"), "{v}");
            }
        }
    }

    #[test]
    fn when_conditions_and_mesh_wide_policies() {
        let m = mesh(
            "authorization_policies:
  - metadata: { name: global-deny, namespace: istio-system }
    spec:
      action: DENY
      rules:
        - when:
            - { key: source.principal, values: [ \"cluster.local/ns/other/*\" ] }
            - { key: destination.port, notValues: [ \"80\" ] }
  - metadata: { name: by-ip, namespace: shop }
    spec:
      action: DENY
      rules: [ { when: [ { key: source.ip, values: [ 10.0.9.0/24 ] }, { key: source.namespace, notValues: [ shop ] } ] } ]
",
        );
        check(
            &m,
            &[
                (Some(CLIENT), "10.0.0.2", 80, true),
                (Some(CLIENT), "10.0.0.2", 81, false),
                (Some(WEB), "10.0.0.2", 81, true),
            ],
        );
        let sid = id(CLIENT);
        let c = Case {
            src_ip: "10.0.9.1",
            src: None,
            dst: "10.0.0.2",
            port: 80,
            tls: true,
        };
        let v = authorize(&m.policies, &conn(&m, Some(&sid), &c));
        assert_eq!(
            (v.allowed, v.policy_name.as_deref()),
            (false, Some("shop/by-ip"))
        );
        let web = id(WEB);
        assert!(authorize(&m.policies, &conn(&m, Some(&web), &c)).allowed);
    }

    fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn l7_rules_per_request_and_fail_closed_at_l4() {
        let m = mesh(
            "authorization_policies:
  - metadata: { name: web-get, namespace: shop }
    spec:
      selector: { matchLabels: { app: web } }
      rules:
        - to: [ { operation: { methods: [ GET ], paths: [ \"/api/*\" ], notPaths: [ /api/admin ], hosts: [ \"*.shop\" ], ports: [ 80 ] } } ]
          when: [ { key: \"request.headers[X-Env]\", values: [ prod ] } ]
        - to: [ { operation: { ports: [ 9090 ] } } ]
  - metadata: { name: db-no-post, namespace: shop }
    spec:
      selector: { matchLabels: { app: db } }
      action: DENY
      rules: [ { to: [ { operation: { methods: [ POST ], ports: [ 5432 ] } } ] } ]
",
        );
        let web = m.workloads.by_ip("10.0.0.2".parse().unwrap()).unwrap();
        let db = m.workloads.by_ip("10.0.0.3".parse().unwrap()).unwrap();
        assert!(needs_http(&m.policies, web, 80));
        assert!(!needs_http(&m.policies, web, 9090));
        assert!(needs_http(&m.policies, db, 5432));
        assert!(!needs_http(&m.policies, db, 80));
        let sid = id(CLIENT);
        fn at(dst: &'static str, port: u16) -> Case<'static> {
            Case {
                src_ip: "10.0.1.2",
                src: None,
                dst,
                port,
                tls: true,
            }
        }
        // L4: the ALLOW rule with HTTP attributes matches nothing; 9090 is allowed by
        // the L4 rule; the DENY rule with HTTP attributes refuses all of port 5432.
        assert!(!authorize(&m.policies, &conn(&m, Some(&sid), &at("10.0.0.2", 80))).allowed);
        assert!(authorize(&m.policies, &conn(&m, Some(&sid), &at("10.0.0.2", 9090))).allowed);
        assert!(!authorize(&m.policies, &conn(&m, Some(&sid), &at("10.0.0.3", 5432))).allowed);
        assert!(authorize(&m.policies, &conn(&m, Some(&sid), &at("10.0.0.3", 80))).allowed);
        // Per request: everything is evaluated.
        let c = at("10.0.0.2", 80);
        let cx = conn(&m, Some(&sid), &c);
        let ok = [("host", "WEB.shop"), ("x-env", "prod")];
        for (method, uri, headers, want) in [
            ("GET", "/api/items?q=1", &ok[..], true),
            ("POST", "/api/items", &ok[..], false),
            ("GET", "/api/admin", &ok[..], false),
            ("GET", "/other", &ok[..], false),
            (
                "GET",
                "/api/items",
                &[("host", "web.elsewhere"), ("x-env", "prod")][..],
                false,
            ),
            (
                "GET",
                "/api/items",
                &[("host", "web.shop"), ("x-env", "dev")][..],
                false,
            ),
            ("GET", "/api/items", &[("host", "web.shop")][..], false),
        ] {
            let v = authorize_request(&m.policies, &cx, &request(method, uri, headers));
            assert_eq!(v.allowed, want, "{method} {uri} {headers:?}: {v}");
        }
        let c = at("10.0.0.3", 5432);
        let cx = conn(&m, Some(&sid), &c);
        assert!(!authorize_request(&m.policies, &cx, &request("POST", "/", &[])).allowed);
        assert!(authorize_request(&m.policies, &cx, &request("GET", "/", &[])).allowed);
    }

    #[test]
    fn audit_policies_never_refuse() {
        let m = mesh(
            "authorization_policies:
  - metadata: { name: watch, namespace: shop }
    spec:
      action: AUDIT
      rules: [ {} ]
",
        );
        check(
            &m,
            &[
                (Some(CLIENT), "10.0.0.2", 80, true),
                (None, "10.0.0.3", 1, true),
            ],
        );
    }

    #[test]
    fn an_allow_policy_without_rules_denies_and_an_empty_rule_allows() {
        let m = mesh(
            "authorization_policies:
  - metadata: { name: deny-all, namespace: shop }
    spec: { selector: { matchLabels: { app: web } } }
  - metadata: { name: allow-all, namespace: shop }
    spec:
      selector: { matchLabels: { app: db } }
      rules: [ {} ]
",
        );
        check(
            &m,
            &[
                (Some(CLIENT), "10.0.0.2", 80, false),
                (Some(CLIENT), "10.0.0.3", 80, true),
            ],
        );
    }

    #[test]
    fn peer_authentication_precedence_and_port_levels() {
        let m = mesh(
            "peer_authentications:
  - metadata: { name: default, namespace: istio-system }
    spec: { mtls: { mode: STRICT } }
  - metadata: { name: default, namespace: other }
    spec: { mtls: { mode: PERMISSIVE } }
  - metadata: { name: db, namespace: shop }
    spec:
      selector: { matchLabels: { app: db } }
      mtls: { mode: UNSET }
      portLevelMtls: { 9000: { mode: DISABLE }, 9001: { mode: PERMISSIVE } }
",
        );
        let w = |ip: &str| m.workloads.by_ip(ip.parse().unwrap()).unwrap().clone();
        let (web, db, client) = (w("10.0.0.2"), w("10.0.0.3"), w("10.0.1.2"));
        assert_eq!(mtls_mode(&m.policies, &web, 80), Mtls::Strict, "mesh-wide");
        assert_eq!(
            mtls_mode(&m.policies, &client, 80),
            Mtls::Permissive,
            "namespace"
        );
        assert_eq!(
            mtls_mode(&m.policies, &db, 9000),
            Mtls::Disable,
            "port level"
        );
        assert_eq!(
            mtls_mode(&m.policies, &db, 9001),
            Mtls::Permissive,
            "port level"
        );
        assert_eq!(
            mtls_mode(&m.policies, &db, 5432),
            Mtls::Strict,
            "UNSET inherits"
        );
        // STRICT refuses plain text before any AuthorizationPolicy.
        let c = Case {
            src_ip: "10.0.1.2",
            src: None,
            dst: "10.0.0.2",
            port: 80,
            tls: false,
        };
        let v = authorize(&m.policies, &conn(&m, None, &c));
        assert_eq!(
            (v.allowed, v.reason, v.policy_name.as_deref()),
            (false, Reason::MtlsRequired, Some("istio-system/default"))
        );
        let c = Case {
            src_ip: "10.0.1.2",
            src: None,
            dst: "10.0.0.3",
            port: 9001,
            tls: false,
        };
        assert!(authorize(&m.policies, &conn(&m, None, &c)).allowed);
    }

    #[test]
    fn principals_compare_in_pieces() {
        let sid = id("spiffe://cluster.local/ns/a/sa/b");
        let p = Principal::of(&sid);
        assert!(p.eq("cluster.local/ns/a/sa/b"));
        assert!(!p.eq("cluster.local/ns/a/sa/bb"));
        assert!(p.starts_with("cluster.local/ns/a/"));
        assert!(p.starts_with("clus"));
        assert!(!p.starts_with("cluster.local/ns/b"));
        assert!(p.ends_with("/sa/b"));
        assert!(p.ends_with("local/ns/a/sa/b"));
        assert!(!p.ends_with("x/cluster.local/ns/a/sa/b"));
        assert!(p.starts_with(""));
    }
}
