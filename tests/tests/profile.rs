//! Production triage (issue 12, item 6) on a simulated node: a CPU profile of a running
//! agent under HTTP load through its L7 engine (`/debug/profile`, `mesh-agent debug
//! profile`), one at a time, and its heap report (`/debug/heap`, `mesh-agent debug heap`)
//! against the kernel's own figures; `--telemetry off` leaves the Istio series out.

use std::{
    collections::HashMap,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use mesh_tests::{http_get_status, metric, wait_for, SimNode};
use serde_json::Value;

const VIP: &str = "10.96.0.10:80";

/// A client in `shop` and an HTTP server behind the service `backend/reviews` (L7).
fn node() -> SimNode {
    let mut n = SimNode::new().expect("sim node");
    n.add_pod("client", 2).unwrap();
    n.add_pod("v1", 3).unwrap();
    let p = |name: &str| n.pod(name);
    let yaml = format!(
        "namespaces:\n\
         \x20 - {{ name: shop, labels: {{ mesh-agent.io/dataplane-mode: ambient }} }}\n\
         \x20 - {{ name: backend, labels: {{ mesh-agent.io/dataplane-mode: ambient }} }}\n\
         workloads:\n\
         \x20 - {{ name: client, namespace: shop, ip: {}, netns: {}, service_account: web }}\n\
         \x20 - {{ name: v1, namespace: backend, ip: {}, netns: {}, service_account: reviews, labels: {{ app: reviews }} }}\n\
         services:\n\
         \x20 - {{ name: reviews, namespace: backend, vip: 10.96.0.10, ports: [ {{ port: 80, target_port: 8080, protocol: http }} ], selector: {{ app: reviews }} }}\n",
        p("client").ip,
        p("client").netns_path(),
        p("v1").ip,
        p("v1").netns_path(),
    );
    n.write_config(&yaml).unwrap();
    n
}

fn serve(n: &SimNode) {
    n.serve("v1", &["http", "--listen", "0.0.0.0:8080", "--name", "v1"])
        .unwrap();
}

/// Requests through the L7 engine until `stop`; how many were answered.
fn load(n: &SimNode, stop: &AtomicBool) -> u64 {
    let mut answered = 0;
    while !stop.load(Ordering::Relaxed) {
        let r = n.http_get("client", VIP, "/", 500, &[]).unwrap();
        answered += r["bodies"]
            .as_object()
            .map_or(0, |b| b.values().filter_map(Value::as_u64).sum());
    }
    answered
}

/// perf events `pid` holds open: a CPU profile's samplers, one per thread, while it runs.
fn perf_events(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy() == "anon_inode:[perf_event]")
                })
                .count()
        })
        .unwrap_or(0)
}

/// `frame;frame;... count` lines: every line parses, counts add up.
fn parse_folded(text: &str) -> Vec<(Vec<String>, u64)> {
    text.lines()
        .map(|l| {
            let (stack, n) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("no count: {l:?}"));
            let n: u64 = n.parse().unwrap_or_else(|_| panic!("bad count: {l:?}"));
            let frames: Vec<String> = stack.split(';').map(str::to_owned).collect();
            assert!(frames.iter().all(|f| !f.is_empty()), "empty frame in {l:?}");
            (frames, n)
        })
        .collect()
}

