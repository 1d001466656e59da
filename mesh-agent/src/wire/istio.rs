//! ztunnel's workload and authorization resources (`istio.workload.Address`,
//! `istio.security.Authorization`), as prost messages, plus the one type of ours
//! (`meshagent.v1.PeerAuthentication`) for what ztunnel's protos do not carry.
//!
//! Hand-written from istio/ztunnel `proto/workload.proto` and `proto/authorization.proto`:
//! same package, message names and field numbers, so istiod's resources decode here and
//! ours decode in ztunnel. Only the fields we use are declared; prost skips the others.
//!
//! Our extensions to ztunnel's messages use field numbers from 1000 up, never used
//! upstream:
//! - `Match.methods`/`paths`/`hosts` (and their `not_` forms) and `Match.headers`: the L7
//!   parts of an AuthorizationPolicy rule (`to.operation`, `when: request.headers[..]`),
//!   which ztunnel (an L4 proxy) has no field for.
//! - `Action::Audit` (value 2): ztunnel knows ALLOW and DENY only and refuses other values,
//!   so an AUDIT policy is never taken for an ALLOW by a ztunnel-proto client.
//! - `Workload.peer_authentications`: the selector-based PeerAuthentications that apply to
//!   the workload, by `namespace/name` (as `authorization_policies` lists selector-based
//!   AuthorizationPolicies).
//! - `Workload.access_log`: the workload's namespace switched its access logs on. A
//!   client that does not know the field skips it (the workload is then logged by flag
//!   only), and a resource without it reads as off.
//!
//! PeerAuthentication travels as a resource type of its own rather than inside
//! `Authorization`: istiod hands ztunnel STRICT mode already converted into a DENY policy,
//! but the proxy must answer "which mTLS mode applies on this port", which a converted
//! policy cannot say; and an unknown field inside an `Authorization` would make a
//! ztunnel-proto client see an ALLOW policy with no rules (which denies everything).

/// The trust domain a workload resource that names none is in (Istio's default).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

use prost::{Message, Name};

pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";
pub const PEER_AUTHENTICATION_TYPE_URL: &str =
    "type.googleapis.com/meshagent.v1.PeerAuthentication";

/// The port a workload accepts HBONE tunnels on (ztunnel's in-pod model: the workload's
/// own address, port 15008).
pub const HBONE_PORT: u16 = 15008;

// ---------------------------------------------------------------------------------------
// istio.workload

/// `istio.workload.Address`: a workload or a service, by address.
#[derive(Clone, PartialEq, Message)]
pub struct Address {
    #[prost(oneof = "address::Type", tags = "1, 2")]
    pub r#type: Option<address::Type>,
}

pub mod address {
    #[derive(Clone, PartialEq, prost::Oneof)]
    #[expect(
        clippy::large_enum_variant,
        reason = "decoded once per resource and converted at once; boxing buys nothing"
    )]
    pub enum Type {
        #[prost(message, tag = "1")]
        Workload(super::Workload),
        #[prost(message, tag = "2")]
        Service(super::Service),
    }
}

