//! `cargo xtask kernels`: the datapath tests on Debian's stock kernels under qemu (issue 14,
//! item 1), so the kernels production nodes run are tested, not only the host's.
//!
//! Per kernel: the `linux-image` package of its Debian suite is fetched with `apt-get
//! download` through a private apt configuration (the host's sources stay as they are) and
//! cached under `target/kernels/<suite>/`, so a rerun is offline. A tiny initramfs (busybox
//! and the kernel's own virtio-pci and 9p modules: Debian builds them as modules) mounts
//! the host's root read-only over virtio-9p and hands over to `xtask/kernels-init.sh`,
//! which makes the writable places (tmpfs, bpffs, cgroup2), starts the agent alone to see
//! its programs load and attach, runs the demo's capture scenario (xtask/demo.sh) and the
//! test binaries (`TEST_BINS`) as root and powers off.
//! The binaries under test are private copies (`target/kernels/run-<pid>/`), so a build
//! elsewhere in the tree cannot change them under a running guest.
//!
//! Output per kernel: the release, load/attach, the demo's checks, tests passed/failed per
//! binary (with each failure's panic message), wall time; the guest console in `target/kernels/<series>.log`. The exit
//! is non-zero when a kernel fails in a way that is not a known, documented gap
//! (docs/kernels.md).

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// Debian's archive and its keyring (package debian-archive-keyring holds the bullseye,
/// bookworm and trixie keys).
const MIRROR: &str = "http://deb.debian.org/debian";
const SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// The modules the initramfs loads (with their dependencies) to mount the host's root.
const BOOT_MODULES: &[&str] = &["virtio_pci", "virtio_rng", "9pnet_virtio", "9p"];
/// The guest: 2 vCPUs, 4 GiB.
const GUEST_CPUS: &str = "2";
const GUEST_MEM_MIB: &str = "4096";
/// A guest that prints nothing for this long is stuck (KVM without nested virtualisation
/// hangs like this).
const SILENCE_LIMIT: Duration = Duration::from_secs(90);
/// Console lines that start with this are the guest init's reports.
const TAG: &str = "MESH-KERNELS-";

