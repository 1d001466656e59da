//! Builds `mesh-ebpf` for `bpfel-unknown-none` with the nightly toolchain (aya-build) so
//! the object can be embedded in the agent with `include_bytes_aligned!`.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../mesh-ebpf");
    println!("cargo:rerun-if-changed={root}/src");
    println!("cargo:rerun-if-changed={root}/Cargo.toml");
    println!("cargo:rerun-if-changed=../mesh-common/src");
    aya_build::build_ebpf(
        [aya_build::Package { name: "mesh-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::Nightly,
    )
    .context("building the eBPF programs (run `cargo xtask setup` if nightly, rust-src or bpf-linker is missing)")
}
