//! Istio's AuthorizationPolicy and PeerAuthentication (`security.istio.io/v1`, optional
//! CRDs, watched as dynamic objects like the routes) -> the control plane's model
//! (`control::model::security`), checked as the standalone file's are.
//!
//! An object that cannot be carried is reported and replaced by what fails closed, never
//! dropped (dropping a DENY policy would open what it closes): an AuthorizationPolicy
//! becomes one with the same name, namespace and selector that denies every connection
//! to the workloads it selects (DENY with a rule matching everything); a
//! PeerAuthentication becomes STRICT.

use std::sync::Arc;

use kube::{api::DynamicObject, ResourceExt as _};
use serde_json::{json, Value};

use crate::control::model::security::{
    AuthorizationPolicy, AuthorizationSpec, AuthzAction, MtlsModeSpec, MtlsSpec, ObjectMeta,
    PeerAuthentication, PeerAuthenticationSpec, RuleSpec, Security, WorkloadSelector,
};

pub const GROUP: &str = "security.istio.io";

fn meta(o: &DynamicObject) -> ObjectMeta {
    ObjectMeta {
        name: o.name_any(),
        namespace: o.namespace().unwrap_or_default(),
        labels: Default::default(),
        annotations: Default::default(),
    }
}

fn spec(o: &DynamicObject) -> Value {
    o.data.get("spec").cloned().unwrap_or_else(|| json!({}))
}

/// The selector as written, if it is one (used by the fail-closed replacements).
fn selector(o: &DynamicObject) -> Option<WorkloadSelector> {
    serde_json::from_value(spec(o).get("selector")?.clone()).ok()
}

fn check_one(check: impl FnOnce(&mut dyn FnMut(String))) -> Vec<String> {
    let mut problems = Vec::new();
    check(&mut |m| problems.push(m));
    problems
}

/// The policies in the stores, in namespace/name order; `problems` gets one
/// `namespace/name: reason` per object replaced by its fail-closed form.
pub fn security(
    authorization: &[Arc<DynamicObject>],
    peer: &[Arc<DynamicObject>],
    problems: &mut Vec<String>,
) -> Security {
    let mut out = Security::default();
    let mut authorization: Vec<&Arc<DynamicObject>> = authorization.iter().collect();
    authorization.sort_by_key(|o| (o.namespace(), o.name_any()));
    for o in authorization {
        let m = meta(o);
        let parsed = serde_json::from_value::<AuthorizationSpec>(spec(o))
            .map_err(|e| vec![e.to_string()])
            .and_then(|spec| {
                let p = AuthorizationPolicy {
                    api_version: None,
                    kind: None,
                    metadata: m.clone(),
                    spec,
                };
                let bad = check_one(|b| p.check("AuthorizationPolicy", b));
                if bad.is_empty() {
                    Ok(p)
                } else {
                    Err(bad)
                }
            });
        let p = parsed.unwrap_or_else(|why| {
            problems.push(format!(
                "{}: {}; denying every connection to the workloads it selects",
                m.key(),
                why.join("; ")
            ));
            AuthorizationPolicy {
                api_version: None,
                kind: None,
                metadata: m,
                spec: AuthorizationSpec {
                    selector: selector(o),
                    action: AuthzAction::Deny,
                    rules: vec![RuleSpec::default()],
                    ..Default::default()
                },
            }
        });
        out.authorization_policies.push(Arc::new(p));
    }
    let mut peer: Vec<&Arc<DynamicObject>> = peer.iter().collect();
    peer.sort_by_key(|o| (o.namespace(), o.name_any()));
    for o in peer {
        let m = meta(o);
        let parsed = serde_json::from_value::<PeerAuthenticationSpec>(spec(o))
            .map_err(|e| vec![e.to_string()])
            .and_then(|spec| {
                let p = PeerAuthentication {
                    api_version: None,
                    kind: None,
                    metadata: m.clone(),
                    spec,
                };
                let bad = check_one(|b| p.check("PeerAuthentication", b));
                if bad.is_empty() {
                    Ok(p)
                } else {
                    Err(bad)
                }
            });
        let p = parsed.unwrap_or_else(|why| {
            problems.push(format!("{}: {}; taken as STRICT", m.key(), why.join("; ")));
            PeerAuthentication {
                api_version: None,
                kind: None,
                metadata: m,
                spec: PeerAuthenticationSpec {
                    selector: selector(o),
                    mtls: Some(MtlsSpec {
                        mode: MtlsModeSpec::Strict,
                    }),
                    port_level_mtls: Default::default(),
                },
            }
        });
        out.peer_authentications.push(Arc::new(p));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(yaml: &str) -> Arc<DynamicObject> {
        Arc::new(serde_yaml::from_str(yaml).unwrap())
    }

    #[test]
    fn objects_convert_and_what_cannot_be_carried_fails_closed() {
        let authz = [
            obj("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ok, namespace: shop}\nspec: {selector: {matchLabels: {app: web}}, action: DENY, rules: [{from: [{source: {namespaces: [other]}}]}]}"),
            obj("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: jwt, namespace: shop}\nspec: {selector: {matchLabels: {app: db}}, rules: [{from: [{source: {requestPrincipals: ['*']}}]}]}"),
        ];
        let peer = [obj(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: shop}\nspec: {mtls: {mode: SOMETIMES}}",
        )];
        let mut problems = Vec::new();
        let s = security(&authz, &peer, &mut problems);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("shop/jwt: "), "{problems:?}");
        let jwt = &s.authorization_policies[0];
        assert_eq!(jwt.metadata.key(), "shop/jwt");
        assert_eq!(jwt.spec.action, AuthzAction::Deny);
        assert_eq!(jwt.spec.rules, vec![RuleSpec::default()]);
        assert_eq!(
            jwt.spec.selector.as_ref().unwrap().match_labels["app"],
            "db"
        );
        assert_eq!(s.authorization_policies[1].spec.action, AuthzAction::Deny);
        assert_eq!(s.authorization_policies[1].spec.rules.len(), 1);
        assert_eq!(
            s.peer_authentications[0].spec.mtls.unwrap().mode,
            MtlsModeSpec::Strict
        );
    }
}
