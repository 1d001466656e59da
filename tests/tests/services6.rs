//! Dual-stack services (issue 14, item 5) on a dual-stack simulated node: a service's
//! IPv6 cluster IP (`vip6` in the enrolment file) routes like its IPv4 one, through the
//! same cluster, routes and protocol handling, and IPv6 endpoints are dialled over IPv6.
//! The client pod dials `[vip6]:port` natively (connect6 -> `--proxy-redirect6`); the
//! proxy finds the service's listener by that original destination (subscribed on demand
//! by the name `[vip6]:port`). The services come from the standalone file, and in the
//! last test from Kubernetes (`spec.clusterIPs`, IPv6 EndpointSlices).

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use mesh_tests::{
    kubeapi::{KubeApi, Options},
    metric, wait_for, SimNode,
};

const VIP6_REVIEWS: &str = "fd00:96::10";
const VIP6_DB: &str = "fd00:96::12";

/// `client` (enrolled, in `shop`), `v1`, `v2` and `db` (in `backend`); every pod
/// dual-stack.
fn node() -> SimNode {
    let mut n = SimNode::new_dual_stack().expect("dual-stack sim node");
    n.add_pod("client", 2).unwrap();
    n.add_pod("v1", 3).unwrap();
    n.add_pod("v2", 4).unwrap();
    n.add_pod("db", 5).unwrap();
    n
}

/// `reviews` (HTTP, dual-stack, v1 by selector, a canary route to `reviews-v2`),
/// `reviews-v2` (HTTP, IPv4 only, v2's IPv6 address as its one endpoint) and `db` (TCP,
/// dual-stack, db's IPv6 address as its one endpoint).
fn config(n: &SimNode) -> String {
    let w = |name: &str, ns: &str, labels: &str| {
        let p = n.pod(name);
        format!(
            "  - {{ name: {name}, namespace: {ns}, ip: {}{}, netns: {}, labels: {{ {labels} }} }}\n",
            p.ip,
            p.ip6_field(),
            p.netns_path()
        )
    };
    format!(
        "namespaces:\n\
         \x20 - {{ name: shop, labels: {{ mesh-agent.io/dataplane-mode: ambient }} }}\n\
         \x20 - {{ name: backend }}\n\
         workloads:\n{}{}{}{}\
         services:\n\
         \x20 - name: reviews\n\
         \x20   namespace: backend\n\
         \x20   vip: 10.96.0.10\n\
         \x20   vip6: \"{VIP6_REVIEWS}\"\n\
         \x20   ports: [ {{ port: 80, target_port: 8080, protocol: http }} ]\n\
         \x20   selector: {{ version: v1 }}\n\
         \x20   routes:\n\
         \x20     - name: canary\n\
         \x20       match: {{ headers: [ {{ name: x-canary, exact: \"1\" }} ] }}\n\
         \x20       backends: [ {{ service: reviews-v2 }} ]\n\
         \x20       request_headers: {{ add: {{ x-mesh: canary }} }}\n\
         \x20 - name: reviews-v2\n\
         \x20   namespace: backend\n\
         \x20   vip: 10.96.0.11\n\
         \x20   ports: [ {{ port: 80, target_port: 8080, protocol: http }} ]\n\
         \x20   endpoints: [ {{ ip: \"{v2}\" }} ]\n\
         \x20 - name: db\n\
         \x20   namespace: backend\n\
         \x20   vip: 10.96.0.12\n\
         \x20   vip6: \"{VIP6_DB}\"\n\
         \x20   ports: [ {{ port: 5432, target_port: 9000, protocol: tcp }} ]\n\
         \x20   endpoints: [ {{ ip: \"{db}\" }} ]\n",
        w("client", "shop", ""),
        w("v1", "backend", "app: reviews, version: v1"),
        w("v2", "backend", "app: reviews, version: v2"),
        w("db", "backend", "app: db"),
        v2 = n.pod("v2").v6(),
        db = n.pod("db").v6(),
    )
}

