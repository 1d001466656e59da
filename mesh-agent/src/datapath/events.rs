//! The datapath's decision log in the agent's log: what the eBPF programs decided about a
//! connection (captured, direct, excluded and why, paired, fell back to TCP, evicted,
//! hand-off missed), written by the programs through aya-log's ring buffer and shown here
//! as `tracing` events of target [`TARGET`], each naming the decision and the flow
//! (netns cookie, addresses, ports).
//!
//! The programs log only while `CONFIG.log_level` says so (off by default: one load and
//! one branch at a decision, nothing formatted). That level follows the agent's own log
//! filter: [`wanted_level`] asks the filter how verbose [`TARGET`] may be, and the agent
//! writes the answer into the map at start and after every change of the filter (`/logging`,
//! `mesh-agent log-level`). So `mesh-agent log-level mesh_agent::datapath::events=debug,info`
//! turns the kernel side on and `... info` turns it off again, without a restart.
//!
//! A dedicated thread (its own current-thread runtime) waits on the ring buffer and turns
//! each record into an event. If the programs write faster than it reads, the 128 KiB ring
//! fills and later records are dropped in the kernel (never blocking a connection).
//!
//! The second ring, `FLOW_EVENTS`, carries the records of direct-mode flows (opened, an
//! end closed, with the bytes it sent): [`FlowReader`] hands each to a sink the wiring
//! gives (the Istio series, `metrics::istio::DirectFlows`), on a thread of its own. Its
//! ring has a fixed size (`mesh_common::capacity::FLOW_EVENTS_BYTES`); when it is full the
//! programs drop the record and count it (`telemetry_dropped`), so a slow reader costs
//! counts, never memory or a connection's time. The programs do not wake the reader per
//! record (a wake-up is a self-IPI in the connection's own path, and a context switch):
//! only when the unread data crosses a multiple of `FLOW_EVENTS_WAKE_BYTES`; the reader
//! drains the ring every `FLOW_EVENTS_DRAIN_MS` besides, so a record waits at most that.

use std::sync::{Arc, Weak};

use aya::{
    maps::{MapData, RingBuf},
    Ebpf,
};
use mesh_common::{log_level, maps::FlowRecord};
use tracing::{debug, error, info, trace, warn};

use super::ring::RingReader;

/// The `tracing` target of the decision log.
pub const TARGET: &str = "mesh_agent::datapath::events";

/// The level the programs log at (`mesh_common::log_level`): `TRACE` or `DEBUG` when the
/// agent's log filter lets [`TARGET`] through at that level, else `OFF`. Every record of
/// the programs is a debug (a decision on a workload's connection) or a trace one (every
/// other connect on the node), so a filter at `info` leaves the programs silent.
pub fn wanted_level() -> u32 {
    use tracing::Level;
    if tracing::enabled!(target: TARGET, Level::TRACE) {
        log_level::TRACE
    } else if tracing::enabled!(target: TARGET, Level::DEBUG) {
        log_level::DEBUG
    } else {
        log_level::OFF
    }
}

/// What keeps `CONFIG.log_level` in line with the log filter: the wiring runs it after
/// every change of the filter (`admin::logging::on_change`, which also runs it at once).
/// Holds the maps weakly: a dropped datapath is simply not updated.
pub fn log_level_follower(maps: &Arc<super::Maps>) -> Box<dyn Fn() + Send + Sync> {
    let weak: Weak<super::Maps> = Arc::downgrade(maps);
    Box::new(move || {
        if let Some(m) = weak.upgrade() {
            m.set_log_level(wanted_level());
        }
    })
}

/// aya-log's records as `tracing` events: the level as the program chose it, the program's
/// module (`mesh::connect`, `mesh::sockops`, `mesh::sk_msg`, `mesh::tc`) as `program`.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, r: &log::Record<'_>) {
        let program = r.target();
        let msg = decode(&r.args().to_string());
        match r.level() {
            log::Level::Error => error!(target: TARGET, program, "{msg}"),
            log::Level::Warn => warn!(target: TARGET, program, "{msg}"),
            log::Level::Info => info!(target: TARGET, program, "{msg}"),
            log::Level::Debug => debug!(target: TARGET, program, "{msg}"),
            log::Level::Trace => trace!(target: TARGET, program, "{msg}"),
        }
    }

    fn flush(&self) {}
}

