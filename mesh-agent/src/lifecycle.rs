//! The agent's life cycle beyond the datapath's own: hand-over to a newer agent on the same
//! node (`handover`).

pub mod handover;
