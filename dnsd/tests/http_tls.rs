//! dnsd's HTTP side over TLS with client certificates (`[http.tls]`): a client with a
//! certificate of the configured CA is served; one without a certificate, with one from another
//! CA, or speaking plain HTTP is refused in the handshake and counted by reason; a reload swaps
//! the certificate and the client CA for new connections while an open one keeps working; plain
//! HTTP is refused on a non-loopback address. Certificates come from deploy/tls/make-certs.sh.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use gpuha_dnsd::reload::ReloadSource;
use gpuha_dnsd::{Config, Listeners, RunOptions};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// `make-certs.sh ARGS` (openssl CLI).
fn make_certs(args: &[&str]) {
    let out = Command::new("bash").arg(repo().join("deploy/tls/make-certs.sh")).args(args).output().expect("bash not runnable");
    assert!(out.status.success(), "make-certs.sh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn certs(dir: &Path) {
    make_certs(&["all", dir.to_str().expect("utf-8 path")]);
}

struct Running {
    http: SocketAddr,
    metrics: SocketAddr,
    reload: tokio::sync::mpsc::Sender<()>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

fn config_text(dir: &Path, tls: &Path) -> String {
    let key = dir.join("frame.key");
    std::fs::write(&key, b"0123456789abcdef-test-key").expect("key");
    format!(
        "[ingest]\nlisten = \"127.0.0.1:0\"\nkeys = [{{ id = 1, file = \"{k}\" }}]\n\n[http]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n\
         tls = {{ cert_file = \"{t}/dnsd.crt\", key_file = \"{t}/dnsd.key\", client_ca_file = \"{t}/ca.crt\" }}\n",
        k = key.display(),
        t = tls.display()
    )
}

async fn start(dir: &Path, tls: &Path) -> Running {
    let path = dir.join("dnsd.toml");
    std::fs::write(&path, config_text(dir, tls)).expect("config");
    let config = Config::load(&path).expect("config");
    let listeners = Listeners::bind(&config).expect("bind");
    let http = listeners.http.local_addr().expect("addr");
    let metrics = listeners.metrics.as_ref().expect("metrics listener").local_addr().expect("addr");
    let (reload, reload_rx) = tokio::sync::mpsc::channel(1);
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // The file's listen addresses are port 0: reloads keep the bound ones.
    let (h, m) = (http, metrics);
    let adjust: gpuha_dnsd::reload::Adjust = Arc::new(move |c: &mut Config| {
        c.http.listen = h;
        c.http.metrics_listen = Some(m);
    });
    let mut config = config;
    adjust(&mut config);
    let options = RunOptions { reload_source: ReloadSource { config_path: Some(path), adjust: Some(adjust) }, reload_requests: Some(reload_rx) };
    let task = tokio::spawn(async move {
        gpuha_dnsd::run_with(config, listeners, options, async {
            let _ = stop_rx.await;
        })
        .await
        .expect("dnsd run");
    });
    Running { http, metrics, reload, stop, task }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// A TLS client trusting `ca`, presenting `client` (`dir/client.{crt,key}`) if given.
fn connector(ca: &Path, client: Option<&Path>) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("ca") {
        roots.add(c.expect("ca pem")).expect("ca");
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let b = ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions().expect("versions").with_root_certificates(roots);
    let config = match client {
        Some(dir) => {
            let chain = CertificateDer::pem_file_iter(dir.join("client.crt")).expect("crt").collect::<Result<Vec<_>, _>>().expect("crt pem");
            let key = PrivateKeyDer::from_pem_file(dir.join("client.key")).expect("key");
            b.with_client_auth_cert(chain, key).expect("client cert")
        }
        None => b.with_no_client_auth(),
    };
    TlsConnector::from(Arc::new(config))
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn connect(addr: SocketAddr, c: &TlsConnector) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect(addr).await?;
    c.connect(ServerName::try_from("localhost").expect("name"), tcp).await
}

/// One keep-alive request on `s`: the status code and body.
async fn get<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S, path: &str) -> std::io::Result<(u16, String)> {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: dnsd\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await.map_err(|_| std::io::Error::other("read timed out"))??;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("closed after {} bytes", buf.len())));
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = &text[..end];
            let len: usize = head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0))).unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
                return Ok((status, text[end + 4..end + 4 + len].to_string()));
            }
        }
    }
}

/// A whole request on a new connection; `Err` when the handshake or the request fails.
async fn fetch(addr: SocketAddr, c: &TlsConnector, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = connect(addr, c).await?;
    get(&mut s, path).await
}

/// `gpuha_dnsd_http_tls_refused_total{reason}` from the plain metrics listener.
async fn refused(m: SocketAddr, reason: &str) -> u64 {
    let mut s = TcpStream::connect(m).await.expect("metrics");
    let (status, body) = get(&mut s, "/metrics").await.expect("metrics");
    assert_eq!(status, 200);
    let line = format!("gpuha_dnsd_http_tls_refused_total{{reason=\"{reason}\"}} ");
    body.lines().find_map(|l| l.strip_prefix(&line)).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {line} in\n{body}"))
}

