//! Helpers for dnsd's DNS tests: an in-process dnsd on port 0, signed frames, DNS clients.
#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::Duration;

use gpuha_dnsd::{Config, Listeners};
use gpuha_liveness::{Frame, Metrics};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const KEY: &[u8] = b"0123456789abcdef-test-key";

pub fn now_ms() -> u64 {
    gpuha_dnsd::state::now_ms()
}

/// Writes the key file into `dir` and returns a full dnsd config whose `[dns]` section is
/// `dns` (everything on 127.0.0.1 port 0).
pub fn config_text(dir: &Path, dns: &str) -> String {
    config_text_http(dir, "", dns)
}

/// [`config_text`] with `http` added to the `[http]` section.
pub fn config_text_http(dir: &Path, http: &str, dns: &str) -> String {
    config_text_full(dir, "", http, dns)
}

/// [`config_text`] with `ingest` added to the `[ingest]` section and `http` to `[http]`.
pub fn config_text_full(dir: &Path, ingest: &str, http: &str, dns: &str) -> String {
    let key = dir.join("frame.key");
    std::fs::write(&key, KEY).expect("write key");
    format!(
        "[ingest]\nlisten = \"127.0.0.1:0\"\nkeys = [{{ id = 1, file = \"{}\" }}]\n{ingest}\n[http]\nlisten = \"127.0.0.1:0\"\n{http}\n{dns}",
        key.display()
    )
}

/// The zone most tests use: two pools with v4+v6 routers, one "big" pool with many routers.
pub fn dns_section(extra: &str) -> String {
    format!(
        r#"
[dns]
listen = "127.0.0.1:0"
{extra}

[[dns.zones]]
origin = "gpuha.test."
ns = ["ns1.gpuha.test.", "ns2.gpuha.test."]
soa = {{ rname = "hostmaster.gpuha.test.", serial = 7, minimum = 3 }}
records = [
  {{ name = "ns1", type = "A", value = "127.0.0.1" }},
  {{ name = "ns2", type = "A", value = "127.0.0.2" }},
  {{ name = "txt", type = "TXT", value = "hello" }},
  {{ name = "chat", type = "CNAME", value = "api.gpuha.test." }},
  {{ name = "away", type = "CNAME", value = "www.elsewhere.example." }},
  {{ name = "a.b.deep", type = "A", value = "127.0.0.5" }},
]

[[dns.pools]]
id = "pool-a"
region = "r1"
cloud = "c1"
routers = ["10.0.1.1", "fd00::1:1"]

[[dns.pools]]
id = "pool-b"
region = "r2"
cloud = "c2"
routers = ["10.0.2.1", "10.0.2.2"]

[[dns.pools]]
id = "pool-big"
routers = [{big}]

[[dns.services]]
name = "api.gpuha.test."
pools = ["pool-a", "pool-b"]
fail_whale = ["10.9.9.9", "fd00::99"]

[[dns.services]]
name = "prio.gpuha.test."
policy = "priority"
pools = ["pool-b", "pool-a"]
ttl = 2
fail_whale = ["10.9.9.9"]

[[dns.services]]
name = "big.gpuha.test."
pools = ["pool-big"]
fail_whale = ["10.9.9.9"]
"#,
        big = (0..100).map(|i| format!("\"10.1.{}.{}\"", i / 200, i % 200 + 1)).collect::<Vec<_>>().join(", ")
    )
}

/// A running in-process dnsd.
pub struct Dnsd {
    pub ingest: SocketAddr,
    pub http: SocketAddr,
    pub dns: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Dnsd {
    pub async fn start(dns: &str) -> Dnsd {
        Self::start_http("", dns).await
    }

    /// [`Dnsd::start`] with `http` added to the `[http]` section.
    pub async fn start_http(http: &str, dns: &str) -> Dnsd {
        Self::start_full("", http, dns).await
    }

    /// [`Dnsd::start`] with `ingest` added to the `[ingest]` section and `http` to `[http]`.
    pub async fn start_full(ingest: &str, http: &str, dns: &str) -> Dnsd {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = config_text_full(dir.path(), ingest, http, dns);
        Self::start_text(&text, dir).await
    }

    /// A dnsd from a whole config text; `dir` (holding its files) lives as long as it runs.
    pub async fn start_text(text: &str, dir: tempfile::TempDir) -> Dnsd {
        let config = Config::from_toml(text, Path::new("test.toml")).expect("config");
        let listeners = Listeners::bind(&config).expect("bind");
        let ingest = listeners.ingest.local_addr().expect("addr");
        let http = listeners.http.local_addr().expect("addr");
        let dns = listeners.dns.as_ref().expect("dns").0.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            gpuha_dnsd::run(config, listeners, async {
                let _ = rx.await;
            })
            .await
            .expect("dnsd run");
        });
        Dnsd { ingest, http, dns, stop: Some(tx), task: Some(task), _dir: dir }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }

    pub async fn metrics(&self) -> String {
        http_get(self.http, "/metrics").await
    }
}

pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect http");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

/// The value of one sample line `name{labels} value` in Prometheus text, or 0 when absent.
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A frame from `worker` of `pool`, sent now.
pub fn frame(worker: &str, pool: &str, boot: u64, seq: u64) -> Vec<u8> {
    frame_with_metrics(worker, pool, boot, seq, Metrics::default())
}

/// A frame from `worker` of `pool`, sent now, carrying `metrics`.
pub fn frame_with_metrics(worker: &str, pool: &str, boot: u64, seq: u64, metrics: Metrics) -> Vec<u8> {
    Frame {
        key_id: 1,
        boot_id: boot,
        seq,
        sent_ms: now_ms(),
        worker_id: worker.into(),
        pool_id: pool.into(),
        addr: "10.0.0.1:8000".parse().expect("addr"),
        models: vec!["m".into()],
        adapters: vec![],
        metrics,
    }
    .encode(KEY)
    .expect("encode")
}

pub fn send_frame(to: &[SocketAddr], bytes: &[u8]) {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    for a in to {
        s.send_to(bytes, a).expect("send frame");
    }
}

pub fn query_msg(name: &str, t: RecordType, edns: Option<u16>) -> Message {
    let mut m = Message::new(rand_id(), MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), t));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m
}

fn rand_id() -> u16 {
    (now_ms() as u16).wrapping_mul(31).wrapping_add(7)
}

/// Sends raw bytes over UDP and returns the raw reply, or None after `wait`.
pub async fn udp_raw(server: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    s.send_to(bytes, server).await.expect("send");
    let mut buf = vec![0u8; 65_535];
    match tokio::time::timeout(wait, s.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

pub async fn udp(server: SocketAddr, msg: &Message) -> (Message, usize) {
    let raw = udp_raw(server, &msg.to_vec().expect("encode"), Duration::from_secs(2)).await.expect("udp reply");
    (Message::from_vec(&raw).expect("decode reply"), raw.len())
}

pub async fn tcp(server: SocketAddr, msg: &Message) -> Message {
    let mut s = tokio::net::TcpStream::connect(server).await.expect("connect");
    let bytes = msg.to_vec().expect("encode");
    s.write_all(&(bytes.len() as u16).to_be_bytes()).await.expect("w");
    s.write_all(&bytes).await.expect("w");
    let len = s.read_u16().await.expect("len");
    let mut buf = vec![0u8; len as usize];
    s.read_exact(&mut buf).await.expect("read");
    Message::from_vec(&buf).expect("decode")
}

/// A/AAAA addresses in the answer, sorted.
pub fn addrs(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    v.sort();
    v
}
