//! A tiny closed-loop load generator for `fake-vllm` (no tools needed):
//! `cargo run --release -p fake-vllm --example load -- 127.0.0.1:8000 64 5 [stream]`
//! (address, connections, seconds). Keep-alive HTTP/1.1, one request in flight per connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let addr = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:8000".into());
    let conns: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(64);
    let secs: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
    let stream = args.get(4).is_some_and(|s| s == "stream");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let done = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let until = Instant::now() + Duration::from_secs(secs);
        let body = format!(
            r#"{{"model":"tiny","messages":[{{"role":"user","content":"hi"}}],"max_tokens":16,"stream":{stream}}}"#
        );
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let (addr, req, done, errors) = (addr.clone(), req.clone(), done.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                'conn: while Instant::now() < until {
                    let Ok(mut s) = TcpStream::connect(&addr).await else {
                        errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let _ = s.set_nodelay(true);
                    while Instant::now() < until {
                        if s.write_all(req.as_bytes()).await.is_err() {
                            errors.fetch_add(1, Ordering::Relaxed);
                            continue 'conn;
                        }
                        // Read until the end of this response: the last chunk (streams) or the
                        // end of a JSON body (the body ends with "}" after the headers).
                        let mut got = Vec::new();
                        loop {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => {
                                    errors.fetch_add(1, Ordering::Relaxed);
                                    continue 'conn;
                                }
                                Ok(n) => got.extend_from_slice(&buf[..n]),
                            }
                            let end = if stream { got.ends_with(b"\r\n0\r\n\r\n") } else { got.ends_with(b"}") };
                            if end {
                                break;
                            }
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let n = done.load(Ordering::Relaxed);
        println!(
            "{n} requests in {secs} s = {:.0} req/s, {} errors",
            n as f64 / secs as f64,
            errors.load(Ordering::Relaxed)
        );
    });
    Ok(())
}
