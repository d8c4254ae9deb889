//! Every shipped sidecar config loads and validates.

use gpuha_sidecar::Config;

#[test]
fn shipped_configs_load() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/sidecar");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).expect("deploy/sidecar") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let c = Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            c.validate().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 1, "no sample config found in {dir}");
}

#[test]
fn bad_configs_name_the_key() {
    let base = "worker_id = \"w\"\npool = \"p\"\nserve_addr = \"127.0.0.1:8000\"\nkey_file = \"/k\"\ningest = [\"127.0.0.1:9400\"]\n";
    let p = std::path::Path::new("inline.toml");
    assert!(Config::from_toml(base, p).expect("base").validate().is_ok());
    let cases = [
        ("interval_ms = 5\n", "interval_ms"),
        ("scrape_timeout_ms = 10000\n", "scrape_timeout_ms"),
        ("max_scrapes_in_flight = 0\n", "max_scrapes_in_flight"),
        ("metrics_url = \"https://x/metrics\"\n", "metrics_url"),
        ("models = [\"\"]\n", "models"),
    ];
    for (extra, key) in cases {
        let err = Config::from_toml(&format!("{base}{extra}"), p).expect("parses").validate().expect_err(extra);
        assert!(err.to_string().contains(key), "{err} should name {key}");
    }
    let err = Config::from_toml(&format!("{base}bogus = 1\n"), p).expect_err("unknown key");
    assert!(err.to_string().contains("bogus"), "{err}");
    let err = Config::from_toml("worker_id = \"w\"\n", p).expect_err("missing keys");
    assert!(err.to_string().contains("pool"), "{err}");
}
