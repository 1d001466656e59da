//! Parsing the standalone file again at the cost of what changed.
//!
//! A file of 10k services is 4.7 MB of YAML; parsing all of it takes a quarter of a second,
//! and an edit usually changes one service. `split` cuts a file of the plain shape we
//! write and document (a top-level `services:` block sequence, no anchors or aliases, no
//! tabs, one document) into a skeleton (the file with `services: []`) and the text of each
//! service item; `FileParser` parses the skeleton and only the items it has not seen
//! before, and reuses the parsed services it has (as the same `Arc`, so later stages can
//! tell "unchanged" by pointer). Any other shape, and any error, goes through the whole
//! file parse, which gives the one authoritative error message: the fast path never decides
//! what a file means on its own (the tests and the `standalone_file` fuzz target compare
//! both).

use std::{collections::HashMap, sync::Arc};

use crate::control::model::ServiceSpec;

/// The file cut into the skeleton and the `services:` items (dedented item texts).
#[derive(Debug, PartialEq)]
pub struct Split<'a> {
    pub skeleton: String,
    pub items: Vec<&'a str>,
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// Blank, or only a comment.
fn is_filler(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#')
}

/// A sequence entry at this line's indentation: `- ...` or a lone `-`.
fn is_entry(line: &str) -> bool {
    let t = line.trim_start_matches(' ').trim_end();
    t == "-" || t.starts_with("- ")
}

/// Whether the text holds `&`, `*`, a tab or a CR. One pass, a block at a time without an
/// early exit inside the block (so it vectorises): four `contains` scans of a 4.7 MB file
/// cost more than the rest of `split`.
fn has_structure_bytes(text: &str) -> bool {
    text.as_bytes().chunks(64).any(|block| {
        block.iter().fold(false, |seen, &b| {
            seen | matches!(b, b'&' | b'*' | b'\t' | b'\r')
        })
    })
}

/// The skeleton and the service items, or `None` when the file is not of the plain shape
/// (the caller then parses the whole file).
pub fn split(text: &str) -> Option<Split<'_>> {
    // Anchors and aliases could tie an item to text outside it; tabs and several documents
    // change how lines are read. None of them in the file: the line structure is the YAML
    // structure.
    if has_structure_bytes(text) {
        return None;
    }
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    if lines
        .iter()
        .any(|l| l.starts_with("---") || l.starts_with("...") || l.starts_with('%'))
    {
        return None;
    }
    let is_services_key = |l: &str| {
        let Some(rest) = l.trim_end().strip_prefix("services:") else {
            return false;
        };
        let rest = rest.trim_start();
        rest.is_empty() || rest.starts_with('#')
    };
    let starts: Vec<usize> = (0..lines.len())
        .filter(|&i| is_services_key(lines[i]))
        .collect();
    let mentions = lines.iter().filter(|l| l.starts_with("services")).count();
    // Exactly one `services:` key with a block value, and no other top-level line that
    // could also be it (`services: []`, `services : ...`).
    let [start] = starts[..] else {
        return None;
    };
    if mentions != 1 {
        return None;
    }
    // The entries' indentation, from the first line with content.
    let first = (start + 1..lines.len()).find(|&i| !is_filler(lines[i]))?;
    if !is_entry(lines[first]) {
        return None;
    }
    let ind = indent(lines[first]);
    let mut items: Vec<(usize, usize)> = Vec::new();
    let mut end = lines.len();
    for (i, l) in lines.iter().enumerate().skip(first) {
        if is_filler(l) {
            continue;
        }
        let n = indent(l);
        if n == ind && is_entry(l) {
            items.push((i, i + 1));
        } else if n > ind {
            // A continuation of the current item.
        } else if n == 0 {
            // The next top-level key ends the sequence.
            end = i;
            break;
        } else {
            return None;
        }
        if let Some(last) = items.last_mut() {
            last.1 = i + 1;
        }
    }
    // Filler lines between items go with the item before them; trailing filler of the last
    // item (before the next key) stays with it too: harmless either way.
    let mut offsets = Vec::with_capacity(lines.len() + 1);
    let mut at = 0;
    for l in &lines {
        offsets.push(at);
        at += l.len();
    }
    offsets.push(at);
    let cut: Vec<(usize, usize)> = items
        .iter()
        .enumerate()
        .map(|(k, &(from, _))| {
            let to = items.get(k + 1).map_or(end, |n| n.0);
            (offsets[from], offsets[to])
        })
        .collect();
    let mut skeleton =
        String::with_capacity(text.len() - cut.iter().map(|c| c.1 - c.0).sum::<usize>() + 4);
    for l in &lines[..start] {
        skeleton.push_str(l);
    }
    skeleton.push_str("services: []\n");
    // Filler between `services:` and the first item carries no meaning.
    for l in &lines[end..] {
        skeleton.push_str(l);
    }
    let items = cut.iter().map(|&(a, b)| &text[a..b]).collect();
    Some(Split { skeleton, items })
}

