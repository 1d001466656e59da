//! `cargo xtask soak --minutes N` (issue 10): a simulated node of its own with mixed L4/L7
//! traffic, configuration churn and agent restarts at the same time, then assertions.
//!
//! - Traffic, from several client pods, without pause: L4 echo transfers checked by size
//!   and SHA-256 (`podtool echo-client`) through the node proxy, to a `mode: direct`
//!   namespace (sk_msg socket to socket) and from a namespace whose label flips; L7
//!   requests through a service with weighted routes (`podtool http-load`, every response
//!   checked whole).
//! - Churn: the standalone file is rewritten (routes, weights, load balancing: xDS pushes;
//!   a namespace relabelled; pods created, enrolled, used, removed and deleted), and the
//!   agent is restarted (SIGTERM, start, /ready) every `--restart-secs`.
//! - Assertions: no lost, truncated or corrupted byte anywhere; a transfer may fail only
//!   with a reset or a connect error, and only if it overlaps a restart; at checkpoints
//!   (traffic paused) the connection maps are back to their baseline and WORKLOADS/DESTS
//!   match the file; the agent's RSS and fd count are flat across each lifetime.
//!
//! Names (none shared with the tests' `mt*`/10.201.x, the demo's 10.202.x, latency's
//! 10.203.x or the benchmarks' 10.204.x): bridge `msoakbr` 10.205.0.1/24, netns
//! `msoak-<pod>`, host veth `msoakv<host>`, cgroup `<cgroup2>/mesh-soak`, pins
//! `/sys/fs/bpf/mesh-soak`, scratch `/tmp/mesh-soak`, admin 127.0.0.1:15920, xDS
//! 127.0.0.1:15921, service VIPs 10.96.205.x (unrouted: with forwarding off the node
//! answers "unreachable", so an uncaptured VIP connect fails fast). Nothing is written to
//! iptables or nftables; the run checks their rulesets did not change.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

const BRIDGE: &str = "msoakbr";
/// The bridge's MAC, set at creation. A bridge without one takes the lowest MAC of its
/// ports and changes it as ports come and go: a pod that resolves the gateway while a
/// short-lived pod's veth is the lowest keeps that MAC after the veth is deleted, and its
/// frames to the gateway (every captured connect: the proxy listens there) are flooded
/// as unknown unicast and lost for 20-40 s, until the pod re-resolves. That is what made
/// both L7 clients' connects to the VIP time out at once (`GatewayWatch` catches it).
/// Locally administered, from 10.205.0.1.
const BRIDGE_MAC: &str = "02:00:0a:cd:00:01";
const NET: &str = "10.205.0";
const NETNS_PREFIX: &str = "msoak-";
const VETH_PREFIX: &str = "msoakv";
const CGROUP_NAME: &str = "mesh-soak";
const PIN: &str = "/sys/fs/bpf/mesh-soak";
const SCRATCH: &str = "/tmp/mesh-soak";
const LOCK: &str = "/tmp/mesh-soak.lock";
const ADMIN_PORT: u16 = 15920;
const XDS_PORT: u16 = 15921;
const VIP: &str = "10.96.205.10";
const VIP_V2: &str = "10.96.205.11";

/// The maps whose entries live and die with connections: back to baseline when idle.
/// (Per-socket state is socket storage, `SOCK_STATE`: freed with its socket, not listable.)
const CONN_MAPS: &[&str] = &["FLOWS", "SOCKHASH"];
/// Failures a restart may cause: the connection is cut with a reset, a connect fails
/// while nothing listens, an idle keep-alive connection is closed (HTTP/1.1 clients retry
/// those), or a new pod's enrolment waits for the restarted agent.
const RESTART_KINDS: &[&str] = &[
    "connect",
    "reset",
    "idle_close",
    "closed_no_response",
    "enrol_timeout",
];
/// After /ready, how long failures still count as the restart's (clients that dialled
/// during fail-open get their unreachable answer, rate limited to about one per second).
const RESTART_GRACE_SECS: f64 = 3.0;
/// Samples of a lifetime skipped before judging RSS and fds: start-up allocations, the
/// first xDS subscriptions, the proxy's worker threads.
const WARMUP_SECS: f64 = 10.0;
/// A client that runs longer than this is killed and counted as hung (bytes lost).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Options {
    pub minutes: f64,
    pub restart_secs: u64,
    pub checkpoint_secs: u64,
}

pub struct Bins {
    pub agent: PathBuf,
    pub podtool: PathBuf,
}

struct PodSpec {
    name: &'static str,
    namespace: &'static str,
    host: u8,
    labels: &'static str,
}

const PODS: &[PodSpec] = &[
    pod("c1", "shop", 2, ""),
    pod("c2", "shop", 3, ""),
    pod("c3", "shop", 4, ""),
    pod("b1", "batch", 5, ""),
    pod("api", "backend", 10, "app: api, version: v1"),
    pod("api2", "backend", 11, "app: api, version: v2"),
    pod("redis", "cache", 12, ""),
];

const fn pod(
    name: &'static str,
    namespace: &'static str,
    host: u8,
    labels: &'static str,
) -> PodSpec {
    PodSpec {
        name,
        namespace,
        host,
        labels,
    }
}

fn ip(host: u8) -> String {
    format!("{NET}.{host}")
}

fn cgroup2_root() -> Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    text.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2")
                .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup v2 mount on this machine")
}

fn shell(cmd: &str) -> Result<String> {
    let out = Command::new("sh").arg("-c").arg(cmd).output()?;
    if !out.status.success() {
        bail!(
            "`{cmd}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn quiet(cmd: &str) {
    let _ = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn signal(pid: u32, sig: &str) {
    quiet(&format!("kill -{sig} {pid}"));
}

/// Every pid in a cgroup folder and below it.
fn cgroup_pids(dir: &Path, out: &mut Vec<u32>) {
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                cgroup_pids(&e.path(), out);
            }
        }
    }
}

/// Removes cgroup folders deepest first (they must be empty of processes).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..50 {
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// What an interrupted run may have left: its names only.
fn leftovers() -> Result<Vec<String>> {
    let mut found = Vec::new();
    let netns = shell("ip netns list")?;
    found.extend(
        netns
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(NETNS_PREFIX))
            .map(|n| format!("netns {n}")),
    );
    let links = shell("ip -o link show")?;
    found.extend(
        links
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
            .filter(|n| n == BRIDGE || n.starts_with(VETH_PREFIX))
            .map(|n| format!("link {n}")),
    );
    let cg = cgroup2_root()?.join(CGROUP_NAME);
    if cg.exists() {
        let mut pids = Vec::new();
        cgroup_pids(&cg, &mut pids);
        found.push(format!(
            "cgroup {} ({} processes)",
            cg.display(),
            pids.len()
        ));
    }
    for p in [PIN, SCRATCH] {
        if Path::new(p).exists() {
            found.push(p.to_owned());
        }
    }
    Ok(found)
}

