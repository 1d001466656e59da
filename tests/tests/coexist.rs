//! Coexistence with the node's own service load balancing (issue 14, item 6;
//! docs/coexistence.md): kube-proxy's DNAT on packets, and a CNI's socket-level load
//! balancer (Cilium's `cgroup/connect4` "socket LB") attached next to ours.
//!
//! kube-proxy is simulated by real nftables DNAT rules inside the simulated node's network
//! namespace (the agent itself adds none). The socket load balancer is simulated by two
//! small BPF programs this test assembles and loads itself with bpf(2), attached with
//! `BPF_F_ALLOW_MULTI` where Cilium would attach them: `connect4` rewrites a service
//! address to a backend and remembers the service per socket cookie, `getpeername4` shows
//! the service address again when the socket's peer is that backend (Cilium's
//! `cilium_lb4_reverse_sk`). Which of the two `connect4` programs runs first is the
//! kernel's effective-program order, and everything else follows from it.

#![expect(
    unsafe_code,
    reason = "bpf(2): the simulated socket load balancer is loaded and attached by hand"
)]

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_tests::{
    cluster::{ClusterNode, NodeAgent, SimCluster},
    firewall_rules, sh,
};
use serde_json::{json, Value};

/// A minimal socket-level service load balancer, as Cilium's socket LB works: raw BPF
/// instructions, loaded through bpf(2).
mod socklb {
    use std::{
        io,
        net::Ipv4Addr,
        os::fd::{AsRawFd, FromRawFd, OwnedFd},
        path::Path,
    };

    // bpf(2) commands, program and map types, attach types and flags (uapi/linux/bpf.h).
    const BPF_MAP_CREATE: i32 = 0;
    const BPF_PROG_LOAD: i32 = 5;
    const BPF_PROG_ATTACH: i32 = 8;
    const BPF_PROG_DETACH: i32 = 9;
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
    const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
    const BPF_CGROUP_INET4_CONNECT: u32 = 10;
    const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;
    const BPF_F_ALLOW_MULTI: u32 = 1 << 1;
    /// With no relative program: before every program of the cgroup (6.17+: the cgroup
    /// "mprog" ordering API).
    const BPF_F_BEFORE: u32 = 1 << 3;
    const BPF_PSEUDO_MAP_FD: u8 = 1;
    // Helpers.
    const MAP_LOOKUP_ELEM: i32 = 1;
    const MAP_UPDATE_ELEM: i32 = 2;
    const GET_SOCKET_COOKIE: i32 = 46;
    // `struct bpf_sock_addr` offsets: user_ip4 and user_port (both network order).
    const USER_IP4: i16 = 4;
    const USER_PORT: i16 = 24;

