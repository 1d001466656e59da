//! The Helm chart (deploy/helm/mesh-agent) and the plain manifests rendered from it
//! (deploy/manifests/mesh-agent.yaml), checked offline: `helm lint --strict`, the committed
//! manifests against a fresh render, strict schema validation with kubernetes-validate for
//! several value sets, proof that both checks can fail, and what the DaemonSet and the
//! ClusterRole must say (docs/install.md explains each), including the surge rollout with
//! hand-over that upgrades use.
//!
//! Needs helm (MESH_HELM) and a python with kubernetes-validate (MESH_PYTHON), which
//! `cargo xtask test` installs and exports. Without them these tests fail; they never skip.

use std::{
    collections::BTreeSet,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use serde_json::Value;

/// The Kubernetes version whose schemas the manifests must satisfy (strict: unknown
/// fields are errors). The oldest release the chart is tested against; Chart.yaml's
/// kubeVersion allows 1.29+, whose schemas are the same for everything the chart uses.
const KUBERNETES_VERSION: &str = "1.32.0";
const CHART: &str = "deploy/helm/mesh-agent";
const MANIFESTS: &str = "deploy/manifests/mesh-agent.yaml";
/// As xtask/src/deploy.rs renders the plain manifests: change both together.
const RELEASE: &str = "mesh-agent";
const NAMESPACE: &str = "mesh-system";
const HEADER: &str = "# Rendered from deploy/helm/mesh-agent by `cargo xtask deploy-render`: \
                      do not edit, change the chart.\n";

/// The capabilities docs/install.md justifies one by one.
const CAPABILITIES: &[&str] = &[
    "BPF",
    "NET_ADMIN",
    "PERFMON",
    "SYS_ADMIN",
    "SYS_PTRACE",
    "SYS_RESOURCE",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn tool(var: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "{var} is not set: run these tests through `cargo xtask test`, which installs helm \
             and kubernetes-validate under target/ and exports MESH_HELM and MESH_PYTHON (to \
             run only these, see deploy/README.md)"
        ),
    }
}

fn helm(args: &[&str]) -> Output {
    let helm = tool("MESH_HELM");
    Command::new(&helm)
        .current_dir(root())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", helm.display()))
}

fn template_args(sets: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["template", RELEASE, CHART, "--namespace", NAMESPACE]
        .map(String::from)
        .to_vec();
    for set in sets {
        args.push("--set".into());
        args.push((*set).into());
    }
    args
}

/// `helm template` with these `--set` overrides; panics with helm's message on failure.
fn render(sets: &[&str]) -> String {
    let args = template_args(sets);
    let out = helm(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "helm template {sets:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("helm prints UTF-8")
}

/// `helm template` that must fail; returns helm's message.
fn render_fails(sets: &[&str]) -> String {
    let args = template_args(sets);
    let out = helm(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        !out.status.success(),
        "helm template {sets:?} should have been refused, rendered:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A file of its own under the test's target folder (tests run in parallel).
fn scratch(yaml: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "deploy-{}-{}.yaml",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, yaml).expect("write scratch manifest");
    path
}

/// kubernetes-validate --strict against KUBERNETES_VERSION: (passed, its report).
fn validate(yaml: &str) -> (bool, String) {
    let python = tool("MESH_PYTHON");
    let file = scratch(yaml);
    let out = Command::new(&python)
        .args(["-m", "kubernetes_validate", "--strict", "--no-warn"])
        .args(["--kubernetes-version", KUBERNETES_VERSION])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("running {} -m kubernetes_validate: {e}", python.display()));
    let _ = std::fs::remove_file(&file);
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !report.contains("No module named kubernetes_validate"),
        "{} lacks kubernetes-validate: run `cargo xtask setup`",
        python.display()
    );
    (out.status.success(), report)
}

fn assert_valid(what: &str, yaml: &str) {
    let (ok, report) = validate(yaml);
    assert!(
        ok,
        "{what} does not validate against Kubernetes {KUBERNETES_VERSION}:\n{report}"
    );
    // One "passed" line per object: an object kubernetes-validate skipped is not checked.
    let passed = report.matches(" passed for resource ").count();
    assert_eq!(
        passed,
        docs(yaml).len(),
        "{what}: not every object was checked:\n{report}"
    );
}

