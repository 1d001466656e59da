//! The agent's Kubernetes source end to end: the API server test double
//! (`mesh_tests::kubeapi`), driven with the real kubectl, and a simulated node whose pods
//! sit in the kubelet's cgroup layout (`kubepods.slice/.../kubepods-besteffort-pod<uid>.slice`)
//! so the agent finds their network namespaces the way it does on a real node.

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use mesh_tests::{
    kubeapi::{KubeApi, Options},
    metric, wait_for, Agent, SimNode,
};
use serde_json::Value;

const ENROL: &str = "mesh-agent.io/dataplane-mode=ambient";

struct Cluster {
    api: KubeApi,
    node: SimNode,
}

impl Cluster {
    fn new(namespaces: &[&str]) -> Cluster {
        Cluster::with(namespaces, Options::default())
    }

    fn with(namespaces: &[&str], options: Options) -> Cluster {
        let api = KubeApi::start_with(options).expect("API server double");
        let node = SimNode::new().expect("sim node");
        for ns in namespaces {
            api.kubectl(&["create", "namespace", ns]).unwrap();
        }
        let c = Cluster { api, node };
        // The kubelet's pod cgroup root exists before any pod does.
        std::fs::create_dir_all(c.kubepods()).unwrap();
        c
    }

    fn node_name(&self) -> String {
        format!("sim-{}", self.node.index)
    }

    fn kubepods(&self) -> PathBuf {
        self.node.cgroup.join("kubepods.slice")
    }

    /// Creates the pod in the API, then does what the kubelet and the runtime do: a
    /// cgroup named after its UID, a network namespace, a running process (an echo
    /// server on 8080), and the pod IP in the status.
    fn run_pod(&mut self, ns: &str, name: &str, host: u8, labels: &[(&str, &str)]) -> String {
        let uid = self.create_pod(ns, name, labels, None);
        let cgroup = self.kubepods().join(format!(
            "kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{name}.scope",
            u = uid.replace('-', "_")
        ));
        let ip = self.node.add_pod_at(name, host, cgroup).unwrap().ip;
        self.node
            .serve(name, &["echo", "--listen", "0.0.0.0:8080"])
            .unwrap();
        self.set_ip(ns, name, &ip.to_string());
        uid
    }

    fn create_pod(
        &self,
        ns: &str,
        name: &str,
        labels: &[(&str, &str)],
        account: Option<&str>,
    ) -> String {
        let labels: String = labels
            .iter()
            .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
            .collect();
        let account = account
            .map(|a| format!("  serviceAccountName: {a}\n"))
            .unwrap_or_default();
        let manifest = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:\n    app: {name}\n{labels}\
             spec:\n  nodeName: {node}\n{account}  containers:\n  - name: main\n    image: podtool\n",
            node = self.node_name()
        );
        self.api
            .kubectl_stdin(&["create", "-f", "-"], &manifest)
            .unwrap();
        self.api
            .kubectl(&[
                "get",
                "pod",
                name,
                "-n",
                ns,
                "-o",
                "jsonpath={.metadata.uid}",
            ])
            .unwrap()
            .trim()
            .to_owned()
    }

    fn set_ip(&self, ns: &str, name: &str, ip: &str) {
        self.api.set_pod_running(ns, name, ip).unwrap();
    }

    /// `kubectl label KIND NAME [-n NS] LABEL` (`key=value`, or `key-` to remove).
    fn label(&self, kind: &str, name: &str, ns: Option<&str>, label: &str) {
        let mut args = vec!["label", kind, name, label];
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        self.api.kubectl(&args).unwrap();
    }

    fn start_agent(&self) -> Agent {
        self.node.write_config("exclude: []\n").unwrap();
        let node = self.node_name();
        let kubeconfig = self.api.kubeconfig().display().to_string();
        let kubepods = self.kubepods().display().to_string();
        self.node
            .start_agent(&[
                "--source",
                "kubernetes",
                "--node-name",
                &node,
                "--kubeconfig",
                &kubeconfig,
                "--kubepods-cgroup",
                &kubepods,
            ])
            .unwrap()
    }
}

