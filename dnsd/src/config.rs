//! dnsd's TOML configuration: where to listen, which HMAC keys to accept, and (optionally) the
//! DNS zones. Unknown keys are errors; `validate` names the key and the reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use gpuha_liveness::KeyRing;
use serde::Deserialize;

use crate::dns::DnsConfig;
pub use crate::error::ConfigError;


#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub ingest: IngestConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub dns: Option<DnsConfig>,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub eds: EdsConfig,
}

/// The routers' worker cluster over EDS (`POST /v3/discovery:endpoints`, see
/// [`gpuha_liveness::membership`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdsConfig {
    /// A worker silent (no frame at all) for this long leaves the routers' cluster; never while
    /// it is fresh. At least `gpuha_liveness::membership::MIN_LEAVE_AFTER_MS` (4 s) and at most
    /// `ingest.forget_after_ms` (a forgotten worker is unknown). Default 2 min.
    #[serde(default = "default_leave_after")]
    pub leave_after_ms: u64,
}

impl Default for EdsConfig {
    fn default() -> Self {
        EdsConfig { leave_after_ms: default_leave_after() }
    }
}

fn default_leave_after() -> u64 {
    gpuha_liveness::membership::DEFAULT_LEAVE_AFTER_MS
}

/// The admin API (see [`crate::admin`]): off unless a token file is given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// File holding the bearer token `/v1/admin` requires (at least 16 printable characters).
    /// Without it dnsd accepts no admin request. Re-read on reload (a token rotation).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Where the operators' overrides are kept across restarts (written atomically on each
    /// change, read at start). Without it overrides last until dnsd stops.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// UDP address sidecars send frames to.
    #[serde(default = "default_ingest")]
    pub listen: SocketAddr,
    /// Kernel receive buffer; large so bursts from thousands of sidecars are not dropped.
    #[serde(default = "default_rcvbuf")]
    pub recv_buffer_bytes: usize,
    /// Frames whose send time is further than this from the receive time are dropped.
    #[serde(default = "default_skew")]
    pub max_skew_ms: u64,
    /// Workers that sent no frame for this long are forgotten: gone from `/v1/fleet`, and their
    /// id no longer counts towards `max_workers` (their pool is dead long before: 10 s). 10 min
    /// by default (was 1 h): worker ids that change on every restart (pod names) hold a slot
    /// until then, and nothing needs a silent worker after its pool was evicted and its
    /// streams were rescued (10 s each). At least one minute.
    #[serde(default = "default_forget")]
    pub forget_after_ms: u64,
    /// Worker ids tracked at most; past it frames from new ids are dropped and counted
    /// (`gpuha_dnsd_frames_dropped_total{reason="too_many_workers"}`), known ones never
    /// evicted. About 1.9 KB each.
    #[serde(default = "default_max_workers")]
    pub max_workers: usize,
    /// HMAC keys; several during a rotation.
    pub keys: Vec<KeyConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    pub id: u16,
    /// File holding the key (raw bytes; a trailing newline is stripped).
    pub file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Serves `/v1/fleet`, `/metrics` and `/healthz`.
    #[serde(default = "default_http")]
    pub listen: SocketAddr,
    /// A connection whose request headers are not complete this long after it opened (or after
    /// its previous response) is closed: a slow client cannot hold a connection for ever.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout_ms: u64,
    /// Open connections at most; past it new ones are closed at once (counted in
    /// `gpuha_dnsd_http_connections_rejected_total`), so idle clients cannot use up the
    /// process's file descriptors, which the UDP and DNS sockets share.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// TLS with client certificates (see the `tls` module). Without it the HTTP side is plain,
    /// which only a loopback `listen` address may be.
    #[serde(default)]
    pub tls: Option<HttpTlsConfig>,
    /// A second, plain listener that serves only `/metrics` and `/healthz` (for a Prometheus
    /// without a client certificate). It can be on any address: it reads counters and
    /// per-worker gauges, it cannot steer anything; firewall it as such.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
}

/// `[http.tls]`: PEM files, re-read on every reload (a certificate rotation).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTlsConfig {
    /// dnsd's certificate chain (leaf first), for the names or addresses clients dial.
    pub cert_file: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// The CA(s) whose client certificates are accepted; during a CA rotation, old and new.
    pub client_ca_file: PathBuf,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { listen: default_http(), header_read_timeout_ms: default_header_read_timeout(), max_connections: default_max_connections(), tls: None, metrics_listen: None }
    }
}

