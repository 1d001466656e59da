//! mesh-agent: the per-node service-mesh agent. It loads the eBPF datapath that captures
//! enrolled workloads' connections without iptables, runs the node proxy those connections
//! are handed to, keeps the datapath maps in line with the enrolment source, and lets
//! operators inspect it all from the command line.
//!
//! The pieces, and which may use which, are in docs/architecture.md ("Code map"):
//! `datapath` (loader, maps, map writer), `enrol` (the file and Kubernetes sources),
//! `control` (the control plane: its model, translation to xDS, the ADS server), `proxy`
//! (the node proxy: L4, L7, its own config model and its xDS client), `admin` and
//! `metrics`, `lifecycle` (readiness, drain, hand-over), and `app`, which wires them.
//!
//! The modules live in this library so the binary (`main.rs`) stays a thin entry point and
//! the fuzz targets (`fuzz/`) can reach the parsers and converters they exercise.

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod control;
pub mod datapath;
pub mod enrol;
pub mod identity;
pub mod lifecycle;
pub mod metrics;
pub mod proxy;
// Raw system calls: the one module allowed `unsafe`, kept private to the crate.
mod sys;
/// The binary's `#[global_allocator]` (`sys/alloc.rs`: malloc, with a cheap over-aligned path).
pub use sys::alloc::Allocator;
pub mod top;
pub mod wire;
