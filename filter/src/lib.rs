//! GPU HA Proxy-Wasm filter for stock Envoy. One module, three roles chosen by the plugin
//! configuration's `role` (see [`config`]):
//!
//! * `picker` ([`picker`], downstream `envoy.filters.http.wasm` in the listener's HCM): picks up
//!   to three workers per request from the fleet view ([`poll`] fetches it from dnsd, [`cache`]
//!   keeps it parsed per thread) and writes them to `x-gpuha-endpoints` for the `override_host`
//!   load balancer; answers with OpenAI-shaped errors where Envoy would send text/plain.
//! * `guard` ([`guard`], upstream HTTP filter on the worker cluster): the first-token guard, glue
//!   over `gpuha_liveness::attempt`.
//! * `failwhale` ([`failwhale`]): answers every request with an OpenAI-shaped 503.
//! * `tier` ([`adapter`], downstream filter on a degraded tier's or a provider's own listener):
//!   adapts each request to the tier (model, `max_tokens` cap, sampling), glue over
//!   `gpuha_liveness::tier`. The picker lists the fallback chain after its picks.
//!
//! This crate is glue: every decision lives in `gpuha-liveness` (`attempt`, `pick`, `breaker`,
//! `slots`, `openai_error`) and is tested there natively. Callbacks gather inputs, call the pure
//! code and apply its answer. Host errors are logged and the request goes on (fail open);
//! nothing here panics on the request path ([`host`]).
//!
//! Cross-thread state lives in Proxy-Wasm shared data, one store per `vm_id`, so the picker and
//! the guard must be configured with the same `vm_id`; the slots' byte layouts are
//! `gpuha_liveness::slots`, the breaker operations on them [`breakers`].

mod adapter;
mod body;
mod breakers;
mod cache;
pub mod config;
mod failwhale;
mod flights;
mod guard;
mod host;
mod picker;
mod poll;
mod root;
mod stats;

pub use poll::poll_path;

/// Request header read by the `override_host` load balancer.
pub const ENDPOINTS_HEADER: &str = "x-gpuha-endpoints";
/// Request header stock Envoy's router reads as the request's retry count (it takes precedence
/// over the route's `num_retries`).
pub const MAX_RETRIES_HEADER: &str = "x-envoy-max-retries";
/// The per-try budget of a request that does not stream ([`config::PickerConfig::non_stream_timeout_ms`]).
pub const PER_TRY_TIMEOUT_HEADER: &str = "x-envoy-upstream-rq-per-try-timeout-ms";
/// Request header telling the guard that this request carries a half-open probe.
pub const PROBE_HEADER: &str = "x-gpuha-probe";
/// The key of a request's shared-data slot (its noted failures): a random value the picker sets
/// on every request it holds, replacing any the client sent, and the guard reads. Not
/// `x-request-id`, which Envoy keeps as the client sent it (a request it counts as internal):
/// two requests with one id would share their notes, and one's failures be charged at the
/// other's success.
pub const REQUEST_KEY_HEADER: &str = "x-gpuha-request";
/// The attempts the picker's list allows a request (its retries and the first), set with the
/// list where the guard must know an attempt is the last itself (Envoy's Wasm host: see
/// `guard::answer_for_worker`). The router takes `x-envoy-max-retries` off the request before
/// the upstream filters see it.
pub const ATTEMPTS_HEADER: &str = "x-gpuha-attempts";
/// Envoy's number of the attempt (1 for the first), sent upstream where the virtual host sets
/// `include_request_attempt_count` (`envoy/pool-router.yaml`).
pub const ATTEMPT_COUNT_HEADER: &str = "x-envoy-attempt-count";
/// Response header marking what the guard did (`released`, `retried`, `failed`).
pub const GUARD_HEADER: &str = "x-gpuha-guard";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|id| -> Box<dyn proxy_wasm::traits::RootContext> { Box::new(root::Root::new(id)) });
}}
