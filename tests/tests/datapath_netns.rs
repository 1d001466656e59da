//! Flow keys with a network namespace, and IPv6 in the maps (issue 14, items 4 and 5):
//! a captured flow and an unrelated connection of another namespace holding the same
//! addresses never meet in the datapath's maps, and a native IPv6 flow is recorded with
//! its IPv6 addresses. Part of the datapath binary too (the kernel matrix runs it).

use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Duration,
};

use mesh_tests::{sh, SimNode};

const PYTHON: &str = "/usr/bin/python3";

/// A TCP echo server answering `S:<line>` per connection, with `TCP_DEFER_ACCEPT`: the
/// kernel completes an accepted connection only once data arrives, so its
/// PASSIVE_ESTABLISHED comes after the client's first send (the window in which another
/// namespace's socket with the same addresses could take the flow over).
const DEFERRED_ECHO: &str = r#"
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 10)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    data = b""
    while not data.endswith(b"\n"):
        d = c.recv(65536)
        if not d:
            break
        data += d
    c.sendall(b"S:" + data)
    c.close()
"#;

/// A client that connects from a chosen port, says `connected`, waits for a line on stdin,
/// sends `payload\n`, and prints what came back and whom `getpeername` names.
const HELD_CLIENT: &str = r#"
import json, socket, sys
dst, port, sport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
c = socket.socket(fam)
c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
c.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", sport))
c.connect((dst, port))
print("connected", flush=True)
sys.stdin.readline()
c.sendall(b"payload-from-the-captured-client\n")
c.settimeout(10)
reply = b""
try:
    while not reply.endswith(b"\n"):
        d = c.recv(65536)
        if not d:
            break
        reply += d
except socket.timeout:
    pass
peer = c.getpeername()
print(json.dumps({"reply": reply.decode(errors="replace"), "peer": [peer[0], peer[1]]}), flush=True)
"#;

/// In the shadow namespace, which holds both ends' addresses: a listener on the server's
/// address and a connection to it from the client's address and port (the captured flow's
/// very 4-tuple). It exchanges `shadow\n`, says `exchanged`, then waits for a line on stdin
/// and reports anything else that reached its accepted socket.
const SHADOW: &str = r#"
import json, socket, sys
src, dst, port, sport = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((dst, port))
srv.listen(4)
cl = socket.socket()
cl.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
cl.bind((src, sport))
cl.connect((dst, port))
a, _ = srv.accept()
cl.sendall(b"shadow\n")
a.settimeout(5)
got = b""
try:
    while not got.endswith(b"\n"):
        d = a.recv(65536)
        if not d:
            break
        got += d
except socket.timeout:
    pass
print("exchanged", flush=True)
sys.stdin.readline()
a.setblocking(False)
extra = b""
try:
    while True:
        d = a.recv(65536)
        if not d:
            break
        extra += d
except BlockingIOError:
    pass
print(json.dumps({"got": got.decode(errors="replace"), "extra": extra.decode(errors="replace")}), flush=True)
"#;

/// A python script started in `pod` (its namespace and cgroup), stdin and stdout piped.
struct Script {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Script {
    fn start(n: &SimNode, pod: &str, code: &str, args: &[&str]) -> Script {
        let mut cmd: Command = n.pod_command(pod, Path::new(PYTHON));
        let mut child = cmd
            .arg("-c")
            .arg(code)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Script {
            child,
            stdin,
            stdout,
        }
    }

    /// The next line of output (panics at EOF: the script failed, its stderr is shown).
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.stdout.read_line(&mut l).expect("read");
        assert!(!l.is_empty(), "the script ended early");
        l.trim_end().to_owned()
    }

