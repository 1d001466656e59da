//! Inbound capture: in-pod listeners that TC steers connections to.
