//! End-to-end HTTP/1.1 upgrades through the sending side's L7 engine: a pod's captured
//! connection to a `protocol: http` service asks to switch to `echo-proto`; the agent
//! routes it, opens a connection of its own to the endpoint, passes the `101` back and
//! splices both streams. The endpoint is a server written here (in the endpoint pod's
//! network namespace); the client is this test binary run again inside the client pod
//! (its netns and cgroup, so the agent captures it), as `upgrade_child`.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Duration,
};

use mesh_tests::{cluster::in_netns, l7, metric, wait_for, SimNode};

/// Bytes sent each way through an upgraded stream.
const STREAM_BYTES: usize = 4 << 20;

fn node() -> SimNode {
    l7::node(&["v1"])
}

fn config(n: &SimNode) -> String {
    l7::file_head(n, &[("v1", "{ app: echo }")])
        + &l7::http_service("echo", "10.96.0.10", "{ app: echo }")
}

/// What the endpoint saw.
#[derive(Default)]
struct Seen {
    /// Request heads in arrival order, lowercased, with the connection's number.
    heads: Vec<(usize, String)>,
    /// Connections that declined an upgrade and then saw the agent close them.
    closed_after_decline: usize,
}

/// Reads one request head (up to the empty line); None at a clean end before any byte.
fn read_head(r: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        head.push_str(&line);
        if line == "\r\n" {
            return Ok(Some(head));
        }
    }
}

/// The endpoint: `/plain` answers `x-conn: <connection number>` (keep-alive), `/echo`
/// switches to `echo-proto` and echoes until the client's end, then sends `bye`; `/cut`
/// switches, reads a little, and closes with unread bytes (a reset); `/decline` answers
/// 426 and waits for the agent to close the connection.
fn endpoint(listener: TcpListener) -> (Arc<Mutex<Seen>>, Arc<AtomicUsize>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let conns = Arc::new(AtomicUsize::new(0));
    let (s2, c2) = (seen.clone(), conns.clone());
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { return };
            let id = c2.fetch_add(1, Relaxed) + 1;
            let seen = s2.clone();
            std::thread::spawn(move || {
                let _ = serve_conn(s, id, &seen);
            });
        }
    });
    (seen, conns)
}

fn serve_conn(s: TcpStream, id: usize, seen: &Mutex<Seen>) -> io::Result<()> {
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    while let Some(head) = read_head(&mut r)? {
        let head = head.to_ascii_lowercase();
        seen.lock().unwrap().heads.push((id, head.clone()));
        let asked = head.contains("\r\nupgrade: echo-proto\r\n");
        let path = head.split(' ').nth(1).unwrap_or("").to_owned();
        match path.as_str() {
            "/echo" | "/cut" if asked => {
                w.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n\
                      upgrade: echo-proto\r\n\r\nserver-early",
                )?;
                if path == "/echo" {
                    // Whatever the reader already buffered goes first.
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = r.read(&mut buf)?;
                        if n == 0 {
                            break;
                        }
                        w.write_all(&buf[..n])?;
                    }
                    w.write_all(b"bye")?;
                    w.shutdown(Shutdown::Write)?;
                    // Until the agent closes its side.
                    let _ = r.read(&mut buf);
                } else {
                    let mut buf = vec![0u8; 1024];
                    r.read_exact(&mut buf)?;
                    // Unread bytes still queued when the socket closes: the kernel resets.
                    std::thread::sleep(Duration::from_millis(300));
                }
                return Ok(());
            }
            "/decline" => {
                w.write_all(b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 2\r\n\r\nno")?;
                // The agent must not send this connection another request: it closes it.
                let mut b = [0u8; 1];
                if matches!(r.read(&mut b), Ok(0)) {
                    seen.lock().unwrap().closed_after_decline += 1;
                }
                return Ok(());
            }
            _ => {
                let body = format!("conn {id}");
                write!(
                    w,
                    "HTTP/1.1 200 OK\r\nx-conn: {id}\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )?;
            }
        }
    }
    Ok(())
}

/// Runs the client scenario `scenario` inside the client pod; its JSON result.
fn child(n: &SimNode, scenario: &str) -> serde_json::Value {
    let exe = std::env::current_exe().unwrap();
    let out = n
        .pod_command("client", &exe)
        .args([
            "--exact",
            "upgrade_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MESH_UPGRADE_CHILD", scenario)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("the child");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| Some(l.split_once("RESULT:")?.1))
        .unwrap_or_else(|| panic!("no result from {scenario}: {text}"));
    serde_json::from_str(line).unwrap()
}

