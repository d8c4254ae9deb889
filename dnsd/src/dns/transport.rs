//! DNS over UDP and TCP (RFC 1035 §4.2, RFC 7766). Each message is parsed with hickory-server's
//! [`Request::from_bytes`]; one that does not parse (or is a response, which we never asked for)
//! is counted in `gpuha_dnsd_dns_malformed_total` and dropped. The rest go to the
//! [`RequestHandler`], whose response is captured by [`Capture`] and written back.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use hickory_proto::op::MessageType;
use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::BinEncoder;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::net::NetError;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use super::metrics::qtype_label;
use super::{DnsService, Snapshot};
use crate::state::now_ms;
use crate::udp_batch::{send_all_blocking, RecvBatch, BATCH};

/// Concurrent TCP connections; more are closed at once (counted).
const MAX_TCP_CONNECTIONS: usize = 512;

/// A [`ResponseHandler`] that keeps the encoded response for the transport to send. The handler
/// has already sized the response for the transport, so no limit is applied here.
#[derive(Clone, Default)]
pub struct Capture {
    out: Arc<Mutex<Option<Vec<u8>>>>,
}

impl Capture {
    pub fn take(&self) -> Option<Vec<u8>> {
        self.out.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let mut buf = Vec::with_capacity(512);
        let mut enc = BinEncoder::new(&mut buf);
        let info = response.destructive_emit(&mut enc)?;
        *self.out.lock().unwrap_or_else(|e| e.into_inner()) = Some(buf);
        Ok(info)
    }
}

/// Parses and answers one message; `None` when it is dropped. The common query is answered
/// from the snapshot's prebuilt bytes ([`super::fast`]), everything else by hickory.
pub async fn respond(svc: &DnsService, bytes: Vec<u8>, src: SocketAddr, protocol: Protocol) -> Option<Vec<u8>> {
    let now = now_ms();
    let snap = svc.pool_states(now);
    let mut out = Vec::new();
    if let Some(hit) = snap.fast.answer(&bytes, protocol == Protocol::Udp, &mut out) {
        count_fast(svc, &snap, hit.entry, 1, now);
        return Some(out);
    }
    respond_hickory(svc, bytes, src, protocol).await
}

/// Counts `n` fast answers of entry `entry` of `snap`'s table, as hickory's path counts each.
fn count_fast(svc: &DnsService, snap: &Snapshot, entry: usize, n: u64, now_ms: u64) {
    let Some(e) = snap.fast.entries.get(entry) else { return };
    for s in &e.served {
        svc.metrics.served_n(&snap.zones, s, now_ms, n);
    }
    svc.metrics.queries_n(qtype_label(Some(e.qtype)), "NOERROR", n);
}

/// [`respond`] without the fast path: every message through hickory.
pub async fn respond_hickory(svc: &DnsService, bytes: Vec<u8>, src: SocketAddr, protocol: Protocol) -> Option<Vec<u8>> {
    let request = match Request::from_bytes(bytes, src, protocol) {
        Ok(r) if r.metadata.message_type == MessageType::Query => r,
        Ok(_) => {
            svc.metrics.malformed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%src, "dropped a DNS response sent to us");
            return None;
        }
        Err(e) => {
            svc.metrics.malformed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%src, "dropped malformed DNS message: {e}");
            return None;
        }
    };
    let capture = Capture::default();
    svc.handle_request::<_, TokioTime>(&request, capture.clone()).await;
    capture.take()
}

/// Largest DNS query over UDP we read; a longer one is counted as malformed and dropped
/// (queries are a few dozen bytes; EDNS options do not come near this).
const MAX_UDP_QUERY: usize = 4096;

/// How often an idle UDP thread looks at its stop flag.
pub const UDP_STOP_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// One UDP thread on `sock` (blocking, with its own read timeout), until `stop` is set.
/// Datagrams come in batches ([`RecvBatch::recv_blocking`]: one syscall per batch, no
/// readiness round trip); the fast answers of a batch are counted together and sent with one
/// `sendmmsg`; the others go through hickory one by one (on `rt`, which they do not wait on).
pub fn udp_thread(svc: Arc<DnsService>, sock: Arc<std::net::UdpSocket>, stop: Arc<AtomicBool>, rt: tokio::runtime::Handle) {
    let mut batch = RecvBatch::new(MAX_UDP_QUERY);
    let mut outs: Vec<Vec<u8>> = (0..BATCH).map(|_| Vec::with_capacity(512)).collect();
    let mut dest: Vec<SocketAddr> = Vec::with_capacity(BATCH);
    let mut hits: Vec<(usize, u64)> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match batch.recv_blocking(&sock) {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted) => continue,
            Err(e) => {
                // ICMP port unreachable from an earlier reply and the like: keep serving.
                tracing::debug!("dns udp recv error: {e}");
                continue;
            }
        }
        let now = now_ms();
        let snap = svc.pool_states(now);
        dest.clear();
        hits.clear();
        for i in 0..batch.count() {
            let (bytes, src) = batch.get(i);
            let Some(src) = src.filter(|s| s.port() != 0) else { continue };
            if batch.was_cut(i) {
                svc.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%src, "dropped an oversized DNS query");
                continue;
            }
            let out = &mut outs[dest.len()];
            if let Some(hit) = snap.fast.answer(bytes, true, out) {
                match hits.iter_mut().find(|(e, _)| *e == hit.entry) {
                    Some((_, n)) => *n += 1,
                    None => hits.push((hit.entry, 1)),
                }
                dest.push(src);
                continue;
            }
            if let Some(resp) = rt.block_on(respond_hickory(&svc, bytes.to_vec(), src, Protocol::Udp)) {
                *out = resp;
                dest.push(src);
            }
        }
        for &(entry, n) in &hits {
            count_fast(&svc, &snap, entry, n, now);
        }
        let msgs: Vec<(&[u8], SocketAddr)> = outs.iter().zip(&dest).map(|(o, d)| (o.as_slice(), *d)).collect();
        send_all_blocking(&sock, &msgs);
    }
}

pub async fn tcp_loop(svc: Arc<DnsService>, listener: tokio::net::TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let (stream, src) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and the like: back off a little instead of spinning.
                tracing::warn!("dns tcp accept error: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            svc.metrics.tcp_rejected.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let svc = svc.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = tcp_conn(&svc, stream, src).await {
                tracing::debug!(%src, "dns tcp connection ended: {e}");
            }
        });
    }
}

/// One TCP connection: length-prefixed messages answered in order until the client closes,
/// goes idle, or sends something that does not parse.
async fn tcp_conn(svc: &DnsService, mut stream: tokio::net::TcpStream, src: SocketAddr) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    loop {
        let len = match tokio::time::timeout(svc.tcp_idle, stream.read_u16()).await {
            Ok(Ok(len)) => usize::from(len),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        };
        let mut msg = vec![0u8; len];
        match tokio::time::timeout(svc.tcp_idle, stream.read_exact(&mut msg)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                svc.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
            Err(_) => return Ok(()),
        }
        let Some(resp) = respond(svc, msg, src, Protocol::Tcp).await else {
            // A stream we cannot parse has lost its framing as far as we know: close it.
            return Ok(());
        };
        let Ok(rlen) = u16::try_from(resp.len()) else { return Ok(()) };
        let mut framed = Vec::with_capacity(resp.len() + 2);
        framed.extend_from_slice(&rlen.to_be_bytes());
        framed.extend_from_slice(&resp);
        stream.write_all(&framed).await?;
    }
}
