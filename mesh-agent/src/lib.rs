//! mesh-agent: the per-node service-mesh agent. It loads the eBPF datapath that captures
//! enrolled workloads' connections without iptables, runs the node proxy those connections
//! are handed to, keeps the datapath maps in line with the enrolment source, and lets
//! operators inspect it all from the command line.
//!
//! The modules live in this library so the binary (`main.rs`) stays a thin entry point and
//! the fuzz targets (`fuzz/`) can reach the parsers and converters they exercise.

pub mod admin;
pub mod app;
pub mod bpf;
pub mod cli;
pub mod config;
pub mod handover;
pub mod k8s;
pub mod metrics;
pub mod proxy;
// Raw system calls: the one module allowed `unsafe`, kept private to the crate.
mod sys;
pub mod workload;
pub mod xds;