    /// One `struct bpf_insn`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Insn {
        code: u8,
        regs: u8,
        off: i16,
        imm: i32,
    }

    fn ins(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        Insn {
            code,
            regs: dst | (src << 4),
            off,
            imm,
        }
    }
    fn mov_x(dst: u8, src: u8) -> Insn {
        ins(0xbf, dst, src, 0, 0)
    }
    fn mov_k(dst: u8, imm: i32) -> Insn {
        ins(0xb7, dst, 0, 0, imm)
    }
    fn add_k(dst: u8, imm: i32) -> Insn {
        ins(0x07, dst, 0, 0, imm)
    }
    fn ldx_w(dst: u8, src: u8, off: i16) -> Insn {
        ins(0x61, dst, src, off, 0)
    }
    fn stx_w(dst: u8, off: i16, src: u8) -> Insn {
        ins(0x63, dst, src, off, 0)
    }
    fn stx_dw(dst: u8, off: i16, src: u8) -> Insn {
        ins(0x7b, dst, src, off, 0)
    }
    fn st_w(dst: u8, off: i16, imm: i32) -> Insn {
        ins(0x62, dst, 0, off, imm)
    }
    /// `if (u32)dst != imm goto +off` (JMP32: a 32-bit compare, no sign extension).
    fn jne32_k(dst: u8, imm: i32, off: i16) -> Insn {
        ins(0x56, dst, 0, off, imm)
    }
    /// `if (u32)dst != (u32)src goto +off`.
    fn jne32_x(dst: u8, src: u8, off: i16) -> Insn {
        ins(0x5e, dst, src, off, 0)
    }
    fn jeq_k(dst: u8, imm: i32, off: i16) -> Insn {
        ins(0x15, dst, 0, off, imm)
    }
    fn ja(off: i16) -> Insn {
        ins(0x05, 0, 0, off, 0)
    }
    fn call(helper: i32) -> Insn {
        ins(0x85, 0, 0, 0, helper)
    }
    fn exit() -> Insn {
        ins(0x95, 0, 0, 0, 0)
    }
    /// `dst = map` (two instructions: a 64-bit immediate naming the map by fd).
    fn ld_map(dst: u8, fd: i32) -> [Insn; 2] {
        [ins(0x18, dst, BPF_PSEUDO_MAP_FD, 0, fd), ins(0, 0, 0, 0, 0)]
    }

    /// The bpf(2) attribute union, zeroed past the fields a command uses.
    #[repr(C, align(8))]
    struct Attr([u8; 128]);

    impl Attr {
        fn new() -> Attr {
            Attr([0; 128])
        }
        fn u32(&mut self, at: usize, v: u32) -> &mut Attr {
            self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
            self
        }
        fn u64(&mut self, at: usize, v: u64) -> &mut Attr {
            self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
            self
        }
        fn name(&mut self, at: usize, name: &str) -> &mut Attr {
            self.0[at..at + name.len()].copy_from_slice(name.as_bytes());
            self
        }
    }

    fn bpf(cmd: i32, attr: &mut Attr, what: &str) -> io::Result<i64> {
        // SAFETY: `attr` is a valid, writable buffer of the length given; pointers inside
        // it (instructions, license, log) point at live buffers of the caller.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr.0.as_mut_ptr(),
                std::mem::size_of::<Attr>(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("bpf({what}): {e}")));
        }
        Ok(r)
    }

    fn fd(r: i64) -> OwnedFd {
        // SAFETY: a new file descriptor bpf(2) just returned to us, owned by no one else.
        unsafe { OwnedFd::from_raw_fd(r as i32) }
    }

    /// A service address and the one backend the load balancer sends it to.
    #[derive(Clone, Copy, Debug)]
    pub struct Service {
        pub vip: Ipv4Addr,
        pub port: u16,
        pub backend: Ipv4Addr,
        pub backend_port: u16,
    }

    /// An address as `struct bpf_sock_addr` holds it (network order), read as a u32.
    fn ip(a: Ipv4Addr) -> i32 {
        u32::from_ne_bytes(a.octets()) as i32
    }
    /// A port as `user_port` holds it: network order in the low 16 bits.
    fn port(p: u16) -> i32 {
        i32::from(p.to_be())
    }

    /// The two programs and their map (socket cookie -> service and backend).
    pub struct SockLb {
        connect4: OwnedFd,
        peername4: OwnedFd,
        _map: OwnedFd,
    }

    fn load(name: &str, attach: u32, insns: &[Insn]) -> io::Result<OwnedFd> {
        let license = b"GPL\0";
        let mut log = vec![0u8; 64 * 1024];
        let mut a = Attr::new();
        a.u32(0, BPF_PROG_TYPE_CGROUP_SOCK_ADDR)
            .u32(4, insns.len() as u32)
            .u64(8, insns.as_ptr() as u64)
            .u64(16, license.as_ptr() as u64)
            .u32(24, 1)
            .u32(28, log.len() as u32)
            .u64(32, log.as_mut_ptr() as u64)
            .name(48, name)
            .u32(68, attach);
        bpf(BPF_PROG_LOAD, &mut a, name).map(fd).map_err(|e| {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            io::Error::new(
                e.kind(),
                format!(
                    "{e}; verifier log:\n{}",
                    String::from_utf8_lossy(&log[..end])
                ),
            )
        })
    }

    impl SockLb {
        /// Loads the programs for `services` (not attached anywhere yet).
        pub fn load(services: &[Service]) -> io::Result<SockLb> {
            let mut a = Attr::new();
            a.u32(0, BPF_MAP_TYPE_LRU_HASH)
                .u32(4, 8)
                .u32(8, 16)
                .u32(12, 1024)
                .name(28, "sim_lb_rev_sk");
            let map = fd(bpf(BPF_MAP_CREATE, &mut a, "map create")?);
            let m = map.as_raw_fd();

            // connect4: r6 = ctx; r2 = dst ip; r3 = dst port. For each service: on a
            // match rewrite to the backend and stage the value (vip, port, backend, port)
            // at r10-24, then record it under the socket's cookie (r10-8).
            let mut p = vec![mov_x(6, 1), ldx_w(2, 6, USER_IP4), ldx_w(3, 6, USER_PORT)];
            let mut to_record = Vec::new();
            for s in services {
                p.extend([
                    jne32_k(2, ip(s.vip), 10),
                    jne32_k(3, port(s.port), 9),
                    mov_k(4, ip(s.backend)),
                    stx_w(6, USER_IP4, 4),
                    mov_k(4, port(s.backend_port)),
                    stx_w(6, USER_PORT, 4),
                    st_w(10, -24, ip(s.vip)),
                    st_w(10, -20, port(s.port)),
                    st_w(10, -16, ip(s.backend)),
                    st_w(10, -12, port(s.backend_port)),
                ]);
                to_record.push(p.len());
                p.push(ja(0));
            }
            let to_out = p.len();
            p.push(ja(0));
            let record = p.len();
            p.extend([mov_x(1, 6), call(GET_SOCKET_COOKIE), stx_dw(10, -8, 0)]);
            p.extend(ld_map(1, m));
            p.extend([
                mov_x(2, 10),
                add_k(2, -8),
                mov_x(3, 10),
                add_k(3, -24),
                mov_k(4, 0),
                call(MAP_UPDATE_ELEM),
            ]);
            let out = p.len();
            p.extend([mov_k(0, 1), exit()]);
            for j in to_record {
                p[j].off = (record - j - 1) as i16;
            }
            p[to_out].off = (out - to_out - 1) as i16;
            let connect4 = load("sim_sock4_conn", BPF_CGROUP_INET4_CONNECT, &p)?;

            // getpeername4: if this socket's cookie has a record and its peer is the
            // recorded backend, report the service address instead.
            let mut p = vec![mov_x(6, 1), call(GET_SOCKET_COOKIE), stx_dw(10, -8, 0)];
            p.extend(ld_map(1, m));
            p.extend([mov_x(2, 10), add_k(2, -8), call(MAP_LOOKUP_ELEM)]);
            p.extend([
                jeq_k(0, 0, 11),
                mov_x(7, 0),
                ldx_w(2, 6, USER_IP4),
                ldx_w(3, 7, 8),
                jne32_x(2, 3, 7),
                ldx_w(2, 6, USER_PORT),
                ldx_w(3, 7, 12),
                jne32_x(2, 3, 4),
                ldx_w(4, 7, 0),
                stx_w(6, USER_IP4, 4),
                ldx_w(4, 7, 4),
                stx_w(6, USER_PORT, 4),
                mov_k(0, 1),
                exit(),
            ]);
            let peername4 = load("sim_sock4_peer", BPF_CGROUP_INET4_GETPEERNAME, &p)?;
            Ok(SockLb {
                connect4,
                peername4,
                _map: map,
            })
        }

        /// Attaches both programs to `cgroup` with `BPF_F_ALLOW_MULTI` (appended to its
        /// list, as a second agent attaching later does); detached when the returned
        /// value is dropped.
        pub fn attach(&self, cgroup: &Path) -> io::Result<Attached> {
            self.attach_with(cgroup, BPF_F_ALLOW_MULTI)
        }

        /// `attach`, but first in the cgroup's list (`BPF_F_BEFORE` without a relative
        /// program), whatever was attached before.
        pub fn attach_first(&self, cgroup: &Path) -> io::Result<Attached> {
            self.attach_with(cgroup, BPF_F_ALLOW_MULTI | BPF_F_BEFORE)
        }

        fn attach_with(&self, cgroup: &Path, flags: u32) -> io::Result<Attached> {
            // Dropped on an error half-way: what was attached is detached again.
            let mut att = Attached {
                dir: std::fs::File::open(cgroup)?,
                progs: Vec::new(),
            };
            for (prog, kind) in [
                (&self.connect4, BPF_CGROUP_INET4_CONNECT),
                (&self.peername4, BPF_CGROUP_INET4_GETPEERNAME),
            ] {
                let mut a = Attr::new();
                a.u32(0, att.dir.as_raw_fd() as u32)
                    .u32(4, prog.as_raw_fd() as u32)
                    .u32(8, kind)
                    .u32(12, flags);
                bpf(BPF_PROG_ATTACH, &mut a, "prog attach")?;
                att.progs.push((prog.try_clone()?, kind));
            }
            Ok(att)
        }
    }

    /// Both programs attached to one cgroup.
    pub struct Attached {
        dir: std::fs::File,
        progs: Vec<(OwnedFd, u32)>,
    }

    impl Drop for Attached {
        fn drop(&mut self) {
            for (prog, kind) in &self.progs {
                let mut a = Attr::new();
                a.u32(0, self.dir.as_raw_fd() as u32)
                    .u32(4, prog.as_raw_fd() as u32)
                    .u32(8, *kind);
                // The cgroup may be gone already (its programs went with it).
                let _ = bpf(BPF_PROG_DETACH, &mut a, "prog detach");
            }
        }
    }
}

