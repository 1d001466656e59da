//! `mesh-agent top` used as a person would: started in a terminal (tmux), driven with keys
//! (`send-keys`), judged by what the screen shows (`capture-pane`). On a simulated node
//! with pods, a held connection and a service: the workloads are listed, Enter on the
//! client shows its connection's original destination, the Datapath pane shows
//! `connect_redirected`, a filter narrows the list, an agent that stops answering is said
//! while the last data stays, and `q` exits with the terminal restored.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use mesh_tests::{
    agent_bin,
    scenes::{shop_backend_data, Held},
    wait_for, Agent, SimNode,
};

/// A tmux server of its own (socket and session named alike, unique per test) running one
/// command in a 200x50 terminal; killed on drop, whatever the test's outcome, its socket
/// removed.
struct Tmux {
    name: String,
    socket: Option<String>,
}

impl Tmux {
    fn start(tag: &str, command: &str) -> Tmux {
        let mut t = Tmux {
            name: format!("mesh-top-{}-{tag}", std::process::id()),
            socket: None,
        };
        let ok = t
            .tmux(&[
                "new-session",
                "-d",
                "-s",
                &t.name,
                "-x",
                "200",
                "-y",
                "50",
                command,
            ])
            .status
            .success();
        assert!(
            ok,
            "tmux new-session failed (is tmux installed? cargo xtask setup)"
        );
        t.socket = Some(t.format("#{socket_path}")).filter(|s| !s.is_empty());
        t
    }

    fn tmux(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .args(["-L", &self.name])
            .args(args)
            .output()
            .expect("run tmux")
    }

    /// Keys by tmux's names (`Enter`, `Escape`, `j`).
    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", &self.name];
        args.extend_from_slice(keys);
        assert!(self.tmux(&args).status.success(), "send-keys {keys:?}");
    }

    /// Text typed as is.
    fn type_text(&self, text: &str) {
        assert!(self
            .tmux(&["send-keys", "-t", &self.name, "-l", text])
            .status
            .success());
    }

    fn resize(&self, width: u16, height: u16) {
        let (w, h) = (width.to_string(), height.to_string());
        assert!(self
            .tmux(&["resize-window", "-t", &self.name, "-x", &w, "-y", &h])
            .status
            .success());
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.tmux(&["capture-pane", "-p", "-t", &self.name]).stdout)
            .into_owned()
    }

    fn format(&self, f: &str) -> String {
        String::from_utf8_lossy(
            &self
                .tmux(&["display-message", "-p", "-t", &self.name, f])
                .stdout,
        )
        .trim()
        .to_owned()
    }

    /// Polls the screen until `ok` holds; fails with the last screen after 15 s.
    fn wait(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let s = self.screen();
            if ok(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; the screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-server"]);
        // The server leaves its socket file behind.
        if let Some(s) = &self.socket {
            let _ = std::fs::remove_file(s);
        }
    }
}

/// The inspector against `admin`, then, once it exits, its exit status and whether the
/// terminal left raw mode (`icanon`, not `-icanon`); the pane stays for the screen to be
/// read.
fn top_command(admin: &str) -> String {
    format!(
        "{} top --admin-address {admin} --interval-ms 300; echo top-exited-$?; \
         stty -a | grep -o -- '-*icanon'; exec sleep 600",
        agent_bin().display()
    )
}

/// The shared three-pod node ([`shop_backend_data`]), no policy.
fn node_with_agent() -> (SimNode, Agent) {
    shop_backend_data(false)
}

/// The line of the screen that holds `what`.
fn line_with<'a>(screen: &'a str, what: &str) -> Option<&'a str> {
    screen.lines().find(|l| l.contains(what))
}

