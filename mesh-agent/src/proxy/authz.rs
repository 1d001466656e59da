//! Authorization: Istio AuthorizationPolicy and PeerAuthentication semantics.
