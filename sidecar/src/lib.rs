//! The sidecar beside an unmodified vLLM: scrape `/metrics`, map vLLM's metric names to the
//! frame's raw numbers, sign, send one UDP frame per scrape to every ingest address.
//!
//! It asserts nothing. When a scrape fails (vLLM dead, hung, or serving garbage) it sends
//! nothing, and silence is what the receivers read as death. Scrapes overlap when vLLM answers
//! slowly (a busy API server is not a dead one): see [`schedule`].

pub mod config;
pub mod http;
pub mod lora;
pub mod schedule;
pub mod scrape;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gpuha_liveness::Frame;

pub use config::{Config, ConfigError};

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Why one scrape produced no frame.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeFailed {
    #[error("fetching metrics: {0}")]
    Http(#[from] http::HttpError),
    #[error("parsing metrics: {0}")]
    Parse(#[from] scrape::ParseError),
    #[error("encoding frame: {0}")]
    Encode(#[from] gpuha_liveness::FrameError),
    #[error("cannot start a scrape thread: {0}")]
    Spawn(std::io::Error),
}

/// One sidecar: its identity, key and sequence.
pub struct Sidecar {
    config: Config,
    key: Vec<u8>,
    boot_id: u64,
    seq: u64,
    /// Metrics of the last scrape whose sum was saturated (see [`scrape`]).
    saturated: Vec<&'static str>,
    /// Saturated metrics over the sidecar's life, so an operator can see it keeps happening.
    saturated_total: u64,
    /// Adapter names left out of frames over the sidecar's life: too long or too many on the
    /// page, or no room left in the frame ([`Frame::fit_adapters`]).
    adapters_dropped_total: u64,
    /// Answers dropped because a later scrape had already answered ([`schedule::Answer::Overtaken`]).
    overtaken_total: u64,
}

impl Sidecar {
    pub fn new(config: Config, key: Vec<u8>, boot_id: u64) -> Self {
        Sidecar { config, key, boot_id, seq: 0, saturated: Vec::new(), saturated_total: 0, adapters_dropped_total: 0, overtaken_total: 0 }
    }

    /// Scrape answers dropped so far because a later scrape had already answered.
    pub fn overtaken_total(&self) -> u64 {
        self.overtaken_total
    }

    /// Adapter names left out of frames so far (see [`Sidecar::scrape`]).
    pub fn adapters_dropped_total(&self) -> u64 {
        self.adapters_dropped_total
    }

    /// vLLM names saturated in the last scrape's frame.
    pub fn saturated(&self) -> &[&'static str] {
        &self.saturated
    }

    /// Saturated metrics counted over all scrapes.
    pub fn saturated_total(&self) -> u64 {
        self.saturated_total
    }

    pub fn boot_id(&self) -> u64 {
        self.boot_id
    }

    /// Scrapes once and builds the next frame (the sequence advances only on success).
    pub fn scrape(&mut self) -> Result<Frame, ScrapeFailed> {
        let body = fetch(&self.config)?;
        self.frame_from(&body)
    }

    /// The next frame from one scrape's answer (the lines [`scrape::wanted_line`] kept), stamped
    /// now: the numbers are vLLM's when it answered, however long the answer took to come.
    pub fn frame_from(&mut self, body: &str) -> Result<Frame, ScrapeFailed> {
        let scraped = scrape::parse(body)?;
        self.saturated_total += scraped.saturated.len() as u64;
        self.saturated = scraped.saturated;
        let models = if self.config.models.is_empty() { scraped.models } else { self.config.models.clone() };
        let now = now_ms();
        let adapters = lora::loaded(scraped.lora.as_ref());
        self.seq += 1;
        let mut frame = Frame {
            key_id: self.config.key_id,
            boot_id: self.boot_id,
            seq: self.seq,
            sent_ms: now,
            worker_id: self.config.worker_id.clone(),
            pool_id: self.config.pool.clone(),
            addr: self.config.serve_addr,
            models,
            adapters,
            metrics: scraped.metrics,
        };
        let dropped = scraped.lora.as_ref().map_or(0, |l| l.dropped) + frame.fit_adapters();
        self.adapters_dropped_total += dropped as u64;
        Ok(frame)
    }

    pub fn encode(&self, frame: &Frame) -> Result<Vec<u8>, ScrapeFailed> {
        Ok(frame.encode(&self.key)?)
    }

    /// Runs until the process ends: scrape, sign, send, every `interval_ms`.
    pub fn run(self, on_event: impl FnMut(Event<'_>)) -> std::io::Result<()> {
        let (_keep, never) = std::sync::mpsc::channel::<()>();
        self.run_until(never, on_event)
    }

    /// Scrape, sign, send, every `interval_ms`, until `shutdown` receives a message or its
    /// sender is dropped. Up to `max_scrapes_in_flight` scrapes overlap while vLLM is slow to
    /// answer ([`schedule`]); each runs on its own thread, and one still out at the shutdown is
    /// left to end at its timeout (it sends nothing).
    pub fn run_until(mut self, shutdown: std::sync::mpsc::Receiver<()>, mut on_event: impl FnMut(Event<'_>)) -> std::io::Result<()> {
        use std::sync::mpsc::RecvTimeoutError;
        let sockets = Senders::new(&self.config.ingest)?;
        let (tx, rx) = std::sync::mpsc::channel::<Msg>();
        let mut sched = schedule::Schedule::new(Instant::now(), Duration::from_millis(self.config.interval_ms), self.config.max_scrapes_in_flight);
        let stop = tx.clone();
        std::thread::Builder::new().name("shutdown".into()).stack_size(SCRAPE_STACK).spawn(move || {
            let _ = shutdown.recv(); // a message, or the sender dropped: stop either way
            let _ = stop.send(Msg::Stop);
        })?;
        loop {
            let now = Instant::now();
            if let Some(ticket) = sched.start(now) {
                if let Err(e) = self.spawn_scrape(ticket, tx.clone()) {
                    sched.answered(ticket, false);
                    on_event(Event::Skipped(&ScrapeFailed::Spawn(e)));
                }
            }
            let msg = match sched.wait(now) {
                Some(d) => rx.recv_timeout(d),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match msg {
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return Ok(()),
                Err(RecvTimeoutError::Timeout) => {}
                Ok(Msg::Answer { ticket, body }) => {
                    let framed = match sched.answered(ticket, body.is_ok()) {
                        schedule::Answer::Overtaken => Ok(None),
                        _ => body.map_err(ScrapeFailed::from).and_then(|b| {
                            let f = self.frame_from(&b)?;
                            Ok(Some((self.encode(&f)?, f)))
                        }),
                    };
                    match framed {
                        Ok(Some((bytes, frame))) => {
                            let errors = sockets.send(&bytes);
                            on_event(Event::Sent { frame: &frame, bytes: bytes.len(), send_errors: errors, saturated: &self.saturated, saturated_total: self.saturated_total });
                        }
                        Ok(None) => {
                            self.overtaken_total += 1;
                            on_event(Event::Overtaken { overtaken_total: self.overtaken_total });
                        }
                        Err(e) => on_event(Event::Skipped(&e)),
                    }
                }
            }
        }
    }

    /// Starts scrape `ticket` on its own thread; its answer comes back on `tx`.
    fn spawn_scrape(&self, ticket: u64, tx: std::sync::mpsc::Sender<Msg>) -> std::io::Result<()> {
        let config = self.config.clone();
        std::thread::Builder::new().name(format!("scrape-{ticket}")).stack_size(SCRAPE_STACK).spawn(move || {
            let _ = tx.send(Msg::Answer { ticket, body: fetch(&config) });
        })?;
        Ok(())
    }
}

/// Stack of a scrape thread: it reads a socket and keeps the wanted lines (on the heap).
const SCRAPE_STACK: usize = 256 << 10;

/// What reaches the sending loop.
enum Msg {
    Answer { ticket: u64, body: Result<String, http::HttpError> },
    Stop,
}

/// One GET of vLLM's `/metrics`, keeping only the lines the mapping reads.
fn fetch(config: &Config) -> Result<String, http::HttpError> {
    http::get_lines(&config.metrics_url, Duration::from_millis(config.scrape_timeout_ms), config.max_metrics_bytes, scrape::wanted_line)
}

/// What happened on one tick, for logging.
pub enum Event<'a> {
    /// `saturated`: vLLM names whose value left the range of `f64` and was sent saturated;
    /// `saturated_total`: how many such metrics since the start.
    Sent { frame: &'a Frame, bytes: usize, send_errors: usize, saturated: &'a [&'static str], saturated_total: u64 },
    Skipped(&'a ScrapeFailed),
    /// A scrape answered after a later one had: its older numbers were not sent.
    Overtaken { overtaken_total: u64 },
}

/// One UDP socket per address family, sending to every ingest address.
struct Senders {
    v4: Option<UdpSocket>,
    v6: Option<UdpSocket>,
    targets: Vec<SocketAddr>,
}

impl Senders {
    fn new(targets: &[SocketAddr]) -> std::io::Result<Self> {
        let v4 = if targets.iter().any(|a| a.is_ipv4()) { Some(UdpSocket::bind("0.0.0.0:0")?) } else { None };
        let v6 = if targets.iter().any(|a| a.is_ipv6()) { Some(UdpSocket::bind("[::]:0")?) } else { None };
        Ok(Senders { v4, v6, targets: targets.to_vec() })
    }

    /// Sends to every target; returns how many sends failed (a receiver down is not our error).
    fn send(&self, bytes: &[u8]) -> usize {
        self.targets
            .iter()
            .filter(|t| {
                let sock = if t.is_ipv4() { &self.v4 } else { &self.v6 };
                sock.as_ref().is_none_or(|s| s.send_to(bytes, t).is_err())
            })
            .count()
    }
}

/// The sidecar's entry point, as `gpuha-sidecar` runs it (and tests drive it, on port 0): reads
/// the key named by `config`, picks a random boot id, and sends frames until `shutdown` receives
/// a message or its sender is dropped. Returns the boot id it used.
pub fn run(config: Config, shutdown: std::sync::mpsc::Receiver<()>, on_event: impl FnMut(Event<'_>)) -> Result<u64, RunError> {
    config.validate().map_err(|e| RunError::Config(e.to_string()))?;
    let key = config.read_key().map_err(|e| RunError::Config(e.to_string()))?;
    let boot_id: u64 = rand::random();
    Sidecar::new(config, key, boot_id).run_until(shutdown, on_event).map_err(RunError::Io)?;
    Ok(boot_id)
}

/// Why [`run`] stopped before its shutdown.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Config(String),
    #[error("cannot open the sending sockets: {0}")]
    Io(std::io::Error),
}