#[test]
fn a_cpu_profile_under_load_shows_the_proxy_and_a_second_one_is_refused() {
    let n = node();
    let agent = n.start_agent(&[]).unwrap();
    serve(&n);
    let port = agent.admin_port;
    // Warm: the on-demand listener and the upstream pool.
    n.http_get("client", VIP, "/", 10, &[]).unwrap();
    let idle_perf_events = perf_events(agent.pid());
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        // Two clients at once: the proxy stays busy while one starts its next batch.
        let traffic = [s.spawn(|| load(&n, &stop)), s.spawn(|| load(&n, &stop))];
        std::thread::sleep(Duration::from_millis(300));
        let first = s.spawn(move || {
            let t = Instant::now();
            let r = http_get_status(port, "/debug/profile?seconds=2", Duration::from_secs(30));
            (r, t.elapsed())
        });
        // The second request while the first runs (its samplers open: under load the
        // first request may take a while to get there): refused at once, with the
        // reason, not queued behind the first.
        wait_for(
            "the first profile's samplers",
            Duration::from_secs(20),
            || perf_events(agent.pid()) > idle_perf_events,
        );
        let (code, body) =
            http_get_status(port, "/debug/profile?seconds=1", Duration::from_secs(10)).unwrap();
        assert_eq!(code, 409, "{body}");
        assert!(body.contains("already running"), "{body}");
        assert!(
            !first.is_finished(),
            "refused only after the first ended: queued"
        );
        let (r, took) = first.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        let answered: u64 = traffic.into_iter().map(|t| t.join().unwrap()).sum();
        let (code, body) = r.unwrap();
        assert_eq!(code, 200, "{body}");
        assert!(took >= Duration::from_secs(2), "{took:?}");
        assert!(answered > 100, "the load ran: {answered}");
        let folded = parse_folded(&body);
        let depth: Vec<usize> = folded.iter().map(|(f, _)| f.len()).collect();
        eprintln!(
            "under load: {} stacks, deepest {} frames; the five most sampled:\n{}",
            folded.len(),
            depth.iter().max().unwrap_or(&0),
            body.lines().take(5).collect::<Vec<_>>().join("\n")
        );
        let samples: u64 = folded.iter().map(|(_, n)| n).sum();
        // At 99 Hz of CPU time: at least 50 ms of the agent's CPU in 2 s of load.
        assert!(samples >= 5, "samples {samples}:\n{body}");
        // The proxy's runtime threads were sampled, inside tokio and the proxy's code.
        let by_thread: HashMap<&str, u64> = folded.iter().fold(HashMap::new(), |mut m, (f, n)| {
            *m.entry(f[0].as_str()).or_default() += n;
            m
        });
        assert!(
            folded.iter().any(|(f, _)| f
                .iter()
                .any(|x| x.starts_with("tokio::") || x.starts_with("<tokio::"))),
            "no tokio frame: {by_thread:?}\n{body}"
        );
        assert!(
            folded.iter().any(|(f, _)| f
                .iter()
                .any(|x| x.contains("mesh_agent::proxy") || x.contains("hyper::"))),
            "no proxy or hyper frame: {by_thread:?}\n{body}"
        );
    });
    // After it, a profile runs again (the lock is released), as JSON with its counts.
    let (code, body) = http_get_status(
        port,
        "/debug/profile?seconds=1&format=json",
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let p: Value = serde_json::from_str(&body).unwrap();
    eprintln!(
        "profile: {} samples, {} threads, kernel frames {}, mean depth {} ({} user); top stacks:",
        p["samples"], p["threads"], p["kernel_frames"], p["mean_depth"], p["mean_user_depth"]
    );
    for l in p["folded"].as_array().unwrap().iter().take(5) {
        eprintln!("  {}", l.as_str().unwrap());
    }
    assert_eq!(p["seconds"], 1);
    assert_eq!(p["sample_hz"], 99);
    assert!(p["threads"].as_u64().unwrap() >= 3, "{p}");
    // Bad requests say why.
    for (q, want) in [
        ("seconds=0", "seconds must be 1..=60"),
        ("seconds=61", "seconds must be 1..=60"),
        ("seconds=2&hz=1000", "unknown parameter"),
    ] {
        let (code, body) =
            http_get_status(port, &format!("/debug/profile?{q}"), Duration::from_secs(5)).unwrap();
        assert_eq!(code, 400, "{q}: {body}");
        assert!(body.contains(want), "{q}: {body}");
    }
}

