//! Byte layouts of the Proxy-Wasm shared-data slots the filter's threads share (one store per
//! `vm_id`), as pure encode/decode functions. The filter's glue only reads and writes bytes;
//! what they mean is here, with tests.
//!
//! | key | layout |
//! |---|---|
//! | `gpuha.fleet` | 8 bytes LE: the local fetch time of the view (its content version), then the view in binary ([`crate::fleetwire`]; the filter's readers take JSON too) |
//! | `gpuha.fleet.version` | 16 bytes LE: that version, then the local time dnsd last vouched for it (a `200`, or a later `304`: the view's ages count from there); 8 bytes: vouched at its version |
//! | `gpuha.fleet.etag` | 8 bytes LE version, then dnsd's `ETag` for it (sent as `If-None-Match`) |
//! | `gpuha.poll` | 8 bytes LE: when the last poll was started |
//! | `gpuha.breaker.<ip:port>` | that worker's breaker ([`crate::breaker::Breaker::encode`]) |
//! | `gpuha.breakers.not_closed` | comma-separated addresses whose circuit is not closed |
//! | `gpuha.spill.in_flight` | 8 bytes LE: spilled requests this router is serving now ([`crate::tier::admit_spill`]) |
//! | `gpuha.flight.<ip:port>` | this router's requests in flight to that worker by start second ([`crate::inflight::Flights::encode`]) |
//! | `gpuha.flight.busy` | comma-separated addresses whose in-flight slot may hold a request ([`crate::busylist`]); such a slot ends in one `L` byte |
//! | `gpuha.aff.<n>` | one slot of the affinity placement table: key, worker address hash, time ([`crate::affinity::Placement`]) |
//! | `gpuha.req.<n>` | one of [`REQUEST_SLOTS`] slots: a request's id, `\n`, its noted attempt failures ([`crate::blame`]) |

pub const FLEET_KEY: &str = "gpuha.fleet";
pub const FLEET_VERSION_KEY: &str = "gpuha.fleet.version";
pub const FLEET_ETAG_KEY: &str = "gpuha.fleet.etag";
pub const POLL_KEY: &str = "gpuha.poll";

/// The picker's tick while no thread has a fleet view yet: until one is in, every request fails
/// open, so the first poll goes out after this, not after half a poll interval. The poll slot
/// still spaces the polls themselves by the interval.
pub const FIRST_VIEW_TICK_MS: u64 = 10;

/// The picker's tick period: [`FIRST_VIEW_TICK_MS`] until a fleet view is published (`has_view`:
/// the version slot is set), then half the poll interval (at least 10 ms).
pub fn poll_tick_ms(poll_interval_ms: u64, has_view: bool) -> u64 {
    if has_view {
        (poll_interval_ms / 2).max(FIRST_VIEW_TICK_MS)
    } else {
        FIRST_VIEW_TICK_MS
    }
}
/// Every other worker is admitted without reading its breaker, so a pick costs one shared-data
/// read, not one per worker.
pub const NOT_CLOSED_KEY: &str = "gpuha.breakers.not_closed";
/// Spilled requests being served by this router (incremented when one is admitted, decremented
/// when it ends).
pub const SPILL_IN_FLIGHT_KEY: &str = "gpuha.spill.in_flight";

/// Slots for the requests' noted failures: a bounded ring, so that shared data (which has no
/// delete) cannot grow with the number of requests. Two requests failing at once in the same
/// slot overwrite each other's notes: those failures go uncharged (a missed charge, never a
/// wrong one: the request id is checked on read).
pub const REQUEST_SLOTS: u64 = 4096;

/// The slot of a request id (FNV-1a).
pub fn request_key(request_id: &str) -> String {
    let h = request_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    numbered_key("gpuha.req.", h % REQUEST_SLOTS)
}

