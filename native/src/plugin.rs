//! One filter configuration as the module holds it: the plugin configuration bytes the filter's
//! root contexts read, its counters, its HTTP calls, and its ticks.
//!
//! Ticks: a Proxy-Wasm root context asks for a tick period; Envoy's Wasm host ticks every
//! thread's root. Here a ticker thread commits to Envoy schedulers instead, where the role
//! needs it:
//! - the picker polls the fleet view: its main-thread root ticks (the configuration's
//!   scheduler runs on the main thread, where the configuration's HTTP calls go out). Every
//!   thread reads the view it publishes in shared data, as with Wasm, where one thread polls
//!   per interval too (`gpuha-filter`'s `poll`);
//! - the guard's rescue tick acts on the attempts its thread holds: each worker thread's root
//!   ticks through the scheduler of one live filter of the thread (its tick seat, see
//!   [`crate::contexts`]); a thread with no live filter holds no attempt and needs no tick.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};
use std::thread::ThreadId;
use std::time::Duration;

use gpuha_filter::config::Config;

use crate::dm::{ConfigHandle, ConfigScheduler, Level, Scheduler};
use crate::shared::Store;

/// Proxy-Wasm shared data: the process's one store.
pub static SHARED: LazyLock<Store> = LazyLock::new(Store::default);

/// The event a tick commits.
pub const TICK: u64 = 1;

/// The configurations Envoy holds, by serial, and a count of those it destroyed: a thread whose
/// last look is older deletes its root contexts of the destroyed ones (as Envoy's Wasm host
/// deletes a removed plugin's root context in every VM).
static LIVE: LazyLock<Mutex<std::collections::HashSet<u64>>> = LazyLock::new(Mutex::default);
static DESTROYED: AtomicU64 = AtomicU64::new(0);

/// Envoy holds the configuration `serial` now.
pub fn hold(serial: u64) {
    lock(&LIVE).insert(serial);
}

/// Envoy destroyed the configuration `serial`.
pub fn release(serial: u64) {
    lock(&LIVE).remove(&serial);
    DESTROYED.fetch_add(1, Ordering::Release);
}

/// How many configurations Envoy destroyed so far (one atomic read).
pub fn destroyed() -> u64 {
    DESTROYED.load(Ordering::Acquire)
}

/// Whether Envoy still holds the configuration `serial`.
pub fn is_live(serial: u64) -> bool {
    lock(&LIVE).contains(&serial)
}

static SERIAL: AtomicU64 = AtomicU64::new(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where a configuration's root contexts tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ticks {
    None,
    MainThread,
    WorkerThreads,
}

/// An HTTP call's answer, handed to the root context that made it.
pub struct Callout {
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub body: Vec<u8>,
}

pub struct Plugin {
    /// Distinct per configuration for the process's life (a thread's roots are keyed by it).
    pub serial: u64,
    pub configuration: Vec<u8>,
    pub envoy: ConfigHandle,
    pub ticks: Ticks,
    /// The guard: an upstream filter (on a cluster).
    pub upstream: bool,
    /// Counters by name; a Proxy-Wasm metric id is an index here.
    counters: Mutex<Vec<(String, Option<usize>)>>,
    /// Set while Envoy creates the configuration: counters can be defined only then.
    defining: AtomicBool,
    tick_ms: AtomicU32,
    ticker_started: AtomicBool,
    main_scheduler: Mutex<Option<ConfigScheduler>>,
    /// Each worker thread's tick seat.
    seats: Mutex<HashMap<ThreadId, Scheduler>>,
    /// HTTP calls in flight.
    callouts: Callouts,
    /// The main thread's root context.
    pub main_root: AtomicU32,
    stopped: AtomicBool,
}

/// The token of a new HTTP call, unique in the process. The SDK keeps one table of calls in
/// flight per thread for every configuration, and panics (Envoy aborts) on a token it holds
/// already; a configuration's calls must not start over from 1: a second picker configuration
/// polls on the same main thread, and a configuration destroyed with a poll in flight leaves
/// that poll's token in the table for good (Envoy cancels the call and never answers it). Never
/// 0; a repeat takes 2³² calls.
fn next_token() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    loop {
        let t = NEXT.fetch_add(1, Ordering::Relaxed);
        if t != 0 {
            return t;
        }
    }
}

/// A configuration's HTTP calls in flight: Envoy's callout id → the token the SDK was given.
#[derive(Default)]
struct Callouts(Mutex<HashMap<u64, u32>>);

impl Callouts {
    /// Notes Envoy's call `id` under a new token ([`next_token`]).
    fn start(&self, id: u64) -> u32 {
        let token = next_token();
        lock(&self.0).insert(id, token);
        token
    }

    fn done(&self, id: u64) -> Option<u32> {
        lock(&self.0).remove(&id)
    }
}

