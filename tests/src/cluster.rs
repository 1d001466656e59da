//! The simulated cluster: several nodes, each a network namespace of its own holding an
//! agent, a bridge for its pods and a link to the other nodes, laid out as a routing CNI
//! (Calico, Cilium's native routing) would: one pod range per node, routes between the
//! ranges through the nodes' addresses. Nothing of it lives in the host network
//! namespace, so the addresses below never meet the host's or a `SimNode`'s.
//!
//! Names for cluster index K (claimed by creating the underlay namespace, the lock), node i:
//!
//! | thing | name |
//! |---|---|
//! | underlay netns, its bridge | `mtcK-ul`, `br0`; node i's port on it `n<i>` |
//! | node netns, its underlay address | `mtcK-n<i>`, `eth0` 10.209.K.(i+1)/24 |
//! | node bridge, pod range | `br0` in the node netns, 10.(210+i).K.0/24, gateway .1 |
//! | pod netns, node-side veth | `mtcK-n<i>-<pod>`, `v<j>` in the node netns (pod side `eth0`) |
//! | dual-stack (`SimCluster::new_dual_stack`): node's underlay IPv6 | fd00:209:K::(i+1)/64 on `eth0` |
//! | dual-stack: pod range, gateway, pod | fd00:(210+i):K::/64, `::1` on `br0`, `::<host>` (hex digits of the IPv4 ranges' decimal) |
//! | cgroups | `<cgroup2>/mesh-test-cK-n<i>` (the agent), `.../<pod>` |
//! | pins, files | `/sys/fs/bpf/mesh-test-cK-n<i>`, `/tmp/mesh-test-cK/n<i>/` |
//!
//! Each node's agent runs in its node's netns (entered with `setns`, not `ip netns exec`,
//! which would remount `/sys` and hide bpffs and the cgroup mount) and its node's cgroup,
//! with the agent's own defaults for admin (127.0.0.1:15020), xDS (127.0.0.1:15010) and
//! the proxy on the node's bridge address (:15001; on a dual-stack cluster also
//! `--proxy-redirect6 [IPv6 gateway]:15001`): each netns has its own loopback.
//! `Drop` removes all of it, also when the test fails; see docs/multinode.md.

