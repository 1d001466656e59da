//! rustls configurations for mesh mTLS (see `identity`).