type Logger = aya_log::EbpfLogger<ToTracing>;

/// A record as the programs write it, `CODE rest` (`mesh_common::decision`), as people
/// read it: `name: why; rest`. A code this build does not know stays a number. The
/// programs pass every address as 16 bytes (IPv4 v4-mapped): a v4-mapped one is shown as
/// the IPv4 address it is (`[::ffff:10.0.0.3]:80` as `10.0.0.3:80`).
pub fn decode(msg: &str) -> String {
    let msg = plain_v4(msg);
    match msg.split_once(' ').and_then(|(code, rest)| {
        let (name, why) = mesh_common::decision::describe(code.parse().ok()?)?;
        Some(format!("{name}: {why}; {rest}"))
    }) {
        Some(m) => m,
        None => msg,
    }
}

/// `[::ffff:a.b.c.d]` and `::ffff:a.b.c.d` as `a.b.c.d`.
fn plain_v4(msg: &str) -> String {
    const MAPPED: &str = "::ffff:";
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find(MAPPED) {
        let after = &rest[i + MAPPED.len()..];
        let quad_len = after
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(after.len());
        let quad = &after[..quad_len];
        if quad.parse::<std::net::Ipv4Addr>().is_err() {
            out.push_str(&rest[..i + MAPPED.len()]);
            rest = after;
            continue;
        }
        let bracketed = rest[..i].ends_with('[') && after[quad_len..].starts_with(']');
        if bracketed {
            out.push_str(&rest[..i - 1]);
            out.push_str(quad);
            rest = &after[quad_len + 1..];
        } else {
            out.push_str(&rest[..i]);
            out.push_str(quad);
            rest = &after[quad_len..];
        }
    }
    out.push_str(rest);
    out
}

