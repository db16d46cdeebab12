//! See `platform::fuzzing::signed_frame`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| platform::fuzzing::signed_frame(data));
