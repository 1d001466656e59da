//! The control plane: turns the services the enrolment sources publish (in its own model,
//! `model`) into Envoy v3 resources (`translate`) and serves them over ADS (`server`) to
//! this node's proxy (Unix socket) and to other clients (TCP, `auth`). It runs embedded in
//! `mesh-agent run` or alone (`mesh-agent control-plane`). It never uses the proxy's code:
//! the two meet only on the xDS wire.

pub mod auth;
pub mod ca;
pub mod model;
pub mod server;
pub mod translate;

#[cfg(test)]
mod tests;
