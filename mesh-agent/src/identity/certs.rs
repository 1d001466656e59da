//! The agent's certificate manager (see `identity`).
