//! The frame decoder on arbitrary bytes: it must never panic, never
//! allocate past the limits, and whatever it accepts must re-encode to a
//! frame that decodes to the same message.
#![no_main]

use hearth_proto::{FrameDecoder, decode_frame, encode_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((msg, used))) = decode_frame(data) {
        assert!(used <= data.len());
        let again = encode_frame(&msg).expect("a decoded message re-encodes");
        let (back, n) = decode_frame(&again).expect("re-encoded frame decodes").expect("whole");
        assert_eq!(n, again.len());
        assert_eq!(back, msg);
    }
    // The incremental decoder, fed in uneven chunks, agrees with the
    // one-shot decoder on the first message.
    let mut d = FrameDecoder::new();
    let chunk = 1 + data.first().map_or(0, |b| *b as usize % 7);
    let mut first = None;
    for c in data.chunks(chunk) {
        d.push(c);
        match d.next_message() {
            Ok(Some(m)) => {
                first = Some(m);
                break;
            }
            Ok(None) => {}
            Err(_) => break,
        }
    }
    if let (Some(m), Ok(Some((one, _)))) = (first, decode_frame(data)) {
        assert_eq!(m, one);
    }
});