/// Removes everything a soak makes (also what a killed run left): processes in its
/// cgroup (the agent first, with SIGTERM, so it detaches and unpins), pods, bridge,
/// cgroups, pins, scratch folder.
pub fn clean() -> Result<()> {
    let cg = cgroup2_root()?.join(CGROUP_NAME);
    if let Ok(text) = fs::read_to_string(cg.join("cgroup.procs")) {
        let agents: Vec<u32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        for &pid in &agents {
            signal(pid, "TERM");
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while agents
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists())
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(50));
        }
    }
    let mut pids = Vec::new();
    cgroup_pids(&cg, &mut pids);
    for pid in pids {
        signal(pid, "KILL");
    }
    thread::sleep(Duration::from_millis(100));
    let links = shell("ip -o link show").unwrap_or_default();
    for name in links
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
        .filter(|n| n.starts_with(VETH_PREFIX))
    {
        quiet(&format!("ip link del {name}"));
    }
    let netns = shell("ip netns list").unwrap_or_default();
    for n in netns
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(NETNS_PREFIX))
    {
        quiet(&format!("ip netns del {n}"));
    }
    quiet(&format!("ip link del {BRIDGE}"));
    remove_cgroup_tree(&cg);
    if let Ok(rd) = fs::read_dir(PIN) {
        for e in rd.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
    let _ = fs::remove_dir(PIN);
    let _ = fs::remove_dir_all(SCRATCH);
    let _ = fs::remove_dir_all(format!("/run/mesh-agent/{CGROUP_NAME}"));
    let left = leftovers()?;
    if !left.is_empty() {
        bail!("soak clean-up left: {}", left.join(", "));
    }
    Ok(())
}

/// The simulated node; removes itself (and anything the run started) on drop.
struct Node {
    cgroup: PathBuf,
    bins: Bins,
    servers: Mutex<Vec<Child>>,
}

impl Node {
    fn new(bins: &Bins) -> Result<Node> {
        if shell("stat -f -c %T /sys/fs/bpf")?.trim() != "bpf_fs" {
            shell("mount -t bpf bpf /sys/fs/bpf")?;
        }
        fs::create_dir_all(format!("{SCRATCH}/bin"))?;
        // The binaries are linked (or copied) once: another build in the same tree must not
        // swap the agent between two restarts of one run.
        let keep = |src: &Path, name: &str| -> Result<PathBuf> {
            let dst = Path::new(SCRATCH).join("bin").join(name);
            if fs::hard_link(src, &dst).is_err() {
                fs::copy(src, &dst).with_context(|| format!("copying {}", src.display()))?;
            }
            Ok(dst)
        };
        let node = Node {
            cgroup: cgroup2_root()?.join(CGROUP_NAME),
            bins: Bins {
                agent: keep(&bins.agent, "mesh-agent")?,
                podtool: keep(&bins.podtool, "podtool")?,
            },
            servers: Mutex::new(Vec::new()),
        };
        fs::create_dir_all(&node.cgroup)?;
        shell(&format!(
            "ip link add {BRIDGE} address {BRIDGE_MAC} type bridge && ip addr add {NET}.1/24 dev {BRIDGE} && ip link set {BRIDGE} up"
        ))?;
        for p in PODS {
            node.add_pod(p.name, p.host)?;
        }
        Ok(node)
    }

    fn add_pod(&self, name: &str, host: u8) -> Result<()> {
        let (ns, veth) = (
            format!("{NETNS_PREFIX}{name}"),
            format!("{VETH_PREFIX}{host}"),
        );
        // A namespace of an earlier pod on this address is torn down asynchronously.
        quiet(&format!("ip link del {veth}"));
        shell(&format!(
            "ip netns add {ns} && ip link add {veth} type veth peer name eth0 netns {ns} && \
             ip link set {veth} master {BRIDGE} up && ip -n {ns} addr add {ip}/24 dev eth0 && \
             ip -n {ns} link set eth0 up && ip -n {ns} link set lo up && \
             ip -n {ns} route add default via {NET}.1",
            ip = ip(host)
        ))?;
        fs::create_dir_all(self.cgroup.join(name))?;
        Ok(())
    }

    fn remove_pod(&self, name: &str, host: u8) {
        let cg = self.cgroup.join(name);
        let mut pids = Vec::new();
        cgroup_pids(&cg, &mut pids);
        for pid in pids {
            signal(pid, "KILL");
        }
        quiet(&format!("ip link del {VETH_PREFIX}{host}"));
        quiet(&format!("ip netns del {NETNS_PREFIX}{name}"));
        remove_cgroup_tree(&cg);
    }

    /// `program args...` inside a pod: its cgroup, then its network namespace.
    fn pod_command(&self, pod: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(
                r#"echo $$ > "$0/cgroup.procs" && ns=$1 && shift && exec ip netns exec "$ns" "$@""#,
            )
            .arg(self.cgroup.join(pod))
            .arg(format!("{NETNS_PREFIX}{pod}"))
            .arg(&self.bins.podtool);
        c
    }

    fn serve(&self, pod: &str, args: &[&str]) -> Result<()> {
        let mut child = self
            .pod_command(pod)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut line = [0u8; 10];
        child
            .stdout
            .take()
            .context("stdout")?
            .read_exact(&mut line)
            .with_context(|| format!("podtool {args:?} in {pod} did not start"))?;
        self.servers.lock().unwrap().push(child);
        Ok(())
    }

