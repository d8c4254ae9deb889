//! Shared-data glue for the picker's load and placement state (`gpuha_liveness::inflight`,
//! `gpuha_liveness::affinity::Placement`): every Envoy thread of this `vm_id` reads and writes
//! the same slots, so a thread sees the requests the others have in flight and where they put
//! each key. A failed read is an empty slot; a failed write is logged by `host::shared_update`
//! and costs one count (never a wrong one below zero: see `gpuha_liveness::inflight`).

use std::cell::RefCell;
use std::collections::HashMap;

use gpuha_liveness::affinity::{AffinityConfig, Placement};
use gpuha_liveness::inflight::Flights;
use gpuha_liveness::pick::LoadView;
use gpuha_liveness::slots::flight_key;

use crate::host;

/// The in-flight slots as one pick reads them: each worker's slot is read at most once, and
/// kept with its compare-and-swap token for [`SharedLoad::start`].
pub struct SharedLoad {
    now_ms: u64,
    max_age_ms: u64,
    read: RefCell<HashMap<String, (Flights, Option<u32>)>>,
}

impl SharedLoad {
    pub fn new(now_ms: u64, max_age_ms: u64) -> Self {
        SharedLoad { now_ms, max_age_ms, read: RefCell::default() }
    }
}

impl LoadView for SharedLoad {
    fn ours(&self, addr: &str, frame_local_ms: u64, frame_load: f64) -> f64 {
        let mut read = self.read.borrow_mut();
        let (f, _) = read.entry(addr.to_string()).or_insert_with(|| {
            let (bytes, cas) = host::shared_get(&flight_key(addr));
            (bytes.map(|b| Flights::decode(&b)).unwrap_or_default(), cas)
        });
        f.estimate(self.now_ms, self.max_age_ms, frame_local_ms, frame_load)
    }
}

impl SharedLoad {
    /// A request to `addr` started now: written over the slot this pick read when no other
    /// request changed it since (one host call), else read anew ([`start`]).
    pub fn start(&self, addr: &str) {
        if let Some((f, cas @ Some(_))) = self.read.borrow().get(addr) {
            let mut f = f.clone();
            f.start(self.now_ms, self.max_age_ms);
            if proxy_wasm::hostcalls::set_shared_data(&flight_key(addr), Some(&f.encode()), *cas).is_ok() {
                return;
            }
        }
        start(addr, self.now_ms, self.max_age_ms);
    }
}

/// A request to `addr` started now.
pub fn start(addr: &str, now_ms: u64, max_age_ms: u64) {
    host::shared_update(&flight_key(addr), |cur| {
        let mut f = Flights::decode(cur.unwrap_or_default());
        f.start(now_ms, max_age_ms);
        Some((f.encode(), ()))
    });
}

/// The request to `addr` that started at `started_ms` is done.
pub fn end(addr: &str, started_ms: u64, now_ms: u64, max_age_ms: u64) {
    host::shared_update(&flight_key(addr), |cur| {
        let mut f = Flights::decode(cur?);
        f.end(started_ms, now_ms, max_age_ms);
        Some((f.encode(), ()))
    });
}

/// The key's placement, if the table remembers one.
pub fn placement(key: u64, cfg: &AffinityConfig, now_ms: u64) -> Option<Placement> {
    let b = host::shared_get(&Placement::slot(key, cfg.placement_slots)).0?;
    Placement::decode(&b, key, now_ms, cfg.placement_ttl_ms)
}

/// Remembers that `key` went to `addr` (written only when new, moved or due for a refresh).
pub fn place(key: u64, addr: &str, cur: Option<Placement>, cfg: &AffinityConfig, now_ms: u64) {
    let addr_hash = gpuha_liveness::affinity::addr_hash(addr);
    if !Placement::needs_write(cur, addr_hash, now_ms, cfg.placement_ttl_ms) {
        return;
    }
    let p = Placement { key, addr_hash, at_ms: now_ms };
    // Last writer wins: two threads placing one key at once both chose by the same rule.
    if let Err(e) = proxy_wasm::hostcalls::set_shared_data(&Placement::slot(key, cfg.placement_slots), Some(&p.encode()), None) {
        host::debug(&format!("gpuha: placement not remembered: {e:?}"));
    }
}
