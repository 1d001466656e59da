//! A paired socket closed with bytes unread ends its proxied flow in a reset, as plain
//! TCP does, never in a clean end of stream (docs/architecture.md, "A paired socket
//! closed with unread bytes"). Real sockets in the pods of a simulated node, through the
//! node proxy: on the default path (the client's leg is paired with the proxy), with
//! `--skmsg-upstream` and with `--kernel-relay` (the destination's leg is paired too).
//! The same flows with the feature forced missing show the gap it closes: a clean EOF.
//! Direct mode (the two pods paired with each other, no proxy): the closing socket's FIN
//! becomes an RST at the receiving pod's TC ingress (`tc_fin_to_rst`).

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use mesh_tests::{
    family::Family,
    otlp::python,
    scenes::{client_db, DB_VIP as VIP, NS_SHOP},
    Agent, SimNode,
};

/// Bytes left unread: well under the redirect queue's limit (4 MiB floor), so they all
/// wait in the reader's psock queue.
const BYTES: usize = 100_000;

/// Both ends, in Python: `serve MODE PORT N R` (accepts one connection) and
/// `connect MODE HOST PORT N R`. First R exchanges of 64 bytes (the client sends, the
/// server echoes: what makes the kernel relay switch), then the mode: `send-then-read` (send N bytes, then read until
/// the end), `close-unread` (wait for the bytes to arrive, close without reading),
/// `read-then-close` (read N bytes, close), `send-half-close-read` (send N, FIN, read
/// until the end). Prints one JSON line: how the read ended (`eof`, `ECONNRESET`, ...).
const SCRIPT: &str = r#"
import errno, json, select, socket, sys, time
def read_to_end(c):
    got = 0
    while True:
        r, _, _ = select.select([c], [], [], 20)
        if not r:
            return {"end": "timeout", "read": got}
        try:
            b = c.recv(65536)
        except BlockingIOError:
            continue  # a sockmap reader can wake with nothing (docs/architecture.md)
        except OSError as e:
            return {"end": errno.errorcode.get(e.errno, str(e.errno)), "read": got}
        if not b:
            return {"end": "eof", "read": got}
        got += len(b)
def exchange(c, rounds, server):
    for _ in range(rounds):
        if not server:
            c.sendall(b"p" * 64)
        got = b""
        while len(got) < 64:
            select.select([c], [], [], 20)
            try:
                got += c.recv(64 - len(got))
            except BlockingIOError:
                continue
        if server:
            c.sendall(got)
def run(c, mode, n):
    if mode == "send-then-read":
        c.sendall(b"x" * n)
        return read_to_end(c)
    if mode == "send-half-close-read":
        c.sendall(b"x" * n)
        c.shutdown(socket.SHUT_WR)
        return read_to_end(c)
    if mode == "close-unread":
        time.sleep(0.5)
        c.close()
        return {"end": "closed"}
    if mode == "read-then-close":
        got = 0
        while got < n:
            select.select([c], [], [], 20)
            try:
                b = c.recv(65536)
            except BlockingIOError:
                continue
            if not b:
                break
            got += len(b)
        c.close()
        return {"end": "closed", "read": got}
    raise SystemExit("mode " + mode)
if sys.argv[1] == "serve":
    mode, port, n, rounds = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    v6 = sys.argv[6:] == ["6"]
    l = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET)
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("::" if v6 else "0.0.0.0", port))
    l.listen(8)
    print("listening", flush=True)
    c, _ = l.accept()
    exchange(c, rounds, True)
else:
    mode, host, port, n, rounds = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    c = socket.create_connection((host, port), timeout=20)
    c.settimeout(None)
    exchange(c, rounds, False)
print(json.dumps(run(c, mode, n)), flush=True)
"#;

/// A node with `shop/client` and `backend/db` behind the TCP service `db`, an agent with
/// `flags`.
fn start(flags: &[&str]) -> (SimNode, Agent) {
    let mut n = client_db();
    // Not in the file: its connections are plain TCP.
    n.add_pod("outsider", 4).unwrap();
    let agent = n.start_agent(flags).unwrap();
    (n, agent)
}

/// The server end in pod `db`, listening once this returns.
fn serve(n: &SimNode, mode: &str, rounds: u32) -> (Child, BufReader<std::process::ChildStdout>) {
    serve_in(n, Family::V4, mode, rounds)
}