#[test]
fn upgrades_through_the_l7_engine_are_spliced_and_never_pooled() {
    mesh_tests::must_be_root();
    let n = node();
    n.write_config(&config(&n)).unwrap();
    let agent = n.start_agent(&[]).unwrap();
    let v1 = n.pod("v1");
    let listener = in_netns(Path::new(&v1.netns_path()), || {
        TcpListener::bind("0.0.0.0:8080").unwrap()
    });
    let (seen, conns) = endpoint(listener);

    // Plain requests first: one upstream connection, pooled.
    let plain = child(&n, "plain");
    assert_eq!(plain["conns"], serde_json::json!(["1", "1"]), "{plain}");

    // An upgrade: 101 with its headers, early bytes both ways, several MiB each way,
    // the client's half-close passed on, the endpoint's `bye` after it.
    let echo = child(&n, "echo");
    assert_eq!(echo["status"], "101", "{echo}");
    assert_eq!(echo["upgrade"], "echo-proto", "{echo}");
    assert_eq!(echo["early"], "server-early", "{echo}");
    assert_eq!(echo["echo_intact"], true, "{echo}");
    assert_eq!(echo["bye_after_half_close"], true, "{echo}");
    {
        let s = seen.lock().unwrap();
        let (id, head) = s
            .heads
            .iter()
            .find(|(_, h)| h.starts_with("get /echo"))
            .unwrap();
        assert_eq!(*id, 2, "an upgrade goes on a connection of its own: {head}");
        assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
        assert!(head.contains("\r\nupgrade: echo-proto\r\n"), "{head}");
    }

    // A plain request after it, on another downstream connection: the pooled one, not
    // the upgraded one.
    let again = child(&n, "plain");
    assert_eq!(again["conns"], serde_json::json!(["1", "1"]), "{again}");
    assert_eq!(conns.load(Relaxed), 2);

    // A declined upgrade: the 426 is relayed, the client's connection stays HTTP, and the
    // upstream connection is closed, not pooled: the next request goes on another.
    let declined = child(&n, "decline");
    assert_eq!(declined["status"], "426", "{declined}");
    assert_eq!(declined["body"], "no", "{declined}");
    assert_eq!(declined["next_status"], "200", "{declined}");
    let decline_conn = {
        let s = seen.lock().unwrap();
        s.heads
            .iter()
            .find(|(_, h)| h.starts_with("get /decline"))
            .unwrap()
            .0
    };
    assert_ne!(
        declined["next_conn"],
        decline_conn.to_string(),
        "{declined}"
    );
    wait_for(
        "the declined connection closed",
        Duration::from_secs(5),
        || seen.lock().unwrap().closed_after_decline == 1,
    );

    // The endpoint cuts an upgraded stream: the client sees a reset, not a clean end.
    let cut = child(&n, "cut");
    assert_eq!(cut["status"], "101", "{cut}");
    assert_eq!(cut["end"], "reset", "{cut}");

    // Each upgraded stream counted as a request answered 101 once it ended.
    wait_for("the 101s counted", Duration::from_secs(5), || {
        let m = agent.get("/metrics").unwrap();
        metric(&m, "mesh_requests_total", &[("response_code", "101")]) == 2
    });
    let m = agent.get("/metrics").unwrap();
    assert_eq!(
        metric(&m, "mesh_requests_total", &[("response_code", "426")]),
        1,
        "{m}"
    );
}

/// A captured connection read and written in blocking style: a blocking call on a socket
/// in the sockmap can return EAGAIN with nothing wrong, so those are tried again (within
/// a minute, past which the call fails as timed out).
struct Patient(TcpStream);

impl Patient {
    fn again<T>(&mut self, mut f: impl FnMut(&mut TcpStream) -> io::Result<T>) -> io::Result<T> {
        let start = std::time::Instant::now();
        loop {
            match f(&mut self.0) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if start.elapsed() > Duration::from_secs(60) {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                r => return r,
            }
        }
    }

    fn try_clone(&self) -> Patient {
        Patient(self.0.try_clone().unwrap())
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.0.shutdown(how)
    }
}

impl Read for Patient {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.again(|s| s.read(buf))
    }
}

