//! The picker (downstream filter): reads `model` and `stream` from the request body (JSON, or
//! a multipart form: `gpuha_liveness::request`, fed a window at a time by [`crate::body`]),
//! picks up to three workers from the fleet view and hands them to the `override_host` load
//! balancer in `x-gpuha-endpoints`; rewrites Envoy's own text/plain error replies into
//! OpenAI-shaped ones.

use std::cell::RefCell;
use std::rc::Rc;

use gpuha_liveness::affinity::{Key, Outcome, Want, DEFAULT_SESSION_HEADER};
use gpuha_liveness::attempt::mark;
use gpuha_liveness::openai_error::{error_response, is_api_shaped};
use gpuha_liveness::blame::{blame, parse_notes};
use gpuha_liveness::pick::{panic_fill, pick_ranked, retries_for, silent_fail_open, stalled_fail_open, Decision};
use gpuha_liveness::request::{RequestFields, Scan};
use gpuha_liveness::slots::{decode_request_notes, request_key, u64_at, encode_u64, SPILL_IN_FLIGHT_KEY};
use gpuha_liveness::tier::{admit_spill, pool_load, TierKind, SPILLED_HEADER, TIER_HEADER};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType};

use crate::body::BodyScan;
use crate::breakers;
use crate::cache::Thread;
use crate::config::{NoWorkerPolicy, PickerConfig};
use crate::flights;
use crate::host;
use crate::stats::{inc, Stats, TierStats};
use crate::{ATTEMPTS_HEADER, ENDPOINTS_HEADER, GUARD_HEADER, MAX_RETRIES_HEADER, PER_TRY_TIMEOUT_HEADER, PROBE_HEADER, REQUEST_KEY_HEADER};

pub struct Picker {
    cfg: Rc<PickerConfig>,
    stats: Stats,
    thread: Rc<RefCell<Thread>>,
    /// The body's scan; `None` for a request without a body.
    body: Option<BodyScan>,
    stream: bool,
    /// Set when the response is one of Envoy's own text/plain errors being rewritten.
    rewrite: Option<u16>,
    /// The request's noted attempt failures were judged (`judge_attempts`).
    judged: bool,
    /// [`REQUEST_KEY_HEADER`]: the key of the request's noted failures.
    request_id: Option<String>,
    /// `:path`: decides which tiers apply.
    path: String,
    /// The request arrived as another router's spill (`x-gpuha-spilled`).
    spilled: bool,
    /// This request holds one unit of the spill budget (released in `on_done`).
    holds_spill: bool,
    tier_served: Rc<TierStats>,
    /// The session header's value (`pick.affinity.session_header`), if any.
    session: Option<String>,
    /// The worker this request is counted in flight on, and since when (ended in `on_done`).
    flight: Option<(String, u64)>,
    /// The request's `content-type` (read with the other request headers).
    content_type: Option<String>,
}

impl Picker {
    pub fn new(cfg: Rc<PickerConfig>, stats: Stats, thread: Rc<RefCell<Thread>>, tier_served: Rc<TierStats>) -> Self {
        Picker { cfg, stats, thread, body: None, stream: false, rewrite: None, judged: false, request_id: None, path: String::new(), spilled: false, holds_spill: false, tier_served, session: None, flight: None, content_type: None }
    }

