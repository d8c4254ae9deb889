//! Shared-data glue for the picker's load and placement state (`gpuha_liveness::inflight`,
//! `gpuha_liveness::busylist`, `gpuha_liveness::affinity::Placement`): every Envoy thread of
//! this `vm_id` reads and writes the same slots, so a thread sees the requests the others have
//! in flight and where they put each key. A failed read is an empty slot; a failed write is
//! logged here and costs one count (never a wrong one below zero: see
//! `gpuha_liveness::inflight`).

use gpuha_liveness::affinity::{AffinityConfig, Placement};
use gpuha_liveness::busylist::{self, BusyLoad, Done, End, Read, SetResult, Store, Sweep};
use proxy_wasm::types::Status;

use crate::host;

/// The host's shared data as [`gpuha_liveness::busylist`] reads and writes it.
pub struct HostStore;

impl Store for HostStore {
    fn get(&mut self, key: &str) -> Read {
        host::shared_get(key)
    }

    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> SetResult {
        match proxy_wasm::hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => SetResult::Ok,
            Err(Status::CasMismatch) => SetResult::CasMismatch,
            Err(e) => {
                host::warn(&format!("gpuha: set_shared_data {key}: {e:?}"));
                SetResult::Failed
            }
        }
    }
}

/// The in-flight slots as one pick reads them (the busy list past the first few).
pub type SharedLoad = BusyLoad<HostStore>;

pub fn shared_load(now_ms: u64, max_age_ms: u64) -> SharedLoad {
    BusyLoad::new(HostStore, now_ms, max_age_ms)
}

/// A request to `addr` started now (after the pick that read `load`).
pub fn start(load: &SharedLoad, addr: &str) {
    report(addr, load.start(addr));
}

/// The request to `addr` that started at `started_ms` is done.
pub fn end(addr: &str, started_ms: u64, now_ms: u64, max_age_ms: u64) {
    let mut op = End::new(addr, started_ms, now_ms, max_age_ms);
    report(addr, busylist::run(&mut HostStore, |s| op.step(s)));
}

/// Drops the workers with nothing in flight from the busy list (one thread, once per poll).
pub fn sweep(now_ms: u64, max_age_ms: u64) {
    let mut op = Sweep::new(now_ms, max_age_ms, busylist::IDLE_KEPT);
    if busylist::run(&mut HostStore, |s| op.step(s)).is_none() {
        host::warn("gpuha: the busy list is not text: left for the next start to rewrite");
    }
}

fn report(addr: &str, done: Done) {
    if done != Done::Ok {
        host::warn(&format!("gpuha: in-flight count of {addr}: {done:?} (under contention)"));
    }
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
