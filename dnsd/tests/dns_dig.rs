//! The real binary against real clients: `dig` (dnsutils) and `kdig` (knot-dnsutils). Skipped,
//! with a note, where the tools are not installed.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("-v").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool).args(args).output().expect("run tool");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn dig_and_kdig_against_the_binary() {
    if !have("dig") || !have("kdig") {
        eprintln!("SKIP: dig/kdig not installed (apt-get install dnsutils knot-dnsutils)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("dnsd.toml");
    std::fs::write(&cfg, common::config_text(dir.path(), &common::dns_section(""))).expect("write");
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpuha-dnsd"))
        .arg("--config")
        .arg(&cfg)
        .env("GPUHA_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn dnsd");
    let stdout = child.stdout.take().expect("stdout");
    let _guard = Proc(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("READY line");
    let dns = line.split_whitespace().find_map(|w| w.strip_prefix("dns=")).expect("dns= in READY line").to_string();
    let (host, port) = dns.rsplit_once(':').expect("addr");
    let at = format!("@{host}");
    let p = ["-p", port];

    let o = run("dig", &[&at, p[0], p[1], "+norec", "api.gpuha.test", "A"]);
    assert!(o.contains("status: NOERROR") && o.contains("flags: qr aa;"), "{o}");
    assert!(o.contains("ANSWER: 3,"), "{o}");
    let o = run("dig", &[&at, p[0], p[1], "+norec", "nope.gpuha.test", "A"]);
    assert!(o.contains("status: NXDOMAIN") && o.contains("AUTHORITY: 1,"), "{o}");
    let o = run("dig", &[&at, p[0], p[1], "+norec", "api.gpuha.test", "TXT"]);
    assert!(o.contains("status: NOERROR") && o.contains("ANSWER: 0,") && o.contains("AUTHORITY: 1,"), "{o}");
    let o = run("dig", &[&at, p[0], p[1], "www.example.com", "A"]);
    assert!(o.contains("status: REFUSED"), "{o}");
    // Without EDNS the 100-router answer is truncated; dig retries over TCP and gets it all.
    let o = run("dig", &[&at, p[0], p[1], "+noedns", "+ignore", "big.gpuha.test", "A"]);
    assert!(o.contains(" tc") && o.contains("ANSWER: 0,"), "{o}");
    let o = run("dig", &[&at, p[0], p[1], "+noedns", "big.gpuha.test", "A"]);
    assert!(o.contains("ANSWER: 100,"), "{o}");
    let o = run("dig", &[&at, p[0], p[1], "gpuha.test", "AXFR"]);
    assert!(o.contains("Transfer failed"), "{o}");

    let o = run("kdig", &[&at, p[0], p[1], "+edns=1", "api.gpuha.test", "A"]);
    assert!(o.contains("status: BADVERS"), "{o}");
    let o = run("kdig", &[&at, p[0], p[1], "+tcp", "ApI.GPUHA.test", "AAAA"]);
    assert!(o.contains("status: NOERROR") && o.contains("fd00::1:1"), "{o}");
    let o = run("kdig", &[&at, p[0], p[1], "+bufsize=4096", "+notcp", "+ignore", "big.gpuha.test", "A"]);
    assert!(o.contains(" tc") && o.contains("UDP size: 1232"), "{o}");
}