fn start(n: &SimNode) -> mesh_tests::Agent {
    n.write_config(&config(n)).unwrap();
    let agent = n.start_agent(&[]).unwrap();
    // Dual-stack listeners: IPv4 and IPv6 endpoints of the same pod reach them.
    for v in ["v1", "v2"] {
        n.serve(v, &["http", "--listen", "[::]:8080", "--name", v])
            .unwrap();
    }
    n.serve("db", &["echo", "--listen", "[::]:9000"]).unwrap();
    agent
}

/// The agent's `/config_dump`.
fn config_dump(agent: &mesh_tests::Agent) -> serde_json::Value {
    serde_json::from_str(&agent.get("/config_dump").unwrap()).unwrap()
}

/// The proxy's cluster `name` as it is in force in `dump`.
fn in_force_cluster<'a>(dump: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    dump["in_force"]["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no cluster {name}: {dump}"))
}

fn at(ip: &str, port: u16) -> String {
    SocketAddr::new(ip.parse::<IpAddr>().unwrap(), port).to_string()
}

/// A TCP service dialled at `[vip6]:5432` from an IPv6 pod: the bytes reach the service's
/// IPv6 endpoint intact, through the proxy, counted under the service (its cluster's
/// Istio series) and the endpoint's IPv6 address (the proxy's series).
#[test]
fn a_tcp_service_is_reached_at_its_ipv6_address() {
    let n = node();
    let agent = start(&n);
    let vip6 = at(VIP6_DB, 5432);
    let r = n
        .client(
            "client",
            &["echo-client", "--to", &vip6, "--bytes", "65536"],
        )
        .unwrap();
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    assert_eq!(r["sha_sent"], r["sha_received"], "{r}");

    let endpoint = at(&n.pod("db").v6().to_string(), 9000);
    let svc = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("destination_workload", "db"),
        ("destination_service", "db.backend"),
        ("request_protocol", "tcp"),
    ];
    let mut m = String::new();
    wait_for(
        "the service connection counted closed",
        Duration::from_secs(10),
        || {
            m = agent.get("/metrics").unwrap();
            metric(&m, "istio_tcp_connections_closed_total", &svc) == 1
        },
    );
    assert_eq!(
        metric(&m, "istio_tcp_connections_opened_total", &svc),
        1,
        "{m}"
    );
    assert_eq!(metric(&m, "istio_tcp_sent_bytes_total", &svc), 65536, "{m}");
    assert_eq!(
        metric(
            &m,
            "mesh_tcp_connections_opened_total",
            &[
                ("source_workload", "shop/client"),
                ("destination_address", endpoint.as_str()),
            ]
        ),
        1,
        "the IPv6 endpoint was dialled: {m}"
    );

    // The listener came on demand, by the name of the address the client dialled, and
    // routes to the same cluster as the IPv4 one.
    let dump: serde_json::Value =
        serde_json::from_str(&agent.get("/config_dump").unwrap()).unwrap();
    let requested = dump["on_demand"]["requested"].as_array().unwrap();
    assert!(requested.iter().any(|v| v == vip6.as_str()), "{dump}");
    let l = dump["in_force"]["listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["address"] == vip6.as_str())
        .unwrap_or_else(|| panic!("no listener at {vip6}: {dump}"));
    assert_eq!(
        l["tcp_proxy"]["cluster"], "outbound|5432||db.backend",
        "{l}"
    );
    assert_eq!(dump["xds"]["nacks"], 0, "{dump}");

    // The IPv4 address of the same service still works, to the same endpoint.
    let r = n
        .client(
            "client",
            &["echo-client", "--to", "10.96.0.12:5432", "--bytes", "4096"],
        )
        .unwrap();
    assert_eq!(r["sha_sent"], r["sha_received"], "{r}");
    wait_for("both connections counted", Duration::from_secs(10), || {
        let m = agent.get("/metrics").unwrap();
        metric(&m, "istio_tcp_connections_opened_total", &svc) == 2
    });
}