    /// Runs a podtool client in `pod`; its JSON line, or why there is none.
    fn client(&self, pod: &str, args: &[String]) -> Result<Value, (String, String)> {
        let mut child = self
            .pod_command(pod)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| ("other".to_owned(), format!("spawn: {e}")))?;
        let deadline = Instant::now() + CLIENT_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if Instant::now() > deadline => {
                    self.diagnose("hung", pod, &format!("podtool {args:?}"));
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err((
                        "hung".into(),
                        format!("podtool {args:?} still running after {CLIENT_TIMEOUT:?}"),
                    ));
                }
                Ok(None) => thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(("other".into(), format!("wait: {e}"))),
            }
        };
        let mut out = String::new();
        let mut err = String::new();
        let _ = child.stdout.take().map(|mut s| s.read_to_string(&mut out));
        let _ = child.stderr.take().map(|mut s| s.read_to_string(&mut err));
        if !status.success() {
            return Err((
                "client_failed".into(),
                format!("podtool {args:?} in {pod}: {status}: {}", err.trim()),
            ));
        }
        serde_json::from_str(out.trim())
            .map_err(|e| ("other".into(), format!("podtool output {out:?}: {e}")))
    }

    /// What the kernel and the maps show about a stuck client, kept with the logs
    /// (`hung-<pod>-<ms>.log`): its sockets and the pod's, the connection maps, and the
    /// agent's sockets.
    fn diagnose(&self, prefix: &str, pod: &str, what: &str) {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let file = Path::new(SCRATCH).join(format!("{prefix}-{pod}-{ms}.log"));
        let agent = self.bins.agent.display();
        let script = format!(
            "echo '== {what}'; echo '== ss in {pod}'; ip netns exec {NETNS_PREFIX}{pod} ss -tnieom; \
             echo '== neighbours in {pod}'; ip -n {NETNS_PREFIX}{pod} neigh show; \
             echo '== bridge {BRIDGE}'; cat /sys/class/net/{BRIDGE}/address; bridge fdb show br {BRIDGE} | grep permanent; \
             echo '== ss on the node (proxy port 15001)'; ss -tnieom '( sport = :15001 or dport = :15001 )'; \
             echo '== listener'; ss -ltn '( sport = :15001 )'; \
             echo '== nstat'; nstat -az TcpExtListenOverflows TcpExtListenDrops TcpExtTCPReqQFullDrop TcpAttemptFails; \
             echo '== datapath events'; curl -s --max-time 2 http://127.0.0.1:{ADMIN_PORT}/metrics | grep -E '^mesh_(datapath_events_total|proxy_config_unknown)'; \
             for m in FLOWS SOCKHASH STATS; do echo \"== $m\"; {agent} dump $m --pin-path {PIN}; done"
        );
        if let Ok(f) = fs::File::create(&file) {
            let _ = Command::new("sh")
                .arg("-c")
                .arg(script)
                .stdout(f.try_clone().map(Stdio::from).unwrap_or(Stdio::null()))
                .stderr(Stdio::from(f))
                .status();
        }
    }

    fn start_agent(&self, n: u32) -> Result<Agent> {
        let log = Path::new(SCRATCH).join(format!("agent-{n}.log"));
        let child = Command::new("sh")
            .arg("-c")
            // The agent must sit in the node's cgroup: sockops sees the proxy's sockets
            // only there.
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
            .arg(&self.cgroup)
            .arg(&self.bins.agent)
            .arg("run")
            .arg("--config")
            .arg(config_path())
            .args(["--pin-path", PIN])
            .arg("--cgroup")
            .arg(&self.cgroup)
            .args(["--proxy-address", &format!("{NET}.1:15001")])
            .args(["--admin-address", &format!("127.0.0.1:{ADMIN_PORT}")])
            .args(["--xds-listen", &format!("127.0.0.1:{XDS_PORT}")])
            .args(["--reload-interval-ms", "200"])
            .env("MESH_LOG", "info")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()?;
        let mut agent = Agent {
            pid: child.id(),
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if admin_get("/ready").is_ok_and(|b| b.starts_with("ready")) {
                return Ok(agent);
            }
            if let Some(st) = agent
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "agent exited ({st}) before ready; log {}",
                    agent.log.display()
                );
            }
            if Instant::now() > deadline {
                bail!("agent not ready after 30 s; log {}", agent.log.display());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn cli(&self, args: &[&str]) -> Result<Value> {
        let out = Command::new(&self.bins.agent)
            .args(args)
            .args(["-o", "json", "--pin-path", PIN])
            .output()?;
        if !out.status.success() {
            bail!(
                "mesh-agent {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for c in self.servers.lock().unwrap().iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Err(e) = clean() {
            eprintln!("soak: {e:#}");
        }
    }
}

struct Agent {
    child: Option<Child>,
    pid: u32,
    log: PathBuf,
}

impl Agent {
    /// SIGTERM and wait: (exit code, seconds it took); killed after 30 s.
    fn stop(&mut self) -> (Option<i32>, f64) {
        let t = Instant::now();
        let Some(mut c) = self.child.take() else {
            return (None, 0.0);
        };
        signal(self.pid, "TERM");
        let deadline = t + Duration::from_secs(30);
        let code = loop {
            if let Ok(Some(st)) = c.try_wait() {
                break st.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                break None;
            }
            thread::sleep(Duration::from_millis(20));
        };
        (code, t.elapsed().as_secs_f64())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn admin_get(path: &str) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", ADMIN_PORT))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_owned())
}

fn config_path() -> PathBuf {
    Path::new(SCRATCH).join("mesh.yaml")
}

/// The standalone file's moving parts.
struct Config {
    version: u64,
    /// Weight of `api` (v1) in the split route; `api-v2` gets the rest.
    weight_v1: u32,
    /// The `x-canary: 1` -> v2 route is present.
    canary: bool,
    least_request: bool,
    batch_enrolled: bool,
    /// Pods enrolled for a while: name -> host.
    ephemeral: BTreeMap<String, u8>,
}

impl Config {
    fn render(&self) -> String {
        let mut y = format!(
            "# cargo xtask soak, version {v}\nnamespaces:\n\
             \x20 - name: shop\n    labels: {{ mesh-agent.io/dataplane-mode: ambient }}\n\
             \x20 - name: batch\n    labels: {{ mesh-agent.io/dataplane-mode: {batch} }}\n\
             \x20 - name: backend\n\
             \x20 - name: cache\n    mode: direct\n\
             workloads:\n",
            v = self.version,
            batch = if self.batch_enrolled {
                "ambient"
            } else {
                "none"
            },
        );
        let eph = self
            .ephemeral
            .iter()
            .map(|(n, h)| (n.as_str(), "shop", *h, ""));
        for (name, ns, host, labels) in PODS
            .iter()
            .map(|p| (p.name, p.namespace, p.host, p.labels))
            .chain(eph)
        {
            y += &format!(
                "  - {{ name: {name}, namespace: {ns}, ip: {ip}, netns: /run/netns/{NETNS_PREFIX}{name}, labels: {{ {labels} }} }}\n",
                ip = ip(host)
            );
        }
        y += &format!(
            "services:\n\
             \x20 - name: api\n    namespace: backend\n    vip: {VIP}\n\
             \x20   ports: [ {{ port: 80, target_port: 8081, protocol: http }} ]\n\
             \x20   selector: {{ app: api, version: v1 }}\n\
             \x20   lb: {{ policy: {lb} }}\n\
             \x20   routes:\n",
            lb = if self.least_request {
                "least_request"
            } else {
                "round_robin"
            }
        );
        if self.canary {
            y += "      - name: canary\n        match: { headers: [ { name: x-canary, exact: \"1\" } ] }\n        backends: [ { service: api-v2 } ]\n";
        }
        y += &format!(
            "      - name: split\n        match: {{ prefix: / }}\n        backends: [ {{ service: api, weight: {w1} }}, {{ service: api-v2, weight: {w2} }} ]\n\
             \x20 - name: api-v2\n    namespace: backend\n    vip: {VIP_V2}\n\
             \x20   ports: [ {{ port: 80, target_port: 8081, protocol: http }} ]\n\
             \x20   selector: {{ app: api, version: v2 }}\n",
            w1 = self.weight_v1,
            w2 = 100 - self.weight_v1
        );
        y
    }

    fn write(&self) -> Result<()> {
        let tmp = Path::new(SCRATCH).join("mesh.yaml.tmp");
        fs::write(&tmp, self.render())?;
        fs::rename(&tmp, config_path())?;
        Ok(())
    }

    /// (IPs of enrolled workloads: WORKLOADS, every workload IP -> direct: DESTS)
    fn expected(&self) -> (BTreeSet<String>, BTreeMap<String, bool>) {
        let mut enrolled = BTreeSet::new();
        let mut dests = BTreeMap::new();
        for p in PODS {
            if p.namespace == "shop" || (p.namespace == "batch" && self.batch_enrolled) {
                enrolled.insert(ip(p.host));
            }
            dests.insert(ip(p.host), p.namespace == "cache");
        }
        for h in self.ephemeral.values() {
            enrolled.insert(ip(*h));
            dests.insert(ip(*h), false);
        }
        (enrolled, dests)
    }
}

/// One client run.
struct Outcome {
    class: &'static str,
    start: f64,
    end: f64,
    ok: bool,
    /// Bytes echoed back intact (L4), each way.
    bytes: u64,
    /// Requests answered as expected (L7).
    requests: u64,
    error: Option<(String, String)>,
}

struct Sample {
    t: f64,
    lifetime: u32,
    rss_kb: u64,
    fds: u64,
}

#[derive(Default)]
struct Churn {
    pushes: u64,
    relabels: u64,
    pods_enrolled: u64,
    pods_removed: u64,
}

struct Restart {
    begin: f64,
    stopped: f64,
    ready: Option<f64>,
    exit_code: Option<i32>,
    stop_secs: f64,
}

struct Shared {
    t0: Instant,
    node: Node,
    stop: AtomicBool,
    paused: AtomicBool,
    in_flight: AtomicU64,
    agent_pid: AtomicU32,
    lifetime: AtomicU32,
    config: Mutex<Config>,
    outcomes: Mutex<Vec<Outcome>>,
    samples: Mutex<Vec<Sample>>,
    churn: Mutex<Churn>,
    gateway: Mutex<GatewayWatch>,
}

impl Shared {
    fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn record(&self, o: Outcome) {
        self.outcomes.lock().unwrap().push(o);
    }

    /// Runs `f` as one unit of traffic unless a checkpoint holds traffic back; false when
    /// the run is over.
    fn traffic(&self, f: impl FnOnce()) -> bool {
        loop {
            if self.stop.load(SeqCst) {
                return false;
            }
            if !self.paused.load(SeqCst) {
                self.in_flight.fetch_add(1, SeqCst);
                // Checked again after counting ourselves: a checkpoint either sees us in
                // flight or we see it.
                if !self.paused.load(SeqCst) {
                    break;
                }
                self.in_flight.fetch_sub(1, SeqCst);
            }
            thread::sleep(Duration::from_millis(50));
        }
        f();
        self.in_flight.fetch_sub(1, SeqCst);
        true
    }

    fn write_config(&self, change: impl FnOnce(&mut Config, &mut Churn)) -> Result<()> {
        let mut c = self.config.lock().unwrap();
        change(&mut c, &mut self.churn.lock().unwrap());
        c.version += 1;
        c.write()
    }
}

/// `podtool echo-client`, classified: intact, or why not.
fn echo(sh: &Shared, class: &'static str, from: &str, to: &str, bytes: usize) {
    let start = sh.now();
    let args: Vec<String> = ["echo-client", "--to", to, "--bytes", &bytes.to_string()]
        .map(String::from)
        .into();
    let res = sh.node.client(from, &args);
    let end = sh.now();
    let (ok, error) = match res {
        Err(e) => (false, Some(e)),
        Ok(v) if v["intact"].as_u64() == Some(1) => (true, None),
        Ok(v) => {
            let errors: Vec<String> = v["errors"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|e| e.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            let detail = format!("{from} -> {to}: {v}");
            let kind = if errors.iter().any(|e| e.starts_with("connect:")) {
                "connect"
            } else if errors.iter().any(|e| {
                ["ECONNRESET", "EPIPE", "ENOTCONN"]
                    .iter()
                    .any(|k| e.contains(k))
            }) {
                "reset"
            } else if !errors.is_empty() {
                "other"
            } else if v["received"].as_u64().unwrap_or(0) < bytes as u64 {
                // A clean end of stream short of the bytes sent: the one thing a cut relay
                // must never look like.
                "truncated"
            } else {
                "corrupted"
            };
            (false, Some((kind.to_owned(), detail)))
        }
    };
    diagnose_connect_timeout(sh, from, &error);
    sh.record(Outcome {
        class,
        start,
        end,
        ok,
        bytes: if ok { bytes as u64 } else { 0 },
        requests: 0,
        error,
    });
}

/// A connect that timed out (nothing answered the SYN, where a refused or unreachable
/// one fails at once): what the pod, the node and the agent show (`connect-<pod>-<ms>.log`).
fn diagnose_connect_timeout(sh: &Shared, pod: &str, error: &Option<(String, String)>) {
    if let Some((kind, detail)) = error {
        if kind == "connect" && (detail.contains("timed out") || detail.contains("ETIMEDOUT")) {
            sh.node.diagnose("connect", pod, detail);
        }
    }
}

/// `podtool http-load` to the service VIP: every response a whole 200 from v1 or v2.
fn http(sh: &Shared, class: &'static str, from: &str, requests: u64, canary: bool) {
    let start = sh.now();
    let mut args: Vec<String> = [
        "http-load",
        "--to",
        &format!("{VIP}:80"),
        "--requests",
        &requests.to_string(),
        "--per-conn",
        "20",
        "--expect",
        "api-v1,api-v2",
    ]
    .map(String::from)
    .into();
    if canary {
        args.extend(["--header".into(), "x-canary: 1".into()]);
    }
    let res = sh.node.client(from, &args);
    let end = sh.now();
    let (ok, answered, error) = match res {
        Err(e) => (false, 0, Some(e)),
        Ok(v) => {
            let answered = v["ok"].as_u64().unwrap_or(0);
            match v["error"]["kind"].as_str() {
                None if answered == requests => (true, answered, None),
                kind => (
                    false,
                    answered,
                    Some((kind.unwrap_or("other").to_owned(), format!("{from}: {v}"))),
                ),
            }
        }
    };
    diagnose_connect_timeout(sh, from, &error);
    sh.record(Outcome {
        class,
        start,
        end,
        ok,
        bytes: 0,
        requests: answered,
        error,
    });
}

enum Worker {
    Echo {
        class: &'static str,
        from: &'static str,
        to: String,
        sizes: &'static [usize],
    },
    Http {
        class: &'static str,
        from: &'static str,
        canary: bool,
    },
}

const KIB: usize = 1024;
const PROXIED_SIZES: &[usize] = &[64 * KIB, 1024 * KIB, 4096 * KIB, 256 * KIB, 16 * KIB];
const DIRECT_SIZES: &[usize] = &[1024 * KIB, 8192 * KIB, 64 * KIB];

fn workers() -> Vec<Worker> {
    vec![
        Worker::Echo {
            class: "l4-proxied",
            from: "c1",
            to: format!("{}:8080", ip(10)),
            sizes: PROXIED_SIZES,
        },
        Worker::Echo {
            class: "l4-proxied",
            from: "c3",
            to: format!("{}:8080", ip(11)),
            sizes: PROXIED_SIZES,
        },
        Worker::Echo {
            class: "l4-direct",
            from: "c2",
            to: format!("{}:6379", ip(12)),
            sizes: DIRECT_SIZES,
        },
        Worker::Echo {
            class: "l4-relabelled",
            from: "b1",
            to: format!("{}:8080", ip(10)),
            sizes: PROXIED_SIZES,
        },
        Worker::Http {
            class: "l7",
            from: "c2",
            canary: false,
        },
        Worker::Http {
            class: "l7",
            from: "c3",
            canary: true,
        },
    ]
}

fn run_worker(sh: &Shared, w: &Worker) {
    let mut i = 0usize;
    while sh.traffic(|| match w {
        Worker::Echo {
            class,
            from,
            to,
            sizes,
        } => echo(sh, class, from, to, sizes[i % sizes.len()]),
        Worker::Http {
            class,
            from,
            canary,
        } => http(sh, class, from, 100, *canary && i.is_multiple_of(2)),
    }) {
        i += 1;
        thread::sleep(Duration::from_millis(50));
    }
}

/// The enrolled IPs in WORKLOADS (None while the pins are away, e.g. during a restart).
fn workload_ips(sh: &Shared) -> Option<BTreeSet<String>> {
    let v = sh.node.cli(&["dump", "WORKLOADS"]).ok()?;
    Some(
        v.as_array()?
            .iter()
            .filter_map(|r| r["ip"].as_str().map(String::from))
            .collect(),
    )
}

/// Pods that come and go: create, enrol, send (L4 and L7), remove from the file, delete.
fn ephemeral_pods(sh: &Shared) {
    let mut k = 0u32;
    while sh.traffic(|| {
        k += 1;
        let name = format!("eph{k}");
        let host = 100 + (k % 100) as u8;
        let addr = ip(host);
        let start = sh.now();
        let fail = |kind: &str, detail: String| {
            sh.record(Outcome {
                class: "pod-churn",
                start,
                end: sh.now(),
                ok: false,
                bytes: 0,
                requests: 0,
                error: Some((kind.into(), detail)),
            })
        };
        if let Err(e) = sh.node.add_pod(&name, host) {
            fail("other", format!("creating pod {name}: {e:#}"));
            return;
        }
        let wait = |present: bool| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if workload_ips(sh).is_some_and(|s| s.contains(&addr) == present) {
                    return true;
                }
                thread::sleep(Duration::from_millis(100));
            }
            false
        };
        let enrolled = sh
            .write_config(|c, churn| {
                c.ephemeral.insert(name.clone(), host);
                churn.pods_enrolled += 1;
            })
            .is_ok()
            && wait(true);
        if enrolled {
            echo(
                sh,
                "l4-new-pod",
                &name,
                &format!("{}:8080", ip(10)),
                512 * KIB,
            );
            http(sh, "l7-new-pod", &name, 20, false);
        } else {
            fail(
                "enrol_timeout",
                format!("{name} ({addr}) not in WORKLOADS after 10 s"),
            );
        }
        let _ = sh.write_config(|c, churn| {
            c.ephemeral.remove(&name);
            churn.pods_removed += 1;
        });
        if !wait(false) {
            fail(
                "enrol_timeout",
                format!("{name} ({addr}) still in WORKLOADS 10 s after removal"),
            );
        }
        sh.node.remove_pod(&name, host);
        sh.record(Outcome {
            class: "pod-churn",
            start,
            end: sh.now(),
            ok: enrolled,
            bytes: 0,
            requests: 0,
            error: None,
        });
    }) {
        thread::sleep(Duration::from_secs(2));
    }
}

/// RSS and fds of the running agent, every second.
fn sampler(sh: &Shared) {
    while !sh.stop.load(SeqCst) || sh.agent_pid.load(SeqCst) != 0 {
        let pid = sh.agent_pid.load(SeqCst);
        if pid != 0 {
            let rss = fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                });
            let fds = fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64);
            if let (Some(rss_kb), Ok(fds)) = (rss, fds) {
                sh.samples.lock().unwrap().push(Sample {
                    t: sh.now(),
                    lifetime: sh.lifetime.load(SeqCst),
                    rss_kb,
                    fds,
                });
            }
        }
        watch_gateway(sh);
        thread::sleep(Duration::from_secs(1));
    }
}

