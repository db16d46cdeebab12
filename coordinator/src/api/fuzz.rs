//! The fuzz entry point for the JSON bodies the coordinator accepts from
//! anyone who can reach it: the shapes are decoded and checked exactly as
//! the handlers do, up to where the database would be asked. Used by the
//! `coordinator/fuzz` target and by a test replaying its seed corpus.

use platform::api::{
    ClientMessage, CreateNetwork, CreatePreauthKey, CreateWireguardPeer, MapHello, RegisterRequest,
};
use platform::jobs::{ReceiptBatch, MAX_RECEIPTS_PER_BATCH};
use platform::keys::NodePublic;
use platform::ledger::{claimed_ids, open_receipt, BalanceRequest, GrantRequest, DOMAIN_BALANCE};
use platform::people::{
    ChangeRole, CreateInvite, DeviceCodeRequest, KeyExpiryOverride, RotateKeyRequest,
    SettingsChange,
};
use platform::signed::{Signed, DOMAIN_DEVICE_CODE, DOMAIN_MAP, DOMAIN_REGISTER, DOMAIN_ROTATE};
use serde::de::DeserializeOwned;

/// A fixed time, so a run is the same every time.
const NOW: u64 = 1_750_000_000;

fn decode<T: DeserializeOwned>(body: &[u8]) -> Option<T> {
    serde_json::from_slice(body).ok()
}

/// Feeds one body to the decoders and checks: the first byte picks the
/// endpoint, the rest is the body. Must never panic.
#[doc(hidden)]
pub fn fuzz_api_body(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 8 {
        // Signed envelopes: registration, pairing, rotation, map hello,
        // balance questions.
        0 => {
            if let Some(signed) = decode::<Signed>(body) {
                let _ = signed.verify::<RegisterRequest>(DOMAIN_REGISTER, NOW);
                let _ = signed.verify::<DeviceCodeRequest>(DOMAIN_DEVICE_CODE, NOW);
                let _ = signed.verify::<RotateKeyRequest>(DOMAIN_ROTATE, NOW);
                let _ = signed.verify::<MapHello>(DOMAIN_MAP, NOW);
                let _ = signed.verify::<BalanceRequest>(DOMAIN_BALANCE, NOW);
            }
        }
        // What a registration carries once its signature checked out.
        1 => {
            if let Some(req) = decode::<RegisterRequest>(body) {
                let _ = crate::store::check_registration(&req);
            }
        }
        // Messages on the map stream: endpoint and capability reports.
        2 => {
            if let Ok(text) = std::str::from_utf8(body) {
                let _ = super::map::parse_client_message(text);
            }
            let _ = decode::<ClientMessage>(body);
        }
        // Receipts delivered by workers.
        3 => {
            if let Some(batch) = decode::<ReceiptBatch>(body) {
                for signed in batch.receipts.iter().take(MAX_RECEIPTS_PER_BATCH) {
                    let _ = claimed_ids(signed);
                    let _ = open_receipt(signed, NOW);
                }
            }
        }
        4 => {
            if let Some(v) = decode::<serde_json::Value>(body) {
                let _ = crate::store::compute_rules::check_rules(&v);
            }
            let _ = decode::<GrantRequest>(body);
        }
        5 => {
            if let Some(peer) = decode::<CreateWireguardPeer>(body) {
                let _ = NodePublic::from_base64(&peer.public_key);
            }
            let _ = decode::<CreatePreauthKey>(body);
            let _ = decode::<KeyExpiryOverride>(body);
        }
        6 => {
            let _ = decode::<CreateNetwork>(body);
            let _ = decode::<SettingsChange>(body);
            let _ = decode::<CreateInvite>(body);
            let _ = decode::<ChangeRole>(body);
        }
        _ => {
            let _ = decode::<DeviceCodeRequest>(body);
            let _ = decode::<RotateKeyRequest>(body);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every seed of the fuzz target's corpus goes through without a panic.
    #[test]
    fn replays_the_seed_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/api_body");
        let mut seen = [false; 8];
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            if let Some(&b) = data.first() {
                seen[usize::from(b % 8)] = true;
            }
            fuzz_api_body(&data);
            n += 1;
        }
        assert!(n >= 8, "the corpus has seeds ({n})");
        assert!(
            seen.iter().all(|s| *s),
            "every endpoint has a seed: {seen:?}"
        );
    }

    #[test]
    fn odd_inputs_do_not_panic() {
        for data in [
            &b""[..],
            b"\x00",
            b"\x01{}",
            b"\x02{\"type\":\"endpoints\",\"endpoints\":[]}",
            b"\x03{\"receipts\":[{}]}",
            b"\x00{\"device_key\":\"\",\"payload\":\"\",\"signature\":\"zz\"}",
        ] {
            fuzz_api_body(data);
        }
    }
}
