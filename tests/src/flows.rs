//! What the end-to-end tests check of a flow: the pod tool's echo exchange arrived whole,
//! and the node proxy counted it.

use crate::{metric, SimNode};

/// `podtool echo-client` output: no error, every connection intact, `bytes` back on each
/// (`received` counts all connections), the same digest both ways.
pub fn assert_intact(r: &serde_json::Value, bytes: u64) {
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    let conns = r["conns"]
        .as_u64()
        .unwrap_or_else(|| panic!("no `conns`: {r}"));
    assert!(conns >= 1, "{r}");
    assert_eq!(r["intact"], conns, "{r}");
    assert_eq!(r["received"].as_u64(), Some(bytes * conns), "{r}");
    assert_eq!(r["sha_sent"], r["sha_received"], "{r}");
}

/// `podtool sink-client` output: `bytes` reached the (slow) reader in order, no write failed
/// and no read returned EAGAIN.
pub fn assert_sunk(r: &serde_json::Value, bytes: u64) {
    assert_eq!(
        r["errors"],
        serde_json::json!([]),
        "no write may fail and no read may return EAGAIN: {r}"
    );
    assert_eq!(r["received_by_reader"].as_u64().unwrap(), bytes, "{r}");
    assert_eq!(r["sha_sent"], r["sha_reader"], "{r}");
}

/// An echo exchange of `bytes` each way from `pod` to `to` (`ip:port`), checked intact.
pub fn echo_intact(n: &SimNode, pod: &str, to: &str, bytes: u64) {
    let r = n
        .client(
            pod,
            &["echo-client", "--to", to, "--bytes", &bytes.to_string()],
        )
        .unwrap();
    assert_intact(&r, bytes);
}

/// Connections the node proxy opened to `dst` (`ip:port` as the client dialled it).
pub fn proxied_conns(metrics: &str, dst: &str) -> u64 {
    metric(
        metrics,
        "mesh_tcp_connections_opened_total",
        &[("destination_address", dst)],
    )
}
