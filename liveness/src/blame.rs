//! Who is blamed for a request's failed attempts: a failure that follows the request — it fails
//! the same way on every worker it tries (a malformed or unservable request, a prompt too long
//! for the time-to-first-token budget everywhere) — says nothing about the workers and must not
//! open their circuits, or one bad client could black-hole a healthy fleet.
//!
//! An attempt alone cannot tell: only the request's end shows whether another worker served it.
//! So the guard notes the failures that may follow the request ([`FailReason::may_follow_request`])
//! in the request's shared-data slot (`crate::slots::request_key`, keyed by Envoy's
//! `x-request-id`), and the picker decides once, when the request's answer starts ([`blame`]):
//!
//! * the request was served (by a later attempt): every noted worker failed where another did
//!   not: each is charged;
//! * it failed, and two or more workers failed it with the same reason: the failure follows the
//!   request: nobody is charged (counted as `request_failures`);
//! * otherwise each noted worker is charged.
//!
//! Connection-level failures (a reset or a refused connection) are charged at once by the guard:
//! they are about the worker, and the freshness gate and the breaker need them quickly.

use crate::guard::FailReason;

/// Entries kept at most (a request has a handful of attempts).
const MAX_NOTES: usize = 8;

impl FailReason {
    /// Whether this failure may be the request's own doing, to be judged at the request's end.
    pub fn may_follow_request(&self) -> bool {
        !matches!(self, FailReason::ResetBeforeHeaders | FailReason::ResetBeforeFirstToken | FailReason::WorkerStalled | FailReason::UnseenByEngine)
    }
}

/// One noted failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub addr: String,
    pub probe: bool,
    pub reason: String,
}

/// The reason as it is noted: printable ASCII, no separators, bounded.
fn header_safe(s: &str) -> String {
    s.chars().take(60).map(|c| if c.is_ascii_graphic() && c != ',' && c != '|' || c == ' ' { c } else { '_' }).collect()
}

/// The notes (`addr|p|reason` entries, `p` = `1` when the attempt carried the worker's
/// half-open probe, comma-separated) with one more.
pub fn add_note(existing: Option<&str>, addr: &str, probe: bool, reason: &FailReason) -> String {
    let mut notes = parse_notes(existing.unwrap_or_default());
    if notes.len() < MAX_NOTES {
        notes.push(Note { addr: header_safe(addr), probe, reason: header_safe(&reason.label()) });
    }
    notes.iter().map(|n| format!("{}|{}|{}", n.addr, u8::from(n.probe), n.reason)).collect::<Vec<_>>().join(",")
}

/// The notes in a value; malformed entries are skipped.
pub fn parse_notes(v: &str) -> Vec<Note> {
    v.split(',')
        .filter_map(|e| {
            let mut it = e.splitn(3, '|');
            let addr = it.next()?.trim();
            let probe = it.next()? == "1";
            let reason = it.next()?;
            (!addr.is_empty()).then(|| Note { addr: addr.to_string(), probe, reason: reason.to_string() })
        })
        .take(MAX_NOTES)
        .collect()
}

/// The request's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blame {
    /// Notes whose worker is charged with a failure.
    pub charged: Vec<Note>,
    /// The failure followed the request: nobody charged.
    pub follows_request: bool,
}

/// Decides who is charged, given the notes and whether the request was served (its answer is
/// not a 5xx).
pub fn blame(notes: Vec<Note>, served: bool) -> Blame {
    let same = notes.len() >= 2 && notes.iter().all(|n| n.reason == notes[0].reason) && {
        let mut addrs: Vec<&str> = notes.iter().map(|n| n.addr.as_str()).collect();
        addrs.sort_unstable();
        addrs.dedup();
        addrs.len() >= 2
    };
    if !served && same {
        return Blame { charged: Vec::new(), follows_request: true };
    }
    Blame { charged: notes, follows_request: false }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dead() -> FailReason {
        FailReason::SseError("EngineCore encountered an issue.".into())
    }

    #[test]
    fn round_trip_and_hostile_values() {
        let h = add_note(None, "10.0.0.5:8000", false, &dead());
        let h = add_note(Some(&h), "10.0.0.6:8000", true, &FailReason::Status(500));
        let n = parse_notes(&h);
        assert_eq!(n.len(), 2);
        assert_eq!(n[1], Note { addr: "10.0.0.6:8000".into(), probe: true, reason: "status_500".into() });
        assert_eq!(n[0].reason, "sse_error: EngineCore encountered an issue.");
        // A message with separators cannot forge entries.
        let h = add_note(None, "a:1", false, &FailReason::SseError("x,b:2|1|y\r\n".into()));
        assert_eq!(parse_notes(&h).len(), 1);
        assert!(parse_notes("garbage,,|||,a").is_empty());
        let mut h = String::new();
        for i in 0..20 {
            h = add_note(Some(&h), &format!("w:{i}"), false, &dead());
        }
        assert_eq!(parse_notes(&h).len(), MAX_NOTES);
    }

    #[test]
    fn served_charges_every_noted_worker() {
        let notes = parse_notes(&add_note(None, "a:1", false, &dead()));
        assert_eq!(blame(notes.clone(), true), Blame { charged: notes, follows_request: false });
    }

    #[test]
    fn same_failure_everywhere_follows_the_request() {
        let h = add_note(None, "a:1", false, &dead());
        let h = add_note(Some(&h), "b:1", false, &dead());
        let h = add_note(Some(&h), "c:1", false, &dead());
        assert_eq!(blame(parse_notes(&h), false), Blame { charged: vec![], follows_request: true });
        // ... unless the request was served after all.
        assert_eq!(blame(parse_notes(&h), true).charged.len(), 3);
        // Different reasons: each worker failed its own way.
        let h2 = add_note(Some(&h), "d:1", false, &FailReason::Status(503));
        assert_eq!(blame(parse_notes(&h2), false).charged.len(), 4);
        // One worker twice is not "every worker it tries".
        let h3 = add_note(Some(&add_note(None, "a:1", false, &dead())), "a:1", false, &dead());
        assert_eq!(blame(parse_notes(&h3), false).charged.len(), 2);
        // A single failure is the worker's.
        assert_eq!(blame(parse_notes(&add_note(None, "a:1", false, &dead())), false).charged.len(), 1);
    }

    #[test]
    fn connection_failures_are_charged_at_once() {
        assert!(!FailReason::ResetBeforeHeaders.may_follow_request());
        assert!(!FailReason::ResetBeforeFirstToken.may_follow_request());
        assert!(FailReason::Timeout.may_follow_request());
        assert!(FailReason::Status(500).may_follow_request());
        assert!(FailReason::EndedWithoutOutput.may_follow_request());
    }

    proptest! {
        /// Whatever the notes: a served request charges every noted worker; a failed one
        /// charges all of them or none; parsing never panics.
        #[test]
        fn all_or_nothing(reasons in proptest::collection::vec(0usize..3, 0..6), addrs in proptest::collection::vec(0usize..3, 0..6), served: bool, junk in ".{0,40}") {
            let rs = [dead(), FailReason::Status(500), FailReason::Timeout];
            let mut h = junk.clone();
            let _ = parse_notes(&h);
            h.clear();
            for (r, a) in reasons.iter().zip(&addrs) {
                h = add_note(Some(&h), &format!("w:{a}"), false, &rs[*r]);
            }
            let notes = parse_notes(&h);
            let n = notes.len();
            let b = blame(notes, served);
            if served {
                prop_assert_eq!(b.charged.len(), n);
            } else {
                prop_assert!(b.charged.len() == n || (b.charged.is_empty() && b.follows_request));
            }
        }
    }
}
