//! The kernel relay (`--kernel-relay`, issue 13 item 1) on a simulated node: a TCP
//! service whose endpoint is a pod of the same node, reached through the node proxy. Once
//! the proxy has decided the flow, each direction moves socket to socket in the kernel as
//! soon as nothing of it is in flight through the proxy; bytes stay intact and in order,
//! half-close and reset pass as before, a slow reader gets no error, and the proxy's
//! counts include what the kernel moved.

use mesh_tests::flows::{assert_intact, assert_sunk};
use mesh_tests::relay::RelayCounts;
use mesh_tests::scenes::{client_db_relay, relay_available, DB_VIP as VIP};

const MIB: u64 = 1 << 20;

/// Request/response through the service: after the first exchange both directions move
/// socket to socket (the proxy's user-space relay sees only the first bytes), and the
/// proxy's byte counts include what the kernel moved. Then 16 MiB each way (the client
/// half-closes after sending, the server answers after that): intact, counted.
#[test]
fn a_decided_tcp_flow_moves_socket_to_socket_and_stays_intact() {
    let (n, agent) = client_db_relay("true", &[]);
    n.serve("db", &["echo", "--listen", "0.0.0.0:9000"])
        .unwrap();
    let on = relay_available(&agent);
    let c = RelayCounts::of(&agent);
    // 2,100 round trips of 64 bytes (podtool's `ping`: 100 warm-up rounds, then 2,000).
    let r = n
        .client("client", &["ping", "--to", VIP, "--count", "2000"])
        .unwrap();
    assert_eq!(r["count"], 2000, "{r}");
    let rounds = 2100u64;
    let d = c.since(&agent);
    let moved = d.msgs;
    if on {
        // Each direction switched once, and stayed: every message but the first few of
        // each direction went socket to socket.
        assert_eq!(d.started, 2, "{}", agent.log_text());
        assert!(
            moved >= 2 * rounds - 8,
            "only {moved} of {} messages relayed in the kernel",
            2 * rounds
        );
        assert!(d.msg_bytes >= 64 * (2 * rounds - 8));
    } else {
        assert_eq!(moved, 0);
    }
    // The proxy's counts include the relayed bytes: the flow's every byte, each way
    // (read once the proxy has seen the connection end).
    c.wait_counted(
        &agent,
        "the proxy counted the flow",
        64 * rounds,
        64 * rounds,
    );

    // Bulk both ways; the echo client half-closes once it has sent everything and reads
    // the rest of the answer after that.
    let c = RelayCounts::of(&agent);
    let r = n
        .client(
            "client",
            &[
                "echo-client",
                "--to",
                VIP,
                "--bytes",
                &(16 * MIB).to_string(),
            ],
        )
        .unwrap();
    assert_intact(&r, 16 * MIB);
    c.wait_counted(
        &agent,
        "the proxy counted the bulk flow",
        16 * MIB,
        16 * MIB,
    );
    eprintln!("bulk echo, {} bytes: {}", 32 * MIB, c.since(&agent).line());
}

/// A half-close passes as before: the client sends and shuts its writing side, the
/// server reads to EOF, answers, and closes; the client reads the answer, then EOF.
#[test]
fn half_close_passes_through_the_relay() {
    let (n, agent) = client_db_relay("true", &[]);
    n.serve("db", &["echo", "--listen", "0.0.0.0:9000"])
        .unwrap();
    let on = relay_available(&agent);
    let started = agent.event("relay_started");
    for _ in 0..20 {
        let r = n
            .client(
                "client",
                &["raw", "--to", VIP, "--send", "hello relay", "--half-close"],
            )
            .unwrap();
        assert_eq!(r["outcome"], "eof", "{r}");
        assert_eq!(r["bytes"], 11, "{r}");
        assert_eq!(r["status_line"], "hello relay", "{r}");
    }
    if on {
        // At least the server's answers went socket to socket (nothing of the server was
        // in flight when it answered); the client's request may too, when the proxy had
        // armed the flow before the client sent it.
        assert!(agent.event("relay_started") - started >= 20);
    }
}

/// A reset from the server reaches the client as a reset, relayed or not.
#[test]
fn a_reset_propagates_as_a_reset() {
    let (n, _agent) = client_db_relay("true", &[]);
    n.serve("db", &["reset", "--listen", "0.0.0.0:9000"])
        .unwrap();
    for _ in 0..5 {
        let r = n.client("client", &["reset-client", "--to", VIP]).unwrap();
        assert_eq!(r["outcome"], "ECONNRESET", "{r}");
    }
}

/// A fast writer into a slow reader through the relay: no write fails, no read returns
/// EAGAIN, every byte arrives in order. Whatever the relay moved went through its queue
/// limit (fallbacks counted, each followed by a recovery or the end of the flow).
#[test]
fn a_slow_reader_behind_the_relay_gets_every_byte_without_error() {
    let (n, agent) = client_db_relay("true", &["--skmsg-queue-floor", "65536"]);
    n.serve(
        "db",
        &["sink", "--listen", "0.0.0.0:9000", "--delay-us", "300"],
    )
    .unwrap();
    let on = relay_available(&agent);
    let c = RelayCounts::of(&agent);
    let bytes = 32 * MIB;
    let r = n
        .client(
            "client",
            &["sink-client", "--to", VIP, "--bytes", &bytes.to_string()],
        )
        .unwrap();
    assert_sunk(&r, bytes);
    let d = c.since(&agent);
    let (relayed, fallbacks, recoveries) = (d.msg_bytes, d.fallbacks, d.recoveries);
    eprintln!("slow reader, {bytes} bytes: {}", d.line());
    if !on {
        assert_eq!(relayed, 0);
    } else if relayed > 2 * 65536 {
        // More than the queue limit went straight into the slow reader: the limit must
        // have sent the writer back to the proxied path at least once.
        assert!(fallbacks >= 1, "{relayed} bytes relayed without a fallback");
        assert!(recoveries <= fallbacks);
    }
}
