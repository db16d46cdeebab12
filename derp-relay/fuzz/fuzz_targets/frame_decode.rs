//! Frame decoding never panics, claims no more than it was given, and
//! whatever it decodes encodes back to the same bytes.
#![no_main]

use derp_relay::proto::frame::Frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((frame, used))) = Frame::decode(rest) {
        assert!(used <= rest.len());
        if !matches!(frame, Frame::Unknown { .. } | Frame::Close { .. }) {
            let mut again = Vec::new();
            frame.encode(&mut again).expect("decoded frames re-encode");
            assert_eq!(&again[..], &rest[..used]);
        }
        rest = &rest[used..];
    }
});