#[test]
fn the_cli_writes_folded_stacks_and_reads_the_heap() {
    let n = node();
    let agent = n.start_agent(&[]).unwrap();
    serve(&n);
    n.http_get("client", VIP, "/", 200, &[]).unwrap();
    let admin = format!("127.0.0.1:{}", agent.admin_port);
    let peak = || -> u64 {
        let st = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
        st.lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    let peak_before = peak();
    let out = n.dir.join("agent.folded");
    // Under load, so the profile has stacks to symbolize.
    let stop = AtomicBool::new(false);
    let o = std::thread::scope(|s| {
        let traffic = s.spawn(|| load(&n, &stop));
        let o = Command::new(mesh_tests::agent_bin())
            .args([
                "debug",
                "profile",
                "--seconds",
                "2",
                "--admin-address",
                &admin,
            ])
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        stop.store(true, Ordering::Relaxed);
        traffic.join().unwrap();
        o
    });
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("samples over 2 s of"), "{stderr}");
    eprintln!("mesh-agent debug profile: {}", stderr.trim());
    // Symbolizing reads the symbol tables, not the whole binary (hundreds of MiB with
    // its line tables): the agent's peak RSS stays put.
    let grown_kb = peak().saturating_sub(peak_before);
    assert!(grown_kb < 48 << 10, "peak RSS grew {grown_kb} kB");
    let folded = parse_folded(&std::fs::read_to_string(&out).unwrap());
    assert!(!folded.is_empty(), "{stderr}");
    // Out of range: clap refuses before asking the agent.
    let o = Command::new(mesh_tests::agent_bin())
        .args([
            "debug",
            "profile",
            "--seconds",
            "90",
            "--admin-address",
            &admin,
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());

    // The heap: the allocator's figures and the RSS, consistent with the kernel's.
    let o = Command::new(mesh_tests::agent_bin())
        .args(["debug", "heap", "-o", "json", "--admin-address", &admin])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let h: Value = serde_json::from_slice(&o.stdout).unwrap();
    eprintln!("mesh-agent debug heap -o json: {h}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let kb = |k: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix(':'))
            .unwrap()
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    let num = |k: &str| h[k].as_u64().unwrap_or_else(|| panic!("{k}: {h}"));
    let (rss, kernel_rss) = (num("rss_bytes"), kb("VmRSS"));
    // Read a moment apart: within 25 % of each other.
    assert!(
        rss.abs_diff(kernel_rss) * 4 <= kernel_rss,
        "rss {rss} vs /proc {kernel_rss}"
    );
    assert!(num("rss_anon_bytes") <= rss && num("rss_peak_bytes") >= num("rss_anon_bytes"));
    // What the program holds is resident or swapped anonymous memory: not more than the
    // anonymous RSS plus what the allocator mapped but never touched (its free bytes).
    let in_use = num("in_use_bytes");
    // A release agent after start-up (its heap trimmed) holds about 1 MiB.
    assert!(in_use > 256 << 10, "an agent holds more than 256 KiB: {h}");
    assert!(in_use <= num("arena_bytes") + num("mmapped_bytes"), "{h}");
    assert!(
        in_use <= num("rss_anon_bytes") + num("free_bytes") + (8 << 20),
        "{h}"
    );
    assert!(num("arenas") >= 1, "{h}");
    let f = h["fragmentation"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&f), "{h}");
}

#[test]
fn telemetry_off_records_no_istio_series() {
    let n = node();
    serve(&n);
    for (flag, want) in [("on", true), ("off", false)] {
        let agent = n.start_agent(&["--telemetry", flag]).unwrap();
        let r = n.http_get("client", VIP, "/", 20, &[]).unwrap();
        assert_eq!(r["errors"], serde_json::json!([]), "{r}");
        let text = mesh_tests::http_get(agent.admin_port, "/metrics").unwrap();
        let istio = metric(&text, "istio_requests_total", &[("reporter", "source")]);
        assert_eq!(
            istio > 0,
            want,
            "--telemetry {flag}: istio_requests_total {istio}"
        );
        // The agent's own series count either way.
        assert!(
            metric(&text, "mesh_requests_total", &[]) >= 20,
            "--telemetry {flag}"
        );
        drop(agent);
    }
}
