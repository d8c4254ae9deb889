//! `--flaky P`: each generation request (chat, completions, Responses) independently fails
//! before its first token with probability `P`, in one of the ways vLLM fails, drawn at random
//! per request (`--flaky-seed` makes the draws repeatable):
//!
//! | shape | chat / completions | Responses API |
//! |---|---|---|
//! | `reset` | `200` + headers, then half an event and the TCP connection dropped (non-streaming: dropped with no response) | stream: `cut` (below); non-streaming: dropped with no response |
//! | `engine_error` | vLLM's in-band `data: {"error": {...}}` then `data: [DONE]` (non-streaming: `500` JSON) | stream: `cut`; non-streaming: `500` JSON |
//! | `status_500`, `status_503` | that status with vLLM's JSON error body, no generation | the same |
//! | `abort` | `finish_reason: "abort"` with no output, then `data: [DONE]` (non-streaming: `200` with an empty aborted choice) | `response.completed` with no output (non-streaming: the same Response object) |
//! | `cut` | | stream cut after `response.created`/`response.in_progress`: what vLLM does when its engine dies (see `responses.rs`) |
//!
//! The four families (reset, engine error, status, abort) are equally likely; a status is 500 or
//! 503 with equal odds. The failure comes when the first token was due (after queueing and TTFT),
//! except a status, which is answered at once.
//!
//! Embeddings, transcriptions and tokenization are never made flaky: the guard does not judge
//! them, and a drill of the guard wants the injected failures where the guard looks.
//!
//! Every injection is counted and logged on stderr, one line each, so a drill can report them:
//! `fake-vllm: flaky <shape> <api> stream=<bool> #<count of this shape so far>`.

use std::io::Write as _;
use std::sync::Mutex;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::engine::Fault;

/// What a drawn failure does to the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Answer at once with this status and a JSON error body.
    Status(u16),
    /// Let the generation fail in place of its first token.
    Fault(Fault),
}

/// The APIs that can be made flaky (the Responses API has its own failure shapes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completions,
    Responses,
}

impl Api {
    fn name(self) -> &'static str {
        match self {
            Api::Chat => "chat",
            Api::Completions => "completions",
            Api::Responses => "responses",
        }
    }
}

/// The shape names, in the order of [`Flaky::counts`].
pub const SHAPES: [&str; 6] = ["reset", "engine_error", "status_500", "status_503", "abort", "cut"];

/// The shape as the client sees it, named as in the module docs.
fn label(shape: Shape, api: Api, stream: bool) -> &'static str {
    match shape {
        Shape::Status(500) => "status_500",
        Shape::Status(_) => "status_503",
        Shape::Fault(Fault::Aborted) => "abort",
        Shape::Fault(Fault::Cut | Fault::EngineDead) if api == Api::Responses && stream => "cut",
        Shape::Fault(Fault::Cut) => "reset",
        Shape::Fault(Fault::EngineDead) => "engine_error",
    }
}

/// The per-process source of flaky failures.
pub struct Flaky {
    p: f64,
    state: Mutex<State>,
}

struct State {
    rng: StdRng,
    counts: [u64; SHAPES.len()],
}

impl Flaky {
    /// `p` is clamped to 0..=1 (NaN counts as 0); without a seed the draws are random.
    pub fn new(p: f64, seed: Option<u64>) -> Self {
        let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
        let rng = match seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_entropy(),
        };
        Self {
            p,
            state: Mutex::new(State {
                rng,
                counts: [0; SHAPES.len()],
            }),
        }
    }

    /// Draws this request's fate: `None` (serve it) or how it fails. Counts and logs a failure.
    pub fn draw(&self, api: Api, stream: bool) -> Option<Shape> {
        if self.p <= 0.0 {
            return None;
        }
        // A poisoned lock only means a panic elsewhere mid-draw: the state is still usable.
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !st.rng.gen_bool(self.p) {
            return None;
        }
        let shape = match st.rng.gen_range(0..4) {
            0 => Shape::Fault(Fault::Cut),
            1 => Shape::Fault(Fault::EngineDead),
            2 => Shape::Status(if st.rng.gen_bool(0.5) { 500 } else { 503 }),
            _ => Shape::Fault(Fault::Aborted),
        };
        let name = label(shape, api, stream);
        let i = SHAPES.iter().position(|s| *s == name).unwrap_or(0);
        st.counts[i] += 1;
        let n = st.counts[i];
        drop(st);
        let _ = writeln!(std::io::stderr(), "fake-vllm: flaky {name} {} stream={stream} #{n}", api.name());
        Some(shape)
    }

    /// How many failures of each shape were injected so far, in the order of [`SHAPES`].
    pub fn counts(&self) -> [(&'static str, u64); SHAPES.len()] {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        std::array::from_fn(|i| (SHAPES[i], st.counts[i]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probability_zero_and_one() {
        let never = Flaky::new(0.0, Some(1));
        assert!((0..1000).all(|_| never.draw(Api::Chat, true).is_none()));
        let always = Flaky::new(1.0, Some(1));
        assert!((0..1000).all(|_| always.draw(Api::Chat, true).is_some()));
        let total: u64 = always.counts().iter().map(|(_, n)| n).sum();
        assert_eq!(total, 1000);
    }

    #[test]
    fn every_family_is_drawn_and_the_rate_is_about_p() {
        let f = Flaky::new(0.33, Some(7));
        let n = 20_000;
        let failed = (0..n).filter(|_| f.draw(Api::Chat, true).is_some()).count();
        let rate = failed as f64 / f64::from(n);
        assert!((rate - 0.33).abs() < 0.02, "rate {rate}");
        let counts = f.counts();
        for (name, c) in &counts[..5] {
            assert!(*c > 0, "{name} never drawn: {counts:?}");
        }
        assert_eq!(counts[5], ("cut", 0), "chat has no `cut`");
    }

    #[test]
    fn same_seed_same_draws() {
        let a = Flaky::new(0.5, Some(42));
        let b = Flaky::new(0.5, Some(42));
        for _ in 0..500 {
            assert_eq!(a.draw(Api::Responses, false), b.draw(Api::Responses, false));
        }
    }

    #[test]
    fn responses_streams_are_cut_where_chat_streams_reset_or_error() {
        let cut = Shape::Fault(Fault::Cut);
        let dead = Shape::Fault(Fault::EngineDead);
        assert_eq!(label(cut, Api::Responses, true), "cut");
        assert_eq!(label(dead, Api::Responses, true), "cut");
        assert_eq!(label(dead, Api::Responses, false), "engine_error");
        assert_eq!(label(cut, Api::Chat, true), "reset");
        assert_eq!(label(dead, Api::Completions, true), "engine_error");
    }
}