/// What the node's L2 did to the pods' gateway (`{NET}.1`, the proxy's address).
#[derive(Default)]
struct GatewayWatch {
    /// The bridge's MAC at the last sample, and how often it changed.
    bridge_mac: String,
    mac_changes: u64,
    /// (pod, MAC) -> (first seen, last seen, samples): a pod's neighbour entry for the
    /// gateway naming a MAC that no bridge port (nor the bridge) has any more. Frames to
    /// it are flooded as unknown unicast and never reach the node's stack: connects to the
    /// proxy (every captured connect) time out until the pod re-resolves the gateway.
    blackholed: BTreeMap<(String, String), (f64, f64, u64)>,
}

/// Samples the bridge's MAC and each pod's neighbour entry for the gateway.
fn watch_gateway(sh: &Shared) {
    let pods: Vec<&str> = PODS.iter().map(|p| p.name).collect();
    let script = format!(
        "cat /sys/class/net/{BRIDGE}/address; bridge fdb show br {BRIDGE} | awk '/permanent/ {{print \"local\", $1}}'; \
         for p in {}; do echo \"pod $p $(ip -n {NETNS_PREFIX}$p neigh show {NET}.1)\"; done",
        pods.join(" ")
    );
    let Ok(out) = shell(&script) else {
        return;
    };
    let t = sh.now();
    let mut lines = out.lines();
    let mac = lines.next().unwrap_or_default().trim().to_owned();
    let mut local = BTreeSet::new();
    let mut neigh = Vec::new();
    for l in lines {
        let w: Vec<&str> = l.split_whitespace().collect();
        match w.as_slice() {
            ["local", m] => {
                local.insert(m.to_string());
            }
            ["pod", pod, rest @ ..] => {
                if let Some(i) = rest.iter().position(|x| *x == "lladdr") {
                    if let Some(m) = rest.get(i + 1) {
                        neigh.push((pod.to_string(), m.to_string()));
                    }
                }
            }
            _ => {}
        }
    }
    let mut g = sh.gateway.lock().unwrap();
    if !g.bridge_mac.is_empty() && g.bridge_mac != mac {
        g.mac_changes += 1;
    }
    g.bridge_mac = mac;
    if local.is_empty() {
        return;
    }
    for (pod, m) in neigh {
        if !local.contains(&m) {
            let e = g.blackholed.entry((pod, m)).or_insert((t, t, 0));
            e.1 = t;
            e.2 += 1;
        }
    }
}