    /// Writes the request's endpoint list: the picked workers, then the chain's tiers, and how
    /// many retries Envoy makes for it: the list's, then up to `pick.retries_past_list` on the
    /// router's workers the list does not name (`gpuha_liveness::pick::retries_for`): the
    /// cluster's configured workers (`tiers.own_endpoints`) and those of `view`. Not the view's
    /// alone: a dnsd that has just restarted knows only the workers whose frames it has had since,
    /// and a list of its one known worker got no retry at all while the cluster held four more
    /// (the kill soak's 502 after 1 attempt of 3). `false` when the list is empty (nothing was
    /// picked and no tier applies).
    fn list(&self, own: &[String], view: &gpuha_liveness::FleetView) -> bool {
        let listed = self.cfg.tiers.endpoints(own, &self.path, self.spilled);
        if listed.endpoints.is_empty() {
            return false;
        }
        // Both headers were removed at the request's headers, and a request is listed once.
        host::add_request_header(ENDPOINTS_HEADER, &listed.endpoints.join(","));
        let pools = &self.cfg.pick.pools;
        let known = view.workers.iter().filter(|w| !w.drained && (pools.is_empty() || pools.contains(&w.pool))).map(|w| w.addr.as_str());
        let members = self.cfg.tiers.own_endpoints.iter().map(String::as_str).chain(known);
        let retries = retries_for(&listed.endpoints, members, self.cfg.pick.retries_past_list);
        host::add_request_header(MAX_RETRIES_HEADER, &retries.to_string());
        if !host::can_answer_as_upstream() {
            // The guard answers a stalled last attempt that has no headers yet itself on this
            // host, and needs to know it is the last (`ATTEMPTS_HEADER`).
            host::add_request_header(ATTEMPTS_HEADER, &(retries + 1).to_string());
        }
        if listed.spills {
            // The receiving router serves it with its own workers only (no re-spill).
            host::set_request_header(SPILLED_HEADER, Some(&self.cfg.tiers.own));
        }
        true
    }

    /// No pick (no fresh view): the router's own workers round robin, then the chain. Without
    /// configured own workers (membership over EDS), those of `view`, the last one fetched.
    fn fail_open(&self, view: Option<&gpuha_liveness::FleetView>) {
        let known;
        let own = if self.cfg.tiers.own_endpoints.is_empty() && !self.cfg.tiers.tiers.is_empty() {
            known = view.map(|v| gpuha_liveness::tier::own_of_view(v, &self.cfg.pick.pools)).unwrap_or_default();
            &known
        } else {
            &self.cfg.tiers.own_endpoints
        };
        let start = self.thread.borrow_mut().rng.below(own.len().max(1));
        let listed = self.cfg.tiers.fail_open_over(own, start, self.cfg.pick.max_endpoints, &self.path, self.spilled);
        if !listed.endpoints.is_empty() {
            host::set_request_header(ENDPOINTS_HEADER, Some(&listed.endpoints.join(",")));
            if listed.spills {
                host::set_request_header(SPILLED_HEADER, Some(&self.cfg.tiers.own));
            }
        }
    }

