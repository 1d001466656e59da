//! The kernel features the datapath depends on beyond its floor (5.10): detected at start,
//! each named with the kernel version that brings it and what the agent does without it.
//! Shown in `/ready` (the missing ones), `/kernel` (all) and `mesh_kernel_feature` in
//! `/metrics`, so "why does this node behave differently" has an answer without a
//! debugger.

use std::fmt::Write as _;

use serde::Serialize;

/// How the agent learns a pod's network-namespace cookie (the `WORKLOADS` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NetnsCookieMode {
    /// `SO_NETNS_COOKIE` where the kernel has it (5.14+), else the probe.
    #[default]
    Auto,
    /// `getsockopt(SO_NETNS_COOKIE)` on a socket made in the namespace (5.14+).
    Sockopt,
    /// A UDP `connect()` from the namespace answered by the connect4 program
    /// (`bpf_get_netns_cookie`, 5.7+), through the `NETNS_PROBE` map.
    Probe,
}

/// How sockops names an accepting socket's network namespace in the flow keys
/// (docs/kernels.md, "Flow keys and network namespaces").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowKeyNetns {
    /// sockops asks the kernel (`bpf_get_netns_cookie`, 5.15+).
    SockopsHelper,
    /// sockops reads the stamp `mesh_sock_netns` (cgroup/sock_create) left on the socket
    /// or its listener (5.9+); sockets without one (made before the agent first attached
    /// it) are derived.
    SocketStamp,
    /// Derived from the accepting socket's address: namespaces holding the same
    /// addresses share keys.
    Derived,
}

