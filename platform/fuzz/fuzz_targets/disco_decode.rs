//! Disco decoding (sender key, sealed box, message body, replay window)
//! never panics, and what a body decodes to encodes back to the same
//! bytes. The checks live in `platform::disco::fuzz_disco`, which the
//! crate's tests also replay over `corpus/disco_decode`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| platform::disco::fuzz_disco(data));