fn map_counts(sh: &Shared) -> Result<BTreeMap<String, i64>> {
    let v = sh.node.cli(&["maps"])?;
    Ok(v.as_array()
        .context("maps: not a list")?
        .iter()
        .filter_map(|r| Some((r["name"].as_str()?.to_owned(), r["entries"].as_i64()?)))
        .collect())
}

fn agent_fds(pid: u32) -> u64 {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

/// Holds traffic, waits for it to drain, then compares the maps with the baseline and
/// the file. Returns the checkpoint's record (`ok` inside).
fn checkpoint(sh: &Shared, baseline: &BTreeMap<String, i64>, what: &str) -> Value {
    sh.paused.store(true, SeqCst);
    let t = sh.now();
    let deadline = Instant::now() + Duration::from_secs(120);
    while sh.in_flight.load(SeqCst) > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    let drained_traffic = sh.in_flight.load(SeqCst) == 0;
    let (want_wl, want_dests) = sh.config.lock().unwrap().expected();
    // Closing sockets leave the maps within a moment; allow a few seconds.
    let settle = Instant::now();
    let mut last = (BTreeMap::new(), vec!["not checked".to_owned()]);
    while settle.elapsed() < Duration::from_secs(10) {
        let mut problems = Vec::new();
        let counts = map_counts(sh).unwrap_or_else(|e| {
            problems.push(format!("maps: {e:#}"));
            BTreeMap::new()
        });
        for m in CONN_MAPS {
            let (now, base) = (counts.get(*m).copied(), baseline.get(*m).copied());
            if now.is_none() || now > base {
                problems.push(format!("{m}: {now:?} entries, baseline {base:?}"));
            }
        }
        match workload_ips(sh) {
            Some(got) if got == want_wl => {}
            got => problems.push(format!("WORKLOADS {got:?}, file says {want_wl:?}")),
        }
        let dests: Option<BTreeMap<String, bool>> =
            sh.node.cli(&["dump", "DESTS"]).ok().and_then(|v| {
                Some(
                    v.as_array()?
                        .iter()
                        .filter_map(|r| {
                            Some((
                                r["ip"].as_str()?.to_owned(),
                                r["flags"].as_str().unwrap_or("").contains("direct"),
                            ))
                        })
                        .collect(),
                )
            });
        if dests.as_ref() != Some(&want_dests) {
            problems.push(format!("DESTS {dests:?}, file says {want_dests:?}"));
        }
        last = (counts, problems);
        if last.1.is_empty() {
            break;
        }
        thread::sleep(Duration::from_millis(250));
    }
    let pid = sh.agent_pid.load(SeqCst);
    let fds = agent_fds(pid);
    let mut problems = last.1;
    if !drained_traffic {
        problems.push("traffic did not stop within 120 s".into());
    }
    let ok = problems.is_empty();
    eprintln!(
        "soak: checkpoint ({what}) at {t:.0} s: {} (settled in {:.1} s; maps {:?}; agent fds {fds})",
        if ok { "ok" } else { "FAILED" },
        settle.elapsed().as_secs_f64(),
        last.0
    );
    for p in &problems {
        eprintln!("soak:   {p}");
    }
    sh.paused.store(false, SeqCst);
    // Which way connections went in this agent's lifetime (fail-open bypasses, refusals).
    let events: BTreeMap<String, u64> = sh
        .node
        .cli(&["dump", "STATS"])
        .ok()
        .and_then(|v| {
            Some(
                v.as_array()?
                    .iter()
                    .filter_map(|r| Some((r["event"].as_str()?.to_owned(), r["count"].as_u64()?)))
                    .filter(|(_, n)| *n > 0)
                    .collect(),
            )
        })
        .unwrap_or_default();
    json!({"what": what, "t_secs": t, "lifetime": sh.lifetime.load(SeqCst), "ok": ok,
        "settle_secs": settle.elapsed().as_secs_f64(), "maps": last.0, "agent_fds": fds,
        "datapath_events": events, "problems": problems})
}

fn median(v: &mut [u64]) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[v.len() / 2]
}