/// `serve`, listening on IPv6 (`[::]`, which takes IPv4 too) for `Family::V6`.
fn serve_in(
    n: &SimNode,
    f: Family,
    mode: &str,
    rounds: u32,
) -> (Child, BufReader<std::process::ChildStdout>) {
    let family = if f == Family::V6 { "6" } else { "4" };
    let mut child = n
        .pod_command("db", &python())
        .args([
            "-c",
            SCRIPT,
            "serve",
            mode,
            "9000",
            &BYTES.to_string(),
            &rounds.to_string(),
            family,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python server");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "listening");
    (child, out)
}

/// The server's result line.
fn served(mut s: (Child, BufReader<std::process::ChildStdout>)) -> serde_json::Value {
    let mut line = String::new();
    s.1.read_line(&mut line).unwrap();
    let _ = s.0.wait();
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("server said {line:?}: {e}"))
}

/// The client end in pod `client`, to `to`; its result line.
fn connect(n: &SimNode, mode: &str, to: &str, rounds: u32) -> serde_json::Value {
    connect_from(n, "client", mode, to, rounds)
}

fn connect_from(n: &SimNode, pod: &str, mode: &str, to: &str, rounds: u32) -> serde_json::Value {
    let (host, port) = to.rsplit_once(':').unwrap();
    // `[ip6]:port`: the bare address for Python.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let out = n
        .pod_command(pod, &python())
        .args([
            "-c",
            SCRIPT,
            "connect",
            mode,
            host,
            port,
            &BYTES.to_string(),
            &rounds.to_string(),
        ])
        .stderr(Stdio::inherit())
        .output()
        .expect("python client");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("client said {text:?}: {e}"))
}

/// The entries of the agent's `UNREAD_CLOSES` (found among the maps the agent process
/// holds: the one LRU hash with 48-byte keys and 16-byte values), read with bpftool.
fn unread_entries(agent: &Agent) -> usize {
    let fds = std::fs::read_dir(format!("/proc/{}/fdinfo", agent.pid())).unwrap();
    for fd in fds.flatten() {
        let Ok(info) = std::fs::read_to_string(fd.path()) else {
            continue;
        };
        let field = |k: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_owned())
        };
        // BPF_MAP_TYPE_LRU_HASH = 9.
        if field("map_type:").as_deref() == Some("9")
            && field("key_size:").as_deref() == Some("48")
            && field("value_size:").as_deref() == Some("16")
        {
            let id = field("map_id:").unwrap();
            let out = std::process::Command::new("bpftool")
                .args(["-j", "map", "dump", "id", &id])
                .output()
                .expect("bpftool");
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            return v.as_array().map(Vec::len).unwrap_or(0);
        }
    }
    panic!("UNREAD_CLOSES not found among the agent's maps");
}

/// Whether the feature runs here (6.9+); where not, `/kernel` says so.
fn available(agent: &Agent) -> bool {
    agent
        .kernel_feature("close_unread_reset")
        .expect("/kernel lists close_unread_reset")
}

fn log_lines(agent: &Agent) -> usize {
    agent
        .log_text()
        .matches("unread bytes; resetting the other side")
        .count()
}

/// The three paired legs, each once with the feature and once without. `flags`,
/// `closer` (the pod whose socket closes with bytes unread: `client` or `db`), the
/// destination, the exchanges before.
fn case(flags: &[&str], closer: &str, to: &str, rounds: u32) {
    for forced_off in [false, true] {
        let mut all = flags.to_vec();
        if forced_off {
            all.extend(["--assume-missing-feature", "close_unread_reset"]);
        }
        let (n, agent) = start(&all);
        let on = available(&agent);
        assert_eq!(
            on,
            !forced_off && agent.kernel_feature("skmsg_queue_length") == Some(true),
            "{}",
            agent.log_text()
        );
        let (marked, lines) = (agent.event("closed_unread"), log_lines(&agent));
        let to = if to == "db" {
            format!("{}:9000", n.pod("db").ip)
        } else {
            to.to_owned()
        };
        let other = if closer == "client" {
            let s = serve(&n, "send-then-read", rounds);
            let c = connect(&n, "close-unread", &to, rounds);
            assert_eq!(c["end"], "closed", "{c}");
            served(s)
        } else {
            let s = serve(&n, "close-unread", rounds);
            let c = connect(&n, "send-then-read", &to, rounds);
            let _ = served(s);
            c
        };
        eprintln!(
            "{flags:?} forced_off={forced_off}: {closer} closed with bytes unread; the other end read {other}"
        );
        if on {
            assert_eq!(other["end"], "ECONNRESET", "{other}\n{}", agent.log_text());
            assert_eq!(agent.event("closed_unread") - marked, 1);
            assert_eq!(log_lines(&agent) - lines, 1, "{}", agent.log_text());
            // The proxy consumed the mark.
            assert_eq!(unread_entries(&agent), 0);
        } else {
            // The gap the feature closes: bytes were lost, the other end saw a clean end.
            assert_eq!(other["end"], "eof", "{other}");
            assert_eq!(agent.event("closed_unread"), marked);
        }
        // Proxied: no FIN of it was rewritten at a pod's TC ingress.
        assert_eq!(agent.event("tc_fin_to_rst"), 0);
    }
}

