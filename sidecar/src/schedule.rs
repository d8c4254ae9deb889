//! When scrapes start and which answers become frames.
//!
//! vLLM answers `/metrics` on the event loop that streams the tokens, so under load a scrape
//! can take seconds (the real CPU build, 40 streams: up to 5 s) while the server is healthy.
//! One scrape at a time would then send a frame every 5 s, and the worker would spend most of
//! its time past the 3 s freshness gate: judged dead while it serves. So scrapes overlap: one
//! starts every interval while fewer than `max_in_flight` are out, and each answer that arrives
//! is a frame. Nothing is asserted without evidence: every frame is still the answer of one
//! scrape that succeeded, taken when it arrived; a server that answers nothing (killed, API
//! server hung) still sends nothing.
//!
//! Answers can arrive out of order. One older than an answer already sent carries older numbers
//! and is dropped (counted), so the receivers see the worker's counters in the order vLLM
//! produced them.

use std::time::{Duration, Instant};

/// What to do with one scrape's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The newest answer so far: send it.
    Use,
    /// A later scrape already answered: its numbers are newer, drop this one.
    Overtaken,
    /// The scrape failed: nothing to send.
    Failed,
}

/// The scrapes out and due (pure: the caller passes the time).
#[derive(Debug)]
pub struct Schedule {
    interval: Duration,
    max_in_flight: usize,
    next_start: Instant,
    next_ticket: u64,
    in_flight: usize,
    newest_used: Option<u64>,
}

impl Schedule {
    /// The first scrape is due at `now`.
    pub fn new(now: Instant, interval: Duration, max_in_flight: usize) -> Self {
        Schedule { interval, max_in_flight: max_in_flight.max(1), next_start: now, next_ticket: 0, in_flight: 0, newest_used: None }
    }

    /// The ticket of a scrape to start now, if one is due and fewer than `max_in_flight` are out.
    /// Starts are at least one interval apart, so answers freed together never start a burst.
    pub fn start(&mut self, now: Instant) -> Option<u64> {
        if self.in_flight >= self.max_in_flight || now < self.next_start {
            return None;
        }
        self.in_flight += 1;
        self.next_start = now + self.interval;
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        Some(ticket)
    }

    /// How long until [`Schedule::start`] can give a ticket; `None` while every slot is out (only
    /// an answer frees one).
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        (self.in_flight < self.max_in_flight).then(|| self.next_start.saturating_duration_since(now))
    }

    /// The scrape `ticket` ended, with an answer (`ok`) or not.
    pub fn answered(&mut self, ticket: u64, ok: bool) -> Answer {
        self.in_flight = self.in_flight.saturating_sub(1);
        if !ok {
            return Answer::Failed;
        }
        if self.newest_used.is_some_and(|n| ticket <= n) {
            return Answer::Overtaken;
        }
        self.newest_used = Some(ticket);
        Answer::Use
    }

    /// Scrapes started and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn fast_answers_give_one_scrape_per_interval() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0, 500 * MS, 8);
        assert_eq!(s.start(t0), Some(0));
        assert_eq!(s.start(t0), None, "not due again yet");
        assert_eq!(s.answered(0, true), Answer::Use);
        assert_eq!(s.wait(t0 + 5 * MS), Some(495 * MS));
        assert_eq!(s.start(t0 + 499 * MS), None);
        assert_eq!(s.start(t0 + 500 * MS), Some(1));
    }

    #[test]
    fn slow_answers_overlap_up_to_the_limit() {
        // Every scrape takes 5 s: with 4 out at most, starts are 500 ms apart until 4 are out,
        // then each answer frees the next start at once.
        let t0 = Instant::now();
        let mut s = Schedule::new(t0, 500 * MS, 4);
        let mut started = vec![];
        for k in 0..8u32 {
            let t = t0 + 500 * k * MS;
            if let Some(ticket) = s.start(t) {
                started.push((ticket, k));
            }
        }
        assert_eq!(started, vec![(0, 0), (1, 1), (2, 2), (3, 3)]);
        assert_eq!(s.in_flight(), 4);
        assert_eq!(s.wait(t0 + 4_000 * MS), None, "full: only an answer frees a slot");
        assert_eq!(s.answered(0, true), Answer::Use);
        assert_eq!(s.start(t0 + 5_000 * MS), Some(4), "due since 2 s: starts as soon as a slot frees");
        assert_eq!(s.answered(1, true), Answer::Use);
        assert_eq!(s.start(t0 + 5_000 * MS), None, "starts stay an interval apart");
        assert_eq!(s.start(t0 + 5_500 * MS), Some(5));
    }

    #[test]
    fn an_answer_older_than_one_sent_is_dropped() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0, 500 * MS, 4);
        let a = s.start(t0).expect("first");
        let b = s.start(t0 + 500 * MS).expect("second");
        let c = s.start(t0 + 1_000 * MS).expect("third");
        assert_eq!(s.answered(b, true), Answer::Use);
        assert_eq!(s.answered(a, true), Answer::Overtaken, "older numbers than the frame already sent");
        assert_eq!(s.answered(c, false), Answer::Failed);
        assert_eq!(s.in_flight(), 0);
        let d = s.start(t0 + 1_500 * MS).expect("fourth");
        assert_eq!(s.answered(d, true), Answer::Use, "a failure does not count as an answer sent");
    }

    #[test]
    fn failures_free_their_slot() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0, 50 * MS, 1);
        for k in 0..5u32 {
            let ticket = s.start(t0 + 50 * k * MS).expect("a slot after each failure");
            assert_eq!(s.answered(ticket, false), Answer::Failed);
        }
    }
}
