//! The default log filter: a query flood must not become a log flood.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// hickory-proto logs a WARN for every query whose EDNS options are cut short: one line per
/// hostile packet. Under the default filter it is not logged; dnsd's own INFO lines still are.
#[test]
fn malformed_edns_options_do_not_log_under_the_default_filter() {
    let buf = Buf::default();
    let sink = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(gpuha_dnsd::DEFAULT_LOG_FILTER))
        .with_writer(move || sink.clone())
        .finish();
    // api.gpuha.test. A IN, then an OPT whose only option says 5 bytes and carries 1.
    let mut q = vec![0x12, 0x34, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1];
    q.extend_from_slice(b"\x03api\x05gpuha\x04test\x00\x00\x01\x00\x01");
    q.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 5, 0, 8, 0, 5, 0xff]);
    let src: SocketAddr = "127.0.0.1:5353".parse().expect("addr");
    tracing::subscriber::with_default(subscriber, || {
        for _ in 0..3 {
            assert!(Request::from_bytes(q.clone(), src, Protocol::Udp).is_ok(), "the query itself parses");
        }
        tracing::info!(target: "gpuha_dnsd", "still logging");
    });
    let text = String::from_utf8_lossy(&buf.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    assert!(!text.contains("EDNS"), "hickory's per-packet warning logged: {text}");
    assert!(text.contains("still logging"), "{text}");
}