    /// A spilled request: admitted while this pool's spill budget allows (`gpuha_liveness::tier`).
    /// `Err(message)` when refused.
    fn admit_spilled(&mut self, view: &gpuha_liveness::FleetView, vouched: u64, now: u64) -> Result<(), &'static str> {
        let load = pool_load(view, &self.cfg.pick.pools, vouched, now, self.cfg.pick.freshness_gate_ms);
        let budget = self.cfg.spill_budget;
        let admitted = host::shared_update(SPILL_IN_FLIGHT_KEY, |cur| {
            let n = u64_at(cur, 0);
            Some(match admit_spill(n, load, &budget) {
                Ok(()) => (encode_u64(n + 1), Ok(())),
                Err(r) => (encode_u64(n), Err(r)),
            })
        });
        match admitted {
            Some(Ok(())) => {
                self.holds_spill = true;
                inc(self.stats.spill_received);
                Ok(())
            }
            Some(Err(r)) => {
                inc(self.stats.spill_refused);
                Err(r.message())
            }
            // Shared data failed: fail open (admitted, uncounted).
            None => Ok(()),
        }
    }

    fn reply_error(&self, status: u16, message: &str, retry_after: Option<u32>) {
        let r = error_response(status, message, self.stream, Some(self.cfg.stream_error_status), retry_after);
        host::send_response(r.status, &r.headers, &r.body);
    }

    fn decide(&mut self, fields: RequestFields) -> Action {
        self.stream = fields.stream;
        if !self.stream && self.cfg.non_stream_timeout_ms > 0 {
            // Its headers come with the whole answer: the route's time-to-first-token budget
            // would cut a healthy long generation (see `non_stream_timeout_ms`). Any value the
            // client sent was removed at the request's headers.
            host::add_request_header(PER_TRY_TIMEOUT_HEADER, &self.cfg.non_stream_timeout_ms.to_string());
        }
        let model = fields.model;
        let now = host::now_ms();
        let Some((version, fetched, view)) = self.thread.borrow_mut().fleet() else {
            inc(self.stats.fail_open);
            host::debug("gpuha: no fleet view yet: fail open");
            self.fail_open(None);
            return Action::Continue;
        };
        if self.spilled && !gpuha_liveness::pick::view_stale(fetched, now, &self.cfg.pick) {
            if let Err(why) = self.admit_spilled(&view, fetched, now) {
                // The sending router takes this 503 to its next tier at once.
                self.reply_error(503, &format!("Spilled request refused: {why}."), Some(self.cfg.retry_after_s));
                return Action::Pause;
            }
        }
        let key = Key::choose(&self.cfg.pick.affinity, self.session.as_deref(), fields.user.as_deref(), fields.prefix);
        let placed = key.and_then(|k| flights::placement(k.hash, &self.cfg.pick.affinity, now));
        let want = key.map(|k| Want { key: k.hash, placed: placed.map(|p| p.addr_hash) });
        let load = flights::shared_load(now, self.cfg.pick.in_flight_max_age_ms);
        let bcfg = self.cfg.breaker;
        let not_closed = breakers::not_closed();
        let not_closed: Vec<&str> = not_closed.iter().map(String::as_str).collect();
        let (decision, affine) = {
            let mut t = self.thread.borrow_mut();
            let t = &mut *t;
            let ranked = t.ranked(version, &view, &self.cfg.pick);
            let (d, affine) = pick_ranked(&ranked, &view, fetched, now, model.as_deref(), want, &load, &mut t.rng, &self.cfg.pick, &not_closed, |a| breakers::admission(a, now, &bcfg), |a| breakers::claim_probe(a, now, &bcfg));
            self.count_affinity(key, affine);
            let (d, panic) = panic_fill(d, &ranked, &view, fetched, now, model.as_deref(), &load, &self.cfg.pick, &not_closed, |a| breakers::denied_trips(a, now, &bcfg));
            if panic {
                inc(self.stats.panic_picks);
            }
            if let Some(open) = stalled_fail_open(&d, &view, model.as_deref(), &self.cfg.pick) {
                inc(self.stats.stalled_fail_open);
                (open, Outcome::None)
            } else if let Some(open) = self.silent_fail_open(&d, &view, model.as_deref(), &mut t.rng) {
                inc(self.stats.silent_fail_open);
                (open, Outcome::None)
            } else {
                (d, affine)
            }
        };
        match decision {
            Decision::Endpoints { endpoints, probe } => {
                self.count_lora(&view, fetched, now, model.as_deref(), endpoints.first().map(String::as_str));
                self.list(&endpoints, &view);
                if let Some(p) = &probe {
                    host::set_request_header(PROBE_HEADER, Some(p));
                    inc(self.stats.probes);
                }
                if let Some(first) = endpoints.first() {
                    flights::start(&load, first);
                    self.flight = Some((first.clone(), now));
                    if let (Some(k), false) = (key, affine == Outcome::None) {
                        flights::place(k.hash, first, placed, &self.cfg.pick.affinity, now);
                    }
                }
                inc(self.stats.picks);
                Action::Continue
            }
            Decision::Stale => {
                inc(self.stats.fail_open);
                self.fail_open(Some(&view));
                Action::Continue
            }
            Decision::UnknownModel => {
                // The own workers answer 404 for a model nobody serves: no tier is tried.
                inc(self.stats.fail_open);
                Action::Continue
            }
            Decision::NoWorker { fresh, serving } => {
                inc(self.stats.no_worker);
                if self.list(&[], &view) {
                    // No own worker: the chain's tiers alone.
                    return Action::Continue;
                }
                if self.cfg.no_worker == NoWorkerPolicy::FailOpen {
                    return Action::Continue;
                }
                let m = model.as_deref().unwrap_or("(none)");
                let msg = format!("No worker can serve model '{m}' right now ({serving} known, {fresh} fresh, none with a closed circuit). Please retry.");
                self.reply_error(503, &msg, Some(self.cfg.retry_after_s));
                Action::Pause
            }
        }
    }
}