/// Default path: the proxy redirected the server's bytes into the client's socket, the
/// client closed without reading them; the server gets a reset.
#[test]
fn a_client_closing_with_unread_bytes_resets_the_server() {
    case(&[], "client", VIP, 0);
}

/// `--skmsg-upstream`: the proxy's leg to the destination is paired; a server closing
/// with the client's bytes unread resets the client.
#[test]
fn with_upstream_pairing_a_server_closing_with_unread_bytes_resets_the_client() {
    case(&["--skmsg-upstream", "true"], "db", "db", 0);
}

/// `--kernel-relay`: after a few exchanges the client's bytes move straight into the
/// server's redirect queue (before the switch they reach it over the proxy's TCP leg,
/// where the kernel's own reset applies); same outcome.
#[test]
fn with_the_kernel_relay_a_server_closing_with_unread_bytes_resets_the_client() {
    case(&["--kernel-relay", "true"], "db", VIP, 4);
}

/// Control: everything read, both ways; the streams end with a FIN, no false reset, no
/// mark left.
#[test]
fn a_stream_read_to_the_end_still_ends_cleanly() {
    let (n, agent) = start(&["--skmsg-upstream", "true"]);
    let marked = agent.event("closed_unread");
    for to in [VIP.to_owned(), format!("{}:9000", n.pod("db").ip)] {
        // The client sends, half-closes, reads to the end; the server reads all, closes.
        let s = serve(&n, "read-then-close", 2);
        let c = connect(&n, "send-half-close-read", &to, 2);
        let s = served(s);
        assert_eq!(c["end"], "eof", "{c}");
        assert_eq!(s["read"], BYTES, "{s}");
        // The server sends; the client reads all, closes; the server reads a clean end.
        let s = serve(&n, "send-then-read", 2);
        let c = connect(&n, "read-then-close", &to, 2);
        let s = served(s);
        assert_eq!(c["read"], BYTES, "{c}");
        assert_eq!(s["end"], "eof", "{s}");
    }
    assert_eq!(agent.event("closed_unread"), marked);
    assert_eq!(agent.event("tc_fin_to_rst"), 0);
    assert_eq!(log_lines(&agent), 0);
    if available(&agent) {
        assert_eq!(unread_entries(&agent), 0);
    }
}

/// The reference: plain TCP (a pod the mesh does not capture) answers a close with bytes
/// unread with a reset, either way.
#[test]
fn plain_tcp_answers_a_close_with_unread_bytes_with_a_reset() {
    let (n, agent) = start(&[]);
    let to = format!("{}:9000", n.pod("db").ip);
    let s = serve(&n, "send-then-read", 0);
    let c = connect_from(&n, "outsider", "close-unread", &to, 0);
    assert_eq!(c["end"], "closed", "{c}");
    let s = served(s);
    assert_eq!(s["end"], "ECONNRESET", "{s}");
    let s = serve(&n, "close-unread", 0);
    let c = connect_from(&n, "outsider", "send-then-read", &to, 0);
    let _ = served(s);
    assert_eq!(c["end"], "ECONNRESET", "{c}");
    // Nothing of it was paired: no mark.
    assert_eq!(agent.event("closed_unread"), 0);
}

