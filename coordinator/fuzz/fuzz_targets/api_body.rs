//! The JSON bodies the coordinator accepts (registration, pairing, key
//! rotation, map-stream reports, receipts, admin requests): decoding and
//! the checks before the database must never panic. The first byte picks
//! the endpoint; seeds are in `corpus/api_body`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    coordinator::api::fuzz_api_body(data);
});
