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

/// Whether this kernel lets sockops read a socket's namespace (5.15+): where it does not,
/// the accepting side's namespace is derived from its address (docs/kernels.md).
fn sockops_netns(agent: &mesh_tests::Agent) -> bool {
    let k: serde_json::Value = serde_json::from_str(&agent.get("/kernel").unwrap()).unwrap();
    k["features"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["name"] == "sockops_netns_cookie" && f["available"] == true)
}

/// The case docs/kernels.md left open: a captured direct-mode flow whose accepting end
/// completes its handshake late, and a connection in another namespace with the *same*
/// 4-tuple whose accepting end completes first. With flow keys carrying the accepting
/// side's namespace the other namespace's socket finds no flow and pairs with nothing:
/// both exchanges arrive intact where they were sent. (Without the namespace in the key,
/// that socket took the flow over, and the captured client's bytes went into the other
/// namespace.)
#[test]
fn flows_of_two_namespaces_with_the_same_addresses_never_meet() {
    let mut n = SimNode::new().expect("sim node");
    n.add_pod("client", 2).unwrap();
    n.add_pod("server", 3).unwrap();
    // The shadow namespace: in the node's cgroup (the programs see its sockets) but not
    // on the bridge, holding the client's and the server's addresses on its loopback.
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
    let agent = n
        .start_agent(&["--skmsg-unbounded-pairing", "true"])
        .unwrap();
    if !sockops_netns(&agent) {
        // Below 5.15 the namespace is derived from the address: the shadow socket's is
        // the server's, which is the documented limit. Say so instead of passing.
        let k = agent.get("/kernel").unwrap();
        assert!(k.contains("sockops_netns_cookie"), "{k}");
        return;
    }
    let mut srv = Script::start(&n, "server", DEFERRED_ECHO, &["0.0.0.0", "8080"]);
    assert_eq!(srv.line(), "listening");
    let failed = agent.event("sockhash_update_failed");
    let sport = (42000 + u16::from(n.index)).to_string();

    // The captured client connects and holds: its flow is recorded and it is paired, the
    // server's end is not established yet (deferred).
    let mut c = Script::start(
        &n,
        "client",
        HELD_CLIENT,
        &[&server.to_string(), "8080", &sport],
    );
    assert_eq!(c.line(), "connected");
    assert_eq!(agent.event("connect_direct"), 1);
    let server_netns = dump(&agent, "DESTS")
        .into_iter()
        .find(|d| d["ip"] == server.to_string().as_str())
        .and_then(|d| d["netns_cookie"].as_u64())
        .expect("DESTS holds the server with its namespace");
    assert_ne!(server_netns, 0);
    let flows = dump(&agent, "FLOWS");
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
        &n,
        "shadow",
        SHADOW,
        &[&client.to_string(), &server.to_string(), "8080", &sport],
    );
    assert_eq!(sh_.line(), "exchanged");

    // The captured client sends now: its bytes must reach the server, not the shadow.
    c.say("go");
    let r: serde_json::Value = serde_json::from_str(&c.line()).unwrap();
    assert_eq!(r["reply"], "S:payload-from-the-captured-client\n", "{r}");
    assert_eq!(
        r["peer"],
        serde_json::json!([server.to_string(), 8080]),
        "{r}"
    );
    sh_.say("done");
    let s: serde_json::Value = serde_json::from_str(&sh_.line()).unwrap();
    assert_eq!(s["got"], "shadow\n", "{s}");
    assert_eq!(
        s["extra"], "",
        "the captured client's bytes reached the shadow: {s}"
    );
    // The shadow's accepting socket never tried the flow's sockhash slot.
    assert_eq!(agent.event("sockhash_update_failed"), failed);
    std::thread::sleep(Duration::from_millis(100));
    drop(srv);
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
