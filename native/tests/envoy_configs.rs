//! The configs `envoy/render.py --filter-build native` renders, checked by the stock Envoy binary
//! (`envoy --mode validate`) with this crate's `libgpuha_native.so`: Envoy loads the module, runs
//! its configuration hook (the filter's plugin configuration is parsed there) and resolves every
//! hook it requires. The drills run the same configs with traffic (`GPUHA_FILTER_BUILD=native`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

fn envoy() -> PathBuf {
    let out = Command::new("python3").arg(repo().join("deploy/find_envoy.py")).output().expect("python3 not runnable: set $ENVOY to the envoy binary");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr).trim());
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The directory of the `libgpuha_native.so` cargo built with this test: beside the test binary
/// (`deps/`) or in the profile directory above it.
fn module_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("test binary directory");
    let dirs = [Some(deps), deps.parent()];
    let found = dirs.into_iter().flatten().find(|d| d.join("libgpuha_native.so").exists());
    found.map(Path::to_path_buf).unwrap_or_else(|| panic!("no libgpuha_native.so beside {}", exe.display()))
}

fn render_and_check(args: &[&str], name: &str) -> (bool, String) {
    let out = std::env::temp_dir().join(format!("gpuha-native-{name}-{}.yaml", std::process::id()));
    let status = Command::new("python3").arg(repo().join("envoy/render.py")).args(args).args(["--filter-build", "native", "--out"]).arg(&out).status().expect("python3 not runnable");
    assert!(status.success(), "render.py {args:?} failed");
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(!text.contains("wasm.v3.Wasm"), "{name}: a Wasm filter is left:\n{text}");
    let v = Command::new(envoy()).args(["--mode", "validate", "-l", "info", "-c"]).arg(&out).env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", module_dir()).output().expect("envoy not runnable");
    let log = format!("{}{}", String::from_utf8_lossy(&v.stdout), String::from_utf8_lossy(&v.stderr));
    let _ = std::fs::remove_file(out);
    (v.status.success() && log.contains("OK"), log)
}

const ROUTER: &[&str] = &["pool-router", "--listen-port", "10000", "--admin-port", "9901", "--workers", "127.0.0.1:8001,127.0.0.1:8002", "--fleet", "127.0.0.1:8080"];

#[test]
fn pool_router_with_the_native_filter_validates() {
    let (ok, log) = render_and_check(ROUTER, "pool-router");
    assert!(ok, "envoy rejected the native pool router:\n{log}");
    // Built against this Envoy's ABI: its version string matched (a mismatch loads with a warning).
    assert!(log.contains("Dynamic module ABI version v0.2.0 matched"), "{log}");
}

#[test]
fn fallback_chain_and_failwhale_validate_with_the_native_filter() {
    let chain = [ROUTER, &["--spill", "b=10.0.2.1:10000", "--degraded", r#"{"name":"small","port":10101,"workers":["127.0.0.1:8101"],"model":"small","max_tokens":256}"#]].concat();
    let (ok, log) = render_and_check(&chain, "chain");
    assert!(ok, "envoy rejected the native fallback chain:\n{log}");
    let (ok, log) = render_and_check(&["failwhale", "--listen-port", "10001", "--admin-port", "9902"], "failwhale");
    assert!(ok, "envoy rejected the native fail-whale:\n{log}");
}

/// The module parses the plugin configuration when Envoy loads the config: a bad one is refused
/// there, naming the key, as the Wasm filter's `on_configure` refuses it.
#[test]
fn bad_plugin_config_is_refused_when_envoy_loads_it() {
    let args = [ROUTER, &["--picker-config", r#"{"bogus":1}"#]].concat();
    let (ok, log) = render_and_check(&args, "bad-picker");
    assert!(!ok, "{log}");
    assert!(log.contains("unknown field `bogus`"), "{log}");
}
