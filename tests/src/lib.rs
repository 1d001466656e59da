//! The simulated node: a node is the host network namespace with its own bridge and cgroup
//! subtree; a pod is a network namespace joined to the bridge by a veth pair, plus a cgroup
//! folder under the node's; a pod's processes run inside both. Each `SimNode` claims a
//! unique index (the bridge name is the lock), so tests run in parallel, and removes
//! everything it made in `Drop`, also when the test fails.
//!
//! Names for index N: bridge `mtbrN`, subnet 10.201.N.0/24 (gateway .1 = the node's
//! address, where the proxy listens), netns `mtN-<pod>`, host veth `mtNv<i>`, cgroup
//! `<cgroup2>/mesh-test-N`, pins `/sys/fs/bpf/mesh-test-N`, admin port 15100+N,
//! embedded control plane (xDS) port 15300+N. A dual-stack node (`SimNode::new_dual_stack`)
//! adds the IPv6 subnet fd00:201:N::/64 (gateway ::1, the node's IPv6 address, where the
//! proxy listens for IPv6 pods too; pod `host` at `fd00:201:N::<host>`).
#![expect(
    unsafe_code,
    reason = "pre_exec hooks (setns, cgroup move) and kill(2) for the simulated node"
)]

use std::{
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, Ipv6Addr, TcpStream},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

pub mod cluster;
pub mod cost;
pub mod datapath;
pub mod family;
pub mod flows;
pub mod kubeapi;
pub mod l7;
pub mod metrics;
pub mod otlp;
pub mod relay;
pub mod scenes;

/// How long a pod client may run when the test gives it no `--deadline-ms` of its own: far
/// above any test's traffic (a 64 MiB echo takes seconds), far below CI's limit.
const CLIENT_DEADLINE_MS: &str = "180000";

pub fn must_be_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(uid, 0, "the end-to-end tests need root (network namespaces, cgroups, bpf): run them with `cargo xtask test` as root");
}

/// Gives a pod's namespace (its `eth0` already up) the IPv6 address `ip6`/64 and a
/// default route through `gw6`: the dual-stack half of a pod on a simulated node or
/// cluster node.
pub fn pod_ipv6(netns: &str, ip6: std::net::Ipv6Addr, gw6: std::net::Ipv6Addr) -> Result<()> {
    sh(&format!(
        "ip netns exec {netns} sysctl -qw net.ipv6.conf.eth0.disable_ipv6=0 && \
         ip -n {netns} -6 addr add {ip6}/64 dev eth0 nodad && \
         ip -n {netns} -6 route add default via {gw6} dev eth0"
    ))?;
    Ok(())
}

pub fn sh(cmd: &str) -> Result<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .context("spawning sh")?;
    if !out.status.success() {
        bail!(
            "`{cmd}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The cgroup v2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_root() -> PathBuf {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    text.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            if post.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            pre.split_whitespace().nth(4).map(PathBuf::from)
        })
        .expect("no cgroup v2 mount on this machine")
}

pub fn agent_bin() -> PathBuf {
    if let Ok(p) = std::env::var("MESH_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/mesh-agent");
    assert!(
        p.exists(),
        "{} not found: build it first (`cargo xtask test` does) or set MESH_AGENT_BIN",
        p.display()
    );
    p
}

/// `podtool`, built by cargo next to the test binaries (target/<profile>/podtool).
pub fn podtool() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join("podtool");
    assert!(
        p.exists(),
        "{} not found: run the tests with cargo (it builds podtool)",
        p.display()
    );
    p
}

pub struct Pod {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address on a dual-stack node.
    pub ip6: Option<Ipv6Addr>,
    pub cgroup: PathBuf,
}

impl Pod {
    pub fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.netns)
    }

    /// Its IPv6 address; panics on a node that is not dual-stack.
    pub fn v6(&self) -> Ipv6Addr {
        self.ip6
            .unwrap_or_else(|| panic!("pod {} has no IPv6 address", self.name))
    }

    /// `, ip6: <addr>` for a workload entry of the enrolment file (nothing on an IPv4-only
    /// node), so one config template serves both kinds of node.
    pub fn ip6_field(&self) -> String {
        self.ip6
            .map(|a| format!(", ip6: \"{a}\""))
            .unwrap_or_default()
    }
}

/// The proxy's port on the node (`--proxy-address`, and `--proxy-redirect6` on a
/// dual-stack node).
pub const PROXY_PORT: u16 = 15001;

