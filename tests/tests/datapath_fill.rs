//! Issue 14, item 4: the datapath's maps filled past their size under load. Per-socket
//! state lives in socket storage (`SOCK_STATE`: one entry per socket, never evicted), so
//! what can fill is `FLOWS` (an LRU cache: the listing, and the hand-off to the accepting
//! socket) and `SOCKHASH` (paired sockets). Past either, every connection must still
//! carry its bytes intact and in order to its original destination, `getpeername()` must
//! still name that destination, and the overflow must be counted, not silent.

use mesh_tests::{metric, wait_for, SimNode};
use std::time::Duration;

/// `FLOWS` at its smallest (`--flows-capacity` floor) and a `SOCKHASH` far below the
/// sockets a run pairs.
const FLOWS_CAPACITY: u64 = 1024;
const SOCKHASH_CAPACITY: u64 = 256;
/// Connections open at once: more than `FLOWS` holds (each stays open until every one is
/// connected: podtool's barrier), and about five times the pairs `SOCKHASH` holds.
const CONNS: u64 = 1200;
const BYTES: u64 = 16384;

fn node(mode: &str) -> SimNode {
    mesh_tests::scenes::client_server(&format!("mode: {mode}"))
}

fn start(n: &SimNode) -> mesh_tests::Agent {
    n.start_agent(&[
        // Pair on every kernel (below 6.9 the agent otherwise pairs nothing).
        "--skmsg-unbounded-pairing",
        "true",
        "--flows-capacity",
        &FLOWS_CAPACITY.to_string(),
        "--sockhash-capacity",
        &SOCKHASH_CAPACITY.to_string(),
        // Under this load on an emulated kernel the heartbeat can age; the datapath would
        // then (rightly) send connections around the proxy, which is not what is counted.
        "--proxy-heartbeat-timeout-ms",
        "30000",
    ])
    .unwrap()
}

/// `CONNS` concurrent echo exchanges from the client pod to `dst`, each checked by podtool:
/// every byte back in order (sha256 of the stream), and getpeername() == `dst`.
fn load(n: &SimNode, agent: &mesh_tests::Agent, dst: &str) {
    let r = n
        .client(
            "client",
            &[
                "echo-client",
                "--to",
                dst,
                "--bytes",
                &BYTES.to_string(),
                "--conns",
                &CONNS.to_string(),
                "--deadline-ms",
                "240000",
            ],
        )
        .unwrap();
    assert_eq!(r["errors"], serde_json::json!([]), "{r}\n{}", events(agent));
    assert_eq!(r["conns"].as_u64(), Some(CONNS), "{r}");
    assert_eq!(r["intact"].as_u64(), Some(CONNS), "{r}");
    assert_eq!(r["received"].as_u64(), Some(CONNS * BYTES), "{r}");
    assert_eq!(r["sha_sent"], r["sha_received"], "{r}");
}

/// Pairing is bounded by `SOCKHASH`, and a socket that did not get in is counted and its
/// flow takes TCP; a flow whose two ends did not both get in loses nothing either.
fn assert_sockhash_overflow_counted(agent: &mesh_tests::Agent) {
    let failed = agent.event("sockhash_update_failed");
    let paired = agent.event("sockops_client_paired") + agent.event("sockops_server_paired");
    assert!(failed > 0, "SOCKHASH overflow not counted");
    assert!(
        paired <= 2 * CONNS && paired + failed >= CONNS,
        "paired {paired}, failed {failed}"
    );
}

/// Proxied flows past both maps: each reaches the proxy, which reads the original
/// destination from its accepted socket's own state, and goes on to that destination.
#[test]
fn proxied_flows_past_full_maps_stay_intact_and_reach_their_destination() {
    let n = node("proxied");
    let agent = start(&n);
    let dst = format!("{}:8080", n.pod("server").ip);
    n.serve("server", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    load(&n, &agent, &dst);
    let m = agent.get("/metrics").unwrap();
    // Every connection went through the proxy to the destination the client dialled.
    assert_eq!(
        metric(
            &m,
            "mesh_tcp_connections_opened_total",
            &[("destination_address", dst.as_str())]
        ),
        CONNS,
        "{m}"
    );
    assert_eq!(agent.event("connect_redirected"), CONNS);
    assert_eq!(agent.event("flow_handoff_missed"), 0);
    assert_sockhash_overflow_counted(&agent);
    // More flows were live at once than FLOWS holds: the LRU dropped the oldest from the
    // listing, and each such client counts at its close.
    wait_for("every flow closed", Duration::from_secs(30), || {
        agent.event("flow_closed") + agent.event("flow_evicted") >= CONNS
    });
    assert!(
        agent.event("flow_evicted") > 0,
        "FLOWS never overflowed: the test did not fill it"
    );
    eprintln!("{}", events(&agent));
}

/// The datapath's non-zero events, for the test's output.
fn events(agent: &mesh_tests::Agent) -> String {
    let m = agent.get("/metrics").unwrap();
    m.lines()
        .filter(|l| l.starts_with("mesh_datapath_events_total") && !l.ends_with(" 0"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Direct-mode flows (pod to pod, paired by sockops) past both maps.
#[test]
fn direct_flows_past_full_maps_stay_intact() {
    let n = node("direct");
    let agent = start(&n);
    let dst = format!("{}:8080", n.pod("server").ip);
    n.serve("server", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    load(&n, &agent, &dst);
    assert_eq!(agent.event("connect_direct"), CONNS);
    assert_eq!(agent.event("connect_redirected"), 0);
    assert_sockhash_overflow_counted(&agent);
    wait_for("every flow closed", Duration::from_secs(30), || {
        agent.event("flow_closed") + agent.event("flow_evicted") >= CONNS
    });
    assert!(agent.event("flow_evicted") > 0, "FLOWS never overflowed");
    eprintln!("{}", events(&agent));
}
