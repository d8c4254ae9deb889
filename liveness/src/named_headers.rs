//! The bytes of the native host's `gpuha.read_headers` call: the filter names the few headers
//! of one map it needs, and the host answers their values in one call (one walk of Envoy's map)
//! instead of one lookup per header, each of which builds a lower-cased key and searches the map.
//!
//! Asked: the map's Proxy-Wasm number (one byte), the number of names (one byte), each name's
//! length (one byte each), then the names one after the other (header names are tokens, at most
//! [`MAX_NAME_LEN`] bytes here: a longer one is read on its own). Answered: for each name asked,
//! in order, the first value's length as a little-endian `u32` and its bytes, or [`ABSENT`] for a
//! header the map does not have. Decoding is total: bytes that do not hold what they announce
//! decode to `None`, never a panic.

/// The length that says "no such header".
pub const ABSENT: u32 = u32::MAX;

/// The most names one ask may hold (a hook reads a handful).
pub const MAX_NAMES: usize = 16;

/// The longest name an ask may hold.
pub const MAX_NAME_LEN: usize = 255;

/// What the filter sends: `map` and `names`. `None` for more than [`MAX_NAMES`] names or a name
/// longer than [`MAX_NAME_LEN`].
pub fn encode_ask(map: u8, names: &[&str]) -> Option<Vec<u8>> {
    if names.len() > MAX_NAMES || names.iter().any(|n| n.len() > MAX_NAME_LEN) {
        return None;
    }
    let mut out = Vec::with_capacity(2 + names.iter().map(|n| n.len() + 1).sum::<usize>());
    out.extend_from_slice(&[map, names.len() as u8]);
    out.extend(names.iter().map(|n| n.len() as u8));
    for n in names {
        out.extend_from_slice(n.as_bytes());
    }
    Some(out)
}

/// An ask, read in place.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub map: u8,
    lens: &'a [u8],
    names: &'a [u8],
}

impl<'a> Ask<'a> {
    /// `None` when the bytes do not hold the names their lengths announce, or more than
    /// [`MAX_NAMES`] of them.
    pub fn parse(ask: &'a [u8]) -> Option<Ask<'a>> {
        let (&[map, n], rest) = ask.split_first_chunk::<2>()?;
        let n = usize::from(n);
        if n > MAX_NAMES {
            return None;
        }
        let (lens, names) = rest.split_at_checked(n)?;
        (lens.iter().map(|&l| usize::from(l)).sum::<usize>() == names.len()).then_some(Ask { map, lens, names })
    }

    pub fn len(&self) -> usize {
        self.lens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// The names, in order.
    pub fn names(&self) -> impl Iterator<Item = &'a [u8]> + use<'a> {
        let names = self.names;
        self.lens.iter().scan(0usize, move |at, &l| {
            let start = *at;
            *at += usize::from(l);
            names.get(start..*at)
        })
    }

    /// The set of the names' lengths (modulo 64): a header whose length is not in it was not
    /// asked for.
    pub fn lengths(&self) -> u64 {
        self.lens.iter().fold(0, |m, &l| m | 1 << (l % 64))
    }
}

/// Appends one answer: `value`, or absent.
pub fn push_value(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        Some(v) => {
            // A header value over 4 GiB cannot reach here (Envoy's limits are in kilobytes);
            // cutting it keeps the length honest about what follows for any that did.
            let len = u32::try_from(v.len()).unwrap_or(ABSENT - 1);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&v[..len as usize]);
        }
        None => out.extend_from_slice(&ABSENT.to_le_bytes()),
    }
}

/// Where each of the `n` answers of `bytes` lies (`start..end` of its value, `None` when
/// absent); `None` when the bytes do not hold exactly `n` answers, or `n` is over [`MAX_NAMES`].
pub fn spans(bytes: &[u8], n: usize) -> Option<[Option<(u32, u32)>; MAX_NAMES]> {
    let mut out = [None; MAX_NAMES];
    let mut at = 0usize;
    for slot in out.get_mut(..n)? {
        let len = u32::from_le_bytes(*bytes.get(at..)?.first_chunk::<4>()?);
        at += 4;
        if len != ABSENT {
            // Past 4 GiB the `u32` would not hold the end: such bytes are not an answer.
            let end = at.checked_add(len as usize).filter(|&e| e <= bytes.len() && u32::try_from(e).is_ok())?;
            *slot = Some((at as u32, end as u32));
            at = end;
        }
    }
    (at == bytes.len()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ask_and_answer() {
        let ask = encode_ask(2, &[":status", "content-type"]).expect("small");
        assert_eq!(ask, b"\x02\x02\x07\x0c:statuscontent-type");
        let a = Ask::parse(&ask).expect("valid");
        assert_eq!(a.map, 2);
        assert_eq!(a.len(), 2);
        assert_eq!(a.names().collect::<Vec<_>>(), vec![&b":status"[..], b"content-type"]);
        assert_eq!(a.lengths(), 1 << 7 | 1 << 12);
        let mut out = Vec::new();
        push_value(&mut out, Some(b"200"));
        push_value(&mut out, None);
        let at = spans(&out, 2).expect("two answers");
        assert_eq!(at[0], Some((4, 7)));
        assert_eq!(&out[4..7], b"200");
        assert_eq!(at[1], None);
        assert!(spans(&out, 1).is_none(), "bytes left over");
        assert!(spans(&out, 3).is_none(), "an answer missing");
        assert!(spans(&out[..out.len() - 1], 2).is_none());
        assert!(spans(&[], MAX_NAMES + 1).is_none());
    }

    #[test]
    fn bad_asks() {
        assert!(Ask::parse(b"").is_none());
        assert!(Ask::parse(b"\x00").is_none());
        assert!(Ask::parse(b"\x00\x01\x04nam").is_none(), "a name shorter than announced");
        assert!(Ask::parse(b"\x00\x01\x04names").is_none(), "bytes past the names");
        assert!(Ask::parse(b"\x00\x11").is_none(), "more than MAX_NAMES");
        assert_eq!(Ask::parse(b"\x00\x00").expect("no names").len(), 0);
        let a = Ask::parse(b"\x00\x01\x00").expect("one empty name");
        assert_eq!(a.names().collect::<Vec<_>>(), vec![&b""[..]]);
        assert!(encode_ask(0, &["x"; MAX_NAMES + 1]).is_none());
        assert!(encode_ask(0, &[&"x".repeat(MAX_NAME_LEN + 1)]).is_none());
    }

    proptest! {
        #[test]
        fn round_trip(map in any::<u8>(), names in proptest::collection::vec("[a-z:-]{0,20}", 0..=MAX_NAMES), values in proptest::collection::vec(proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)), 0..=MAX_NAMES)) {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let ask = encode_ask(map, &refs).expect("small");
            let a = Ask::parse(&ask).expect("valid");
            prop_assert_eq!(a.map, map);
            prop_assert_eq!(a.names().collect::<Vec<_>>(), refs.iter().map(|n| n.as_bytes()).collect::<Vec<_>>());
            let mut out = Vec::new();
            for v in &values {
                push_value(&mut out, v.as_deref());
            }
            let at = spans(&out, values.len()).expect("valid");
            for (i, v) in values.iter().enumerate() {
                prop_assert_eq!(at[i].map(|(s, e)| &out[s as usize..e as usize]), v.as_deref());
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), n in 0usize..20) {
            let _ = spans(&bytes, n);
            if let Some(a) = Ask::parse(&bytes) {
                prop_assert_eq!(a.names().count(), a.len());
            }
        }
    }
}
