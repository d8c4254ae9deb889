//! Server-sent-event framing, apart from what an event means ([`crate::output`] owns that):
//! where an event ends in a byte stream, and its `event:` name and `data:` payload.
//!
//! The SSE spec allows `\n`, `\r\n` and `\r` as line ends; an event ends at a blank line.
//! vLLM sends `\n` only, but a proxy in between may not.

use memchr::memmem;

/// Index just past the blank line that ends the first complete event at or after `from`.
pub fn next_event_end(buf: &[u8], from: usize) -> Option<usize> {
    event_end(buf, from, false)
}

/// [`next_event_end`], where `at_end` says no byte follows `buf` (the stream ended): a `\r` at
/// the very end is then a whole line end, not the first half of a `\r\n` still to come.
pub fn event_end(buf: &[u8], from: usize, at_end: bool) -> Option<usize> {
    let mut i = from;
    let mut line_empty = true;
    while i < buf.len() {
        match buf[i] {
            b'\n' | b'\r' => {
                let mut next = i + 1;
                if buf[i] == b'\r' {
                    if next >= buf.len() {
                        if !at_end {
                            // A lone `\r` at the end may be the first half of `\r\n`: wait.
                            return None;
                        }
                    } else if buf[next] == b'\n' {
                        next += 1;
                    }
                }
                if line_empty {
                    // A blank line ends the event (a blank line at `from` itself is an empty
                    // "event" of its own, which means nothing).
                    return Some(next);
                }
                line_empty = true;
                i = next;
            }
            _ => {
                // The rest of the line is not blank: jump to its end.
                line_empty = false;
                i += memchr::memchr2(b'\n', b'\r', &buf[i..])?;
            }
        }
    }
    None
}

/// Whether bytes that start at an event start and end with `tail` end on an event boundary
/// (their last line is a blank line that [`next_event_end`] ends an event with). Conservative:
/// only the endings `\n\n`, `\r\n\r\n`, `\n\r\n` and `\r\r\n` count (vLLM sends `\n\n`).
pub fn ends_on_event_boundary(tail: &[u8]) -> bool {
    [&b"\n\n"[..], b"\r\n\r\n", b"\n\r\n", b"\r\r\n"].iter().any(|e| tail.ends_with(e))
}

/// One complete event's fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    /// The `event:` field (the Responses API names every event; chat and completions do not).
    pub name: Option<String>,
    /// The `data:` payload, lines joined with `\n`.
    pub data: Option<String>,
}

/// Parses the fields of one complete event (comments and unknown fields ignored). Works on the
/// bytes: a line ends at `\n` or `\r`, a field at the first `:`; only the values kept are made
/// text, invalid UTF-8 in them replaced as `String::from_utf8_lossy` replaces it. (These bytes
/// are all ASCII, so no invalid sequence spans them: the answer is the one of a lossy
/// conversion of the whole event, split after.)
pub fn parse_event(event: &[u8]) -> Event {
    let mut ev = Event::default();
    let mut rest = event;
    while !rest.is_empty() {
        let end = memchr::memchr2(b'\n', b'\r', rest).unwrap_or(rest.len());
        let line = &rest[..end];
        rest = &rest[(end + 1).min(rest.len())..];
        let (field, value) = match memchr::memchr(b':', line) {
            Some(i) => (&line[..i], line[i + 1..].strip_prefix(b" ").unwrap_or(&line[i + 1..])),
            None => (line, &b""[..]),
        };
        match field {
            b"data" => match ev.data.as_mut() {
                Some(d) => {
                    d.push('\n');
                    d.push_str(&crate::text(value));
                }
                None => ev.data = Some(crate::text(value).into_owned()),
            },
            b"event" => ev.name = Some(crate::text(value).into_owned()),
            _ => {}
        }
    }
    ev
}

/// Iterates over the complete events of `buf` from `from`: `(start, end)` of each.
pub fn events(buf: &[u8], mut from: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    std::iter::from_fn(move || {
        let end = next_event_end(buf, from)?;
        let start = from;
        from = end;
        Some((start, end))
    })
}

pub(crate) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && memmem::find(hay, needle).is_some()
}

/// Whether a chunk of a released stream whose last bytes are `tail` (its last
/// [`crate::guard::TAIL_PEEK_BYTES`], or all of it when shorter) may pass without the guard
/// seeing it, when it starts at an event start: it ends on an event boundary and its tail holds
/// no word of an error event. [`crate::guard::Guard::passes_untouched`] answers with it, and a
/// host that checks chunks itself ([`crate::attempt::Attempt::passes_clean_chunks`]) with the
/// same function.
pub fn clean_tail(tail: &[u8]) -> bool {
    ends_on_event_boundary(tail) && !has_error_word(tail)
}

/// Whether `hay` holds a word an error event carries (`error`, `failed`). Searched on every chunk
/// of every stream, so both words are looked for in one pass: by a byte pair inside each that a
/// token event's JSON rarely holds (`rr` of `error`, `il` of `failed`), 32 positions at a time
/// (a fixed-size block the compiler turns into vector compares), then the word around a pair.
/// Two `memmem` searches took ~1.3 times the instructions on the bench's chat chunks
/// (`bench/results/2026-12-02-decisions`).
pub(crate) fn has_error_word(hay: &[u8]) -> bool {
    let mut at = 0;
    // Each block reads the byte after it too: a pair may straddle two blocks.
    while let Some(block) = hay.get(at..at + PAIR_BLOCK + 1) {
        if block_has_pair(block.try_into().unwrap_or(&[0; PAIR_BLOCK + 1])) && word_around(hay, at, at + PAIR_BLOCK) {
            return true;
        }
        at += PAIR_BLOCK;
    }
    // The rest, shorter than a block, padded with zeros (no pair has one).
    let rest = hay.get(at..).unwrap_or_default();
    let mut last = [0; PAIR_BLOCK + 1];
    last[..rest.len()].copy_from_slice(rest);
    block_has_pair(&last) && word_around(hay, at, hay.len())
}