/// The reader of the programs' log ring buffer; stops (and joins its thread) on drop.
pub struct EventReader(#[expect(dead_code, reason = "held for its drop")] RingReader);

impl EventReader {
    /// Takes the ring buffer (`AYA_LOGS`) out of the loaded object and starts reading it.
    pub fn start(ebpf: &mut Ebpf) -> Result<EventReader, String> {
        let logger = aya_log::EbpfLogger::init_with_logger(ebpf, ToTracing)
            .map_err(|e| format!("the datapath log ring buffer: {e}"))?;
        RingReader::start(
            "datapath-log",
            "the datapath decision log",
            logger,
            None,
            |l: &mut Logger| l.flush(),
        )
        .map(EventReader)
        .map_err(|e| format!("the datapath decision log cannot be read: {e}"))
    }
}

/// Where direct-mode flow records go: called on the reader's thread, one record at a time.
pub type FlowSink = Box<dyn FnMut(&FlowRecord) + Send>;

/// A record as the ring holds it (`FlowRecord`'s `repr(C)` layout, native byte order);
/// `None` for a length this build does not know (another build's programs): skipped.
pub fn parse_flow_record(bytes: &[u8]) -> Option<FlowRecord> {
    use mesh_common::maps::SockKey;
    if bytes.len() != std::mem::size_of::<FlowRecord>() {
        return None;
    }
    let u16_at = |o: usize| u16::from_ne_bytes([bytes[o], bytes[o + 1]]);
    let u32_at = |o: usize| u32::from_ne_bytes(bytes[o..o + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |o: usize| u64::from_ne_bytes(bytes[o..o + 8].try_into().unwrap_or([0; 8]));
    let ip_at = |o: usize| [u32_at(o), u32_at(o + 4), u32_at(o + 8), u32_at(o + 12)];
    Some(FlowRecord {
        kind: u32_at(0),
        flags: u32_at(4),
        src_id: u32_at(8),
        dst_id: u32_at(12),
        key: SockKey {
            netns: u64_at(16),
            local_ip: ip_at(24),
            remote_ip: ip_at(40),
            local_port: u16_at(56),
            remote_port: u16_at(58),
            _pad: u32_at(60),
        },
        netns: u64_at(64),
        sent_redirected: u64_at(72),
        sent_tcp: u64_at(80),
        duration_ns: u64_at(88),
    })
}

/// The reader of `FLOW_EVENTS`; stops (and joins its thread) on drop, after handing what
/// is left in the ring to the sink. `None`: the ring could not be read (logged; the
/// agent runs on without direct mode's records, as before the shared reader).
pub struct FlowReader(#[expect(dead_code, reason = "held for its drop")] Option<RingReader>);

impl FlowReader {
    pub fn start(ring: RingBuf<MapData>, mut sink: FlowSink) -> Result<FlowReader, String> {
        let drain = move |ring: &mut RingBuf<MapData>| {
            while let Some(item) = ring.next() {
                match parse_flow_record(&item) {
                    Some(r) => sink(&r),
                    None => debug!(len = item.len(), "a flow record of another size, skipped"),
                }
            }
        };
        // The programs wake this reader only now and then (`flow_record`): the tick
        // drains what came in between.
        let reader = RingReader::start(
            "datapath-flows",
            "direct-mode flow records",
            ring,
            Some(std::time::Duration::from_millis(
                mesh_common::capacity::FLOW_EVENTS_DRAIN_MS,
            )),
            drain,
        )
        .map_err(|e| warn!(error = %e, "direct-mode flow records cannot be read"))
        .ok();
        Ok(FlowReader(reader))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_common::{decision, Stat};

    #[test]
    fn records_are_decoded_into_name_and_meaning() {
        let code = Stat::ConnectExcluded as u32;
        assert_eq!(
            decode(&format!("{code} netns=7 src=10.0.0.2 dst=10.0.0.3:80")),
            "connect_excluded: not captured, an exclusion rule (--exclude) matches; netns=7 src=10.0.0.2 dst=10.0.0.3:80"
        );
        assert_eq!(
            decode(&format!(
                "{} paired=1 netns=7",
                decision::FLOW_RECORDED_PROXIED
            )),
            "flow_recorded: proxied client established; paired=1 netns=7"
        );
        // Addresses come as 16 bytes: v4-mapped ones shown as IPv4, IPv6 as it is.
        assert_eq!(
            decode(&format!(
                "{code} netns=7 src=::ffff:10.0.0.2 dst=[::ffff:10.0.0.3]:80"
            )),
            "connect_excluded: not captured, an exclusion rule (--exclude) matches; netns=7 src=10.0.0.2 dst=10.0.0.3:80"
        );
        assert_eq!(
            decode(&format!("{code} netns=7 src=fd00::2 dst=[fd00::3]:80")),
            "connect_excluded: not captured, an exclusion rule (--exclude) matches; netns=7 src=fd00::2 dst=[fd00::3]:80"
        );
        assert_eq!(
            plain_v4("a=[::ffff:1.2.3.4]:5 -> [::ffff:x]"),
            "a=1.2.3.4:5 -> [::ffff:x]"
        );
        // Unknown codes and other text stay as they are.
        assert_eq!(decode("4242 x"), "4242 x");
        assert_eq!(decode("hello world"), "hello world");
        assert_eq!(decode("7"), "7");
    }

    #[test]
    fn flow_records_are_read_field_by_field() {
        use mesh_common::maps::SockKey;
        let r = FlowRecord {
            kind: 2,
            flags: 0x202,
            src_id: 7,
            dst_id: 9,
            key: SockKey {
                netns: 77,
                local_ip: [1, 2, 3, 0x0a00_0002],
                remote_ip: [5, 6, 7, 0x0a00_0003],
                local_port: 40000,
                remote_port: 8080,
                _pad: 0,
            },
            netns: 4242,
            sent_redirected: 1 << 40,
            sent_tcp: 12,
            duration_ns: 5_000_000,
        };
        // The bytes as the kernel writes them: the fields in `repr(C)` order, no padding.
        let mut b = Vec::new();
        for v in [r.kind, r.flags, r.src_id, r.dst_id] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        b.extend_from_slice(&r.key.netns.to_ne_bytes());
        for v in r.key.local_ip.iter().chain(&r.key.remote_ip) {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        b.extend_from_slice(&r.key.local_port.to_ne_bytes());
        b.extend_from_slice(&r.key.remote_port.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        for v in [r.netns, r.sent_redirected, r.sent_tcp, r.duration_ns] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(parse_flow_record(&b), Some(r));
        assert_eq!(parse_flow_record(&b[..40]), None);
    }
}
