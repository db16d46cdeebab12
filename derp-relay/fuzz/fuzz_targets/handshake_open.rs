//! Opening arbitrary client info never panics and never succeeds without
//! the matching key.
#![no_main]

use derp_relay::proto::frame::Frame;
use derp_relay::proto::handshake;
use libfuzzer_sys::fuzz_target;
use x25519_dalek::StaticSecret;

fuzz_target!(|data: &[u8]| {
    let relay = StaticSecret::from([7u8; 32]);
    if let Ok(Some((Frame::ClientInfo { node_key, nonce, sealed }, _))) = Frame::decode(data) {
        assert!(handshake::open(&relay, &[0u8; 16], &node_key, &nonce, &sealed).is_err());
    }
});
