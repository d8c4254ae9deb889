//! SSE framing and the output predicate over arbitrary bytes: every event boundary found is in
//! range and advances, splitting the stream anywhere finds the same events, and each event and
//! the whole body are judged for both APIs without a panic.
#![no_main]

use gpuha_liveness::output::{event_signal, whole_body_signal, Api};
use gpuha_liveness::sse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, buf)) = data.split_first() else { return };
    let mut ends = Vec::new();
    for (start, end) in sse::events(buf, 0) {
        assert!(start < end && end <= buf.len(), "event {start}..{end} of {}", buf.len());
        ends.push(end);
        let ev = sse::parse_event(&buf[start..end]);
        for api in [Api::Chat, Api::Responses] {
            let _ = event_signal(api, &ev);
        }
    }
    // A buffer that stops early finds the events that end inside it, and no other.
    let cut = usize::from(split) * buf.len() / 255;
    let early: Vec<usize> = sse::events(&buf[..cut], 0).map(|(_, e)| e).collect();
    let expected: Vec<usize> = ends.iter().copied().take_while(|e| *e <= cut).collect();
    // An event ending exactly at the cut with "\r" may end differently once "\n" follows.
    if !buf[..cut].ends_with(b"\r") {
        assert_eq!(early, expected, "events of a prefix of {cut} bytes");
    }
    let tail = &buf[buf.len().saturating_sub(8)..];
    if sse::ends_on_event_boundary(tail) && !buf.is_empty() {
        let _ = sse::next_event_end(buf, 0);
    }
    for api in [Api::Chat, Api::Responses] {
        let _ = whole_body_signal(api, buf);
    }
    if let Ok(path) = std::str::from_utf8(buf) {
        let _ = Api::from_path(path);
    }
});
