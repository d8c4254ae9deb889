//! The `[dns]` config: every shipped sample loads, and bad configs fail naming the key.

use std::path::{Path, PathBuf};

use gpuha_dnsd::dns::Zones;
use gpuha_dnsd::{Config, ConfigError};

fn samples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/dnsd");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/dnsd exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    v
}

#[test]
fn every_sample_config_loads() {
    let all = samples();
    assert!(all.len() >= 2, "{all:?}");
    for p in all {
        let c = Config::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let dns = c.dns.as_ref().unwrap_or_else(|| panic!("{}: no [dns]", p.display()));
        let z = Zones::compile(dns).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(!z.services.is_empty(), "{}", p.display());
    }
}

const BASE: &str = r#"
[ingest]
keys = [{ id = 1, file = "/nonexistent" }]
[dns]
listen = "127.0.0.1:0"
[[dns.zones]]
origin = "z.test."
ns = ["ns1.z.test."]
soa = { rname = "h.z.test." }
records = [{ name = "www", type = "A", value = "192.0.2.1" }]
[[dns.pools]]
id = "p"
routers = ["192.0.2.10"]
[[dns.services]]
name = "api.z.test."
pools = ["p"]
fail_whale = ["192.0.2.99"]
"#;

fn err(text: &str) -> (String, String) {
    match Config::from_toml(text, Path::new("t.toml")) {
        Err(ConfigError::Invalid { key, reason }) => (key, reason),
        Err(e) => (String::from("<parse>"), e.to_string()),
        Ok(_) => panic!("accepted:\n{text}"),
    }
}

#[test]
fn base_is_valid() {
    let c = Config::from_toml(BASE, Path::new("t.toml")).expect("valid");
    let s = &Zones::compile(c.dns.as_ref().expect("dns")).expect("zones").services[0];
    assert_eq!(s.ttl, 5, "default TTL is 5 s");
}

#[test]
fn errors_name_the_key() {
    let cases: Vec<(String, &str)> = vec![
        (BASE.replace("fail_whale = [\"192.0.2.99\"]", "fail_whale = [\"192.0.2.99\"]\nttl = 6"), "dns.services[0].ttl"),
        (BASE.replace("pools = [\"p\"]", "pools = [\"nope\"]"), "dns.services[0].pools"),
        (BASE.replace("pools = [\"p\"]", "pools = []"), "dns.services[0].pools"),
        (BASE.replace("fail_whale = [\"192.0.2.99\"]", "fail_whale = []"), "dns.services[0].fail_whale"),
        (BASE.replace("name = \"api.z.test.\"", "name = \"api.other.test.\""), "dns.services[0].name"),
        (BASE.replace("name = \"api.z.test.\"", "name = \"www.z.test.\""), "dns.services[0].name"),
        (BASE.replace("name = \"api.z.test.\"", "name = \"api.z.test\""), "dns.services[0].name"),
        (BASE.replace("routers = [\"192.0.2.10\"]", "routers = []"), "dns.pools[0].routers"),
        (BASE.replace("routers = [\"192.0.2.10\"]", "routers = [\"192.0.2.10\"]\nmin_workers = 0"), "dns.pools[0].min_workers"),
        (BASE.replace("value = \"192.0.2.1\"", "value = \"not-an-ip\""), "dns.zones[0].records[0].value"),
        (BASE.replace("type = \"A\"", "type = \"LOC\""), "dns.zones[0].records[0].type"),
        (BASE.replace("name = \"www\"", "name = \"www.elsewhere.\""), "dns.zones[0].records[0].name"),
        (BASE.replace("ns = [\"ns1.z.test.\"]", "ns = []"), "dns.zones[0].ns"),
        (BASE.replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:0\"\nmax_udp_payload = 100"), "dns.max_udp_payload"),
        (BASE.replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:0\"\nallow_axfr = [\"10.0.0.0/40\"]"), "dns.allow_axfr"),
        (
            BASE.replace("records = [{ name = \"www\", type = \"A\", value = \"192.0.2.1\" }]", "records = [{ name = \"www\", type = \"A\", value = \"192.0.2.1\" }, { name = \"www\", type = \"CNAME\", value = \"x.test.\" }]"),
            "dns.zones[0].records",
        ),
    ];
    for (text, key) in cases {
        let (k, reason) = err(&text);
        assert_eq!(k, key, "reason: {reason}");
        assert!(!reason.is_empty());
    }
    // Unknown keys are parse errors that name the key.
    let (k, reason) = err(&BASE.replace("[[dns.pools]]\nid = \"p\"", "[[dns.pools]]\nid = \"p\"\nweight = 3"));
    assert_eq!(k, "<parse>");
    assert!(reason.contains("weight"), "{reason}");
}
