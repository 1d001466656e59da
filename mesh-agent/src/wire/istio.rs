//! ztunnel's workload and authorization resources (`istio.workload.Address`, `istio.security.Authorization`), as prost messages.
