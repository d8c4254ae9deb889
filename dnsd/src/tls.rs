//! dnsd's HTTP side over TLS with client certificates (`[http.tls]`): the fleet view, EDS and
//! the admin API are private to the holders of a certificate signed by `client_ca_file`.
//!
//! Why mutual TLS and not a shared token: Envoy's REST xDS client (the EDS poll) sends a fixed
//! request (method, path, JSON body, content type; `ApiConfigSource` has no header field), so a
//! token could not reach dnsd from it; both of Envoy's clients (the EDS poll and the picker's
//! `dispatch_http_call`) go through a cluster, and a cluster's `UpstreamTlsContext` carries a
//! client certificate, rotated by Envoy from files (SDS) without a restart. TLS is needed
//! anyway for privacy (the fleet view names every worker); the client certificate then costs
//! nothing more. See deploy/tls/README.md.
//!
//! The configuration is swapped whole on reload ([`Tls::set`]): new connections get the new
//! certificate and CA, connections already open keep theirs until they close. A client refused
//! in the handshake is counted by reason ([`Refusal`]) and logged at most once per
//! [`LOG_EVERY_MS`].

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};

use crate::config::{ConfigError, HttpTlsConfig};

/// Refused handshakes are logged at most this often (with the count not logged since).
pub const LOG_EVERY_MS: u64 = 10_000;

/// Why a TLS client was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No client certificate.
    NoCertificate,
    /// A client certificate not signed by `client_ca_file`, expired, or not for client auth.
    BadCertificate,
    /// The client rejected dnsd's certificate (an alert: it trusts another CA).
    ClientAlert,
    /// Not TLS at all (plain HTTP to the TLS port, a scanner).
    NotTls,
    /// The handshake did not complete within `http.header_read_timeout_ms`.
    Timeout,
    /// Closed before the handshake completed (a TCP probe, a port check): counted, not logged.
    Closed,
    /// Any other failure.
    Other,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [Refusal::NoCertificate, Refusal::BadCertificate, Refusal::ClientAlert, Refusal::NotTls, Refusal::Timeout, Refusal::Closed, Refusal::Other];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NoCertificate => "no_certificate",
            Refusal::BadCertificate => "bad_certificate",
            Refusal::ClientAlert => "client_alert",
            Refusal::NotTls => "not_tls",
            Refusal::Timeout => "timeout",
            Refusal::Closed => "closed",
            Refusal::Other => "other",
        }
    }

    /// The reason of a failed `accept`.
    pub fn of(e: &io::Error) -> Refusal {
        match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::NoCertificatesPresented) => Refusal::NoCertificate,
            Some(rustls::Error::InvalidCertificate(_)) => Refusal::BadCertificate,
            Some(rustls::Error::AlertReceived(_)) => Refusal::ClientAlert,
            Some(rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. }) => Refusal::NotTls,
            Some(_) => Refusal::Other,
            None if matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) => Refusal::Closed,
            None => Refusal::Other,
        }
    }
}

/// The TLS side of dnsd's HTTP listener: the configuration in force and the refusals.
#[derive(Debug)]
pub struct Tls {
    current: RwLock<Arc<ServerConfig>>,
    refused: [AtomicU64; 7],
    accepted: AtomicU64,
    last_log_ms: AtomicU64,
    unlogged: AtomicU64,
}

impl Tls {
    pub fn new(config: Arc<ServerConfig>) -> Self {
        Tls { current: RwLock::new(config), refused: Default::default(), accepted: AtomicU64::new(0), last_log_ms: AtomicU64::new(0), unlogged: AtomicU64::new(0) }
    }

    /// What new connections are accepted with.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Takes effect for the next connection (a reload: new certificate, key or client CA).
    pub fn set(&self, config: Arc<ServerConfig>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
    }

    pub fn note_accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a refusal and logs it unless one was logged in the last [`LOG_EVERY_MS`].
    pub fn note_refused(&self, reason: Refusal, peer: std::net::SocketAddr, detail: &str, now_ms: u64) {
        self.refused[reason as usize].fetch_add(1, Ordering::Relaxed);
        if reason == Refusal::Closed {
            return;
        }
        let last = self.last_log_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) < LOG_EVERY_MS || self.last_log_ms.compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let unlogged = self.unlogged.swap(0, Ordering::Relaxed);
        tracing::warn!(%peer, reason = reason.as_str(), "refused an HTTP client in the TLS handshake: {detail} ({unlogged} more refused since the last such line; gpuha_dnsd_http_tls_refused_total counts them all)");
    }

    pub fn refused(&self, reason: Refusal) -> u64 {
        self.refused[reason as usize].load(Ordering::Relaxed)
    }

    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(out, "# HELP gpuha_dnsd_http_tls_handshakes_total TLS clients accepted (a client certificate signed by http.tls.client_ca_file).");
        let _ = writeln!(out, "# TYPE gpuha_dnsd_http_tls_handshakes_total counter");
        let _ = writeln!(out, "gpuha_dnsd_http_tls_handshakes_total {}", self.accepted.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP gpuha_dnsd_http_tls_refused_total HTTP clients refused in the TLS handshake, by reason.");
        let _ = writeln!(out, "# TYPE gpuha_dnsd_http_tls_refused_total counter");
        for r in Refusal::ALL {
            let _ = writeln!(out, "gpuha_dnsd_http_tls_refused_total{{reason=\"{}\"}} {}", r.as_str(), self.refused(r));
        }
    }
}

fn read_certs(path: &Path, key: &'static str) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let bad = |why: String| ConfigError::invalid(key, format!("{}: {why}", path.display()));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))?.collect::<Result<_, _>>().map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// Reads the certificate, key and client CA of `c` into a server configuration that requires
/// a client certificate signed by the CA. Errors name the key and the file.
pub fn server_config(c: &HttpTlsConfig) -> Result<Arc<ServerConfig>, ConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_certs(&c.cert_file, "http.tls.cert_file")?;
    let key = PrivateKeyDer::from_pem_file(&c.key_file).map_err(|e| ConfigError::invalid("http.tls.key_file", format!("{}: {e}", c.key_file.display())))?;
    let mut roots = RootCertStore::empty();
    for ca in read_certs(&c.client_ca_file, "http.tls.client_ca_file")? {
        roots.add(ca).map_err(|e| ConfigError::invalid("http.tls.client_ca_file", format!("{}: {e}", c.client_ca_file.display())))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| ConfigError::invalid("http.tls.client_ca_file", format!("{}: {e}", c.client_ca_file.display())))?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::invalid("http.tls", e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| ConfigError::invalid("http.tls.key_file", format!("{} does not go with http.tls.cert_file {}: {e}", c.key_file.display(), c.cert_file.display())))?;
    Ok(Arc::new(config))
}
