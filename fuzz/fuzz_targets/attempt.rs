//! The first-token state machine fed events from the input, its body cut into chunks anywhere,
//! driven the way the Envoy glue drives it. Invariants (the module's contract): at most one
//! report (exactly one once done), at most one charge, equal to the report's; a failed attempt
//! leaks no byte to the client; a client that went away never charges a failure; no panic.
#![no_main]

use arbitrary::Arbitrary;
use gpuha_liveness::attempt::{Attempt, AttemptConfig, BodyAction, Charge, Chunk, Ending, HeadersAction, Outcome, Read, Rescue};
use gpuha_liveness::guard::{FailReason, TAIL_PEEK_BYTES};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Event {
    Headers { status: u16, content_type: u8, coding: u8, end: bool },
    /// The next `len` bytes of the body (wrapping), `end` on the upstream's clean end.
    Body { len: u16, end: bool },
    Stalled(bool),
    /// The rescue tick found it unseen by an idle engine and could not move it.
    Unseen,
    Done { client_went_away: bool, timed_out: bool },
}

#[derive(Debug, Arbitrary)]
struct Input {
    path: u8,
    max_held: u16,
    events: Vec<Event>,
    body: Vec<u8>,
}

const PATHS: [&str; 5] = ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/v1/chat/completions?x=1"];
const TYPES: [&str; 4] = ["text/event-stream", "application/json", "text/plain", "text/event-stream; charset=utf-8"];
const CODINGS: [Option<&str>; 3] = [None, Some("gzip"), Some("identity")];

fuzz_target!(|input: Input| {
    let cfg = AttemptConfig { max_held_bytes: usize::from(input.max_held).max(1), retry_status: 503 };
    let mut a = Attempt::new(cfg, PATHS[usize::from(input.path) % PATHS.len()]);
    let mut charges: Vec<Charge> = Vec::new();
    let mut reports = Vec::new();
    let mut client: Vec<u8> = Vec::new();
    let (mut held, mut failed) = (false, false);
    // The tick charged the worker on its engine's evidence, before any ending was known.
    let mut charged_unseen = false;
    let mut pos = 0usize;
    let mut take = |len: u16| -> Vec<u8> {
        if input.body.is_empty() {
            return Vec::new();
        }
        let n = usize::from(len) % (input.body.len() + 1);
        let out: Vec<u8> = input.body.iter().cycle().skip(pos % input.body.len()).take(n).copied().collect();
        pos += n;
        out
    };
    let (mut done, mut headers_seen) = (false, false);
    for ev in input.events.iter().take(64).chain(std::iter::once(&Event::Done { client_went_away: false, timed_out: false })) {
        match ev {
            Event::Headers { status, content_type, coding, end } => {
                headers_seen = true;
                let ct = TYPES[usize::from(*content_type) % TYPES.len()];
                match a.on_response_headers(100 + status % 500, Some(ct), CODINGS[usize::from(*coding) % CODINGS.len()], *end) {
                    HeadersAction::Hold => held = true,
                    HeadersAction::Fail { .. } => failed = true,
                    HeadersAction::Continue { .. } => {}
                }
            }
            // Envoy delivers no body before the headers.
            Event::Body { .. } if !headers_seen => {}
            Event::Body { len, end } => {
                let chunk = take(*len);
                let action = match a.reads() {
                    Read::Nothing => a.on_body(Chunk::Unread, *end),
                    Read::Tail if chunk.len() > TAIL_PEEK_BYTES => match a.on_body(Chunk::Tail(&chunk[chunk.len() - TAIL_PEEK_BYTES..]), *end) {
                        BodyAction::NeedAll => a.on_body(Chunk::All(&chunk), *end),
                        other => other,
                    },
                    Read::Tail | Read::All => a.on_body(Chunk::All(&chunk), *end),
                };
                match action {
                    BodyAction::Pass => client.extend_from_slice(&chunk),
                    BodyAction::NeedAll => panic!("NeedAll after the whole chunk was read"),
                    BodyAction::Hold | BodyAction::Drop => {}
                    BodyAction::Emit(out) => client.extend_from_slice(&out),
                    BodyAction::Fail { .. } => failed = true,
                }
            }
            Event::Stalled(retry) => {
                let r = if *retry { Rescue::RetryNow } else { Rescue::EndStream };
                if a.on_worker_stalled(r).is_some() {
                    failed = true;
                }
            }
            Event::Unseen => {
                if let Some(c) = a.charge_unseen() {
                    charges.push(c);
                    charged_unseen = true;
                }
            }
            Event::Done { client_went_away, timed_out } => {
                if let Some(r) = a.on_done(Ending { client_went_away: *client_went_away, timed_out: *timed_out }) {
                    reports.push(r);
                }
                done = true;
            }
        }
        while let Some(c) = a.take_charge() {
            charges.push(c);
        }
        assert!(reports.len() <= 1, "two reports: {reports:?}");
        assert!(charges.len() <= 1, "two charges: {charges:?}");
    }
    assert!(done);
    assert_eq!(reports.len(), 1, "no report after the end");
    let r = &reports[0];
    if let Some(c) = charges.first() {
        assert_eq!(&r.charge, c, "the report's charge is not the one given");
    }
    if let Outcome::FailedBeforeFirstToken(_) = r.outcome {
        if failed || held {
            assert!(client.is_empty(), "a failed attempt leaked {:?}", String::from_utf8_lossy(&client));
        }
    }
    if matches!(r.outcome, Outcome::ClientCancelled { .. }) && !charged_unseen {
        assert!(!matches!(r.charge, Charge::Failure(_)), "a client that went away charged a failure");
    }
    if charged_unseen {
        assert_eq!(r.charge, Charge::Failure(FailReason::UnseenByEngine), "an unseen charge, then another");
    }
});
