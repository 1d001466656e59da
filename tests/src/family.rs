//! The address family a scenario runs in, so that one test body serves IPv4 and IPv6
//! (issue 14, item 5: "the same tests as IPv4"): the node it needs and the addresses a pod
//! listens on and dials.

use std::net::{IpAddr, SocketAddr};

use crate::{SimNode, PROXY_PORT};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// A node with no pods yet: IPv4 only, or dual-stack for IPv6 (every pod gets both
    /// addresses, the agent `--proxy-redirect6`; see `SimNode::new_dual_stack`).
    pub fn node(self) -> SimNode {
        match self {
            Family::V4 => SimNode::new().expect("sim node"),
            Family::V6 => SimNode::new_dual_stack().expect("dual-stack sim node"),
        }
    }

    /// The wildcard address a pod's server listens on, `port` included (`[::]` on a
    /// dual-stack pod takes IPv4 too).
    pub fn any(self, port: u16) -> String {
        match self {
            Family::V4 => format!("0.0.0.0:{port}"),
            Family::V6 => format!("[::]:{port}"),
        }
    }

    /// `pod`'s address in this family.
    pub fn ip(self, n: &SimNode, pod: &str) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(n.pod(pod).ip),
            Family::V6 => IpAddr::V6(n.pod(pod).v6()),
        }
    }

    /// The node's address in this family (where the proxy listens).
    pub fn gateway(self, n: &SimNode) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(n.gateway),
            Family::V6 => IpAddr::V6(n.gateway6()),
        }
    }

    /// `ip:port` (`[ip6]:port`) of `pod`: what a client dials and the proxy's metrics name.
    pub fn dst(self, n: &SimNode, pod: &str, port: u16) -> String {
        SocketAddr::new(self.ip(n, pod), port).to_string()
    }

    /// The node proxy's listener in this family.
    pub fn proxy(self, n: &SimNode) -> String {
        SocketAddr::new(self.gateway(n), PROXY_PORT).to_string()
    }
}
