//! The picker's body scanners (JSON and multipart) over arbitrary bodies, fed in windows cut
//! anywhere: the answer never depends on where the windows were cut, and no panic.
#![no_main]

use arbitrary::Arbitrary;
use gpuha_liveness::request::{scan_json, BodyKind, RequestScanner, Scan};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    content_type: Option<String>,
    cuts: Vec<u16>,
    body: Vec<u8>,
}

/// Feeds `windows` until an answer, then finishes.
fn scan<'a>(kind: &BodyKind, windows: impl Iterator<Item = &'a [u8]>) -> Scan {
    let mut s = RequestScanner::new(kind);
    for w in windows {
        match s.feed(w) {
            Scan::Incomplete => {}
            answer => return answer,
        }
    }
    s.finish()
}

fuzz_target!(|input: Input| {
    let kind = BodyKind::from_content_type(input.content_type.as_deref());
    let whole = scan(&kind, std::iter::once(&input.body[..]));
    let mut cuts: Vec<usize> = input.cuts.iter().take(32).map(|c| usize::from(*c) % (input.body.len() + 1)).collect();
    cuts.push(0);
    cuts.push(input.body.len());
    cuts.sort_unstable();
    let windows = cuts.windows(2).map(|w| &input.body[w[0]..w[1]]);
    let split = scan(&kind, windows);
    assert_eq!(whole, split, "cut at {cuts:?}");
    if matches!(kind, BodyKind::Json) {
        let _ = scan_json(&input.body);
    }
});
