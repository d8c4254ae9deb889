//! Worker ids as hash-map keys ([`crate::Ingest`]'s order map, [`crate::FleetState`]'s
//! workers), held in the table's own memory: a lookup compares the id where the hash led it
//! instead of following a pointer to a separate allocation. With 10 000 workers sending in turn
//! that pointer was a cache miss per map per frame (the largest user-space cost of ingest in
//! the profile, `bench/results/2026-11-29-ingest`).

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};

/// Longest id held inline: the longest a frame carries.
const INLINE: usize = crate::frame::MAX_STR;

/// A worker id; maps keyed by it are looked up by the id's bytes (`map.get(id.as_bytes())`).
#[derive(Clone)]
pub(crate) enum WorkerKey {
    Inline { len: u8, bytes: [u8; INLINE] },
    /// A longer id: never decoded from a frame, but a frame built in code may hold one.
    Heap(Box<[u8]>),
}

impl WorkerKey {
    pub(crate) fn new(id: &str) -> Self {
        let b = id.as_bytes();
        match u8::try_from(b.len()) {
            Ok(len) if b.len() <= INLINE => {
                let mut bytes = [0u8; INLINE];
                bytes[..b.len()].copy_from_slice(b);
                WorkerKey::Inline { len, bytes }
            }
            _ => WorkerKey::Heap(b.into()),
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            WorkerKey::Inline { len, bytes } => &bytes[..usize::from(*len)],
            WorkerKey::Heap(b) => b,
        }
    }

    /// The id (keys are only made from a `&str`, so this never falls back to "").
    pub(crate) fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

// `Hash`, `Eq` and `Borrow<[u8]>` agree: all three are the id's bytes, as a `[u8]`.
impl Borrow<[u8]> for WorkerKey {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl Hash for WorkerKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl PartialEq for WorkerKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for WorkerKey {}

impl std::fmt::Debug for WorkerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Ids of every length around the inline limit are found by their bytes, and only by
    /// theirs: a prefix, an extension or a one-byte change is another worker.
    #[test]
    fn keys_are_found_by_their_bytes_whatever_their_length() {
        let ids: Vec<String> = [1usize, 2, 18, 63, 64, 65, 200].iter().map(|n| "é".repeat(n / 2) + &"w".repeat(n % 2)).collect();
        let mut m: HashMap<WorkerKey, usize> = HashMap::new();
        for (i, id) in ids.iter().enumerate() {
            assert!(m.insert(WorkerKey::new(id), i).is_none());
            assert_eq!(WorkerKey::new(id).as_str(), id);
            assert_eq!(matches!(WorkerKey::new(id), WorkerKey::Inline { .. }), id.len() <= INLINE);
        }
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(m.get(id.as_bytes()), Some(&i), "{} bytes", id.len());
            let mut changed = id.clone().into_bytes();
            let last = changed.len() - 1;
            changed[last] ^= 1;
            assert_eq!(m.get(changed.as_slice()), None);
            assert_eq!(m.get(format!("{id}x").as_bytes()), None);
            assert_eq!(m.contains_key(&id.as_bytes()[..last]), ids.iter().any(|o| o.as_bytes() == &id.as_bytes()[..last]));
        }
        assert_eq!(m.len(), ids.len());
    }
}