/// Waits until the refusal with `reason` is counted `n` times (the server counts after the
/// client saw the handshake fail).
async fn wait_refused(m: SocketAddr, reason: &str, n: u64) {
    for _ in 0..100 {
        if refused(m, reason).await >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{reason} refusals never reached {n}: {}", refused(m, reason).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_required_and_refusals_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (good, other) = (dir.path().join("good"), dir.path().join("other"));
    certs(&good);
    certs(&other);
    let d = start(dir.path(), &good).await;

    // With a certificate of the configured CA: served, over the same connection twice.
    let ok = connector(&good.join("ca.crt"), Some(&good));
    let mut s = connect(d.http, &ok).await.expect("handshake with a good certificate");
    assert_eq!(get(&mut s, "/v1/fleet").await.expect("fleet").0, 200);
    assert_eq!(get(&mut s, "/healthz").await.expect("healthz").0, 200);

    // No certificate: the handshake (TLS 1.3: the first read) fails; counted.
    let none = connector(&good.join("ca.crt"), None);
    assert!(fetch(d.http, &none, "/v1/fleet").await.is_err(), "a client without a certificate was served");
    wait_refused(d.metrics, "no_certificate", 1).await;

    // A certificate from another CA: refused, counted as bad_certificate.
    let stranger = connector(&good.join("ca.crt"), Some(&other));
    assert!(fetch(d.http, &stranger, "/v1/fleet").await.is_err(), "a client of another CA was served");
    wait_refused(d.metrics, "bad_certificate", 1).await;

    // A client that does not trust dnsd's certificate aborts with an alert: counted too.
    let wrong_ca = connector(&other.join("ca.crt"), Some(&good));
    assert!(fetch(d.http, &wrong_ca, "/v1/fleet").await.is_err());
    wait_refused(d.metrics, "client_alert", 1).await;

    // Plain HTTP to the TLS port: no answer, counted as not_tls.
    let mut plain = TcpStream::connect(d.http).await.expect("connect");
    assert!(get(&mut plain, "/v1/fleet").await.map(|(st, _)| st != 200).unwrap_or(true));
    wait_refused(d.metrics, "not_tls", 1).await;

    // The plain metrics listener serves only /metrics and /healthz.
    let mut m = TcpStream::connect(d.metrics).await.expect("metrics");
    assert_eq!(get(&mut m, "/v1/fleet").await.expect("metrics listener").0, 404);
    // The first connection is still good.
    assert_eq!(get(&mut s, "/v1/fleet").await.expect("fleet after refusals").0, 200);
    assert_eq!(refused(d.metrics, "no_certificate").await, 1);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rotates_the_certificate_and_the_client_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, new) = (dir.path().join("old"), dir.path().join("new"));
    certs(&old);
    certs(&new);
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live).expect("dir");
    let copy = |from: &Path| {
        for f in ["ca.crt", "dnsd.crt", "dnsd.key"] {
            std::fs::copy(from.join(f), live.join(f)).expect("copy");
        }
    };
    copy(&old);
    let d = start(dir.path(), &live).await;
    let old_client = connector(&old.join("ca.crt"), Some(&old));
    let new_client = connector(&new.join("ca.crt"), Some(&new));
    let mut open = connect(d.http, &old_client).await.expect("old client before the rotation");
    assert_eq!(get(&mut open, "/v1/fleet").await.expect("fleet").0, 200);
    assert!(fetch(d.http, &new_client, "/v1/fleet").await.is_err(), "the new CA was trusted before the rotation");

    // The new CA's files replace the old ones; a reload re-reads them.
    copy(&new);
    d.reload.send(()).await.expect("reload");
    let mut served = false;
    for _ in 0..100 {
        if fetch(d.http, &new_client, "/v1/fleet").await.is_ok_and(|(st, _)| st == 200) {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "the new certificate and CA never took effect");
    // New connections with the old credentials are refused; the connection opened before
    // the reload keeps being served.
    assert!(fetch(d.http, &old_client, "/v1/fleet").await.is_err(), "the old CA is still trusted after the rotation");
    assert_eq!(get(&mut open, "/v1/fleet").await.expect("open connection across the reload").0, 200);

    // A reload with a broken key file is refused whole: the running certificate keeps serving.
    std::fs::write(live.join("dnsd.key"), "not a key\n").expect("write");
    d.reload.send(()).await.expect("reload");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fetch(d.http, &new_client, "/v1/fleet").await.expect("served after a refused reload").0, 200);
    d.stop().await;
}

#[test]
fn plain_http_only_on_loopback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("k");
    std::fs::write(&key, b"0123456789abcdef-test-key").expect("key");
    let text = |http: &str| format!("[ingest]\nkeys = [{{ id = 1, file = \"{}\" }}]\n[http]\n{http}\n", key.display());
    for ok in ["listen = \"127.0.0.1:9401\"", "listen = \"[::1]:9401\"", "listen = \"127.0.0.2:9401\""] {
        Config::from_toml(&text(ok), Path::new("t.toml")).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for bad in ["listen = \"0.0.0.0:9401\"", "listen = \"10.1.2.3:9401\"", "listen = \"[::]:9401\""] {
        let e = Config::from_toml(&text(bad), Path::new("t.toml")).expect_err(bad).to_string();
        assert!(e.contains("http.listen") && e.contains("loopback") && e.contains("[http.tls]"), "{bad}: {e}");
    }
    // With TLS any address is allowed (the files are read at start, not by validate).
    let tls = "listen = \"0.0.0.0:9401\"\ntls = { cert_file = \"c\", key_file = \"k\", client_ca_file = \"ca\" }";
    Config::from_toml(&text(tls), Path::new("t.toml")).expect("TLS on a public address");
    // Missing files are named at start.
    let cfg = Config::from_toml(&text(tls), Path::new("t.toml")).expect("config");
    let e = gpuha_dnsd::tls::server_config(cfg.http.tls.as_ref().expect("tls")).expect_err("missing files").to_string();
    assert!(e.contains("http.tls.cert_file"), "{e}");
}
