//! Proxy-Wasm shared data in process memory: one key-value store for every thread, with the
//! compare-and-swap tokens the filter's read-modify-write loops rely on.
//!
//! Envoy's Wasm host keeps one store per `vm_id`; here the store is the process's, so one Envoy
//! runs one GPU HA deployment (the picker and the guard share it as they share a `vm_id`). Keys
//! are the bytes the SDK passes (its `&str`), taken as they are.

use foldhash::HashMap;
use std::sync::Mutex;

/// What a write answered (the Proxy-Wasm statuses the SDK maps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetResult {
    Ok,
    CasMismatch,
}

/// A key's value and its compare-and-swap token.
type Entry = (Vec<u8>, u32);

#[derive(Default)]
pub struct Store {
    map: Mutex<HashMap<Vec<u8>, Entry>>,
}

impl Store {
    /// The value of `key` and its token, copied out (`None`: never written).
    #[cfg(test)]
    pub fn get(&self, key: &[u8]) -> Option<(Vec<u8>, u32)> {
        self.read(key, |v, cas| (v.to_vec(), cas))
    }

    /// `f` of the value of `key` and its token, under the store's lock (one copy out, made by `f`).
    pub fn read<T>(&self, key: &[u8], f: impl FnOnce(&[u8], u32) -> T) -> Option<T> {
        let map = self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(key).map(|(v, cas)| f(v, *cas))
    }

    /// Writes `key`. `cas` 0 writes unconditionally; any other token must be the key's current
    /// one (a key never written has none, so only 0 writes it), as in Envoy's Wasm host.
    pub fn set(&self, key: &[u8], value: &[u8], cas: u32) -> SetResult {
        let mut map = self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match map.get_mut(key) {
            Some((v, cur)) => {
                if cas != 0 && cas != *cur {
                    return SetResult::CasMismatch;
                }
                v.clear();
                v.extend_from_slice(value);
                // Tokens are never 0: 0 means "no token".
                *cur = cur.wrapping_add(1).max(1);
                SetResult::Ok
            }
            None if cas != 0 => SetResult::CasMismatch,
            None => {
                map.insert(key.to_owned(), (value.to_vec(), 1));
                SetResult::Ok
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_with_a_stale_token_is_refused_and_changes_nothing() {
        let s = Store::default();
        assert_eq!(s.get(b"k"), None);
        assert_eq!(s.set(b"k", b"a", 0), SetResult::Ok);
        let (v, t1) = s.get(b"k").unwrap();
        assert_eq!(v, b"a");
        assert_eq!(s.set(b"k", b"b", t1), SetResult::Ok);
        let (_, t2) = s.get(b"k").unwrap();
        assert_ne!(t1, t2);
        assert_eq!(s.set(b"k", b"c", t1), SetResult::CasMismatch);
        assert_eq!(s.get(b"k").unwrap().0, b"b");
        assert_eq!(s.set(b"k", b"d", 0), SetResult::Ok);
        assert_eq!(s.get(b"k").unwrap().0, b"d");
    }

    #[test]
    fn a_key_never_written_only_takes_an_unconditional_write() {
        let s = Store::default();
        assert_eq!(s.set(b"k", b"a", 7), SetResult::CasMismatch);
        assert_eq!(s.get(b"k"), None);
    }

    #[test]
    fn racing_read_modify_writes_lose_no_update() {
        let s = std::sync::Arc::new(Store::default());
        // Seeded: a first write carries no token (unconditional), as in Envoy.
        s.set(b"n", &0u64.to_le_bytes(), 0);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        loop {
                            let (cur, cas) = s.get(b"n").map_or((0u64, 0), |(v, c)| (u64::from_le_bytes(v.try_into().unwrap()), c));
                            if s.set(b"n", &(cur + 1).to_le_bytes(), cas) == SetResult::Ok {
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(u64::from_le_bytes(s.get(b"n").unwrap().0.try_into().unwrap()), 2000);
    }
}
