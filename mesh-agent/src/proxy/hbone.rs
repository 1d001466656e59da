//! The HBONE tunnel: HTTP/2 CONNECT in mutual TLS 1.3 to port 15008, as Istio's ztunnel
//! speaks it. A stream is one proxied TCP connection: `CONNECT` with `:authority` = the
//! original destination `ip:port`, `200` to open it, then the bytes as DATA frames.
//!
//! - `client`: `HboneClient`, streams from a local identity to a peer's HBONE address,
//!   multiplexed on pooled connections (`pool`).
//! - `server`: `serve`, the listener on 15008; a `ConnectHandler` decides and dials.
//! - `stream`: `HboneStream`, one CONNECT stream as `AsyncRead + AsyncWrite`.
//! - `tunnel`: limits, errors, and the relay between a TCP connection and a stream.
//!
//! Stream semantics, security-critical: a clean end (FIN, END_STREAM) is passed on as a
//! half-close, and an error or reset on either side reaches the other as a reset
//! (RST_STREAM on the HTTP/2 side, TCP RST via `SO_LINGER 0` on the TCP side), never as a
//! clean end that would make a cut transfer look complete. This is why the tunnel speaks
//! `h2` directly rather than through hyper's upgrades: a dropped hyper `Upgraded` ends its
//! stream with END_STREAM, and a received RST_STREAM(CANCEL) reads as EOF there.

pub mod client;
pub mod pool;
pub mod server;
pub mod stream;
pub mod tunnel;

pub use self::{
    client::{ClientOptions, HboneClient},
    server::{
        connection_slots, parse_forwarded_for, serve, serve_shared, ConnectHandler, PeerInfo,
        Refusal, ServerOptions,
    },
    stream::HboneStream,
    tunnel::*,
};

#[cfg(test)]
mod tests;