/// The positions [`has_error_word`] compares at once.
const PAIR_BLOCK: usize = 32;

/// Whether one of the first `PAIR_BLOCK` positions of `block` starts the pair `rr` or `il`.
fn block_has_pair(block: &[u8; PAIR_BLOCK + 1]) -> bool {
    let (head, next) = (&block[..PAIR_BLOCK], &block[1..]);
    head.iter().zip(next).fold(false, |any, (&a, &b)| any | (a == b'r') & (b == b'r') | (a == b'i') & (b == b'l'))
}

/// Whether `error` or `failed` has its inner pair (`rr`, `il`) at a position of `hay` in
/// `from..to`.
fn word_around(hay: &[u8], from: usize, to: usize) -> bool {
    (from..to).any(|i| match hay.get(i..i + 2) {
        Some(b"rr") => i >= 1 && hay[i - 1..].starts_with(b"error"),
        Some(b"il") => i >= 2 && hay[i - 2..].starts_with(b"failed"),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn three_line_ends() {
        assert_eq!(next_event_end(b"data: a\n\n", 0), Some(9));
        assert_eq!(next_event_end(b"data: a\r\n\r\nx", 0), Some(11));
        assert_eq!(next_event_end(b"data: a\r\rx", 0), Some(9));
        assert_eq!(next_event_end(b"data: a\r", 0), None, "a lone \\r may be half of \\r\\n");
        assert_eq!(next_event_end(b"data: a\n", 0), None);
    }

    #[test]
    fn fields() {
        let ev = parse_event(b"event: response.output_text.delta\ndata: {\"a\":1}\n: comment\ndata:x\n\n");
        assert_eq!(ev.name.as_deref(), Some("response.output_text.delta"));
        assert_eq!(ev.data.as_deref(), Some("{\"a\":1}\nx"));
        assert_eq!(parse_event(b": keepalive\n\n"), Event::default());
        let spans: Vec<_> = events(b"data: a\n\ndata: b\n\ndata: c", 0).collect();
        assert_eq!(spans, vec![(0, 9), (9, 18)]);
    }

    /// The text-based parser this module had: lossy conversion of the whole event, then split.
    fn parse_event_text(event: &[u8]) -> Event {
        let text = String::from_utf8_lossy(event);
        let mut ev = Event::default();
        for line in text.split(['\n', '\r']) {
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "data" => match ev.data.as_mut() {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => ev.data = Some(value.to_string()),
                },
                "event" => ev.name = Some(value.to_string()),
                _ => {}
            }
        }
        ev
    }

    proptest! {
        /// The byte parser reads every event, valid UTF-8 or not, as the text parser did.
        #[test]
        fn parse_event_reads_as_the_text_parser(parts in proptest::collection::vec(0usize..14, 0..30)) {
            let atoms: [&[u8]; 14] = [b"data", b"event", b":", b" ", b"\n", b"\r", b"x", b"\xc3\xa9", b"\xc3", b"\xff", b"\xe2\x82", b"id", b"data: {\"a\":1}", b"\xf0\x9f\x98\x80"];
            let ev: Vec<u8> = parts.iter().flat_map(|p| atoms[*p].to_vec()).collect();
            prop_assert_eq!(parse_event(&ev), parse_event_text(&ev));
        }

        /// The one-pass word search answers as the two `memmem` searches it replaced, wherever
        /// the words and their pieces fall against its 32-byte blocks.
        #[test]
        fn error_words_are_found_as_by_two_searches(parts in proptest::collection::vec(0usize..12, 0..60)) {
            let atoms: [&[u8]; 12] = [b"error", b"failed", b"rr", b"il", b"e", b"err", b"or", b"fa", b"led", b"x", b"{\"choices\":[", b"\n\n"];
            let hay: Vec<u8> = parts.iter().flat_map(|p| atoms[*p].to_vec()).collect();
            let two = contains(&hay, b"error") || contains(&hay, b"failed");
            prop_assert_eq!(has_error_word(&hay), two);
            for cut in [1, 31, 32, 33] {
                let h = &hay[hay.len().min(cut)..];
                prop_assert_eq!(has_error_word(h), contains(h, b"error") || contains(h, b"failed"));
            }
        }

        /// However a stream of events is split, scanning the joined bytes finds the same events.
        #[test]
        fn boundary_detection_is_split_independent(parts in proptest::collection::vec(0usize..5, 0..40)) {
            let atoms: [&[u8]; 5] = [b"data: x", b"\n", b"\r\n", b"event: y", b"\r"];
            let body: Vec<u8> = parts.iter().flat_map(|p| atoms[*p].to_vec()).collect();
            let ends: Vec<usize> = events(&body, 0).map(|(_, e)| e).collect();
            // Every end found is also found when the buffer is cut right after it.
            for &e in &ends {
                let sub = &body[..e];
                let last = events(sub, 0).map(|(_, e)| e).last();
                // A trailing lone `\r` may wait for its `\n`; everything before it agrees.
                prop_assert!(last == Some(e) || sub.ends_with(b"\r"));
            }
            if let Some(&last) = ends.last() {
                prop_assert!(ends_on_event_boundary(&body[..last]) || body[..last].ends_with(b"\r") || body[..last].ends_with(b"\n"));
            }
        }
    }
}
