//! What the TUN device hands over with offloads on (a virtio-net header,
//! then a packet or a super-packet) is split, coalesced and split again
//! without a panic, and nothing is lost or made up on the way. The checks
//! live in `offload::fuzz_offload`, which meshd's tests also run under
//! proptest.
//!
//! The module is compiled in here from its source file; it depends on
//! serde alone.
#![no_main]

#[allow(dead_code)]
#[path = "../../src/engine/offload.rs"]
mod offload;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| offload::fuzz_offload(data));
