//! The fast path: the common query (one A or AAAA question for a service name, class IN, with
//! or without a plain EDNS0 OPT) answered from bytes built once per [`super::Snapshot`], so a
//! query costs a parse of its question, a lookup and a copy. Everything else (other names and
//! types, options, flags that matter, anything unusual) returns `None` and goes to hickory
//! ([`super::transport::respond`]).
//!
//! The answers are built by [`super::answer::resolve`] itself, and the bytes are those hickory
//! writes for the same query (the tests in `dns_fastpath.rs` compare them byte for byte over
//! query shapes): header with the query's id, RD and CD; the question as the client wrote it
//! (it has no compression pointer, so that is the canonical form [`super::question_section`]
//! re-encodes); the first record's owner written out (the question's bytes: hickory does not
//! point into a question section it did not encode), the others a pointer to it; our OPT last.
//! An answer over the size limit is left to hickory, which truncates it.

use std::collections::HashMap;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};

use super::answer::{self, PoolStates, Served};
use super::config::Zones;

/// Header length, and the question name's offset (where answers' owner pointers point).
const HEADER: usize = 12;
/// The longest name on the wire (RFC 1035 §3.1).
const MAX_NAME: usize = 255;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;

/// One prebuilt answer: the answer section and what it served (for metrics).
#[derive(Debug)]
pub struct Entry {
    pub qtype: RecordType,
    authoritative: bool,
    count: u16,
    /// Each record after its owner name: type, class, TTL, length, data.
    tails: Vec<Vec<u8>>,
    /// Sum of the tails' lengths.
    tails_len: usize,
    pub served: Vec<Served>,
}

/// Up to this many service names are found by comparing bytes, more by hashing (SipHash of a
/// name costs about as much as comparing a dozen of them).
const SCAN_NAMES: usize = 16;

/// Every prebuilt answer of one snapshot, by lowercased wire name.
#[derive(Debug, Default)]
pub struct FastTable {
    /// Lowercased wire name -> entry for A, entry for AAAA.
    names: Vec<(Vec<u8>, [Option<usize>; 2])>,
    /// `names` hashed, when there are more than [`SCAN_NAMES`] (index into `names`).
    by_name: HashMap<Vec<u8>, usize>,
    pub entries: Vec<Entry>,
    max_udp_payload: u16,
}

/// What [`FastTable::answer`] found in a query.
pub struct Hit {
    /// Index into [`FastTable::entries`].
    pub entry: usize,
}

fn wire_name(name: &Name) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(64);
    for label in name.iter() {
        out.push(u8::try_from(label.len()).ok()?);
        out.extend_from_slice(label);
    }
    out.push(0);
    (out.len() <= MAX_NAME).then_some(out)
}

/// The answer section for `qtype` at `name` from the resolver, if it is one the fast path may
/// answer: NOERROR with only A/AAAA records owned by `name` and nothing in authority or
/// additional.
fn build_entry(zones: &Zones, states: &PoolStates, name: &Name, qtype: RecordType) -> Option<Entry> {
    let res = answer::resolve(zones, states, name, qtype);
    if res.rcode != ResponseCode::NoError || res.answers.is_empty() || !res.authority.is_empty() || !res.additional.is_empty() {
        return None;
    }
    let count = u16::try_from(res.answers.len()).ok()?;
    let mut tails = Vec::with_capacity(res.answers.len());
    for r in &res.answers {
        if &r.name != name || r.dns_class != DNSClass::IN {
            return None;
        }
        let (t, rdata): (u16, Vec<u8>) = match &r.data {
            RData::A(a) => (TYPE_A, a.0.octets().to_vec()),
            RData::AAAA(a) => (TYPE_AAAA, a.0.octets().to_vec()),
            _ => return None,
        };
        let mut tail = Vec::with_capacity(10 + rdata.len());
        tail.extend_from_slice(&t.to_be_bytes());
        tail.extend_from_slice(&CLASS_IN.to_be_bytes());
        tail.extend_from_slice(&r.ttl.to_be_bytes());
        tail.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        tail.extend_from_slice(&rdata);
        tails.push(tail);
    }
    let tails_len = tails.iter().map(Vec::len).sum();
    Some(Entry { qtype, authoritative: res.authoritative, count, tails, tails_len, served: res.served })
}

