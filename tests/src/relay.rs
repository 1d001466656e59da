//! The kernel relay's tests' counts (`kernel_relay`, `kernel_relay_egress`): the datapath's
//! relay counters and the proxy's flow byte counts, taken before a step and compared after.

use std::time::Duration;

use crate::{scenes::flow_bytes, Agent};

/// A snapshot of the relay's counters (`mesh_datapath_events_total`) and of the proxy's
/// flow byte counts; [`RelayCounts::since`] gives what a step added.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayCounts {
    /// `relay_started`: relay directions that switched to the kernel.
    pub started: u64,
    /// `msg_relayed`, `msg_relayed_bytes`: the client's messages moved by sk_msg.
    pub msgs: u64,
    pub msg_bytes: u64,
    /// `skb_relayed_bytes`: the destination's bytes moved by `mesh_relay_back` (egress).
    pub back_bytes: u64,
    /// `relay_fallback`, `relay_recovered`.
    pub fallbacks: u64,
    pub recoveries: u64,
    /// `relay_wake`, `relay_wake_dropped`: the egress relay's wake-up records.
    pub wakes: u64,
    pub wakes_dropped: u64,
    /// `mesh_tcp_received_bytes_total`, `mesh_tcp_sent_bytes_total`: the proxy's counts.
    pub rx: u64,
    pub tx: u64,
}

/// A `Name:   N kB` field of a `/proc` file, in KiB (0 if unreadable).
fn proc_kib(file: &str, field: &str) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// A process's resident memory (`VmRSS`, KiB; 0 if unreadable).
pub fn rss_kib(pid: u32) -> u64 {
    proc_kib(&format!("/proc/{pid}/status"), "VmRSS")
}

/// The kernel's slab memory (`Slab` in `/proc/meminfo`, KiB; 0 if unreadable).
pub fn slab_kib() -> u64 {
    proc_kib("/proc/meminfo", "Slab")
}

impl RelayCounts {
    /// The agent's counts now.
    pub fn of(agent: &Agent) -> RelayCounts {
        RelayCounts {
            started: agent.event("relay_started"),
            msgs: agent.event("msg_relayed"),
            msg_bytes: agent.event("msg_relayed_bytes"),
            back_bytes: agent.event("skb_relayed_bytes"),
            fallbacks: agent.event("relay_fallback"),
            recoveries: agent.event("relay_recovered"),
            wakes: agent.event("relay_wake"),
            wakes_dropped: agent.event("relay_wake_dropped"),
            rx: flow_bytes(agent, "mesh_tcp_received_bytes_total"),
            tx: flow_bytes(agent, "mesh_tcp_sent_bytes_total"),
        }
    }

    /// What each count grew by since this snapshot.
    pub fn since(&self, agent: &Agent) -> RelayCounts {
        let now = RelayCounts::of(agent);
        RelayCounts {
            started: now.started - self.started,
            msgs: now.msgs - self.msgs,
            msg_bytes: now.msg_bytes - self.msg_bytes,
            back_bytes: now.back_bytes - self.back_bytes,
            fallbacks: now.fallbacks - self.fallbacks,
            recoveries: now.recoveries - self.recoveries,
            wakes: now.wakes - self.wakes,
            wakes_dropped: now.wakes_dropped - self.wakes_dropped,
            rx: now.rx - self.rx,
            tx: now.tx - self.tx,
        }
    }

    /// Waits (10 s at most) until the proxy counted exactly `rx` bytes received and `tx`
    /// sent since this snapshot (it counts a flow once it has seen its end).
    pub fn wait_counted(&self, agent: &Agent, what: &str, rx: u64, tx: u64) {
        self.wait_until(agent, what, |d| d.rx == rx && d.tx == tx);
    }

    /// Waits (10 s at most) until what grew since this snapshot satisfies `done`.
    pub fn wait_until(&self, agent: &Agent, what: &str, done: impl Fn(&RelayCounts) -> bool) {
        crate::wait_for(what, Duration::from_secs(10), || done(&self.since(agent)));
    }

    /// One line for a test's output: the relay's counters in this difference.
    pub fn line(&self) -> String {
        format!(
            "relay_started {} msg_relayed_bytes {} skb_relayed_bytes {} relay_fallback {} \
             relay_recovered {} relay_wake {} relay_wake_dropped {}",
            self.started,
            self.msg_bytes,
            self.back_bytes,
            self.fallbacks,
            self.recoveries,
            self.wakes,
            self.wakes_dropped
        )
    }
}