impl Write for Patient {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.again(|s| s.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn connect() -> Patient {
    Patient(TcpStream::connect("10.96.0.10:80").expect("connect to the service"))
}

const UPGRADE: &str = "host: echo\r\nconnection: Upgrade\r\nupgrade: echo-proto\r\n\r\n";

/// A response head and, when it has one, its `content-length` body.
fn response(r: &mut BufReader<Patient>) -> (String, String, Vec<u8>) {
    let head = read_head(r).unwrap().expect("a response");
    let lower = head.to_ascii_lowercase();
    let status = head.split(' ').nth(1).unwrap_or("").to_owned();
    let header = |name: &str| {
        lower
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .map(str::to_owned)
    };
    let mut body = vec![0u8; header("content-length").map_or(0, |l| l.parse().unwrap())];
    r.read_exact(&mut body).unwrap();
    (status, lower, body)
}

fn header(head: &str, name: &str) -> String {
    head.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or("")
        .to_owned()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// The client pod's side of each scenario (run by `child`; a no-op in the suite).
#[test]
#[ignore = "a child process of the upgrade test, run inside the client pod"]
fn upgrade_child() {
    let Ok(scenario) = std::env::var("MESH_UPGRADE_CHILD") else {
        return;
    };
    let result = match scenario.as_str() {
        "plain" => {
            let s = connect();
            let mut w = s.try_clone();
            let mut r = BufReader::new(s);
            let mut conns = Vec::new();
            for _ in 0..2 {
                w.write_all(b"GET /plain HTTP/1.1\r\nhost: echo\r\n\r\n")
                    .unwrap();
                let (_, head, _) = response(&mut r);
                conns.push(header(&head, "x-conn"));
            }
            serde_json::json!({ "conns": conns })
        }
        "echo" => {
            let s = connect();
            let mut w = s.try_clone();
            let mut r = BufReader::new(s);
            w.write_all(format!("GET /echo HTTP/1.1\r\n{UPGRADE}client-early").as_bytes())
                .unwrap();
            let (status, head, _) = response(&mut r);
            let mut early = [0u8; 12];
            r.read_exact(&mut early).unwrap();
            let data = pattern(STREAM_BYTES);
            let sent = data.clone();
            let writer = std::thread::spawn(move || {
                w.write_all(&sent).unwrap();
                w.shutdown(Shutdown::Write).unwrap();
            });
            let mut back = Vec::new();
            let end = r.read_to_end(&mut back);
            writer.join().unwrap();
            let mut want = b"client-early".to_vec();
            want.extend_from_slice(&data);
            let intact = back.len() >= want.len() && back[..want.len()] == want[..];
            serde_json::json!({
                "status": status,
                "upgrade": header(&head, "upgrade"),
                "early": String::from_utf8_lossy(&early),
                "echo_intact": intact,
                "received": back.len(),
                "bye_after_half_close": end.is_ok() && back[want.len().min(back.len())..] == b"bye"[..],
            })
        }
        "decline" => {
            let s = connect();
            let mut w = s.try_clone();
            let mut r = BufReader::new(s);
            w.write_all(format!("GET /decline HTTP/1.1\r\n{UPGRADE}").as_bytes())
                .unwrap();
            let (status, _, body) = response(&mut r);
            w.write_all(b"GET /plain HTTP/1.1\r\nhost: echo\r\n\r\n")
                .unwrap();
            let (next_status, next, _) = response(&mut r);
            serde_json::json!({
                "status": status,
                "body": String::from_utf8_lossy(&body),
                "next_status": next_status,
                "next_conn": header(&next, "x-conn"),
            })
        }
        "cut" => {
            let s = connect();
            let mut w = s.try_clone();
            let mut r = BufReader::new(s);
            w.write_all(format!("GET /cut HTTP/1.1\r\n{UPGRADE}").as_bytes())
                .unwrap();
            let (status, _, _) = response(&mut r);
            // Keeps sending while the endpoint cuts; the write fails once reset.
            let writer = std::thread::spawn(move || {
                let chunk = pattern(64 * 1024);
                for _ in 0..(STREAM_BYTES / chunk.len()) {
                    if w.write_all(&chunk).is_err() {
                        return;
                    }
                }
                let _ = w.shutdown(Shutdown::Write);
            });
            let mut back = Vec::new();
            let end = match r.read_to_end(&mut back) {
                Ok(_) => "clean".to_owned(),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => "reset".to_owned(),
                Err(e) => format!("{e}"),
            };
            writer.join().unwrap();
            serde_json::json!({ "status": status, "end": end, "received": back.len() })
        }
        other => panic!("no scenario {other}"),
    };
    println!("RESULT:{result}");
}
