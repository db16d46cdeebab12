//! The bodies of the fuzz targets in `platform/fuzz`, here so that the same
//! code replays the committed corpora as ordinary tests
//! (`tests/fuzz_corpus.rs`). Each takes arbitrary bytes and panics only on a
//! broken invariant.

use crate::api::{ClientMessage, ServerMessage};
use crate::control_auth::{CoordinatorIdentity, FrameVerifier};
use crate::netmap::{coalesce, NetMap, PeerChange};
use crate::signed::{Signed, DOMAIN_MAP};

/// A map-stream message from either side: decoding never panics, and what
/// decodes encodes to text that decodes to the same message.
pub fn map_message(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(m) = serde_json::from_str::<ServerMessage>(text) {
        let again = serde_json::to_string(&m).expect("server messages encode");
        assert_eq!(serde_json::from_str::<ServerMessage>(&again).ok(), Some(m));
    }
    if let Ok(m) = serde_json::from_str::<ClientMessage>(text) {
        let again = serde_json::to_string(&m).expect("client messages encode");
        assert_eq!(
            serde_json::from_str::<ClientMessage>(&again).ok(),
            Some(m.clone())
        );
        if let ClientMessage::Hello { hello } = m {
            // Any hello's signature check ends in a verdict, not a panic.
            let _ = hello.verify::<crate::api::MapHello>(DOMAIN_MAP, 0);
        }
    }
    if let Ok(s) = serde_json::from_str::<Signed>(text) {
        let _ = s.open::<serde_json::Value>(DOMAIN_MAP);
    }
}

/// A signed map-stream frame as a device receives it: whatever the bytes,
/// the verifier refuses anything not signed by the coordinator for this
/// stream, and never panics.
pub fn signed_frame(data: &[u8]) {
    static ID: std::sync::LazyLock<CoordinatorIdentity> =
        std::sync::LazyLock::new(CoordinatorIdentity::generate);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut verifier = FrameVerifier::new(ID.public(), "00".repeat(32));
    if let Ok(ServerMessage::Signed { frame }) = serde_json::from_str(text) {
        assert!(
            verifier.open(&frame).is_err(),
            "a frame the fuzzer made passed the signature check"
        );
    }
}

/// Deltas applied to a netmap: any sequence of changes applies without a
/// panic, and applying the coalesced batch gives the same netmap as
/// applying them one by one.
pub fn deltas(data: &[u8]) {
    // Two bytes of netmap length (big-endian), the netmap, the changes.
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let (map_bytes, changes_bytes) =
        rest.split_at(usize::from(u16::from_be_bytes(*len)).min(rest.len()));
    let Ok(map) = serde_json::from_slice::<NetMap>(map_bytes) else {
        return;
    };
    let Ok(changes) = serde_json::from_slice::<Vec<PeerChange>>(changes_bytes) else {
        return;
    };
    let mut one_by_one = map.clone();
    for c in &changes {
        one_by_one.apply(std::slice::from_ref(c));
    }
    let mut batched = map;
    batched.apply(&coalesce(changes));
    assert_eq!(one_by_one, batched, "coalescing changed the outcome");
}