impl Picker {
    /// [`silent_fail_open`] where the picker would otherwise answer its own 503: not for a
    /// request with a fallback tier to go to (the chain is the designed answer to own workers
    /// gone dark), nor for one spilled here from another router (the 503 takes it to the
    /// sender's next tier at once), nor under `no_worker: "fail_open"` (Envoy's load balancing
    /// serves it already).
    fn silent_fail_open(&self, d: &Decision, view: &gpuha_liveness::FleetView, model: Option<&str>, rng: &mut gpuha_liveness::pick::Rng) -> Option<Decision> {
        if !matches!(d, Decision::NoWorker { fresh: 0, .. }) || self.spilled || self.cfg.no_worker == NoWorkerPolicy::FailOpen {
            return None;
        }
        if !self.cfg.tiers.endpoints(&[], &self.path, self.spilled).endpoints.is_empty() {
            return None;
        }
        silent_fail_open(d, view, model, rng, &self.cfg.pick)
    }

    fn count_lora(&self, view: &gpuha_liveness::FleetView, fetched: u64, now: u64, model: Option<&str>, first: Option<&str>) {
        match gpuha_liveness::pick::lora_outcome(view, fetched, now, model, first, &self.cfg.pick) {
            gpuha_liveness::lora::Outcome::Hit => inc(self.stats.lora_hits),
            gpuha_liveness::lora::Outcome::Miss => inc(self.stats.lora_misses),
            gpuha_liveness::lora::Outcome::None => {}
        }
    }

    fn count_affinity(&self, key: Option<Key>, outcome: Outcome) {
        if key.is_none() {
            return;
        }
        inc(self.stats.affinity_keyed);
        match outcome {
            Outcome::Hit => inc(self.stats.affinity_hits),
            Outcome::Spill => inc(self.stats.affinity_spills),
            Outcome::Placed => inc(self.stats.affinity_placed),
            Outcome::None => {}
        }
    }

    /// The request's answer is known (`served`: not a 5xx): the failures its attempts noted are
    /// charged to their workers, unless the failure followed the request (`gpuha_liveness::blame`).
    fn judge_attempts(&mut self, served: bool) {
        if self.judged {
            return;
        }
        self.judged = true;
        let Some(id) = self.request_id.take() else { return };
        let key = request_key(&id);
        let Some(notes) = host::shared_get(&key).0.and_then(|b| decode_request_notes(&b, &id).map(str::to_string)) else { return };
        // Done with the slot: empty it, unless another request took it meanwhile.
        host::shared_update(&key, |cur| cur.and_then(|b| decode_request_notes(b, &id)).map(|_| (Vec::new(), ())));
        let b = blame(parse_notes(&notes), served);
        if b.follows_request {
            inc(self.stats.request_failures);
            host::debug(&format!("gpuha: the request failed the same way on every worker it tried: {notes}"));
        }
        let now = host::now_ms();
        for n in b.charged {
            breakers::record(&n.addr, n.probe, Some((&n.reason, false)), now, &self.cfg.breaker, &self.stats);
        }
    }
}

impl Picker {
    /// Marks an answer with the tier that served it, and counts it.
    fn mark_tier(&self, status: u16) {
        if status >= 500 {
            return;
        }
        let Some(addr) = host::property_string(&["upstream", "address"]) else { return };
        let chain = &self.cfg.tiers;
        let name = chain.served_by(&addr);
        host::set_response_header(TIER_HEADER, Some(name));
        self.tier_served.inc(name);
        match chain.tier_of(&addr).map(|t| t.kind) {
            Some(TierKind::Spill) => inc(self.stats.spilled),
            Some(TierKind::Degraded) => inc(self.stats.degraded),
            Some(TierKind::Provider) => inc(self.stats.provider_served),
            None => {}
        }
    }