fn stats(mut v: Vec<u64>) -> Value {
    let (min, max) = (
        v.iter().min().copied().unwrap_or(0),
        v.iter().max().copied().unwrap_or(0),
    );
    json!({"min": min, "median": median(&mut v), "max": max})
}

/// Per lifetime after warm-up: median of the last third against the first third.
/// RSS may grow by 10% or 4 MiB, whichever is larger (the allocator keeps freed pages,
/// and the mix of 16 KiB..4 MiB transfers in flight at a sample moves the working set by
/// a few MiB); fds by twice the traffic workers plus 8 (each proxied connection holds two
/// fds, pooled upstream connections stay open).
fn flatness(samples: &[Sample], fd_tolerance: u64) -> (Vec<Value>, Vec<String>) {
    let mut lifetimes: BTreeMap<u32, Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        lifetimes.entry(s.lifetime).or_default().push(s);
    }
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    for (n, ss) in lifetimes {
        let t_start = ss.first().map(|s| s.t).unwrap_or(0.0);
        let judged: Vec<&&Sample> = ss.iter().filter(|s| s.t - t_start >= WARMUP_SECS).collect();
        let all_rss: Vec<u64> = ss.iter().map(|s| s.rss_kb).collect();
        let all_fds: Vec<u64> = ss.iter().map(|s| s.fds).collect();
        let mut row = json!({"lifetime": n, "samples": ss.len(),
            "rss_kb": stats(all_rss), "fds": stats(all_fds)});
        if judged.len() < 15 {
            row["flat"] = json!("not judged (under 25 s of samples)");
            rows.push(row);
            continue;
        }
        let third = judged.len() / 3;
        let part = |r: &[&&Sample], f: fn(&Sample) -> u64| {
            median(&mut r.iter().map(|s| f(s)).collect::<Vec<_>>())
        };
        let (rss1, rss3) = (
            part(&judged[..third], |s| s.rss_kb),
            part(&judged[judged.len() - third..], |s| s.rss_kb),
        );
        let (fd1, fd3) = (
            part(&judged[..third], |s| s.fds),
            part(&judged[judged.len() - third..], |s| s.fds),
        );
        let rss_tol = (rss1 / 10).max(4096);
        let rss_ok = rss3 <= rss1 + rss_tol;
        let fd_ok = fd3 <= fd1 + fd_tolerance;
        if !rss_ok {
            problems.push(format!(
                "agent lifetime {n}: RSS grew from {rss1} kB to {rss3} kB (median of first vs last third; tolerance {rss_tol} kB)"
            ));
        }
        if !fd_ok {
            problems.push(format!(
                "agent lifetime {n}: fds grew from {fd1} to {fd3} (tolerance {fd_tolerance})"
            ));
        }
        row["flat"] = json!({"rss_first_third_kb": rss1, "rss_last_third_kb": rss3,
            "rss_tolerance_kb": rss_tol, "fds_first_third": fd1, "fds_last_third": fd3,
            "fds_tolerance": fd_tolerance, "ok": rss_ok && fd_ok});
        rows.push(row);
    }
    (rows, problems)
}

fn firewall_rules() -> usize {
    let ipt = shell("iptables-save 2>/dev/null || true").unwrap_or_default();
    let nft = shell("nft list ruleset 2>/dev/null || true").unwrap_or_default();
    ipt.lines().filter(|l| l.starts_with("-A")).count()
        + nft
            .lines()
            .filter(|l| l.trim_start().starts_with("table"))
            .count()
}

