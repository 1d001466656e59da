//! The resource table (one row per served resource) and the documents derived from it:
//! legacy discovery (`/api`, `/apis`, APIResourceList) and a minimal OpenAPI v3 index that
//! tells kubectl the server takes `fieldValidation` (see the module doc of `kubeapi`).

use serde_json::{json, Value};

/// One served resource. Adding a row is all it takes to serve another type.
#[derive(Debug)]
pub struct Resource {
    /// API group, `""` for the core (legacy) group.
    pub group: &'static str,
    pub version: &'static str,
    /// The URL segment (plural), e.g. `pods`.
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    /// Has a `/status` subresource: writes to the main resource keep the stored status,
    /// writes to `/status` change only the status, create resets it (as the real strategies).
    pub status: bool,
    /// A custom resource (CRD) in a real cluster: list items keep `apiVersion`/`kind`
    /// (unstructured), built-in lists omit them.
    pub crd: bool,
}

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

macro_rules! res {
    ($g:expr, $v:expr, $plural:expr, $singular:expr, $kind:expr, ns = $ns:expr,
     short = [$($s:expr),*], cat = [$($c:expr),*], status = $st:expr, crd = $crd:expr) => {
        Resource {
            group: $g, version: $v, plural: $plural, singular: $singular, kind: $kind,
            namespaced: $ns, short_names: &[$($s),*], categories: &[$($c),*], status: $st,
            crd: $crd,
        }
    };
}

/// Every served resource. Core first: kubectl resolves a short name or a plural served by
/// several groups to the first group in discovery order, and the core group comes first
/// in a real server too.
pub const RESOURCES: &[Resource] = &[
    res!(
        "",
        "v1",
        "namespaces",
        "namespace",
        "Namespace",
        ns = false,
        short = ["ns"],
        cat = [],
        status = true,
        crd = false
    ),
    res!(
        "",
        "v1",
        "nodes",
        "node",
        "Node",
        ns = false,
        short = ["no"],
        cat = [],
        status = true,
        crd = false
    ),
    res!(
        "",
        "v1",
        "pods",
        "pod",
        "Pod",
        ns = true,
        short = ["po"],
        cat = ["all"],
        status = true,
        crd = false
    ),
    res!(
        "",
        "v1",
        "services",
        "service",
        "Service",
        ns = true,
        short = ["svc"],
        cat = ["all"],
        status = true,
        crd = false
    ),
    res!(
        "",
        "v1",
        "endpoints",
        "endpoints",
        "Endpoints",
        ns = true,
        short = ["ep"],
        cat = [],
        status = false,
        crd = false
    ),
    res!(
        "",
        "v1",
        "serviceaccounts",
        "serviceaccount",
        "ServiceAccount",
        ns = true,
        short = ["sa"],
        cat = [],
        status = false,
        crd = false
    ),
    res!(
        "",
        "v1",
        "configmaps",
        "configmap",
        "ConfigMap",
        ns = true,
        short = ["cm"],
        cat = [],
        status = false,
        crd = false
    ),
    res!(
        "",
        "v1",
        "events",
        "event",
        "Event",
        ns = true,
        short = ["ev"],
        cat = [],
        status = false,
        crd = false
    ),
    res!(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        "endpointslice",
        "EndpointSlice",
        ns = true,
        short = [],
        cat = [],
        status = false,
        crd = false
    ),
    res!(
        "gateway.networking.k8s.io",
        "v1",
        "httproutes",
        "httproute",
        "HTTPRoute",
        ns = true,
        short = [],
        cat = ["gateway-api"],
        status = true,
        crd = true
    ),
    res!(
        "gateway.networking.k8s.io",
        "v1",
        "grpcroutes",
        "grpcroute",
        "GRPCRoute",
        ns = true,
        short = [],
        cat = ["gateway-api"],
        status = true,
        crd = true
    ),
];

impl Resource {
    /// `v1` or `group/version`, as in `apiVersion`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods` or `httproutes.gateway.networking.k8s.io`, as in the real server's messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The index of the resource served at `plural` in `group/version`.
    pub fn find(group: &str, version: &str, plural: &str) -> Option<usize> {
        RESOURCES
            .iter()
            .position(|r| r.group == group && r.version == version && r.plural == plural)
    }

