//! An ordered map whose copies share all but what a change touched.
//!
//! Each ADS snapshot holds, per type, every resource by name (10k clusters at 10k
//! services). Successive snapshots are separate values (streams still hold the one they
//! reconciled), so a change to one resource used to copy the whole `BTreeMap` of that
//! type: 10k names and version strings allocated, and the old map's freed. `ChunkedMap`
//! keeps its entries in name order in chunks of at most `2 * CHUNK` entries, each behind
//! its own `Arc`: a copy shares every chunk, and changing one entry copies the list of
//! chunk pointers and the one chunk it is in (about 160 pointers and at most 128 entries
//! at 10k), whatever the map's size. Reads are a binary search over the chunks' first keys,
//! then over the chunk; iteration is in name order, as the `BTreeMap` gave it.
//!
//! A chunk is a sorted `Vec`, not a `BTreeMap`: entries inserted in name order (every
//! first load) left each `BTreeMap` node about half full, twice the memory of the entries
//! (about 3 MB of a 10k-service snapshot); a chunk shrinks to its entries when it splits
//! and an insert moves at most 127 entries of 64 bytes.

use std::{fmt, sync::Arc};

/// Target chunk size; a chunk splits in two at twice this.
const CHUNK: usize = 64;

/// Entries in key order, keys distinct.
type Chunk<V> = Vec<(String, V)>;

pub struct ChunkedMap<V> {
    /// Non-empty chunks, in key order, not overlapping.
    chunks: Arc<Vec<Arc<Chunk<V>>>>,
    len: usize,
}

impl<V> Clone for ChunkedMap<V> {
    fn clone(&self) -> Self {
        ChunkedMap {
            chunks: self.chunks.clone(),
            len: self.len,
        }
    }
}

impl<V> Default for ChunkedMap<V> {
    fn default() -> Self {
        ChunkedMap {
            chunks: Arc::default(),
            len: 0,
        }
    }
}

impl<V: fmt::Debug> fmt::Debug for ChunkedMap<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<V: PartialEq> PartialEq for ChunkedMap<V> {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl<V> ChunkedMap<V> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The chunk that holds `key` if any chunk does (the last chunk whose first key is
    /// not after it), else where it would go.
    fn chunk_of(&self, key: &str) -> usize {
        chunk_of(&self.chunks, key)
    }

    pub fn get(&self, key: &str) -> Option<&V> {
        let c = self.chunks.get(self.chunk_of(key))?;
        let i = find(c, key).ok()?;
        Some(&c[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &V)> + '_ {
        self.chunks
            .iter()
            .flat_map(|c| c.iter().map(|(k, v)| (k, v)))
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> + '_ {
        self.iter().map(|(k, _)| k)
    }

    /// Chunks of `self` that `other` does not share (by pointer): what a change between
    /// the two copied.
    pub fn chunks_not_shared_with(&self, other: &ChunkedMap<V>) -> usize {
        self.chunks
            .iter()
            .filter(|c| !other.chunks.iter().any(|d| Arc::ptr_eq(c, d)))
            .count()
    }
}

/// The chunk that holds `key` if any chunk does (the last chunk whose first key is not
/// after it), else where it would go.
fn chunk_of<V>(chunks: &[Arc<Chunk<V>>], key: &str) -> usize {
    let after =
        chunks.partition_point(|c| c.first().is_some_and(|(first, _)| first.as_str() <= key));
    after.saturating_sub(1)
}

/// `key`'s index in `chunk`, or where it would go.
fn find<V>(chunk: &Chunk<V>, key: &str) -> Result<usize, usize> {
    chunk.binary_search_by(|(k, _)| k.as_str().cmp(key))
}

impl<V: Clone> ChunkedMap<V> {
    /// Inserts or replaces; copies the chunk list and one chunk if they are shared.
    pub fn insert(&mut self, key: String, value: V) -> Option<V> {
        let chunks = Arc::make_mut(&mut self.chunks);
        if chunks.is_empty() {
            chunks.push(Arc::default());
        }
        let i = chunk_of(chunks, &key);
        let chunk = Arc::make_mut(&mut chunks[i]);
        match find(chunk, &key) {
            Ok(at) => return Some(std::mem::replace(&mut chunk[at].1, value)),
            Err(at) => chunk.insert(at, (key, value)),
        }
        self.len += 1;
        if chunk.len() >= 2 * CHUNK {
            let upper = chunk.split_off(CHUNK);
            chunk.shrink_to_fit();
            chunks.insert(i + 1, Arc::new(upper));
        }
        None
    }

    /// Removes; copies the chunk list and one chunk if they are shared (and only when the
    /// key is there).
    pub fn remove(&mut self, key: &str) -> Option<V> {
        let i = self.chunk_of(key);
        let at = find(self.chunks.get(i)?, key).ok()?;
        let chunks = Arc::make_mut(&mut self.chunks);
        let chunk = Arc::make_mut(&mut chunks[i]);
        let (_, old) = chunk.remove(at);
        if chunk.is_empty() {
            chunks.remove(i);
        }
        self.len -= 1;
        Some(old)
    }
}

impl<V: Clone> FromIterator<(String, V)> for ChunkedMap<V> {
    fn from_iter<I: IntoIterator<Item = (String, V)>>(iter: I) -> Self {
        let mut m = ChunkedMap::default();
        for (k, v) in iter {
            m.insert(k, v);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Random inserts and removes agree with a `BTreeMap`, in content and order, and a
    /// copy taken before a change does not see it.
    #[test]
    fn behaves_as_an_ordered_map() {
        let mut m = ChunkedMap::default();
        let mut model = BTreeMap::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut copies = Vec::new();
        for step in 0..20_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = format!("k{}", x % 3000);
            if x.is_multiple_of(5) {
                assert_eq!(m.remove(&key), model.remove(&key), "{step}");
            } else {
                assert_eq!(m.insert(key.clone(), step), model.insert(key, step));
            }
            if step.is_multiple_of(4000) {
                copies.push((m.clone(), model.clone()));
            }
        }
        assert_eq!(m.len(), model.len());
        assert!(m.iter().eq(model.iter()));
        for k in ["k0", "k1500", "k2999", "nope", ""] {
            assert_eq!(m.get(k), model.get(k));
        }
        assert!(m
            .chunks
            .iter()
            .all(|c| !c.is_empty() && c.len() < 2 * CHUNK));
        for (c, at) in copies {
            assert_eq!(c.len(), at.len());
            assert!(c.iter().eq(at.iter()));
        }
    }

    /// One change to a copy of a 10k map copies one chunk: the others stay shared.
    #[test]
    fn a_change_copies_one_chunk() {
        let m: ChunkedMap<u32> = (0..10_000u32).map(|i| (format!("s{i:05}"), i)).collect();
        let mut next = m.clone();
        next.insert("s05000".into(), 0);
        next.remove("s07000");
        assert!(m.chunks.len() > 100, "{}", m.chunks.len());
        assert_eq!(next.chunks_not_shared_with(&m), 2);
        assert_eq!(m.get("s05000"), Some(&5000));
        assert_eq!(next.get("s05000"), Some(&0));
        assert_eq!((m.len(), next.len()), (10_000, 9_999));
    }
}