/// `shop/client` (enrolled) and `backend/db` in a direct-mode namespace (pod to pod,
/// socket to socket, no proxy); `db_enrolled`: the namespace carries the enrolment label
/// too, so `db` has the agent's TC ingress as well. `Family::V6`: a dual-stack node.
fn start_direct(f: Family, db_enrolled: bool, flags: &[&str]) -> (SimNode, Agent) {
    let mut n = f.node();
    n.add_pod("client", 2).unwrap();
    n.add_pod("db", 3).unwrap();
    let backend = if db_enrolled {
        "{ name: backend, labels: { mesh-agent.io/dataplane-mode: ambient }, mode: direct }"
    } else {
        "{ name: backend, mode: direct }"
    };
    let w = |name: &str, ns: &str, sa: &str, labels: &str| {
        let p = n.pod(name);
        format!(
            "  - {{ name: {name}, namespace: {ns}, ip: {}{}, netns: {}, service_account: {sa}, labels: {labels} }}\n",
            p.ip,
            p.ip6_field(),
            p.netns_path()
        )
    };
    let yaml = format!(
        "namespaces:\n  - {NS_SHOP}\n  - {backend}\nworkloads:\n{}{}",
        w("client", "shop", "web", "{}"),
        w("db", "backend", "db", "{ app: db }")
    );
    n.write_config(&yaml).unwrap();
    let agent = n.start_agent(flags).unwrap();
    (n, agent)
}

/// Sockets of `pod` to or from port 9000 still in the kernel (`ss`), one state each;
/// listeners and time-wait (a clean end's last state) left out.
fn sockets_9000(n: &SimNode, pod: &str) -> Vec<String> {
    let out = n
        .pod_command(pod, Path::new("ss"))
        .args(["-tanH"])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let ours = f.len() >= 5 && (f[3].ends_with(":9000") || f[4].ends_with(":9000"));
            (ours && f[0] != "LISTEN" && f[0] != "TIME-WAIT").then(|| f[0].to_owned())
        })
        .collect()
}

