//! The side port's RESP framing, as a peer (or anyone who reaches the port) can feed it: any
//! bytes, in any pieces. Parsing must never panic, must read the same frames however the bytes
//! are split across reads, and what it reads must encode back to a frame it reads the same.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use raftis::resp::{self, Frame, ProtocolError};

/// The frames at the front of `data` fed `piece` bytes at a time, and the error that ended them
/// if one did.
fn frames_in(data: &[u8], piece: usize) -> (Vec<Frame>, Option<ProtocolError>) {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for chunk in data.chunks(piece.max(1)) {
        buf.extend_from_slice(chunk);
        loop {
            match resp::parse(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => return (frames, Some(e)),
            }
        }
    }
    (frames, None)
}

fuzz_target!(|data: &[u8]| {
    let (frames, error) = frames_in(data, data.len());
    // The first byte picks the size of the reads: framing is incremental.
    let piece = data.first().map_or(1, |b| 1 + *b as usize % 17);
    let (in_pieces, error_in_pieces) = frames_in(data, piece);
    assert_eq!(frames, in_pieces, "read {piece} bytes at a time");
    assert_eq!(error, error_in_pieces, "read {piece} bytes at a time");
    for frame in frames {
        let mut out = BytesMut::new();
        resp::encode(&frame, &mut out);
        let again = resp::parse(&mut out).expect("an encoded frame parses").expect("whole");
        assert_eq!(again, frame);
        assert!(out.is_empty(), "one frame encodes to one frame");
    }
});
