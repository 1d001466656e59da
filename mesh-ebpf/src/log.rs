//! The decision log: what the programs decided about a connection, through aya-log's
//! ring buffer (`AYA_LOGS`, 5.8+), read and decoded by the agent
//! (`mesh_agent::datapath::events`).
//!
//! Off by default and free when off: every program compares the record's level with
//! `CONFIG.log_level` (a field of a map value it has already loaded, or one array lookup
//! on the rare paths) before it formats anything. The agent sets the field from its log
//! filter at run time; aya-log's own load-time level (`AYA_LOG_LEVEL`) stays at its
//! default, everything.
//!
//! Small programs: a record starts with a code (`mesh_common::decision`: a `Stat` index or a
//! log-only code) that the agent turns into the decision's name and meaning, so each
//! program formats one record per *shape* (its decisions are collected and said once, at
//! the program's exit), not one text per decision; every aya-log call site is a few
//! hundred instructions.
//!
//! Records are per connection (connect, established, close, a new inbound connection) or
//! per rare event (a sender changing path); nothing is logged per message or per packet of
//! an established connection. Addresses are passed as their 16 bytes in network order
//! (`[u8; 16]`, IPv4 v4-mapped; the agent shows those as dotted quads), ports in host order, netns cookies as numbers
//! (0: not known).

use aya_log_ebpf::macro_support::Level;
use mesh_common::{log_level, maps::Ip};

/// An address as the maps hold it (`Ip`) as the 16 bytes aya-log shows as an IPv6
/// address; the agent shows a v4-mapped one as a dotted quad (`events::decode`).
#[inline(always)]
pub fn ip16(ip: Ip) -> [u8; 16] {
    mesh_common::maps::ip_bytes(ip)
}

/// Whether records at `level` are wanted (`current`: `CONFIG.log_level`).
#[inline(always)]
pub fn on(current: u32, level: u32) -> bool {
    log_level::enabled(current, level)
}

/// aya-log's level for one of ours (the programs use debug and trace only).
#[inline(always)]
pub fn aya_level(level: u32) -> Level {
    if level == log_level::TRACE {
        Level::Trace
    } else {
        Level::Debug
    }
}

/// No record to say (`code` of a collected record).
pub const NONE: u32 = u32::MAX;
