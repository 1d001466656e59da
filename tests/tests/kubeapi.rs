//! Tests of the Kubernetes API server test double (`mesh_tests::kubeapi`), driven by the
//! real kubectl (and raw HTTP where kubectl hides what is checked: watch framing,
//! bookmarks, 410s). No root needed; everything on 127.0.0.1 with port 0.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use mesh_tests::kubeapi::{KubeApi, Options};
use serde_json::{json, Value};

fn get_json(api: &KubeApi, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = api.kubectl(&all).unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("kubectl {args:?}: {e}: {out}"))
}

fn kubectl_err(api: &KubeApi, args: &[&str]) -> String {
    match api.kubectl(args) {
        Ok(out) => panic!("kubectl {args:?} should fail, printed {out}"),
        Err(e) => e.to_string(),
    }
}

const NAMESPACE: &str = "apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {mesh-agent.io/dataplane-mode: ambient}
";

const POD: &str = "apiVersion: v1
kind: Pod
metadata:
  name: reviews-v1-abc
  namespace: shop
  labels: {app: reviews, version: v1}
spec:
  nodeName: node-a
  serviceAccountName: reviews
  containers:
  - name: reviews
    image: example/reviews:1.0
    ports:
    - {name: http, containerPort: 9080, protocol: TCP}
    env:
    - {name: LOG, value: debug}
";

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: shop
  labels: {app: reviews}
spec:
  selector: {app: reviews}
  ports:
  - {name: http, port: 9080}
";

const SERVICE_ACCOUNT: &str = "apiVersion: v1
kind: ServiceAccount
metadata:
  name: reviews
  namespace: shop
";

const ENDPOINT_SLICE: &str = "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: reviews-abcde
  namespace: shop
  labels: {kubernetes.io/service-name: reviews, endpointslice.kubernetes.io/managed-by: test}
addressType: IPv4
ports:
- {name: http, port: 9080, protocol: TCP}
endpoints:
- addresses: [10.1.0.5]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-a
  targetRef: {kind: Pod, name: reviews-v1-abc, namespace: shop}
";

const HTTP_ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews
  namespace: shop
  labels: {app: reviews}
spec:
  parentRefs:
  - {group: "", kind: Service, name: reviews, port: 9080}
  rules:
  - matches:
    - path: {type: PathPrefix, value: /api}
      headers:
      - {type: Exact, name: x-canary, value: "true"}
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set:
        - {name: x-mesh, value: "1"}
    backendRefs:
    - {name: reviews-v2, port: 9080, weight: 100}
  - backendRefs:
    - {name: reviews-v1, port: 9080, weight: 90}
    - {name: reviews-v2, port: 9080, weight: 10}
    timeouts: {request: 2s}
"#;

const GRPC_ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata:
  name: ratings
  namespace: shop
spec:
  parentRefs:
  - {group: "", kind: Service, name: ratings, port: 9090}
  rules:
  - matches:
    - method: {type: Exact, service: ratings.v1.Ratings, method: Get}
    backendRefs:
    - {name: ratings-v1, port: 9090, weight: 1}
"#;

/// The shop namespace with a pod, a service, a service account and an endpoint slice.
fn shop(api: &KubeApi) {
    for m in [NAMESPACE, SERVICE_ACCOUNT, POD, SERVICE, ENDPOINT_SLICE] {
        api.kubectl_stdin(&["create", "-f", "-"], m).unwrap();
    }
}

