//! Per-thread (per-VM) caches. The decoded fleet view is kept once per Wasm VM (one VM per
//! Envoy thread, shared by the picker's and the guard's root contexts when their `vm_config`
//! is the same) until another thread publishes new content; a root context's ranking and
//! random source are its own. `Rc`/`RefCell` are enough.
//!
//! What threads share is the view in binary ([`gpuha_liveness::fleetwire`]): a new content
//! whose identity section (workers, addresses, pools, models) is the one this VM decoded last
//! only replaces the numbers of the view it holds, with no allocation per worker.

use std::cell::RefCell;
use std::rc::Rc;

use gpuha_liveness::fleetwire;
use gpuha_liveness::pick::{Ranked, Rng};
use gpuha_liveness::slots::{decode_fleet, decode_version, FLEET_KEY, FLEET_VERSION_KEY};
use gpuha_liveness::FleetView;

use crate::host;

/// The view this VM decoded last.
struct Decoded {
    /// Its content version (the local time the poller fetched it).
    version: u64,
    /// The identity section of the binary body it was decoded from; empty when from JSON.
    identity: Vec<u8>,
    view: Rc<FleetView>,
}

thread_local! {
    static VIEW: RefCell<Option<Decoded>> = const { RefCell::new(None) };
}

fn cached(version: u64) -> Option<Rc<FleetView>> {
    VIEW.with_borrow(|d| d.as_ref().filter(|d| d.version == version).map(|d| d.view.clone()))
}

/// Takes `body` (binary, or JSON from something that is not dnsd) as this VM's view of content
/// `version`: the numbers replaced in place when the identity is the one held, else decoded in
/// full. On an error the held view stays as it was.
pub fn accept(version: u64, body: &[u8]) -> Result<Rc<FleetView>, String> {
    if !fleetwire::is_binary(body) {
        let view = Rc::new(FleetView::from_json(body).map_err(|e| e.to_string())?);
        VIEW.set(Some(Decoded { version, identity: Vec::new(), view: view.clone() }));
        return Ok(view);
    }
    let identity = fleetwire::identity(body).map_err(|e| e.to_string())?;
    VIEW.with_borrow_mut(|held| {
        if let Some(d) = held.as_mut().filter(|d| !d.identity.is_empty() && d.identity == identity) {
            // Nobody else holds it between two callbacks: no copy.
            fleetwire::update(Rc::make_mut(&mut d.view), body).map_err(|e| e.to_string())?;
            d.version = version;
            return Ok(d.view.clone());
        }
        let view = Rc::new(fleetwire::decode(body).map_err(|e| e.to_string())?);
        *held = Some(Decoded { version, identity: identity.to_vec(), view: view.clone() });
        Ok(view)
    })
}

pub struct Thread {
    /// The view's workers ranked for picking, built on the first pick after a new view.
    pub ranked: Option<(u64, Rc<Ranked>)>,
    pub rng: Rng,
}

impl Thread {
    pub fn new() -> Self {
        Thread { ranked: None, rng: Rng::new(0) }
    }

    /// The current fleet view: (content version, local time its ages count from, view).
    /// Every request calls this, so it reads only the 16-byte version slot; the view itself
    /// (a megabyte for a large fleet) is copied and decoded only when another thread published
    /// new content.
    pub fn fleet(&mut self) -> Option<(u64, u64, Rc<FleetView>)> {
        let (version, vouched) = decode_version(host::shared_get(FLEET_VERSION_KEY).0.as_deref());
        if let Some(view) = cached(version) {
            return Some((version, vouched, view));
        }
        let bytes = host::shared_get(FLEET_KEY).0?;
        let (fetched, body) = decode_fleet(&bytes);
        // The version slot is written just after the view: until then, the view's fetch time.
        let vouched = if fetched == version { vouched } else { fetched };
        if let Some(view) = cached(fetched) {
            return Some((fetched, vouched, view));
        }
        match accept(fetched, body) {
            Ok(v) => Some((fetched, vouched, v)),
            Err(e) => {
                host::warn(&format!("gpuha: shared fleet view unreadable: {e}"));
                None
            }
        }
    }

    /// The ranking of `view` (content `version`), built once per content per thread.
    pub fn ranked(&mut self, version: u64, view: &FleetView, cfg: &gpuha_liveness::pick::PickConfig) -> Rc<Ranked> {
        match &self.ranked {
            Some((v, r)) if *v == version => r.clone(),
            _ => {
                let r = Rc::new(Ranked::build(view, cfg));
                self.ranked = Some((version, r.clone()));
                r
            }
        }
    }
}
