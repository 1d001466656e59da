//! The L7 half of the node proxy: HTTP/1.1, HTTP/2 and gRPC on hyper, configured by
//! `xds::model` (routes, clusters, endpoints). Under construction (issue 3).
