//! The agent's admin endpoint (hyper) against awkward clients, and the map syncer against
//! a full map: failures are counted on `/metrics`, other changes still apply, and a retry
//! heals once there is room.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use mesh_tests::{metric, sh, wait_for, Agent, SimNode};

/// A node with two pods (one enrolled) and its agent.
fn node_with_agent() -> (SimNode, Agent) {
    let n = mesh_tests::scenes::client_server("");
    let agent = n.start_agent(&[]).unwrap();
    (n, agent)
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Reads one response on a kept-alive connection: the head, then `content-length` bytes
/// of body (none for a HEAD request).
fn read_response(s: &mut TcpStream, head_request: bool) -> (String, String) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).expect("read the response head");
        assert_eq!(
            n,
            1,
            "connection closed mid-head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; if head_request { 0 } else { len }];
    s.read_exact(&mut body).unwrap();
    (head, String::from_utf8(body).unwrap())
}

#[test]
fn admin_serves_requests_split_across_segments_on_a_kept_alive_connection() {
    let (_n, agent) = node_with_agent();
    let mut s = connect(agent.admin_port);
    for part in [
        "GE",
        "T /heal",
        "thz?x=1 HTTP/1.1\r",
        "\nHost: x\r\n",
        "\r\n",
    ] {
        s.write_all(part.as_bytes()).unwrap();
        s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let (head, body) = read_response(&mut s, false);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain\r\n"),
        "{head}"
    );
    assert_eq!(body, "ok\n");

    // The same connection serves the next requests (keep-alive): HEAD without a body,
    // a path that does not exist, and another method.
    s.write_all(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (head, _) = read_response(&mut s, true);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("content-length: 3\r\n"), "{head}");
    s.write_all(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (head, body) = read_response(&mut s, false);
    assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"), "{head}");
    assert!(body.starts_with("try /metrics"), "{body}");
    s.write_all(b"POST /metrics HTTP/1.1\r\nHost: x\r\ncontent-length: 2\r\n\r\nhi")
        .unwrap();
    let (head, body) = read_response(&mut s, false);
    assert!(
        head.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
        "{head}"
    );
    assert!(head.contains("allow: GET, HEAD\r\n"), "{head}");
    assert_eq!(body, "only GET is served\n");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (head, body) = read_response(&mut s, false);
    assert!(
        head.contains("content-type: text/plain; version=0.0.4\r\n"),
        "{head}"
    );
    assert!(
        body.contains("# TYPE mesh_map_write_failures_total counter"),
        "{body}"
    );
}

#[test]
fn admin_answers_a_malformed_request_line_with_400() {
    let (_n, agent) = node_with_agent();
    for bad in [
        "GARBAGE\r\n\r\n",
        "GET /metrics HTTP/9.9\r\n\r\n",
        "GET\x01 / HTTP/1.1\r\n\r\n",
    ] {
        let mut s = connect(agent.admin_port);
        s.write_all(bad.as_bytes()).unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        assert!(
            text.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{bad:?}: {text:?}"
        );
    }
    // An oversized head is refused too (431), and the endpoint still serves.
    let mut s = connect(agent.admin_port);
    let long = format!("GET /healthz HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(20_000));
    let _ = s.write_all(long.as_bytes());
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    assert!(text.starts_with("HTTP/1.1 431 "), "{text:?}");
    assert_eq!(agent.get("/healthz").unwrap(), "ok\n");
}

#[test]
fn admin_drops_a_slowloris_client_and_serves_others_meanwhile() {
    let (_n, agent) = node_with_agent();
    let port = agent.admin_port;
    let slow = std::thread::spawn(move || {
        let mut s = connect(port);
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let t = Instant::now();
        for b in request.iter().cycle() {
            if s.write_all(&[*b]).is_err() {
                return t.elapsed();
            }
            // The read doubles as the one-second pause between bytes.
            let mut buf = [0u8; 64];
            match s.read(&mut buf) {
                Ok(0) | Err(_) if t.elapsed() > Duration::from_secs(30) => break,
                Ok(0) => return t.elapsed(),
                Ok(n) => panic!("answered: {:?}", String::from_utf8_lossy(&buf[..n])),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return t.elapsed(),
                Err(_) => {}
            }
        }
        panic!("the slow client was never disconnected")
    });
    // Other clients are served while the slow one dribbles.
    let t = Instant::now();
    let mut served = 0;
    while t.elapsed() < Duration::from_secs(4) {
        assert_eq!(agent.get("/healthz").unwrap(), "ok\n");
        served += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    let dropped_after = slow.join().unwrap();
    assert!(served >= 10, "{served}");
    // The header read timeout is 5 s: one more byte-second of slack, and the read timeout.
    assert!(
        dropped_after >= Duration::from_secs(4) && dropped_after <= Duration::from_secs(8),
        "{dropped_after:?}"
    );
    assert_eq!(agent.get("/ready").unwrap(), "ready\n");
}

const DESTS_CAPACITY: u32 = 16384;

/// `bpftool` key bytes of a filler address (100.64.0.0/10, not used by the tests).
/// A `DESTS` key: a 16-byte address, IPv4 v4-mapped.
fn filler_key(i: u32) -> String {
    let [a, b, c, d] = (0x6440_0000u32 + i).to_be_bytes();
    format!("0 0 0 0 0 0 0 0 0 0 255 255 {a} {b} {c} {d}")
}

/// A `DESTS` value (id, flags, netns cookie), all zero.
const FILLER_VALUE: &str = "0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0";

fn pending(agent: &Agent, map: &str) -> u64 {
    let m = agent.get("/metrics").unwrap();
    metric(&m, "mesh_map_writes_pending", &[("map", map)])
}

fn failures(agent: &Agent, map: &str) -> u64 {
    let m = agent.get("/metrics").unwrap();
    metric(&m, "mesh_map_write_failures_total", &[("map", map)])
}

fn dump_ips(agent: &Agent, map: &str) -> Vec<String> {
    let out = agent.cli(&["dump", map, "-o", "json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| r["ip"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_full_map_is_counted_other_changes_apply_and_a_retry_heals() {
    let mut n = SimNode::new().expect("sim node");
    for (name, host) in [("client", 2), ("server", 3), ("legacy", 4), ("extra", 5)] {
        n.add_pod(name, host).unwrap();
    }
    let config = |extra: bool, legacy_enrolled: bool| {
        let p = |name: &str| n.pod(name);
        let w = |ns: &str, name: &str| {
            format!(
                "\x20 - {{ name: {name}, namespace: {ns}, ip: {}, netns: {} }}\n",
                p(name).ip,
                p(name).netns_path()
            )
        };
        let ambient = "{ mesh-agent.io/dataplane-mode: ambient }";
        format!(
            "namespaces:\n  - name: shop\n    labels: {ambient}\n  - name: backend\n  - name: legacy\n    labels: {}\n\
             exclude:\n  - {{ cidr: 10.96.0.0/12, port: 53 }}\n\
             workloads:\n{}{}{}{}",
            if legacy_enrolled { ambient } else { "{}" },
            w("shop", "client"),
            w("backend", "server"),
            w("legacy", "legacy"),
            if extra { w("shop", "extra") } else { String::new() },
        )
    };
    n.write_config(&config(false, false)).unwrap();
    let agent = n.start_agent(&[]).unwrap();
    assert_eq!(pending(&agent, "DESTS"), 0);
    assert_eq!(dump_ips(&agent, "DESTS").len(), 3);

    // Fill DESTS from outside, up to its capacity.
    let pin = agent.pin_path.join("DESTS");
    let fill = DESTS_CAPACITY - 3;
    let batch: String = (0..fill)
        .map(|i| {
            format!(
                "map update pinned {} key {} value {FILLER_VALUE}\n",
                pin.display(),
                filler_key(i)
            )
        })
        .collect();
    let batch_file = n.dir.join("fill-dests.batch");
    std::fs::write(&batch_file, batch).unwrap();
    sh(&format!("bpftool batch file {}", batch_file.display())).unwrap();
    assert!(
        sh(&format!(
            "bpftool map update pinned {} key {} value {FILLER_VALUE}",
            pin.display(),
            filler_key(fill)
        ))
        .is_err(),
        "DESTS is full"
    );

    // A new workload: its DESTS entry cannot be written, its WORKLOADS entry is.
    let extra = n.pod("extra").ip.to_string();
    n.write_config(&config(true, false)).unwrap();
    wait_for(
        "the DESTS failure on /metrics",
        Duration::from_secs(10),
        || pending(&agent, "DESTS") == 1,
    );
    assert!(failures(&agent, "DESTS") >= 1);
    assert_eq!(pending(&agent, "WORKLOADS"), 0);
    assert!(dump_ips(&agent, "WORKLOADS").contains(&extra));
    assert!(!dump_ips(&agent, "DESTS").contains(&extra));

    // A later change still applies while the failed entry waits (and is retried).
    let legacy = n.pod("legacy").ip.to_string();
    n.write_config(&config(true, true)).unwrap();
    wait_for("legacy enrolled", Duration::from_secs(10), || {
        dump_ips(&agent, "WORKLOADS").contains(&legacy)
    });
    let before = failures(&agent, "DESTS");
    wait_for("a retry", Duration::from_secs(10), || {
        failures(&agent, "DESTS") > before
    });
    assert_eq!(pending(&agent, "DESTS"), 1);
    let ex = agent.cli(&["dump", "EXCLUDES", "-o", "json"]);
    let ex: serde_json::Value = serde_json::from_slice(&ex.stdout).unwrap();
    assert_eq!(ex.as_array().unwrap().len(), 1, "{ex}");

    // Room made: the retry writes the entry, nothing is pending.
    sh(&format!(
        "bpftool map delete pinned {} key {}",
        pin.display(),
        filler_key(0)
    ))
    .unwrap();
    wait_for("the retry to heal DESTS", Duration::from_secs(10), || {
        dump_ips(&agent, "DESTS").contains(&extra)
    });
    wait_for("nothing pending", Duration::from_secs(5), || {
        pending(&agent, "DESTS") == 0
    });
    let log = agent.log_text();
    assert!(
        log.contains("some datapath map writes failed") && log.contains("DESTS[ip="),
        "{log}"
    );
}