/// Parses one item (`- ...` at some indentation, with its continuation lines) as a service.
fn parse_item(item: &str) -> Option<Arc<ServiceSpec>> {
    let mut one: Vec<Arc<ServiceSpec>> = serde_yaml::from_str(item).ok()?;
    (one.len() == 1).then(|| one.remove(0))
}

/// A 128-bit fingerprint of an item's text, a word at a time: the cache keeps this, not
/// the text (4.7 MB of items at 10k services, and SipHash over all of them twice per
/// change cost more than parsing the changed item). Two lanes with different mixing, so
/// two texts of one file that differ yet share a fingerprint are not a practical concern;
/// not keyed: the file is the operator's own (root-owned configuration), not input a peer
/// controls.
fn fingerprint(text: &str) -> u128 {
    const K1: u64 = 0xff51_afd7_ed55_8ccd;
    const K2: u64 = 0xc4ce_b9fe_1a85_ec53;
    let (mut a, mut b) = (0x9e37_79b9_7f4a_7c15_u64, 0x6a09_e667_f3bc_c909_u64);
    let bytes = text.as_bytes();
    let mut chunks = bytes.chunks_exact(8);
    let mut word = |w: u64| {
        a = (a ^ w).wrapping_mul(K1).rotate_left(29);
        b = b.wrapping_add(w).wrapping_mul(K2).rotate_left(31) ^ (b >> 17);
    };
    for c in &mut chunks {
        word(u64::from_le_bytes(c.try_into().expect("8 bytes")));
    }
    let mut tail = [0u8; 8];
    let rest = chunks.remainder();
    tail[..rest.len()].copy_from_slice(rest);
    word(u64::from_le_bytes(tail) ^ ((bytes.len() as u64) << 3));
    let fin = |mut h: u64| {
        h ^= h >> 33;
        h = h.wrapping_mul(K1);
        h ^= h >> 33;
        h = h.wrapping_mul(K2);
        h ^ (h >> 33)
    };
    (u128::from(fin(a)) << 64) | u128::from(fin(b))
}

/// Fingerprints are hashes already: the map uses their low bits as they are.
#[derive(Clone, Copy, Default)]
struct Prehashed;

impl std::hash::BuildHasher for Prehashed {
    type Hasher = PrehashedHasher;
    fn build_hasher(&self) -> PrehashedHasher {
        PrehashedHasher(0)
    }
}

struct PrehashedHasher(u64);

