//! An embeddings request body decodes to a job within the limits or to a
//! client error; never a panic. The body is `compute::requests::fuzz_embeddings_body`,
//! which `cargo test -p compute` also replays over the seed corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| compute::requests::fuzz_embeddings_body(data));
