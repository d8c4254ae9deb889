//! The authoritative DNS side of dnsd (hickory-server). Placeholder until the DNS tier lands:
//! the interface below is what `lib.rs` calls.

use std::net::SocketAddr;
use std::sync::Arc;

use serde::Deserialize;

use crate::config::ConfigError;
use crate::state::AppState;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// UDP and TCP address for DNS.
    pub listen: SocketAddr,
}

impl DnsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}

pub struct DnsService {
    _state: Arc<AppState>,
}

impl DnsService {
    pub fn new(_config: &DnsConfig, state: Arc<AppState>) -> Result<Self, ConfigError> {
        Ok(DnsService { _state: state })
    }

    pub fn render_metrics(&self, _out: &mut String, _now_ms: u64) {}

    /// Serves DNS on the given sockets until `shutdown` resolves.
    pub async fn serve(
        self: Arc<Self>,
        _udp: tokio::net::UdpSocket,
        _tcp: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        shutdown.await;
        Ok(())
    }
}