/// The proxy heartbeat timeout every harness agent gets (`--proxy-heartbeat-timeout-ms`,
/// milliseconds): the agent's 1 s default is tight on a loaded test machine, where a
/// starved proxy runtime misses beats and captured connects fail open or closed.
pub const HEARTBEAT_TIMEOUT_MS: &str = "5000";

/// The agent's own heartbeat timeout (`DEFAULT_PROXY_HEARTBEAT_TIMEOUT_MS`, 1 s), for the
/// tests of what a stale heartbeat does: pass these in `start_agent`'s `extra`.
pub const HEARTBEAT_DEFAULT: [&str; 2] = ["--proxy-heartbeat-timeout-ms", "1000"];

pub struct SimNode {
    pub index: u8,
    pub bridge: String,
    pub gateway: Ipv4Addr,
    /// The node's IPv6 address on the pod network (dual-stack nodes only); the agent gets
    /// `--proxy-redirect6 [gateway6]:15001`.
    pub gateway6: Option<Ipv6Addr>,
    /// Whether the agent gets `--proxy-redirect6` on a dual-stack node (default true;
    /// false: the agent leaves native IPv6 alone).
    pub redirect6: bool,
    pub cgroup: PathBuf,
    pub pin_path: PathBuf,
    pub dir: PathBuf,
    pub admin_port: u16,
    pub pods: Vec<Pod>,
    children: Mutex<Vec<Child>>,
}

impl SimNode {
    /// Claims a free index and builds the node with no pods yet.
    pub fn new() -> Result<SimNode> {
        must_be_root();
        if !Path::new("/sys/fs/bpf").exists() || sh("stat -f -c %T /sys/fs/bpf")?.trim() != "bpf_fs"
        {
            let _ = sh("mount -t bpf bpf /sys/fs/bpf");
        }
        for index in 0..=250u8 {
            let bridge = format!("mtbr{index}");
            let claimed = Command::new("ip")
                .args(["link", "add", &bridge, "type", "bridge"])
                .stderr(Stdio::null())
                .status()?
                .success();
            if !claimed {
                continue;
            }
            let gateway = Ipv4Addr::new(10, 201, index, 1);
            let node = SimNode {
                index,
                bridge: bridge.clone(),
                gateway,
                gateway6: None,
                redirect6: true,
                cgroup: cgroup2_root().join(format!("mesh-test-{index}")),
                pin_path: PathBuf::from(format!("/sys/fs/bpf/mesh-test-{index}")),
                dir: std::env::temp_dir().join(format!("mesh-test-{index}")),
                admin_port: 15100 + index as u16,
                pods: Vec::new(),
                children: Mutex::new(Vec::new()),
            };
            // Leftovers of a killed run with this index (its Drop never ran).
            let _ = sh(&format!("for ns in $(ip netns list | awk '{{print $1}}' | grep '^mt{index}-'); do ip netns del $ns; done"));
            // From here on Drop cleans up whatever exists.
            sh(&format!(
                "ip addr add {gateway}/24 dev {bridge} && ip link set {bridge} up"
            ))?;
            fs::create_dir_all(&node.cgroup)?;
            fs::create_dir_all(&node.dir)?;
            let _ = fs::remove_dir_all(&node.pin_path);
            return Ok(node);
        }
        bail!("no free simulated-node index (bridges mtbr0..mtbr250 all exist: see tests/README.md to clean up)")
    }

    /// `new`, with IPv6 too: the bridge gets fd00:201:N::1/64 (no duplicate address
    /// detection, so the address is usable at once), each pod added later an address in
    /// that subnet and a default IPv6 route through it, and the agent `--proxy-redirect6`.
    pub fn new_dual_stack() -> Result<SimNode> {
        let mut node = SimNode::new()?;
        let gw6 = Ipv6Addr::new(0xfd00, 0x201, node.index.into(), 0, 0, 0, 0, 1);
        sh(&format!(
            "sysctl -qw net.ipv6.conf.{br}.disable_ipv6=0 && ip -6 addr add {gw6}/64 dev {br} nodad",
            br = node.bridge
        ))?;
        node.gateway6 = Some(gw6);
        Ok(node)
    }

    /// The node's IPv6 address (panics on a node that is not dual-stack).
    pub fn gateway6(&self) -> Ipv6Addr {
        self.gateway6.expect("not a dual-stack node")
    }