/// Whether the router's next fleet poll is due at `now`, the last one claimed at `last`: `min_gap`
/// later, or at once when the wall clock went back past `last` (else no thread would poll, and
/// the view would freeze, until the clock caught up).
pub fn poll_due(now: u64, last: u64, min_gap: u64) -> bool {
    now < last || now - last >= min_gap
}

/// `prefix` then `rest`: a slot key, built without the formatting machinery (these are built
/// several times per request).
pub fn key(prefix: &str, rest: &str) -> String {
    let mut k = String::with_capacity(prefix.len() + rest.len());
    k.push_str(prefix);
    k.push_str(rest);
    k
}

/// `prefix` then `n` in decimal (as `format!("{prefix}{n}")`).
pub fn numbered_key(prefix: &str, mut n: u64) -> String {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    key(prefix, std::str::from_utf8(&digits[at..]).unwrap_or_default())
}

/// A request slot's value.
pub fn encode_request_notes(request_id: &str, notes: &str) -> Vec<u8> {
    format!("{request_id}\n{notes}").into_bytes()
}

/// The notes in a request slot, if it holds `request_id`'s.
pub fn decode_request_notes<'a>(b: &'a [u8], request_id: &str) -> Option<&'a str> {
    let s = std::str::from_utf8(b).ok()?;
    let (id, notes) = s.split_once('\n')?;
    (id == request_id && !id.is_empty()).then_some(notes)
}

/// The busy list ([`crate::busylist`]): the workers this router may have requests in flight to.
/// (No worker address is `busy`: an address has a port.)
pub const BUSY_KEY: &str = "gpuha.flight.busy";

/// The in-flight slot of a worker (`crate::inflight`).
pub fn flight_key(addr: &str) -> String {
    key("gpuha.flight.", addr)
}

pub fn breaker_key(addr: &str) -> String {
    key("gpuha.breaker.", addr)
}

/// The little-endian `u64` at `at`, 0 when the bytes are missing or short.
pub fn u64_at(b: Option<&[u8]>, at: usize) -> u64 {
    b.and_then(|b| b.get(at..at.checked_add(8)?)).and_then(|p| p.try_into().ok()).map_or(0, u64::from_le_bytes)
}

/// A `u64` slot (`gpuha.poll`).
pub fn encode_u64(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// The fleet slot: version, then the view (binary, [`crate::fleetwire`]).
pub fn encode_fleet(version: u64, json: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + json.len());
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(json);
    b
}

/// `(version, view bytes)` of a fleet slot.
pub fn decode_fleet(b: &[u8]) -> (u64, &[u8]) {
    (u64_at(Some(b), 0), b.get(8..).unwrap_or_default())
}

/// The version slot: `(content version, vouched at)`.
pub fn encode_version(version: u64, vouched: u64) -> Vec<u8> {
    let mut b = version.to_le_bytes().to_vec();
    b.extend_from_slice(&vouched.to_le_bytes());
    b
}

/// `(content version, vouched at)`; a slot of 8 bytes (no vouch yet) is vouched at its version.
pub fn decode_version(b: Option<&[u8]>) -> (u64, u64) {
    let v = u64_at(b, 0);
    let vouched = if b.is_some_and(|b| b.len() >= 16) { u64_at(b, 8) } else { v };
    (v, vouched)
}

/// The etag slot: version, then the tag.
pub fn encode_etag(version: u64, etag: &str) -> Vec<u8> {
    encode_fleet(version, etag.as_bytes())
}

/// `(version, etag)`; an unreadable tag is empty.
pub fn decode_etag(b: &[u8]) -> (u64, &str) {
    let (v, t) = decode_fleet(b);
    (v, std::str::from_utf8(t).unwrap_or(""))
}

/// The addresses in the not-closed list.
pub fn not_closed_list(b: &[u8]) -> Vec<&str> {
    std::str::from_utf8(b).unwrap_or("").split(',').filter(|x| !x.is_empty()).collect()
}