fn workloads(agent: &Agent) -> Vec<Value> {
    let v: Value = serde_json::from_str(&agent.get("/workloads").unwrap()).unwrap();
    v["workloads"].as_array().cloned().unwrap_or_default()
}

fn workload(agent: &Agent, name: &str) -> Option<Value> {
    workloads(agent).into_iter().find(|w| w["name"] == name)
}

fn dump(agent: &Agent, map: &str) -> Vec<Value> {
    let out = agent.cli(&["dump", map, "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Connections the proxy accepted from `source` (namespace/name).
fn proxied_from(agent: &Agent, source: &str) -> u64 {
    metric(
        &agent.get("/metrics").unwrap(),
        "mesh_tcp_connections_opened_total",
        &[("source_workload", source)],
    )
}

fn echo(c: &Cluster, from: &str, to: &str) {
    let r = c
        .node
        .client(from, &["echo-client", "--to", to, "--bytes", "65536"])
        .unwrap();
    assert_eq!(r["intact"], 1, "{r}");
}

#[test]
fn labelling_a_namespace_enrols_its_running_pods_and_unlabelling_releases_them() {
    let mut c = Cluster::new(&["shop", "backend"]);
    c.api
        .kubectl(&["create", "serviceaccount", "web", "-n", "shop"])
        .unwrap();
    let uid = c.create_pod("shop", "client", &[], Some("web"));
    let cgroup = c.kubepods().join(format!(
        "kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-client.scope",
        uid.replace('-', "_")
    ));
    let ip = c.node.add_pod_at("client", 2, cgroup).unwrap().ip;
    c.node
        .serve("client", &["echo", "--listen", "0.0.0.0:7000"])
        .unwrap();
    c.set_ip("shop", "client", &ip.to_string());
    c.run_pod("backend", "server", 3, &[]);
    let agent = c.start_agent();
    let server = format!("{}:8080", c.node.pod("server").ip);

    // Not enrolled yet: known as a local workload, not captured.
    let w = workload(&agent, "client").expect("the local pod is listed");
    assert_eq!(w["enrolled"], false, "{w}");
    assert_eq!(
        w["identity"], "spiffe://cluster.local/ns/shop/sa/web",
        "{w}"
    );
    assert!(dump(&agent, "WORKLOADS").is_empty());
    echo(&c, "client", &server);
    assert_eq!(proxied_from(&agent, "shop/client"), 0);

    // The label enrols the running pod: same process, same netns, no restart.
    c.label("namespace", "shop", None, ENROL);
    wait_for("enrolment", Duration::from_secs(10), || {
        workload(&agent, "client").is_some_and(|w| w["enrolled"] == true)
            && dump(&agent, "WORKLOADS").len() == 1
    });
    echo(&c, "client", &server);
    assert_eq!(
        proxied_from(&agent, "shop/client"),
        1,
        "captured after the label"
    );

    // A pod's own opt-out label wins over its namespace.
    c.label(
        "pod",
        "client",
        Some("shop"),
        "mesh-agent.io/dataplane-mode=none",
    );
    wait_for("pod opt-out", Duration::from_secs(10), || {
        dump(&agent, "WORKLOADS").is_empty()
    });
    c.label(
        "pod",
        "client",
        Some("shop"),
        "mesh-agent.io/dataplane-mode-",
    );
    wait_for("opt-out removed", Duration::from_secs(10), || {
        dump(&agent, "WORKLOADS").len() == 1
    });

    // Removing the namespace label releases it.
    c.label("namespace", "shop", None, "mesh-agent.io/dataplane-mode-");
    wait_for("release", Duration::from_secs(10), || {
        dump(&agent, "WORKLOADS").is_empty()
    });
    echo(&c, "client", &server);
    assert_eq!(proxied_from(&agent, "shop/client"), 1, "direct again");
    let m = agent.get("/metrics").unwrap();
    assert_eq!(metric(&m, "mesh_workloads_enrolled", &[]), 0, "{m}");
}

#[test]
fn deleting_a_pod_releases_its_entries_from_every_map() {
    let mut c = Cluster::new(&["shop"]);
    c.label("namespace", "shop", None, ENROL);
    c.run_pod("shop", "web", 2, &[]);
    c.run_pod("shop", "db", 3, &[]);
    let agent = c.start_agent();
    let (web, db) = (c.node.pod("web").ip, c.node.pod("db").ip);
    wait_for("both enrolled", Duration::from_secs(10), || {
        dump(&agent, "WORKLOADS").len() == 2 && dump(&agent, "DESTS").len() == 2
    });
    echo(&c, "web", &format!("{db}:8080"));
    assert_eq!(proxied_from(&agent, "shop/web"), 1);

    c.api
        .kubectl(&["delete", "pod", "web", "-n", "shop"])
        .unwrap();
    wait_for("web released", Duration::from_secs(10), || {
        dump(&agent, "WORKLOADS").len() == 1 && dump(&agent, "DESTS").len() == 1
    });
    let dests = dump(&agent, "DESTS").to_vec();
    let text = serde_json::to_string(&dests).unwrap();
    assert!(
        text.contains(&db.to_string()) && !text.contains(&web.to_string()),
        "{text}"
    );
    assert!(workload(&agent, "web").is_none());
    // Its process still runs (the simulated runtime is slower than the API): not captured.
    echo(&c, "web", &format!("{db}:8080"));
    assert_eq!(proxied_from(&agent, "shop/web"), 1);
}

#[test]
fn a_pod_whose_netns_is_not_found_is_reported_and_enrolled_once_it_appears() {
    let mut c = Cluster::new(&["shop"]);
    c.label("namespace", "shop", None, ENROL);
    let agent = c.start_agent();
    // In the API with an IP, but no cgroup on the node yet.
    let uid = c.create_pod("shop", "late", &[], None);
    c.set_ip("shop", "late", "10.201.250.9");
    wait_for("reported unresolved", Duration::from_secs(10), || {
        workload(&agent, "late").is_some_and(|w| w["unresolved"].is_string())
    });
    let w = workload(&agent, "late").unwrap();
    assert!(w["unresolved"].as_str().unwrap().contains(&uid), "{w}");
    let m = agent.get("/metrics").unwrap();
    assert_eq!(metric(&m, "mesh_workloads_unresolved", &[]), 1, "{m}");
    wait_for("a Kubernetes event", Duration::from_secs(10), || {
        c.api
            .kubectl(&["get", "events", "-n", "shop", "-o", "json"])
            .is_ok_and(|t| t.contains("MeshNetnsUnresolved") && t.contains("\"late\""))
    });

    // The runtime catches up: the agent retries on its own and captures the pod.
    let cgroup = c.kubepods().join(format!(
        "kubepods-pod{}.slice/cri-containerd-late.scope",
        uid.replace('-', "_")
    ));
    c.node.add_pod_at("late", 9, cgroup).unwrap();
    c.node
        .serve("late", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    let ip = c.node.pod("late").ip.to_string();
    c.set_ip("shop", "late", &ip);
    wait_for("resolved and enrolled", Duration::from_secs(10), || {
        dump(&agent, "WORKLOADS").len() == 1
    });
    let w = workload(&agent, "late").unwrap();
    assert!(w["unresolved"].is_null(), "{w}");
    let m = agent.get("/metrics").unwrap();
    assert_eq!(metric(&m, "mesh_workloads_unresolved", &[]), 0, "{m}");
}

/// What the agent holds for namespace `ns`, against what the server holds.
fn agent_view(agent: &Agent, ns: &str) -> BTreeSet<(String, String, bool)> {
    let list = workloads(agent);
    let mine: Vec<_> = list.iter().filter(|w| w["namespace"] == ns).collect();
    let set: BTreeSet<_> = mine
        .iter()
        .map(|w| {
            (
                w["name"].as_str().unwrap().to_owned(),
                w["ip"].as_str().unwrap().to_owned(),
                w["direct"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        set.len(),
        mine.len(),
        "a workload is listed twice: {mine:?}"
    );
    set
}

fn server_view(api: &KubeApi, ns: &str) -> BTreeSet<(String, String, bool)> {
    api.objects("pods")
        .iter()
        .filter(|p| p["metadata"]["namespace"] == ns && p["status"]["podIP"].is_string())
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_owned(),
                p["status"]["podIP"].as_str().unwrap().to_owned(),
                p["metadata"]["labels"]["mesh-agent.io/same-node"] == "direct",
            )
        })
        .collect()
}

#[test]
fn broken_watches_and_410_gone_lose_and_duplicate_nothing() {
    // Bookmarks would move the agent's resume point to the newest version; without them
    // it stays at the last pod event, which a compaction after any other change expires.
    let c = Cluster::with(
        &["burst"],
        Options {
            bookmark_interval: Duration::from_secs(600),
            ..Options::default()
        },
    );
    let agent = c.start_agent();
    let k8s = |a: &Agent| -> Value { serde_json::from_str(&a.get("/k8s").unwrap()).unwrap() };
    let relists_before = k8s(&agent)["relists"]["pods"].as_u64().unwrap();
    // A burst of changes; the server breaks every watch, forgets its history (so the
    // agent's resume point is too old: 410 Gone) and fails requests in the middle of it.
    for i in 0..24u8 {
        let name = format!("p{i}");
        c.create_pod("burst", &name, &[], None);
        c.set_ip("burst", &name, &format!("10.244.7.{}", i + 1));
        match i {
            6 => c.api.drop_watches(),
            12 => {
                // Another kind changes last, then history is compacted: the pods watch's
                // resume point is now too old.
                c.api
                    .kubectl(&["create", "serviceaccount", "s12", "-n", "burst"])
                    .unwrap();
                c.api.compact();
                c.api.drop_watches();
            }
            16 => {
                // Only the agent's requests fail: break its watches and wait for its
                // retries to eat the failures (kubectl would get them otherwise).
                c.api.fail_next(3, 500);
                c.api.drop_watches();
                wait_for(
                    "the agent's failed retries",
                    Duration::from_secs(15),
                    || c.api.stats().injected_failures >= 3,
                );
            }
            _ => {}
        }
        if i % 4 == 3 {
            c.api
                .kubectl(&["delete", "pod", &format!("p{}", i - 1), "-n", "burst"])
                .unwrap();
        }
        if i % 5 == 0 {
            c.label(
                "pod",
                &name,
                Some("burst"),
                "mesh-agent.io/same-node=direct",
            );
        }
    }
    // A pod without an IP is not a workload yet.
    c.create_pod("burst", "pending", &[], None);
    c.api
        .kubectl(&["create", "serviceaccount", "last", "-n", "burst"])
        .unwrap();
    c.api.compact();
    c.api.drop_watches();
    c.label("pod", "p1", Some("burst"), "mesh-agent.io/same-node=direct");
    c.api
        .kubectl(&["delete", "pod", "p4", "-n", "burst"])
        .unwrap();

    let want = server_view(&c.api, "burst");
    assert_eq!(want.len(), 24 - 6 - 1, "{want:?}");
    wait_for(
        "the agent agrees with the server",
        Duration::from_secs(15),
        || agent_view(&agent, "burst") == want,
    );
    let stats = c.api.stats();
    assert!(
        stats.gone_sent >= 1,
        "the agent was never told 410: {:?}",
        stats.to_json()
    );
    assert!(stats.watches_dropped >= 1);
    let k = k8s(&agent);
    assert!(
        k["relists"]["pods"].as_u64().unwrap() > relists_before,
        "the 410 made the agent list again: {k}"
    );
    // Stable afterwards: a later change still arrives.
    c.api
        .kubectl(&["delete", "pod", "p0", "-n", "burst"])
        .unwrap();
    let want = server_view(&c.api, "burst");
    wait_for("a change after the faults", Duration::from_secs(10), || {
        agent_view(&agent, "burst") == want
    });
}

fn http(c: &Cluster, vip: &str, requests: u32, headers: &[&str]) -> Value {
    c.node
        .http_get("client", vip, "/", requests, headers)
        .unwrap()
}

#[test]
fn services_endpointslices_and_an_httproute_applied_with_kubectl_steer_requests() {
    let mut c = Cluster::new(&["shop", "backend"]);
    c.label("namespace", "shop", None, ENROL);
    c.run_pod("shop", "client", 2, &[]);
    for (name, host) in [("v1", 3u8), ("v2", 4u8)] {
        c.create_pod("backend", name, &[("app", "reviews")], None);
        let uid = c
            .api
            .kubectl(&[
                "get",
                "pod",
                name,
                "-n",
                "backend",
                "-o",
                "jsonpath={.metadata.uid}",
            ])
            .unwrap();
        let cgroup = c.kubepods().join(format!(
            "kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{name}.scope",
            uid.trim().replace('-', "_")
        ));
        let ip = c.node.add_pod_at(name, host, cgroup).unwrap().ip;
        c.node
            .serve(name, &["http", "--listen", "0.0.0.0:8080", "--name", name])
            .unwrap();
        c.set_ip("backend", name, &ip.to_string());
    }
    let (v1, v2) = (c.node.pod("v1").ip, c.node.pod("v2").ip);
    let vip = format!("10.96.{}.10", c.node.index);
    let vip2 = format!("10.96.{}.11", c.node.index);
    let objects = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: backend}}\n\
         spec:\n  clusterIP: {vip}\n  selector: {{app: reviews}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: reviews-v2, namespace: backend}}\n\
         spec:\n  clusterIP: {vip2}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: reviews-a1, namespace: backend, labels: {{kubernetes.io/service-name: reviews}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\n\
         endpoints: [{{addresses: [\"{v1}\"], conditions: {{ready: true}}}}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: reviews-v2-b2, namespace: backend, labels: {{kubernetes.io/service-name: reviews-v2}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\n\
         endpoints: [{{addresses: [\"{v2}\"], conditions: {{ready: true}}}}]\n"
    );
    c.api
        .kubectl_stdin(&["apply", "-f", "-"], &objects)
        .unwrap();
    let agent = c.start_agent();

    // Service and slices alone: everything to v1, through the L7 proxy.
    let r = http(&c, &format!("{vip}:80"), 10, &[]);
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    assert_eq!(r["bodies"], serde_json::json!({ "v1": 10 }), "{r}");

    let route = |default_backend: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
             metadata: {{name: reviews, namespace: backend}}\n\
             spec:\n  parentRefs: [{{group: \"\", kind: Service, name: reviews, port: 80}}]\n  rules:\n\
             \x20 - matches: [{{headers: [{{name: x-canary, value: \"1\"}}]}}]\n\
             \x20   filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: x-mesh, value: canary}}]}}}}]\n\
             \x20   backendRefs: [{{name: reviews-v2, port: 80}}]\n\
             \x20 - backendRefs: [{{name: {default_backend}, port: 80}}]\n"
        )
    };
    c.api
        .kubectl_stdin(&["apply", "-f", "-"], &route("reviews"))
        .unwrap();
    wait_for("the canary route", Duration::from_secs(10), || {
        http(&c, &format!("{vip}:80"), 1, &["x-canary: 1"])["bodies"]
            == serde_json::json!({ "v2": 1 })
    });
    let canary = http(&c, &format!("{vip}:80"), 20, &["x-canary: 1"]);
    assert_eq!(
        canary["bodies"],
        serde_json::json!({ "v2": 20 }),
        "{canary}"
    );
    assert_eq!(
        canary["seen_mesh"],
        serde_json::json!({ "canary": 20 }),
        "{canary}"
    );
    let plain = http(&c, &format!("{vip}:80"), 20, &[]);
    assert_eq!(plain["bodies"], serde_json::json!({ "v1": 20 }), "{plain}");

    // kubectl apply of a changed route: the default now goes to v2 as well.
    c.api
        .kubectl_stdin(&["apply", "-f", "-"], &route("reviews-v2"))
        .unwrap();
    wait_for("the changed route", Duration::from_secs(10), || {
        http(&c, &format!("{vip}:80"), 5, &[])["bodies"] == serde_json::json!({ "v2": 5 })
    });

    // A GRPCRoute on the same Service joins the HTTPRoute's rules: an exact method match
    // is more specific than any prefix, so it goes first. (Sent as HTTP/1.1 here: the
    // route matches on the path `/<service>/<method>` whatever the protocol.)
    let grpc = "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\n\
                metadata: {name: cart, namespace: backend}\n\
                spec:\n  parentRefs: [{group: \"\", kind: Service, name: reviews}]\n  rules:\n\
                \x20 - matches: [{method: {service: shop.Cart, method: Add}}]\n\
                \x20   backendRefs: [{name: reviews, port: 80}]\n";
    c.api.kubectl_stdin(&["apply", "-f", "-"], grpc).unwrap();
    let grpc_get = |n: u32| {
        c.node
            .http_get("client", &format!("{vip}:80"), "/shop.Cart/Add", n, &[])
            .unwrap()
    };
    wait_for("the GRPCRoute", Duration::from_secs(10), || {
        grpc_get(1)["bodies"] == serde_json::json!({ "v1": 1 })
    });
    assert_eq!(grpc_get(5)["bodies"], serde_json::json!({ "v1": 5 }));
    c.api
        .kubectl(&["delete", "grpcroute", "cart", "-n", "backend"])
        .unwrap();

    // Deleting the route restores the Service's own endpoints.
    c.api
        .kubectl(&["delete", "httproute", "reviews", "-n", "backend"])
        .unwrap();
    wait_for("the route removed", Duration::from_secs(10), || {
        http(&c, &format!("{vip}:80"), 5, &[])["bodies"] == serde_json::json!({ "v1": 5 })
    });
    let m = agent.get("/metrics").unwrap();
    assert!(
        metric(
            &m,
            "mesh_requests_total",
            &[("source_workload", "shop/client")]
        ) >= 50,
        "{m}"
    );
}

#[test]
fn an_unreachable_api_server_or_a_missing_node_name_stops_the_agent_with_the_cause() {
    let c = Cluster::new(&[]);
    c.node.write_config("exclude: []\n").unwrap();
    // A kubeconfig naming a port nobody listens on (the double's, once it is gone).
    let dead = {
        let api = KubeApi::start().unwrap();
        let text = std::fs::read_to_string(api.kubeconfig()).unwrap();
        let path = c.node.dir.join("dead-kubeconfig");
        std::fs::write(&path, text).unwrap();
        path
    };
    let kubeconfig = dead.display().to_string();
    let out = c
        .node
        .agent_command(&[
            "--source",
            "kubernetes",
            "--node-name",
            "n1",
            "--kubeconfig",
            &kubeconfig,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("does not answer"), "{err}");
    // Nothing stays behind: the pins of the aborted start are gone.
    assert!(!c.node.pin_path.join("WORKLOADS").exists());

    let out = c
        .node
        .agent_command(&["--source", "kubernetes", "--kubeconfig", &kubeconfig])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--node-name"), "{err}");
}

/// The standalone control plane with `--source kubernetes`: the cluster's Services,
/// EndpointSlices and routes over ADS to any xDS client (here our own, `xds-watch`).
#[test]
fn the_standalone_control_plane_serves_the_clusters_services_over_ads() {
    use std::process::{Command, Stdio};
    let api = KubeApi::start().unwrap();
    api.kubectl(&["create", "namespace", "backend"]).unwrap();
    let objects = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: backend}\n\
         spec: {clusterIP: 10.96.7.10, ports: [{name: http, port: 80}, {name: grpc, port: 9090}]}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: reviews-a, namespace: backend, labels: {kubernetes.io/service-name: reviews}}\n\
         addressType: IPv4\nports: [{name: http, port: 8080}, {name: grpc, port: 9090}]\n\
         endpoints: [{addresses: [10.244.1.5]}, {addresses: [10.244.2.6], conditions: {ready: false}}]\n";
    api.kubectl_stdin(&["apply", "-f", "-"], objects).unwrap();
    // A free port for ADS.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let server = Command::new(mesh_tests::agent_bin())
        .args([
            "control-plane",
            "--source",
            "kubernetes",
            "--listen",
            &listen,
        ])
        .arg("--kubeconfig")
        .arg(api.kubeconfig())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Kill(server);
    let watch = |ms: &str| -> Vec<Value> {
        let out = Command::new(mesh_tests::agent_bin())
            .args(["xds-watch", "--xds-address", &format!("http://{listen}")])
            .args(["--duration-ms", ms])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let count = |verdicts: &[Value], kind: &str| {
        verdicts
            .iter()
            .filter(|v| v["accepted"] == true && v["type_url"].as_str().unwrap().ends_with(kind))
            .map(|v| v["resources"].as_u64().unwrap())
            .max()
            .unwrap_or(0)
    };
    let mut verdicts = Vec::new();
    wait_for(
        "the control plane serving the Service",
        Duration::from_secs(15),
        || {
            verdicts = watch("1500");
            count(&verdicts, ".Cluster") == 2
        },
    );
    // One cluster, one load assignment and one listener per port; every one accepted.
    assert_eq!(
        count(&verdicts, ".ClusterLoadAssignment"),
        2,
        "{verdicts:?}"
    );
    assert!(count(&verdicts, ".Listener") >= 2, "{verdicts:?}");
    assert!(
        verdicts.iter().all(|v| v["accepted"] == true),
        "{verdicts:?}"
    );

    // A second Service applied with kubectl is served too.
    api.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Service\nmetadata: {name: ratings, namespace: backend}\n\
         spec: {clusterIP: 10.96.7.11, ports: [{name: http, port: 80}]}\n",
    )
    .unwrap();
    wait_for("the second Service", Duration::from_secs(15), || {
        count(&watch("1500"), ".Cluster") == 3
    });
}

/// Issue 12: a pod's `app`/`version` labels fill Istio's `*_app`/`*_version` of the
/// series, and a Namespace labelled `mesh-agent.io/access-log=true` reaches the proxy's
/// workloads (`/config_dump`), from the API server as from the file.
#[test]
fn pod_app_and_version_labels_and_the_namespace_access_log_label_reach_the_proxy() {
    let mut c = Cluster::new(&["shop", "backend"]);
    for ns in ["shop", "backend"] {
        c.label("namespace", ns, None, ENROL);
    }
    c.run_pod("shop", "client", 2, &[("app.kubernetes.io/version", "1.0")]);
    c.run_pod("backend", "server", 3, &[("version", "v7")]);
    let agent = c.start_agent();
    wait_for("enrolment", Duration::from_secs(10), || {
        dump(&agent, "WORKLOADS").len() == 2
    });
    echo(&c, "client", &format!("{}:8080", c.node.pod("server").ip));
    let labels = [
        ("source_workload", "client"),
        ("source_app", "client"),
        ("source_version", "1.0"),
        ("destination_workload", "server"),
        ("destination_app", "server"),
        ("destination_version", "v7"),
    ];
    let mut m = String::new();
    wait_for("the connection counted", Duration::from_secs(10), || {
        m = agent.get("/metrics").unwrap_or_default();
        metric(&m, "istio_tcp_connections_closed_total", &labels) == 1
    });
    assert_eq!(
        metric(&m, "istio_tcp_received_bytes_total", &labels),
        65536,
        "{m}"
    );

    let access_log = |agent: &Agent, name: &str| -> Option<bool> {
        let d: Value = serde_json::from_str(&agent.get("/config_dump").ok()?).ok()?;
        d["mesh"]["workloads"]
            .as_array()?
            .iter()
            .find(|w| w["name"] == name)
            .and_then(|w| w["access_log"].as_bool())
    };
    assert_eq!(access_log(&agent, "server"), Some(false));
    c.label(
        "namespace",
        "backend",
        None,
        "mesh-agent.io/access-log=true",
    );
    wait_for("the switch in force", Duration::from_secs(10), || {
        access_log(&agent, "server") == Some(true)
    });
    assert_eq!(access_log(&agent, "client"), Some(false));
}
