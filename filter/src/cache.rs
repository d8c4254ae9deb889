//! Per-thread (per-VM) cache shared by a root context and its HTTP contexts: the parsed fleet
//! view and its ranking, kept until another thread publishes new content. One Wasm VM per
//! Envoy thread, so `Rc`/`RefCell` are enough.

use std::rc::Rc;

use gpuha_liveness::pick::{Ranked, Rng};
use gpuha_liveness::slots::{decode_fleet, decode_version, FLEET_KEY, FLEET_VERSION_KEY};
use gpuha_liveness::FleetView;

use crate::host;

pub struct Thread {
    /// Parsed fleet view and its content version.
    pub fleet: Option<(u64, Rc<FleetView>)>,
    /// The view's workers ranked for picking, built on the first pick after a new view.
    pub ranked: Option<(u64, Rc<Ranked>)>,
    pub rng: Rng,
}

impl Thread {
    pub fn new() -> Self {
        Thread { fleet: None, ranked: None, rng: Rng::new(0) }
    }

    /// The current fleet view: (content version, local time its ages count from, view).
    /// Every request calls this, so it reads only the 16-byte version slot; the view itself
    /// (megabytes for a large fleet) is copied and parsed only when another thread published
    /// new content.
    pub fn fleet(&mut self) -> Option<(u64, u64, Rc<FleetView>)> {
        let (version, vouched) = decode_version(host::shared_get(FLEET_VERSION_KEY).0.as_deref());
        if let Some((v, view)) = &self.fleet {
            if *v == version {
                return Some((version, vouched, view.clone()));
            }
        }
        let bytes = host::shared_get(FLEET_KEY).0?;
        let (fetched, json) = decode_fleet(&bytes);
        // The version slot is written just after the view: until then, the view's fetch time.
        let vouched = if fetched == version { vouched } else { fetched };
        match FleetView::from_json(json) {
            Ok(v) => {
                let v = Rc::new(v);
                self.fleet = Some((fetched, v.clone()));
                Some((fetched, vouched, v))
            }
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
