//! The agent's life cycle beyond the datapath's own: readiness as guards (`ready`), drain
//! as a trigger and its watches (`drain`), and hand-over to a newer agent on the same node
//! (`handover`). A leaf: every piece may use it.

pub mod drain;
pub mod handover;
pub mod ready;