#[derive(Debug, Clone, Serialize)]
pub struct Feature {
    /// Short stable name (the metric's label).
    pub name: &'static str,
    /// The kernel release that brings it.
    pub since: &'static str,
    pub available: bool,
    /// What the agent does where it is missing.
    pub fallback: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct KernelFeatures {
    /// `uname -r`.
    pub release: String,
    pub features: Vec<Feature>,
    /// How netns cookies are obtained on this node (the mode in force, never `auto`).
    pub netns_cookie: NetnsCookieMode,
    /// How an accepting socket's namespace in the flow keys is known.
    pub flow_key_netns: FlowKeyNetns,
}

/// `SO_NETNS_COOKIE`.
pub const NETNS_COOKIE_SOCKOPT: &str = "so_netns_cookie";
/// `sk_psock.msg_tot_len`: the sk_msg back-pressure check.
pub const SKMSG_QUEUE_LENGTH: &str = "skmsg_queue_length";
/// `bpf_get_netns_cookie` from sockops: an accepting socket's flow key names its real
/// network namespace.
pub const SOCKOPS_NETNS_COOKIE: &str = "sockops_netns_cookie";
/// The `mesh_sock_netns` program (cgroup/sock_create: `bpf_get_netns_cookie` 5.7,
/// `bpf_sk_storage_get` 5.9, `BPF_F_CLONE` 5.4) stamping each TCP socket with its
/// namespace: the flow keys' accepting namespace where sockops cannot ask.
pub const SOCK_NETNS_STAMP: &str = "sock_netns_stamp";
/// The kernel relay of proxied flows (`--kernel-relay`): the back-pressure check's queue
/// length and `struct sk_msg`/`tcp_sock` offsets. Listed only when the flag asks for it.
pub const KERNEL_RELAY: &str = "kernel_relay";
/// `mesh_close_unread` (`tp_btf/inet_sock_set_state`, needs `skmsg_queue_length`): a paired
/// socket closed with redirected bytes unread ends its proxied flow in a reset
/// (`datapath::close`).
pub const CLOSE_UNREAD_RESET: &str = "close_unread_reset";

impl KernelFeatures {
    /// Judges what the start found: whether `SO_NETNS_COOKIE` answers, whether the
    /// kernel's BTF has the redirect queue's length, whether sockops may read a socket's
    /// namespace and whether the stamping program loaded, the mode asked for, and (when
    /// `--kernel-relay` asks for it) whether the kernel relay can run.
    pub fn detect(
        sockopt_works: bool,
        queue_length: bool,
        sockops_netns: bool,
        sock_netns_stamp: bool,
        asked: NetnsCookieMode,
        kernel_relay: Option<bool>,
    ) -> KernelFeatures {
        let flow_key_netns = if sockops_netns {
            FlowKeyNetns::SockopsHelper
        } else if sock_netns_stamp {
            FlowKeyNetns::SocketStamp
        } else {
            FlowKeyNetns::Derived
        };
        let netns_cookie = match asked {
            NetnsCookieMode::Auto if sockopt_works => NetnsCookieMode::Sockopt,
            NetnsCookieMode::Auto => NetnsCookieMode::Probe,
            m => m,
        };
        KernelFeatures {
            release: crate::sys::kernel_release(),
            features: [
                Feature {
                    name: NETNS_COOKIE_SOCKOPT,
                    since: "5.14",
                    available: sockopt_works,
                    fallback: "network-namespace cookies are probed through the connect4 program (a UDP connect from the pod's namespace, NETNS_PROBE map)",
                },
                Feature {
                    name: SOCKOPS_NETNS_COOKIE,
                    since: "5.15",
                    available: sockops_netns,
                    fallback: if sock_netns_stamp {
                        "an accepting socket's namespace in the flow keys is read from the stamp mesh_sock_netns (cgroup/sock_create, sock_netns_stamp) left on it or its listener; a socket made before the agent first attached that program has none and its namespace is derived from its address"
                    } else {
                        "an accepting socket's namespace in the flow keys is derived from its address (the proxy's listener, or the local workload's in DESTS): namespaces holding the same addresses share keys, and BPF_NOEXIST keeps a live flow's entries from being taken over"
                    },
                },
                Feature {
                    name: SOCK_NETNS_STAMP,
                    since: "5.9",
                    available: sock_netns_stamp,
                    fallback: "where sockops_netns_cookie is missing too, an accepting socket's namespace in the flow keys is derived from its address (the proxy's listener, or the local workload's in DESTS): namespaces holding the same addresses share keys, and BPF_NOEXIST keeps a live flow's entries from being taken over",
                },
                Feature {
                    name: SKMSG_QUEUE_LENGTH,
                    since: "6.9",
                    available: queue_length,
                    fallback: "no sockets are paired (no sk_msg short-circuit, direct mode over TCP), since a redirect could queue into a slow reader without a limit; --skmsg-unbounded-pairing true pairs anyway",
                },
            ]
            .into_iter()
            .chain(kernel_relay.map(|available| Feature {
                name: KERNEL_RELAY,
                since: "6.9",
                available,
                fallback: "--kernel-relay is ignored: the node proxy relays every proxied flow in user space",
            }))
            .collect(),
            netns_cookie,
            flow_key_netns,
        }
    }

    /// Whether this kernel's release (`uname -r`) is at least `major.minor`.
    pub fn release_at_least(release: &str, major: u32, minor: u32) -> bool {
        let mut parts = release
            .split(|c: char| !c.is_ascii_digit())
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        (a, b) >= (major, minor)
    }

    pub fn missing(&self) -> impl Iterator<Item = &Feature> {
        self.features.iter().filter(|f| !f.available)
    }

    /// One line per missing feature, for `/ready` and the start-up log.
    pub fn degraded_lines(&self) -> String {
        let mut out = String::new();
        for f in self.missing() {
            let _ = writeln!(
                out,
                "degraded: kernel {} lacks {} ({}+): {}",
                self.release, f.name, f.since, f.fallback
            );
        }
        out
    }