#[test]
fn core_resources_crud_with_kubectl() {
    let api = KubeApi::start().unwrap();
    shop(&api);

    let pod = get_json(&api, &["get", "pod", "reviews-v1-abc", "-n", "shop"]);
    let uid = pod["metadata"]["uid"].as_str().unwrap();
    assert_eq!(uid.len(), 36, "{uid}");
    assert!(pod["metadata"]["creationTimestamp"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    assert_eq!(pod["metadata"]["namespace"], "shop");
    assert_eq!(
        pod["status"],
        json!({"phase": "Pending"}),
        "create resets status"
    );
    assert_eq!(
        pod["spec"]["containers"][0]["ports"][0]["containerPort"],
        9080
    );

    let svc = get_json(&api, &["get", "svc", "reviews", "-n", "shop"]);
    assert!(svc["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .starts_with("10.96."));
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 9080);
    assert_eq!(svc["spec"]["type"], "ClusterIP");

    let slice = get_json(
        &api,
        &[
            "get",
            "endpointslices",
            "-n",
            "shop",
            "-l",
            "kubernetes.io/service-name=reviews",
        ],
    );
    assert_eq!(slice["kind"], "List");
    assert_eq!(
        slice["items"][0]["endpoints"][0]["addresses"][0],
        "10.1.0.5"
    );
    let sa = get_json(&api, &["get", "sa", "reviews", "-n", "shop"]);
    assert_eq!(sa["kind"], "ServiceAccount");
    let ns = get_json(&api, &["get", "ns", "shop"]);
    assert_eq!(ns["status"]["phase"], "Active");
    assert_eq!(
        ns["metadata"]["labels"]["kubernetes.io/metadata.name"],
        "shop"
    );

    // label, annotate, merge patch, JSON patch, strategic (the default), each visible.
    api.kubectl(&[
        "label",
        "pod",
        "reviews-v1-abc",
        "-n",
        "shop",
        "track=stable",
    ])
    .unwrap();
    api.kubectl(&["annotate", "svc", "reviews", "-n", "shop", "note=hello"])
        .unwrap();
    api.kubectl(&[
        "patch",
        "sa",
        "reviews",
        "-n",
        "shop",
        "--type=merge",
        "-p",
        r#"{"automountServiceAccountToken":false}"#,
    ])
    .unwrap();
    api.kubectl(&["patch", "endpointslice", "reviews-abcde", "-n", "shop", "--type=json", "-p",
        r#"[{"op":"test","path":"/endpoints/0/conditions/ready","value":true},{"op":"replace","path":"/endpoints/0/conditions/ready","value":false}]"#]).unwrap();
    api.kubectl(&[
        "patch",
        "pod",
        "reviews-v1-abc",
        "-n",
        "shop",
        "-p",
        r#"{"spec":{"containers":[{"name":"reviews","image":"example/reviews:1.1"}]}}"#,
    ])
    .unwrap();
    api.kubectl(&["label", "ns", "shop", "team=books"]).unwrap();
    let pod = get_json(&api, &["get", "pod", "reviews-v1-abc", "-n", "shop"]);
    assert_eq!(pod["metadata"]["labels"]["track"], "stable");
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["image"], "example/reviews:1.1");
    assert_eq!(
        c["ports"][0]["containerPort"], 9080,
        "strategic merge keeps the container's other fields: {c}"
    );
    assert_eq!(
        get_json(&api, &["get", "svc", "reviews", "-n", "shop"])["metadata"]["annotations"]["note"],
        "hello"
    );
    assert_eq!(
        get_json(&api, &["get", "sa", "reviews", "-n", "shop"])["automountServiceAccountToken"],
        false
    );
    let slice = get_json(
        &api,
        &["get", "endpointslice", "reviews-abcde", "-n", "shop"],
    );
    assert_eq!(slice["endpoints"][0]["conditions"]["ready"], false);
    assert_eq!(
        get_json(&api, &["get", "ns", "shop"])["metadata"]["labels"]["team"],
        "books"
    );

    // replace (PUT) keeps uid and allocated clusterIP, bumps resourceVersion.
    let before = get_json(&api, &["get", "svc", "reviews", "-n", "shop"]);
    api.kubectl_stdin(
        &["replace", "-f", "-"],
        &SERVICE.replace("port: 9080", "port: 9081"),
    )
    .unwrap();
    let after = get_json(&api, &["get", "svc", "reviews", "-n", "shop"]);
    assert_eq!(after["metadata"]["uid"], before["metadata"]["uid"]);
    assert_eq!(after["spec"]["clusterIP"], before["spec"]["clusterIP"]);
    assert_eq!(after["spec"]["ports"][0]["port"], 9081);
    let rv = |v: &Value| {
        v["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    assert!(rv(&after) > rv(&before));

    // apply, twice: create then configure.
    api.kubectl_stdin(
        &["apply", "-f", "-"],
        &POD.replace("reviews-v1-abc", "reviews-v1-def"),
    )
    .unwrap();
    let out = api
        .kubectl_stdin(
            &["apply", "-f", "-"],
            &POD.replace("reviews-v1-abc", "reviews-v1-def")
                .replace("node-a", "node-b"),
        )
        .unwrap();
    assert!(out.contains("configured"), "{out}");

    // Selectors.
    let names = |out: String| {
        out.split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let by_node = api
        .kubectl(&[
            "get",
            "pods",
            "-n",
            "shop",
            "--field-selector",
            "spec.nodeName=node-a",
            "-o",
            "name",
        ])
        .unwrap();
    assert_eq!(names(by_node), ["pod/reviews-v1-abc"]);
    let all_ns = api
        .kubectl(&[
            "get",
            "pods",
            "-A",
            "-l",
            "app=reviews,track in (stable)",
            "-o",
            "name",
        ])
        .unwrap();
    assert_eq!(names(all_ns), ["pod/reviews-v1-abc"]);
    let not = api
        .kubectl(&["get", "pods", "-n", "shop", "-l", "!track", "-o", "name"])
        .unwrap();
    assert_eq!(names(not), ["pod/reviews-v1-def"]);
    let phase = api
        .kubectl(&[
            "get",
            "pods",
            "-A",
            "--field-selector",
            "status.phase=Pending,metadata.namespace=shop",
            "-o",
            "name",
        ])
        .unwrap();
    assert_eq!(names(phase).len(), 2);

    // delete, one of each.
    for (kind, name) in [
        ("pod", "reviews-v1-abc"),
        ("svc", "reviews"),
        ("sa", "reviews"),
        ("endpointslice", "reviews-abcde"),
    ] {
        let out = api.kubectl(&["delete", kind, name, "-n", "shop"]).unwrap();
        assert!(out.contains("deleted"), "{out}");
    }
    assert_eq!(api.objects("pods").len(), 1);
    assert!(api.objects("services").is_empty());
    assert!(api.objects("serviceaccounts").is_empty());
    assert!(api.objects("endpointslices").is_empty());
}

#[test]
fn kubectl_generator_commands() {
    // `kubectl create namespace|serviceaccount|configmap` send protobuf.
    let api = KubeApi::start().unwrap();
    api.kubectl(&["create", "namespace", "gen"]).unwrap();
    api.kubectl(&["create", "serviceaccount", "robot", "-n", "gen"])
        .unwrap();
    api.kubectl(&[
        "create",
        "configmap",
        "cfg",
        "-n",
        "gen",
        "--from-literal=a=1",
        "--from-literal=b=2",
    ])
    .unwrap();
    api.kubectl(&["run", "web", "-n", "gen", "--image=nginx", "-l", "app=web"])
        .unwrap();
    let cm = get_json(&api, &["get", "cm", "cfg", "-n", "gen"]);
    assert_eq!(cm["data"], json!({"a": "1", "b": "2"}));
    assert_eq!(
        get_json(&api, &["get", "sa", "robot", "-n", "gen"])["metadata"]["namespace"],
        "gen"
    );
    assert_eq!(
        get_json(&api, &["get", "pod", "web", "-n", "gen"])["metadata"]["labels"]["app"],
        "web"
    );
    let err = kubectl_err(
        &api,
        &[
            "create",
            "service",
            "clusterip",
            "web",
            "-n",
            "gen",
            "--tcp=80:8080",
        ],
    );
    assert!(
        err.contains("protobuf") && err.contains("manifest"),
        "{err}"
    );
}

#[test]
fn gateway_routes_crud_with_kubectl() {
    let api = KubeApi::start().unwrap();
    api.kubectl_stdin(&["create", "-f", "-"], NAMESPACE)
        .unwrap();
    api.kubectl_stdin(&["apply", "-f", "-"], HTTP_ROUTE)
        .unwrap();
    api.kubectl_stdin(&["create", "-f", "-"], GRPC_ROUTE)
        .unwrap();

    let route = get_json(&api, &["get", "httproute", "reviews", "-n", "shop"]);
    assert_eq!(route["apiVersion"], "gateway.networking.k8s.io/v1");
    assert_eq!(
        route["spec"]["parentRefs"][0],
        json!({"group": "", "kind": "Service", "name": "reviews", "port": 9080})
    );
    assert_eq!(route["spec"]["rules"][1]["backendRefs"][1]["weight"], 10);
    assert_eq!(
        route["spec"]["rules"][0]["filters"][0]["type"],
        "RequestHeaderModifier"
    );
    let list = get_json(&api, &["get", "httproutes.gateway.networking.k8s.io", "-A"]);
    assert_eq!(
        list["items"][0]["kind"], "HTTPRoute",
        "custom resources list with kind"
    );

    api.kubectl(&["label", "httproute", "reviews", "-n", "shop", "canary=on"])
        .unwrap();
    api.kubectl(&[
        "annotate",
        "grpcroute",
        "ratings",
        "-n",
        "shop",
        "owner=ratings-team",
    ])
    .unwrap();
    api.kubectl(&[
        "patch",
        "httproute",
        "reviews",
        "-n",
        "shop",
        "--type=merge",
        "-p",
        r#"{"spec":{"rules":[{"backendRefs":[{"name":"reviews-v3","port":9080}]}]}}"#,
    ])
    .unwrap();
    api.kubectl(&["patch", "grpcroute", "ratings", "-n", "shop", "--type=json", "-p",
        r#"[{"op":"add","path":"/spec/rules/0/backendRefs/-","value":{"name":"ratings-v2","port":9090,"weight":1}}]"#]).unwrap();
    let route = get_json(&api, &["get", "httproute", "reviews", "-n", "shop"]);
    assert_eq!(route["metadata"]["labels"]["canary"], "on");
    assert_eq!(
        route["spec"]["rules"],
        json!([{"backendRefs": [{"name": "reviews-v3", "port": 9080}]}]),
        "merge patch replaces lists"
    );
    assert_eq!(
        route["metadata"]["generation"], 2,
        "spec change bumps generation"
    );
    let grpc = get_json(&api, &["get", "grpcroute", "ratings", "-n", "shop"]);
    assert_eq!(grpc["metadata"]["annotations"]["owner"], "ratings-team");
    assert_eq!(
        grpc["spec"]["rules"][0]["backendRefs"][1]["name"],
        "ratings-v2"
    );

    api.kubectl_stdin(&["replace", "-f", "-"], HTTP_ROUTE)
        .unwrap();
    let route = get_json(&api, &["get", "httproute", "reviews", "-n", "shop"]);
    assert_eq!(route["spec"]["rules"].as_array().unwrap().len(), 2);
    assert!(
        route["metadata"]["labels"].get("canary").is_none(),
        "replace replaces"
    );

    // Status is a subresource: the main resource ignores it, /status takes only it.
    api.kubectl(&["patch", "httproute", "reviews", "-n", "shop", "--subresource=status", "--type=merge", "-p",
        r#"{"status":{"parents":[{"parentRef":{"name":"reviews"},"controllerName":"mesh-agent.io/agent","conditions":[]}]}}"#]).unwrap();
    api.kubectl(&[
        "patch",
        "httproute",
        "reviews",
        "-n",
        "shop",
        "--type=merge",
        "-p",
        r#"{"status":null}"#,
    ])
    .unwrap();
    let route = get_json(&api, &["get", "httproute", "reviews", "-n", "shop"]);
    assert_eq!(
        route["status"]["parents"][0]["controllerName"],
        "mesh-agent.io/agent"
    );

    api.kubectl(&["delete", "httproute", "reviews", "-n", "shop"])
        .unwrap();
    api.kubectl_stdin(&["delete", "-f", "-"], GRPC_ROUTE)
        .unwrap();
    assert!(api.objects("httproutes").is_empty() && api.objects("grpcroutes").is_empty());
}

#[test]
fn errors_surface_through_kubectl() {
    let api = KubeApi::start().unwrap();
    shop(&api);
    let e = kubectl_err(&api, &["get", "pod", "nope", "-n", "shop"]);
    assert!(
        e.contains(r#"Error from server (NotFound): pods "nope" not found"#),
        "{e}"
    );
    let e = kubectl_err(&api, &["get", "httproute", "nope", "-n", "shop"]);
    assert!(
        e.contains(r#"httproutes.gateway.networking.k8s.io "nope" not found"#),
        "{e}"
    );
    let e = kubectl_err(&api, &["create", "-f", "-"]);
    assert!(e.contains("no objects passed to create"), "{e}");
    let e = api
        .kubectl_stdin(&["create", "-f", "-"], SERVICE)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(r#"Error from server (AlreadyExists)"#)
            && e.contains(r#"services "reviews" already exists"#),
        "{e}"
    );
    let e = api
        .kubectl_stdin(
            &["create", "-f", "-"],
            &SERVICE.replace("namespace: shop", "namespace: nowhere"),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains(r#"namespaces "nowhere" not found"#), "{e}");
    // A stale resourceVersion on replace: 409 Conflict.
    let stale = api
        .kubectl(&["get", "sa", "reviews", "-n", "shop", "-o", "yaml"])
        .unwrap();
    api.kubectl(&["label", "sa", "reviews", "-n", "shop", "x=y"])
        .unwrap();
    let e = api
        .kubectl_stdin(&["replace", "-f", "-"], &stale)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("Error from server (Conflict)") && e.contains("the object has been modified"),
        "{e}"
    );
    let e = kubectl_err(&api, &["get", "pods", "-n", "shop", "-l", "app in reviews"]);
    assert!(
        e.contains("BadRequest") && e.contains("unable to parse requirement"),
        "{e}"
    );
    let e = kubectl_err(
        &api,
        &[
            "patch",
            "pod",
            "reviews-v1-abc",
            "-n",
            "shop",
            "--type=json",
            "-p",
            r#"[{"op":"test","path":"/metadata/name","value":"other"}]"#,
        ],
    );
    assert!(e.contains("testing value"), "{e}");
    // Injected failures: the next request only.
    api.fail_next(1, 503);
    let e = kubectl_err(&api, &["get", "--raw", "/api/v1/namespaces/shop/pods"]);
    assert!(e.contains("ServiceUnavailable") || e.contains("503"), "{e}");
    api.kubectl(&["get", "--raw", "/api/v1/namespaces/shop/pods"])
        .unwrap();
    assert_eq!(api.stats().injected_failures, 1);
    // dryRun does not persist.
    api.kubectl_stdin(
        &["create", "--dry-run=server", "-f", "-"],
        &SERVICE.replace("name: reviews\n", "name: dry\n"),
    )
    .unwrap();
    api.kubectl(&[
        "delete",
        "pod",
        "reviews-v1-abc",
        "-n",
        "shop",
        "--dry-run=server",
    ])
    .unwrap();
    assert_eq!(api.objects("services").len(), 1);
    assert_eq!(api.objects("pods").len(), 1);
}

#[test]
fn events_and_pod_status() {
    let api = KubeApi::start().unwrap();
    shop(&api);
    let event = r#"apiVersion: v1
kind: Event
metadata: {generateName: reviews-v1-abc., namespace: shop}
involvedObject: {apiVersion: v1, kind: Pod, name: reviews-v1-abc, namespace: shop}
reason: MeshEnrolled
message: enrolled by mesh-agent
type: Normal
source: {component: mesh-agent, host: node-a}
count: 1
firstTimestamp: "2025-01-01T00:00:00Z"
lastTimestamp: "2025-01-01T00:00:00Z"
"#;
    let out = api.kubectl_stdin(&["create", "-f", "-"], event).unwrap();
    assert!(
        out.starts_with("event/reviews-v1-abc."),
        "generateName: {out}"
    );
    let out = api.kubectl(&["get", "events", "-n", "shop"]).unwrap();
    assert!(out.contains("reviews-v1-abc."), "{out}");
    let events = get_json(&api, &["get", "ev", "-A"]);
    assert_eq!(events["items"][0]["reason"], "MeshEnrolled");

    // Tests set pod IPs through the status subresource.
    api.set_pod_running("shop", "reviews-v1-abc", "10.1.0.5")
        .unwrap();
    let pod = get_json(&api, &["get", "pod", "reviews-v1-abc", "-n", "shop"]);
    assert_eq!(pod["status"]["podIP"], "10.1.0.5");
    // A write to the main resource keeps the status.
    api.kubectl(&["label", "pod", "reviews-v1-abc", "-n", "shop", "a=b"])
        .unwrap();
    let on_node = api
        .kubectl(&[
            "get",
            "pods",
            "-A",
            "--field-selector",
            "status.podIP=10.1.0.5,status.phase=Running",
            "-o",
            "name",
        ])
        .unwrap();
    assert_eq!(on_node.trim(), "pod/reviews-v1-abc");
    let status = get_json(
        &api,
        &[
            "get",
            "pod",
            "reviews-v1-abc",
            "-n",
            "shop",
            "--subresource=status",
        ],
    );
    assert_eq!(status["status"]["phase"], "Running");
}

/// A raw HTTP/1.1 watch, read on a thread: each event as it arrives, then `End`.
enum Line {
    Event(Value),
    /// The stream ended with the final chunk (`true`) or broke off (`false`).
    End(bool),
}

fn raw_watch(api: &KubeApi, path: &str) -> mpsc::Receiver<Line> {
    let mut s = TcpStream::connect(api.addr()).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: kube\r\nAccept: application/json\r\n\r\n"
    )
    .unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut r = BufReader::new(s);
        let mut line = String::new();
        let mut clean = false;
        while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
            let l = line.trim();
            if l.starts_with('{') {
                let _ = tx.send(Line::Event(serde_json::from_str(l).expect("event JSON")));
            } else if l == "0" {
                clean = true;
                break;
            }
            line.clear();
        }
        let _ = tx.send(Line::End(clean));
    });
    rx
}

fn next_event(rx: &mpsc::Receiver<Line>) -> Value {
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Line::Event(v)) => v,
        Ok(Line::End(clean)) => panic!("watch ended (clean: {clean})"),
        Err(e) => panic!("no event: {e}"),
    }
}

/// The next event that is not a periodic bookmark.
fn next_change(rx: &mpsc::Receiver<Line>) -> (String, Value) {
    loop {
        let ev = next_event(rx);
        let ty = ev["type"].as_str().unwrap().to_string();
        if ty != "BOOKMARK" {
            return (ty, ev["object"].clone());
        }
    }
}

fn end_of(rx: &mpsc::Receiver<Line>) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Line::End(clean)) = rx.recv_timeout(Duration::from_secs(5)) {
            return clean;
        }
    }
    panic!("the watch did not end");
}

#[test]
fn watch_events_bookmarks_expiry_and_faults() {
    let api = KubeApi::start_with(Options {
        bookmark_interval: Duration::from_millis(200),
        ..Options::default()
    })
    .unwrap();
    shop(&api);
    let list: Value = serde_json::from_str(
        &api.kubectl(&["get", "--raw", "/api/v1/namespaces/shop/pods"])
            .unwrap(),
    )
    .unwrap();
    let list_rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();

    // From resourceVersion 0: synthetic ADDED, then live events, bookmarks.
    let all = raw_watch(
        &api,
        "/api/v1/namespaces/shop/pods?watch=true&resourceVersion=0&allowWatchBookmarks=true",
    );
    let (ty, obj) = next_change(&all);
    assert_eq!(
        (ty.as_str(), obj["metadata"]["name"].as_str()),
        ("ADDED", Some("reviews-v1-abc"))
    );
    // A label-selected watch from the list's resourceVersion.
    let selected = raw_watch(&api, &format!("/api/v1/namespaces/shop/pods?watch=1&labelSelector=track%3Dstable&resourceVersion={list_rv}"));
    api.kubectl(&[
        "label",
        "pod",
        "reviews-v1-abc",
        "-n",
        "shop",
        "track=stable",
    ])
    .unwrap();
    let (ty, obj) = next_change(&all);
    assert_eq!(ty, "MODIFIED");
    assert_eq!(obj["metadata"]["labels"]["track"], "stable");
    assert_eq!(
        next_change(&selected).0,
        "ADDED",
        "starting to match is ADDED"
    );
    api.kubectl(&["label", "pod", "reviews-v1-abc", "-n", "shop", "track-"])
        .unwrap();
    assert_eq!(next_change(&all).0, "MODIFIED");
    let (ty, obj) = next_change(&selected);
    assert_eq!(ty, "DELETED", "stopping to match is DELETED");
    assert_eq!(
        obj["metadata"]["labels"]["track"], "stable",
        "with the last matching state"
    );
    let bookmark = loop {
        let ev = next_event(&all);
        if ev["type"] == "BOOKMARK" {
            break ev;
        }
    };
    assert_eq!(bookmark["object"]["kind"], "Pod");
    assert!(bookmark["object"]["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse::<u64>()
        .is_ok());
    api.kubectl(&[
        "delete",
        "pod",
        "reviews-v1-abc",
        "-n",
        "shop",
        "--wait=false",
    ])
    .unwrap();
    let (ty, obj) = next_change(&all);
    assert_eq!(ty, "DELETED");
    let deleted_rv = obj["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse::<u64>()
        .unwrap();
    assert_eq!(
        deleted_rv,
        api.stats().resource_version,
        "DELETED carries the deletion's resourceVersion"
    );

    // Resuming from an old resourceVersion replays what happened since.
    let replay = raw_watch(
        &api,
        &format!("/api/v1/namespaces/shop/pods?watch=true&resourceVersion={list_rv}"),
    );
    let types: Vec<String> = (0..3).map(|_| next_change(&replay).0).collect();
    assert_eq!(types, ["MODIFIED", "MODIFIED", "DELETED"]);

    // Streaming list (sendInitialEvents): ADDED for each object, then the marked bookmark.
    let streaming = raw_watch(&api, "/api/v1/services?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true");
    assert_eq!(next_event(&streaming)["type"], "ADDED");
    let end = next_event(&streaming);
    assert_eq!(end["type"], "BOOKMARK");
    assert_eq!(
        end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );

    // timeoutSeconds ends a stream cleanly.
    let short = raw_watch(&api, "/api/v1/namespaces?watch=true&timeoutSeconds=1");
    while let Line::Event(_) = short.recv_timeout(Duration::from_secs(3)).unwrap() {}

    // drop_watches breaks every open stream (no final chunk).
    let active = api.watch_count();
    assert!(active >= 3, "{active} watches active");
    api.drop_watches();
    assert!(!end_of(&all), "dropped, not ended");
    assert!(!end_of(&selected));
    assert!(!end_of(&streaming));
    assert!(api.stats().watches_dropped >= 3);

    // After a compaction an old resourceVersion gets 410: in the watch stream, and on an
    // exact list.
    api.compact();
    let gone = raw_watch(
        &api,
        &format!("/api/v1/namespaces/shop/pods?watch=true&resourceVersion={list_rv}"),
    );
    let err = next_event(&gone);
    assert_eq!(err["type"], "ERROR");
    assert_eq!(err["object"]["code"], 410);
    assert_eq!(err["object"]["reason"], "Expired");
    assert!(err["object"]["message"]
        .as_str()
        .unwrap()
        .contains("too old resource version"));
    let e = kubectl_err(
        &api,
        &[
            "get",
            "--raw",
            &format!("/api/v1/pods?resourceVersion={list_rv}&resourceVersionMatch=Exact"),
        ],
    );
    assert!(
        e.contains("Expired") || e.contains("410") || e.contains("too old"),
        "{e}"
    );
    let st = api.stats();
    assert!(st.gone_sent >= 2, "{st:?}");
    assert!(st.watches_opened >= 6, "{st:?}");
}

#[test]
fn kubectl_get_watch() {
    let api = KubeApi::start().unwrap();
    shop(&api);
    let mut child = api
        .kubectl_command(&[
            "get",
            "pods",
            "-n",
            "shop",
            "-w",
            "--output-watch-events",
            "--no-headers",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // `EVENT NAME AGE` rows.
    let next = || {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a line from kubectl get -w");
        line.split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(next(), "ADDED reviews-v1-abc");
    let wait = Instant::now() + Duration::from_secs(10);
    while api.watch_count() == 0 && Instant::now() < wait {
        thread::sleep(Duration::from_millis(20));
    }
    api.kubectl(&["label", "pod", "reviews-v1-abc", "-n", "shop", "x=1"])
        .unwrap();
    assert_eq!(next(), "MODIFIED reviews-v1-abc");
    api.kubectl(&["delete", "pod", "reviews-v1-abc", "-n", "shop"])
        .unwrap();
    assert_eq!(next(), "DELETED reviews-v1-abc");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn namespace_delete_cascades_with_events() {
    let api = KubeApi::start().unwrap();
    shop(&api);
    api.kubectl_stdin(&["create", "-f", "-"], HTTP_ROUTE)
        .unwrap();
    api.kubectl(&["create", "ns", "other"]).unwrap();
    api.kubectl_stdin(
        &["create", "-f", "-"],
        &SERVICE.replace("namespace: shop", "namespace: other"),
    )
    .unwrap();
    let pods = raw_watch(&api, "/api/v1/pods?watch=true");
    let routes = raw_watch(
        &api,
        "/apis/gateway.networking.k8s.io/v1/httproutes?watch=true",
    );
    assert_eq!(next_change(&pods).0, "ADDED");
    assert_eq!(next_change(&routes).0, "ADDED");
    let out = api.kubectl(&["delete", "ns", "shop"]).unwrap();
    assert!(out.contains(r#"namespace "shop" deleted"#), "{out}");
    let (ty, obj) = next_change(&pods);
    assert_eq!(
        (ty.as_str(), obj["metadata"]["namespace"].as_str()),
        ("DELETED", Some("shop"))
    );
    assert_eq!(next_change(&routes).0, "DELETED");
    for r in [
        "pods",
        "services",
        "serviceaccounts",
        "endpointslices",
        "httproutes",
    ] {
        assert!(
            api.objects(r)
                .iter()
                .all(|o| o["metadata"]["namespace"] != "shop"),
            "{r} left in shop"
        );
    }
    assert_eq!(
        api.objects("services").len(),
        1,
        "other namespaces untouched"
    );
    let e = kubectl_err(&api, &["get", "ns", "shop"]);
    assert!(e.contains(r#"namespaces "shop" not found"#), "{e}");
}

#[test]
fn paginated_lists() {
    let api = KubeApi::start().unwrap();
    api.kubectl(&["create", "ns", "many"]).unwrap();
    let manifests: String = (0..7)
        .map(|i| format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm-{i}, namespace: many}}\ndata: {{i: \"{i}\"}}\n---\n"))
        .collect();
    api.kubectl_stdin(&["create", "-f", "-"], &manifests)
        .unwrap();
    // kubectl follows continue tokens.
    let out = api
        .kubectl(&["get", "cm", "-n", "many", "--chunk-size=3", "-o", "name"])
        .unwrap();
    assert_eq!(out.lines().count(), 7, "{out}");
    let continued = api
        .requests()
        .iter()
        .filter(|r| r.contains("/configmaps?") && r.contains("continue="))
        .count();
    assert_eq!(continued, 2, "{:?}", api.requests());
    // Raw: a page, then the rest consistent with the first page's resourceVersion.
    let page: Value = serde_json::from_str(
        &api.kubectl(&["get", "--raw", "/api/v1/namespaces/many/configmaps?limit=4"])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 4);
    assert_eq!(page["metadata"]["remainingItemCount"], 3);
    assert!(
        page["items"][0].get("kind").is_none(),
        "built-in list items carry no kind"
    );
    let token = page["metadata"]["continue"].as_str().unwrap().to_string();
    api.kubectl(&["delete", "cm", "cm-6", "-n", "many"])
        .unwrap();
    let rest: Value = serde_json::from_str(
        &api.kubectl(&[
            "get",
            "--raw",
            &format!("/api/v1/namespaces/many/configmaps?limit=4&continue={token}"),
        ])
        .unwrap(),
    )
    .unwrap();
    let names: Vec<&str> = rest["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["cm-4", "cm-5", "cm-6"],
        "the list as of the first page"
    );
    assert_eq!(
        rest["metadata"]["resourceVersion"],
        page["metadata"]["resourceVersion"]
    );
    let e = kubectl_err(
        &api,
        &[
            "get",
            "--raw",
            "/api/v1/namespaces/many/configmaps?limit=4&continue=zz",
        ],
    );
    assert!(e.contains("BadRequest") || e.contains("continue"), "{e}");
    api.compact();
    let e = kubectl_err(
        &api,
        &[
            "get",
            "--raw",
            &format!("/api/v1/namespaces/many/configmaps?limit=4&continue={token}"),
        ],
    );
    assert!(e.contains("Expired") || e.contains("too old"), "{e}");
}

/// `kubernetes-validate` (the Kubernetes OpenAPI schemas, offline) over every built-in
/// object the double holds after a realistic session.
#[test]
fn objects_pass_kubernetes_schema_validation() {
    let python = std::env::var("MESH_PYTHON").expect(
        "MESH_PYTHON is not set: it names the python of the venv with kubernetes-validate; run the tests with `cargo xtask test` (it sets it up)",
    );
    let api = KubeApi::start().unwrap();
    shop(&api);
    api.kubectl_stdin(&["apply", "-f", "-"], HTTP_ROUTE)
        .unwrap();
    api.kubectl(&[
        "create",
        "configmap",
        "cfg",
        "-n",
        "shop",
        "--from-literal=a=b",
    ])
    .unwrap();
    api.kubectl_stdin(&["create", "-f", "-"], "apiVersion: v1\nkind: Node\nmetadata: {name: node-a, labels: {kubernetes.io/hostname: node-a}}\nstatus:\n  addresses: [{type: InternalIP, address: 192.168.1.10}]\n").unwrap();
    api.kubectl(&["label", "pod", "reviews-v1-abc", "-n", "shop", "x=y"])
        .unwrap();
    api.set_pod_running("shop", "reviews-v1-abc", "10.1.0.5")
        .unwrap();
    api.kubectl_stdin(&["create", "-f", "-"], "apiVersion: v1\nkind: Event\nmetadata: {name: e1, namespace: shop}\ninvolvedObject: {kind: Pod, name: reviews-v1-abc, namespace: shop}\nreason: Test\nmessage: hi\ntype: Normal\n").unwrap();

    let dir = std::env::temp_dir().join(format!("kube-double-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveOnDrop(dir.clone());
    let mut files = Vec::new();
    for r in [
        "namespaces",
        "nodes",
        "pods",
        "services",
        "serviceaccounts",
        "configmaps",
        "events",
        "endpointslices",
    ] {
        for (i, o) in api.objects(r).into_iter().enumerate() {
            // JSON, not serde_yaml: an unquoted timestamp is a datetime to PyYAML.
            let f = dir.join(format!("{r}-{i}.json"));
            std::fs::write(&f, serde_json::to_vec_pretty(&o).unwrap()).unwrap();
            files.push(f);
        }
    }
    assert!(files.len() >= 12, "{} objects", files.len());
    let validate = |files: &[std::path::PathBuf]| -> Result<String> {
        let out = Command::new(&python)
            .args([
                "-m",
                "kubernetes_validate",
                "-k",
                "1.32.0",
                "--strict",
                "--no-warn",
            ])
            .args(files)
            .output()
            .with_context(|| format!("running {python} -m kubernetes_validate"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        anyhow::ensure!(out.status.success(), "{text}");
        Ok(text)
    };
    validate(&files).unwrap();
    // The check can fail.
    let broken = dir.join("broken.yaml");
    std::fs::write(
        &broken,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: broken}\nspec:\n  containers: x\n",
    )
    .unwrap();
    let e = validate(&[broken]).unwrap_err().to_string();
    assert!(e.contains("containers") || e.contains("INVALID"), "{e}");
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn standalone_binary_with_admin_paths() {
    let dir = std::env::temp_dir().join(format!("kube-double-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveOnDrop(dir.clone());
    let kubeconfig = dir.join("kubeconfig");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kube-double"))
        .args(["--listen", "127.0.0.1:0", "--kubeconfig"])
        .arg(&kubeconfig)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut addr = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut addr)
        .unwrap();
    let addr = addr.trim().to_string();
    let kubectl = |args: &[&str]| {
        Command::new(mesh_tests::kubeapi::kubectl_bin())
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--cache-dir")
            .arg(dir.join("cache"))
            .args(args)
            .output()
            .unwrap()
    };
    let post = |path: &str| {
        let mut s = TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let out = kubectl(&["create", "ns", "demo"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(post("/_double/fail-next?n=1&code=500").starts_with("HTTP/1.1 200"));
    let out = kubectl(&["get", "--raw", "/api/v1/namespaces/demo"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("InternalError"),
        "{out:?}"
    );
    let out = kubectl(&["get", "ns", "demo", "-o", "name"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "namespace/demo"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn instances_are_independent_and_clean_up() {
    let a = KubeApi::start().unwrap();
    let b = KubeApi::start().unwrap();
    a.kubectl(&["create", "ns", "only-in-a"]).unwrap();
    assert!(b
        .objects("namespaces")
        .iter()
        .all(|n| n["metadata"]["name"] != "only-in-a"));
    assert_ne!(a.url(), b.url());
    let (dir, addr) = (a.kubeconfig().parent().unwrap().to_path_buf(), a.addr());
    assert!(dir.exists());
    let watch = raw_watch(&a, "/api/v1/namespaces?watch=true");
    next_event(&watch);
    drop(a);
    assert!(!dir.exists(), "temp dir removed");
    // Other tests of this binary start servers on ephemeral ports at the same time, so the
    // port may already serve another instance: what must be gone is instance `a`.
    if let Ok(mut s) = TcpStream::connect(addr) {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(
            b"GET /api/v1/namespaces/only-in-a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(
            !out.starts_with("HTTP/1.1 200"),
            "instance a still serves: {out}"
        );
    }
    assert!(!end_of(&watch), "open watches break on drop");
    b.kubectl(&["get", "ns"]).unwrap();
}
