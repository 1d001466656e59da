//! xDS: the node proxy's configuration plane (Envoy v3 resources over ADS/gRPC).
//!
//! - `model`: the configuration in force, resolved from accepted resources.

pub mod auth;
pub mod client;
pub mod convert;
pub mod dump;
pub mod model;
pub mod server;
pub mod translate;

#[cfg(test)]
mod tests;
