//! The config parsers: dnsd's TOML (with its DNS zones compiled) and the filter's plugin JSON.
//! The first input byte picks which; never a panic, and a config that validates compiles.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    if which & 1 == 0 {
        let Ok(text) = std::str::from_utf8(rest) else { return };
        if let Ok(c) = gpuha_dnsd::Config::from_toml(text, Path::new("fuzz.toml")) {
            if let Some(dns) = &c.dns {
                gpuha_dnsd::dns::Zones::compile(dns).expect("a validated [dns] section compiles");
            }
        }
    } else if let Ok(c) = gpuha_filter::config::Config::parse(rest) {
        let _ = c.validate();
    }
});