    /// The guard rescued the request's last attempt (`mark::RESCUED`): answers the client now
    /// with the retryable status and an OpenAI-shaped JSON error, in place of a body the stalled
    /// worker never sends (the client would otherwise wait for it until its own timeout). Fails
    /// open: if Envoy refuses the reply, the answer goes on as it is.
    fn answer_rescued(&mut self, status: u16) -> Action {
        let msg = "The worker stopped before the first token and no other attempt was left. Please retry.";
        let mut r = error_response(status, msg, false, None, Some(self.cfg.retry_after_s));
        r.headers.push((GUARD_HEADER.to_string(), mark::RESCUED.to_string()));
        if host::send_response(r.status, &r.headers, &r.body) {
            inc(self.stats.local_replies_rewritten);
            return Action::Pause;
        }
        host::skip_response_body();
        Action::Continue
    }
}

impl Context for Picker {
    fn on_done(&mut self) -> bool {
        if let Some((addr, started)) = self.flight.take() {
            flights::end(&addr, started, host::now_ms(), self.cfg.pick.in_flight_max_age_ms);
        }
        if std::mem::take(&mut self.holds_spill) {
            host::shared_update(SPILL_IN_FLIGHT_KEY, |cur| Some((encode_u64(u64_at(cur, 0).saturating_sub(1)), ())));
        }
        // No answer reached the client (it went away, or Envoy reset the stream).
        self.judge_attempts(false);
        true
    }
}

/// `v` as 16 lowercase hex digits (a request key: without the formatting machinery).
fn hex16(v: u64) -> String {
    (0..16).rev().map(|i| char::from(b"0123456789abcdef"[(v >> (4 * i) & 0xf) as usize])).collect()
}

