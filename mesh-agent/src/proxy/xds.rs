//! The node proxy's xDS client: an ADS stream (delta or state of the world) to the
//! control plane, on-demand subscriptions, and the conversion of accepted resources into
//! the proxy's own configuration model (`crate::proxy::config`).
//!
//! - `client`: the stream, subscriptions, ACK/NACK, the configuration in force.
//! - `convert`: Envoy resources -> `proxy::config`, refusing what the proxy cannot honour.
//! - `dump`: the configuration in force as JSON (`/config_dump`).

pub mod client;
pub mod convert;
pub mod dump;
