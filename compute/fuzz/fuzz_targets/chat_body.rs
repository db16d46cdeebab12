//! A chat request body decodes to a job or to a client error, and the
//! context check on its `max_tokens` never overflows. The body is
//! `compute::requests::fuzz_chat_body`, which `cargo test -p compute` also
//! replays over the seed corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| compute::requests::fuzz_chat_body(data));