    /// The index of the first resource with this plural (any group), for the Rust API.
    pub fn by_plural(plural: &str) -> Option<usize> {
        RESOURCES.iter().position(|r| r.plural == plural)
    }
}

/// Served `(group, version)` pairs in table order, each once.
fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for r in RESOURCES {
        if !out.contains(&(r.group, r.version)) {
            out.push((r.group, r.version));
        }
    }
    out
}

pub fn version() -> Value {
    json!({
        "major": "1", "minor": "32", "gitVersion": "v1.32.0",
        "gitCommit": "kube-double", "gitTreeState": "clean",
        "buildDate": "2024-12-11T00:00:00Z", "goVersion": "go1.23.4",
        "compiler": "gc", "platform": "linux/amd64",
    })
}

/// `/api` (APIVersions).
pub fn api_versions(server: &str) -> Value {
    json!({
        "kind": "APIVersions", "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server}],
    })
}

fn api_group(group: &str) -> Value {
    let versions: Vec<Value> = group_versions()
        .into_iter()
        .filter(|(g, _)| *g == group)
        .map(|(g, v)| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
        .collect();
    let preferred = versions[0].clone();
    json!({"name": group, "versions": versions, "preferredVersion": preferred})
}

/// `/apis` (APIGroupList).
pub fn api_group_list() -> Value {
    let mut groups: Vec<&str> = Vec::new();
    for (g, _) in group_versions() {
        if !g.is_empty() && !groups.contains(&g) {
            groups.push(g);
        }
    }
    let groups: Vec<Value> = groups.into_iter().map(api_group).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/<group>` (APIGroup), `None` for an unknown group.
pub fn api_group_doc(group: &str) -> Option<Value> {
    if group.is_empty() || !RESOURCES.iter().any(|r| r.group == group) {
        return None;
    }
    let mut doc = api_group(group);
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Some(doc)
}

/// `/api/v1` or `/apis/<group>/<version>` (APIResourceList).
pub fn api_resource_list(group: &str, version: &str) -> Option<Value> {
    let mut list = Vec::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let mut entry = json!({
            "name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
            "kind": r.kind, "verbs": VERBS,
        });
        if !r.short_names.is_empty() {
            entry["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            entry["categories"] = json!(r.categories);
        }
        list.push(entry);
        if r.status {
            list.push(json!({
                "name": format!("{}/status", r.plural), "singularName": "",
                "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get", "patch", "update"],
            }));
        }
    }
    if list.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list}),
    )
}

/// `/openapi/v3`: one entry per served group/version.
pub fn openapi_v3_index() -> Value {
    let mut paths = serde_json::Map::new();
    for (g, v) in group_versions() {
        let key = if g.is_empty() {
            format!("api/{v}")
        } else {
            format!("apis/{g}/{v}")
        };
        let url = format!("/openapi/v3/{key}?hash=kube-double");
        paths.insert(key, json!({"serverRelativeURL": url}));
    }
    json!({"paths": paths})
}

/// `/openapi/v3/api/v1`, `/openapi/v3/apis/<g>/<v>`: no schemas, only a PATCH operation per
/// kind that lists the `fieldValidation` query parameter. That is what kubectl's default
/// `--validate=strict` looks for before it leaves validation to the server (which this
/// double does not do: unknown fields are stored as sent).
pub fn openapi_v3_doc(group: &str, version: &str) -> Option<Value> {
    let mut paths = serde_json::Map::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let prefix = if group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{group}/{version}")
        };
        let path = if r.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", r.plural)
        } else {
            format!("{prefix}/{}/{{name}}", r.plural)
        };
        let params: Vec<Value> = ["dryRun", "fieldManager", "fieldValidation", "force"]
            .iter()
            .map(|p| json!({"name": p, "in": "query", "schema": {"type": "string", "uniqueItems": true}}))
            .collect();
        paths.insert(
            path,
            json!({"patch": {
                "operationId": format!("patch{}", r.kind),
                "parameters": params,
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-action": "patch",
                "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
            }}),
        );
    }
    if paths.is_empty() {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (kube-double)", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}
