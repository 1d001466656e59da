//! Istio's security policies as the control plane takes them in: AuthorizationPolicy and
//! PeerAuthentication in `security.istio.io/v1`'s field names (the standalone file's
//! `authorization_policies:` and `peer_authentications:` are written in these, so an
//! Istio manifest can be pasted), with the checks that make them translatable. Fields
//! Istio has and we cannot honour are declared so that using one is an error naming it,
//! never silently ignored.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use serde::{Deserialize, Serialize};

/// Where mesh-wide policies live, as in Istio (`meshConfig.rootNamespace`).
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// The policies of the mesh, as one value (shared by pointer between snapshots).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Security {
    pub authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    pub peer_authentications: Vec<Arc<PeerAuthentication>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectMeta {
    pub name: String,
    pub namespace: String,
    /// Accepted and ignored (metadata only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ObjectMeta {
    /// `namespace/name`: the resource name on the wire (ztunnel's key).
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AuthorizationSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub action: AuthzAction,
    /// Absent or empty: the policy matches nothing (an ALLOW policy then denies every
    /// connection to the workloads it applies to).
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
    // Istio fields we do not support: refused by `check` with their name.
    #[serde(default, skip_serializing)]
    pub provider: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    pub target_ref: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    pub target_refs: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum AuthzAction {
    #[default]
    Allow,
    Deny,
    Audit,
    /// Refused by `check`: no external authorizer.
    Custom,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    #[serde(default)]
    pub from: Vec<FromSpec>,
    #[serde(default)]
    pub to: Vec<ToSpec>,
    #[serde(default)]
    pub when: Vec<ConditionSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FromSpec {
    pub source: SourceSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SourceSpec {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    /// The node proxy sees the peer's address only (no `X-Forwarded-For` chain): the same
    /// as `ipBlocks`.
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
    // Refused by `check` (JWT request principals: no request authentication here).
    #[serde(default, skip_serializing)]
    pub request_principals: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    pub not_request_principals: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ToSpec {
    pub operation: OperationSpec,
}

/// A port as Istio writes it (a string) or as YAML users do (a number).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PortValue {
    Number(i64),
    Text(String),
}

impl PortValue {
    pub fn port(&self) -> Option<u16> {
        match self {
            PortValue::Number(n) => u16::try_from(*n).ok(),
            PortValue::Text(s) => s.trim().parse().ok(),
        }
        .filter(|p| *p != 0)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OperationSpec {
    #[serde(default)]
    pub ports: Vec<PortValue>,
    #[serde(default)]
    pub not_ports: Vec<PortValue>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
}

impl OperationSpec {
    /// Uses HTTP attributes (evaluated per request).
    pub fn has_l7(&self) -> bool {
        !(self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.hosts.is_empty()
            && self.not_hosts.is_empty())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConditionSpec {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// What a `when` key refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionKey {
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationIp,
    DestinationPort,
    /// `request.headers[<name>]`, the name lower-cased.
    RequestHeader(String),
}

impl ConditionKey {
    pub fn parse(key: &str) -> Result<ConditionKey, String> {
        Ok(match key {
            "source.ip" | "remote.ip" => ConditionKey::SourceIp,
            "source.namespace" => ConditionKey::SourceNamespace,
            "source.principal" => ConditionKey::SourcePrincipal,
            "destination.ip" => ConditionKey::DestinationIp,
            "destination.port" => ConditionKey::DestinationPort,
            k => {
                if let Some(name) = k
                    .strip_prefix("request.headers[")
                    .and_then(|r| r.strip_suffix(']'))
                {
                    if name.is_empty()
                        || http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                            .is_err()
                    {
                        return Err(format!("{k:?}: {name:?} is not a header name"));
                    }
                    ConditionKey::RequestHeader(name.to_ascii_lowercase())
                } else {
                    return Err(format!(
                        "{k:?} is not supported (supported: source.ip, remote.ip, source.namespace, source.principal, destination.ip, destination.port, request.headers[<name>])"
                    ));
                }
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerAuthentication {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub mtls: Option<MtlsSpec>,
    /// Port -> mode (the workload's port); needs a selector, as in Istio.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<u32, MtlsSpec>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsSpec {
    #[serde(default)]
    pub mode: MtlsModeSpec,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsModeSpec {
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

/// A CIDR or a single address (`10.0.0.1`, `10.0.0.0/8`, `fd00::/8`).
pub fn parse_ip_block(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip.trim(), Some(len.trim())),
        None => (s.trim(), None),
    };
    let ip: IpAddr = ip.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max)?,
        None => max,
    };
    Some((ip, len))
}

/// Istio's string forms: `*` (any non-empty value), `prefix*`, `*suffix`, or exact.
fn check_string(field: &str, v: &str, bad: &mut dyn FnMut(String)) {
    if v.is_empty() {
        bad(format!(
            "{field}: an empty string matches nothing; remove it"
        ));
    } else if v.len() > 1 && v[1..v.len() - 1].contains('*') {
        bad(format!(
            "{field}: {v:?}: `*` is allowed only at the start or the end"
        ));
    }
}

fn check_source(field: &str, s: &SourceSpec, bad: &mut dyn FnMut(String)) {
    if s.request_principals.is_some() || s.not_request_principals.is_some() {
        bad(format!(
            "{field}.requestPrincipals/notRequestPrincipals: not supported (JWT request authentication is not implemented); use principals"
        ));
    }
    let lists = [
        ("principals", &s.principals),
        ("notPrincipals", &s.not_principals),
        ("namespaces", &s.namespaces),
        ("notNamespaces", &s.not_namespaces),
    ];
    for (name, vs) in lists {
        for v in vs {
            check_string(&format!("{field}.{name}"), v, bad);
        }
    }
    let blocks = [
        ("ipBlocks", &s.ip_blocks),
        ("notIpBlocks", &s.not_ip_blocks),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
    ];
    for (name, vs) in blocks {
        for v in vs {
            if parse_ip_block(v).is_none() {
                bad(format!(
                    "{field}.{name}: {v:?} is not an IP address or CIDR"
                ));
            }
        }
    }
    if lists.iter().all(|(_, v)| v.is_empty())
        && blocks.iter().all(|(_, v)| v.is_empty())
        && s.request_principals.is_none()
        && s.not_request_principals.is_none()
    {
        bad(format!("{field}: a source needs at least one field"));
    }
}

fn check_operation(field: &str, o: &OperationSpec, bad: &mut dyn FnMut(String)) {
    for (name, ps) in [("ports", &o.ports), ("notPorts", &o.not_ports)] {
        for p in ps {
            if p.port().is_none() {
                bad(format!("{field}.{name}: {p:?} is not a port (1..65535)"));
            }
        }
    }
    for (name, vs) in [
        ("methods", &o.methods),
        ("notMethods", &o.not_methods),
        ("paths", &o.paths),
        ("notPaths", &o.not_paths),
        ("hosts", &o.hosts),
        ("notHosts", &o.not_hosts),
    ] {
        for v in vs {
            check_string(&format!("{field}.{name}"), v, bad);
        }
    }
    if o.ports.is_empty() && o.not_ports.is_empty() && !o.has_l7() {
        bad(format!("{field}: an operation needs at least one field"));
    }
}

fn check_condition(field: &str, c: &ConditionSpec, bad: &mut dyn FnMut(String)) {
    let key = match ConditionKey::parse(&c.key) {
        Ok(k) => k,
        Err(e) => return bad(format!("{field}.key: {e}")),
    };
    if c.values.is_empty() && c.not_values.is_empty() {
        bad(format!("{field}: values or notValues is required"));
    }
    for v in c.values.iter().chain(&c.not_values) {
        match key {
            ConditionKey::SourceIp | ConditionKey::DestinationIp => {
                if parse_ip_block(v).is_none() {
                    bad(format!("{field}: {v:?} is not an IP address or CIDR"));
                }
            }
            ConditionKey::DestinationPort => {
                if PortValue::Text(v.clone()).port().is_none() {
                    bad(format!("{field}: {v:?} is not a port (1..65535)"));
                }
            }
            _ => check_string(&format!("{field}.values"), v, bad),
        }
    }
}

fn check_meta(
    field: &str,
    kind: &str,
    api_version: &Option<String>,
    k: &Option<String>,
    m: &ObjectMeta,
    bad: &mut dyn FnMut(String),
) {
    if let Some(v) = api_version {
        if v != "security.istio.io/v1" && v != "security.istio.io/v1beta1" {
            bad(format!(
                "{field}.apiVersion: {v:?}: expected security.istio.io/v1"
            ));
        }
    }
    if let Some(got) = k {
        if got != kind {
            bad(format!("{field}.kind: {got:?}: expected {kind}"));
        }
    }
    let dns_name = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    if !dns_name(&m.name) {
        bad(format!(
            "{field}.metadata.name: {:?} is not a DNS name (lower-case letters, digits, '-', '.')",
            m.name
        ));
    }
    if !dns_name(&m.namespace) {
        bad(format!(
            "{field}.metadata.namespace: {:?} is not a namespace name",
            m.namespace
        ));
    }
}

impl AuthorizationPolicy {
    /// Every problem, each message starting with `field` (e.g.
    /// `authorization_policies[2]`).
    pub fn check(&self, field: &str, bad: &mut dyn FnMut(String)) {
        let s = &self.spec;
        check_meta(
            field,
            "AuthorizationPolicy",
            &self.api_version,
            &self.kind,
            &self.metadata,
            bad,
        );
        if s.action == AuthzAction::Custom || s.provider.is_some() {
            bad(format!(
                "{field}.spec.action: CUSTOM (and provider) is not supported: there is no external authorizer"
            ));
        }
        if s.target_ref.is_some() || s.target_refs.is_some() {
            bad(format!(
                "{field}.spec.targetRef/targetRefs: not supported (policies attach to workloads by selector, enforced by the destination's node proxy)"
            ));
        }
        for (i, r) in s.rules.iter().enumerate() {
            let rf = format!("{field}.spec.rules[{i}]");
            for (j, f) in r.from.iter().enumerate() {
                check_source(&format!("{rf}.from[{j}].source"), &f.source, bad);
            }
            for (j, t) in r.to.iter().enumerate() {
                check_operation(&format!("{rf}.to[{j}].operation"), &t.operation, bad);
            }
            for (j, c) in r.when.iter().enumerate() {
                check_condition(&format!("{rf}.when[{j}]"), c, bad);
            }
        }
    }
}

impl PeerAuthentication {
    pub fn check(&self, field: &str, bad: &mut dyn FnMut(String)) {
        check_meta(
            field,
            "PeerAuthentication",
            &self.api_version,
            &self.kind,
            &self.metadata,
            bad,
        );
        let s = &self.spec;
        if !s.port_level_mtls.is_empty() && s.selector.is_none() {
            bad(format!(
                "{field}.spec.portLevelMtls: needs a selector (as in Istio)"
            ));
        }
        for p in s.port_level_mtls.keys() {
            if *p == 0 || *p > 65535 {
                bad(format!(
                    "{field}.spec.portLevelMtls: {p} is not a port (1..65535)"
                ));
            }
        }
    }
}

impl Security {
    /// Every problem of the set: each policy's own, and names declared twice; mesh-wide
    /// and namespace-wide PeerAuthentications must be unique per namespace (Istio picks
    /// the oldest and warns; a file has no age, so it is an error here).
    pub fn check(&self, bad: &mut dyn FnMut(String)) {
        let mut names = std::collections::HashSet::new();
        for (i, p) in self.authorization_policies.iter().enumerate() {
            let field = format!("authorization_policies[{i}]");
            p.check(&field, bad);
            if !names.insert(p.metadata.key()) {
                bad(format!(
                    "{field}.metadata: {} is declared twice",
                    p.metadata.key()
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        let mut wide = std::collections::HashMap::new();
        for (i, p) in self.peer_authentications.iter().enumerate() {
            let field = format!("peer_authentications[{i}]");
            p.check(&field, bad);
            if !names.insert(p.metadata.key()) {
                bad(format!(
                    "{field}.metadata: {} is declared twice",
                    p.metadata.key()
                ));
            }
            let selects_all = p
                .spec
                .selector
                .as_ref()
                .is_none_or(|s| s.match_labels.is_empty());
            if selects_all {
                if let Some(j) = wide.insert(p.metadata.namespace.as_str(), i) {
                    bad(format!(
                        "{field}: namespace {:?} already has a policy without selector (peer_authentications[{j}])",
                        p.metadata.namespace
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_blocks_parse() {
        assert_eq!(
            parse_ip_block("10.0.0.0/8"),
            Some(("10.0.0.0".parse().unwrap(), 8))
        );
        assert_eq!(
            parse_ip_block("10.0.0.1"),
            Some(("10.0.0.1".parse().unwrap(), 32))
        );
        assert_eq!(parse_ip_block("fd00::/8").map(|b| b.1), Some(8));
        assert_eq!(parse_ip_block("10.0.0.0/33"), None);
        assert_eq!(parse_ip_block("x"), None);
    }

    #[test]
    fn condition_keys() {
        assert_eq!(
            ConditionKey::parse("request.headers[X-Env]"),
            Ok(ConditionKey::RequestHeader("x-env".into()))
        );
        assert!(ConditionKey::parse("request.auth.claims[iss]").is_err());
        assert_eq!(ConditionKey::parse("remote.ip"), Ok(ConditionKey::SourceIp));
    }
}
