//! Kernel side of mesh-agent. One object holds every program so they share their maps:
//!
//! - `mesh_connect4` / `mesh_connect6` (`cgroup/connect4|6`): capture outbound connections
//!   of enrolled workloads (redirect to the node proxy, or mark them direct);
//! - `mesh_sockops` (`sockops`): on ESTABLISHED, record the flow and put both local ends
//!   of a captured connection in `SOCKHASH`;
//! - `mesh_sk_msg` (`sk_msg` on `SOCKHASH`): hand each send straight to the peer socket;
//! - `mesh_relay_back` (`sk_skb` stream verdict on `RELAY_UP`, `--kernel-relay egress`):
//!   the destination's bytes at the proxy's leg go onto the proxy's client socket;
//! - `mesh_sock_netns` (`cgroup/sock_create`, attached below 5.15 only): stamp each TCP
//!   socket with its network namespace, for sockops' flow keys;
//! - `mesh_tc_ingress` (TC ingress on each capturing pod's interface): assign new inbound
//!   connections to the agent's listener inside the pod (`bpf_sk_assign`);
//! - `mesh_close_unread` (`tp_btf/inet_sock_set_state`, 6.9+): note a paired socket closed with
//!   redirected bytes unread, for the proxy to reset the other side (`close`).
//!
//! Each family logs its decisions through aya-log when the agent turns the log on (`log`).
//!
//! The split into one binary (rather than one per family as aya-template suggests) is
//! deliberate: sockops and sk_msg must share `SOCKHASH`, and connect and sockops must share
//! `SOCK_STATE`; one object gives one set of maps without pin-by-name plumbing.
#![no_std]
#![no_main]
// The kernel side is the one crate where `unsafe` is the norm (raw contexts, helpers).
#![expect(
    unsafe_code,
    reason = "raw program contexts, map values and helpers are unsafe by nature"
)]

mod close;
mod connect;
mod log;
mod maps;
mod sk_msg;
mod sk_skb;
mod sock_netns;
mod sockops;
mod tc;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects the loop below, so any
    // reachable panic shows up as a load failure in the "load every program" test.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
