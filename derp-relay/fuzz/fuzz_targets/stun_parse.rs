//! STUN parsing never panics on arbitrary datagrams.
#![no_main]

use derp_relay::proto::stun;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = stun::parse_request(data);
    if data.len() >= 20 {
        let mut tx = [0u8; 12];
        tx.copy_from_slice(&data[8..20]);
        let _ = stun::parse_response(data, &tx);
    }
});