/// The YAML documents as JSON (PyYAML, which kubernetes-validate brings), empty ones dropped.
fn docs(yaml: &str) -> Vec<Value> {
    let python = tool("MESH_PYTHON");
    let mut child = Command::new(&python)
        .args([
            "-c",
            "import json, sys, yaml\n\
             json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("feed YAML");
    let out = child.wait_with_output().expect("python");
    assert!(out.status.success(), "YAML does not parse:\n{yaml}");
    match serde_json::from_slice(&out.stdout).expect("JSON from python") {
        Value::Array(v) => v,
        other => panic!("expected a list of documents, got {other}"),
    }
}

fn object<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0]
}

fn container(docs: &[Value]) -> &Value {
    let containers = object(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1, "one container, the agent");
    &containers[0]
}

/// The container's env as (name, entry), in order.
fn env(docs: &[Value]) -> Vec<(String, Value)> {
    container(docs)["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| (e["name"].as_str().expect("env name").to_owned(), e.clone()))
        .collect()
}

fn env_value(docs: &[Value], name: &str) -> Option<String> {
    env(docs)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, e)| e["value"].as_str().unwrap_or_default().to_owned())
}

/// The DaemonSet's `spec.updateStrategy.rollingUpdate`.
fn rolling_update(docs: &[Value]) -> &Value {
    let strategy = &object(docs, "DaemonSet")["spec"]["updateStrategy"];
    assert_eq!(strategy["type"], "RollingUpdate");
    &strategy["rollingUpdate"]
}

/// Whether a field of this name appears anywhere in these objects (comments aside).
fn has_key(docs: &[Value], key: &str) -> bool {
    fn walk(v: &Value, key: &str) -> bool {
        match v {
            Value::Object(m) => m.iter().any(|(k, v)| k == key || walk(v, key)),
            Value::Array(a) => a.iter().any(|v| walk(v, key)),
            _ => false,
        }
    }
    docs.iter().any(|d| walk(d, key))
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected a list, got {v}"))
        .iter()
        .map(|s| s.as_str().expect("string").to_owned())
        .collect()
}

