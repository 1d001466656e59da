//! Istio's `IstioCertificateService` messages (wire-compatible with istiod's CA).
