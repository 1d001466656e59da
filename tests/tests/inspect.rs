//! `mesh-agent inspect pod|service` and `mesh-agent log-level` against a running agent on
//! a simulated node: one object joined end to end from the admin endpoint (a held
//! connection appears with its original destination, a service with its endpoints), and
//! the log filter changed at runtime (a debug line appears only once asked for; a bad
//! filter is refused and the one in force stays).

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::{Command, Output},
    time::Duration,
};

use mesh_tests::{
    agent_bin, podtool,
    scenes::{shop_backend_data, Held, ECHO_VIP},
    wait_for, Agent, SimNode,
};

const VIP: &str = ECHO_VIP;

/// The shared three-pod node ([`shop_backend_data`]) with an ALLOW policy on the server.
fn node_with_agent() -> (SimNode, Agent) {
    shop_backend_data(true)
}

/// `mesh-agent ARGS --admin-address` of this agent.
fn cli(agent: &Agent, args: &[&str]) -> Output {
    Command::new(agent_bin())
        .args(args)
        .arg("--admin-address")
        .arg(format!("127.0.0.1:{}", agent.admin_port))
        .output()
        .expect("run mesh-agent")
}

fn inspect_json(agent: &Agent, kind: &str, object: &str) -> serde_json::Value {
    let out = cli(agent, &["inspect", kind, object, "-o", "json"]);
    assert!(
        out.status.success(),
        "inspect {kind} {object}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "inspect -o json does not parse ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn inspect_text(agent: &Agent, kind: &str, object: &str) -> String {
    let out = cli(agent, &["inspect", kind, object]);
    assert!(
        out.status.success(),
        "inspect {kind} {object}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The connection rows of an inspection whose original destination is `dst`.
fn rows_to<'a>(v: &'a serde_json::Value, dst: &str) -> Vec<&'a serde_json::Value> {
    v["connections"]["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["original_destination"] == dst)
        .collect()
}

#[test]
fn inspect_pod_shows_enrolment_datapath_identity_and_a_live_connection() {
    let (n, agent) = node_with_agent();
    let server = format!("{}:7000", n.pod("server").ip);
    let cache = format!("{}:7000", n.pod("cache").ip);
    let _held = Held::open(&n, "client", &server);
    let _direct = Held::open(&n, "client", &cache);

    let mut v = serde_json::Value::Null;
    wait_for(
        "the held connections in inspect pod",
        Duration::from_secs(10),
        || {
            v = inspect_json(&agent, "pod", "shop/client");
            !rows_to(&v, &server).is_empty() && !rows_to(&v, &cache).is_empty()
        },
    );
    assert_eq!(v["kind"], "pod");
    assert_eq!(v["ip"], n.pod("client").ip.to_string());
    assert_eq!(v["enrolment"]["mode"], "captured", "{v:#}");
    assert_eq!(v["enrolment"]["fail_mode"], "open");
    // The netns cookie and its WORKLOADS entry are the ones in the pinned map.
    let cookie = v["datapath"]["netns_cookie"]
        .as_u64()
        .unwrap_or_else(|| panic!("no netns cookie: {v:#}"));
    let entry = &v["datapath"]["workloads_entry"];
    assert_eq!(entry["ip"], n.pod("client").ip.to_string());
    assert!(
        entry["flags"].as_str().unwrap().contains("enrolled"),
        "{entry}"
    );
    let dump = agent.cli(&["dump", "WORKLOADS", "-o", "json"]);
    let rows: serde_json::Value = serde_json::from_slice(&dump.stdout).unwrap();
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .any(|r| r["netns_cookie"] == cookie && r["ip"] == entry["ip"]),
        "cookie {cookie} not in dump WORKLOADS: {rows:#}"
    );
    assert_eq!(
        v["identity"]["spiffe_id"],
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    // The connection: the client's end, its original destination, the peer by name, and
    // the path it takes (captured: through the proxy).
    let c = rows_to(&v, &server)[0];
    assert_eq!(c["role"], "client", "{c:#}");
    assert_eq!(c["destination"], "backend/server", "{c:#}");
    assert!(
        c["local"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}:", n.pod("client").ip)),
        "{c:#}"
    );
    let path = c["path"].as_str().unwrap();
    assert!(path.starts_with("proxied"), "{c:#}");
    assert!(c["flags"].as_str().unwrap().contains("proxied"), "{c:#}");
    assert!(v["connections"]["total"].as_u64().unwrap() >= 2);
    // The direct-mode pair: no proxy, both sockets paired in SOCKHASH.
    let d = rows_to(&v, &cache)[0];
    assert_eq!(d["path"], "direct", "{d:#}");
    assert_eq!(d["destination"], "data/cache", "{d:#}");
    assert_eq!(d["remote"], cache.as_str(), "{d:#}");
    // The cache sees the same connection from its side.
    let c2 = inspect_json(&agent, "pod", "data/cache");
    assert_eq!(c2["enrolment"]["mode"], "direct", "{c2:#}");
    let seen = rows_to(&c2, &cache);
    assert!(
        seen.iter()
            .any(|r| r["role"] == "server" && r["source"] == "shop/client"),
        "{c2:#}"
    );
    // It reaches the server's address with no listener (relayed as it is).
    let reach = v["reaches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["destination"] == server.as_str())
        .unwrap_or_else(|| panic!("{server} not under reaches: {v:#}"));
    assert!(reach["listener"].is_null(), "{reach:#}");
    let reach_cache = v["reaches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["destination"] == cache.as_str())
        .unwrap_or_else(|| panic!("{cache} not under reaches: {v:#}"));
    assert_eq!(reach_cache["direct"], true, "{reach_cache:#}");

    // The server: the policy that applies to it, and the service it backs.
    let s = inspect_json(&agent, "pod", "backend/server");
    assert_eq!(s["services"], serde_json::json!(["backend/echo"]), "{s:#}");
    let authz = s["policies"]["authorization"].as_array().unwrap();
    assert!(
        authz
            .iter()
            .any(|p| p["name"] == "backend/allow-web" && p["action"] == "ALLOW"),
        "{s:#}"
    );

    // The text form says the same for people.
    let t = inspect_text(&agent, "pod", "shop/client");
    for want in [
        "pod shop/client".to_owned(),
        "mode         captured, fail open".to_owned(),
        format!("WORKLOADS    [{cookie}]"),
        "spiffe://cluster.local/ns/shop/sa/web".to_owned(),
        server.clone(),
        path.to_owned(),
    ] {
        assert!(t.contains(&want), "{want:?} missing from:\n{t}");
    }
    println!("{t}");
}

#[test]
fn inspect_service_shows_its_listener_cluster_endpoints_and_connections() {
    let (n, agent) = node_with_agent();
    let to = format!("{VIP}:80");
    let endpoint = format!("{}:7000", n.pod("server").ip);
    let _held = Held::open(&n, "client", &to);

    let mut v = serde_json::Value::Null;
    wait_for(
        "the service's endpoints and connection",
        Duration::from_secs(10),
        || {
            v = inspect_json(&agent, "service", "backend/echo");
            let has_endpoint = v["clusters"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|c| c["endpoints"].as_array().into_iter().flatten())
                .any(|e| e["address"] == endpoint.as_str());
            has_endpoint && !rows_to(&v, &to).is_empty()
        },
    );
    assert_eq!(v["vip"], VIP);
    assert_eq!(v["ports"][0]["port"], 80);
    assert_eq!(v["ports"][0]["target_port"], 7000);
    assert_eq!(v["ports"][0]["listener_in_force"], true, "{v:#}");
    assert!(
        v["declared_endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["workload"] == "backend/server"),
        "{v:#}"
    );
    let l = &v["listeners"][0];
    assert_eq!(l["address"], to.as_str(), "{v:#}");
    assert_eq!(l["kind"], "tcp");
    let cluster = l["clusters"][0].as_str().unwrap().to_owned();
    let ep = v["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == cluster.as_str())
        .and_then(|c| {
            c["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["address"] == endpoint.as_str())
                .cloned()
        })
        .unwrap_or_else(|| panic!("{endpoint} not in cluster {cluster}: {v:#}"));
    assert_eq!(ep["workload"], "backend/server");
    assert_eq!(rows_to(&v, &to)[0]["source"], "shop/client");

    // The client reaches the service through its listener.
    let p = inspect_json(&agent, "pod", "shop/client");
    let reach = p["reaches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["destination"] == to.as_str())
        .unwrap_or_else(|| panic!("{to} not under reaches: {p:#}"));
    assert_eq!(reach["name"], "service backend/echo");
    assert_eq!(reach["listener"]["clusters"][0], cluster.as_str());

    let t = inspect_text(&agent, "service", "backend/echo");
    for want in [
        format!("service backend/echo  vip {VIP}"),
        "port 80 -> 7000 tcp".to_owned(),
        cluster.clone(),
        endpoint.clone(),
        "backend/server".to_owned(),
    ] {
        assert!(t.contains(&want), "{want:?} missing from:\n{t}");
    }
    println!("{t}");
}

#[test]
fn inspect_of_an_unknown_object_fails_with_a_message() {
    let (_n, agent) = node_with_agent();
    for (kind, object, message) in [
        ("pod", "shop/nope", "no pod shop/nope"),
        ("service", "backend/nope", "no service backend/nope"),
        ("pod", "nope", "expected NAMESPACE/NAME"),
    ] {
        let out = cli(&agent, &["inspect", kind, object]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{kind} {object}: exit 0");
        assert!(err.contains(message), "{kind} {object}: {err}");
        assert!(out.stdout.is_empty(), "{kind} {object}: printed something");
    }
    // The endpoint itself: 404 with the message, 400 for a malformed path.
    let (status, body) = request(agent.admin_port, "GET", "/inspect/pod/shop/nope");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no pod shop/nope"), "{body}");
    assert_eq!(request(agent.admin_port, "GET", "/inspect/pod/x").0, 400);
}

/// Across nodes: a captured connection to a mesh pod of another node goes through the
/// HBONE tunnel, from the client's identity (whose certificate the agent now holds); and
/// the other node's pod is known as a mesh workload running elsewhere.
#[test]
fn inspect_pod_shows_a_tunnelled_connection_and_its_certificate_across_nodes() {
    use mesh_tests::cluster::{in_netns, SimCluster};
    let mut c = SimCluster::new(2).expect("sim cluster");
    c.add_pod(0, "client", 2).unwrap();
    c.add_pod(1, "server", 2).unwrap();
    c.node(1)
        .serve("server", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    let mut yaml = "namespaces:\n\
                    \x20 - { name: shop, labels: { mesh-agent.io/dataplane-mode: ambient } }\n\
                    \x20 - { name: backend, labels: { mesh-agent.io/dataplane-mode: ambient } }\n\
                    workloads:\n"
        .to_owned();
    for (pod, ns, sa) in [("client", "shop", "web"), ("server", "backend", "echo")] {
        let p = c.pod(pod);
        yaml += &format!(
            "  - {{ name: {pod}, namespace: {ns}, ip: {}, netns: {}, node: {}, service_account: {sa} }}\n",
            p.ip,
            p.netns_path(),
            c.node_of(pod).name()
        );
    }
    for i in 0..2 {
        c.node(i).write_config(&yaml).unwrap();
    }
    let agents: Vec<_> = (0..2)
        .map(|i| c.node(i).start_agent(&[]).expect("agent"))
        .collect();
    let server = format!("{}:8080", c.pod("server").ip);
    for a in &agents {
        wait_for("the workloads in force", Duration::from_secs(10), || {
            a.get("/config_dump")
                .map(|d| d.contains("spiffe://cluster.local/ns/backend/sa/echo"))
                .unwrap_or(false)
        });
    }
    let node0 = c.node(0).netns_path();
    let inspect = |object: &str| -> serde_json::Value {
        let out = in_netns(&node0, || {
            Command::new(agent_bin())
                .args(["inspect", "pod", object, "-o", "json"])
                .output()
                .expect("run mesh-agent")
        });
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("inspect -o json parses")
    };
    let held = Held::spawn(c.node(0).pod_command("client", &podtool()), &server);
    let mut v = serde_json::Value::Null;
    wait_for(
        "the tunnelled connection and the certificate",
        Duration::from_secs(10),
        || {
            v = inspect("shop/client");
            !rows_to(&v, &server).is_empty() && !v["identity"]["certificate"].is_null()
        },
    );
    drop(held);
    let row = rows_to(&v, &server)[0];
    assert_eq!(row["path"], "tunnel", "{row:#}");
    assert_eq!(row["destination"], "backend/server", "{row:#}");
    let cert = &v["identity"]["certificate"];
    assert!(
        cert["serial"].as_str().is_some_and(|s| !s.is_empty()),
        "{cert:#}"
    );
    assert!(cert["expires_in_s"].as_i64().unwrap() > 0, "{cert:#}");
    assert_eq!(v["identity"]["mesh_workload"]["node"], "n0");
    // The other node's pod: known to the proxy, running elsewhere.
    let s = inspect("backend/server");
    assert_eq!(s["enrolment"]["mode"], "elsewhere", "{s:#}");
    assert_eq!(s["enrolment"]["node"], "n1", "{s:#}");
    assert_eq!(
        s["identity"]["spiffe_id"],
        "spiffe://cluster.local/ns/backend/sa/echo"
    );
}

/// One request to the admin endpoint: `(status, body)`.
fn request(port: u16, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

/// Lines of the agent's log that the admin endpoint's debug logging wrote.
fn debug_lines(agent: &Agent) -> usize {
    agent
        .log_text()
        .lines()
        .filter(|l| l.contains("DEBUG") && l.contains("admin request"))
        .count()
}

#[test]
fn log_level_changes_the_filter_at_runtime_and_refuses_a_bad_one() {
    let (_n, agent) = node_with_agent();
    let port = agent.admin_port;
    let get = |args: &[&str]| {
        let out = cli(&agent, &[&["log-level"], args].concat());
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        )
    };
    assert_eq!(get(&[]), (true, "info".to_owned(), String::new()));
    assert_eq!(request(port, "GET", "/healthz").0, 200);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        debug_lines(&agent),
        0,
        "debug at info:\n{}",
        agent.log_text()
    );

    // Debug for the admin module only: its requests are logged from now on.
    let (ok, now, err) = get(&["mesh_agent::admin=debug,info"]);
    assert!(ok, "{err}");
    assert!(now.contains("mesh_agent::admin=debug"), "{now}");
    assert_eq!(request(port, "GET", "/healthz").0, 200);
    wait_for("a debug line", Duration::from_secs(5), || {
        debug_lines(&agent) > 0
    });
    assert!(
        !agent
            .log_text()
            .lines()
            .any(|l| l.contains("DEBUG") && !l.contains("mesh_agent::admin")),
        "only the admin module logs at debug:\n{}",
        agent.log_text()
    );

    // A bad filter: 400 with the parse error, and the filter in force stays.
    let (status, body) = request(port, "POST", "/logging?filter=mesh_agent%3Dloud");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid log filter"), "{body}");
    let (ok, _, err) = get(&["mesh_agent=loud"]);
    assert!(!ok && err.contains("invalid log filter"), "{err}");
    let (status, body) = request(port, "POST", "/logging?level=loud");
    assert_eq!(status, 400, "{body}");
    assert_eq!(request(port, "POST", "/logging").0, 400);
    let (_, now, _) = get(&[]);
    assert!(now.contains("mesh_agent::admin=debug"), "kept: {now}");

    // Back to info with Envoy's form: no more debug lines.
    let (status, body) = request(port, "POST", "/logging?level=info");
    assert_eq!((status, body.trim()), (200, "info"));
    let before = debug_lines(&agent);
    assert_eq!(request(port, "GET", "/healthz").0, 200);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(debug_lines(&agent), before, "{}", agent.log_text());
    // Other paths still take no POST.
    assert_eq!(request(port, "POST", "/metrics").0, 405);
}

/// `mesh-agent dump MAP -o json` against the agent's pins only (no admin endpoint): the
/// rows.
fn dump_rows(agent: &Agent, map: &str) -> Vec<serde_json::Value> {
    let out = agent.cli(&["dump", map, "-o", "json"]);
    assert!(
        out.status.success(),
        "dump {map}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "dump {map} -o json does not parse ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    rows.as_array().cloned().unwrap_or_default()
}

/// The flags of `ip`'s row in `rows`, if it has one.
fn flags_of(rows: &[serde_json::Value], ip: &str) -> Option<String> {
    rows.iter()
        .find(|r| r["ip"] == ip)
        .map(|r| r["flags"].as_str().unwrap_or_default().to_owned())
}

/// The TC inbound capture maps, read from their pins: a dual-stack pod enrolled with
/// inbound capture is in `INBOUND` by its IPv4 address and in `INBOUND6` by its IPv6 one,
/// `enrolled|capture` (a pod outside the mesh in neither), in the table and in JSON; once
/// the pod leaves the node's enrolment file both entries go.
#[test]
fn dump_inbound_shows_a_captured_pods_addresses_until_the_pod_is_removed() {
    let mut n = SimNode::new_dual_stack().expect("dual-stack sim node");
    n.add_pod("web", 2).unwrap();
    n.add_pod("outsider", 3).unwrap();
    let config = |with_web: bool| {
        let (web, outsider) = (n.pod("web"), n.pod("outsider"));
        let mut y = "namespaces:\n\
             \x20 - { name: app, labels: { mesh-agent.io/dataplane-mode: ambient } }\n\
             \x20 - { name: legacy }\n\
             workloads:\n"
            .to_owned();
        if with_web {
            y += &format!(
                "  - {{ name: web, namespace: app, ip: {}{}, netns: {} }}\n",
                web.ip,
                web.ip6_field(),
                web.netns_path()
            );
        }
        y += &format!(
            "  - {{ name: outsider, namespace: legacy, ip: {}{}, netns: {} }}\n",
            outsider.ip,
            outsider.ip6_field(),
            outsider.netns_path()
        );
        y
    };
    n.write_config(&config(true)).unwrap();
    let agent = n.start_agent(&[]).unwrap();
    let (web4, web6) = (n.pod("web").ip.to_string(), n.pod("web").v6().to_string());
    let (out4, out6) = (
        n.pod("outsider").ip.to_string(),
        n.pod("outsider").v6().to_string(),
    );

    // `capture` is written once the pod's listeners are open, just before the attach.
    let captured = Some("enrolled|capture".to_owned());
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    wait_for(
        "web's inbound capture in the maps",
        Duration::from_secs(10),
        || {
            v4 = dump_rows(&agent, "INBOUND");
            v6 = dump_rows(&agent, "INBOUND6");
            flags_of(&v4, &web4) == captured && flags_of(&v6, &web6) == captured
        },
    );
    assert_eq!(flags_of(&v4, &out4), None, "{v4:#?}");
    assert_eq!(flags_of(&v6, &out6), None, "{v6:#?}");
    // Addresses as addresses, never as the raw key.
    for r in v4.iter().chain(&v6) {
        let ip = r["ip"].as_str().unwrap_or_default();
        assert!(ip.parse::<std::net::IpAddr>().is_ok(), "{r}");
    }
    // The table: a header, then the pod's row.
    for (map, ip) in [("INBOUND", &web4), ("INBOUND6", &web6)] {
        let out = agent.cli(&["dump", map]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("mesh-agent dump {map}\n{text}");
        assert!(text.starts_with("IP "), "{text}");
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>()
                    == [ip.as_str(), "enrolled|capture"]),
            "{map}:\n{text}"
        );
    }
    // `maps` counts their entries like any other pinned map's.
    let maps = agent.cli(&["maps", "-o", "json"]);
    let maps: serde_json::Value = serde_json::from_slice(&maps.stdout).unwrap();
    for name in ["INBOUND", "INBOUND6"] {
        let row = maps
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in maps: {maps:#}"));
        assert!(row["entries"].as_i64().unwrap() >= 1, "{row}");
    }

    // The pod leaves the node: both entries go.
    n.write_config(&config(false)).unwrap();
    wait_for("web's entries to go", Duration::from_secs(10), || {
        v4 = dump_rows(&agent, "INBOUND");
        v6 = dump_rows(&agent, "INBOUND6");
        flags_of(&v4, &web4).is_none() && flags_of(&v6, &web6).is_none()
    });
}

/// `UNREAD_CLOSES` is not pinned: `dump` finds it through the program that writes it. A
/// direct-mode pair (socket to socket, no proxy to consume the mark) whose server closes
/// with bytes unread leaves an entry, shown as addresses, a byte count and an age. With
/// the program not loaded the command says why.
#[test]
fn dump_unread_closes_finds_the_unpinned_map_and_shows_an_unconsumed_close() {
    let (n, agent) = node_with_agent();
    if agent.kernel_feature("close_unread_reset") != Some(true) {
        // Before 6.9 nothing marks closes: the command says the program is not loaded,
        // or (where another program of the agent holds the map) lists nothing.
        let out = agent.cli(&["dump", "UNREAD_CLOSES", "-o", "json"]);
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
        } else {
            assert!(err.contains("mesh_close_unread"), "{err}");
        }
        eprintln!("close_unread_reset not available here: no close to show");
        return;
    }
    assert_eq!(
        dump_rows(&agent, "UNREAD_CLOSES"),
        Vec::<serde_json::Value>::new()
    );
    let cache = n.pod("cache").ip;
    // `cache` (namespace `data`, direct mode) accepts, says so (both ends are paired by
    // then), waits for the bytes, closes without reading; `client` prints its port, sends
    // them once told and waits for the end (a reset, or EOF).
    const SERVER: &str = "import socket, time\n\
        l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
        l.bind(('0.0.0.0', 7100)); l.listen(1); print('listening', flush=True)\n\
        c, _ = l.accept(); c.sendall(b'r'); time.sleep(0.5); c.close()\n";
    const CLIENT: &str = "import socket, sys\n\
        c = socket.create_connection((sys.argv[1], 7100), timeout=10)\n\
        print(c.getsockname()[1], flush=True)\n\
        assert c.recv(1) == b'r'\n\
        c.sendall(b'x' * 50000)\n\
        try:\n    while c.recv(65536): pass\nexcept OSError: pass\n";
    let py = mesh_tests::otlp::python();
    let mut server = n
        .pod_command("cache", &py)
        .args(["-c", SERVER])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python server");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "listening");
    let out = n
        .pod_command("client", &py)
        .args(["-c", CLIENT, &cache.to_string()])
        .output()
        .expect("python client");
    let _ = server.wait();
    let port = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success() && port.parse::<u16>().is_ok(),
        "client: {port:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The closing socket's view: its own address local, the client remote.
    let (local, remote) = (
        format!("{cache}:7100"),
        format!("{}:{port}", n.pod("client").ip),
    );
    let rows = dump_rows(&agent, "UNREAD_CLOSES");
    let row = rows
        .iter()
        .find(|r| r["local"] == local && r["remote"] == remote)
        .unwrap_or_else(|| panic!("no {local} <- {remote} in UNREAD_CLOSES: {rows:#?}"));
    let unread = row["unread_bytes"].as_u64().unwrap();
    assert!(unread > 0 && unread <= 50_000, "{row}");
    assert!(row["age_ms"].as_u64().unwrap() < 60_000, "{row}");
    let text = String::from_utf8_lossy(&agent.cli(&["dump", "UNREAD_CLOSES"]).stdout).into_owned();
    eprintln!("mesh-agent dump UNREAD_CLOSES\n{text}");
    assert!(
        text.starts_with("KEY_NETNS  LOCAL") && text.contains(&local) && text.contains(&remote),
        "{text}"
    );
    // `maps` lists it too, as not pinned.
    let maps = agent.cli(&["maps", "-o", "json"]);
    let maps: serde_json::Value = serde_json::from_slice(&maps.stdout).unwrap();
    let row = maps
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "UNREAD_CLOSES")
        .unwrap_or_else(|| panic!("UNREAD_CLOSES not in maps: {maps:#}"));
    assert_eq!(row["pinned"], serde_json::Value::Null, "{row}");
    assert!(row["entries"].as_i64().unwrap() >= 1, "{row}");
}
