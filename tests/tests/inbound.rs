//! End-to-end tests of inbound capture: listeners inside each enrolled pod's network
//! namespace, the TC ingress program on its interface, `bpf_sk_assign` steering new
//! connections from outside the mesh to them. Real eBPF, real TCP, the real agent.
#![expect(
    unsafe_code,
    reason = "setns and BPF_PROG_QUERY to see tcx attachments"
)]

use std::time::Duration;

use mesh_tests::flows::echo_intact;
use mesh_tests::{firewall_rules, metric, scenes::inbound_pods, sh, wait_for, SimNode};

const MIB: u64 = 1 << 20;

/// `app` (enrolled): `web`; `legacy` (not enrolled): `outsider` (a client) and `other`
/// (a server). `exclude` lists CIDRs never captured outbound.
fn node() -> SimNode {
    let mut n = SimNode::new().expect("sim node");
    n.add_pod("web", 2).unwrap();
    n.add_pod("outsider", 3).unwrap();
    n.add_pod("other", 4).unwrap();
    n.write_config(&config(&n, true, &[])).unwrap();
    n
}

fn config(n: &SimNode, enrolled: bool, exclude: &[&str]) -> String {
    let label = if enrolled {
        "{ mesh-agent.io/dataplane-mode: ambient }"
    } else {
        "{}"
    };
    let p = |name: &str| n.pod(name);
    let mut y = format!(
        "namespaces:\n  - name: app\n    labels: {label}\n  - name: legacy\n\
         workloads:\n\
         \x20 - {{ name: web, namespace: app, ip: {}, netns: {} }}\n\
         \x20 - {{ name: outsider, namespace: legacy, ip: {}, netns: {} }}\n\
         \x20 - {{ name: other, namespace: legacy, ip: {}, netns: {} }}\n",
        p("web").ip,
        p("web").netns_path(),
        p("outsider").ip,
        p("outsider").netns_path(),
        p("other").ip,
        p("other").netns_path(),
    );
    if !exclude.is_empty() {
        y.push_str("exclude:\n");
        for c in exclude {
            y.push_str(&format!("  - {{ cidr: {c} }}\n"));
        }
    }
    y
}

fn inbound(agent: &mesh_tests::Agent, outcome: &str) -> u64 {
    metric(
        &agent.get("/metrics").unwrap_or_default(),
        "mesh_inbound_connections_total",
        &[("outcome", outcome)],
    )
}

/// Programs on ingress of `eth0` in `netns`, by name: tcx links (`BPF_PROG_QUERY` with
/// `BPF_TCX_INGRESS`, from a thread inside the namespace: bpftool 7.1 lists tcx links
/// without their interface) and clsact filters (`tc filter show`, older kernels).
fn tc_ingress(netns: &str) -> String {
    let mut out: Vec<String> = tcx_ingress_ids(netns)
        .into_iter()
        .map(|id| {
            sh(&format!("bpftool prog show id {id}"))
                .unwrap_or_default()
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    out.push(
        sh(&format!(
            "tc -n {netns} filter show dev eth0 ingress 2>/dev/null"
        ))
        .unwrap_or_default(),
    );
    out.join("\n")
}

fn attached(netns: &str) -> bool {
    tc_ingress(netns).contains("mesh_tc_ingress")
}

/// `BPF_PROG_QUERY` (union bpf_attr, query part).
#[repr(C)]
#[derive(Default)]
struct ProgQuery {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// Ids of the programs attached with tcx to ingress of `eth0` in `netns`.
fn tcx_ingress_ids(netns: &str) -> Vec<u32> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_TCX_INGRESS: u32 = 46;
    let ns = std::fs::File::open(format!("/run/netns/{netns}")).expect("netns");
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a valid fd changes only this short-lived thread's namespace;
        // the query attr is valid for its size and `ids` outlives the call.
        unsafe {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Vec::new();
            }
            let ifindex = libc::if_nametoindex(c"eth0".as_ptr());
            let mut ids = vec![0u32; 16];
            let mut attr = ProgQuery {
                target_ifindex: ifindex,
                attach_type: BPF_TCX_INGRESS,
                prog_ids: ids.as_mut_ptr() as u64,
                prog_cnt: ids.len() as u32,
                ..Default::default()
            };
            let rc = libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_QUERY,
                &mut attr as *mut ProgQuery,
                std::mem::size_of::<ProgQuery>(),
            );
            if rc != 0 {
                return Vec::new();
            }
            ids.truncate(attr.prog_cnt as usize);
            ids
        }
    })
    .join()
    .unwrap_or_default()
}

