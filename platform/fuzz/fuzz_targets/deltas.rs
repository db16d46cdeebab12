//! See `platform::fuzzing::deltas`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| platform::fuzzing::deltas(data));