#[derive(clap::Args)]
pub struct Options {
    /// 6.1 (bookworm), 5.10 (bullseye), 6.12 (trixie), or all; a comma-separated list works too.
    #[arg(long, default_value = "all")]
    kernel: String,
    /// The quick check in `cargo xtask test`: 6.1 only, a few datapath tests (`SMOKE_TESTS`;
    /// the demo only when `SMOKE_DEMO`).
    #[arg(long, conflicts_with = "kernel")]
    smoke: bool,
    /// Accelerator: auto takes KVM when it can work here, else software emulation (TCG).
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    accel: Accel,
    /// Hard limit per guest, in minutes; the guest is killed past it.
    #[arg(long, default_value_t = 60)]
    timeout_mins: u64,
    /// `--test-threads` for the test binaries inside the guest.
    #[arg(long, default_value_t = 1)]
    test_threads: u32,
    /// Resolve and download the newest kernel package of each suite again (default: the
    /// cached one, offline).
    #[arg(long)]
    refresh: bool,
    /// Extra arguments for the test binaries (a test name filter, `--skip NAME`); with them,
    /// the demo is left out.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

impl Options {
    /// `--smoke` with the defaults: what `cargo xtask test` runs.
    pub fn smoke() -> Options {
        Options {
            kernel: "all".into(),
            smoke: true,
            accel: Accel::Auto,
            timeout_mins: 30,
            test_threads: 1,
            refresh: false,
            args: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    Auto,
    Kvm,
    Tcg,
}

impl Accel {
    fn name(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The test binaries (`tests/tests/<name>.rs`) a guest runs, in order. The datapath's
/// test names are reported as they are; the others' with `<binary>::` in front.
/// `kernel_relay` needs 6.9+: on the matrix's kernels it asserts the fallback (the agent
/// reports the feature unavailable in `/kernel` and `/ready`, the proxy relays, bytes
/// intact).
const TEST_BINS: [&str; 2] = ["datapath", "kernel_relay"];

/// Whether `--smoke` runs the demo's capture scenario too. Not: under emulation it takes
/// 84 s on 6.1 (most of it the agent's load and verification), more than the smoke may
/// grow (docs/kernels.md, "Timing"); the smoke's first test covers capture through the
/// proxy already, and the full matrix runs the demo.
const SMOKE_DEMO: bool = false;

/// A kernel of the matrix and what it is expected to give today.
struct Kernel {
    series: &'static str,
    suite: &'static str,
    /// Tests known to fail on this kernel, each with why (docs/kernels.md): reported, not
    /// fatal. Any other failure is. A known failure that passes is reported too, so the
    /// list shrinks as the gaps close.
    known_failures: &'static [(&'static str, &'static str)],
}

/// The datapath tests a `--smoke` run (the README's test command) boots 6.1 for: capture
/// and pairing, direct mode, the netns-cookie probe, the < 6.9 slow-reader fallback, and
/// the status of a workload the maps do not hold, and the decision log (aya-log's ring
/// buffer, the run-time level). About as long under emulation as the whole suite on the
/// host.
const SMOKE_TESTS: [&str; 6] = [
    "proxied_flow_passes_the_proxy_with_skmsg_and_no_firewall_rules",
    "direct_mode_skips_the_proxy_and_pairs_the_pods",
    "netns_cookies_read_through_the_connect4_probe_capture_as_the_sockopt_does",
    "without_the_queue_check_nothing_is_paired_and_a_slow_reader_gets_tcp",
    "a_workload_whose_namespace_cannot_be_read_is_reported_unresolved",
    "log::decisions_are_logged_with_the_flow_only_while_the_level_is_raised",
];

/// Every datapath test checks the kernel features it depends on and asserts the
/// documented fallback where one is missing, so no kernel has known failures today; the
/// mechanism stays for the next gap found.
const KERNELS: &[Kernel] = &[
    Kernel {
        series: "6.1",
        suite: "bookworm",
        known_failures: &[],
    },
    Kernel {
        series: "5.10",
        suite: "bullseye",
        known_failures: &[],
    },
    Kernel {
        series: "6.12",
        suite: "trixie",
        known_failures: &[],
    },
];

impl Kernel {
    fn known(&self, test: &str) -> Option<&'static str> {
        self.known_failures
            .iter()
            .find(|(t, _)| *t == test)
            .map(|(_, why)| *why)
    }
}

/// A kernel ready to boot: its package, release, image and initramfs.
struct Image {
    package: String,
    release: String,
    vmlinuz: PathBuf,
    /// The unpacked package: `lib/modules/<release>` with its modules.dep.
    modules: PathBuf,
    initrd: PathBuf,
}

/// What one guest run showed.
#[derive(Default)]
struct Outcome {
    accel: &'static str,
    wall: Duration,
    /// Why the guest did not finish normally (silent, timeout, qemu failed...).
    boot_error: Option<String>,
    /// The guest init's final report: `stage`, `rc`, `release`, `secs`.
    result: Vec<(String, String)>,
    probe_ready: Option<bool>,
    programs: Vec<String>,
    links: usize,
    /// `running N tests`, summed over the binaries.
    total: Option<usize>,
    /// Per test binary: `MESH-KERNELS-BIN` (name, rc, secs) and its `running N tests`.
    bins: Vec<BinRun>,
    /// The demo: its output (without the `demo| ` prefix), exit status and seconds.
    demo_lines: Vec<String>,
    demo_rc: Option<String>,
    demo_secs: Option<u64>,
    passed: Vec<String>,
    failed: Vec<String>,
    ignored: usize,
    /// Failure -> the first line of its panic message.
    reasons: Vec<(String, String)>,
}

/// One test binary's run in a guest.
#[derive(Default, Debug, PartialEq)]
struct BinRun {
    name: String,
    total: Option<usize>,
    rc: Option<String>,
    secs: Option<u64>,
}

impl Outcome {
    fn result(&self, key: &str) -> Option<&str> {
        self.result
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

pub fn run(root: &Path, opts: &Options) -> Result<()> {
    let wanted: Vec<&Kernel> = if opts.smoke {
        KERNELS.iter().filter(|k| k.series == "6.1").collect()
    } else if opts.kernel == "all" {
        KERNELS.iter().collect()
    } else {
        opts.kernel
            .split(',')
            .map(|s| {
                KERNELS
                    .iter()
                    .find(|k| k.series == s.trim())
                    .with_context(|| format!("unknown kernel {s:?}: 6.1, 5.10, 6.12 or all"))
            })
            .collect::<Result<_>>()?
    };
    let kdir = root.join("target/kernels");
    fs::create_dir_all(&kdir)?;
    let started = Instant::now();

    let test_bins = build_tests(root)?;
    let run_dir = RunDir::new(&kdir)?;
    stage_binaries(root, &test_bins, &run_dir.0)?;
    let plan = Plan::new(opts, &run_dir.0);
    let (accel, why) = choose_accel(opts.accel)?;
    eprintln!("kernels: {why}");

    let mut rows = Vec::new();
    let mut unprepared = Vec::new();
    let mut failed = false;
    for k in wanted {
        let image = match fetch(&kdir, k, opts.refresh) {
            Ok(image) => image,
            Err(e) => {
                // One kernel that cannot be prepared does not hide the others' results.
                println!(
                    "\n== kernel {} ({}): FAILED to prepare: {e:#}",
                    k.series, k.suite
                );
                unprepared.push(k.series);
                failed = true;
                continue;
            }
        };
        let log = kdir.join(format!("{}.log", k.series));
        let mut out = boot(root, k, &image, accel, opts, &plan, &log)?;
        if accel == Accel::Kvm && opts.accel == Accel::Auto && out.boot_error.is_some() {
            eprintln!(
                "kernels: [{}] the KVM guest failed ({}); again with software emulation (TCG)",
                k.series,
                out.boot_error.as_deref().unwrap_or("?")
            );
            out = boot(root, k, &image, Accel::Tcg, opts, &plan, &log)?;
        }
        let (verdict, ok) = judge(k, &out, &plan, !opts.args.is_empty() || opts.smoke);
        failed |= !ok;
        print_kernel(k, &image, &out, &verdict, &log);
        rows.push((k, image, out, verdict));
    }
    print_table(&rows);
    for series in unprepared {
        println!("kernels: series={series} verdict=\"FAILED to prepare (see above)\"");
    }
    println!(
        "kernels: total wall time {} (build, fetch, boot)",
        secs(started.elapsed())
    );
    if failed {
        bail!("kernels: a kernel failed beyond its known gaps (see above and target/kernels/<series>.log)");
    }
    Ok(())
}

/// What a guest runs: which test binaries, whether the demo, and the run folder holding
/// the binaries.
struct Plan {
    bins: Vec<&'static str>,
    demo: bool,
    run_dir: PathBuf,
}

impl Plan {
    fn new(opts: &Options, run_dir: &Path) -> Plan {
        let run_dir = run_dir.to_owned();
        if opts.smoke && opts.args.is_empty() {
            // The smoke's tests are datapath tests (`--exact` names).
            Plan {
                bins: vec![TEST_BINS[0]],
                demo: SMOKE_DEMO,
                run_dir,
            }
        } else {
            // A filter is someone chasing a test: every binary gets it, the demo is left out.
            Plan {
                bins: TEST_BINS.to_vec(),
                demo: opts.args.is_empty(),
                run_dir,
            }
        }
    }
}

/// `cargo test -p mesh-tests --test <each of TEST_BINS> --no-run`: the binaries' paths.
fn build_tests(root: &Path) -> Result<Vec<(&'static str, PathBuf)>> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root).args(["test", "-p", "mesh-tests"]);
    for t in TEST_BINS {
        cmd.args(["--test", t]);
    }
    cmd.args(["--no-run", "--message-format=json"]);
    eprintln!("+ {cmd:?}");
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("spawning cargo")?;
    if !out.status.success() {
        bail!("building the test binaries failed ({})", out.status);
    }
    let msgs: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    TEST_BINS
        .iter()
        .map(|&t| {
            msgs.iter()
                .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == t)
                .find_map(|m| m["executable"].as_str().map(PathBuf::from))
                .map(|p| (t, p))
                .with_context(|| format!("cargo named no executable for the {t} test"))
        })
        .collect()
}

/// The per-invocation folder the guests read: the binaries under test and the guest
/// init's settings. Removed on drop.
struct RunDir(PathBuf);

impl RunDir {
    fn new(kdir: &Path) -> Result<RunDir> {
        let dir = kdir.join(format!("run-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("deps"))?;
        Ok(RunDir(dir))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Copies of the binaries (podtool is found next to the test binary's parent folder, as
/// cargo lays them out; the agent through MESH_AGENT_BIN).
fn stage_binaries(root: &Path, test_bins: &[(&str, PathBuf)], run: &Path) -> Result<()> {
    let debug = root.join("target/debug");
    let tests = test_bins
        .iter()
        .map(|(name, path)| (path.clone(), run.join("deps").join(name)));
    for (from, to) in [
        (debug.join("mesh-agent"), run.join("mesh-agent")),
        (debug.join("podtool"), run.join("podtool")),
    ]
    .into_iter()
    .chain(tests)
    {
        fs::copy(&from, &to).with_context(|| {
            format!(
                "copying {} (build it first: `cargo xtask build`)",
                from.display()
            )
        })?;
    }
    Ok(())
}

/// KVM when it can work, else TCG; with the reason, for the operator.
fn choose_accel(asked: Accel) -> Result<(Accel, String)> {
    let kvm = kvm_usable();
    match (asked, kvm) {
        (Accel::Tcg, _) => Ok((Accel::Tcg, "software emulation (TCG), as asked".into())),
        (Accel::Kvm, Err(e)) => bail!("--accel kvm: {e}"),
        (_, Ok(())) => Ok((Accel::Kvm, "KVM".into())),
        (Accel::Auto, Err(e)) => Ok((
            Accel::Tcg,
            format!("{e}; using software emulation (TCG): slower, same kernels"),
        )),
    }
}

fn kvm_usable() -> std::result::Result<(), String> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm cannot be opened ({e})"))?;
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !virt {
        return Err(
            "/dev/kvm opens, but this CPU shows no vmx/svm flag (nested \
                    virtualisation is off): KVM guests hang at boot here"
                .into(),
        );
    }
    Ok(())
}

/// apt-get options for a private configuration of one suite under
/// `target/kernels/apt/<suite>`: its own sources, lists, cache and (empty) status.
fn apt_options(kdir: &Path, suite: &str) -> Result<Vec<String>> {
    let dir = kdir.join("apt").join(suite);
    for d in [
        "lists/partial",
        "cache/archives/partial",
        "sources.list.d",
        "preferences.d",
    ] {
        fs::create_dir_all(dir.join(d))?;
    }
    let sources = dir.join("sources.list");
    fs::write(
        &sources,
        format!(
            "deb [signed-by={KEYRING}] {MIRROR} {suite} main\n\
             deb [signed-by={KEYRING}] {SECURITY_MIRROR} {suite}-security main\n"
        ),
    )?;
    let status = dir.join("status");
    if !status.exists() {
        fs::write(&status, "")?;
    }
    let d = |p: &str| dir.join(p).display().to_string();
    Ok([
        format!("Dir::Etc::SourceList={}", sources.display()),
        format!("Dir::Etc::SourceParts={}", d("sources.list.d")),
        format!("Dir::Etc::Preferences={}", d("preferences")),
        format!("Dir::Etc::PreferencesParts={}", d("preferences.d")),
        format!("Dir::State::Lists={}", d("lists")),
        format!("Dir::State::Status={}", status.display()),
        format!("Dir::Cache={}", d("cache")),
        "APT::Architecture=amd64".into(),
        "Acquire::Languages=none".into(),
        // The files are root's under target/: no download as `_apt`.
        "APT::Sandbox::User=root".into(),
    ]
    .into_iter()
    .flat_map(|o| ["-o".to_owned(), o])
    .collect())
}

/// The suite's kernel, downloaded once and unpacked once; the initramfs is rebuilt each
/// time (a second), so changes to the boot script apply.
fn fetch(kdir: &Path, k: &Kernel, refresh: bool) -> Result<Image> {
    let sdir = kdir.join(k.suite);
    let debs = sdir.join("debs");
    fs::create_dir_all(&debs)?;
    let mut deb = if refresh { None } else { newest_deb(&debs)? };
    if deb.is_none() {
        let apt = apt_options(kdir, k.suite)?;
        crate::run(
            Command::new("apt-get")
                .args(&apt)
                .args(["-q", "update"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(std::io::stderr()),
        )?;
        let show = Command::new("apt-cache")
            .args(&apt)
            .args(["show", "--no-all-versions", "linux-image-amd64"])
            .output()
            .context("apt-cache")?;
        let text = String::from_utf8_lossy(&show.stdout);
        // The meta-package depends on the current signed image, e.g. linux-image-6.1.0-57-amd64.
        let package = text
            .lines()
            .find_map(|l| l.strip_prefix("Depends:"))
            .and_then(|deps| {
                deps.split([',', '|'])
                    .map(|d| d.split_whitespace().next().unwrap_or(""))
                    .find(|d| d.starts_with("linux-image-"))
            })
            .with_context(|| {
                format!(
                    "no kernel image named by linux-image-amd64 in {}:\n{text}",
                    k.suite
                )
            })?
            .to_owned();
        crate::run(
            Command::new("apt-get")
                .current_dir(&debs)
                .args(&apt)
                .args(["-q", "download", &package])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(std::io::stderr()),
        )?;
        deb = newest_deb(&debs)?;
    }
    let deb = deb.context("apt-get download left no .deb")?;
    let stem = deb
        .file_stem()
        .and_then(|s| s.to_str())
        .context("deb name")?
        .to_owned();
    let package = stem.split('_').take(2).collect::<Vec<_>>().join(" ");
    let tree = sdir.join(format!("tree-{stem}"));
    let done = tree.join(".unpacked");
    if !done.exists() {
        let _ = fs::remove_dir_all(&tree);
        crate::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
        // trixie's packages are merged-/usr (usr/lib/modules); depmod and modprobe `-b`/`-d`
        // look under lib/modules.
        if !tree.join("lib").exists() && tree.join("usr/lib/modules").exists() {
            std::os::unix::fs::symlink("usr/lib", tree.join("lib"))?;
        }
    }
    let vmlinuz = fs::read_dir(tree.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no boot/vmlinuz-* in {}", deb.display()))?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("vmlinuz name")?
        .to_owned();
    if !done.exists() {
        // The package leaves modules.dep to its postinst: make it, for modprobe in the guest.
        crate::run(Command::new("depmod").arg("-b").arg(&tree).arg(&release))?;
        fs::write(&done, &release)?;
    }
    let initrd = sdir.join(format!("initrd-{release}.img"));
    build_initrd(&tree, &release, &initrd)?;
    Ok(Image {
        package,
        release,
        vmlinuz,
        modules: tree,
        initrd,
    })
}

fn newest_deb(dir: &Path) -> Result<Option<PathBuf>> {
    let mut debs: Vec<PathBuf> = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("linux-image-") && n.ends_with(".deb"))
        })
        .collect();
    debs.sort_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok());
    Ok(debs.pop())
}

/// The initramfs: /init (xtask/kernels-initramfs.sh), busybox, and the boot modules in
/// dependency order, decompressed (busybox's insmod takes plain .ko files).
fn build_initrd(tree: &Path, release: &str, to: &Path) -> Result<()> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        bail!("/bin/busybox is missing: `cargo xtask setup` installs busybox-static");
    }
    let mut order: Vec<PathBuf> = Vec::new();
    for m in BOOT_MODULES {
        let out = Command::new("modprobe")
            .arg("-d")
            .arg(tree)
            .args(["-S", release, "--show-depends", m])
            .output()
            .context("modprobe (package kmod)")?;
        if !out.status.success() {
            // virtio_rng is only a help (entropy early on); the others are needed.
            if *m == "virtio_rng" {
                continue;
            }
            bail!(
                "modprobe --show-depends {m} for {release}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // `insmod PATH` for a module, `builtin NAME` for what is built in.
            if let Some(p) = line.strip_prefix("insmod ") {
                let p = PathBuf::from(p.trim());
                if !order.contains(&p) {
                    order.push(p);
                }
            }
        }
    }
    let mut cpio = Cpio::default();
    for d in ["bin", "dev", "modules", "newroot", "proc", "sys"] {
        cpio.dir(d);
    }
    cpio.char_dev("dev/console", 5, 1);
    let init = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels-initramfs.sh");
    cpio.file("init", 0o755, &fs::read(&init)?);
    cpio.file("bin/busybox", 0o755, &fs::read(busybox)?);
    for (i, path) in order.iter().enumerate() {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .context("module name")?;
        let (base, data) = if let Some(b) = name.strip_suffix(".xz") {
            (b, decompress("xz", path)?)
        } else if let Some(b) = name.strip_suffix(".zst") {
            (b, decompress("zstd", path)?)
        } else {
            (name, fs::read(path)?)
        };
        cpio.file(&format!("modules/{:02}-{base}", i + 1), 0o644, &data);
    }
    fs::write(to, cpio.finish()).with_context(|| format!("writing {}", to.display()))
}

fn decompress(tool: &str, path: &Path) -> Result<Vec<u8>> {
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("spawning {tool}"))?;
    if !out.status.success() {
        bail!("{tool} -dc {} failed", path.display());
    }
    Ok(out.stdout)
}

/// An uncompressed cpio archive in the kernel's "newc" format (what an initramfs is).
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            data.len() as u32,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}

/// Kills qemu (and waits for it) however the run ends.
struct Guest(Child);

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// One guest: boot, stream the console into the log, parse what the guest init printed.
fn boot(
    root: &Path,
    k: &Kernel,
    image: &Image,
    accel: Accel,
    opts: &Options,
    plan: &Plan,
    log_path: &Path,
) -> Result<Outcome> {
    let run_dir = &plan.run_dir;
    let timeout = Duration::from_secs(opts.timeout_mins * 60);
    // The guest's own limit on the tests, so it reports and powers off before the kill.
    let guest_timeout = timeout
        .saturating_sub(Duration::from_secs(120))
        .max(Duration::from_secs(60));
    let krun = run_dir.join(k.series);
    fs::create_dir_all(&krun)?;
    let q = |p: &Path| shell_quote(&p.display().to_string());
    fs::write(
        krun.join("env"),
        format!(
            "MESH_RELEASE={}\nMESH_MODULES={}\nMESH_TEST_BINS={}\nMESH_TEST_NAMES={}\n\
             MESH_TEST_CWD={}\nMESH_TEST_THREADS={}\nMESH_GUEST_TIMEOUT={}\nMESH_DEMO={}\n\
             export MESH_AGENT_BIN={}\nexport PODTOOL={}\n",
            shell_quote(&image.release),
            q(&image.modules),
            q(&run_dir.join("deps")),
            shell_quote(&plan.bins.join(" ")),
            q(&root.join("tests")),
            opts.test_threads,
            guest_timeout.as_secs(),
            u8::from(plan.demo),
            q(&run_dir.join("mesh-agent")),
            q(&run_dir.join("podtool")),
        ),
    )?;
    let smoke: Vec<String> = if opts.smoke && opts.args.is_empty() {
        SMOKE_TESTS
            .iter()
            .map(|t| t.to_string())
            .chain(["--exact".to_owned()])
            .collect()
    } else {
        Vec::new()
    };
    let wanted = if smoke.is_empty() { &opts.args } else { &smoke };
    let mut args = wanted.join("\n");
    args.push('\n');
    if wanted.is_empty() {
        args.clear();
    }
    fs::write(krun.join("test-args"), args)?;

    let init = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels-init.sh");
    let cmdline = format!(
        "console=ttyS0 loglevel=4 panic=-1 MESH_KINIT={} MESH_KRUN={}",
        init.display(),
        krun.display()
    );
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-name", &format!("mesh-kernels-{}", k.series)]);
    match accel {
        Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
        _ => cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max"]),
    };
    cmd.args(["-smp", GUEST_CPUS, "-m", GUEST_MEM_MIB])
        .args([
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&image.vmlinuz)
        .arg("-initrd")
        .arg(&image.initrd)
        .args(["-append", &cmdline])
        .args([
            "-fsdev",
            "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-device",
            "virtio-rng-pci",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());

    let mut log =
        fs::File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    writeln!(
        log,
        "# cargo xtask kernels: {} ({}), package {}, release {}, accel {}\n# {cmd:?}",
        k.series,
        k.suite,
        image.package,
        image.release,
        accel.name()
    )?;
    eprintln!(
        "kernels: [{}] booting {} ({}) under {}, console in {}",
        k.series,
        image.release,
        image.package,
        accel.name(),
        log_path.display()
    );
    let started = Instant::now();
    let mut guest = Guest(
        cmd.spawn()
            .context("spawning qemu-system-x86_64 (package qemu-system-x86)")?,
    );
    let (tx, rx) = mpsc::channel::<String>();
    let readers = [
        guest
            .0
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        guest
            .0
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ];
    for (i, r) in readers.into_iter().flatten().enumerate() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(r);
            let mut buf = Vec::new();
            while r.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end_matches(['\n', '\r']);
                let line = if i == 1 {
                    format!("qemu: {line}")
                } else {
                    line.to_owned()
                };
                if tx.send(line).is_err() {
                    break;
                }
                buf.clear();
            }
        });
    }
    drop(tx);

    let mut out = Outcome {
        accel: accel.name(),
        ..Outcome::default()
    };
    let mut lines = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => {
                writeln!(log, "{line}")?;
                if is_progress(&line) {
                    eprintln!("[{}] {line}", k.series);
                }
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if lines.is_empty() && started.elapsed() > SILENCE_LIMIT {
            out.boot_error = Some(format!(
                "no console output in {} s",
                SILENCE_LIMIT.as_secs()
            ));
            break;
        }
        if started.elapsed() > timeout {
            out.boot_error = Some(format!("killed after the {} min limit", opts.timeout_mins));
            break;
        }
    }
    drop(guest);
    out.wall = started.elapsed();
    writeln!(log, "# wall time {}", secs(out.wall))?;
    parse(&lines, &mut out);
    if out.boot_error.is_none() && out.result.is_empty() {
        out.boot_error = Some("the guest stopped without a result line".into());
    }
    Ok(out)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Console lines worth showing while the guest runs.
fn is_progress(line: &str) -> bool {
    line.strip_prefix("demo| ")
        .is_some_and(|d| d.starts_with("== ") || d.contains(" intact (") || d.contains("FAILED"))
        || line.starts_with(TAG)
            && !line.starts_with("MESH-KERNELS-PROGRAMS")
            && !line.starts_with("MESH-KERNELS-LINKS")
        || line.starts_with("running ")
        || line.starts_with("test result:")
        || test_line(line).is_some()
        || line.starts_with("qemu: ")
        || line.contains("Kernel panic")
}

/// `test NAME ... ok|FAILED|ignored`
fn test_line(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix("test ")?;
    let (name, status) = rest.split_once(" ... ")?;
    let status = status.trim();
    let status = if status.starts_with("ok") {
        "ok"
    } else if status.starts_with("FAILED") {
        "FAILED"
    } else if status.starts_with("ignored") {
        "ignored"
    } else {
        return None;
    };
    Some((name.trim(), status))
}

/// A test's name in the report: the datapath's as it is, another binary's with
/// `<binary>::` in front.
fn qualify(bin: &str, test: &str) -> String {
    if bin == TEST_BINS[0] {
        test.to_owned()
    } else {
        format!("{bin}::{test}")
    }
}

/// `key=value` words.
fn key_values(rest: &str) -> Vec<(String, String)> {
    rest.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn parse(lines: &[String], out: &mut Outcome) {
    let mut in_failures_list = false;
    let mut current_stdout: Option<String> = None;
    let mut want_message = false;
    // Logs before several binaries ran have no `MESH-KERNELS-TESTS name=` line.
    let mut bin = TEST_BINS[0].to_owned();
    // A test binary stopped by `timeout` leaves its last line unfinished, and the guest's
    // next report follows on it: `test NAME ... MESH-KERNELS-BIN ...`.
    let lines = lines.iter().flat_map(|l| match l.find(TAG) {
        Some(i) if i > 0 => vec![&l[..i], &l[i..]],
        _ => vec![l.as_str()],
    });
    for line in lines {
        if let Some(d) = line.strip_prefix("demo| ") {
            out.demo_lines.push(d.to_owned());
        } else if let Some(rest) = line.strip_prefix("MESH-KERNELS-DEMO ") {
            for (k, v) in key_values(rest) {
                match k.as_str() {
                    "rc" => out.demo_rc = Some(v),
                    "secs" => out.demo_secs = v.parse().ok(),
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("MESH-KERNELS-TESTS ") {
            if let Some(name) = rest
                .split_whitespace()
                .next()
                .and_then(|w| w.strip_prefix("name="))
            {
                bin = name.to_owned();
                out.bins.push(BinRun {
                    name: bin.clone(),
                    ..BinRun::default()
                });
            }
            in_failures_list = false;
            current_stdout = None;
        } else if let Some(rest) = line.strip_prefix("MESH-KERNELS-BIN ") {
            let kv = key_values(rest);
            let get = |key: &str| kv.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
            let name = get("name").unwrap_or_default();
            if !out.bins.iter().any(|b| b.name == name) {
                out.bins.push(BinRun {
                    name: name.clone(),
                    ..BinRun::default()
                });
            }
            if let Some(b) = out.bins.iter_mut().find(|b| b.name == name) {
                b.rc = get("rc");
                b.secs = get("secs").and_then(|s| s.parse().ok());
            }
            in_failures_list = false;
            current_stdout = None;
        } else if let Some(rest) = line.strip_prefix("MESH-KERNELS-RESULT ") {
            out.result = key_values(rest);
        } else if let Some(rest) = line.strip_prefix("MESH-KERNELS-PROBE ") {
            out.probe_ready = Some(rest.contains("ready=1"));
        } else if let Some(rest) = line.strip_prefix("MESH-KERNELS-PROGRAMS ") {
            if let Ok(serde_json::Value::Array(a)) = serde_json::from_str(rest) {
                out.programs = a
                    .iter()
                    .filter_map(|p| p["name"].as_str().map(str::to_owned))
                    .collect();
            }
        } else if let Some(rest) = line.strip_prefix("MESH-KERNELS-LINKS ") {
            if let Ok(serde_json::Value::Array(a)) = serde_json::from_str(rest) {
                out.links = a.len();
            }
        } else if let Some(n) = line
            .strip_prefix("running ")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<usize>().ok())
        {
            out.total = Some(out.total.unwrap_or(0) + n);
            if let Some(b) = out.bins.iter_mut().find(|b| b.name == bin) {
                b.total = Some(n);
            }
        } else if let Some((name, status)) = test_line(line) {
            let name = qualify(&bin, name);
            match status {
                "ok" => push_unique(&mut out.passed, &name),
                "FAILED" => push_unique(&mut out.failed, &name),
                _ => out.ignored += 1,
            }
        } else if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|r| r.strip_suffix(" stdout ----"))
        {
            current_stdout = Some(qualify(&bin, name));
            want_message = false;
        } else if line == "failures:" {
            // libtest prints "failures:" twice: before the outputs, then before the list.
            in_failures_list = current_stdout.is_some();
            current_stdout = None;
        } else if in_failures_list {
            match line.strip_prefix("    ") {
                Some(name) if !name.trim().is_empty() => {
                    push_unique(&mut out.failed, &qualify(&bin, name.trim()))
                }
                _ => in_failures_list = false,
            }
        } else if let Some(test) = &current_stdout {
            let t = line.trim();
            if line.contains("panicked at") {
                want_message = true;
            } else if want_message && !t.is_empty() {
                if !out.reasons.iter().any(|(r, _)| r == test) {
                    // The message's first line, short: some carry a whole metrics dump.
                    let msg: String = t.chars().take(160).collect();
                    out.reasons.push((test.clone(), msg));
                }
                want_message = false;
            } else if t.starts_with("left:") || t.starts_with("right:") {
                // assert_eq!'s two sides, after its message.
                if let Some((_, msg)) = out.reasons.iter_mut().find(|(r, _)| r == test) {
                    let side: String = t.chars().take(80).collect();
                    msg.push_str(&format!("; {side}"));
                }
            }
        }
    }
    out.passed.retain(|p| !out.failed.contains(p));
}

fn push_unique(v: &mut Vec<String>, s: &str) {
    if !v.iter().any(|x| x == s) {
        v.push(s.to_owned());
    }
}

/// Which test binary a reported test name belongs to (see `qualify`).
fn bin_of(test: &str) -> &'static str {
    TEST_BINS[1..]
        .iter()
        .find(|b| test.strip_prefix(**b).is_some_and(|r| r.starts_with("::")))
        .copied()
        .unwrap_or(TEST_BINS[0])
}

/// The demo's flows (xtask/demo.sh): the enrolled pod `shop/web` to the proxied service,
/// 4 MiB each way; the opted-out `shop/cron` and the not-enrolled `legacy/batch` must not
/// be captured.
const DEMO_CAPTURED: (&str, &str) = ("shop/web", "10.202.0.4:8080");
const DEMO_BYTES: u64 = 4 << 20;
const DEMO_NOT_CAPTURED: [&str; 2] = ["shop/cron", "legacy/batch"];

/// The demo's capture scenario, checked from its output: it exited 0; every flow's bytes
/// came back intact; the node proxy saw the enrolled pod's connection (captured by the
/// eBPF programs, no firewall rule) with every byte each way; the opted-out and
/// not-enrolled pods' connections did not reach it; the guest has no iptables rule and no
/// nftables table. The summary, or what failed.
fn check_demo(out: &Outcome) -> std::result::Result<String, String> {
    let secs = out
        .demo_secs
        .map(|s| format!(", {s} s"))
        .unwrap_or_default();
    match out.demo_rc.as_deref() {
        None => return Err("the demo did not report (console log)".into()),
        Some("0") => {}
        Some(rc) => {
            // The first error the demo or the agent printed says most; else its last lines.
            let why = out
                .demo_lines
                .iter()
                .find(|l| l.contains("error:") || l.contains("FAILED"))
                .map(|l| l.trim().chars().take(200).collect::<String>())
                .unwrap_or_else(|| {
                    let tail: Vec<&str> = out
                        .demo_lines
                        .iter()
                        .rev()
                        .take(3)
                        .rev()
                        .map(|l| l.trim())
                        .collect();
                    tail.join(" | ")
                });
            return Err(format!("the demo exited {rc}{secs}: {why}"));
        }
    }
    // The output's sections, by their `== ` headers.
    let mut section = "";
    let (mut flows, mut intact) = (0, 0);
    let mut captured: Option<(u64, u64, u64, String)> = None;
    let mut firewall = None;
    for line in &out.demo_lines {
        if let Some(h) = line.strip_prefix("== ") {
            section = h;
            if h.starts_with("firewall:") {
                firewall = Some(h);
            }
            continue;
        }
        let w: Vec<&str> = line.split_whitespace().collect();
        if section == "traffic" && w.get(1) == Some(&"->") {
            flows += 1;
            intact += usize::from(line.contains(" intact ("));
        } else if section.starts_with("what the node proxy saw") && w.get(1) == Some(&"->") {
            // SOURCE -> DEST skmsg=... CONNS RECEIVED SENT
            if DEMO_NOT_CAPTURED.contains(&w[0]) {
                return Err(format!(
                    "a pod the mesh must leave alone reached the proxy: {}",
                    line.trim()
                ));
            }
            if (w[0], w.get(2).copied().unwrap_or("")) == DEMO_CAPTURED {
                let n = |i: usize| w.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                let c = captured.get_or_insert((0, 0, 0, String::new()));
                c.0 += n(4);
                c.1 += n(5);
                c.2 += n(6);
                c.3 = w.get(3).copied().unwrap_or("").to_owned();
            }
        }
    }
    if flows == 0 || intact != flows {
        return Err(format!("{intact} of {flows} flows intact"));
    }
    let Some((conns, rx, tx, skmsg)) = captured else {
        return Err(format!(
            "the node proxy did not see {} -> {}: not captured",
            DEMO_CAPTURED.0, DEMO_CAPTURED.1
        ));
    };
    if conns == 0 || rx != DEMO_BYTES || tx != DEMO_BYTES {
        return Err(format!(
            "the proxy counted {} -> {}: {conns} connections, {rx} B received, {tx} B sent (want {DEMO_BYTES} each way)",
            DEMO_CAPTURED.0, DEMO_CAPTURED.1
        ));
    }
    match firewall {
        Some(f) if f.starts_with("firewall: 0 iptables rules, 0 nftables tables") => {}
        Some(f) => return Err(f.to_owned()),
        None => return Err("the demo printed no firewall line".into()),
    }
    Ok(format!(
        "{intact}/{flows} flows intact; the proxy saw {} -> {} ({conns} conn, {rx} B each way, {skmsg}); opted-out and not-enrolled pods not captured; 0 firewall rules{secs}",
        DEMO_CAPTURED.0, DEMO_CAPTURED.1
    ))
}

/// The verdict line and whether it is acceptable (the exit code).
fn judge(k: &Kernel, out: &Outcome, plan: &Plan, filtered: bool) -> (String, bool) {
    if let Some(e) = &out.boot_error {
        return (format!("FAILED: {e}"), false);
    }
    let stage = out.result("stage").unwrap_or("?");
    if stage != "tests" {
        return (format!("FAILED: the guest stopped at stage {stage}"), false);
    }
    let loaded = out.probe_ready == Some(true) && !out.programs.is_empty();
    let unknown: Vec<&str> = out
        .failed
        .iter()
        .map(String::as_str)
        .filter(|f| k.known(f).is_none())
        .collect();
    let rc = out.result("rc").unwrap_or("?");
    let ran = out.passed.len() + out.failed.len();
    if !loaded {
        return (
            "FAILED: the agent did not load and attach its programs".into(),
            false,
        );
    }
    if plan.demo {
        if let Err(e) = check_demo(out) {
            return (format!("FAILED: demo: {e}"), false);
        }
    }
    if let Some(b) = plan
        .bins
        .iter()
        .find(|b| !out.bins.iter().any(|r| r.name == **b && r.rc.is_some()))
    {
        return (
            format!("FAILED: the {b} test binary did not report (console log)"),
            false,
        );
    }
    if let Some(b) = out.bins.iter().find(|b| b.rc.as_deref() == Some("124")) {
        return (
            format!(
                "FAILED: the {} tests hit the guest's time limit (--timeout-mins), {} failed before",
                b.name,
                out.failed.len()
            ),
            false,
        );
    }
    if ran == 0 {
        return (
            format!("FAILED: no test ran (test binary exit {rc})"),
            false,
        );
    }
    if rc != "0" && out.failed.is_empty() {
        return (
            format!("FAILED: the test binary exited {rc} without a failed test"),
            false,
        );
    }
    if !unknown.is_empty() {
        return (
            format!("FAILED: unexpected failures: {}", unknown.join(", ")),
            false,
        );
    }
    let fixed: Vec<&str> = k
        .known_failures
        .iter()
        .map(|(t, _)| *t)
        .filter(|t| out.passed.iter().any(|p| p == t))
        .collect();
    let mut verdict = if out.failed.is_empty() {
        "ok".to_owned()
    } else {
        format!("ok: only known failures ({})", out.failed.len())
    };
    if !fixed.is_empty() {
        verdict.push_str(&format!(
            "; known failures now pass ({}): update KERNELS in xtask/src/kernels.rs and docs/kernels.md",
            fixed.join(", ")
        ));
    }
    if filtered {
        verdict.push_str(" (filtered run)");
    }
    (verdict, true)
}

fn secs(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

fn print_kernel(k: &Kernel, image: &Image, out: &Outcome, verdict: &str, log: &Path) {
    println!();
    println!("== kernel {} ({}): {}", k.series, k.suite, image.release);
    println!(
        "   package: {}   accel: {}   wall: {}",
        image.package,
        out.accel,
        secs(out.wall)
    );
    println!(
        "   load/attach: {} ({} programs: {}; {} links)",
        match out.probe_ready {
            Some(true) if !out.programs.is_empty() => "ok",
            Some(_) => "FAILED",
            None => "not reached",
        },
        out.programs.len(),
        out.programs.join(" "),
        out.links
    );
    match (out.demo_rc.is_some(), check_demo(out)) {
        (false, _) => println!("   demo: not run"),
        (true, Ok(summary)) => println!("   demo: ok: {summary}"),
        (true, Err(e)) => println!("   demo: FAILED: {e}"),
    }
    println!(
        "   tests: {} passed, {} failed, {} ignored, of {}{}",
        out.passed.len(),
        out.failed.len(),
        out.ignored,
        out.total
            .map(|n| n.to_string())
            .unwrap_or_else(|| "?".into()),
        out.result("secs")
            .map(|s| format!(" in {s} s"))
            .unwrap_or_default()
    );
    for b in &out.bins {
        let of = |v: &[String]| v.iter().filter(|t| bin_of(t) == b.name).count();
        println!(
            "     {}: {} / {} passed{}{}",
            b.name,
            of(&out.passed),
            b.total.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
            b.secs.map(|s| format!(" in {s} s")).unwrap_or_default(),
            match b.rc.as_deref() {
                Some("0") => String::new(),
                Some(rc) => format!(" (exit {rc})"),
                None => " (no report)".into(),
            }
        );
    }
    for f in &out.failed {
        let why = out
            .reasons
            .iter()
            .find(|(t, _)| t == f)
            .map(|(_, m)| m.as_str())
            .unwrap_or("(no panic message in the log)");
        println!("   FAILED {f}: {why}");
        if let Some(known) = k.known(f) {
            println!("          known: {known}");
        }
    }
    println!("   verdict: {verdict}");
    println!("   console: {}", log.display());
}

/// The demo's result in a word: ok, FAILED or skipped.
fn demo_word(out: &Outcome) -> &'static str {
    match (out.demo_rc.is_some(), check_demo(out)) {
        (false, _) => "skipped",
        (true, Ok(_)) => "ok",
        (true, Err(_)) => "FAILED",
    }
}

fn print_table(rows: &[(&Kernel, Image, Outcome, String)]) {
    println!();
    println!(
        "| kernel | release | accel | load/attach | demo capture | tests passed | failed | wall |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (k, image, out, _) in rows {
        let load = match out.probe_ready {
            Some(true) if !out.programs.is_empty() => {
                format!("ok ({} programs, {} links)", out.programs.len(), out.links)
            }
            Some(_) => "FAILED".into(),
            None => "not reached".into(),
        };
        let total = out.total.unwrap_or(out.passed.len() + out.failed.len());
        println!(
            "| {} ({}) | {} | {} | {} | {} | {} / {} | {} | {} |",
            k.series,
            k.suite,
            image.release,
            out.accel,
            load,
            demo_word(out),
            out.passed.len(),
            total,
            if out.failed.is_empty() {
                "-".into()
            } else {
                out.failed.join(", ")
            },
            secs(out.wall)
        );
    }
    // One machine-readable line per kernel.
    for (k, image, out, verdict) in rows {
        println!(
            "kernels: series={} release={} accel={} loaded={} programs={} links={} demo={} demo_s={} passed={} failed={} total={} wall_s={} failures={} verdict={:?}",
            k.series,
            image.release,
            out.accel,
            out.probe_ready == Some(true) && !out.programs.is_empty(),
            out.programs.len(),
            out.links,
            demo_word(out),
            out.demo_secs.unwrap_or(0),
            out.passed.len(),
            out.failed.len(),
            out.total.unwrap_or(0),
            out.wall.as_secs(),
            out.failed.join(","),
            verdict
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_guest_reports_and_libtest_output() {
        let log = "\
MESH-KERNELS-PROGRAMS [  {    \"id\": 5,    \"name\": \"mesh_connect4\"  },  {    \"name\": \"mesh_sockops\"  }]
MESH-KERNELS-LINKS [  {    \"id\": 1  }]
MESH-KERNELS-PROBE ready=1 agent_exit=0
MESH-KERNELS-TESTS name=datapath /k/deps/datapath --test-threads=1
running 3 tests
test a_fast_one ... ok
test a_slow_one ... FAILED
test an_old_one ... ignored

failures:

---- a_slow_one stdout ----

thread 'a_slow_one' (12) panicked at tests/tests/datapath.rs:154:5:
assertion `left == right` failed: proxied
  left: 0
 right: 1

failures:
    a_slow_one

test result: FAILED. 1 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out
test a_cut_one ... MESH-KERNELS-BIN name=datapath rc=101 secs=40
MESH-KERNELS-RESULT stage=tests rc=101 release=6.1.0-57-amd64 secs=42";
        let lines: Vec<String> = log.lines().map(str::to_owned).collect();
        let mut out = Outcome::default();
        parse(&lines, &mut out);
        assert_eq!(out.programs, ["mesh_connect4", "mesh_sockops"]);
        assert_eq!(out.links, 1);
        assert_eq!(out.probe_ready, Some(true));
        assert_eq!(out.total, Some(3));
        assert_eq!(out.passed, ["a_fast_one"]);
        assert_eq!(out.failed, ["a_slow_one"]);
        assert_eq!(out.ignored, 1);
        assert_eq!(
            out.reasons,
            [(
                "a_slow_one".to_owned(),
                "assertion `left == right` failed: proxied; left: 0; right: 1".to_owned()
            )]
        );
        assert_eq!(out.result("rc"), Some("101"));
        assert_eq!(out.bins[0].rc.as_deref(), Some("101"));
        assert_eq!(out.bins[0].secs, Some(40));

        let k = &KERNELS[0];
        let plan = Plan {
            bins: vec!["datapath"],
            demo: false,
            run_dir: PathBuf::new(),
        };
        let (verdict, ok) = judge(k, &out, &plan, false);
        assert!(!ok, "{verdict}");
        assert!(verdict.contains("a_slow_one"), "{verdict}");
    }

    /// The demo as xtask/demo.sh prints it (a 6.1 guest: no pairing below 6.9).
    const DEMO_OK: &str = "\
demo| == simulated node: bridge mdemobr 10.202.0.1/24, cgroup /sys/fs/cgroup/mesh-demo, 5 pods
demo| ready
demo| == traffic
demo|   web            -> 10.202.0.4:8080  (enrolled -> proxied: node proxy + sk_msg)   intact (4194304 B each way)
demo|   web            -> 10.202.0.5:6379  (enrolled -> direct: socket to socket)       intact (4194304 B each way)
demo|   cron           -> 10.202.0.4:8080  (opted-out pod: not captured)                intact (1048576 B each way)
demo|
demo| == what the node proxy saw (GET /metrics, mesh_tcp_*)
demo|   FLOW                                            CONNS     RECEIVED         SENT
demo|   shop/web -> 10.202.0.4:8080 skmsg=false             1      4194304      4194304
demo|
demo| == firewall: 0 iptables rules, 0 nftables tables on this machine (the datapath adds none)
demo| demo: cleaned up (namespaces, bridge, cgroups, pins)
MESH-KERNELS-DEMO rc=0 secs=37";

    fn demo_outcome(log: &str) -> Outcome {
        let lines: Vec<String> = log.lines().map(str::to_owned).collect();
        let mut out = Outcome::default();
        parse(&lines, &mut out);
        out
    }

    #[test]
    fn the_demo_passes_only_when_captured_intact_and_without_firewall_rules() {
        let out = demo_outcome(DEMO_OK);
        assert_eq!(out.demo_secs, Some(37));
        let ok = check_demo(&out).unwrap();
        assert!(ok.starts_with("3/3 flows intact"), "{ok}");
        assert!(ok.contains("skmsg=false"), "{ok}");

        // Each way the scenario can fail is caught.
        for (from, to, why) in [
            ("intact (4194304 B each way)\ndemo|   web            -> 10.202.0.5", "FAILED: {}\ndemo|   web            -> 10.202.0.5", "flows intact"),
            ("  shop/web -> 10.202.0.4:8080 skmsg=false             1      4194304      4194304", "", "not captured"),
            ("4194304      4194304", "4194304      4000000", "want 4194304"),
            ("demo|\ndemo| == firewall", "demo|   shop/cron -> 10.202.0.4:8080 skmsg=false 1 1048576 1048576\ndemo| == firewall", "leave alone"),
            ("0 iptables rules", "3 iptables rules", "3 iptables"),
            ("rc=0", "rc=1", "exited 1"),
        ] {
            let log = DEMO_OK.replacen(from, to, 1);
            assert_ne!(log, DEMO_OK, "{from}");
            let e = check_demo(&demo_outcome(&log)).unwrap_err();
            assert!(e.contains(why), "{why}: {e}");
        }
        assert!(check_demo(&Outcome::default()).is_err());
    }

    #[test]
    fn several_binaries_are_told_apart_and_each_must_report() {
        let log = format!(
            "MESH-KERNELS-PROGRAMS [{{\"name\": \"mesh_connect4\"}}]
MESH-KERNELS-PROBE ready=1 agent_exit=0
{DEMO_OK}
MESH-KERNELS-TESTS name=datapath /k/deps/datapath --test-threads=1
running 1 test
test same_name ... ok
MESH-KERNELS-BIN name=datapath rc=0 secs=10
MESH-KERNELS-TESTS name=kernel_relay /k/deps/kernel_relay --test-threads=1
running 2 tests
test same_name ... ok
test half_close ... FAILED

failures:

---- half_close stdout ----
thread 'half_close' panicked at tests/tests/kernel_relay.rs:1:1:
no eof

failures:
    half_close

MESH-KERNELS-BIN name=kernel_relay rc=101 secs=20
MESH-KERNELS-RESULT stage=tests rc=101 release=6.1.0-57-amd64 secs=31"
        );
        let out = demo_outcome(&log);
        assert_eq!(out.total, Some(3));
        assert_eq!(out.passed, ["same_name", "kernel_relay::same_name"]);
        assert_eq!(out.failed, ["kernel_relay::half_close"]);
        assert_eq!(out.reasons[0].1, "no eof");
        assert_eq!(bin_of("kernel_relay::half_close"), "kernel_relay");
        assert_eq!(bin_of("log::decisions"), "datapath");
        assert_eq!(out.bins.len(), 2);
        assert_eq!(out.bins[1].secs, Some(20));
        let plan = Plan {
            bins: TEST_BINS.to_vec(),
            demo: true,
            run_dir: PathBuf::new(),
        };
        let (verdict, ok) = judge(&KERNELS[0], &out, &plan, false);
        assert!(
            !ok && verdict.contains("kernel_relay::half_close"),
            "{verdict}"
        );

        // A binary that never reported fails the kernel even when nothing else did.
        let cut = log
            .split("MESH-KERNELS-TESTS name=kernel_relay")
            .next()
            .unwrap()
            .to_owned()
            + "MESH-KERNELS-RESULT stage=tests rc=0 release=6.1.0-57-amd64 secs=31";
        let (verdict, ok) = judge(&KERNELS[0], &demo_outcome(&cut), &plan, false);
        assert!(
            !ok && verdict.contains("kernel_relay test binary did not report"),
            "{verdict}"
        );
    }

    #[test]
    fn cpio_entries_are_newc_and_aligned() {
        let mut c = Cpio::default();
        c.file("init", 0o755, b"#!/bin/sh\n");
        let buf = c.finish();
        assert!(buf.starts_with(b"070701"));
        assert_eq!(buf.len() % 4, 0);
        // 110-byte header + "init\0" padded to 116, 10 bytes of data padded to 12.
        assert_eq!(&buf[110..114], b"init");
        assert_eq!(&buf[116..126], b"#!/bin/sh\n");
        assert!(buf.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