/// An HTTP service dialled at `[vip6]:80`: L7 routing as at its IPv4 address. Plain
/// requests go to v1 (its selected workload, over IPv4); the canary route's requests to
/// `reviews-v2`, whose only endpoint is v2's IPv6 address, with the route's request
/// header added; each counted under its route.
#[test]
fn an_http_service_routes_at_its_ipv6_address() {
    let n = node();
    let agent = start(&n);
    let vip6 = at(VIP6_REVIEWS, 80);

    let plain = n.http_get("client", &vip6, "/", 10, &[]).unwrap();
    assert_eq!(plain["errors"], serde_json::json!([]), "{plain}");
    assert_eq!(plain["bodies"], serde_json::json!({ "v1": 10 }), "{plain}");
    assert_eq!(
        plain["seen_mesh"],
        serde_json::json!({ "-": 10 }),
        "{plain}"
    );

    let canary = n
        .http_get("client", &vip6, "/", 10, &["x-canary: 1"])
        .unwrap();
    assert_eq!(canary["errors"], serde_json::json!([]), "{canary}");
    assert_eq!(
        canary["bodies"],
        serde_json::json!({ "v2": 10 }),
        "{canary}"
    );
    assert_eq!(
        canary["seen_mesh"],
        serde_json::json!({ "canary": 10 }),
        "the route's request header reached the upstream: {canary}"
    );

    let m = agent.get("/metrics").unwrap();
    assert_eq!(
        metric(
            &m,
            "mesh_requests_total",
            &[
                ("route", "canary"),
                ("response_code", "200"),
                ("destination_cluster", "outbound|80||reviews-v2.backend"),
            ]
        ),
        10,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "mesh_requests_total",
            &[
                ("route", "default"),
                ("destination_cluster", "outbound|80||reviews.backend"),
            ]
        ),
        10,
        "{m}"
    );
    // v2 was reached at its IPv6 address: it is reviews-v2's only endpoint.
    let v2 = at(&n.pod("v2").v6().to_string(), 8080);
    let dump = config_dump(&agent);
    let cluster = in_force_cluster(&dump, "outbound|80||reviews-v2.backend");
    let endpoints: Vec<&str> = cluster["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["address"].as_str())
        .collect();
    assert_eq!(endpoints, [v2.as_str()], "{cluster}");
    let l = dump["in_force"]["listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["address"] == vip6.as_str())
        .unwrap_or_else(|| panic!("no listener at {vip6}: {dump}"));
    assert_eq!(
        l["http"]["route_config"]["name"], "reviews.backend:80",
        "the IPv4 address's routes: {l}"
    );
}

/// From Kubernetes (the API server double, objects applied with kubectl): a dual-stack
/// Service (`clusterIPs`, `ipFamilies`) with an IPv4 and an IPv6 EndpointSlice. Both
/// slices' endpoints are the service's (the IPv4 one not ready, so unhealthy and skipped);
/// an IPv6 pod dialling the IPv6 cluster IP reaches the IPv6 slice's endpoint.
#[test]
fn a_dual_stack_kubernetes_service_is_served_at_its_ipv6_cluster_ip() {
    let api = KubeApi::start_with(Options::default()).expect("API server double");
    let mut n = SimNode::new_dual_stack().expect("dual-stack sim node");
    let node_name = format!("sim-{}", n.index);
    let kubepods = n.cgroup.join("kubepods.slice");
    std::fs::create_dir_all(&kubepods).unwrap();
    for ns in ["shop", "backend"] {
        api.kubectl(&["create", "namespace", ns]).unwrap();
    }
    api.kubectl(&[
        "label",
        "namespace",
        "shop",
        "mesh-agent.io/dataplane-mode=ambient",
    ])
    .unwrap();
    // What the kubelet and the runtime do: the pod's cgroup named after its UID, its
    // network namespace, and both addresses in its status.
    for (ns, name, host) in [("shop", "client", 2u8), ("backend", "db", 5)] {
        let manifest = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n\
             spec:\n  nodeName: {node_name}\n  containers:\n  - name: main\n    image: podtool\n"
        );
        api.kubectl_stdin(&["create", "-f", "-"], &manifest)
            .unwrap();
        let uid = api
            .kubectl(&[
                "get",
                "pod",
                name,
                "-n",
                ns,
                "-o",
                "jsonpath={.metadata.uid}",
            ])
            .unwrap();
        let cgroup = kubepods.join(format!(
            "kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{name}.scope",
            uid.trim().replace('-', "_")
        ));
        let p = n.add_pod_at(name, host, cgroup).unwrap();
        let (ip, ip6) = (p.ip, p.v6());
        let status = format!(
            r#"{{"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}},{{"ip":"{ip6}"}}]}}}}"#
        );
        api.kubectl(&[
            "patch",
            "pod",
            name,
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status,
        ])
        .unwrap();
    }
    n.serve("db", &["echo", "--listen", "[::]:9000"]).unwrap();
    let (db4, db6) = (n.pod("db").ip, n.pod("db").v6());
    let vip = format!("10.96.{}.12", n.index);
    let vip6 = format!("fd00:96:{:x}::12", n.index);
    let objects = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: db, namespace: backend}}\n\
         spec:\n  clusterIP: {vip}\n  clusterIPs: [\"{vip}\", \"{vip6}\"]\n  ipFamilies: [IPv4, IPv6]\n\
         \x20 ipFamilyPolicy: RequireDualStack\n  ports: [{{name: tcp-db, port: 5432, targetPort: 9000}}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: db-v4, namespace: backend, labels: {{kubernetes.io/service-name: db}}}}\n\
         addressType: IPv4\nports: [{{name: tcp-db, port: 9000, protocol: TCP}}]\n\
         endpoints: [{{addresses: [\"{db4}\"], conditions: {{ready: false}}}}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: db-v6, namespace: backend, labels: {{kubernetes.io/service-name: db}}}}\n\
         addressType: IPv6\nports: [{{name: tcp-db, port: 9000, protocol: TCP}}]\n\
         endpoints: [{{addresses: [\"{db6}\"], conditions: {{ready: true}}}}]\n"
    );
    api.kubectl_stdin(&["apply", "-f", "-"], &objects).unwrap();
    n.write_config("exclude: []\n").unwrap();
    let kubeconfig = api.kubeconfig().display().to_string();
    let kubepods = kubepods.display().to_string();
    let agent = n
        .start_agent(&[
            "--source",
            "kubernetes",
            "--node-name",
            &node_name,
            "--kubeconfig",
            &kubeconfig,
            "--kubepods-cgroup",
            &kubepods,
        ])
        .unwrap();

    let to = at(&vip6, 5432);
    let mut r = serde_json::Value::Null;
    wait_for(
        "the service at its IPv6 cluster IP",
        Duration::from_secs(15),
        || {
            r = n.echo_once("client", &to).unwrap();
            r["errors"] == serde_json::json!([])
        },
    );
    assert_eq!(r["sha_sent"], r["sha_received"], "{r}");
    let endpoint = at(&db6.to_string(), 9000);
    let m = agent.get("/metrics").unwrap();
    assert!(
        metric(
            &m,
            "mesh_tcp_connections_opened_total",
            &[("destination_address", endpoint.as_str())]
        ) >= 1,
        "the IPv6 slice's endpoint was dialled: {m}"
    );
    let dump = config_dump(&agent);
    let cluster = in_force_cluster(&dump, "outbound|5432||db.backend");
    let mut endpoints: Vec<(String, String)> = cluster["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["address"].as_str().unwrap_or("").to_owned(),
                e["health"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    endpoints.sort();
    let mut want = vec![
        (format!("{db4}:9000"), "Unhealthy".to_owned()),
        (endpoint.clone(), "Healthy".to_owned()),
    ];
    want.sort();
    assert_eq!(endpoints, want, "{cluster}");
}
