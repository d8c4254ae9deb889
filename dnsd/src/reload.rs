//! Reload without restart, on SIGHUP or `POST /v1/admin/reload`: the config file is read again
//! and, if every part of it is good, its zones, pools, services (`[dns]` less its listen
//! address and timers), frame keys (`[[ingest.keys]]`, files re-read), admin token and the HTTP
//! side's TLS certificate, key and client CA (`[http.tls]`, files re-read: new connections get
//! them, open ones keep theirs) take effect at once. Nothing else can change without a restart: sockets stay bound, the fleet
//! and its counters stay.
//!
//! **All or nothing.** Everything is read, parsed, validated and compiled before anything is
//! swapped in; a bad file, an unreadable key, an invalid zone or a change to a setting that
//! needs a restart refuses the whole reload with an error naming the key, and the running
//! config keeps serving. DNS queries are answered throughout: a query sees the old zones or the
//! new ones ([`crate::dns::DnsService::set_zones`]), and frames signed with a key that stays
//! keep being accepted across the swap.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::dns::Zones;
use crate::state::now_ms;
use crate::Services;

/// Changes a loaded config (the command line's overrides).
pub type Adjust = Arc<dyn Fn(&mut Config) + Send + Sync>;

/// How the running dnsd reloads: its config file, and what its command line changes in it.
#[derive(Clone, Default)]
pub struct ReloadSource {
    /// `None`: started without `--config`, nothing to reload.
    pub config_path: Option<PathBuf>,
    /// The command line's overrides (listen addresses, admin files), applied to every reload
    /// as at start.
    pub adjust: Option<Adjust>,
}

impl std::fmt::Debug for ReloadSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadSource").field("config_path", &self.config_path).finish_non_exhaustive()
    }
}

impl ReloadSource {
    /// The config at `config_path`, adjusted and validated.
    pub fn load(&self) -> Result<Config, ReloadError> {
        let path = self.config_path.as_ref().ok_or(ReloadError::NoConfigFile)?;
        let mut config = Config::load(path)?;
        if let Some(adjust) = &self.adjust {
            adjust(&mut config);
        }
        config.validate()?;
        Ok(config)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("dnsd was started without --config: there is no config file to reload")]
    NoConfigFile,
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Settings a reload cannot change: their key, and their value in a config.
fn fixed(c: &Config) -> Vec<(&'static str, String)> {
    let dns = c.dns.as_ref();
    vec![
        ("ingest.listen", c.ingest.listen.to_string()),
        ("ingest.recv_buffer_bytes", c.ingest.recv_buffer_bytes.to_string()),
        ("ingest.max_skew_ms", c.ingest.max_skew_ms.to_string()),
        ("ingest.forget_after_ms", c.ingest.forget_after_ms.to_string()),
        ("ingest.max_workers", c.ingest.max_workers.to_string()),
        ("http.listen", c.http.listen.to_string()),
        ("http.header_read_timeout_ms", c.http.header_read_timeout_ms.to_string()),
        ("http.max_connections", c.http.max_connections.to_string()),
        ("http.tls", if c.http.tls.is_some() { "present" } else { "absent" }.to_string()),
        ("http.metrics_listen", format!("{:?}", c.http.metrics_listen)),
        ("dns", if dns.is_some() { "present" } else { "absent" }.to_string()),
        ("dns.listen", dns.map(|d| d.listen.to_string()).unwrap_or_default()),
        ("dns.tcp_idle_timeout_ms", dns.map(|d| d.tcp_idle_timeout_ms.to_string()).unwrap_or_default()),
        ("dns.tick_ms", dns.map(|d| d.tick_ms.to_string()).unwrap_or_default()),
        ("admin.state_file", format!("{:?}", c.admin.state_file)),
    ]
}

/// Reloads the config from `services`' source (see the module docs); `trigger` is logged.
/// Returns a one-line summary of what is in force now.
pub fn reload(services: &Services, trigger: &str) -> Result<String, ReloadError> {
    let r = try_reload(services);
    let now = now_ms();
    match &r {
        Ok(summary) => {
            services.reloads_ok.fetch_add(1, Ordering::Relaxed);
            services.last_reload_ok_ms.store(now, Ordering::Relaxed);
            services.last_reload_failed.store(false, Ordering::Relaxed);
            tracing::info!(trigger, "config reloaded: {summary}");
        }
        Err(e) => {
            services.reloads_failed.fetch_add(1, Ordering::Relaxed);
            services.last_reload_failed.store(true, Ordering::Relaxed);
            tracing::error!(trigger, "config reload refused, the running config keeps serving: {e}");
        }
    }
    r
}

fn try_reload(services: &Services) -> Result<String, ReloadError> {
    let next = services.reload_source.load()?;
    let mut running = services.running.lock().unwrap_or_else(|e| e.into_inner());
    for ((key, old), (_, new)) in fixed(&running).into_iter().zip(fixed(&next)) {
        if old != new {
            return Err(ConfigError::invalid(key, format!("changed from {old:?} to {new:?}; this setting takes a restart (nothing was reloaded)")).into());
        }
    }
    // Everything is read and compiled before anything changes.
    let keys = next.key_ring()?;
    let zones = match &next.dns {
        Some(d) => Some(Zones::compile(d)?),
        None => None,
    };
    let token = match &next.admin.token_file {
        Some(p) => Some(crate::admin::read_token(p)?),
        None => None,
    };
    let tls = match &next.http.tls {
        Some(t) => Some(crate::tls::server_config(t)?),
        None => None,
    };
    let summary = format!(
        "{} frame key(s); {}; admin API {}{}",
        next.ingest.keys.len(),
        zones.as_ref().map_or("no DNS".to_string(), |z| format!("{} zone(s), {} pool(s), {} service(s)", z.zones.len(), z.pools.len(), z.services.len())),
        if token.is_some() { "on" } else { "off" },
        next.http.tls.as_ref().map_or(String::new(), |t| format!("; TLS certificate {} and client CA {} re-read", t.cert_file.display(), t.client_ca_file.display())),
    );
    services.state.set_keys(keys);
    if let (Some(dns), Some(zones)) = (&services.dns, zones) {
        dns.set_zones(zones);
    }
    services.admin.set_token(token);
    if let (Some(current), Some(tls)) = (&services.tls, tls) {
        current.set(tls);
    }
    *running = next;
    Ok(summary)
}