/// The not-closed list with `addr` added (`not_closed`) or removed.
pub fn not_closed_update(b: Option<&[u8]>, addr: &str, not_closed: bool) -> Vec<u8> {
    let mut list: Vec<&str> = not_closed_list(b.unwrap_or_default()).into_iter().filter(|x| *x != addr).collect();
    if not_closed {
        list.push(addr);
    }
    list.join(",").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_poll_is_due_at_once_when_the_clock_went_back() {
        assert!(!poll_due(1_100, 1_000, 225));
        assert!(poll_due(1_225, 1_000, 225));
        assert!(poll_due(1_000, 3_600_000, 225), "the clock stepped back an hour");
    }

    #[test]
    fn short_and_missing_slots_read_as_zero() {
        assert_eq!(u64_at(None, 0), 0);
        assert_eq!(u64_at(Some(&[1, 2, 3]), 0), 0);
        assert_eq!(u64_at(Some(&[0; 8]), usize::MAX - 2), 0);
        assert_eq!(decode_version(Some(&encode_u64(7))), (7, 7), "8 bytes: vouched at its version");
        assert_eq!(decode_version(None), (0, 0));
        assert_eq!(decode_fleet(&[1]), (0, &b""[..]));
        assert_eq!(decode_etag(&encode_fleet(3, &[0xff])), (3, ""));
    }

    proptest! {
        /// Keys read as the `format!` they replace.
        #[test]
        fn keys_read_as_format(n in any::<u64>(), addr in "[a-z0-9.:]{0,30}") {
            prop_assert_eq!(numbered_key("gpuha.req.", n), format!("gpuha.req.{n}"));
            prop_assert_eq!(numbered_key("gpuha.aff.", n % 10), format!("gpuha.aff.{}", n % 10));
            prop_assert_eq!(flight_key(&addr), format!("gpuha.flight.{addr}"));
            prop_assert_eq!(breaker_key(&addr), format!("gpuha.breaker.{addr}"));
        }
    }

    #[test]
    fn ticks_fast_only_until_the_first_view() {
        assert_eq!(poll_tick_ms(250, false), FIRST_VIEW_TICK_MS);
        assert_eq!(poll_tick_ms(250, true), 125);
        assert_eq!(poll_tick_ms(20, true), 10);
        assert_eq!(poll_tick_ms(5_000, false), FIRST_VIEW_TICK_MS);
    }

    #[test]
    fn not_closed_list_adds_and_removes_once() {
        let b = not_closed_update(None, "a:1", true);
        let b = not_closed_update(Some(&b), "b:2", true);
        let b = not_closed_update(Some(&b), "a:1", true);
        assert_eq!(not_closed_list(&b), vec!["b:2", "a:1"]);
        let b = not_closed_update(Some(&b), "b:2", false);
        assert_eq!(b, b"a:1");
        assert!(not_closed_list(b",,").is_empty());
    }

    #[test]
    fn request_slots_check_the_id() {
        let k = request_key("8d1c-4e");
        assert!(k.starts_with("gpuha.req."));
        assert_eq!(k, request_key("8d1c-4e"));
        let b = encode_request_notes("8d1c-4e", "a:1|0|status_500");
        assert_eq!(decode_request_notes(&b, "8d1c-4e"), Some("a:1|0|status_500"));
        assert_eq!(decode_request_notes(&b, "other"), None);
        assert_eq!(decode_request_notes(b"", ""), None);
        assert_eq!(decode_request_notes(b"\nx", ""), None);
    }

    proptest! {
        #[test]
        fn round_trips(v: u64, w: u64, json in proptest::collection::vec(any::<u8>(), 0..64), tag in "[ -~]{0,40}") {
            prop_assert_eq!(decode_version(Some(&encode_version(v, w))), (v, w));
            let f = encode_fleet(v, &json);
            prop_assert_eq!(decode_fleet(&f), (v, &json[..]));
            let e = encode_etag(v, &tag);
            prop_assert_eq!(decode_etag(&e), (v, tag.as_str()));
            prop_assert_eq!(u64_at(Some(&encode_u64(w)), 0), w);
        }
    }
}