    /// Adds a pod: netns + veth on the bridge + cgroup folder. `host` is the last octet.
    pub fn add_pod(&mut self, name: &str, host: u8) -> Result<&Pod> {
        let cgroup = self.cgroup.join(name);
        self.add_pod_at(name, host, cgroup)
    }

    /// `add_pod` with the pod's processes in `cgroup`, a folder under the node's cgroup
    /// (for example the kubelet's `kubepods.slice/.../pod<uid>.slice/<container>.scope`);
    /// the folders between are made here and removed with the node.
    pub fn add_pod_at(&mut self, name: &str, host: u8, cgroup: PathBuf) -> Result<&Pod> {
        assert!(
            cgroup.starts_with(&self.cgroup),
            "a pod's cgroup must be under the node's"
        );
        let i = self.pods.len();
        let netns = format!("mt{}-{name}", self.index);
        let veth = format!("mt{}v{i}", self.index);
        let ip = Ipv4Addr::new(10, 201, self.index, host);
        let ip6 = self
            .gateway6
            .map(|_| Ipv6Addr::new(0xfd00, 0x201, self.index.into(), 0, 0, 0, 0, host.into()));
        // Record first so Drop removes partial state too.
        self.pods.push(Pod {
            name: name.into(),
            netns: netns.clone(),
            ip,
            ip6,
            cgroup: cgroup.clone(),
        });
        // A veth of an earlier node with this index may still exist: network namespaces
        // are destroyed asynchronously after `ip netns del`.
        let _ = Command::new("ip")
            .args(["link", "del", &veth])
            .stderr(Stdio::null())
            .status();
        sh(&format!(
            "ip netns add {netns} && ip link add {veth} type veth peer name eth0 netns {netns} && \
             ip link set {veth} master {br} up && ip -n {netns} addr add {ip}/24 dev eth0 && \
             ip -n {netns} link set eth0 up && ip -n {netns} link set lo up && \
             ip -n {netns} route add default via {gw}",
            br = self.bridge,
            gw = self.gateway
        ))?;
        if let (Some(ip6), Some(gw6)) = (ip6, self.gateway6) {
            pod_ipv6(&netns, ip6, gw6)?;
        }
        fs::create_dir_all(&cgroup)?;
        Ok(self.pods.last().expect("just pushed"))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// A command that runs inside `pod` (its netns and cgroup).
    pub fn pod_command(&self, pod: &str, program: &Path) -> Command {
        let p = self.pod(pod);
        let ns = fs::File::open(p.netns_path()).expect("netns file");
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(p.cgroup.join("cgroup.procs"))
            .expect("cgroup.procs");
        let mut cmd = Command::new(program);
        // SAFETY: only async-signal-safe calls (write, setns) between fork and exec; the
        // fds are owned by the closure and stay open until exec.
        unsafe {
            cmd.pre_exec(move || {
                let zero = b"0";
                if libc::write(procs.as_raw_fd(), zero.as_ptr().cast(), 1) != 1 {
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

    /// Starts a long-running `podtool` server in a pod and waits until it listens.
    pub fn serve(&self, pod: &str, args: &[&str]) -> Result<()> {
        let mut child = self
            .pod_command(pod, &podtool())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut out = child.stdout.take().expect("stdout");
        let mut buf = [0u8; 10];
        out.read_exact(&mut buf).context("server did not start")?;
        self.children.lock().unwrap().push(child);
        Ok(())
    }

    /// Runs a `podtool` client in a pod and parses its JSON line.
    pub fn client(&self, pod: &str, args: &[&str]) -> Result<serde_json::Value> {
        let mut cmd = self.pod_command(pod, &podtool());
        cmd.args(args);
        // No client may hang a test run: without a deadline of its own, a stall shows up as
        // a `deadline` error after CLIENT_DEADLINE_MS instead of a run that never ends.
        if !args.contains(&"--deadline-ms") {
            cmd.args(["--deadline-ms", CLIENT_DEADLINE_MS]);
        }
        let out = cmd.stderr(Stdio::piped()).output()?;
        if !out.status.success() {
            bail!(
                "podtool {args:?} in {pod} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("deadline: no result") {
            // A stalled transfer: keep the sockets' state for whoever reads the failure.
            eprintln!(
                "podtool {args:?} in {pod} stalled; {}",
                self.socket_report()
            );
        }
        serde_json::from_str(text.trim()).with_context(|| format!("podtool output: {text}"))
    }

    /// Every TCP socket of this node's subnet (node side and each pod), with its queues
    /// and memory (`ss -tanmi`), and the flows the datapath moved to the TCP path (`FLOWS`
    /// flags `client_fallback`, `server_fallback`): what a stalled transfer is diagnosed from.
    pub fn socket_report(&self) -> String {
        let mut subnet = format!("10.201.{}.0/24", self.index);
        if let Some(gw6) = self.gateway6 {
            subnet = format!("{subnet} or src {gw6}/64 or dst {gw6}/64");
        }
        let mut out = format!(
            "node sockets:\n{}",
            sh(&format!("ss -tanmi 'src {subnet} or dst {subnet}'"))
                .unwrap_or_else(|e| e.to_string())
        );
        for p in &self.pods {
            let ss = sh(&format!("ip netns exec {} ss -tanmi", p.netns))
                .unwrap_or_else(|e| e.to_string());
            out.push_str(&format!("pod {} sockets:\n{ss}", p.name));
        }
        let flows = self.pin_path.join("FLOWS");
        if flows.exists() {
            let dump = sh(&format!("bpftool -j map dump pinned {}", flows.display()))
                .unwrap_or_else(|e| e.to_string());
            out.push_str(&format!("FLOWS: {dump}\n"));
        }
        out
    }

    /// `podtool http-client` in `pod`: `requests` GETs of `path` to `to` with extra
    /// `headers` (`name: value`); its JSON summary (`bodies`, `errors`, `seen_mesh`, ...).
    pub fn http_get(
        &self,
        pod: &str,
        to: &str,
        path: &str,
        requests: u32,
        headers: &[&str],
    ) -> Result<serde_json::Value> {
        let requests = requests.to_string();
        let mut args = vec![
            "http-client",
            "--to",
            to,
            "--path",
            path,
            "--requests",
            &requests,
        ];
        for h in headers {
            args.extend(["--header", h]);
        }
        self.client(pod, &args)
    }

    /// One echo exchange of `bytes` each way from `pod` to `to` (the client's default
    /// deadline); its JSON result.
    pub fn echo(&self, pod: &str, to: &str, bytes: u64) -> Result<serde_json::Value> {
        let bytes = bytes.to_string();
        self.client(pod, &["echo-client", "--to", to, "--bytes", &bytes])
    }

    /// One 4 KiB echo exchange from `pod` to `to`; its JSON result. Never hangs: past 5 s
    /// podtool reports a deadline error.
    pub fn echo_once(&self, pod: &str, to: &str) -> Result<serde_json::Value> {
        self.client(
            pod,
            &[
                "echo-client",
                "--to",
                to,
                "--bytes",
                "4096",
                "--deadline-ms",
                "5000",
            ],
        )
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("mesh.yaml")
    }

    pub fn write_config(&self, yaml: &str) -> Result<()> {
        // Write-then-rename so the agent never reads half a file.
        let tmp = self.dir.join("mesh.yaml.tmp");
        fs::write(&tmp, yaml)?;
        fs::rename(&tmp, self.config_path())?;
        Ok(())
    }

    /// The standard agent command line for this node.
    pub fn agent_command(&self, extra: &[&str]) -> Command {
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(self.cgroup.join("cgroup.procs"))
            .expect("cgroup.procs");
        let mut cmd = Command::new(agent_bin());
        cmd.arg("run");
        let defaults = [
            ("--config", self.config_path().display().to_string()),
            ("--pin-path", self.pin_path.display().to_string()),
            ("--cgroup", self.cgroup.display().to_string()),
            ("--proxy-address", format!("{}:{PROXY_PORT}", self.gateway)),
            ("--admin-address", format!("127.0.0.1:{}", self.admin_port)),
            ("--xds-listen", format!("127.0.0.1:{}", self.xds_port())),
            ("--reload-interval-ms", "100".to_owned()),
            // Under load (two cores, parallel tests, an emulated kernel) the proxy's
            // heartbeat can age past the agent's 1 s default and captured connects go
            // around it; a test of the timeout itself passes `HEARTBEAT_DEFAULT`.
            (
                "--proxy-heartbeat-timeout-ms",
                HEARTBEAT_TIMEOUT_MS.to_owned(),
            ),
        ];
        let dual = self
            .gateway6
            .filter(|_| self.redirect6)
            .map(|gw6| ("--proxy-redirect6", format!("[{gw6}]:{PROXY_PORT}")));
        for (flag, value) in defaults.into_iter().chain(dual) {
            // A flag given in `extra` replaces the default.
            if !extra.contains(&flag) {
                cmd.arg(flag).arg(value);
            }
        }
        cmd.args(extra).env("MESH_LOG", "info");
        // The agent must sit in the node's cgroup: sockops sees the proxy's sockets only
        // there (on a real node the programs attach at the cgroup root).
        // SAFETY: only write(2) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Starts the agent and waits for /ready.
    /// The embedded control plane's port: 15300+N.
    pub fn xds_port(&self) -> u16 {
        self.admin_port + 200
    }

    pub fn start_agent(&self, extra: &[&str]) -> Result<Agent> {
        self.start_agent_as("agent", self.admin_port, extra)
    }

    /// `start_agent` for a second agent of the node (a hand-over): its own log
    /// (`<name>.log`) and admin port.
    pub fn start_agent_as(&self, name: &str, admin_port: u16, extra: &[&str]) -> Result<Agent> {
        let log = self.dir.join(format!("{name}.log"));
        let admin = format!("127.0.0.1:{admin_port}");
        let mut args = extra.to_vec();
        if admin_port != self.admin_port {
            args.extend(["--admin-address", &admin]);
        }
        let child = self
            .agent_command(&args)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()?;
        let mut agent = Agent {
            child: Some(child),
            admin_port,
            log,
            pin_path: self.pin_path.clone(),
        };
        agent.wait_ready(|a| a.get("/ready"))?;
        Ok(agent)
    }

    /// Programs attached to the node cgroup, as bpftool sees them.
    pub fn cgroup_programs(&self) -> Result<Vec<String>> {
        attached_programs(&self.cgroup)
    }
}

/// Programs attached directly to `cgroup`, as bpftool sees them.
pub(crate) fn attached_programs(cgroup: &Path) -> Result<Vec<String>> {
    let out = sh(&format!("bpftool cgroup show {} -j", cgroup.display()))?;
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or(serde_json::json!([]));
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

impl Drop for SimNode {
    fn drop(&mut self) {
        for c in self.children.lock().unwrap().iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Anything else left in our cgroups (agents started by hand in a test).
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
        std::thread::sleep(Duration::from_millis(50));
        for (i, p) in self.pods.iter().enumerate() {
            // Deleting the host side removes the pair at once; the namespace itself is
            // torn down asynchronously by the kernel.
            let veth = format!("mt{}v{i}", self.index);
            let _ = Command::new("ip")
                .args(["link", "del", &veth])
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("ip").args(["netns", "del", &p.netns]).status();
            for _ in 0..50 {
                if fs::remove_dir(&p.cgroup).is_ok() || !p.cgroup.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Folders between the node's cgroup and its pods' (add_pod_at), deepest first.
        fn remove_tree(dir: &Path) {
            if let Ok(rd) = fs::read_dir(dir) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        remove_tree(&e.path());
                        let _ = fs::remove_dir(e.path());
                    }
                }
            }
        }
        remove_tree(&self.cgroup);
        for _ in 0..50 {
            if fs::remove_dir(&self.cgroup).is_ok() || !self.cgroup.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Ok(rd) = fs::read_dir(&self.pin_path) {
            for e in rd.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        let _ = fs::remove_dir(&self.pin_path);
        let _ = fs::remove_dir_all(&self.dir);
        // Last: the bridge is the claim on this index.
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

pub struct Agent {
    child: Option<Child>,
    pub admin_port: u16,
    pub log: PathBuf,
    pub pin_path: PathBuf,
}

impl Agent {
    /// Waits (60 s at most) until `ready` (the agent's `/ready`, however the caller reaches
    /// it) answers "ready"; fails at once, with the log, if the agent exits first.
    pub(crate) fn wait_ready(&mut self, ready: impl Fn(&Agent) -> Result<String>) -> Result<()> {
        // 60 s: under software emulation (the kernel matrix) on a busy host, verifying the
        // programs alone has taken over 15 s.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if ready(self).is_ok_and(|b| b.starts_with("ready")) {
                return Ok(());
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("agent exited ({st}) before ready:\n{}", self.log_text());
            }
            if Instant::now() > deadline {
                bail!("agent not ready after 60s:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn get(&self, path: &str) -> Result<String> {
        http_get(self.admin_port, path)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `mesh_datapath_events_total{event=...}` from /metrics.
    pub fn event(&self, event: &str) -> u64 {
        let m = self.get("/metrics").unwrap_or_default();
        metric(&m, "mesh_datapath_events_total", &[("event", event)])
    }

    /// Whether the agent's kernel has `feature`, as `/kernel` lists it (`None`: not listed).
    pub fn kernel_feature(&self, feature: &str) -> Option<bool> {
        let kernel: serde_json::Value =
            serde_json::from_str(&self.get("/kernel").expect("/kernel")).expect("/kernel JSON");
        kernel["features"]
            .as_array()?
            .iter()
            .find(|f| f["name"] == feature)
            .map(|f| f["available"] == true)
    }

    /// SIGTERM, wait; returns the exit status and the log.
    pub fn stop(&mut self) -> (Option<i32>, String) {
        let Some(mut c) = self.child.take() else {
            return (None, self.log_text());
        };
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Ok(Some(st)) = c.try_wait() {
                break st.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                break c.wait().ok().and_then(|s| s.code());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, self.log_text())
    }

    /// Waits up to `timeout` for the agent to exit on its own; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let c = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                return st.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("the agent runs")
    }

    /// SIGKILL, wait: the agent gets no chance to clean up (a crash, an OOM kill).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A datapath counter read from the pinned STATS map (`mesh-agent dump STATS`): works
    /// while the agent is stopped or gone, unlike `event`.
    pub fn stat(&self, event: &str) -> u64 {
        let out = self.cli(&["dump", "STATS", "-o", "json"]);
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        rows.as_array()
            .and_then(|a| a.iter().find(|r| r["event"] == event))
            .and_then(|r| r["count"].as_u64())
            .unwrap_or(0)
    }

    /// Runs an inspection subcommand against this agent's pins.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(agent_bin())
            .args(args)
            .arg("--pin-path")
            .arg(&self.pin_path)
            .output()
            .expect("run mesh-agent")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn http_get(port: u16, path: &str) -> Result<String> {
    let (status, body) = http_get_status(port, path, Duration::from_secs(5))?;
    if status != 200 {
        bail!("{path}: HTTP {status}");
    }
    Ok(body)
}

/// One GET to `127.0.0.1:port`, whatever the status: `(status, body)`. Fails (instead of
/// hanging) when nothing answers within `timeout`.
pub fn http_get_status(port: u16, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(timeout))?;
    // The admin endpoint keeps connections alive; this reads the body to the end.
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// Whether a one-connection `echo-client` result came back whole and without error.
pub fn intact(r: &serde_json::Value) -> bool {
    r["errors"] == serde_json::json!([]) && r["intact"] == 1
}

/// Sum of the samples of `name` whose labels include every `(k, v)`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Rules in the host's and the given namespaces' iptables, ip6tables and nftables rulesets.
pub fn firewall_rules(netns: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    let mut check = |prefix: &str| {
        for tool in ["iptables", "ip6tables"] {
            if let Ok(out) = sh(&format!("{prefix} {tool}-save 2>/dev/null")) {
                found.extend(
                    out.lines()
                        .filter(|l| l.starts_with("-A"))
                        .map(|l| format!("{prefix} {tool}: {l}")),
                );
            }
        }
        if let Ok(out) = sh(&format!("{prefix} nft list ruleset 2>/dev/null")) {
            found.extend(
                out.lines()
                    .filter(|l| l.trim_start().starts_with("table"))
                    .map(|l| format!("{prefix} nft: {l}")),
            );
        }
    };
    check("");
    for ns in netns {
        check(&format!("ip netns exec {ns}"));
    }
    found
}

/// Waits until `f` returns true (polling), or fails with `what`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `f` run with this thread allowed on `cpu` only (a child spawned meanwhile inherits
/// it, as `taskset` would give it), the thread's CPU set restored after.
pub fn on_cpu<T>(cpu: usize, f: impl FnOnce() -> T) -> T {
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: cpu_set_t is plain data; sched_{get,set}affinity(0, ..) act on this thread
    // with sets of the size given.
    let old = unsafe {
        let mut old: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(libc::sched_getaffinity(0, size, &mut old), 0);
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut one);
        assert_eq!(libc::sched_setaffinity(0, size, &one), 0);
        old
    };
    let out = f();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::sched_setaffinity(0, size, &old) }, 0);
    out
}
