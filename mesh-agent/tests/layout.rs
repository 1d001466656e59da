//! The dependency rules of docs/architecture.md ("Code map"), checked on the source: each
//! top-level module of `mesh-agent/src` may use only the modules its rule names. Test code
//! (`tests.rs` files and `#[cfg(test)]` items) is exempt: a test may drive any piece.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Module -> what it may use (`crate::<path>` prefixes); `*`: anything.
const RULES: &[(&str, &[&str])] = &[
    // Entry points and wiring.
    ("main", &["*"]),
    ("app", &["*"]),
    ("cli", &["*"]),
    // `mesh-agent top`: the admin endpoint over HTTP (the CLI's helper) and the text of
    // `inspect`, never a piece's state in process, so it works against a remote agent.
    ("top", &["cli", "admin::inspect", "config"]),
    // The runtime configuration names the option types of the pieces it configures.
    (
        "config",
        &[
            "datapath::features",
            "enrol::file",
            "proxy::http",
            "proxy::xds",
        ],
    ),
    // Admin and telemetry read every piece's state; no piece but the wiring uses admin.
    (
        "admin",
        &[
            "control::server",
            "datapath",
            "enrol",
            "identity",
            "lifecycle",
            "metrics",
            "proxy",
            "sys",
        ],
    ),
    // (Peers are named by SPIFFE ID: `identity`'s type.)
    ("metrics", &["datapath::writer", "enrol::file", "identity"]),
    // The datapath's map writer applies enrolment snapshots.
    ("datapath", &["enrol", "sys"]),
    // Sources produce the control plane's model of services.
    ("enrol", &["control::model", "sys"]),
    // The control plane never uses the proxy, the datapath or a source: it meets the proxy
    // on the xDS wire only.
    // (It names SPIFFE IDs with `identity`'s type, and signs them.)
    ("control", &["identity", "wire", "sys"]),
    // Identities, certificates and mTLS configs: asks a CA over the wire.
    ("identity", &["wire", "sys"]),
    // The proxy depends on its own model (`proxy::config`), never on the control plane's.
    (
        "proxy",
        &[
            "datapath",
            "identity",
            "lifecycle",
            "metrics",
            "sys",
            "wire",
        ],
    ),
    // Readiness, drain and hand-over: a leaf every piece may use.
    ("lifecycle", &["sys"]),
    ("wire", &[]),
    ("sys", &[]),
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source without comments and `#[cfg(test)]` items (brace-balanced from the
/// attribute on).
fn without_tests(s: &str) -> String {
    let code: String = s
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = String::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        // The item ends at its closing brace, at `;` for a one-line item, or, for a field
        // or an argument, at `,` or at the brace closing what holds it (kept).
        let (mut depth, mut parens) = (0usize, 0usize);
        let mut end = tail.len();
        for (j, c) in tail.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    end = j;
                    break;
                }
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = j + 1;
                        break;
                    }
                }
                '(' => parens += 1,
                ')' => parens = parens.saturating_sub(1),
                ';' if depth == 0 => {
                    end = j + 1;
                    break;
                }
                ',' if depth == 0 && parens == 0 => {
                    end = j + 1;
                    break;
                }
                _ => {}
            }
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Every `crate::a::b` a source names, as `a::b` (or `a`), grouped imports expanded one
/// level (`crate::{a::b, c}`).
fn crate_paths(s: &str) -> BTreeSet<String> {
    let first_two = |p: &str| {
        let parts: Vec<&str> = p
            .split("::")
            .map(str::trim)
            .take_while(|x| !x.is_empty() && !x.starts_with('{'))
            .collect();
        match parts.as_slice() {
            [a, b, ..] if b.starts_with(|c: char| c.is_ascii_lowercase()) => format!("{a}::{b}"),
            [a, ..] => (*a).to_owned(),
            [] => String::new(),
        }
    };
    let mut out = BTreeSet::new();
    for (i, _) in s.match_indices("crate::") {
        let rest = &s[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 || (c == ',' && depth == 1) {
                    out.insert(first_two(item.trim()));
                    item.clear();
                    if depth == 0 {
                        break;
                    }
                    continue;
                }
                item.push(c);
            }
        } else {
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            out.insert(first_two(&rest[..end]));
        }
    }
    out.remove("");
    out
}

#[test]
fn modules_use_only_what_their_rule_allows() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rules: BTreeMap<&str, &[&str]> = RULES.iter().copied().collect();
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut broken = Vec::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        if rel.file_name().is_some_and(|n| n == "tests.rs") || rel == Path::new("lib.rs") {
            continue;
        }
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_owned();
        let Some(allowed) = rules.get(module.as_str()) else {
            broken.push(format!(
                "{}: module `{module}` has no rule in RULES",
                rel.display()
            ));
            continue;
        };
        let text = without_tests(&std::fs::read_to_string(&f).unwrap());
        for used in crate_paths(&text) {
            let top = used.split("::").next().unwrap();
            let ok = top == module
                || allowed.iter().any(|a| {
                    *a == "*" || used == *a || used.starts_with(&format!("{a}::")) || top == *a
                });
            if !ok {
                broken.push(format!(
                    "{}: `{module}` uses `crate::{used}` (allowed: {allowed:?})",
                    rel.display()
                ));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "dependency rules broken:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_checker_sees_grouped_imports_and_skips_test_items() {
    let s = "//! see crate::y\nuse crate::{a::b, c, d::{e, f}};\nfn x() { crate::g::h(); }\n#[cfg(test)]\nmod tests { use crate::z; }\n";
    let paths = crate_paths(&without_tests(s));
    let want: BTreeSet<String> = ["a::b", "c", "d", "g::h"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(paths, want);
}
