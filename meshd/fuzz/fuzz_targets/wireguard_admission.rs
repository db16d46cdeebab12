//! The receive loop's first look at a datagram (WireGuard message type and
//! size, handshake MACs, cookie replies under load) never panics and never
//! answers with more than it was sent. The checks live in
//! `admission::fuzz_admission`, which meshd's tests also replay over
//! `corpus/wireguard_admission`.
//!
//! meshd is a binary crate, so the module is compiled in here from its
//! source file; it depends on boringtun alone.
#![no_main]

#[path = "../../src/engine/admission.rs"]
mod admission;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| admission::fuzz_admission(data));