fn default_header_read_timeout() -> u64 {
    5_000
}
fn default_max_connections() -> usize {
    1_024
}

fn default_ingest() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9400))
}
fn default_http() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9401))
}
fn default_rcvbuf() -> usize {
    8 << 20
}
fn default_skew() -> u64 {
    gpuha_liveness::ingest::DEFAULT_MAX_SKEW_MS
}
/// See [`IngestConfig::forget_after_ms`].
pub const DEFAULT_FORGET_AFTER_MS: u64 = 600_000;
/// The shortest `forget_after_ms`: well past the eviction window and the rescue of streams.
pub const MIN_FORGET_AFTER_MS: u64 = 60_000;

fn default_forget() -> u64 {
    DEFAULT_FORGET_AFTER_MS
}
fn default_max_workers() -> usize {
    gpuha_liveness::ingest::DEFAULT_MAX_WORKERS
}

/// Reads a key file (see [`gpuha_liveness::frame::key_from_file_bytes`]).
pub fn read_key(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    gpuha_liveness::frame::key_from_file_bytes(bytes).map_err(|len| {
        ConfigError::invalid("ingest.keys.file", format!("{} holds {len} bytes; use at least 16 random bytes", path.display()))
    })
}

impl Config {
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|source| ConfigError::Parse { path: path.into(), source })?;
        c.validate()?;
        Ok(c)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::from_toml(&text, path)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ingest.keys.is_empty() {
            return Err(ConfigError::invalid("ingest.keys", "at least one key is required"));
        }
        let mut ids: Vec<u16> = self.ingest.keys.iter().map(|k| k.id).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(ConfigError::invalid("ingest.keys.id", "key ids must be unique"));
        }
        if self.http.header_read_timeout_ms == 0 {
            return Err(ConfigError::invalid("http.header_read_timeout_ms", "must be > 0"));
        }
        if self.http.max_connections == 0 {
            return Err(ConfigError::invalid("http.max_connections", "must be > 0"));
        }
        if self.http.tls.is_none() && !self.http.listen.ip().is_loopback() {
            return Err(ConfigError::invalid(
                "http.listen",
                format!(
                    "{} is not a loopback address, and plain HTTP is only for loopback (the fleet view, EDS and the admin API would be open to the network): \
                     add [http.tls] with cert_file, key_file and client_ca_file (deploy/tls/make-certs.sh), or listen on 127.0.0.1",
                    self.http.listen
                ),
            ));
        }
        if self.http.metrics_listen.is_some_and(|m| m == self.http.listen && m.port() != 0) {
            return Err(ConfigError::invalid("http.metrics_listen", "must differ from http.listen"));
        }
        if self.ingest.max_skew_ms == 0 {
            return Err(ConfigError::invalid("ingest.max_skew_ms", "must be > 0"));
        }
        if self.ingest.max_workers == 0 {
            return Err(ConfigError::invalid("ingest.max_workers", "must be > 0"));
        }
        if self.ingest.forget_after_ms < MIN_FORGET_AFTER_MS {
            return Err(ConfigError::invalid("ingest.forget_after_ms", format!("must be at least {MIN_FORGET_AFTER_MS} (a worker must outlive its pool's eviction and the rescue of its streams)")));
        }
        let min_leave = gpuha_liveness::membership::MIN_LEAVE_AFTER_MS;
        if self.eds.leave_after_ms < min_leave || self.eds.leave_after_ms > self.ingest.forget_after_ms {
            return Err(ConfigError::invalid(
                "eds.leave_after_ms",
                format!("must be between {min_leave} (the freshness gate and a second for the routers' polls) and ingest.forget_after_ms ({})", self.ingest.forget_after_ms),
            ));
        }
        if let Some(dns) = &self.dns {
            dns.validate()?;
        }
        Ok(())
    }

    /// Loads every configured key into a ring.
    pub fn key_ring(&self) -> Result<KeyRing, ConfigError> {
        let mut ring = KeyRing::new();
        for k in &self.ingest.keys {
            ring.insert(k.id, read_key(&k.file)?);
        }
        Ok(ring)
    }
}