use socklb::{Service, SockLb};

/// The pods of node 0: `client` (namespace `shop`, enrolled), `legacy` (not enrolled),
/// `v1` and `v2` (HTTP on 8080, answering with their names), `db` (echo on 9000),
/// `locked` (HTTP on 8080; namespace `secure`, enrolled, closed to `shop` by policy).
fn cluster() -> SimCluster {
    let mut c = SimCluster::new(1).expect("sim cluster");
    for (name, host) in [
        ("client", 2),
        ("legacy", 3),
        ("v1", 4),
        ("v2", 5),
        ("db", 6),
        ("locked", 7),
    ] {
        c.add_pod(0, name, host).unwrap();
    }
    c.node(0).write_config(&config(&c)).unwrap();
    c
}

/// `reviews` (vip(10):80, Kubernetes endpoints: v1) has a mesh route that sends every
/// request to `reviews-v2` and marks it `x-mesh: shifted`: a request that went through
/// the mesh's service routing lands on v2, one that bypassed it lands on v1. `db`
/// (vip(20):5432) is known to the node's load balancer only, not to the mesh. `vault`
/// (vip(12):80, the `locked` pod) is closed to namespace `shop` by an AuthorizationPolicy
/// on the destination workload.
fn config(c: &SimCluster) -> String {
    let mut yaml = "namespaces:\n\
         \x20 - { name: shop, labels: { mesh-agent.io/dataplane-mode: ambient } }\n\
         \x20 - { name: legacy }\n\
         \x20 - { name: backend }\n\
         \x20 - { name: secure, labels: { mesh-agent.io/dataplane-mode: ambient } }\n\
         workloads:\n"
        .to_owned();
    for (pod, ns, labels) in [
        ("client", "shop", "{}"),
        ("legacy", "legacy", "{}"),
        ("v1", "backend", "{ app: reviews, version: v1 }"),
        ("v2", "backend", "{ app: reviews, version: v2 }"),
        ("db", "backend", "{ app: db }"),
        ("locked", "secure", "{ app: vault }"),
    ] {
        let p = c.pod(pod);
        yaml += &format!(
            "  - {{ name: {pod}, namespace: {ns}, ip: {}, netns: {}, node: {}, labels: {labels} }}\n",
            p.ip,
            p.netns_path(),
            c.node(0).name()
        );
    }
    yaml += &format!(
        "services:\n\
         \x20 - name: reviews\n\
         \x20   namespace: backend\n\
         \x20   vip: {}\n\
         \x20   ports: [ {{ port: 80, target_port: 8080, protocol: http }} ]\n\
         \x20   selector: {{ version: v1 }}\n\
         \x20   routes:\n\
         \x20     - name: shift\n\
         \x20       backends: [ {{ service: reviews-v2 }} ]\n\
         \x20       request_headers: {{ add: {{ x-mesh: shifted }} }}\n\
         \x20 - name: reviews-v2\n\
         \x20   namespace: backend\n\
         \x20   vip: {}\n\
         \x20   ports: [ {{ port: 80, target_port: 8080, protocol: http }} ]\n\
         \x20   selector: {{ version: v2 }}\n\
         \x20 - name: vault\n\
         \x20   namespace: secure\n\
         \x20   vip: {}\n\
         \x20   ports: [ {{ port: 80, target_port: 8080, protocol: http }} ]\n\
         \x20   selector: {{ app: vault }}\n\
         authorization_policies:\n\
         \x20 - metadata: {{ name: deny-shop, namespace: secure }}\n\
         \x20   spec:\n\
         \x20     selector: {{ matchLabels: {{ app: vault }} }}\n\
         \x20     action: DENY\n\
         \x20     rules: [ {{ from: [ {{ source: {{ namespaces: [ shop ] }} }} ] }} ]\n",
        c.vip(10),
        c.vip(11),
        c.vip(12)
    );
    yaml
}

