//! **A test double of the Kubernetes API server**, not a Kubernetes API server: a small
//! in-memory server, over plain HTTP on 127.0.0.1, that speaks enough of the API for
//! `kubectl` (1.32) and `kube::runtime::watcher` to work against it, so the agent's
//! Kubernetes side is tested without a cluster. Objects are generic JSON; there is no
//! validation of their content, no defaulting beyond a few fields, no controllers, no
//! admission, no auth. `docs/testing-kubeapi.md` lists what is and is not implemented.
//!
//! In a test:
//!
//! ```no_run
//! use mesh_tests::kubeapi::KubeApi;
//! let api = KubeApi::start()?;                     // own thread and runtime, 127.0.0.1:0
//! api.kubectl(&["create", "namespace", "demo"])?;
//! api.kubectl_stdin(&["apply", "-f", "-"], "apiVersion: v1\nkind: Pod\n...")?;
//! // Pods start `Pending` without an IP, as a real server creates them:
//! api.kubectl(&["patch", "pod", "web", "-n", "demo", "--subresource=status",
//!               "--type=merge", "-p", r#"{"status":{"podIP":"10.0.0.5"}}"#])?;
//! let pods = api.objects("pods");                   // current state, all namespaces
//! api.drop_watches();                               // break every open watch mid-stream
//! api.compact();                                    // older resourceVersions now get 410
//! api.fail_next(2, 503);                            // the next 2 resource requests fail
//! assert!(api.stats().watches_opened >= 1);
//! // the agent: KUBECONFIG=api.kubeconfig(), or api.url() as the cluster URL
//! # anyhow::Ok(())
//! ```
//!
//! Each `KubeApi` is independent (own port, own state, own temp dir with the kubeconfig and
//! kubectl's cache), so tests run in parallel; `Drop` stops the server and removes the
//! temp dir. The standalone binary `kube-double` serves the same, with the fault knobs on
//! `/_double/...` (see its `--help`).

mod auth;
mod patch;
mod protobuf;
mod resources;
mod selector;
mod server;
mod store;

use std::{
    fs,
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

pub use auth::{service_account_user, API_AUDIENCE};
pub use server::{serve, Shared};

/// Knobs of one server.
#[derive(Debug, Clone)]
pub struct Options {
    /// Period of BOOKMARK events on watches that allow them (real servers: about 1 min).
    pub bookmark_interval: Duration,
    /// Events kept for watches to resume from; older resourceVersions get 410 Expired.
    pub history_limit: usize,
}

/// Default [`Options::bookmark_interval`]: 1 s, so tests see bookmarks quickly.
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// Default [`Options::history_limit`] (events).
pub const DEFAULT_HISTORY_LIMIT: usize = 10_000;

impl Default for Options {
    fn default() -> Options {
        Options {
            bookmark_interval: DEFAULT_BOOKMARK_INTERVAL,
            history_limit: DEFAULT_HISTORY_LIMIT,
        }
    }
}

/// Counters since start (fault-injection admin requests are not counted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// API requests, discovery included.
    pub requests: u64,
    /// List requests (GET on a collection without `watch`).
    pub lists: u64,
    pub gets: u64,
    pub creates: u64,
    pub updates: u64,
    pub patches: u64,
    /// DELETE requests, on one object or on a collection.
    pub deletes: u64,
    /// Watch requests, including the ones answered with a 410 ERROR event.
    pub watches_opened: u64,
    /// Watch streams being served now.
    pub watches_active: u64,
    /// Watches registered for live events (closed ones are counted until the next event).
    pub watches_registered: usize,
    /// Watch streams broken by `drop_watches`.
    pub watches_dropped: u64,
    /// ADDED/MODIFIED/DELETED events sent on watches.
    pub watch_events_sent: u64,
    pub bookmarks_sent: u64,
    /// 410 Expired answers: HTTP 410 on lists and ERROR events in watch streams.
    pub gone_sent: u64,
    /// Requests answered with an error from `fail_next`.
    pub injected_failures: u64,
    /// The current global resourceVersion.
    pub resource_version: u64,
}

impl Stats {
    pub fn to_json(&self) -> Value {
        json!({
            "requests": self.requests, "lists": self.lists, "gets": self.gets,
            "creates": self.creates, "updates": self.updates, "patches": self.patches,
            "deletes": self.deletes, "watches_opened": self.watches_opened,
            "watches_active": self.watches_active, "watches_registered": self.watches_registered,
            "watches_dropped": self.watches_dropped, "watch_events_sent": self.watch_events_sent,
            "bookmarks_sent": self.bookmarks_sent, "gone_sent": self.gone_sent,
            "injected_failures": self.injected_failures,
            "resource_version": self.resource_version,
        })
    }
}

/// The kubectl to run: `MESH_KUBECTL` (`cargo xtask test` sets it to the one the set-up
/// installs), else `kubectl` from `PATH`.
pub fn kubectl_bin() -> std::ffi::OsString {
    std::env::var_os("MESH_KUBECTL").unwrap_or_else(|| "kubectl".into())
}