use std::{
    fs,
    io::Read,
    net::{Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};

use crate::{agent_bin, cgroup2_root, must_be_root, podtool, sh, Agent, Pod};

/// At most this many nodes: their pod ranges are 10.210.K.0/24 .. 10.217.K.0/24.
pub const MAX_NODES: usize = 8;

/// The admin port of every node's agent (the agent's default), inside the node's netns.
pub const ADMIN_PORT: u16 = 15020;

/// A command that runs `program` inside the network namespace file `netns` and the cgroup
/// v2 folder `cgroup` (a pod's process, or a node's agent).
pub fn command_in(program: &Path, netns: &Path, cgroup: &Path) -> Command {
    let ns =
        fs::File::open(netns).unwrap_or_else(|e| panic!("netns file {}: {e}", netns.display()));
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .unwrap_or_else(|e| panic!("{}/cgroup.procs: {e}", cgroup.display()));
    let mut cmd = Command::new(program);
    // SAFETY: only async-signal-safe calls (write, setns) between fork and exec; the fds
    // are owned by the closure and stay open until exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Runs `f` on a thread inside the network namespace file `netns` (sockets it opens
/// belong to that namespace); the caller's thread stays where it is.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> T {
    let ns =
        fs::File::open(netns).unwrap_or_else(|e| panic!("netns file {}: {e}", netns.display()));
    std::thread::scope(|s| {
        let t = s.spawn(move || {
            // SAFETY: setns(2) on a file we own; it changes this thread's namespace only.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        });
        t.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

fn ca_dir_of(index: u8) -> PathBuf {
    std::env::temp_dir()
        .join(format!("mesh-test-c{index}"))
        .join("ca")
}

fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/run/netns/{name}"))
}

pub struct SimCluster {
    pub index: u8,
    /// The netns holding the bridge all nodes are plugged into (the claim on `index`).
    pub underlay: String,
    pub nodes: Vec<ClusterNode>,
    /// Nodes, links and pods have IPv6 addresses too, routed as the IPv4 ones.
    pub dual_stack: bool,
}

impl SimCluster {
    /// Claims a free index and builds `nodes` nodes, linked and routed, with no pods yet.
    pub fn new(nodes: usize) -> Result<SimCluster> {
        SimCluster::build(nodes, false)
    }

    /// `new`, dual-stack: each node's link has an IPv6 address and its pod bridge an IPv6
    /// range, routed between the nodes as the IPv4 ranges are; each pod added later has
    /// an IPv6 address too (`Pod::ip6`), and each agent `--proxy-redirect6`.
    pub fn new_dual_stack(nodes: usize) -> Result<SimCluster> {
        SimCluster::build(nodes, true)
    }

    fn build(nodes: usize, dual_stack: bool) -> Result<SimCluster> {
        must_be_root();
        ensure!(
            (1..=MAX_NODES).contains(&nodes),
            "1..={MAX_NODES} nodes, not {nodes}"
        );
        if sh("stat -f -c %T /sys/fs/bpf")
            .map(|t| t.trim() != "bpf_fs")
            .unwrap_or(true)
        {
            let _ = sh("mount -t bpf bpf /sys/fs/bpf");
        }
        for index in 0..=250u8 {
            let underlay = format!("mtc{index}-ul");
            // `ip netns add` creates /run/netns/NAME exclusively: the name is the lock.
            let claimed = Command::new("ip")
                .args(["netns", "add", &underlay])
                .stderr(Stdio::null())
                .status()?
                .success();
            if !claimed {
                continue;
            }
            let mut cluster = SimCluster {
                index,
                underlay: underlay.clone(),
                nodes: Vec::new(),
                dual_stack,
            };
            // Leftovers of a killed run with this index (its Drop never ran).
            let _ = sh(&format!(
                "for ns in $(ip netns list | awk '{{print $1}}' | grep '^mtc{index}-n'); do ip netns del $ns; done"
            ));
            // From here on Drop cleans up whatever exists.
            sh(&format!(
                "ip -n {underlay} link set lo up && ip -n {underlay} link add br0 type bridge && \
                 ip -n {underlay} link set br0 up"
            ))?;
            for i in 0..nodes {
                cluster.add_node(i)?;
            }
            // Routes between the pod ranges through the nodes' underlay addresses, as a
            // routing CNI installs them.
            for a in &cluster.nodes {
                for b in cluster.nodes.iter().filter(|b| b.id != a.id) {
                    sh(&format!(
                        "ip -n {} route add {}/24 via {}",
                        a.netns, b.pod_range, b.address
                    ))?;
                    if let (Some(range6), Some(via6)) = (b.pod_range6, b.address6) {
                        sh(&format!(
                            "ip -n {} -6 route add {range6}/64 via {via6}",
                            a.netns
                        ))?;
                    }
                }
            }
            // One root for the cluster, in Istio's plug-in layout: every node's embedded
            // CA signs with it (each for its own node's workloads), so identities verify
            // across nodes.
            let ca = cluster.ca_dir();
            // A killed run's root (its Drop never ran): `ca init` refuses to overwrite.
            let _ = fs::remove_dir_all(&ca);
            let out = Command::new(agent_bin())
                .args(["ca", "init", "--dir"])
                .arg(&ca)
                .output()?;
            ensure!(
                out.status.success(),
                "mesh-agent ca init: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return Ok(cluster);
        }
        bail!("no free simulated-cluster index (namespaces mtc0-ul..mtc250-ul all exist: see tests/README.md to clean up)")
    }

    fn add_node(&mut self, id: usize) -> Result<()> {
        let k = self.index;
        let name = format!("mesh-test-c{k}-n{id}");
        let v6 = |prefix: u16, host: u16| {
            self.dual_stack
                .then(|| Ipv6Addr::new(0xfd00, prefix, k.into(), 0, 0, 0, 0, host))
        };
        let node = ClusterNode {
            id,
            netns: format!("mtc{k}-n{id}"),
            address: Ipv4Addr::new(10, 209, k, id as u8 + 1),
            pod_range: Ipv4Addr::new(10, 210 + id as u8, k, 0),
            gateway: Ipv4Addr::new(10, 210 + id as u8, k, 1),
            address6: v6(0x209, id as u16 + 1),
            pod_range6: v6(0x210 + id as u16, 0),
            gateway6: v6(0x210 + id as u16, 1),
            cgroup: cgroup2_root().join(&name),
            pin_path: PathBuf::from("/sys/fs/bpf").join(&name),
            dir: std::env::temp_dir()
                .join(format!("mesh-test-c{k}"))
                .join(format!("n{id}")),
            pods: Vec::new(),
            children: Mutex::new(Vec::new()),
            ca: ca_dir_of(k),
        };
        let (ns, ul) = (node.netns.clone(), self.underlay.clone());
        let (addr, gw) = (node.address, node.gateway);
        let (addr6, gw6) = (node.address6, node.gateway6);
        // Record first so Drop removes partial state too.
        self.nodes.push(node);
        let node = self.nodes.last().expect("just pushed");
        sh(&format!(
            "ip netns add {ns} && ip -n {ns} link set lo up && \
             ip -n {ul} link add n{id} type veth peer name eth0 netns {ns} && \
             ip -n {ul} link set n{id} master br0 up && \
             ip -n {ns} addr add {addr}/24 dev eth0 && ip -n {ns} link set eth0 up && \
             ip -n {ns} link add br0 type bridge && ip -n {ns} addr add {gw}/24 dev br0 && \
             ip -n {ns} link set br0 up && \
             ip netns exec {ns} sysctl -qw net.ipv4.ip_forward=1"
        ))?;
        if let (Some(addr6), Some(gw6)) = (addr6, gw6) {
            // No duplicate address detection: the addresses are usable at once.
            sh(&format!(
                "ip netns exec {ns} sysctl -qw net.ipv6.conf.all.disable_ipv6=0 \
                   net.ipv6.conf.eth0.disable_ipv6=0 net.ipv6.conf.br0.disable_ipv6=0 \
                   net.ipv6.conf.all.forwarding=1 && \
                 ip -n {ns} -6 addr add {addr6}/64 dev eth0 nodad && \
                 ip -n {ns} -6 addr add {gw6}/64 dev br0 nodad"
            ))?;
        }
        fs::create_dir_all(&node.cgroup)?;
        fs::create_dir_all(&node.dir)?;
        let _ = fs::remove_dir_all(&node.pin_path);
        Ok(())
    }

    pub fn node(&self, id: usize) -> &ClusterNode {
        &self.nodes[id]
    }

    /// The cluster's CA folder (`mesh-agent ca init`), every agent's `--ca-dir`.
    pub fn ca_dir(&self) -> PathBuf {
        ca_dir_of(self.index)
    }

    /// Adds a pod to node `id`: netns + veth on the node's bridge + cgroup folder. `host`
    /// is the last octet of its address in the node's pod range.
    pub fn add_pod(&mut self, id: usize, name: &str, host: u8) -> Result<&Pod> {
        assert!(
            self.nodes
                .iter()
                .all(|n| n.pods.iter().all(|p| p.name != name)),
            "pod names are unique in the cluster: {name}"
        );
        self.nodes[id].add_pod(name, host)
    }

    /// The pod `name`, on whichever node.
    pub fn pod(&self, name: &str) -> &Pod {
        self.node_of(name).pod(name)
    }

    /// The node running pod `name`.
    pub fn node_of(&self, name: &str) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|n| n.pods.iter().any(|p| p.name == name))
            .unwrap_or_else(|| panic!("no pod {name} in the cluster"))
    }

    /// Every network namespace of the cluster: underlay, nodes, pods.
    pub fn all_netns(&self) -> Vec<&str> {
        let mut all = vec![self.underlay.as_str()];
        for n in &self.nodes {
            all.push(&n.netns);
            all.extend(n.pods.iter().map(|p| p.netns.as_str()));
        }
        all
    }

    /// A service address in this cluster's VIP range (10.97.K.0/24, routed nowhere: only
    /// the capture gives it meaning).
    pub fn vip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 97, self.index, host)
    }
}

impl Drop for SimCluster {
    fn drop(&mut self) {
        // Nodes first (their Drop kills their processes and removes their namespaces):
        // the underlay namespace is the claim on the index.
        self.nodes.clear();
        let _ = fs::remove_dir_all(std::env::temp_dir().join(format!("mesh-test-c{}", self.index)));
        let _ = Command::new("ip")
            .args(["netns", "del", &self.underlay])
            .status();
    }
}

/// One node of a `SimCluster`. Its methods mirror `SimNode`'s, so a multi-node test reads
/// like a single-node one: `cluster.node(0).echo_once("client", ...)`.
pub struct ClusterNode {
    /// Position in the cluster (0..).
    pub id: usize,
    /// The node's network namespace (the "host" network of this node).
    pub netns: String,
    /// The node's address on the underlay (its `eth0`).
    pub address: Ipv4Addr,
    /// The network address of the node's pod range (a /24).
    pub pod_range: Ipv4Addr,
    /// The node's address on its pod bridge: pods' default gateway, the proxy's address.
    pub gateway: Ipv4Addr,
    /// Dual-stack clusters: the node's IPv6 address on the underlay.
    pub address6: Option<Ipv6Addr>,
    /// Dual-stack clusters: the network address of the node's IPv6 pod range (a /64).
    pub pod_range6: Option<Ipv6Addr>,
    /// Dual-stack clusters: the node's IPv6 address on its pod bridge (pods' IPv6
    /// gateway, the proxy's IPv6 redirect address).
    pub gateway6: Option<Ipv6Addr>,
    pub cgroup: PathBuf,
    pub pin_path: PathBuf,
    pub dir: PathBuf,
    pub pods: Vec<Pod>,
    children: Mutex<Vec<Child>>,
    /// The cluster's CA folder.
    ca: PathBuf,
}

impl ClusterNode {
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }

    /// The node's name (`--node-name`, and `node:` in enrolment files): `n<id>`.
    pub fn name(&self) -> String {
        format!("n{}", self.id)
    }

    fn add_pod(&mut self, name: &str, host: u8) -> Result<&Pod> {
        let j = self.pods.len();
        let netns = format!("{}-{name}", self.netns);
        let ip = Ipv4Addr::from(u32::from(self.pod_range) | u32::from(host));
        let cgroup = self.cgroup.join(name);
        let ip6 = self.pod_range6.map(|r| {
            let mut o = r.octets();
            o[15] = host;
            Ipv6Addr::from(o)
        });
        self.pods.push(Pod {
            name: name.into(),
            netns: netns.clone(),
            ip,
            ip6,
            cgroup: cgroup.clone(),
        });
        sh(&format!(
            "ip netns add {netns} && ip -n {node} link add v{j} type veth peer name eth0 netns {netns} && \
             ip -n {node} link set v{j} master br0 up && ip -n {netns} addr add {ip}/24 dev eth0 && \
             ip -n {netns} link set eth0 up && ip -n {netns} link set lo up && \
             ip -n {netns} route add default via {gw}",
            node = self.netns,
            gw = self.gateway
        ))?;
        if let (Some(ip6), Some(gw6)) = (ip6, self.gateway6) {
            crate::pod_ipv6(&netns, ip6, gw6)?;
        }
        fs::create_dir_all(&cgroup)?;
        Ok(self.pods.last().expect("just pushed"))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} on node {}", self.id))
    }

    /// A command that runs inside `pod` (its netns and cgroup).
    pub fn pod_command(&self, pod: &str, program: &Path) -> Command {
        let p = self.pod(pod);
        command_in(program, Path::new(&p.netns_path()), &p.cgroup)
    }

    /// Starts a long-running `podtool` server in a pod and waits until it listens.
    pub fn serve(&self, pod: &str, args: &[&str]) -> Result<()> {
        let mut child = self
            .pod_command(pod, &podtool())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut out = child.stdout.take().expect("stdout");
        // Recorded before the wait, so Drop kills it if it never starts.
        self.children.lock().unwrap().push(child);
        let mut buf = [0u8; 10];
        out.read_exact(&mut buf).context("server did not start")?;
        Ok(())
    }

    /// Runs a `podtool` client in a pod and parses its JSON line.
    pub fn client(&self, pod: &str, args: &[&str]) -> Result<serde_json::Value> {
        let out = self
            .pod_command(pod, &podtool())
            .args(args)
            .stderr(Stdio::piped())
            .output()?;
        if !out.status.success() {
            bail!(
                "podtool {args:?} in {pod} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim()).with_context(|| format!("podtool output: {text}"))
    }

    /// One echo exchange of `bytes` each way from `pod` to `to`; its JSON result. Never
    /// hangs: past 5 s podtool reports a deadline error.
    pub fn echo(&self, pod: &str, to: &str, bytes: u64) -> Result<serde_json::Value> {
        self.echo_within(pod, to, bytes, 5000)
    }

    /// `echo` with its own deadline: for large transfers on a loaded machine, where the
    /// deadline only guards against a hang.
    pub fn echo_within(
        &self,
        pod: &str,
        to: &str,
        bytes: u64,
        deadline_ms: u64,
    ) -> Result<serde_json::Value> {
        let (bytes, deadline) = (bytes.to_string(), deadline_ms.to_string());
        self.client(
            pod,
            &[
                "echo-client",
                "--to",
                to,
                "--bytes",
                &bytes,
                "--deadline-ms",
                &deadline,
            ],
        )
    }

    /// One 4 KiB echo exchange, as `SimNode::echo_once`.
    pub fn echo_once(&self, pod: &str, to: &str) -> Result<serde_json::Value> {
        self.echo(pod, to, 4096)
    }

    /// One `GET path` from `pod` to `to` (podtool's `http-client`, 10 s deadline).
    pub fn get_once(&self, pod: &str, to: &str, path: &str) -> Result<GetOnce> {
        let r = self.client(
            pod,
            &[
                "http-client",
                "--to",
                to,
                "--path",
                path,
                "--deadline-ms",
                "10000",
            ],
        )?;
        let first = |k: &str| {
            r[k].as_object()
                .and_then(|m| m.keys().next().cloned())
                .unwrap_or_default()
        };
        Ok(GetOnce {
            status: first("status"),
            body: first("bodies"),
            errors: r["errors"].clone(),
        })
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("mesh.yaml")
    }

    /// The node's standalone enrolment file (its local workloads, the mesh's services).
    pub fn write_config(&self, yaml: &str) -> Result<()> {
        // Write-then-rename so the agent never reads half a file.
        let tmp = self.dir.join("mesh.yaml.tmp");
        fs::write(&tmp, yaml)?;
        fs::rename(&tmp, self.config_path())?;
        Ok(())
    }

    /// The agent command line for this node: inside the node's netns and cgroup.
    pub fn agent_command(&self, extra: &[&str]) -> Command {
        let mut cmd = command_in(&agent_bin(), &self.netns_path(), &self.cgroup);
        cmd.arg("run");
        let defaults = [
            ("--config", self.config_path().display().to_string()),
            ("--pin-path", self.pin_path.display().to_string()),
            ("--cgroup", self.cgroup.display().to_string()),
            ("--proxy-address", format!("{}:15001", self.gateway)),
            ("--reload-interval-ms", "100".to_owned()),
            ("--node-name", self.name()),
            ("--ca-dir", self.ca.display().to_string()),
            // As `SimNode`'s: a heartbeat that ages under load must not send captured
            // connects around the proxy (tests of the timeout pass `HEARTBEAT_DEFAULT`).
            (
                "--proxy-heartbeat-timeout-ms",
                crate::HEARTBEAT_TIMEOUT_MS.to_owned(),
            ),
        ];
        let redirect6 = self
            .gateway6
            .map(|gw6| ("--proxy-redirect6", format!("[{gw6}]:15001")));
        for (flag, value) in defaults.into_iter().chain(redirect6) {
            // A flag given in `extra` replaces the default; an external CA replaces the
            // embedded one's folder.
            let external_ca = flag == "--ca-dir" && extra.contains(&"--ca-address");
            if !extra.contains(&flag) && !external_ca {
                cmd.arg(flag).arg(value);
            }
        }
        cmd.args(extra).env("MESH_LOG", "info");
        cmd
    }

    /// Starts the node's agent and waits for its /ready.
    pub fn start_agent(&self, extra: &[&str]) -> Result<NodeAgent> {
        let log = self.dir.join("agent.log");
        let child = self
            .agent_command(extra)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()?;
        let mut agent = NodeAgent {
            agent: Agent {
                child: Some(child),
                admin_port: ADMIN_PORT,
                log,
                pin_path: self.pin_path.clone(),
            },
            netns: self.netns_path(),
        };
        // The admin endpoint is on the node's loopback: reach it from inside its netns.
        let netns = agent.netns.clone();
        agent
            .agent
            .wait_ready(|a| in_netns(&netns, || a.get("/ready")))?;
        Ok(agent)
    }

    /// Programs attached to the node's cgroup, as bpftool sees them.
    pub fn cgroup_programs(&self) -> Result<Vec<String>> {
        crate::attached_programs(&self.cgroup)
    }

    /// The names in the node's pin folder, sorted (empty when it does not exist).
    pub fn pins(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.pin_path)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        for c in self.children.lock().unwrap().iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Anything else left in our cgroups (an agent the test still holds is killed by
        // its own Drop first; one leaked by a panic is killed here).
        for cg in self
            .pods
            .iter()
            .map(|p| p.cgroup.clone())
            .chain([self.cgroup.clone()])
        {
            if let Ok(pids) = fs::read_to_string(cg.join("cgroup.procs")) {
                for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    // SAFETY: plain kill(2).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        for p in &self.pods {
            let _ = Command::new("ip").args(["netns", "del", &p.netns]).status();
        }
        // The node's links (veths to its pods and to the underlay) go with its netns.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        // A cgroup can be removed once its processes have exited (SIGKILL is async).
        for cg in self
            .pods
            .iter()
            .map(|p| p.cgroup.clone())
            .chain([self.cgroup.clone()])
        {
            for _ in 0..100 {
                if fs::remove_dir(&cg).is_ok() || !cg.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Pins of an agent that could not clean up (killed): bpffs allows unlink/rmdir.
        let _ = fs::remove_dir_all(&self.pin_path);
        // The xDS socket folder the agent derives from its pin folder's name; a killed
        // agent leaves it behind.
        if let Some(name) = self.pin_path.file_name() {
            let _ = fs::remove_dir_all(Path::new("/run/mesh-agent").join(name));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// What one `ClusterNode::get_once` got: the status and the body (each empty if no answer
/// came), and the client's errors (`[]` when none).
#[derive(Debug)]
pub struct GetOnce {
    pub status: String,
    pub body: String,
    pub errors: serde_json::Value,
}

/// A node's running agent. Its admin endpoint listens on the node's loopback, so `get`
/// connects from a thread inside the node's netns; the rest is `Agent`'s.
pub struct NodeAgent {
    agent: Agent,
    netns: PathBuf,
}

impl NodeAgent {
    /// GET on the admin endpoint; the body, or an error unless 200.
    pub fn get(&self, path: &str) -> Result<String> {
        in_netns(&self.netns, || self.agent.get(path))
    }

    /// `mesh_datapath_events_total{event=...}` from /metrics.
    pub fn event(&self, event: &str) -> u64 {
        in_netns(&self.netns, || self.agent.event(event))
    }

    /// SIGTERM, wait; the exit status and the log.
    pub fn stop(&mut self) -> (Option<i32>, String) {
        self.agent.stop()
    }

    /// SIGKILL, wait: the agent gets no chance to clean up.
    pub fn kill(&mut self) {
        self.agent.kill()
    }

    pub fn pid(&self) -> u32 {
        self.agent.pid()
    }

    pub fn log_text(&self) -> String {
        self.agent.log_text()
    }

    /// A datapath counter read from the pinned STATS map; works with the agent gone.
    pub fn stat(&self, event: &str) -> u64 {
        self.agent.stat(event)
    }

    /// An inspection subcommand against this agent's pins (bpffs is not per netns).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.agent.cli(args)
    }
}

/// A packet capture on every interface of one network namespace (an `AF_PACKET` socket,
/// no tcpdump needed), running until `stop`: what the wire between the nodes carries.
pub struct Capture {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<u8>>>,
}

/// At most this much of a capture is kept (frames past it are counted, not stored).
const CAPTURE_LIMIT: usize = 256 << 20;

impl Capture {
    /// Starts capturing in the network namespace file `netns`.
    pub fn start(netns: &Path) -> Result<Capture> {
        let netns = netns.to_path_buf();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let ns = fs::File::open(&netns).expect("netns file");
            // SAFETY: setns(2) on a file we own changes this thread's namespace only; the
            // socket, option and buffer calls get valid pointers and sizes.
            let fd = unsafe {
                assert_eq!(libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET), 0);
                let fd = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW,
                    (libc::ETH_P_ALL as u16).to_be() as i32,
                );
                assert!(
                    fd >= 0,
                    "AF_PACKET socket: {}",
                    std::io::Error::last_os_error()
                );
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 100_000,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                let size: libc::c_int = 8 << 20;
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                );
                fd
            };
            let _ = ready_tx.send(());
            let mut out = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: `buf` is valid for its length.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 && out.len() < CAPTURE_LIMIT {
                    out.extend_from_slice(&buf[..n as usize]);
                }
            }
            // SAFETY: our own fd, closed once.
            unsafe { libc::close(fd) };
            out
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("capture did not start")?;
        Ok(Capture {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops and returns the raw frames, concatenated.
    pub fn finish(mut self) -> Vec<u8> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
