//! xDS: the node proxy's configuration plane (Envoy v3 resources over ADS/gRPC).
//!
//! Work in progress (issue 3): the model is used by the L7 proxy and xDS client being built.
#![allow(
    dead_code,
    reason = "issue 3 in progress: the model is wired up by the next commits"
)]
//!
//! - `model`: the configuration in force, resolved from accepted resources.

pub mod client;
pub mod convert;
pub mod dump;
pub mod model;
pub mod server;
pub mod translate;

#[cfg(test)]
mod tests;
