//! authentication.k8s.io/v1 `TokenReview` and `SelfSubjectReview` over a token table the
//! test sets (`KubeApi::set_token`). No signatures, no expiry: a token is a key of the
//! table. Nothing else authenticates: other requests are served whoever sends them.

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard},
};

use serde_json::{json, Value};

use super::store::ApiError;

/// The audience of tokens reviewed without `spec.audiences` (the API server's own).
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// Token -> (`UserInfo` JSON, audiences).
#[derive(Default)]
pub struct Tokens(Mutex<HashMap<String, (Value, Vec<String>)>>);

impl Tokens {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, (Value, Vec<String>)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set(&self, token: &str, user: Value, audiences: Vec<String>) {
        self.lock().insert(token.to_owned(), (user, audiences));
    }

    pub fn remove(&self, token: &str) {
        self.lock().remove(token);
    }
}

/// Which review a path asks for (`POST` only).
pub fn review_kind(path: &str) -> Option<&'static str> {
    match path.trim_end_matches('/') {
        "/apis/authentication.k8s.io/v1/tokenreviews" => Some("TokenReview"),
        "/apis/authentication.k8s.io/v1/selfsubjectreviews" => Some("SelfSubjectReview"),
        _ => None,
    }
}

/// The answer (201) to a review: `bearer` is the request's own token (SelfSubjectReview).
pub fn review(
    tokens: &Tokens,
    kind: &str,
    bearer: Option<&str>,
    body: &[u8],
) -> Result<Value, ApiError> {
    let req: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("couldn't decode the {kind}: {e}")))?;
    if req["kind"] != kind || req["apiVersion"] != "authentication.k8s.io/v1" {
        return Err(ApiError::bad_request(format!(
            "expected authentication.k8s.io/v1 {kind}, got {} {}",
            req["apiVersion"], req["kind"]
        )));
    }
    let head = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": kind,
        "metadata": {"creationTimestamp": null},
    });
    let mut out = head;
    if kind == "SelfSubjectReview" {
        let user = bearer
            .and_then(|t| tokens.lock().get(t).map(|(u, _)| u.clone()))
            .unwrap_or_else(
                || json!({"username": "system:anonymous", "groups": ["system:unauthenticated"]}),
            );
        out["status"] = json!({"userInfo": user});
        return Ok(out);
    }
    let token = req["spec"]["token"].as_str().unwrap_or_default();
    let mut wanted: Vec<String> = req["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if wanted.is_empty() {
        wanted.push(API_AUDIENCE.to_owned());
    }
    out["spec"] = req["spec"].clone();
    out["status"] = match tokens.lock().get(token) {
        None => json!({"user": {}, "error": "[invalid bearer token, token lookup failed]"}),
        Some((user, auds)) => {
            let both: Vec<&String> = wanted.iter().filter(|a| auds.contains(a)).collect();
            if both.is_empty() {
                json!({"user": {}, "error": format!(
                    "[invalid bearer token, token audiences {auds:?} is invalid for the target audiences {wanted:?}]"
                )})
            } else {
                json!({"authenticated": true, "user": user, "audiences": both})
            }
        }
    };
    Ok(out)
}

/// The `UserInfo` of a ServiceAccount token; bound to a pod (`(name, uid)`) and, as
/// Kubernetes 1.30+ does, to its node (`Some(node)`).
pub fn service_account_user(
    namespace: &str,
    name: &str,
    pod: Option<(&str, &str)>,
    node: Option<&str>,
) -> Value {
    let mut extra = serde_json::Map::new();
    if let Some((pod, uid)) = pod {
        extra.insert("authentication.kubernetes.io/pod-name".into(), json!([pod]));
        extra.insert("authentication.kubernetes.io/pod-uid".into(), json!([uid]));
    }
    if let Some(node) = node {
        extra.insert(
            "authentication.kubernetes.io/node-name".into(),
            json!([node]),
        );
    }
    let mut user = json!({
        "username": format!("system:serviceaccount:{namespace}:{name}"),
        "uid": format!("sa-uid-{namespace}-{name}"),
        "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{namespace}"), "system:authenticated"],
    });
    if !extra.is_empty() {
        user["extra"] = Value::Object(extra);
    }
    user
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reviews_check_the_table_and_the_audience() {
        let t = Tokens::default();
        t.set(
            "tok",
            service_account_user("ns", "sa", Some(("p", "u")), Some("n1")),
            vec!["istio-ca".into()],
        );
        let body = |tok: &str, aud: &[&str]| {
            serde_json::to_vec(
                &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": tok, "audiences": aud}}),
            )
            .unwrap()
        };
        let ok = review(&t, "TokenReview", None, &body("tok", &["istio-ca", "x"])).unwrap();
        assert_eq!(ok["status"]["authenticated"], true);
        assert_eq!(ok["status"]["audiences"], json!(["istio-ca"]));
        assert_eq!(
            ok["status"]["user"]["extra"]["authentication.kubernetes.io/node-name"],
            json!(["n1"])
        );
        let wrong = review(&t, "TokenReview", None, &body("tok", &[])).unwrap();
        assert!(wrong["status"]["authenticated"].is_null(), "{wrong}");
        assert!(wrong["status"]["error"]
            .as_str()
            .unwrap()
            .contains("audiences"));
        let unknown = review(&t, "TokenReview", None, &body("nope", &["istio-ca"])).unwrap();
        assert!(unknown["status"]["authenticated"].is_null());
        let me = serde_json::to_vec(
            &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}),
        )
        .unwrap();
        let who = review(&t, "SelfSubjectReview", Some("tok"), &me).unwrap();
        assert_eq!(
            who["status"]["userInfo"]["username"],
            "system:serviceaccount:ns:sa"
        );
        let anon = review(&t, "SelfSubjectReview", None, &me).unwrap();
        assert_eq!(anon["status"]["userInfo"]["username"], "system:anonymous");
    }
}