    /// `mesh_kernel_feature{feature, since} 1|0`.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP mesh_kernel_feature Kernel features the datapath uses beyond its floor: 1 available, 0 missing (the agent takes the fallback /kernel names).\n# TYPE mesh_kernel_feature gauge"
        );
        for f in &self.features {
            let _ = writeln!(
                out,
                "mesh_kernel_feature{{feature=\"{}\",since=\"{}\"}} {}",
                f.name, f.since, f.available as u8
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_the_sockopt_where_it_works_and_the_probe_elsewhere() {
        let new = KernelFeatures::detect(true, true, true, true, NetnsCookieMode::Auto, None);
        assert_eq!(new.netns_cookie, NetnsCookieMode::Sockopt);
        assert_eq!(new.degraded_lines(), "");
        let old = KernelFeatures::detect(false, false, false, true, NetnsCookieMode::Auto, None);
        assert_eq!(old.netns_cookie, NetnsCookieMode::Probe);
        let lines = old.degraded_lines();
        assert_eq!(lines.lines().count(), 3, "{lines}");
        assert!(lines.contains("so_netns_cookie (5.14+)"), "{lines}");
        assert!(lines.contains("sockops_netns_cookie (5.15+)"), "{lines}");
        assert!(lines.contains("skmsg_queue_length (6.9+)"), "{lines}");
        // A forced mode stays what was asked, whatever the kernel has.
        let forced = KernelFeatures::detect(true, true, true, true, NetnsCookieMode::Probe, None);
        assert_eq!(forced.netns_cookie, NetnsCookieMode::Probe);
    }

    #[test]
    fn the_kernel_relay_is_listed_only_when_asked_for() {
        let off = KernelFeatures::detect(true, true, true, true, NetnsCookieMode::Auto, None);
        assert!(off.features.iter().all(|f| f.name != KERNEL_RELAY));
        let old = KernelFeatures::detect(
            false,
            false,
            false,
            true,
            NetnsCookieMode::Auto,
            Some(false),
        );
        let lines = old.degraded_lines();
        assert!(lines.contains("kernel_relay (6.9+)"), "{lines}");
        let new = KernelFeatures::detect(true, true, true, true, NetnsCookieMode::Auto, Some(true));
        assert_eq!(new.degraded_lines(), "");
    }

    #[test]
    fn flow_keys_take_the_helper_then_the_stamp_then_the_address() {
        let k = |helper, stamp| {
            KernelFeatures::detect(true, true, helper, stamp, NetnsCookieMode::Auto, None)
        };
        assert_eq!(k(true, true).flow_key_netns, FlowKeyNetns::SockopsHelper);
        assert_eq!(k(true, false).flow_key_netns, FlowKeyNetns::SockopsHelper);
        // 5.10 - 5.14: the stamp; the helper is still reported missing, with the stamp
        // named as what is done instead.
        let stamp = k(false, true);
        assert_eq!(stamp.flow_key_netns, FlowKeyNetns::SocketStamp);
        let lines = stamp.degraded_lines();
        assert_eq!(lines.lines().count(), 1, "{lines}");
        assert!(lines.contains("sockops_netns_cookie (5.15+)"), "{lines}");
        assert!(
            lines.contains("read from the stamp mesh_sock_netns"),
            "{lines}"
        );
        // Neither: derived, and both named with their versions.
        let none = k(false, false);
        assert_eq!(none.flow_key_netns, FlowKeyNetns::Derived);
        let lines = none.degraded_lines();
        assert!(lines.contains("sockops_netns_cookie (5.15+)"), "{lines}");
        assert!(lines.contains("sock_netns_stamp (5.9+)"), "{lines}");
        assert!(lines.contains("derived from its address"), "{lines}");
        let json = serde_json::to_value(&none).unwrap();
        assert_eq!(json["flow_key_netns"], "derived");
        assert_eq!(
            serde_json::to_value(&stamp).unwrap()["flow_key_netns"],
            "socket_stamp"
        );
    }

    #[test]
    fn releases_compare_by_major_and_minor() {
        assert!(KernelFeatures::release_at_least("6.18.0-1-amd64", 5, 15));
        assert!(KernelFeatures::release_at_least("5.15.0", 5, 15));
        assert!(!KernelFeatures::release_at_least("5.10.0-46-amd64", 5, 15));
        assert!(!KernelFeatures::release_at_least("unknown", 5, 15));
    }

    #[test]
    fn the_metric_has_one_series_per_feature() {
        let mut out = String::new();
        KernelFeatures::detect(false, true, true, true, NetnsCookieMode::Auto, None)
            .render(&mut out);
        assert!(out.contains("mesh_kernel_feature{feature=\"so_netns_cookie\",since=\"5.14\"} 0"));
        assert!(out.contains("mesh_kernel_feature{feature=\"skmsg_queue_length\",since=\"6.9\"} 1"));
    }
}