#[test]
fn inbound_to_an_enrolled_pod_goes_through_the_agent_and_others_do_not() {
    let n = node();
    let (web, outsider, other) = (n.pod("web"), n.pod("outsider"), n.pod("other"));
    let netns = [
        web.netns.as_str(),
        outsider.netns.as_str(),
        other.netns.as_str(),
    ];
    let rules_before = firewall_rules(&netns);
    let mut agent = n.start_agent(&[]).unwrap();
    n.serve("web", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    n.serve("other", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    wait_for("web's inbound capture", Duration::from_secs(10), || {
        inbound_pods(&agent) == 1
    });
    assert!(attached(&web.netns), "{}", tc_ingress(&web.netns));
    assert!(!attached(&other.netns), "{}", tc_ingress(&other.netns));
    assert!(!attached(&outsider.netns));
    let log = agent.log_text();
    let mode = if log.contains("mode=tcx") {
        "tcx"
    } else {
        "clsact"
    };
    eprintln!("inbound TC attach mode: {mode}");

    // Outside the mesh -> enrolled pod: through the agent's in-pod listener, intact.
    let dst = format!("{}:8080", web.ip);
    echo_intact(&n, "outsider", &dst, 4 * MIB);
    let m = agent.get("/metrics").unwrap();
    assert_eq!(inbound(&agent, "accepted"), 1, "{m}");
    assert_eq!(inbound(&agent, "delivered"), 1, "{m}");
    assert_eq!(inbound(&agent, "refused"), 0, "{m}");
    assert!(
        metric(&m, "mesh_inbound_bytes_total", &[("direction", "received")]) >= 4 * MIB,
        "{m}"
    );
    assert!(agent.event("tc_assigned") >= 1, "{m}");
    // And the server keeps answering, connection after connection.
    for _ in 0..3 {
        assert!(mesh_tests::intact(&n.echo_once("outsider", &dst).unwrap()));
    }
    assert_eq!(inbound(&agent, "delivered"), 4);

    // Outside the mesh -> pod not enrolled: not captured.
    echo_intact(&n, "outsider", &format!("{}:8080", other.ip), MIB);
    assert_eq!(inbound(&agent, "accepted"), 4);

    // A port nobody listens on in the pod: the client sees a reset, as without the mesh.
    let r = n
        .echo_once("outsider", &format!("{}:8081", web.ip))
        .unwrap();
    assert!(!mesh_tests::intact(&r), "{r}");
    assert_eq!(inbound(&agent, "refused"), 1);

    assert_eq!(firewall_rules(&netns), rules_before);

    // The agent stops: TC is detached, connections go straight to the pod again.
    let (code, log) = agent.stop();
    assert_eq!(code, Some(0), "{log}");
    assert!(!attached(&web.netns), "{}", tc_ingress(&web.netns));
    echo_intact(&n, "outsider", &dst, MIB);
}

#[test]
fn an_enrolled_pod_still_connects_out_and_leaving_the_mesh_detaches() {
    let n = node();
    let (web, other) = (n.pod("web"), n.pod("other"));
    // `other` is excluded: web's connections to it go direct (not proxied), so the
    // replies reach web from a non-mesh address and must pass the TC program as packets
    // of an established connection.
    let excluded = format!("{}/32", other.ip);
    n.write_config(&config(&n, true, &[&excluded])).unwrap();
    let agent = n.start_agent(&[]).unwrap();
    n.serve("other", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    n.serve("web", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    wait_for("web's inbound capture", Duration::from_secs(10), || {
        attached(&web.netns)
    });

    let established = agent.event("tc_pass_established");
    echo_intact(&n, "web", &format!("{}:8080", other.ip), 4 * MIB);
    assert!(agent.event("tc_pass_established") > established);
    assert_eq!(inbound(&agent, "accepted"), 0);
    // Through the proxy too (the replies come from the node's address).
    n.write_config(&config(&n, true, &[])).unwrap();
    wait_for("exclusion lifted", Duration::from_secs(10), || {
        n.echo_once("web", &format!("{}:8080", other.ip))
            .is_ok_and(|r| mesh_tests::intact(&r))
            && agent.event("connect_redirected") > 0
    });
    // A pod calling itself is left alone by the connect hooks.
    assert!(mesh_tests::intact(
        &n.echo_once("web", &format!("{}:8080", web.ip)).unwrap()
    ));
    assert!(agent.event("connect_self") >= 1);
    assert_eq!(inbound(&agent, "accepted"), 0);

    // The namespace leaves the mesh: listeners closed, TC detached, nothing captured.
    n.write_config(&config(&n, false, &[])).unwrap();
    wait_for("inbound capture off", Duration::from_secs(10), || {
        !attached(&web.netns) && inbound_pods(&agent) == 0
    });
    echo_intact(&n, "outsider", &format!("{}:8080", web.ip), MIB);
    assert_eq!(inbound(&agent, "accepted"), 0);
    // And back in.
    n.write_config(&config(&n, true, &[])).unwrap();
    wait_for("inbound capture on again", Duration::from_secs(10), || {
        attached(&web.netns)
    });
    echo_intact(&n, "outsider", &format!("{}:8080", web.ip), MIB);
    assert_eq!(inbound(&agent, "delivered"), 1);
}

#[test]
fn capture_can_be_turned_off() {
    let n = node();
    let web = n.pod("web");
    let agent = n.start_agent(&["--inbound-capture", "false"]).unwrap();
    n.serve("web", &["echo", "--listen", "0.0.0.0:8080"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(!attached(&web.netns));
    echo_intact(&n, "outsider", &format!("{}:8080", web.ip), MIB);
    assert_eq!(inbound(&agent, "accepted"), 0);
}
