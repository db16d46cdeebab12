//! See `platform::fuzzing::map_message`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| platform::fuzzing::map_message(data));