impl std::hash::Hasher for PrehashedHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u128` is expected; anything else still hashes, if slowly.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Parsed service items of the last parse, by the fingerprint of their text.
#[derive(Default)]
pub struct ItemCache {
    by_print: HashMap<u128, Arc<ServiceSpec>, Prehashed>,
    /// Items parsed (not reused) since start.
    pub parsed: u64,
}

/// How a call's services differ from the previous successful call's.
#[derive(Debug, Default)]
pub struct ItemDiff {
    /// Items parsed in this call (not in the previous one).
    pub added: Vec<Arc<ServiceSpec>>,
    /// The previous call's items that are not in this one.
    pub removed: Vec<Arc<ServiceSpec>>,
    /// The same text twice in this call (the same `Arc` at two positions).
    pub repeated: bool,
}

impl ItemCache {
    /// The services of `items`, reusing what the last call parsed; `None` if one does not
    /// parse as exactly one service (the whole file's parse then says why). The cache then
    /// holds exactly these items.
    #[cfg(test)]
    pub fn services(&mut self, items: &[&str]) -> Option<Vec<Arc<ServiceSpec>>> {
        self.services_diff(items).map(|(out, _)| out)
    }

    /// `services`, with how they differ from the last call's (when that call returned
    /// services; after a `None` the cache holds both calls' items and the diff means
    /// nothing: the caller then checks the whole list).
    pub fn services_diff(&mut self, items: &[&str]) -> Option<(Vec<Arc<ServiceSpec>>, ItemDiff)> {
        let mut next = HashMap::with_capacity_and_hasher(items.len(), Prehashed);
        let mut out = Vec::with_capacity(items.len());
        let mut diff = ItemDiff::default();
        for &item in items {
            let print = fingerprint(item);
            let svc = match self.by_print.remove(&print) {
                Some(kept) => kept,
                // The same text twice in one file (a duplicate, which the checks report):
                // parsed once.
                None => match next.get(&print) {
                    Some(s) => {
                        diff.repeated = true;
                        Arc::clone(s)
                    }
                    None => {
                        self.parsed += 1;
                        let Some(svc) = parse_item(item) else {
                            // Keep what was parsed for the next (fixed) version.
                            self.by_print.extend(next);
                            return None;
                        };
                        diff.added.push(svc.clone());
                        svc
                    }
                },
            };
            out.push(svc.clone());
            next.insert(print, svc);
        }
        diff.removed = std::mem::replace(&mut self.by_print, next)
            .into_values()
            .collect();
        Some((out, diff))
    }

    /// Hands out `shared` from now on where the cache holds the service at its pointer
    /// (key), an equal value parsed elsewhere: the services a running consumer already
    /// holds, so that it can tell them unchanged by pointer.
    pub fn adopt(&mut self, shared: &HashMap<*const ServiceSpec, Arc<ServiceSpec>>) {
        for svc in self.by_print.values_mut() {
            if let Some(s) = shared.get(&Arc::as_ptr(svc)) {
                *svc = Arc::clone(s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_files_split_into_a_skeleton_and_items() {
        let text = "namespaces:\n  - { name: b }\nservices:\n  # a comment\n  - { name: s0, namespace: b, vip: 10.0.0.1, ports: [ { port: 80 } ] }\n\n  - name: s1\n    namespace: b\n    vip: 10.0.0.2\n    ports:\n      - port: 80\nexclude: []\n";
        let s = split(text).unwrap();
        assert_eq!(
            s.skeleton,
            "namespaces:\n  - { name: b }\nservices: []\nexclude: []\n"
        );
        assert_eq!(s.items.len(), 2);
        assert!(s.items[0].starts_with("  - { name: s0"));
        assert!(s.items[1].starts_with("  - name: s1\n    namespace: b"));
        let mut c = ItemCache::default();
        let first = c.services(&s.items).unwrap();
        assert_eq!(first[1].name, "s1");
        assert_eq!(c.parsed, 2);
        let again = c.services(&s.items).unwrap();
        assert!(Arc::ptr_eq(&first[0], &again[0]) && Arc::ptr_eq(&first[1], &again[1]));
        assert_eq!(c.parsed, 2);
    }

    #[test]
    fn zero_indented_entries_split_too() {
        let s = split(
            "services:\n- name: a\n  namespace: b\n- name: c\n  namespace: b\nnamespaces: []\n",
        )
        .unwrap();
        assert_eq!(
            s.items,
            vec!["- name: a\n  namespace: b\n", "- name: c\n  namespace: b\n"]
        );
        assert_eq!(s.skeleton, "services: []\nnamespaces: []\n");
    }

    #[test]
    fn other_shapes_are_left_to_the_whole_file_parse() {
        for text in [
            "services: [ { name: a } ]\n",
            "services:\n  - &a { name: a }\n  - *a\n",
            "services:\n\t- { name: a }\n",
            "---\nservices:\n  - { name: a }\n",
            "services:\n  - { name: a }\nservices:\n  - { name: b }\n",
            "services:\n    - { name: a }\n  - { name: b }\n",
            "services:\n  name: a\n",
            "namespaces: []\n",
        ] {
            assert_eq!(split(text), None, "{text:?}");
        }
    }
}