/// A kubeconfig for a server at `url`, with namespace `default`.
pub fn kubeconfig_yaml(url: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: kube-double
  cluster:
    server: {url}
contexts:
- name: kube-double
  context:
    cluster: kube-double
    namespace: default
    user: kube-double
current-context: kube-double
users:
- name: kube-double
  user: {{}}
preferences: {{}}
"
    )
}

/// One running test double, on its own thread and current-thread runtime.
pub struct KubeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    dir: PathBuf,
    kubeconfig: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

fn unique_dir() -> Result<PathBuf> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "kube-double-{}-{n}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

impl KubeApi {
    /// Starts a server with default [`Options`] on 127.0.0.1:0.
    pub fn start() -> Result<KubeApi> {
        KubeApi::start_with(Options::default())
    }

    pub fn start_with(options: Options) -> Result<KubeApi> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(options, addr));
        let dir = unique_dir()?;
        let kubeconfig = dir.join("kubeconfig");
        fs::write(&kubeconfig, kubeconfig_yaml(&format!("http://{addr}")))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("tokio runtime")?;
        let serving = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("kube-double-{}", addr.port()))
            .spawn(move || {
                rt.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => {
                            serve(l, serving, async {
                                let _ = stopped.await;
                            })
                            .await
                        }
                        Err(e) => eprintln!("kube-double: {e}"),
                    }
                });
                // Dropping the runtime drops every connection task: open watches break.
                drop(rt);
            })?;
        Ok(KubeApi {
            addr,
            shared,
            dir,
            kubeconfig,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig (cluster `kube-double`, namespace `default`) in this server's temp dir.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Runs `kubectl ARGS --kubeconfig ...` (with its cache in the temp dir); the error
    /// carries kubectl's stderr, e.g. `Error from server (NotFound): pods "x" not found`.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.run_kubectl(args, None)
    }

    /// As [`KubeApi::kubectl`], with `stdin` written to kubectl (`["apply", "-f", "-"]`).
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Result<String> {
        self.run_kubectl(args, Some(stdin))
    }

    /// What the kubelet reports once a pod's sandbox runs: phase `Running` and its IP,
    /// written with `kubectl patch --subresource=status`.
    pub fn set_pod_running(&self, namespace: &str, pod: &str, ip: &str) -> Result<String> {
        self.kubectl(&[
            "patch",
            "pod",
            pod,
            "-n",
            namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            &format!(
                r#"{{"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}]}}}}"#
            ),
        ])
    }

    /// A `kubectl` command set up for this server, for a caller that spawns it (`-w`).
    pub fn kubectl_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(kubectl_bin());
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join("cache"))
            .args(args)
            .env("KUBECACHEDIR", self.dir.join("cache"))
            .env("HOME", &self.dir);
        cmd
    }

    fn run_kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut cmd = self.kubectl_command(args);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning kubectl (is it installed?)")?;
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().context("kubectl stdin")?;
            pipe.write_all(input.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The current objects of a resource (plural, e.g. `pods`, `httproutes`), all
    /// namespaces, with `apiVersion` and `kind`. Panics on a resource not served.
    pub fn objects(&self, resource: &str) -> Vec<Value> {
        self.shared.objects(resource)
    }

    /// Breaks every open watch stream (no final chunk: the client sees an error).
    pub fn drop_watches(&self) {
        self.shared.drop_watches();
    }

    /// Forgets the event history: watches and exact lists from any older resourceVersion
    /// get 410 Expired, as after an etcd compaction.
    pub fn compact(&self) {
        self.shared.compact();
    }

    /// The next `n` resource requests get HTTP `code` with a Status. Discovery
    /// (`/version`, `/api`, `/apis/...`, `/openapi/...`) and `/_double/` never fail.
    pub fn fail_next(&self, n: usize, code: u16) {
        self.shared.fail_next(n, code);
    }

    /// Delays every API request by `delay` (zero turns it off).
    pub fn set_delay(&self, delay: Duration) {
        self.shared.set_delay(delay);
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Watch streams being served now.
    pub fn watch_count(&self) -> u64 {
        self.shared.stats().watches_active
    }

    /// Makes `token` known to TokenReview (and SelfSubjectReview, for a client presenting
    /// it): `user` is the review's `status.user` (`service_account_user` builds one), and
    /// the token is valid for `audiences` only.
    pub fn set_token(&self, token: &str, user: Value, audiences: &[&str]) {
        self.shared.set_token(token, user, audiences);
    }

    /// Forgets `token`: its reviews fail from now on.
    pub fn remove_token(&self, token: &str) {
        self.shared.tokens.remove(token);
    }

    /// Every API request so far, as `METHOD /path?query` (the last 10 000).
    pub fn requests(&self) -> Vec<String> {
        self.shared.requests()
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