impl Plugin {
    /// A configuration from Envoy's `filter_config` bytes: the filter's JSON, checked here so
    /// that Envoy refuses a bad one when it loads the config (as the Wasm root's `on_configure`).
    pub fn new(envoy: ConfigHandle, configuration: &[u8]) -> Result<Plugin, String> {
        let cfg = Config::parse(configuration)?;
        let ticks = match &cfg {
            Config::Picker(_) => Ticks::MainThread,
            Config::Guard(g) if g.rescue => Ticks::WorkerThreads,
            _ => Ticks::None,
        };
        let upstream = matches!(cfg, Config::Guard(_));
        Ok(Plugin {
            serial: SERIAL.fetch_add(1, Ordering::Relaxed),
            configuration: configuration.to_vec(),
            envoy,
            ticks,
            upstream,
            counters: Mutex::new(Vec::new()),
            defining: AtomicBool::new(true),
            tick_ms: AtomicU32::new(0),
            ticker_started: AtomicBool::new(false),
            main_scheduler: Mutex::new(None),
            seats: Mutex::new(HashMap::new()),
            callouts: Callouts::default(),
            main_root: AtomicU32::new(0),
            stopped: AtomicBool::new(false),
        })
    }

    /// Envoy has the configuration: no more counters can be defined.
    pub fn defined(&self) {
        self.defining.store(false, Ordering::Relaxed);
    }

    /// The metric id of counter `name`, defined in Envoy on first sight while that is allowed.
    pub fn counter(&self, name: &str) -> Option<u32> {
        let mut cs = lock(&self.counters);
        if let Some(i) = cs.iter().position(|(n, _)| n == name) {
            return u32::try_from(i).ok();
        }
        if !self.defining.load(Ordering::Relaxed) {
            crate::dm::log(Level::Warn, format!("gpuha native: counter {name} defined after the configuration was loaded: not counted").as_bytes());
        }
        let id = if self.defining.load(Ordering::Relaxed) { self.envoy.define_counter(name) } else { None };
        cs.push((name.to_owned(), id));
        u32::try_from(cs.len() - 1).ok()
    }

    /// Adds `n` to a counter; `false` when the id names none.
    pub fn increment(&self, metric: u32, n: u64) -> bool {
        let id = lock(&self.counters).get(metric as usize).and_then(|(_, id)| *id);
        id.is_some_and(|id| self.envoy.increment_counter(id, n))
    }

    /// A root context asked for ticks every `period_ms`.
    pub fn set_tick(self: &Arc<Self>, period_ms: u32) {
        if period_ms == 0 || self.ticks == Ticks::None {
            return;
        }
        self.tick_ms.store(period_ms, Ordering::Relaxed);
        if self.ticks == Ticks::MainThread && lock(&self.main_scheduler).is_none() {
            // Root contexts configure on the main thread first (in config_new).
            *lock(&self.main_scheduler) = self.envoy.scheduler();
        }
        if !self.ticker_started.swap(true, Ordering::Relaxed) {
            let me = Arc::downgrade(self);
            let spawned = std::thread::Builder::new().name("gpuha-ticker".into()).spawn(move || ticker(me));
            if let Err(e) = spawned {
                crate::dm::log(Level::Error, format!("gpuha native: no ticker thread: {e}").as_bytes());
            }
        }
    }

    /// A worker thread's tick seat moves to `sched` (`None`: the thread has no live filter).
    pub fn seat(&self, thread: ThreadId, sched: Option<Scheduler>) {
        let mut seats = lock(&self.seats);
        // The old scheduler is deleted under the lock, so the ticker never commits to it.
        match sched {
            Some(s) => seats.insert(thread, s),
            None => seats.remove(&thread),
        };
    }

    /// Starts an HTTP call (main thread); the token the SDK matches the answer with.
    pub fn callout(&self, cluster: &str, headers: &[(&[u8], &[u8])], body: &[u8], timeout_ms: u32) -> Option<u32> {
        let id = self.envoy.callout(cluster, headers, body, timeout_ms)?;
        Some(self.callouts.start(id))
    }

    /// The token of a finished call.
    pub fn callout_done(&self, id: u64) -> Option<u32> {
        self.callouts.done(id)
    }

    /// Envoy destroyed the configuration: the ticker stops.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        lock(&self.seats).clear();
        lock(&self.main_scheduler).take();
    }

    fn tick_once(&self) {
        match self.ticks {
            Ticks::MainThread => {
                if let Some(s) = lock(&self.main_scheduler).as_ref() {
                    s.commit(TICK);
                }
            }
            Ticks::WorkerThreads => {
                for s in lock(&self.seats).values() {
                    s.commit(TICK);
                }
            }
            Ticks::None => {}
        }
    }
}

/// The ticker thread: commits a tick every period until the configuration is gone. (A timer,
/// not a wait for readiness.)
fn ticker(plugin: Weak<Plugin>) {
    loop {
        let period = match plugin.upgrade() {
            Some(p) if !p.stopped.load(Ordering::Relaxed) => {
                p.tick_once();
                p.tick_ms.load(Ordering::Relaxed).max(1)
            }
            _ => return,
        };
        std::thread::sleep(Duration::from_millis(u64::from(period)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_configurations_never_hand_the_sdk_the_same_token() {
        // Two pickers poll on the main thread (two listeners, or a reload): the SDK's one table
        // of calls in flight would panic on a token given twice. Envoy numbers each
        // configuration's calls on its own: the same ids come back from both.
        let (a, b) = (Callouts::default(), Callouts::default());
        let mut seen = std::collections::HashSet::new();
        for id in 1..=100u64 {
            for c in [&a, &b] {
                let token = c.start(id);
                assert_ne!(token, 0);
                assert!(seen.insert(token), "token {token} given twice");
            }
        }
        let (t, u) = (a.done(7), b.done(7));
        assert!(t.is_some() && u.is_some() && t != u);
        assert_eq!(a.done(7), None);
    }
}
