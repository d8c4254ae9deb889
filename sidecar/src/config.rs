//! Sidecar configuration: a TOML file, flags on top. Unknown keys are errors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("config key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, reason: reason.into() }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// vLLM's Prometheus endpoint.
    #[serde(default = "default_metrics_url")]
    pub metrics_url: String,
    /// dnsd ingest addresses; every frame goes to each (several dnsd instances stay consistent).
    #[serde(default)]
    pub ingest: Vec<SocketAddr>,
    pub worker_id: String,
    pub pool: String,
    /// Where Envoy reaches this vLLM (`ip:port`, as listed in Envoy's worker cluster).
    pub serve_addr: SocketAddr,
    /// HMAC key file (raw bytes, trailing newline stripped, ≥ 16 bytes).
    pub key_file: PathBuf,
    #[serde(default = "default_key_id")]
    pub key_id: u16,
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    /// A scrape slower than this is a failed scrape: no frame.
    #[serde(default = "default_timeout")]
    pub scrape_timeout_ms: u64,
    /// Scrapes out at once while vLLM is slow to answer (a new one starts every `interval_ms`
    /// while fewer are out): a busy vLLM still gets a frame every interval or so.
    #[serde(default = "default_in_flight")]
    pub max_scrapes_in_flight: usize,
    /// A `/metrics` page larger than this is refused.
    #[serde(default = "default_max_bytes")]
    pub max_metrics_bytes: usize,
    /// Served model names; empty: taken from the `model_name` labels. vLLM labels its metrics
    /// with the base model only: for the picker to route requests for LoRA adapters (served
    /// under their own names), list the base model and the adapters here.
    #[serde(default)]
    pub models: Vec<String>,
}

fn default_metrics_url() -> String {
    "http://127.0.0.1:8000/metrics".into()
}
fn default_key_id() -> u16 {
    1
}
fn default_interval() -> u64 {
    500
}
/// Frames come only from scrapes that succeed, so a long timeout never delays death detection:
/// staleness counts from the last frame. A short one makes a busy but healthy vLLM look dead:
/// vLLM answers `/metrics` on the event loop that streams the tokens, and the real CPU build
/// under 40 streams took up to 5 s. Scrapes overlap ([`crate::schedule`]), so a slow answer
/// does not space the frames out; kept under the 10 s eviction window.
pub const DEFAULT_SCRAPE_TIMEOUT_MS: u64 = 8_000;
fn default_timeout() -> u64 {
    DEFAULT_SCRAPE_TIMEOUT_MS
}

/// With answers 5 s late and a scrape every 500 ms, 8 out keeps a frame about every 600 ms.
pub const DEFAULT_MAX_SCRAPES_IN_FLIGHT: usize = 8;
fn default_in_flight() -> usize {
    DEFAULT_MAX_SCRAPES_IN_FLIGHT
}

fn default_max_bytes() -> usize {
    8 << 20
}

impl Config {
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse { path: path.into(), source })
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::from_toml(&text, path)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::http::split_url(&self.metrics_url).map_err(|e| invalid("metrics_url", e.to_string()))?;
        if self.ingest.is_empty() {
            return Err(invalid("ingest", "at least one dnsd ingest address (ip:port) is required"));
        }
        for (key, v) in [("worker_id", &self.worker_id), ("pool", &self.pool)] {
            if v.is_empty() || v.len() > 64 {
                return Err(invalid(key, "must be 1..=64 bytes"));
            }
        }
        if self.models.len() > 8 || self.models.iter().any(|m| m.is_empty() || m.len() > 64) {
            return Err(invalid("models", "at most 8 names of 1..=64 bytes"));
        }
        if !(50..=60_000).contains(&self.interval_ms) {
            return Err(invalid("interval_ms", "must be within 50..=60000"));
        }
        if self.scrape_timeout_ms == 0 || self.scrape_timeout_ms >= gpuha_liveness::EVICTION_WINDOW_MS {
            return Err(invalid("scrape_timeout_ms", "must be > 0 and under the 10000 ms eviction window"));
        }
        if !(1..=64).contains(&self.max_scrapes_in_flight) {
            return Err(invalid("max_scrapes_in_flight", "must be within 1..=64"));
        }
        if self.serve_addr.port() == 0 {
            return Err(invalid("serve_addr", "needs a port"));
        }
        Ok(())
    }

    /// Reads the key file (see [`gpuha_liveness::frame::key_from_file_bytes`]).
    pub fn read_key(&self) -> Result<Vec<u8>, ConfigError> {
        let bytes = std::fs::read(&self.key_file).map_err(|source| ConfigError::Read { path: self.key_file.clone(), source })?;
        gpuha_liveness::frame::key_from_file_bytes(bytes).map_err(|len| {
            invalid("key_file", format!("{} holds {len} bytes; use at least 16 random bytes", self.key_file.display()))
        })
    }
}
