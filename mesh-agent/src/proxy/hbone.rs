//! The HBONE tunnel: HTTP/2 CONNECT in mutual TLS 1.3 to port 15008.