#[test]
fn top_shows_workloads_a_held_connection_datapath_counters_and_quits_cleanly() {
    let (n, mut agent) = node_with_agent();
    let server = format!("{}:7000", n.pod("server").ip);
    let _held = Held::open(&n, "client", &server);
    wait_for(
        "the held connection in FLOWS",
        Duration::from_secs(10),
        || {
            agent
                .get("/inspect/pod/shop/client")
                .is_ok_and(|b| b.contains(&format!("\"original_destination\": \"{server}\"")))
        },
    );
    let admin = format!("127.0.0.1:{}", agent.admin_port);
    let t = Tmux::start("main", &top_command(&admin));

    // Workloads: every pod, by name, with its mode; the status line names the endpoint.
    let s = t.wait("the workloads", |s| {
        ["shop/client", "backend/server", "data/cache"]
            .iter()
            .all(|w| s.contains(w))
    });
    assert!(
        line_with(&s, "shop/client").is_some_and(|l| l.contains("captured")),
        "{s}"
    );
    assert!(
        line_with(&s, "data/cache").is_some_and(|l| l.contains("direct")),
        "{s}"
    );
    assert!(s.contains(&format!("admin {admin}  refreshed ")), "{s}");
    assert!(!s.contains("error ("), "{s}");

    // Select the client (Down until it is the selected row), then Enter: the joined view
    // of `inspect pod`, with the held connection's original destination and its path.
    for _ in 0..3 {
        if t.screen().contains("> shop/client") {
            break;
        }
        t.keys(&["j"]);
        std::thread::sleep(Duration::from_millis(100));
    }
    t.wait("the client selected", |s| s.contains("> shop/client"));
    t.keys(&["Enter"]);
    let s = t.wait("the client's joined view with its connection", |s| {
        s.contains("pod shop/client (Esc: back)")
            && line_with(s, &server).is_some_and(|l| l.contains("proxied"))
    });
    assert!(s.contains("mode         captured, fail open"), "{s}");
    println!("joined view:\n{s}");

    // Back, then the Connections pane of the selected workload.
    t.keys(&["Escape"]);
    t.wait("back on the list", |s| s.contains("> shop/client"));
    t.keys(&["2"]);
    let s = t.wait("the client's connections", |s| {
        s.contains("connections of shop/client")
            && line_with(s, &server).is_some_and(|l| l.contains("backend/server"))
    });
    println!("connections:\n{s}");

    // A smaller terminal: redrawn to its size (the capture in docs/observability.md).
    t.resize(140, 12);
    let s = t.wait("the pane redrawn at 140x12", |s| {
        s.lines().count() <= 12
            && s.lines().all(|l| l.chars().count() <= 140)
            && line_with(s, &server).is_some()
            && s.contains("refreshed")
    });
    println!("connections at 140x12:\n{s}");
    t.resize(200, 50);
    t.wait("the pane redrawn at 200x50", |s| {
        s.lines().any(|l| l.chars().count() > 140)
    });

    // Datapath: the counters, with their rate once a second round came.
    t.keys(&["5"]);
    let s = t.wait("connect_redirected with a rate", |s| {
        s.contains("PER_SECOND")
            && line_with(s, "connect_redirected").is_some_and(|l| l.contains('.'))
    });
    println!("datapath:\n{s}");

    // Shift-Tab back to xDS: the proxy's client with its verdict counts; then Services:
    // the service with its VIP and its listener subscribed on demand (none yet).
    t.keys(&["BTab"]);
    let s = t.wait("the xDS state", |s| {
        s.contains("mesh_xds_responses_total{verdict=\"ack\"}")
            && line_with(s, "connected").is_some_and(|l| l.contains("true"))
    });
    assert!(line_with(&s, "nacks").is_some(), "{s}");
    println!("xds:\n{s}");
    t.keys(&["3"]);
    let s = t.wait("the service", |s| {
        line_with(s, "backend/echo")
            .is_some_and(|l| l.contains("10.96.0.20") && l.contains("80->7000/tcp"))
    });
    println!("services:\n{s}");

    // A filter on the workloads: typed, applied with Enter; Esc clears it.
    t.keys(&["1", "/"]);
    t.type_text("cache");
    let s = t.wait("the filter being typed", |s| s.contains("filter: /cache"));
    assert!(s.contains("shop/client"), "not applied before Enter: {s}");
    t.keys(&["Enter"]);
    let s = t.wait("the filtered list", |s| {
        s.contains("[filter: cache]") && !s.contains("shop/client")
    });
    assert!(
        s.contains("data/cache") && !s.contains("backend/server"),
        "{s}"
    );
    assert!(s.contains("(1 match the filter)"), "{s}");
    println!("filtered:\n{s}");
    t.keys(&["Escape"]);
    t.wait("the filter cleared", |s| {
        s.contains("shop/client") && !s.contains("[filter:")
    });

    // The agent stops answering: said on the status line, the last data stays.
    agent.stop();
    let s = t.wait("the outage on the status line", |s| {
        s.contains("error (showing the last data): ")
    });
    assert!(s.contains("shop/client") && s.contains("data/cache"), "{s}");

    // q: the process ends (the shell goes on), the alternate screen is left, raw mode is
    // off.
    t.keys(&["q"]);
    let s = t.wait("top to exit", |s| s.contains("top-exited-"));
    assert!(s.contains("top-exited-0"), "{s}");
    let s = t.wait("stty's answer", |s| {
        s.lines().any(|l| l.trim().ends_with("icanon"))
    });
    assert!(
        s.lines().any(|l| l.trim() == "icanon"),
        "raw mode left on: {s}"
    );
    assert_eq!(t.format("#{alternate_on}"), "0", "{s}");
    assert!(
        !s.contains("Workloads"),
        "the inspector's screen is gone: {s}"
    );
}

#[test]
fn top_against_no_agent_says_so_and_quits_on_ctrl_c() {
    // Nothing listens there: every round fails at once.
    let t = Tmux::start("none", &top_command("127.0.0.1:1"));
    let s = t.wait("the error on the status line", |s| {
        s.contains("error (showing the last data): ") && s.contains("refreshed never")
    });
    assert!(s.contains("waiting for the admin endpoint"), "{s}");
    assert!(
        s.contains("Connection refused") || s.contains("connection refused"),
        "{s}"
    );
    t.keys(&["C-c"]);
    let s = t.wait("top to exit", |s| s.contains("top-exited-"));
    assert!(s.contains("top-exited-0"), "{s}");
}

#[test]
fn top_killed_with_sigterm_restores_the_terminal_first() {
    let t = Tmux::start("term", &top_command("127.0.0.1:1"));
    t.wait("the inspector's screen", |s| s.contains("refreshed never"));
    let pid = t.format("#{pane_pid}");
    // The pane's shell runs top as its child.
    let top = Command::new("pgrep")
        .args(["-P", &pid, "-f", "top --admin-address"])
        .output()
        .expect("pgrep");
    let top = String::from_utf8_lossy(&top.stdout).trim().to_owned();
    assert!(!top.is_empty(), "top's pid under the pane's shell {pid}");
    let ok = Command::new("kill")
        .args(["-TERM", &top])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -TERM {top}");
    let s = t.wait("top to exit", |s| s.contains("top-exited-"));
    assert!(s.contains("top-exited-143"), "128 + SIGTERM: {s}");
    let s = t.wait("stty's answer", |s| {
        s.lines().any(|l| l.trim().ends_with("icanon"))
    });
    assert!(
        s.lines().any(|l| l.trim() == "icanon"),
        "raw mode left on: {s}"
    );
    assert_eq!(t.format("#{alternate_on}"), "0", "{s}");
}