/// `istio.workload.Service`: decoded so a resource carrying one is recognised (and
/// ignored); we do not serve services this way (they are Envoy listeners and clusters).
#[derive(Clone, PartialEq, Message)]
pub struct Service {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(string, tag = "3")]
    pub hostname: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct Workload {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    /// 4 or 16 bytes each.
    #[prost(bytes = "vec", repeated, tag = "3")]
    pub addresses: Vec<Vec<u8>>,
    #[prost(string, tag = "4")]
    pub network: String,
    #[prost(enumeration = "TunnelProtocol", tag = "5")]
    pub tunnel_protocol: i32,
    /// Elided: the mesh default (`cluster.local`).
    #[prost(string, tag = "6")]
    pub trust_domain: String,
    /// Elided: `default`.
    #[prost(string, tag = "7")]
    pub service_account: String,
    #[prost(string, tag = "9")]
    pub node: String,
    /// Istio's `app` (ztunnel reports it as `source_app`/`destination_app`): the pod's
    /// `app.kubernetes.io/name`, else `app` label. Empty: not said (`unknown`).
    #[prost(string, tag = "10")]
    pub canonical_name: String,
    /// Istio's `version`: the pod's `app.kubernetes.io/version`, else `version` label.
    #[prost(string, tag = "11")]
    pub canonical_revision: String,
    #[prost(string, tag = "13")]
    pub workload_name: String,
    /// Selector-based AuthorizationPolicies that apply, as `namespace/name` (namespace
    /// and mesh-wide ones are not listed: their scope says where they apply).
    #[prost(string, repeated, tag = "16")]
    pub authorization_policies: Vec<String>,
    #[prost(enumeration = "WorkloadStatus", tag = "17")]
    pub status: i32,
    #[prost(string, tag = "18")]
    pub cluster_id: String,
    /// Globally unique; the resource name.
    #[prost(string, tag = "20")]
    pub uid: String,
    #[prost(string, tag = "21")]
    pub hostname: String,
    /// Ours: selector-based PeerAuthentications that apply, as `namespace/name`.
    #[prost(string, repeated, tag = "1000")]
    pub peer_authentications: Vec<String>,
    /// Ours: its namespace asks for access logs (`mesh-agent.io/access-log: "true"`):
    /// its connections and requests are logged even where the proxy's flag is off.
    #[prost(bool, tag = "1001")]
    pub access_log: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum TunnelProtocol {
    None = 0,
    Hbone = 1,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum WorkloadStatus {
    Healthy = 0,
    Unhealthy = 1,
}

impl Name for Address {
    const NAME: &'static str = "Address";
    const PACKAGE: &'static str = "istio.workload";
    fn type_url() -> String {
        ADDRESS_TYPE_URL.to_owned()
    }
}

// ---------------------------------------------------------------------------------------
// istio.security

#[derive(Clone, PartialEq, Message)]
pub struct Authorization {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(enumeration = "Scope", tag = "3")]
    pub scope: i32,
    #[prost(enumeration = "Action", tag = "4")]
    pub action: i32,
    /// OR-ed.
    #[prost(message, repeated, tag = "5")]
    pub rules: Vec<Rule>,
}

/// One AuthorizationPolicy rule: its clauses (from, to, each `when`) are AND-ed.
#[derive(Clone, PartialEq, Message)]
pub struct Rule {
    #[prost(message, repeated, tag = "1")]
    pub clauses: Vec<Clause>,
}

/// Matches OR-ed (the sources of one `from`, the operations of one `to`).
#[derive(Clone, PartialEq, Message)]
pub struct Clause {
    #[prost(message, repeated, tag = "2")]
    pub matches: Vec<Match>,
}

/// Values of one field OR-ed; the fields that are set AND-ed.
#[derive(Clone, PartialEq, Message)]
pub struct Match {
    #[prost(message, repeated, tag = "1")]
    pub namespaces: Vec<StringMatch>,
    #[prost(message, repeated, tag = "2")]
    pub not_namespaces: Vec<StringMatch>,
    /// SPIFFE IDs without `spiffe://` (`cluster.local/ns/a/sa/b`).
    #[prost(message, repeated, tag = "3")]
    pub principals: Vec<StringMatch>,
    #[prost(message, repeated, tag = "4")]
    pub not_principals: Vec<StringMatch>,
    #[prost(message, repeated, tag = "5")]
    pub source_ips: Vec<IpBlock>,
    #[prost(message, repeated, tag = "6")]
    pub not_source_ips: Vec<IpBlock>,
    #[prost(message, repeated, tag = "7")]
    pub destination_ips: Vec<IpBlock>,
    #[prost(message, repeated, tag = "8")]
    pub not_destination_ips: Vec<IpBlock>,
    #[prost(uint32, repeated, tag = "9")]
    pub destination_ports: Vec<u32>,
    #[prost(uint32, repeated, tag = "10")]
    pub not_destination_ports: Vec<u32>,
    // Ours (L7), see the module documentation.
    #[prost(message, repeated, tag = "1000")]
    pub methods: Vec<StringMatch>,
    #[prost(message, repeated, tag = "1001")]
    pub not_methods: Vec<StringMatch>,
    #[prost(message, repeated, tag = "1002")]
    pub paths: Vec<StringMatch>,
    #[prost(message, repeated, tag = "1003")]
    pub not_paths: Vec<StringMatch>,
    /// Compared without regard to case.
    #[prost(message, repeated, tag = "1004")]
    pub hosts: Vec<StringMatch>,
    #[prost(message, repeated, tag = "1005")]
    pub not_hosts: Vec<StringMatch>,
    /// `when: request.headers[name]` conditions (all of them must hold).
    #[prost(message, repeated, tag = "1006")]
    pub headers: Vec<HeaderCondition>,
}

impl Match {
    /// Whether any of our L7 fields is set.
    pub fn has_l7(&self) -> bool {
        !(self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.headers.is_empty())
    }
}

/// ztunnel's `istio.security.Address`: a CIDR.
#[derive(Clone, PartialEq, Message)]
pub struct IpBlock {
    #[prost(bytes = "vec", tag = "1")]
    pub address: Vec<u8>,
    #[prost(uint32, tag = "2")]
    pub length: u32,
}

#[derive(Clone, PartialEq, Message)]
pub struct StringMatch {
    #[prost(oneof = "string_match::MatchType", tags = "1, 2, 3, 4")]
    pub match_type: Option<string_match::MatchType>,
}

pub mod string_match {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum MatchType {
        #[prost(string, tag = "1")]
        Exact(String),
        #[prost(string, tag = "2")]
        Prefix(String),
        #[prost(string, tag = "3")]
        Suffix(String),
        /// `google.protobuf.Empty`: any non-empty value.
        #[prost(message, tag = "4")]
        Presence(super::Empty),
    }
}

#[derive(Clone, Copy, PartialEq, Message)]
pub struct Empty {}

/// Ours: `when: request.headers[name]` with `values` / `notValues`.
#[derive(Clone, PartialEq, Message)]
pub struct HeaderCondition {
    /// Lower case.
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, repeated, tag = "2")]
    pub values: Vec<StringMatch>,
    #[prost(message, repeated, tag = "3")]
    pub not_values: Vec<StringMatch>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Scope {
    /// Every workload of the mesh (a policy of the root namespace without a selector).
    Global = 0,
    /// The workloads of `namespace`.
    Namespace = 1,
    /// The workloads that list the policy (`Workload.authorization_policies`).
    WorkloadSelector = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Action {
    Allow = 0,
    Deny = 1,
    /// Ours: matching connections are logged, never refused.
    Audit = 2,
}

impl Name for Authorization {
    const NAME: &'static str = "Authorization";
    const PACKAGE: &'static str = "istio.security";
    fn type_url() -> String {
        AUTHORIZATION_TYPE_URL.to_owned()
    }
}

// ---------------------------------------------------------------------------------------
// meshagent.v1

/// An Istio PeerAuthentication (`security.istio.io/v1`), resolved: `scope` as for
/// `Authorization` (a selector-based one is listed by the workloads it selects).
#[derive(Clone, PartialEq, Message)]
pub struct PeerAuthentication {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(enumeration = "Scope", tag = "3")]
    pub scope: i32,
    #[prost(enumeration = "MtlsMode", tag = "4")]
    pub mode: i32,
    /// `portLevelMtls` (selector-based policies only, as Istio requires).
    #[prost(message, repeated, tag = "5")]
    pub port_level: Vec<PortMtls>,
}

