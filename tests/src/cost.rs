//! What the `#[ignore]`d measurements of the agent's cost on the L7 path share: wrk's
//! requests/s from a pod, and a process's CPU time.

use std::path::Path;

use crate::SimNode;

/// User + system CPU time of process `pid` (all its threads), in seconds (clock ticks
/// at 100 Hz).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) as f64 / 100.0
}

/// wrk (one thread, 16 keep-alive connections, pinned to vCPU 0) in `pod` of `n` against
/// `url` for `secs` seconds: the requests per second it reports.
pub fn wrk(n: &SimNode, pod: &str, url: &str, secs: u32) -> f64 {
    let out = n
        .pod_command(pod, Path::new("/usr/bin/taskset"))
        .args(["-c", "0", "wrk", "-t1", "-c16"])
        .arg(format!("-d{secs}s"))
        .arg(url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .unwrap_or_else(|| panic!("wrk: {text}"))
        .trim()
        .parse()
        .unwrap()
}