impl HttpContext for Picker {
    fn on_http_request_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        // One host call for every header read here (not one per header).
        const NAMES: &[&str] = &[ENDPOINTS_HEADER, PROBE_HEADER, MAX_RETRIES_HEADER, REQUEST_KEY_HEADER, PER_TRY_TIMEOUT_HEADER, ":path", SPILLED_HEADER, "content-type", DEFAULT_SESSION_HEADER, ATTEMPTS_HEADER];
        // `ATTEMPTS_HEADER` only where the guard reads it (a host that cannot answer for the worker).
        let attempts = !host::can_answer_as_upstream();
        let h = host::Headers::read(MapType::HttpRequestHeaders, if attempts { NAMES } else { &NAMES[..NAMES.len() - 1] });
        // Clients must not steer the load balancer or claim probes. Nor set the retry count or
        // the per-try budget: the picker sets them, else the route's apply. (Envoy's HCM already
        // strips them from requests it does not count as internal.) Nor name the request's notes,
        // nor tell the guard how many attempts it has.
        let strip = (0..5).chain(attempts.then_some(NAMES.len() - 1));
        for i in strip {
            if h.has(i) {
                host::set_request_header(NAMES[i], None);
            }
        }
        let [path, spilled, content_type, session] = [5, 6, 7, 8];
        self.path = h.get(path).unwrap_or_default();
        self.spilled = h.has(spilled);
        self.content_type = h.get(content_type);
        let a = &self.cfg.pick.affinity;
        if a.enabled && !a.session_header.is_empty() {
            // An absent header costs Envoy's lookup most (it searches the whole map): the
            // default name is read with the others.
            self.session = if a.session_header == DEFAULT_SESSION_HEADER { h.get(session) } else { h.get_other(&a.session_header) };
        }
        // The key of the request's noted failures (`judge_attempts`); any the client sent is
        // gone (above), so adding it costs Envoy less than setting it.
        let key = hex16(self.thread.borrow_mut().rng.next_u64());
        host::add_request_header(REQUEST_KEY_HEADER, &key);
        self.request_id = Some(key);
        if end_of_stream {
            // No body (GET /v1/models, health checks): no pick, Envoy's fallback LB decides.
            return Action::Continue;
        }
        // Hold the headers: the pick needs the body (needs allow_on_headers_stop_iteration).
        Action::Pause
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if size > self.cfg.max_body_bytes {
            // Envoy's own buffer limits sit above this (render.py sets both), so this
            // OpenAI-shaped 413 answers first.
            inc(self.stats.body_too_large);
            self.reply_error(413, &too_large_message(self.cfg.max_body_bytes), None);
            return Action::Pause;
        }
        // Scan what has arrived so far while the rest uploads; Envoy buffers the body anyway
        // (the router needs all of it to retry).
        let affinity = &self.cfg.pick.affinity;
        let content_type = self.content_type.as_deref();
        let body = self.body.get_or_insert_with(|| BodyScan::for_picker(affinity, content_type));
        let scan = body.advance(size, end_of_stream).clone();
        if !end_of_stream {
            return Action::Pause;
        }
        match scan {
            Scan::Done(fields) => self.decide(fields),
            Scan::Invalid(why) => {
                // Not a body we can read: no pick; the worker answers its own 400.
                host::debug(&format!("gpuha: request body not scanned ({why}): fail open"));
                inc(self.stats.fail_open);
                Action::Continue
            }
            Scan::Incomplete => Action::Continue, // not after `advance(.., true)`
        }
    }

    fn on_http_response_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        // One header read here, mostly: a read by name of one or two costs more (measured).
        let status = host::status();
        self.judge_attempts(status.is_some_and(|s| s < 500));
        if let Some(s) = status {
            self.mark_tier(s);
        }
        if let Some(s) = status.filter(|s| *s >= 500) {
            // Read on a 5xx only: the guard's rescue of an attempt on a worker that shows no sign
            // of life reached the client, so no attempt was left, and it has no body (it ends
            // here, or it never comes: held headers).
            if host::response_header(GUARD_HEADER).as_deref() == Some(mark::RESCUED) {
                return self.answer_rescued(s);
            }
        }
        let rewrite = self.cfg.rewrite_local_replies && !end_of_stream && status.is_some_and(|s| s >= 400) && !is_api_shaped(host::response_header("content-type").as_deref());
        let Some(status) = status.filter(|_| rewrite) else {
            // Only a rewritten local reply needs the response body here.
            host::skip_response_body();
            return Action::Continue;
        };
        // Envoy's own error (no healthy upstream, reset before headers, timeout, 413...):
        // text/plain. Rewrite it once the body (Envoy's details) is complete.
        self.rewrite = Some(status);
        host::set_response_header("content-length", None);
        // Hold the headers too: content type and `retry-after` change with the body.
        Action::Pause
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let Some(status) = self.rewrite else { return Action::Continue };
        if !end_of_stream {
            return Action::Pause;
        }
        let details = String::from_utf8_lossy(&host::body(BufferType::HttpResponseBody, size)).trim().to_string();
        let msg = match status {
            // Envoy's own 413: a body above its buffer limit (render.py keeps that limit above
            // the picker's, so this comes only from a hand-made config).
            413 => too_large_message(self.cfg.max_body_bytes),
            503 => format!("No worker could serve the request ({details}). Please retry."),
            504 => format!("The worker did not start answering in time ({details}). Please retry."),
            _ => format!("The request failed at the gateway ({details})."),
        };
        let retry_after = matches!(status, 429 | 502 | 503 | 504).then_some(self.cfg.retry_after_s);
        let r = error_response(status, &msg, self.stream, None, retry_after);
        for (k, v) in &r.headers {
            host::set_response_header(k, Some(v));
        }
        host::set_response_header("x-gpuha-rewritten", Some("1"));
        host::set_body(BufferType::HttpResponseBody, size, &r.body);
        inc(self.stats.local_replies_rewritten);
        Action::Continue
    }
}


/// The 413 message: the limit, and how the operator raises it.
pub fn too_large_message(max_body_bytes: usize) -> String {
    format!(
        "Request body is larger than this gateway's limit of {max_body_bytes} bytes ({:.1} MiB). The operator can raise it with `envoy/render.py --max-body-bytes N`, which sets the picker's max_body_bytes and Envoy's buffer limits together.",
        max_body_bytes as f64 / 1_048_576.0
    )
}
