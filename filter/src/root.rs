//! The root context: parses the plugin configuration once, ticks the fleet poll (picker role),
//! and creates the HTTP context of the configured role.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use gpuha_liveness::pick::Rng;
use gpuha_liveness::slots::{poll_tick_ms, FLEET_VERSION_KEY};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel};

use crate::cache::Thread;
use crate::config::Config;
use crate::adapter::Adapter;
use crate::failwhale::Failwhale;
use crate::guard::{self, GuardCtx, Registry};
use crate::host;
use crate::picker::Picker;
use crate::poll::{self, InFlight};
use crate::stats::{Stats, TierStats};

pub struct Root {
    id: u32,
    /// The configuration, each role's part behind an `Rc` that its HTTP contexts share (not
    /// cloned per request).
    role: Option<Role>,
    stats: Stats,
    thread: Rc<RefCell<Thread>>,
    poll: Option<InFlight>,
    poll_path: String,
    /// The picker's tick runs fast until a fleet view is in (`slots::poll_tick_ms`).
    fast_ticks: bool,
    /// The guard's attempts on this thread (guard role).
    registry: Rc<RefCell<Registry>>,
    /// Per-tier counters: answers served (picker), attempts (guard).
    tier_stats: Rc<TierStats>,
}

impl Root {
    pub fn new(id: u32) -> Self {
        Root { id, role: None, stats: Stats::default(), thread: Rc::new(RefCell::new(Thread::new())), poll: None, poll_path: String::new(), fast_ticks: false, registry: Rc::default(), tier_stats: Rc::default() }
    }

    fn seed() -> u64 {
        // Distinct per thread and per start: std's hasher keys come from WASI random_get.
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(host::now_ms());
        h.finish()
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        let Some(f) = self.poll.filter(|f| f.token == token) else { return };
        self.poll = None;
        // A view published is decoded in this VM already: no second decode on its next request.
        poll::on_response(f, body_size, &self.stats);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size).ok().flatten().unwrap_or_default();
        let cfg = match Config::parse(&bytes) {
            Ok(c) => c,
            Err(e) => {
                host::log(LogLevel::Error, &format!("gpuha: bad plugin configuration: {e}"));
                return false;
            }
        };
        self.stats = Stats::define();
        let names = |c: &gpuha_liveness::tier::Chain| std::iter::once(c.own.clone()).chain(c.tiers.iter().map(|t| t.name.clone())).collect::<Vec<_>>();
        self.tier_stats = Rc::new(match &cfg {
            Config::Picker(p) => TierStats::define(names(&p.tiers).iter().map(String::as_str), "served"),
            // A tier's own guard (no chain) counts nothing: the main guard counted the attempt.
            Config::Guard(g) if !g.tiers.tiers.is_empty() => TierStats::define(names(&g.tiers).iter().map(String::as_str), "attempts"),
            _ => TierStats::default(),
        });
        self.thread.borrow_mut().rng = Rng::new(Self::seed() ^ u64::from(self.id));
        if let Config::Picker(p) = &cfg {
            self.poll_path = poll::poll_path(p);
            // A root configured before any thread has a view ticks fast until one is in.
            let has_view = host::shared_get(FLEET_VERSION_KEY).0.is_some();
            self.fast_ticks = !has_view;
            let tick = Duration::from_millis(poll_tick_ms(p.poll_interval_ms, has_view));
            if let Err(e) = hostcalls::set_tick_period(tick) {
                host::log(LogLevel::Error, &format!("gpuha: set_tick_period: {e:?}"));
                return false;
            }
        }
        if let Config::Guard(g) = &cfg {
            if g.rescue {
                if let Err(e) = hostcalls::set_tick_period(Duration::from_millis(g.rescue_tick_ms)) {
                    host::log(LogLevel::Error, &format!("gpuha: set_tick_period: {e:?}"));
                    return false;
                }
            }
        }
        self.role = Some(match cfg {
            Config::Picker(p) => Role::Picker(Rc::new(p)),
            Config::Guard(g) => Role::Guard(Rc::new(g)),
            Config::Failwhale(f) => Role::Failwhale(Rc::new(f)),
            Config::Tier(t) => Role::Tier(Rc::new(t)),
        });
        true
    }

    fn on_tick(&mut self) {
        let Some(role) = self.role.clone() else { return };
        match role {
            Role::Picker(p) => {
                let mut in_flight = self.poll;
                let polled = poll::maybe_start(&p, &self.poll_path, &mut in_flight, &self.stats, |headers, timeout| self.dispatch_http_call(&p.fleet_cluster, headers, None, vec![], timeout));
                self.poll = in_flight;
                if polled {
                    // The thread that polls also sweeps the busy list: once per poll interval.
                    crate::flights::sweep(host::now_ms(), p.pick.in_flight_max_age_ms);
                }
                if self.fast_ticks && host::shared_get(FLEET_VERSION_KEY).0.is_some() {
                    self.fast_ticks = false;
                    if let Err(e) = hostcalls::set_tick_period(Duration::from_millis(poll_tick_ms(p.poll_interval_ms, true))) {
                        host::log(LogLevel::Error, &format!("gpuha: set_tick_period: {e:?}"));
                    }
                }
            }
            Role::Guard(g) => {
                // Nothing held or streaming on this thread: not even the version slot is read.
                if self.registry.borrow().is_empty() {
                    return;
                }
                let Some((_, vouched, view)) = self.thread.borrow_mut().fleet() else { return };
                guard::rescue_tick(&self.registry, &view, vouched, &g, &self.stats);
            }
            Role::Failwhale(_) | Role::Tier(_) => {}
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let stats = self.stats;
        Some(match &self.role {
            Some(Role::Picker(p)) => Box::new(Picker::new(p.clone(), stats, self.thread.clone(), self.tier_stats.clone())),
            Some(Role::Guard(g)) => Box::new(GuardCtx::new(context_id, self.registry.clone(), g.clone(), stats, self.tier_stats.clone())),
            Some(Role::Failwhale(f)) => Box::new(Failwhale::new(f.clone(), stats)),
            Some(Role::Tier(t)) => Box::new(Adapter::new(t.clone(), stats)),
            None => Box::new(PassThrough),
        })
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// [`Config`] with each role's part behind an `Rc` (what an HTTP context holds).
#[derive(Clone)]
enum Role {
    Picker(Rc<crate::config::PickerConfig>),
    Guard(Rc<crate::config::GuardConfig>),
    Failwhale(Rc<crate::config::FailwhaleConfig>),
    Tier(Rc<crate::config::TierConfig>),
}

/// A context for an unconfigured plugin: lets everything through.
struct PassThrough;
impl Context for PassThrough {}
impl HttpContext for PassThrough {}
