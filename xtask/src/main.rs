//! `cargo xtask`: the one entry point for developers and CI.
//!
//! - `setup`: installs what a fresh machine lacks (nightly + rust-src + llvm-tools,
//!   bpf-linker built against nightly's LLVM, Debian packages), idempotently.
//! - `build`: builds the agent (its build.rs builds the eBPF object) and the test tools.
//! - `test`: setup, build, format and clippy checks, then every test (unit and the
//!   privileged end-to-end tests on a simulated node).
//! - `demo`: setup, build, then a simulated node with traffic (xtask/demo.sh).
//! - `latency`: a quick pod -> pod round-trip measurement, direct vs through the mesh.
//! - `lint`: rustfmt and clippy (-D warnings).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

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
];

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
    /// Run the demo on a simulated node.
    Demo,
    /// Quick pod -> pod TCP round-trip latency: direct, mesh with and without sk_msg.
    Latency {
        /// Runs per path (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: u32,
    },
    /// rustfmt --check and clippy -D warnings.
    Lint,
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
    eprintln!(
        "setup: nightly, rust-src, llvm-tools, bpf-linker {BPF_LINKER_VERSION}, {} present",
        DEBIAN_PACKAGES.join(", ")
    );
    Ok(())
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

fn agent_bin() -> String {
    root().join("target/debug/mesh-agent").display().to_string()
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Build => {
            setup()?;
            build()
        }
        Task::Lint => lint(),
        Task::Test { args } => {
            setup()?;
            build()?;
            lint()?;
            run(Command::new("cargo")
                .current_dir(root())
                .args(["test", "--workspace", "--exclude", "mesh-ebpf"])
                .args(&args)
                .env("MESH_AGENT_BIN", agent_bin()))?;
            // Nothing may outlive the tests.
            let left = output(
                Command::new("sh").args(["-c", "ip netns list | grep -E '^mt[0-9]+-' || true"]),
            );
            if !left.trim().is_empty() {
                bail!("tests left network namespaces behind:\n{left}");
            }
            Ok(())
        }
        Task::Demo => {
            setup()?;
            build()?;
            run(Command::new("bash")
                .arg(root().join("xtask/demo.sh"))
                .env("MESH_AGENT_BIN", agent_bin())
                .env("PODTOOL", root().join("target/debug/podtool")))
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
