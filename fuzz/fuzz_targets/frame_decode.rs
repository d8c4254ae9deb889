//! Raw datagrams into ingest, as anyone on the network can send them: decode, authenticate,
//! order, and the fleet state an accepted frame feeds. Never a panic; a frame accepted twice
//! would be a replay let through.
#![no_main]

use gpuha_liveness::{FleetState, Frame, Ingest, KeyRing};
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_800_000_000_000;

fuzz_target!(|data: &[u8]| {
    let mut keys = KeyRing::single(1, b"0123456789abcdef-fuzz".to_vec());
    keys.insert(2, b"another-key-of-16+bytes".to_vec());
    let _ = Frame::decode(data, &keys);
    let mut ingest = Ingest::new(keys);
    let mut fleet = FleetState::new(NOW - 60_000);
    // The same datagram twice: at most the first is accepted.
    let first = ingest.accept(data, NOW);
    assert!(ingest.accept(data, NOW).is_err(), "a datagram was accepted twice");
    if let Ok(frame) = first {
        fleet.observe_tracked(frame.clone(), NOW);
        let _ = fleet.view(NOW + 1_000).to_json();
        let _ = fleet.pool_outlook(&[(frame.pool_id.as_str(), 1)], NOW + 500);
    }
    // Datagrams longer than one frame: every slice of at most the frame limit.
    for chunk in data.chunks(gpuha_liveness::MAX_FRAME_LEN) {
        let _ = ingest.accept(chunk, NOW);
    }
});