    fn say(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("write");
        self.stdin.flush().expect("flush");
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dump(agent: &mesh_tests::Agent, map: &str) -> Vec<serde_json::Value> {
    let out = agent.cli(&["dump", map, "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// `/kernel`: how the agent knows an accepting socket's namespace (`flow_key_netns`:
/// `sockops_helper` 5.15+, `socket_stamp` 5.9+, `derived`), and the report of the two
/// features behind it.
fn flow_key_netns(agent: &mesh_tests::Agent) -> (String, serde_json::Value) {
    let k: serde_json::Value = serde_json::from_str(&agent.get("/kernel").unwrap()).unwrap();
    let features: serde_json::Value = k["features"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["name"] == "sockops_netns_cookie" || f["name"] == "sock_netns_stamp")
        .map(|f| {
            (
                f["name"].as_str().unwrap().to_owned(),
                f["available"].clone(),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into();
    (
        k["flow_key_netns"].as_str().unwrap_or("").to_owned(),
        features,
    )
}

/// The captured client's and the shadow's accounts of one run of the collision.
struct Collision {
    /// What the captured client got back, and whom `getpeername` named.
    client: serde_json::Value,
    /// What the shadow's accepted socket received: its own line (`got`), and anything
    /// else (`extra`).
    shadow: serde_json::Value,
    /// `sockhash_update_failed` events during the run.
    sockhash_failed: u64,
}

/// A node with a captured client pod, a direct-mode server pod and the shadow namespace
/// (in the node's cgroup, so the programs see its sockets, but not on the bridge), which
/// holds the client's and the server's addresses on its loopback; and its agent.
fn two_namespaces(agent_args: &[&str]) -> (SimNode, mesh_tests::Agent) {
    let mut n = SimNode::new().expect("sim node");
    n.add_pod("client", 2).unwrap();
    n.add_pod("server", 3).unwrap();
    n.add_pod("shadow", 9).unwrap();
    let (client, server) = (n.pod("client").ip, n.pod("server").ip);
    let shadow = n.pod("shadow").netns.clone();
    sh(&format!(
        "ip -n {shadow} link del eth0 && ip -n {shadow} addr add {client}/32 dev lo && \
         ip -n {shadow} addr add {server}/32 dev lo"
    ))
    .unwrap();
    n.write_config(&format!(
        "namespaces:\n  - name: shop\n    labels: {{ mesh-agent.io/dataplane-mode: ambient }}\n  - name: backend\n    mode: direct\n\
         workloads:\n\
         \x20 - {{ name: client, namespace: shop, ip: {client}, netns: {} }}\n\
         \x20 - {{ name: server, namespace: backend, ip: {server}, netns: {} }}\n",
        n.pod("client").netns_path(),
        n.pod("server").netns_path(),
    ))
    .unwrap();
    let mut args = vec!["--skmsg-unbounded-pairing", "true"];
    args.extend_from_slice(agent_args);
    let agent = n.start_agent(&args).unwrap();
    (n, agent)
}

/// The case docs/kernels.md left open: a captured direct-mode flow whose accepting end
/// completes its handshake late, and a connection in the shadow namespace with the *same*
/// 4-tuple whose accepting end completes first. Checks the captured flow's record (keyed
/// by the server's namespace) on the way, and returns what each side received.
fn collide(n: &SimNode, agent: &mesh_tests::Agent) -> Collision {
    collide_with(n, agent, deferred_server(n))
}

/// The server pod's listener (`DEFERRED_ECHO` on port 8080), listening.
fn deferred_server(n: &SimNode) -> Script {
    let mut srv = Script::start(n, "server", DEFERRED_ECHO, &["0.0.0.0", "8080"]);
    assert_eq!(srv.line(), "listening");
    srv
}

/// `collide` with a server listening already.
fn collide_with(n: &SimNode, agent: &mesh_tests::Agent, srv: Script) -> Collision {
    let (client, server) = (n.pod("client").ip, n.pod("server").ip);
    let failed = agent.event("sockhash_update_failed");
    let sport = (42000 + u16::from(n.index)).to_string();

    // The captured client connects and holds: its flow is recorded and it is paired, the
    // server's end is not established yet (deferred).
    let mut c = Script::start(
        n,
        "client",
        HELD_CLIENT,
        &[&server.to_string(), "8080", &sport],
    );
    assert_eq!(c.line(), "connected");
    assert_eq!(agent.event("connect_direct"), 1);
    let server_netns = dump(agent, "DESTS")
        .into_iter()
        .find(|d| d["ip"] == server.to_string().as_str())
        .and_then(|d| d["netns_cookie"].as_u64())
        .expect("DESTS holds the server with its namespace");
    assert_ne!(server_netns, 0);
    let flows = dump(agent, "FLOWS");
    let local = format!("{client}:{sport}");
    let ours: Vec<_> = flows
        .iter()
        .filter(|f| f["local"] == local.as_str())
        .collect();
    assert_eq!(ours.len(), 1, "{flows:?}");
    assert_eq!(ours[0]["key_netns"], server_netns, "{flows:?}");
    assert_eq!(ours[0]["original_dst"], format!("{server}:8080").as_str());

    // The same 4-tuple in the shadow namespace, accepted while the captured flow waits.
    let mut sh_ = Script::start(
        n,
        "shadow",
        SHADOW,
        &[&client.to_string(), &server.to_string(), "8080", &sport],
    );
    assert_eq!(sh_.line(), "exchanged");

    // The captured client sends now.
    c.say("go");
    let client: serde_json::Value = serde_json::from_str(&c.line()).unwrap();
    sh_.say("done");
    let shadow: serde_json::Value = serde_json::from_str(&sh_.line()).unwrap();
    let sockhash_failed = agent.event("sockhash_update_failed") - failed;
    std::thread::sleep(Duration::from_millis(100));
    drop(srv);
    Collision {
        client,
        shadow,
        sockhash_failed,
    }
}

/// Both exchanges arrived intact where they were sent: the shadow's accepting socket
/// found no flow and paired with nothing.
fn assert_never_met(n: &SimNode, r: &Collision) {
    let server = n.pod("server").ip;
    let (c, s) = (&r.client, &r.shadow);
    assert_eq!(c["reply"], "S:payload-from-the-captured-client\n", "{c}");
    assert_eq!(
        c["peer"],
        serde_json::json!([server.to_string(), 8080]),
        "{c}"
    );
    assert_eq!(s["got"], "shadow\n", "{s}");
    assert_eq!(
        s["extra"], "",
        "the captured client's bytes reached the shadow: {s}"
    );
    // The shadow's accepting socket never tried the flow's sockhash slot.
    assert_eq!(r.sockhash_failed, 0);
}

/// With flow keys carrying the accepting side's real namespace, the shadow's socket finds
/// no flow and pairs with nothing: both exchanges arrive intact where they were sent. On
/// every supported kernel: sockops asks the kernel on 5.15+, and reads the stamp
/// `mesh_sock_netns` left on the socket below (5.10 - 5.14).
#[test]
fn flows_of_two_namespaces_with_the_same_addresses_never_meet() {
    let (n, agent) = two_namespaces(&[]);
    let (how, features) = flow_key_netns(&agent);
    assert!(
        how == "sockops_helper" || how == "socket_stamp",
        "every supported kernel knows the accepting namespace: {how} {features}"
    );
    assert_eq!(features["sock_netns_stamp"], true, "{features}");
    assert_never_met(&n, &collide(&n, &agent));
}

/// The same with the way 5.10 - 5.14 take, forced on any kernel (the stamp is what
/// `sockops_netns_cookie`'s absence leaves): the shadow's accepted socket carries its
/// listener's stamp, its own namespace, though it holds the server's address.
#[test]
fn the_socket_stamp_keeps_two_namespaces_apart() {
    let (n, agent) = two_namespaces(&["--assume-missing-feature", "sockops_netns_cookie"]);
    let (how, features) = flow_key_netns(&agent);
    assert_eq!(how, "socket_stamp", "{features}");
    assert_eq!(features["sockops_netns_cookie"], false, "{features}");
    assert_eq!(features["sock_netns_stamp"], true, "{features}");
    let links = String::from_utf8(agent.cli(&["links"]).stdout).unwrap();
    assert!(
        links.contains("mesh_sock_netns"),
        "the stamp is attached: {links}"
    );
    assert_never_met(&n, &collide(&n, &agent));
}

/// The stamp outlives the agent that attached its program: a server listening since the
/// first agent ran keeps its namespace after a restart (`--on-exit keep`; the next agent
/// adopts the pinned `SOCK_NETNS` and the stamp program's pinned link), and the shadow
/// still finds no flow.
#[test]
fn the_socket_stamp_outlives_an_agent_restart() {
    let stamp = ["--assume-missing-feature", "sockops_netns_cookie"];
    let (n, mut first) = two_namespaces(&[&stamp[..], &["--on-exit", "keep"]].concat());
    assert_eq!(flow_key_netns(&first).0, "socket_stamp");
    // Stamped by the first agent's program.
    let srv = deferred_server(&n);
    let (code, log) = first.stop();
    assert_eq!(code, Some(0), "{log}");
    let mut args = vec!["--skmsg-unbounded-pairing", "true"];
    args.extend_from_slice(&stamp);
    let second = n.start_agent(&args).unwrap();
    let log = second.log_text();
    assert!(
        log.contains("adopted the datapath an earlier agent left pinned"),
        "{log}"
    );
    // connect4|6, getpeername4|6, sockops and the stamp, each swapped into its link.
    assert!(log.contains("links=6"), "{log}");
    assert_eq!(flow_key_netns(&second).0, "socket_stamp");
    assert_never_met(&n, &collide_with(&n, &second, srv));
}

/// The control: with neither way (both forced missing) the namespace is derived from the
/// address, and the shadow's accepting socket, completing its handshake first, takes the
/// flow over: the captured client's bytes go to the shadow. What the two tests above
/// would see without their mechanism; no supported kernel runs this way.
#[test]
fn with_derived_namespaces_the_shadow_takes_the_flow_over() {
    let (n, agent) = two_namespaces(&[
        "--assume-missing-feature",
        "sockops_netns_cookie",
        "--assume-missing-feature",
        "sock_netns_stamp",
    ]);
    let (how, features) = flow_key_netns(&agent);
    assert_eq!(how, "derived", "{features}");
    let links = String::from_utf8(agent.cli(&["links"]).stdout).unwrap();
    assert!(!links.contains("mesh_sock_netns"), "{links}");
    let r = collide(&n, &agent);
    assert_eq!(
        r.shadow["extra"], "payload-from-the-captured-client\n",
        "the collision the namespace in the key prevents: {} {}",
        r.client, r.shadow
    );
    assert_ne!(r.client["reply"], "S:payload-from-the-captured-client\n");
}

/// Native IPv6 in the maps: on a dual-stack node, a direct-mode IPv6 flow is decided by
/// connect6 (not left alone), recorded in `FLOWS` with its IPv6 addresses under the
/// destination's namespace, and `WORKLOADS`, `DESTS` and `NODE_ADDRS` hold the IPv6
/// addresses.
#[test]
fn ipv6_addresses_are_written_to_the_maps() {
    let mut n = SimNode::new_dual_stack().expect("sim node");
    n.add_pod("client", 2).unwrap();
    n.add_pod("server", 3).unwrap();
    let (c6, s6) = (n.pod("client").v6(), n.pod("server").v6());
    n.write_config(&format!(
        "namespaces:\n  - name: shop\n    labels: {{ mesh-agent.io/dataplane-mode: ambient }}\n  - name: backend\n    mode: direct\n\
         workloads:\n\
         \x20 - {{ name: client, namespace: shop, ip: {}{}, netns: {} }}\n\
         \x20 - {{ name: server, namespace: backend, ip: {}{}, netns: {} }}\n",
        n.pod("client").ip,
        n.pod("client").ip6_field(),
        n.pod("client").netns_path(),
        n.pod("server").ip,
        n.pod("server").ip6_field(),
        n.pod("server").netns_path(),
    ))
    .unwrap();
    let agent = n
        .start_agent(&["--skmsg-unbounded-pairing", "true"])
        .unwrap();

    let workloads = dump(&agent, "WORKLOADS");
    assert!(
        workloads
            .iter()
            .any(|w| w["ip6"] == c6.to_string().as_str()),
        "{workloads:?}"
    );
    let dests = dump(&agent, "DESTS");
    let server6 = dests
        .iter()
        .find(|d| d["ip"] == s6.to_string().as_str())
        .unwrap_or_else(|| panic!("{dests:?}"));
    assert!(server6["flags"].as_str().unwrap().contains("direct"));
    let server_netns = server6["netns_cookie"].as_u64().unwrap();
    assert!(
        dump(&agent, "NODE_ADDRS")
            .iter()
            .any(|a| a["ip"] == n.gateway6().to_string().as_str()),
        "the node's IPv6 address is one of its own"
    );
    let config = dump(&agent, "CONFIG");
    assert_eq!(
        config[0]["proxy6"],
        format!("[{}]:{}", n.gateway6(), mesh_tests::PROXY_PORT).as_str()
    );

    let mut srv = Script::start(&n, "server", DEFERRED_ECHO, &["::", "8080"]);
    assert_eq!(srv.line(), "listening");
    let sport = (43000 + u16::from(n.index)).to_string();
    let mut c = Script::start(
        &n,
        "client",
        HELD_CLIENT,
        &[&s6.to_string(), "8080", &sport],
    );
    assert_eq!(c.line(), "connected");
    let flows = dump(&agent, "FLOWS");
    let local = format!("[{c6}]:{sport}");
    let f = flows
        .iter()
        .find(|f| f["local"] == local.as_str())
        .unwrap_or_else(|| panic!("no IPv6 flow from {local}: {flows:?}"));
    assert_eq!(f["remote"], format!("[{s6}]:8080").as_str(), "{f}");
    assert_eq!(f["original_dst"], format!("[{s6}]:8080").as_str(), "{f}");
    assert_eq!(f["key_netns"], server_netns, "{f}");
    assert!(f["flags"].as_str().unwrap().contains("direct"), "{f}");
    c.say("go");
    let r: serde_json::Value = serde_json::from_str(&c.line()).unwrap();
    assert_eq!(r["reply"], "S:payload-from-the-captured-client\n", "{r}");
    assert_eq!(agent.event("connect_direct"), 1);
    assert_eq!(agent.event("connect_not_ipv4"), 0);
    drop(srv);
}