#[test]
fn helm_lint_strict_passes() {
    for sets in [
        &[][..],
        &["xds.address=http://cp.mesh-system.svc:15010"][..],
        &[
            "updateStrategy.maxSurge=0",
            "updateStrategy.maxUnavailable=1",
            "takeover=false",
        ][..],
        &[
            "identity.ca.listen.enabled=true",
            "identity.ca.listen.service=true",
        ][..],
    ] {
        let mut args = vec!["lint", "--strict", CHART];
        for set in sets {
            args.extend(["--set", set]);
        }
        let out = helm(&args);
        assert!(
            out.status.success(),
            "helm {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn committed_manifests_are_the_chart_rendered() {
    let fresh = format!("{HEADER}{}", render(&["createNamespace=true"]));
    let path = root().join(MANIFESTS);
    let committed = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    if committed != fresh {
        let line = committed
            .lines()
            .zip(fresh.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(committed.lines().count().min(fresh.lines().count()));
        panic!(
            "{MANIFESTS} differs from the chart (first at line {}): run `cargo xtask \
             deploy-render` and commit the result",
            line + 1
        );
    }
}

#[test]
fn rendered_manifests_validate_strictly() {
    let committed = std::fs::read_to_string(root().join(MANIFESTS)).expect("manifests");
    assert_valid(MANIFESTS, &committed);
    let kinds: BTreeSet<String> = docs(&committed)
        .iter()
        .map(|d| d["kind"].as_str().expect("kind").to_owned())
        .collect();
    let want: BTreeSet<String> = [
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "ClusterRole",
        "ClusterRoleBinding",
        "DaemonSet",
    ]
    .map(String::from)
    .into();
    assert_eq!(kinds, want);

    let cases: &[(&str, &[&str])] = &[
        ("the chart's defaults", &[]),
        (
            "an external control plane",
            &[
                "xds.address=http://istiod.istio-system.svc:15010",
                "xds.mode=sotw",
            ],
        ),
        (
            "istiod's CA in TLS",
            &[
                "identity.ca.mode=external",
                "identity.ca.address=https://istiod.istio-system.svc:15012",
            ],
        ),
        (
            "a custom image and resources",
            &[
                "image.repository=registry.example.com/mesh/agent",
                "image.tag=dev-1",
                "image.pullPolicy=Always",
                "resources.limits.memory=2Gi",
                "resources.limits.cpu=2",
                "resources.requests.cpu=250m",
                "imagePullSecrets[0].name=registry",
            ],
        ),
        (
            "a CA served to other nodes, with its Service and node tokens",
            &[
                "identity.ca.listen.enabled=true",
                "identity.ca.listen.service=true",
                "identity.ca.listen.serverNames[0]=ca.example.com",
                "identity.ca.listen.trustedServiceAccount=mesh-system/mesh-agent-nodes",
                "identity.ca.listen.nodeTokensSecretName=mesh-ca-node-tokens",
            ],
        ),
        (
            "a generated root served to other nodes",
            &[
                "identity.ca.mode=generated",
                "identity.ca.listen.enabled=true",
                "identity.ca.listen.port=16012",
            ],
        ),
        (
            "the rollout without hand-over",
            &[
                "updateStrategy.maxSurge=0",
                "updateStrategy.maxUnavailable=1",
                "takeover=false",
                "handoverDrainMs=0",
                "terminationGracePeriodSeconds=30",
            ],
        ),
        (
            "a percentage rollout and excludes",
            &[
                "updateStrategy.maxSurge=10%",
                "updateStrategy.maxUnavailable=10%",
                "exclude[0].cidr=10.96.0.1/32",
                "exclude[0].port=443",
                "exclude[1].cidr=169.254.0.0/16",
                "admin.host=0.0.0.0",
                "cgroup.hostPath=/sys/fs/cgroup/unified",
                "cgroup.kubepods=/sys/fs/cgroup/unified/kubepods.slice",
            ],
        ),
    ];
    for (what, sets) in cases {
        let yaml = render(sets);
        assert_valid(what, &yaml);
    }
}

#[test]
fn an_external_ca_is_reached_in_tls_against_the_mesh_root() {
    let yaml = render(&[
        "identity.ca.mode=external",
        "identity.ca.address=https://istiod.istio-system.svc:15012",
    ]);
    for want in [
        "MESH_CA_ROOT_CERT",
        "/etc/mesh-agent-ca-root/root-cert.pem",
        "name: istio-ca-root-cert",
    ] {
        assert!(yaml.contains(want), "{want} missing:\n{yaml}");
    }
    assert!(!yaml.contains("MESH_CA_PLAINTEXT"));
    let plain = render(&[
        "identity.ca.mode=external",
        "identity.ca.address=http://ca.mesh.svc:15012",
        "identity.ca.plaintext=true",
    ]);
    assert!(plain.contains("MESH_CA_PLAINTEXT") && !plain.contains("MESH_CA_ROOT_CERT"));
}

#[test]
fn overrides_reach_the_daemonset() {
    let d = docs(&render(&[
        "xds.address=http://istiod.istio-system.svc:15010",
    ]));
    assert_eq!(
        env_value(&d, "MESH_XDS_ADDRESS").as_deref(),
        Some("http://istiod.istio-system.svc:15010")
    );
    let d = docs(&render(&[]));
    assert_eq!(
        env_value(&d, "MESH_XDS_ADDRESS"),
        None,
        "embedded by default"
    );

    let d = docs(&render(&[
        "image.repository=registry.example.com/mesh/agent",
        "image.tag=dev-1",
        "resources.limits.memory=2Gi",
    ]));
    let c = container(&d);
    assert_eq!(c["image"], "registry.example.com/mesh/agent:dev-1");
    assert_eq!(c["resources"]["limits"]["memory"], "2Gi");

    // The rollout: each knob on its own, percentages, and the way back to stop-then-start.
    let d = docs(&render(&["updateStrategy.maxUnavailable=10%"]));
    assert_eq!(
        rolling_update(&d),
        &serde_json::json!({ "maxSurge": 1, "maxUnavailable": "10%" })
    );
    let d = docs(&render(&["updateStrategy.maxSurge=25%"]));
    assert_eq!(
        rolling_update(&d),
        &serde_json::json!({ "maxSurge": "25%", "maxUnavailable": 0 })
    );
    let d = docs(&render(&[
        "updateStrategy.maxSurge=0",
        "updateStrategy.maxUnavailable=1",
        "takeover=false",
    ]));
    assert_eq!(
        rolling_update(&d),
        &serde_json::json!({ "maxSurge": 0, "maxUnavailable": 1 })
    );
    assert_eq!(env_value(&d, "MESH_TAKEOVER").as_deref(), Some("false"));
    // Without surge, takeover may stay on (with no agent running it starts as usual).
    let d = docs(&render(&[
        "updateStrategy.maxSurge=0",
        "updateStrategy.maxUnavailable=1",
    ]));
    assert_eq!(env_value(&d, "MESH_TAKEOVER").as_deref(), Some("true"));

    // The hand-over drain, with a grace period that covers it.
    let d = docs(&render(&[
        "handoverDrainMs=120000",
        "terminationGracePeriodSeconds=150",
    ]));
    assert_eq!(
        env_value(&d, "MESH_HANDOVER_DRAIN_MS").as_deref(),
        Some("120000")
    );
    assert_eq!(
        object(&d, "DaemonSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
        150
    );

    // Exclusions land in the settings file the agent reads.
    let d = docs(&render(&[
        "exclude[0].cidr=10.96.0.1/32",
        "exclude[0].port=443",
    ]));
    let settings = object(&d, "ConfigMap")["data"]["config.yaml"]
        .as_str()
        .expect("config.yaml");
    let parsed = docs(settings);
    assert_eq!(
        parsed[0]["exclude"],
        serde_json::json!([{ "cidr": "10.96.0.1/32", "port": 443 }])
    );

    // The admin endpoint bound to every address: probes still ask loopback.
    let d = docs(&render(&["admin.host=0.0.0.0"]));
    assert_eq!(
        env_value(&d, "MESH_ADMIN_ADDRESS").as_deref(),
        Some("0.0.0.0:15020")
    );
    assert_eq!(
        container(&d)["readinessProbe"]["httpGet"]["host"],
        "127.0.0.1"
    );
}

#[test]
fn validation_can_fail() {
    // Values the schema (or the chart) must refuse.
    let refused: &[(&[&str], &str)] = &[
        // Kubernetes refuses both 0; the chart says so first.
        (
            &[
                "updateStrategy.maxSurge=0",
                "updateStrategy.maxUnavailable=0",
            ],
            "cannot both be 0",
        ),
        (
            &[
                "updateStrategy.maxSurge=0%",
                "updateStrategy.maxUnavailable=0%",
            ],
            "cannot both be 0",
        ),
        // maxUnavailable 0 is the default: maxSurge 0 alone leaves both at 0.
        (&["updateStrategy.maxSurge=0"], "cannot both be 0"),
        (&["updateStrategy.maxUnavailable=150%"], "maxUnavailable"),
        (&["updateStrategy.maxUnavailable=-1"], "maxUnavailable"),
        (&["updateStrategy.maxSurge=150%"], "maxSurge"),
        (&["updateStrategy.maxSurge=-1"], "maxSurge"),
        // A surge pod without takeover would find the node taken and never be ready.
        (&["takeover=false"], "needs takeover"),
        (&["handoverDrainMs=-1"], "handoverDrainMs"),
        (&["handoverDrainMs=600001"], "handoverDrainMs"),
        (&["admin.port=70000"], "port"),
        (&["image.pullPolicy=Sometimes"], "pullPolicy"),
        (&["bpf.pinPath=/var/run/mesh"], "pinPath"),
        (&["xds.mode=rest"], "mode"),
        (&["exclude[0].cidr=10.96.0.1"], "cidr"),
        (&["imgae.tag=typo"], "imgae"),
        (
            &["terminationGracePeriodSeconds=5"],
            "terminationGracePeriodSeconds",
        ),
        // The grace period must also cover the hand-over drain (60 s by default).
        (&["terminationGracePeriodSeconds=60"], "handoverDrainMs"),
        (&["handoverDrainMs=90000"], "handoverDrainMs"),
        (
            &["drainMs=100000", "terminationGracePeriodSeconds=100"],
            "drainMs (100000 ms)",
        ),
        // The embedded CA, which serves on identity.ca.listen, does not run then.
        (
            &[
                "identity.ca.mode=external",
                "identity.ca.address=https://istiod.istio-system.svc:15012",
                "identity.ca.listen.enabled=true",
            ],
            "identity.ca.listen",
        ),
        (
            &["identity.ca.listen.trustedServiceAccount=mesh-agent"],
            "trustedServiceAccount",
        ),
        (&["identity.ca.listen.port=70000"], "port"),
        (
            &["identity.ca.listen.serverNames[0]=bad name"],
            "serverNames",
        ),
        (&["identity.ca.listen.enabeld=true"], "enabeld"),
        // The CA token would travel in clear.
        (
            &[
                "identity.ca.mode=external",
                "identity.ca.address=http://istiod.istio-system.svc:15010",
            ],
            "identity.ca.plaintext",
        ),
    ];
    for (sets, names) in refused {
        let message = render_fails(sets);
        assert!(
            message.contains(names),
            "helm refused {sets:?} without naming {names}:\n{message}"
        );
    }

    // What is no longer refused: no unavailable node while one surges (the default).
    let d = docs(&render(&[
        "updateStrategy.maxSurge=1",
        "updateStrategy.maxUnavailable=0",
    ]));
    assert_eq!(rolling_update(&d)["maxUnavailable"], 0);
    // Just above the longest drain is enough.
    render(&["handoverDrainMs=60999", "terminationGracePeriodSeconds=61"]);

    // A typo'd field kubernetes-validate must reject (strict: unknown fields are errors).
    let good = render(&[]);
    for (from, to, field) in [
        ("hostNetwork: true", "hostNetwrok: true", "hostNetwrok"),
        (
            "readOnlyRootFilesystem:",
            "readOnlyRootFileSystem:",
            "readOnlyRootFileSystem",
        ),
        ("verbs: [list, watch]", "verb: [list, watch]", "verb"),
    ] {
        assert!(good.contains(from), "the render has no {from:?}");
        let (ok, report) = validate(&good.replacen(from, to, 1));
        assert!(!ok, "kubernetes-validate accepted {field}:\n{report}");
        assert!(
            report.contains(field),
            "the report does not name {field}:\n{report}"
        );
    }
    // A wrong type, too.
    let (ok, report) = validate(&good.replacen(
        "terminationGracePeriodSeconds: 90",
        "terminationGracePeriodSeconds: ninety",
        1,
    ));
    assert!(
        !ok,
        "kubernetes-validate accepted a string for an integer:\n{report}"
    );
}

#[test]
fn daemonset_runs_on_the_host_with_named_capabilities_only() {
    let yaml = render(&[]);
    assert!(
        !yaml.contains("privileged: true"),
        "no privileged container anywhere"
    );
    let d = docs(&yaml);
    let ds = object(&d, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["serviceAccountName"], "mesh-agent");
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(
        pod["tolerations"],
        serde_json::json!([{ "operator": "Exists" }])
    );
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace");
    assert_eq!(grace, 90);
    assert!(grace * 1000 > 5000, "grace period above --drain-ms");
    assert!(
        grace * 1000 > 60_000,
        "grace period above --handover-drain-ms"
    );
    // Upgrades surge: the new pod starts next to the old one, which hands the node over.
    assert_eq!(
        rolling_update(&d),
        &serde_json::json!({ "maxSurge": 1, "maxUnavailable": 0 })
    );
    assert_eq!(ds["metadata"]["namespace"], NAMESPACE);

    let c = container(&d);
    // With hostNetwork a containerPort becomes a hostPort, and the scheduler would never
    // place the surge pod next to the old one: no port may be declared anywhere.
    assert!(c["ports"].is_null(), "the agent's container declares ports");
    for field in ["hostPort", "containerPort"] {
        assert!(!has_key(&d, field), "the render declares a {field}");
    }
    let sc = &c["securityContext"];
    assert_ne!(sc["privileged"], true);
    assert_eq!(sc["runAsUser"], 0);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(
        strings(&sc["capabilities"]["drop"]),
        ["ALL".to_owned()].into()
    );
    assert_eq!(
        strings(&sc["capabilities"]["add"]),
        CAPABILITIES.iter().map(|s| (*s).to_owned()).collect()
    );
    assert!(pod["securityContext"].is_null() || pod["securityContext"]["sysctls"].is_null());

    // Probes on the admin port, asked on the node's loopback (host network).
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/healthz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"], 15020, "{probe}");
        assert_eq!(get["host"], "127.0.0.1", "{probe}");
    }
    assert_eq!(
        env_value(&d, "MESH_ADMIN_ADDRESS").as_deref(),
        Some("127.0.0.1:15020")
    );

    // Kubernetes mode, this node only.
    let env = env(&d);
    let by_name = |n: &str| {
        env.iter()
            .position(|(name, _)| name == n)
            .unwrap_or_else(|| panic!("no {n} in the agent's env"))
    };
    assert_eq!(env[by_name("MESH_SOURCE")].1["value"], "kubernetes");
    assert_eq!(
        env[by_name("MESH_NODE_NAME")].1["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert_eq!(
        env[by_name("HOST_IP")].1["valueFrom"]["fieldRef"]["fieldPath"],
        "status.hostIP"
    );
    // Pods are sent to the node's IPv4 address, which the agent picks from all of the
    // node's addresses: status.hostIP is IPv6 on an IPv6-primary node, and
    // `$(HOST_IP):15001` would then be no --proxy-redirect at all.
    assert_eq!(
        env[by_name("MESH_HOST_IPS")].1["valueFrom"]["fieldRef"]["fieldPath"],
        "status.hostIPs"
    );
    assert_eq!(env[by_name("MESH_PROXY_REDIRECT")].1["value"], "auto");
    assert!(
        env.iter()
            .all(|(_, e)| !e["value"].as_str().unwrap_or("").contains("$(HOST_IP):")),
        "no redirect is built from the primary address alone"
    );
    assert_eq!(
        env_value(&d, "MESH_CONFIG").as_deref(),
        Some("/etc/mesh-agent/config.yaml")
    );
    assert_eq!(
        env_value(&d, "MESH_PIN_PATH").as_deref(),
        Some("/sys/fs/bpf/mesh")
    );
    // The hand-over: the new agent asks the old one for the node, which then drains.
    assert_eq!(env_value(&d, "MESH_TAKEOVER").as_deref(), Some("true"));
    assert_eq!(env_value(&d, "MESH_DRAIN_MS").as_deref(), Some("5000"));
    assert_eq!(
        env_value(&d, "MESH_HANDOVER_DRAIN_MS").as_deref(),
        Some("60000")
    );
    assert_eq!(c["args"], serde_json::json!(["run"]));

    // Mounts: the node's bpffs (writable, pins) and cgroup tree (read-only), the settings.
    let mounts: Vec<(String, String, bool)> = c["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .map(|m| {
            (
                m["name"].as_str().expect("name").to_owned(),
                m["mountPath"].as_str().expect("mountPath").to_owned(),
                m["readOnly"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    assert_eq!(
        mounts,
        [
            ("bpffs", "/sys/fs/bpf", false),
            ("cgroup", "/sys/fs/cgroup", true),
            ("config", "/etc/mesh-agent", true),
            ("run", "/run/mesh-agent", false),
            // The embedded CA's plug-in Secret (the default CA mode), read-only.
            ("ca", "/etc/mesh-agent-ca", true),
        ]
        .map(|(n, p, r)| (n.to_owned(), p.to_owned(), r))
    );
    assert_eq!(
        env_value(&d, "MESH_CA_DIR").as_deref(),
        Some("/etc/mesh-agent-ca")
    );
    assert_eq!(
        env_value(&d, "MESH_TRUST_DOMAIN").as_deref(),
        Some("cluster.local")
    );
    assert_eq!(
        pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == "ca")
            .map(|v| v["secret"]["secretName"].clone()),
        Some("cacerts".into())
    );
    let volumes = pod["volumes"].as_array().expect("volumes");
    let host_path = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"] == name)
            .map(|v| v["hostPath"]["path"].clone())
    };
    assert_eq!(host_path("bpffs"), Some("/sys/fs/bpf".into()));
    assert_eq!(host_path("cgroup"), Some("/sys/fs/cgroup".into()));
    assert_eq!(
        volumes
            .iter()
            .find(|v| v["name"] == "run")
            .map(|v| v["emptyDir"]["medium"].clone()),
        Some("Memory".into()),
        "the ADS socket's folder is private to the container"
    );
    // The fifth is the CA Secret (checked above), not a host path.
    assert_eq!(volumes.len(), 5, "no other host access");
}

#[test]
fn cluster_role_reads_only_what_the_agent_watches() {
    let d = docs(&render(&[]));
    let role = object(&d, "ClusterRole");
    // (API group, resource) -> verbs.
    let mut granted: Vec<(String, String, BTreeSet<String>)> = Vec::new();
    for rule in role["rules"].as_array().expect("rules") {
        assert!(rule["resourceNames"].is_null() && rule["nonResourceURLs"].is_null());
        let verbs = strings(&rule["verbs"]);
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                granted.push((group.clone(), resource, verbs.clone()));
            }
        }
    }
    granted.sort();
    let set = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>();
    let read = set(&["get", "list", "watch"]);
    let mut want = vec![
        (
            String::new(),
            "events".to_owned(),
            set(&["create", "patch"]),
        ),
        (String::new(), "namespaces".to_owned(), read.clone()),
        (String::new(), "pods".to_owned(), read.clone()),
        (String::new(), "serviceaccounts".to_owned(), read.clone()),
        (String::new(), "services".to_owned(), read),
        (
            "discovery.k8s.io".to_owned(),
            "endpointslices".to_owned(),
            set(&["list", "watch"]),
        ),
        (
            "gateway.networking.k8s.io".to_owned(),
            "grpcroutes".to_owned(),
            set(&["list", "watch"]),
        ),
        (
            "gateway.networking.k8s.io".to_owned(),
            "httproutes".to_owned(),
            set(&["list", "watch"]),
        ),
        (
            "authentication.k8s.io".to_owned(),
            "tokenreviews".to_owned(),
            set(&["create"]),
        ),
        (
            "security.istio.io".to_owned(),
            "authorizationpolicies".to_owned(),
            set(&["list", "watch"]),
        ),
        (
            "security.istio.io".to_owned(),
            "peerauthentications".to_owned(),
            set(&["list", "watch"]),
        ),
    ];
    want.sort();
    assert_eq!(granted, want);

    let binding = object(&d, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(
        binding["subjects"],
        serde_json::json!([{ "kind": "ServiceAccount", "name": "mesh-agent", "namespace": NAMESPACE }])
    );
    let sa = object(&d, "ServiceAccount");
    assert_eq!(sa["metadata"]["namespace"], NAMESPACE);
}

/// `identity.ca.listen`: the embedded CA served to other nodes' agents (`--ca-listen`),
/// with the names its certificate carries, whose ServiceAccount tokens it accepts (the
/// ClusterRole lets it review them) or which node tokens, and a Service in front of it.
#[test]
fn the_embedded_ca_is_served_to_other_nodes_when_asked() {
    // Off by default: nothing listens, no Service.
    let d = docs(&render(&[]));
    for name in [
        "MESH_CA_LISTEN",
        "MESH_CA_SERVER_NAMES",
        "MESH_CA_K8S_SERVICE_ACCOUNT",
        "MESH_CA_NODE_TOKENS",
    ] {
        assert_eq!(env_value(&d, name), None, "{name} set by default");
    }
    assert!(!d.iter().any(|o| o["kind"] == "Service"));

    let yaml = render(&[
        "identity.ca.listen.enabled=true",
        "identity.ca.listen.service=true",
        "identity.ca.listen.serverNames[0]=ca.example.com",
        "identity.ca.listen.serverNames[1]=10.0.0.10",
        "identity.ca.listen.trustedServiceAccount=mesh-system/mesh-agent-nodes",
        "identity.ca.listen.nodeTokensSecretName=mesh-ca-node-tokens",
    ]);
    assert_valid("the CA served", &yaml);
    let d = docs(&yaml);
    assert_eq!(
        env_value(&d, "MESH_CA_LISTEN").as_deref(),
        Some("0.0.0.0:15012")
    );
    assert_eq!(
        env_value(&d, "MESH_CA_SERVER_NAMES").as_deref(),
        Some(
            "$(HOST_IP),$(MESH_NODE_NAME),mesh-agent-ca.mesh-system.svc,mesh-agent-ca.mesh-system,\
             ca.example.com,10.0.0.10"
        )
    );
    // $(VAR) expands only if VAR is declared earlier.
    let env = env(&d);
    let at = |n: &str| env.iter().position(|(name, _)| name == n).unwrap();
    assert!(at("HOST_IP") < at("MESH_CA_SERVER_NAMES"));
    assert!(at("MESH_NODE_NAME") < at("MESH_CA_SERVER_NAMES"));
    assert_eq!(
        env_value(&d, "MESH_CA_K8S_SERVICE_ACCOUNT").as_deref(),
        Some("mesh-system/mesh-agent-nodes")
    );
    assert_eq!(
        env_value(&d, "MESH_CA_K8S_AUDIENCE").as_deref(),
        Some("istio-ca")
    );
    // The node tokens: a file from the Secret's key `tokens`, read-only.
    assert_eq!(
        env_value(&d, "MESH_CA_NODE_TOKENS").as_deref(),
        Some("/etc/mesh-agent-ca-node-tokens/tokens")
    );
    let c = container(&d);
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "ca-node-tokens")
        .expect("node tokens mounted");
    assert_eq!(mount["mountPath"], "/etc/mesh-agent-ca-node-tokens");
    assert_eq!(mount["readOnly"], true);
    let pod = &object(&d, "DaemonSet")["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "ca-node-tokens")
        .expect("node tokens volume");
    assert_eq!(volume["secret"]["secretName"], "mesh-ca-node-tokens");
    assert_eq!(
        volume["secret"]["items"],
        serde_json::json!([{ "key": "tokens", "path": "tokens" }])
    );
    // The Service: this release's agents, on the CA's port.
    let svc = object(&d, "Service");
    assert_eq!(svc["metadata"]["name"], "mesh-agent-ca");
    assert_eq!(svc["metadata"]["namespace"], NAMESPACE);
    assert_eq!(
        svc["spec"]["selector"],
        object(&d, "DaemonSet")["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(
        svc["spec"]["ports"],
        serde_json::json!([{ "name": "https-ca", "protocol": "TCP", "appProtocol": "grpc", "port": 15012, "targetPort": 15012 }])
    );
    // Callers' ServiceAccount tokens are checked with a TokenReview: the role allows it.
    let role = object(&d, "ClusterRole");
    assert!(
        role["rules"].as_array().unwrap().iter().any(|r| {
            strings(&r["apiGroups"]).contains("authentication.k8s.io")
                && strings(&r["resources"]).contains("tokenreviews")
                && strings(&r["verbs"]).contains("create")
        }),
        "{role}"
    );

    // Without the Service and node tokens: the node's names only, nothing mounted.
    let yaml = render(&[
        "identity.ca.mode=generated",
        "identity.ca.listen.enabled=true",
        "identity.ca.listen.port=16012",
    ]);
    let d = docs(&yaml);
    assert_eq!(
        env_value(&d, "MESH_CA_LISTEN").as_deref(),
        Some("0.0.0.0:16012")
    );
    assert_eq!(
        env_value(&d, "MESH_CA_SERVER_NAMES").as_deref(),
        Some("$(HOST_IP),$(MESH_NODE_NAME)")
    );
    assert_eq!(env_value(&d, "MESH_CA_NODE_TOKENS"), None);
    assert_eq!(env_value(&d, "MESH_CA_K8S_SERVICE_ACCOUNT"), None);
    assert!(!d.iter().any(|o| o["kind"] == "Service"));
    assert!(!yaml.contains("ca-node-tokens"));
}

/// Native IPv6 capture (`ipv6.capture`): on by default as `auto`, the agent picking the
/// node's IPv6 address from `status.hostIPs` (an IPv4-only node: nothing captured);
/// a port or a fixed address passes through; `off` leaves MESH_PROXY_REDIRECT6 out
/// (MESH_HOST_IPS stays: the IPv4 redirect is picked from it too).
#[test]
fn ipv6_capture_is_auto_from_the_nodes_addresses_by_default() {
    let host_ips = |d: &[Value]| {
        env(d)
            .into_iter()
            .find(|(n, _)| n == "MESH_HOST_IPS")
            .map(|(_, e)| e["valueFrom"]["fieldRef"]["fieldPath"].clone())
    };
    let d = docs(&render(&[]));
    assert_eq!(
        env_value(&d, "MESH_PROXY_REDIRECT6").as_deref(),
        Some("auto")
    );
    assert_eq!(host_ips(&d), Some(Value::from("status.hostIPs")));
    for (set, want) in [
        ("ipv6.capture=auto:15006", "auto:15006"),
        ("ipv6.capture=[fd00:10::1]:15001", "[fd00:10::1]:15001"),
    ] {
        let d = docs(&render(&[set]));
        assert_eq!(
            env_value(&d, "MESH_PROXY_REDIRECT6").as_deref(),
            Some(want),
            "{set}"
        );
        assert_eq!(host_ips(&d), Some(Value::from("status.hostIPs")), "{set}");
    }
    let d = docs(&render(&["ipv6.capture=off"]));
    assert_eq!(env_value(&d, "MESH_PROXY_REDIRECT6"), None);
    assert_eq!(host_ips(&d), Some(Value::from("status.hostIPs")));
    assert_eq!(
        env_value(&d, "MESH_PROXY_REDIRECT").as_deref(),
        Some("auto")
    );
    // What the agent would refuse, the schema refuses first.
    for bad in [
        "ipv6.capture=on",
        "ipv6.capture=auto:0",
        "ipv6.capture=fd00:10::1",
        "ipv6.capture=10.0.0.1:15001",
    ] {
        let e = render_fails(&[bad]);
        assert!(e.contains("ipv6/capture"), "{bad}: {e}");
    }
}