#[derive(Clone, PartialEq, Message)]
pub struct PortMtls {
    #[prost(uint32, tag = "1")]
    pub port: u32,
    #[prost(enumeration = "MtlsMode", tag = "2")]
    pub mode: i32,
}

/// Istio's `PeerAuthentication.MutualTLS.Mode`, same values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum MtlsMode {
    /// Inherit from the parent (namespace, then mesh); PERMISSIVE at the top.
    Unset = 0,
    Disable = 1,
    Permissive = 2,
    Strict = 3,
}

impl Name for PeerAuthentication {
    const NAME: &'static str = "PeerAuthentication";
    const PACKAGE: &'static str = "meshagent.v1";
    fn type_url() -> String {
        PEER_AUTHENTICATION_TYPE_URL.to_owned()
    }
}

/// `Any.type_url` of a message (prost's `Name::type_url`), checked against the constants
/// above by the tests.
pub fn type_url<T: Name>() -> String {
    T::type_url()
}

/// Encodes for an `Any` value.
pub fn encode<T: Message>(m: &T) -> Vec<u8> {
    m.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_urls_are_ztunnels() {
        assert_eq!(type_url::<Address>(), ADDRESS_TYPE_URL);
        assert_eq!(type_url::<Authorization>(), AUTHORIZATION_TYPE_URL);
        assert_eq!(
            type_url::<PeerAuthentication>(),
            PEER_AUTHENTICATION_TYPE_URL
        );
    }

    #[test]
    fn field_numbers_are_ztunnels() {
        // Workload{uid=20 "u", name=1 "n", addresses=3 [1,2,3,4], tunnel_protocol=5 HBONE,
        // service_account=7 "s", node=9 "k"} as protoc encodes it.
        let w = Workload {
            uid: "u".into(),
            name: "n".into(),
            addresses: vec![vec![1, 2, 3, 4]],
            tunnel_protocol: TunnelProtocol::Hbone as i32,
            service_account: "s".into(),
            node: "k".into(),
            ..Default::default()
        };
        let b = w.encode_to_vec();
        let expect: &[u8] = &[
            0x0a, 1, b'n', // 1: name
            0x1a, 4, 1, 2, 3, 4, // 3: addresses
            0x28, 1, // 5: tunnel_protocol
            0x3a, 1, b's', // 7: service_account
            0x4a, 1, b'k', // 9: node
            0xa2, 0x01, 1, b'u', // 20: uid
        ];
        assert_eq!(b, expect);
        // Authorization.rules(5).clauses(1).matches(2).destination_ports(9)
        let a = Authorization {
            rules: vec![Rule {
                clauses: vec![Clause {
                    matches: vec![Match {
                        destination_ports: vec![80],
                        ..Default::default()
                    }],
                }],
            }],
            ..Default::default()
        };
        assert_eq!(a.encode_to_vec(), [0x2a, 7, 0x0a, 5, 0x12, 3, 0x4a, 1, 80]);
    }
}