impl FastTable {
    /// The answers to A and AAAA for every service name of `zones` in `states`.
    pub fn build(zones: &Zones, states: &PoolStates) -> Self {
        let mut t = FastTable { max_udp_payload: zones.max_udp_payload.max(512), ..Default::default() };
        for zone in &zones.zones {
            for lower in zone.services.keys() {
                let name = Name::from(lower.clone());
                let Some(key) = wire_name(&name) else { continue };
                let mut slots = [None, None];
                for (slot, qtype) in slots.iter_mut().zip([RecordType::A, RecordType::AAAA]) {
                    if let Some(e) = build_entry(zones, states, &name, qtype) {
                        t.entries.push(e);
                        *slot = Some(t.entries.len() - 1);
                    }
                }
                t.names.push((key, slots));
            }
        }
        if t.names.len() > SCAN_NAMES {
            t.by_name = t.names.iter().enumerate().map(|(i, (k, _))| (k.clone(), i)).collect();
        }
        t
    }

    /// Writes the response to `query` into `out` (cleared first) when the fast path answers it.
    /// `udp`: the size limit is the client's EDNS buffer (512 without EDNS), else 64 KiB.
    pub fn answer(&self, query: &[u8], udp: bool, out: &mut Vec<u8>) -> Option<Hit> {
        if self.entries.is_empty() || query.len() < HEADER + 5 {
            return None;
        }
        let h = &query[..HEADER];
        // QR = 0, opcode QUERY; one question, no answer or authority, at most the OPT.
        if h[2] & 0xF8 != 0 || h[4..10] != [0, 1, 0, 0, 0, 0] || h[10] != 0 || h[11] > 1 {
            return None;
        }
        let mut lower = [0u8; MAX_NAME];
        let mut pos = HEADER;
        loop {
            let len = usize::from(*query.get(pos)?);
            if len > 63 || pos + 1 + len - HEADER > MAX_NAME {
                return None;
            }
            let label = query.get(pos..pos + 1 + len)?;
            for (d, s) in lower[pos - HEADER..].iter_mut().zip(label) {
                *d = s.to_ascii_lowercase();
            }
            pos += 1 + len;
            if len == 0 {
                break;
            }
        }
        let name_end = pos;
        let qtype = u16::from_be_bytes([*query.get(pos)?, *query.get(pos + 1)?]);
        let qclass = u16::from_be_bytes([*query.get(pos + 2)?, *query.get(pos + 3)?]);
        pos += 4;
        if qclass != CLASS_IN {
            return None;
        }
        let slot = match qtype {
            TYPE_A => 0,
            TYPE_AAAA => 1,
            _ => return None,
        };
        let question_end = pos;
        let edns_payload = if h[11] == 1 {
            // A plain OPT: root owner, version 0, no extended rcode, no options. DO and the
            // other flags do not change our answer (no DNSSEC).
            let opt = query.get(pos..pos + 11)?;
            if opt[0] != 0 || u16::from_be_bytes([opt[1], opt[2]]) != TYPE_OPT || opt[5] != 0 || opt[6] != 0 || opt[9..11] != [0, 0] {
                return None;
            }
            pos += 11;
            Some(u16::from_be_bytes([opt[3], opt[4]]))
        } else {
            None
        };
        if pos != query.len() {
            return None;
        }
        let key = &lower[..name_end - HEADER];
        let slots = if self.by_name.is_empty() {
            &self.names.iter().find(|(k, _)| k.as_slice() == key)?.1
        } else {
            &self.names[*self.by_name.get(key)?].1
        };
        let idx = slots[slot]?;
        let e = &self.entries[idx];
        let limit = match (udp, edns_payload) {
            (false, _) => usize::from(u16::MAX),
            (true, Some(p)) => usize::from(p.clamp(512, self.max_udp_payload)),
            (true, None) => 512,
        };
        let name_len = name_end - HEADER;
        let owners = name_len + 2 * (usize::from(e.count) - 1);
        let len = question_end + owners + e.tails_len + if edns_payload.is_some() { 11 } else { 0 };
        if len > limit {
            return None;
        }
        out.clear();
        out.extend_from_slice(&query[..2]);
        // QR, AA, RD from the query; CD from the query; NOERROR.
        out.push(0x80 | if e.authoritative { 0x04 } else { 0 } | (h[2] & 0x01));
        out.push(h[3] & 0x10);
        out.extend_from_slice(&[0, 1]);
        out.extend_from_slice(&e.count.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, u8::from(edns_payload.is_some())]);
        out.extend_from_slice(&query[HEADER..question_end]);
        // The first owner where it lands (after the question), as a pointer for the others.
        let first = (0xC000 | question_end as u16).to_be_bytes();
        for (i, tail) in e.tails.iter().enumerate() {
            if i == 0 {
                out.extend_from_slice(&query[HEADER..name_end]);
            } else {
                out.extend_from_slice(&first);
            }
            out.extend_from_slice(tail);
        }
        if edns_payload.is_some() {
            out.extend_from_slice(&[0, 0, 41]);
            out.extend_from_slice(&self.max_udp_payload.to_be_bytes());
            out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        }
        Some(Hit { entry: idx })
    }
}