/// Waits (up to 3 s) until `pod` holds no socket of port 9000 but time-wait: the closing
/// side's orphan (FIN_WAIT1 after its FIN became an RST) is gone. How long it took.
fn orphan_gone(n: &SimNode, pod: &str) -> Duration {
    let t = Instant::now();
    loop {
        let left = sockets_9000(n, pod);
        if left.is_empty() {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "{pod} still holds {left:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// TCP resets `pod`'s kernel has sent (`Tcp: OutRsts` of its namespace's
/// `/proc/net/snmp`).
fn out_rsts(n: &SimNode, pod: &str) -> u64 {
    let out = n
        .pod_command(pod, Path::new("cat"))
        .arg("/proc/net/snmp")
        .output()
        .expect("cat /proc/net/snmp");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (head, vals) = (tcp.next().unwrap(), tcp.next().unwrap());
    let i = head
        .split_whitespace()
        .position(|h| h == "OutRsts")
        .unwrap();
    vals.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// Direct mode: `closer` (`client` or `db`) closes with the other pod's bytes unread.
/// Where the feature runs and the receiving pod has the agent's TC ingress (the client
/// always: it is enrolled; `db` when `db_enrolled`), the other end reads `ECONNRESET`
/// (the FIN rewritten there, `tc_fin_to_rst`); otherwise, and with the feature forced
/// off, a clean EOF. Either way the closing side's socket is gone within 3 s; after a
/// rewrite, because its retransmitted FIN passed (the receiver's socket gone) and the
/// receiver's kernel answered it with a reset of its own.
fn direct_case(f: Family, db_enrolled: bool, closer: &str) {
    let receiver_has_tc = closer == "db" || db_enrolled;
    let receiver = if closer == "client" { "db" } else { "client" };
    for forced_off in [false, true] {
        let flags: &[&str] = if forced_off {
            &["--assume-missing-feature", "close_unread_reset"]
        } else {
            &[]
        };
        let (n, agent) = start_direct(f, db_enrolled, flags);
        let on = available(&agent);
        assert_eq!(
            on,
            !forced_off && agent.kernel_feature("skmsg_queue_length") == Some(true)
        );
        let to = f.dst(&n, "db", 9000);
        let (paired, marked, rewritten) = (
            agent.event("sockops_server_paired"),
            agent.event("closed_unread"),
            agent.event("tc_fin_to_rst"),
        );
        let rsts = out_rsts(&n, receiver);
        let other = if closer == "client" {
            let s = serve_in(&n, f, "send-then-read", 0);
            let c = connect(&n, "close-unread", &to, 0);
            assert_eq!(c["end"], "closed", "{c}");
            served(s)
        } else {
            let s = serve_in(&n, f, "close-unread", 0);
            let c = connect(&n, "send-then-read", &to, 0);
            let _ = served(s);
            c
        };
        let took = orphan_gone(&n, closer);
        let (marks, rst) = (
            agent.event("closed_unread") - marked,
            agent.event("tc_fin_to_rst") - rewritten,
        );
        let answered = out_rsts(&n, receiver) - rsts;
        eprintln!(
            "direct {f:?} (db enrolled: {db_enrolled}) forced_off={forced_off}: {closer} closed with bytes unread; the other end read {other}; closed_unread +{marks}, tc_fin_to_rst +{rst}; the closer's socket gone after {took:?}; {receiver} sent {answered} reset(s)"
        );
        if agent.kernel_feature("skmsg_queue_length") == Some(true) {
            // Direct, not proxied: the pods' own sockets were paired with each other.
            assert_eq!(agent.event("sockops_server_paired") - paired, 1);
        }
        // No proxy took part.
        assert_eq!(log_lines(&agent), 0, "{}", agent.log_text());
        if on && receiver_has_tc {
            assert_eq!(other["end"], "ECONNRESET", "{other}");
            assert_eq!((marks, rst), (1, 1));
            // Left for retransmitted FINs (ignored once 5 s old).
            assert_eq!(unread_entries(&agent), 1);
            // The orphan's end: its retransmitted FIN, answered by the receiver's kernel.
            assert_eq!(answered, 1);
        } else if on {
            // Marked, but no TC ingress of ours on the way: the gap.
            assert_eq!(other["end"], "eof", "{other}");
            assert_eq!((marks, rst), (1, 0));
        } else {
            assert_eq!(other["end"], "eof", "{other}");
            assert_eq!((marks, rst), (0, 0));
        }
    }
}

/// Direct mode, both pods enrolled: the client closes with the server's bytes unread; the
/// server reads a reset. With the feature forced off, the old clean EOF.
#[test]
fn direct_mode_a_client_closing_with_unread_bytes_resets_the_server() {
    direct_case(Family::V4, true, "client");
}

/// The same over IPv6 (a dual-stack node, the pods' IPv6 addresses): the rewrite and its
/// checksum update in the IPv6 header's place.
#[test]
fn direct_mode_over_ipv6_a_closing_client_resets_the_server() {
    direct_case(Family::V6, true, "client");
}

/// Direct mode: the server closes with the client's bytes unread; the client (enrolled,
/// so its pod has the TC ingress) reads a reset, whether or not the server's namespace
/// is enrolled itself.
#[test]
fn direct_mode_a_server_closing_with_unread_bytes_resets_the_client() {
    direct_case(Family::V4, true, "db");
    direct_case(Family::V4, false, "db");
}

/// The limit: a direct-mode destination whose namespace is not enrolled has no TC
/// ingress of the agent, so a client closing with its bytes unread still leaves it a
/// clean EOF (the mark is made, and nothing reads it).
#[test]
fn direct_mode_to_an_unenrolled_destination_keeps_the_gap_for_a_closing_client() {
    direct_case(Family::V4, false, "client");
}
/// Direct mode, control: streams read to the end end with a FIN both ways; nothing is
/// marked or rewritten.
#[test]
fn direct_mode_a_stream_read_to_the_end_still_ends_cleanly() {
    let (n, agent) = start_direct(Family::V4, true, &[]);
    let to = format!("{}:9000", n.pod("db").ip);
    let s = serve(&n, "read-then-close", 2);
    let c = connect(&n, "send-half-close-read", &to, 2);
    let s = served(s);
    assert_eq!(c["end"], "eof", "{c}");
    assert_eq!(s["read"], BYTES, "{s}");
    let s = serve(&n, "send-then-read", 2);
    let c = connect(&n, "read-then-close", &to, 2);
    let s = served(s);
    assert_eq!(c["read"], BYTES, "{c}");
    assert_eq!(s["end"], "eof", "{s}");
    assert_eq!(agent.event("closed_unread"), 0);
    assert_eq!(agent.event("tc_fin_to_rst"), 0);
    if agent.kernel_feature("skmsg_queue_length") == Some(true) {
        assert_eq!(agent.event("sockops_server_paired"), 2);
    }
}
