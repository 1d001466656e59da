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

/// The skeleton and the service items, or `None` when the file is not of the plain shape
/// (the caller then parses the whole file).
pub fn split(text: &str) -> Option<Split<'_>> {
    // Anchors and aliases could tie an item to text outside it; tabs and several documents
    // change how lines are read. None of them in the file: the line structure is the YAML
    // structure.
    // One memchr pass per character: a char-set pattern would walk the text char by char.
    if ['&', '*', '\t', '\r'].iter().any(|&c| text.contains(c)) {
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

/// Hashes item texts a word at a time: SipHash over 4.7 MB of items, twice per change,
/// cost more than parsing the changed item. Not keyed: the file is the operator's own
/// (root-owned configuration), not input a peer controls.
#[derive(Clone, Copy, Default)]
struct TextHash;

impl std::hash::BuildHasher for TextHash {
    type Hasher = WordHasher;
    fn build_hasher(&self) -> WordHasher {
        WordHasher(0x9e37_79b9_7f4a_7c15)
    }
}

struct WordHasher(u64);

impl std::hash::Hasher for WordHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0xff51_afd7_ed55_8ccd;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            self.0 = (self.0 ^ w).wrapping_mul(K).rotate_left(29);
        }
        let mut tail = [0u8; 8];
        let rest = chunks.remainder();
        tail[..rest.len()].copy_from_slice(rest);
        self.0 = (self.0 ^ u64::from_le_bytes(tail) ^ bytes.len() as u64)
            .wrapping_mul(K)
            .rotate_left(29);
    }

    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

/// Parsed service items of the last parse, by their exact text.
#[derive(Default)]
pub struct ItemCache {
    by_text: HashMap<Box<str>, Arc<ServiceSpec>, TextHash>,
    /// Items parsed (not reused) since start.
    pub parsed: u64,
}

impl ItemCache {
    /// The services of `items`, reusing what the last call parsed; `None` if one does not
    /// parse as exactly one service (the whole file's parse then says why). The cache then
    /// holds exactly these items.
    pub fn services(&mut self, items: &[&str]) -> Option<Vec<Arc<ServiceSpec>>> {
        let mut next = HashMap::with_capacity_and_hasher(items.len(), TextHash);
        let mut out = Vec::with_capacity(items.len());
        for &item in items {
            // An item seen last time moves to the new cache with its key (no copy).
            let (key, svc) = match self.by_text.remove_entry(item) {
                Some(kept) => kept,
                None => match next.get(item) {
                    // The same text twice in one file (a duplicate, which the checks
                    // report): parsed once.
                    Some(s) => (Box::from(item), Arc::clone(s)),
                    None => {
                        self.parsed += 1;
                        let Some(svc) = parse_item(item) else {
                            // Keep what was parsed for the next (fixed) version.
                            self.by_text.extend(next);
                            return None;
                        };
                        (Box::from(item), svc)
                    }
                },
            };
            out.push(svc.clone());
            next.insert(key, svc);
        }
        self.by_text = next;
        Some(out)
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