/// What the node's load balancer (kube-proxy's rules, the socket LB) does with services.
fn node_services(c: &SimCluster) -> [Service; 3] {
    [
        Service {
            vip: c.vip(10),
            port: 80,
            backend: c.pod("v1").ip,
            backend_port: 8080,
        },
        Service {
            vip: c.vip(20),
            port: 5432,
            backend: c.pod("db").ip,
            backend_port: 9000,
        },
        Service {
            vip: c.vip(12),
            port: 80,
            backend: c.pod("locked").ip,
            backend_port: 8080,
        },
    ]
}

fn serve(n: &ClusterNode) {
    for v in ["v1", "v2", "locked"] {
        n.serve(v, &["http", "--listen", "0.0.0.0:8080", "--name", v])
            .unwrap();
    }
    n.serve("db", &["echo", "--listen", "0.0.0.0:9000"])
        .unwrap();
}

fn reviews(c: &SimCluster) -> String {
    format!("{}:80", c.vip(10))
}
fn db(c: &SimCluster) -> String {
    format!("{}:5432", c.vip(20))
}
fn vault(c: &SimCluster) -> String {
    format!("{}:80", c.vip(12))
}

/// One GET from `client` to the `vault` service and the access-log line of its denial
/// (after the first `seen` lines); the client's summary and that line.
fn denied(n: &ClusterNode, c: &SimCluster, log: &Path) -> (Value, Value) {
    let seen = log_lines(log).len();
    let r = n
        .client(
            "client",
            &["http-client", "--to", &vault(c), "--deadline-ms", "10000"],
        )
        .unwrap();
    let l = new_lines(log, seen, 1, &format!("the denial's line ({r})"), |l| {
        l["policy_verdict"] == "deny"
    });
    (r, l[0].clone())
}

