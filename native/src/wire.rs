//! The Proxy-Wasm SDK's byte formats that cross the host boundary: header maps (a count, the
//! lengths, then each name and value NUL-terminated) and property paths (parts NUL-separated).
//! Decoding is total: a malformed map is an error, never a panic.

/// Encodes `pairs` as the SDK's `deserialize_map_bytes` reads them.
pub fn encode_map<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Vec<u8> {
    let size = 4 + pairs.iter().map(|(k, v)| k.as_ref().len() + v.as_ref().len() + 10).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.as_ref().len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.as_ref().len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref());
        out.push(0);
        out.extend_from_slice(v.as_ref());
        out.push(0);
    }
    out
}

/// Decodes a map the SDK serialized (`send_http_response`'s and `dispatch_http_call`'s headers).
/// `None` when the bytes do not hold the map their header announces.
pub fn decode_map(bytes: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let u32_at = |at: usize| bytes.get(at..at + 4).and_then(|b| b.try_into().ok()).map(|b| u32::from_le_bytes(b) as usize);
    let n = u32_at(0)?;
    let mut p = 4usize.checked_add(n.checked_mul(8)?)?;
    let mut out = Vec::with_capacity(n.min(bytes.len() / 10));
    for i in 0..n {
        let (klen, vlen) = (u32_at(4 + i * 8)?, u32_at(8 + i * 8)?);
        let key = bytes.get(p..p.checked_add(klen)?)?;
        p += klen + 1;
        let value = bytes.get(p..p.checked_add(vlen)?)?;
        p += vlen + 1;
        out.push((key, value));
    }
    (p <= bytes.len()).then_some(out)
}

/// The parts of a property path (`upstream\0address`).
pub fn path_parts(path: &[u8]) -> Vec<&[u8]> {
    path.split(|&b| b == 0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_round_trips() {
        let pairs: Vec<(&[u8], &[u8])> = vec![(b":status", b"503"), (b"content-type", b"application/json"), (b"x-empty", b"")];
        let bytes = encode_map(&pairs);
        assert_eq!(decode_map(&bytes).unwrap(), pairs);
        assert_eq!(decode_map(b"").unwrap(), Vec::<(&[u8], &[u8])>::new());
    }

    #[test]
    fn a_truncated_or_lying_map_is_refused() {
        let bytes = encode_map(&[("a", "b"), ("cc", "dd")]);
        for cut in 1..bytes.len() - 1 {
            assert!(decode_map(&bytes[..cut]).is_none(), "cut at {cut}");
        }
        let mut huge = bytes.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_map(&huge).is_none());
    }

    #[test]
    fn a_path_splits_on_nul() {
        assert_eq!(path_parts(b"upstream\0address"), vec![&b"upstream"[..], &b"address"[..]]);
    }
}
