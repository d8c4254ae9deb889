//! The one crate both tiers run: the telemetry frame codec, its authenticated ingest
//! (replay and clock checks), and the fleet state that answers "is this worker fresh?" and
//! "is this pool alive?".
//!
//! Everything here is pure: no clocks, no sockets, no threads. Time is passed in as
//! milliseconds since the Unix epoch (`now_ms`), so the same code runs natively inside `dnsd`
//! and compiled to `wasm32-wasip1` inside Envoy, and tests drive time by hand.

pub mod attempt;
pub mod blame;
pub mod breaker;
pub mod fleet;
pub mod frame;
pub mod guard;
pub mod ingest;
pub mod openai_error;
pub mod output;
pub mod pick;
pub mod request;
pub mod slots;
pub mod sse;

pub use fleet::{bounded_age_ms, Ages, Condition, FAILBACK_HOLD_DOWN_MS, FleetState, FleetView, Liveness, PoolOutlook, PoolView, WorkerView, VIEW_AGE_FLOOR_MS, VIEW_AGE_STALE_MS};
pub use frame::{Frame, FrameError, KeyRing, Metrics, MAX_FRAME_LEN};
pub use ingest::{DropReason, Ingest, IngestCounters};

/// A worker whose last valid frame is older than this gets no new requests.
pub const FRESHNESS_GATE_MS: u64 = 3_000;
/// A pool with fewer than `min_workers` workers heard from within this window is evicted.
pub const EVICTION_WINDOW_MS: u64 = 10_000;