/// Ten GETs on one connection from `pod`; the client's summary.
fn get(n: &ClusterNode, pod: &str, to: &str) -> Value {
    let r = n
        .client(
            pod,
            &[
                "http-client",
                "--to",
                to,
                "--requests",
                "10",
                "--deadline-ms",
                "10000",
            ],
        )
        .unwrap();
    assert_eq!(r["errors"], json!([]), "{pod} -> {to}: {r}");
    r
}

/// The peer address `getpeername()` reports in `pod` for a connection to `to`.
fn peer(n: &ClusterNode, pod: &str, to: &str) -> String {
    let r = n.client(pod, &["peer", "--to", to]).unwrap();
    r["peer"]
        .as_str()
        .unwrap_or_else(|| panic!("{r}"))
        .to_owned()
}

/// The access log's lines, parsed.
fn log_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Waits for `want` access-log lines after the first `seen` that match `f` (the writer
/// thread batches lines, so some may land after the first), then returns every match.
fn new_lines(
    path: &Path,
    seen: usize,
    want: usize,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let lines: Vec<Value> = log_lines(path).into_iter().skip(seen).collect();
        let found: Vec<Value> = lines.iter().filter(|l| f(l)).cloned().collect();
        if found.len() >= want {
            return found;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}; new lines: {lines:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start(n: &ClusterNode, log: &Path) -> NodeAgent {
    let _ = std::fs::remove_file(log);
    n.start_agent(&["--access-log", log.to_str().unwrap()])
        .unwrap()
}

fn access_log(n: &ClusterNode) -> PathBuf {
    n.dir.join("access.log")
}

/// The access-log line `l` names the client pod as the source: the proxy judges policy on
/// it, so a wrong source is a policy bypass, not a cosmetic error.
fn assert_from_client(c: &SimCluster, l: &Value) {
    let client = c.pod("client").ip;
    let source = l["source_address"].as_str().unwrap_or_default();
    assert!(
        source.starts_with(&format!("{client}:")),
        "the proxy took the connection from {client} for one from {source}: {l}"
    );
    assert_eq!(l["source_workload"], "shop/client", "{l}");
}

/// A packet counter of the simulated kube-proxy's rule tagged `comment`.
fn nft_packets(netns: &str, comment: &str) -> u64 {
    let text = sh(&format!(
        "ip netns exec {netns} nft list table ip kubeproxy-sim"
    ))
    .unwrap();
    let line = text
        .lines()
        .find(|l| l.contains(&format!("comment \"{comment}\"")))
        .unwrap_or_else(|| panic!("no rule {comment}:\n{text}"));
    let after = line.split("counter packets ").nth(1).expect("a counter");
    after.split(' ').next().unwrap().parse().unwrap()
}

/// (a) kube-proxy (nftables mode, same hooks as iptables mode) on the node: its DNAT acts
/// on packets after `connect()`, so our hook sees the service address first and the node
/// never DNATs a captured connection; the proxy's own connections to pod addresses pass
/// the rules untouched, to an address only kube-proxy knows they are DNATed as any
/// host-network client's; pods that are not enrolled still go through kube-proxy.
#[test]
fn kube_proxy_dnat_sees_only_what_the_mesh_leaves_alone() {
    let c = cluster();
    let n = c.node(0);
    let ns = &n.netns;
    // kube-proxy's service rules, in the two nat hooks it uses: PREROUTING for packets of
    // pods (and from outside), OUTPUT for the node's own connections.
    let mut rules = String::from("table ip kubeproxy-sim {\n");
    for (chain, hook, priority, tag) in [
        ("prerouting", "prerouting", "dstnat", "pre"),
        ("output", "output", "-100", "out"),
    ] {
        rules +=
            &format!("chain {chain} {{ type nat hook {hook} priority {priority}; policy accept;\n");
        for (name, s) in ["reviews", "db", "vault"].iter().zip(node_services(&c)) {
            rules += &format!(
                "ip daddr {} tcp dport {} counter dnat to {}:{} comment \"{name}-{tag}\"\n",
                s.vip, s.port, s.backend, s.backend_port
            );
        }
        rules += "}\n";
    }
    // Without br_netfilter a pod's reply to a pod on the same bridge would skip the
    // node's conntrack: masquerade DNATed connections (kube-proxy's --masquerade-all).
    rules += "chain postrouting { type nat hook postrouting priority srcnat; policy accept;\n\
              ct status dnat counter masquerade comment \"masq\"\n}\n}\n";
    let file = n.dir.join("kubeproxy.nft");
    std::fs::write(&file, rules).unwrap();
    sh(&format!("ip netns exec {ns} nft -f {}", file.display())).unwrap();
    // The node reaches the service range by its default route on a real node.
    sh(&format!("ip -n {ns} route add {}/24 dev eth0", c.vip(0))).unwrap();

    let log = access_log(n);
    let agent = start(n, &log);
    serve(n);

    // The enrolled pod: the mesh routes the service (all to v2) and the proxy dials v2's
    // pod address, which no rule touches.
    let seen = log_lines(&log).len();
    let r = get(n, "client", &reviews(&c));
    assert_eq!(r["bodies"], json!({ "v2": 10 }), "{r}");
    assert_eq!(r["seen_mesh"], json!({ "shifted": 10 }), "{r}");
    for rule in ["reviews-pre", "reviews-out"] {
        assert_eq!(nft_packets(ns, rule), 0, "{rule} saw a captured connection");
    }
    let lines = new_lines(&log, seen, 10, "the requests' lines", |l| l["path"] == "/");
    assert_eq!(lines.len(), 10, "{lines:#?}");
    let v2 = format!("{}:8080", c.pod("v2").ip);
    for l in &lines {
        assert_from_client(&c, l);
        assert_eq!(l["destination_address"], reviews(&c), "{l}");
        assert_eq!(l["upstream_host"], v2, "{l}");
    }
    // The redirect is invisible: the application's peer is the service address.
    assert_eq!(peer(n, "client", &reviews(&c)), reviews(&c));

    // A pod that is not enrolled: kube-proxy's DNAT, Kubernetes' endpoint (v1).
    let r = get(n, "legacy", &reviews(&c));
    assert_eq!(r["bodies"], json!({ "v1": 10 }), "{r}");
    assert_eq!(r["seen_mesh"], json!({ "-": 10 }), "{r}");
    assert!(nft_packets(ns, "reviews-pre") > 0);

    // A service the mesh does not know: the proxy dials the address the pod dialled, from
    // the node's namespace, where kube-proxy's OUTPUT rule DNATs it like any host-network
    // client's connection. Our hook redirected one connection (the pod's), not the
    // proxy's own.
    let redirected = agent.stat("connect_redirected");
    let seen = log_lines(&log).len();
    let r = n.echo_once("client", &db(&c)).unwrap();
    assert!(mesh_tests::intact(&r), "{r}");
    assert_eq!(agent.stat("connect_redirected") - redirected, 1);
    assert!(
        nft_packets(ns, "db-out") > 0,
        "the proxy's dial was not DNATed"
    );
    assert_eq!(nft_packets(ns, "db-pre"), 0);
    let l = &new_lines(&log, seen, 1, "the db line", |l| l["protocol"] == "TCP")[0];
    assert_eq!(l["destination_address"], db(&c), "{l}");
    assert_eq!(l["upstream_host"], db(&c), "{l}");
    assert_eq!(l["bytes_received"], 4096, "{l}");

    assert!(!agent.log_text().contains(AHEAD), "{}", agent.log_text());
    // The agent added nothing: the only ruleset anywhere in the cluster is ours.
    let all = firewall_rules(&c.all_netns());
    assert!(
        all.iter().all(|r| r.contains("kubeproxy-sim")),
        "rules the test did not make: {all:#?}"
    );
}

/// The agent's start-up warning about a `connect4` program that runs before its own.
const AHEAD: &str = "runs before mesh_connect4";

/// Names of the `connect4` programs that run for sockets of `cgroup`, in the kernel's
/// run order (`bpftool cgroup show ... effective`: descendants' programs first, each
/// cgroup's in attach order).
fn connect4_order(cgroup: &Path) -> Vec<String> {
    let out = sh(&format!(
        "bpftool cgroup show {} effective -j",
        cgroup.display()
    ))
    .unwrap();
    let v: Value = serde_json::from_str(out.trim()).unwrap_or(json!([]));
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p["attach_type"]
                .as_str()
                .is_some_and(|t| t.contains("connect4") || t.contains("inet4_connect"))
        })
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect()
}

/// (b) A Cilium-like socket load balancer next to our capture. Both `connect4` programs
/// run on every `connect()`, each seeing what the one before it wrote, in the kernel's
/// order: the descendant cgroup's programs first, then each ancestor's, each cgroup's in
/// attach order. Whoever runs first sees the service address.
#[test]
fn a_socket_load_balancer_translates_first_only_when_it_runs_first() {
    let c = cluster();
    let n = c.node(0);
    let lb = SockLb::load(&node_services(&c)).expect("load the simulated socket LB");
    let v1 = format!("{}:8080", c.pod("v1").ip);
    let v2 = format!("{}:8080", c.pod("v2").ip);
    let locked = format!("{}:8080", c.pod("locked").ip);
    let client_cg = c.pod("client").cgroup.clone();
    let log = access_log(n);

    // 1. Same cgroup, the load balancer attached first (the CNI started before the
    //    agent): it runs first. The pod's connection is already v1's when our hook sees
    //    it; the proxy still carries it (its policy is the destination workload's), but
    //    the original destination it recovers is v1, so the service's routes never apply.
    let first = lb.attach(&n.cgroup).expect("attach");
    let agent = start(n, &log);
    serve(n);
    assert_eq!(
        connect4_order(&client_cg),
        ["sim_sock4_conn", "mesh_connect4"]
    );
    // The agent says so at start-up.
    let text = agent.log_text();
    assert!(
        text.lines()
            .any(|l| l.contains(AHEAD) && l.contains("sim_sock4_conn")),
        "{text}"
    );
    let seen = log_lines(&log).len();
    let r = get(n, "client", &reviews(&c));
    assert_eq!(r["bodies"], json!({ "v1": 10 }), "{r}");
    assert_eq!(r["seen_mesh"], json!({ "-": 10 }), "{r}");
    let l = &new_lines(&log, seen, 1, "the relayed connection", |l| {
        l["protocol"] == "TCP"
    })[0];
    assert_from_client(&c, l);
    assert_eq!(l["destination_address"], v1, "{l}");
    assert_eq!(l["upstream_host"], v1, "{l}");
    assert!(l["destination_service"].is_null(), "{l}");
    // getpeername: the load balancer's hook runs first too and finds the proxy's address
    // (not its backend) as the peer; ours then reports the destination it recorded, v1.
    assert_eq!(peer(n, "client", &reviews(&c)), v1);
    // Policy lives on the destination workload, so it holds whichever address the proxy
    // recovers; translated first, the connection is judged as TCP to the pod (a reset)
    // instead of HTTP to the service (a 403).
    let (r, l) = denied(n, &c, &log);
    assert_ne!(r["errors"], json!([]), "{r}");
    assert_eq!(l["destination_address"], locked, "{l}");
    assert_eq!(l["protocol"], "TCP", "{l}");
    assert_eq!(l["response_flags"], "RBAC", "{l}");
    assert_eq!(l["policy_name"], "secure/deny-shop", "{l}");

    // 2. Same cgroup, attached after the agent: ours runs first and sees the service
    //    address; the load balancer then sees the proxy's address and leaves it. The
    //    proxy routes by the service (all to v2) and dials v2's pod address, which the
    //    load balancer (it covers the agent's own sockets, as Cilium's host-namespace
    //    socket LB does) leaves alone.
    drop(first);
    let second = lb.attach(&n.cgroup).expect("attach");
    assert_eq!(
        connect4_order(&client_cg),
        ["mesh_connect4", "sim_sock4_conn"]
    );
    let seen = log_lines(&log).len();
    let r = get(n, "client", &reviews(&c));
    assert_eq!(r["bodies"], json!({ "v2": 10 }), "{r}");
    assert_eq!(r["seen_mesh"], json!({ "shifted": 10 }), "{r}");
    let lines = new_lines(&log, seen, 10, "the requests' lines", |l| l["path"] == "/");
    for l in &lines {
        assert_from_client(&c, l);
        assert_eq!(l["destination_address"], reviews(&c), "{l}");
        assert_eq!(l["upstream_host"], v2, "{l}");
    }
    assert_eq!(peer(n, "client", &reviews(&c)), reviews(&c));
    let (r, l) = denied(n, &c, &log);
    assert_eq!(r["status"], json!({ "403": 1 }), "{r}");
    assert_eq!(l["destination_address"], vault(&c), "{l}");
    assert_eq!(l["upstream_host"], locked, "{l}");
    // A service only the load balancer knows: the proxy dials the service address and
    // the load balancer translates the proxy's connection (host-network socket LB; the
    // node has no route to the service range, so only the translation delivers it).
    let redirected = agent.stat("connect_redirected");
    let seen = log_lines(&log).len();
    let r = n.echo_once("client", &db(&c)).unwrap();
    assert!(mesh_tests::intact(&r), "{r}");
    assert_eq!(agent.stat("connect_redirected") - redirected, 1);
    let l = &new_lines(&log, seen, 1, "the db line", |l| l["protocol"] == "TCP")[0];
    assert_eq!(l["destination_address"], db(&c), "{l}");
    assert_eq!(l["upstream_host"], db(&c), "{l}");

    // 3. Attached at a descendant (the pod's own cgroup), after the agent: descendants
    //    run first, whatever the attach order, so the load balancer translates first
    //    again.
    drop(second);
    let pod_level = lb.attach(&client_cg).expect("attach");
    assert_eq!(
        connect4_order(&client_cg),
        ["sim_sock4_conn", "mesh_connect4"]
    );
    let r = get(n, "client", &reviews(&c));
    assert_eq!(r["bodies"], json!({ "v1": 10 }), "{r}");
    assert_eq!(peer(n, "client", &reviews(&c)), v1);

    // 4. Same cgroup, attached after the agent but with `BPF_F_BEFORE` (first in the
    //    list): attach order no longer decides, whoever asks to be first is.
    drop(pod_level);
    let _jumped = lb
        .attach_first(&n.cgroup)
        .expect("attach with BPF_F_BEFORE");
    assert_eq!(
        connect4_order(&client_cg),
        ["sim_sock4_conn", "mesh_connect4"]
    );
    let r = get(n, "client", &reviews(&c));
    assert_eq!(r["bodies"], json!({ "v1": 10 }), "{r}");
    drop(agent);
}

/// (b) The load balancer at an ancestor of the cgroup our programs are attached to
/// (Cilium at the cgroup root, the agent at a pod subtree): attached before the agent, it
/// still runs after ours, because a descendant's programs run first.
#[test]
fn a_socket_load_balancer_at_an_ancestor_runs_after_the_capture() {
    let c = cluster();
    let n = c.node(0);
    let lb = SockLb::load(&node_services(&c)).expect("load the simulated socket LB");
    let client_cg = c.pod("client").cgroup.clone();
    let _ancestor = lb.attach(&n.cgroup).expect("attach");
    let log = access_log(n);
    let _ = std::fs::remove_file(&log);
    // The agent's programs on the client pod's cgroup only (the agent's process stays in
    // the node's cgroup, so its sockets pass only the load balancer).
    let agent = n
        .start_agent(&[
            "--access-log",
            log.to_str().unwrap(),
            "--cgroup",
            client_cg.to_str().unwrap(),
        ])
        .unwrap();
    serve(n);
    assert_eq!(
        connect4_order(&client_cg),
        ["mesh_connect4", "sim_sock4_conn"]
    );
    assert!(!agent.log_text().contains(AHEAD), "{}", agent.log_text());
    let r = get(n, "client", &reviews(&c));
    assert_eq!(r["bodies"], json!({ "v2": 10 }), "{r}");
    assert_eq!(r["seen_mesh"], json!({ "shifted": 10 }), "{r}");
    assert_eq!(peer(n, "client", &reviews(&c)), reviews(&c));
    // Not enrolled and outside our subtree: the load balancer alone.
    let r = get(n, "legacy", &reviews(&c));
    assert_eq!(r["bodies"], json!({ "v1": 10 }), "{r}");
    assert_eq!(
        peer(n, "legacy", &reviews(&c)),
        reviews(&c),
        "the load balancer's own getpeername"
    );
    drop(agent);
}

/// (a) kube-proxy in IPVS mode binds every service address to the dummy interface
/// `kube-ipvs0` on the node, so service addresses are the node's own addresses there. The
/// agent leaves the node's addresses alone (they mean "this host" in the proxy's
/// namespace), except those on `kube-ipvs0`: a service address is still captured and
/// routed by the mesh.
#[test]
fn ipvs_service_addresses_on_the_node_are_still_captured() {
    let c = cluster();
    let n = c.node(0);
    let ns = &n.netns;
    // kube-proxy makes it a dummy interface; this kernel may lack the dummy driver, and a
    // (portless, down) bridge holds addresses the same way.
    sh(&format!(
        "ip -n {ns} link add kube-ipvs0 type bridge && \
         ip -n {ns} addr add {}/32 dev kube-ipvs0 && ip -n {ns} addr add {}/32 dev kube-ipvs0",
        c.vip(10),
        c.vip(11)
    ))
    .unwrap();
    let log = access_log(n);
    let agent = start(n, &log);
    serve(n);
    let r = get(n, "client", &reviews(&c));
    assert_eq!(r["bodies"], json!({ "v2": 10 }), "{r}");
    assert_eq!(r["seen_mesh"], json!({ "shifted": 10 }), "{r}");
    assert_eq!(agent.stat("connect_node_address"), 0);
    assert_eq!(peer(n, "client", &reviews(&c)), reviews(&c));
}
