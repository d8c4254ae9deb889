use super::*;

#[test]
fn base64_matches_python() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
}

#[test]
fn multipart_parts_and_edges() {
    let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ntiny\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n\x00\x01\r\n\x02\r\n--XyZ--\r\n";
    let parts = parse_multipart("multipart/form-data; boundary=XyZ", body).unwrap_or_default();
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0].name, "model");
    assert_eq!(parts[0].data, b"tiny");
    assert_eq!(parts[1].filename.as_deref(), Some("a.wav"));
    assert_eq!(parts[1].data, b"\x00\x01\r\n\x02");
    assert!(parse_multipart("application/json", body).is_none());
    assert!(parse_multipart("multipart/form-data; boundary=XyZ", b"--XyZ\r\nnot a part").is_none());
}

#[test]
fn embeddings_are_unit_vectors_and_repeatable() {
    let a = embed("hello", 16);
    assert_eq!(a, embed("hello", 16));
    assert_ne!(a, embed("hellp", 16));
    let norm: f32 = a.iter().map(|x| x * x).sum();
    assert!((norm - 1.0).abs() < 1e-5, "{norm}");
}