/// A soak of `opts.minutes`; the summary goes to stdout and target/soak/<time>/.
pub fn run(root: &Path, opts: &Options, bins: &Bins) -> Result<()> {
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK)
        .with_context(|| format!("opening {LOCK}"))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            bail!("another `cargo xtask soak` is running on this machine (it holds {LOCK})")
        }
        Err(fs::TryLockError::Error(e)) => return Err(e).context(LOCK),
    }
    let left = leftovers()?;
    if !left.is_empty() {
        eprintln!(
            "soak: removing what an interrupted soak left: {}",
            left.join(", ")
        );
        clean()?;
    }
    let stamp = shell("date +%Y%m%d-%H%M%S")?.trim().to_owned();
    let out_dir = root.join("target/soak").join(&stamp);
    fs::create_dir_all(&out_dir)?;
    let firewall_before = firewall_rules();
    let node = Node::new(bins)?;
    for (pod, args) in [
        ("api", vec!["echo", "--listen", "0.0.0.0:8080"]),
        (
            "api",
            vec!["http", "--listen", "0.0.0.0:8081", "--name", "api-v1"],
        ),
        ("api2", vec!["echo", "--listen", "0.0.0.0:8080"]),
        (
            "api2",
            vec!["http", "--listen", "0.0.0.0:8081", "--name", "api-v2"],
        ),
        ("redis", vec!["echo", "--listen", "0.0.0.0:6379"]),
    ] {
        node.serve(pod, &args)?;
    }
    let config = Config {
        version: 1,
        weight_v1: 50,
        canary: true,
        least_request: false,
        batch_enrolled: true,
        ephemeral: BTreeMap::new(),
    };
    config.write()?;
    let sh = Arc::new(Shared {
        t0: Instant::now(),
        node,
        stop: AtomicBool::new(false),
        paused: AtomicBool::new(false),
        in_flight: AtomicU64::new(0),
        agent_pid: AtomicU32::new(0),
        lifetime: AtomicU32::new(1),
        config: Mutex::new(config),
        outcomes: Mutex::new(Vec::new()),
        samples: Mutex::new(Vec::new()),
        churn: Mutex::new(Churn::default()),
        gateway: Mutex::new(GatewayWatch::default()),
    });
    let result = soak(&sh, opts, &out_dir);
    // Logs are kept with the summary, whatever happened.
    if let Ok(rd) = fs::read_dir(SCRATCH) {
        for e in rd.flatten() {
            let name = e.file_name();
            if name.to_string_lossy().ends_with(".log") || name == "mesh.yaml" {
                let _ = fs::copy(e.path(), out_dir.join(&name));
            }
        }
    }
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            sh.stop.store(true, SeqCst);
            return Err(e.context(format!("soak aborted; logs in {}", out_dir.display())));
        }
    };
    drop(sh);
    let firewall_after = firewall_rules();
    let mut summary = summary;
    summary["firewall_rules"] = json!({"before": firewall_before, "after": firewall_after});
    let mut failures: Vec<String> = summary["failures"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if firewall_after != firewall_before {
        failures.push(format!(
            "iptables/nftables rules changed during the soak: {firewall_before} -> {firewall_after}"
        ));
    }
    summary["failures"] = json!(failures);
    summary["ok"] = json!(failures.is_empty());
    let file = out_dir.join("summary.json");
    fs::write(&file, serde_json::to_string_pretty(&summary)? + "\n")?;
    let _ = fs::copy(&file, root.join("target/soak/latest.json"));
    print_summary(&summary);
    eprintln!("soak: summary in {}", file.display());
    if !failures.is_empty() {
        bail!("soak failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

fn soak(sh: &Arc<Shared>, opts: &Options, out_dir: &Path) -> Result<Value> {
    let total = Duration::from_secs_f64(opts.minutes * 60.0);
    let mut agent = sh.node.start_agent(1)?;
    sh.agent_pid.store(agent.pid, SeqCst);
    // Baseline: ready, no traffic yet.
    thread::sleep(Duration::from_secs(1));
    let baseline = map_counts(sh)?;
    let baseline_fds = agent_fds(agent.pid);
    eprintln!(
        "soak: node up, agent ready; baseline maps {baseline:?}, agent fds {baseline_fds}; {} min of traffic, churn and restarts every {} s (output {})",
        opts.minutes,
        opts.restart_secs,
        out_dir.display()
    );
    let workers = workers();
    let n_workers = workers.len() as u64 + 1;
    let mut handles = Vec::new();
    {
        let s = sh.clone();
        handles.push(thread::spawn(move || sampler(&s)));
    }
    for w in workers {
        let s = sh.clone();
        handles.push(thread::spawn(move || run_worker(&s, &w)));
    }
    {
        let s = sh.clone();
        handles.push(thread::spawn(move || ephemeral_pods(&s)));
    }

    // Churn and restarts, on one timeline: (next due time, period).
    let end = sh.t0 + total;
    let push_every = Duration::from_secs(10);
    let relabel_every = Duration::from_secs(17);
    let restart_every = Duration::from_secs(opts.restart_secs.max(10));
    // At least one checkpoint mid-run, more on long runs.
    let checkpoint_every = Duration::from_secs(opts.checkpoint_secs.max(30))
        .min(total / 2)
        .max(Duration::from_secs(20));
    let mut next_push = sh.t0 + push_every;
    let mut next_relabel = sh.t0 + relabel_every;
    let mut next_restart = sh.t0 + restart_every;
    let mut next_checkpoint = sh.t0 + checkpoint_every;
    let mut restarts: Vec<Restart> = Vec::new();
    let mut checkpoints = Vec::new();
    let mut lifetime = 1u32;
    let mut push_n = 0u64;
    let mut stopped_badly = Vec::new();
    loop {
        let due = next_push
            .min(next_relabel)
            .min(next_restart)
            .min(next_checkpoint);
        if due >= end {
            break;
        }
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            thread::sleep(d);
        }
        if Instant::now() >= next_push {
            push_n += 1;
            let weights = [90, 70, 50, 30, 10];
            sh.write_config(|c, churn| {
                c.weight_v1 = weights[push_n as usize % weights.len()];
                c.canary = push_n.is_multiple_of(2);
                c.least_request = push_n.is_multiple_of(3);
                churn.pushes += 1;
            })?;
            next_push += push_every;
        } else if Instant::now() >= next_relabel {
            sh.write_config(|c, churn| {
                c.batch_enrolled = !c.batch_enrolled;
                churn.relabels += 1;
            })?;
            next_relabel += relabel_every;
        } else if Instant::now() >= next_checkpoint {
            checkpoints.push(checkpoint(sh, &baseline, "mid-run"));
            next_checkpoint += checkpoint_every;
        } else if Instant::now() >= next_restart {
            let begin = sh.now();
            let (code, stop_secs) = agent.stop();
            sh.agent_pid.store(0, SeqCst);
            let stopped = sh.now();
            if code != Some(0) {
                stopped_badly.push(format!(
                    "agent lifetime {lifetime} ended with {code:?} after SIGTERM ({stop_secs:.1} s)"
                ));
            }
            lifetime += 1;
            sh.lifetime.store(lifetime, SeqCst);
            let started = sh.node.start_agent(lifetime);
            let ready = sh.now();
            eprintln!(
                "soak: restart {} at {begin:.0} s: stopped in {stop_secs:.1} s (exit {code:?}), ready {:.1} s later",
                restarts.len() + 1,
                ready - stopped
            );
            restarts.push(Restart {
                begin,
                stopped,
                ready: started.is_ok().then_some(ready),
                exit_code: code,
                stop_secs,
            });
            agent = started?;
            sh.agent_pid.store(agent.pid, SeqCst);
            next_restart += restart_every;
        }
    }
    if let Some(d) = end.checked_duration_since(Instant::now()) {
        thread::sleep(d);
    }
    // Traffic ends; the last transfers finish (each is bounded by CLIENT_TIMEOUT).
    sh.stop.store(true, SeqCst);
    let stop_t = sh.now();
    while sh.in_flight.load(SeqCst) > 0 {
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!("soak: traffic stopped at {stop_t:.0} s");
    checkpoints.push(checkpoint(sh, &baseline, "final"));
    let final_fds = agent_fds(agent.pid);
    let (code, stop_secs) = agent.stop();
    sh.agent_pid.store(0, SeqCst);
    if code != Some(0) {
        stopped_badly.push(format!(
            "agent lifetime {lifetime} ended with {code:?} after SIGTERM ({stop_secs:.1} s)"
        ));
    }
    let pins_left = fs::read_dir(PIN).map(|d| d.count()).unwrap_or(0);
    for h in handles {
        let _ = h.join();
    }
    Ok(evaluate(
        sh,
        opts,
        &restarts,
        checkpoints,
        stopped_badly,
        (baseline, baseline_fds, final_fds),
        pins_left,
        n_workers,
    ))
}

#[expect(
    clippy::too_many_arguments,
    reason = "one call site; the pieces are the run's records"
)]
fn evaluate(
    sh: &Shared,
    opts: &Options,
    restarts: &[Restart],
    checkpoints: Vec<Value>,
    mut failures: Vec<String>,
    (baseline, baseline_fds, final_fds): (BTreeMap<String, i64>, u64, u64),
    pins_left: usize,
    n_workers: u64,
) -> Value {
    let windows: Vec<(f64, f64)> = restarts
        .iter()
        .map(|r| (r.begin, r.ready.unwrap_or(f64::MAX) + RESTART_GRACE_SECS))
        .collect();
    let in_window = |o: &Outcome| windows.iter().any(|&(b, e)| o.start <= e && o.end >= b);
    let outcomes = sh.outcomes.lock().unwrap();
    let mut classes: BTreeMap<&str, (u64, u64, u64, u64)> = BTreeMap::new();
    let mut restart_errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut bad_errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut samples_bad = Vec::new();
    for o in outcomes.iter() {
        let c = classes.entry(o.class).or_default();
        c.0 += 1;
        c.1 += o.ok as u64;
        c.2 += o.bytes;
        c.3 += o.requests;
        let Some((kind, detail)) = &o.error else {
            continue;
        };
        let key = format!("{}/{kind}", o.class);
        if RESTART_KINDS.contains(&kind.as_str()) && in_window(o) {
            *restart_errors.entry(key).or_default() += 1;
        } else {
            *bad_errors.entry(key).or_default() += 1;
            if samples_bad.len() < 20 {
                samples_bad.push(format!(
                    "{} at {:.1}-{:.1} s: {kind}: {detail}",
                    o.class, o.start, o.end
                ));
            }
        }
    }
    let transfers: u64 = outcomes
        .iter()
        .filter(|o| o.class.starts_with("l4"))
        .count() as u64;
    let bytes: u64 = outcomes.iter().map(|o| o.bytes).sum();
    let requests: u64 = outcomes.iter().map(|o| o.requests).sum();
    drop(outcomes);
    if !bad_errors.is_empty() {
        failures.push(format!(
            "failures outside what a restart may cause: {bad_errors:?}; first ones:\n    {}",
            samples_bad.join("\n    ")
        ));
    }
    for class in [
        "l4-proxied",
        "l4-direct",
        "l4-relabelled",
        "l7",
        "l4-new-pod",
        "l7-new-pod",
    ] {
        if classes.get(class).is_none_or(|c| c.1 == 0) {
            failures.push(format!(
                "no successful `{class}` transfer: the harness did not run"
            ));
        }
    }
    for r in restarts {
        if r.ready.is_none() {
            failures.push(format!(
                "agent not ready after the restart at {:.0} s",
                r.begin
            ));
        }
    }
    for c in &checkpoints {
        if c["ok"] != json!(true) {
            failures.push(format!(
                "checkpoint {} at {:.0} s: {}",
                c["what"],
                c["t_secs"].as_f64().unwrap_or(0.0),
                c["problems"]
            ));
        }
    }
    let fd_tolerance = 2 * n_workers + 8;
    let samples = sh.samples.lock().unwrap();
    let (lifetimes, flat_problems) = flatness(&samples, fd_tolerance);
    failures.extend(flat_problems);
    if final_fds > baseline_fds + fd_tolerance {
        failures.push(format!(
            "agent fds at the final checkpoint {final_fds}, at the start {baseline_fds} (tolerance {fd_tolerance})"
        ));
    }
    if pins_left != 0 {
        failures.push(format!(
            "{pins_left} pins left in {PIN} after the agent stopped"
        ));
    }
    let gateway = sh.gateway.lock().unwrap();
    let blackholed: Vec<Value> = gateway
        .blackholed
        .iter()
        .map(|((pod, mac), (first, last, n))| {
            json!({"pod": pod, "mac": mac, "first_secs": first, "last_secs": last, "samples": n})
        })
        .collect();
    if !blackholed.is_empty() {
        // The harness's node is broken, not the agent: say so, or the agent gets the blame
        // for connects that time out.
        failures.push(format!(
            "the simulated node blackholed pods' traffic to {NET}.1 (their neighbour entry named a MAC no port of {BRIDGE} has): {}",
            serde_json::to_string(&blackholed).unwrap_or_default()
        ));
    }
    let gateway_json = json!({
        "bridge_mac": gateway.bridge_mac,
        "bridge_mac_changes": gateway.mac_changes,
        "blackholed": blackholed,
    });
    drop(gateway);
    let churn = sh.churn.lock().unwrap();
    json!({
        "minutes": opts.minutes,
        "restart_secs": opts.restart_secs,
        "elapsed_secs": sh.now(),
        "transfers_l4": transfers,
        "bytes_intact_each_way": bytes,
        "requests_ok": requests,
        "by_class": classes.iter().map(|(k, (n, ok, b, r))| (k.to_string(), json!({"runs": n, "ok": ok, "bytes": b, "requests": r}))).collect::<BTreeMap<_, _>>(),
        "restarts": restarts.iter().map(|r| json!({"at_secs": r.begin, "stop_secs": r.stop_secs, "exit_code": r.exit_code,
            "start_to_ready_secs": r.ready.map(|t| t - r.stopped)})).collect::<Vec<_>>(),
        "config_changes": {"pushes": churn.pushes, "relabels": churn.relabels, "pods_enrolled": churn.pods_enrolled,
            "pods_removed": churn.pods_removed, "file_writes": sh.config.lock().unwrap().version - 1},
        "errors_in_restart_windows": restart_errors,
        "errors": bad_errors,
        "checkpoints": checkpoints,
        "baseline": {"maps": baseline, "agent_fds": baseline_fds},
        "final_agent_fds": final_fds,
        "agent_rss_kb": stats(samples.iter().map(|s| s.rss_kb).collect()),
        "agent_fds": stats(samples.iter().map(|s| s.fds).collect()),
        "lifetimes": lifetimes,
        "gateway": gateway_json,
        "failures": failures,
    })
}

fn print_summary(s: &Value) {
    let mb = |v: &Value| v.as_f64().unwrap_or(0.0) / 1024.0;
    println!(
        "== soak summary ({:.1} min)",
        s["elapsed_secs"].as_f64().unwrap_or(0.0) / 60.0
    );
    println!(
        "  L4 transfers {}, {:.1} MiB echoed intact each way; L7 requests answered {}",
        s["transfers_l4"],
        s["bytes_intact_each_way"].as_f64().unwrap_or(0.0) / 1048576.0,
        s["requests_ok"]
    );
    if let Some(m) = s["by_class"].as_object() {
        for (k, v) in m {
            println!(
                "    {k:<14} runs {:>6}  ok {:>6}  bytes {:>12}  requests {:>7}",
                v["runs"], v["ok"], v["bytes"], v["requests"]
            );
        }
    }
    let restarts = s["restarts"].as_array().map(Vec::len).unwrap_or(0);
    println!(
        "  restarts {restarts}; config changes {}",
        s["config_changes"]
    );
    println!(
        "  errors in restart windows (allowed): {}",
        s["errors_in_restart_windows"]
    );
    println!("  errors (not allowed): {}", s["errors"]);
    let (r, f) = (&s["agent_rss_kb"], &s["agent_fds"]);
    println!(
        "  agent RSS min/median/max {:.1}/{:.1}/{:.1} MiB; fds {}/{}/{}",
        mb(&r["min"]),
        mb(&r["median"]),
        mb(&r["max"]),
        f["min"],
        f["median"],
        f["max"]
    );
    if let Some(ls) = s["lifetimes"].as_array() {
        for l in ls {
            println!("    lifetime {}: {}", l["lifetime"], l["flat"]);
        }
    }
    if let Some(cs) = s["checkpoints"].as_array() {
        for c in cs {
            println!(
                "  checkpoint {} at {:.0} s: {} maps {}",
                c["what"],
                c["t_secs"].as_f64().unwrap_or(0.0),
                if c["ok"] == json!(true) {
                    "ok"
                } else {
                    "FAILED"
                },
                c["maps"]
            );
        }
    }
    println!("  gateway (bridge MAC, pods blackholed): {}", s["gateway"]);
    println!("  firewall rules before/after: {}", s["firewall_rules"]);
    println!(
        "  result: {}",
        if s["ok"] == json!(true) {
            "PASS"
        } else {
            "FAIL"
        }
    );
}
