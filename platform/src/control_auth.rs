//! How a device and its coordinator prove themselves to each other, beyond
//! what TLS gives.
//!
//! - The coordinator has an **identity key** (Ed25519). A device learns it at
//!   `up` (or is given it) and pins it: every message of the map stream after
//!   the hello is signed by it, bound to the connection's nonce and to its
//!   position in the stream, so neither a stolen CA certificate nor a replay
//!   of another connection's messages can feed a device a netmap.
//! - The coordinator also has a **proof key** (X25519), published signed by
//!   the identity key ([`CoordinatorInfo`]). A device claiming a node key
//!   proves it holds the private half: an HMAC keyed by the X25519 agreement
//!   of the node key and the proof key ([`node_proof`]), over the device key
//!   and the signed request's timestamp. Nobody else can compute it, and it
//!   is worthless under another device key.
//! - The map-stream hello signs the **server's nonce** of that connection, so
//!   a captured hello opens no other stream.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::keys::{
    CoordinatorPrivate, CoordinatorPublic, DevicePublic, NodePrivate, NodePublic, ProofPrivate,
    ProofPublic,
};

/// Domain of the coordinator's signature over its proof key.
const DOMAIN_INFO: &[u8] = b"crank-mesh/coordinator-info/v1";
/// Domain of map-stream messages signed by the coordinator.
const DOMAIN_SERVER_FRAME: &[u8] = b"crank-mesh/map-server/v1";
/// Domain of node-key proofs.
const DOMAIN_NODE_PROOF: &[u8] = b"crank-mesh/node-proof/v1";

/// Bytes of a map-stream nonce.
pub const NONCE_BYTES: usize = 32;

/// What a purpose a node-key proof is for (it is valid for no other).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProofPurpose {
    Register,
    RotateKey,
}

impl ProofPurpose {
    fn tag(self) -> &'static [u8] {
        match self {
            ProofPurpose::Register => b"register",
            ProofPurpose::RotateKey => b"rotate-key",
        }
    }
}

/// `GET /api/v1/coordinator`: who the coordinator is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorInfo {
    /// Signs the map stream; what a device pins.
    pub coordinator_key: CoordinatorPublic,
    /// Node-key proofs are made against this key.
    pub proof_key: ProofPublic,
    /// The identity key's signature over the proof key, hex.
    pub proof_key_signature: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the coordinator's proof key is not signed by its identity key")]
    BadInfoSignature,
    #[error("the coordinator presented key {got}, but this device trusts {pinned}: refusing (if the coordinator was reinstalled, run `meshd up` with --coordinator-key)")]
    KeyMismatch {
        /// Both in their text form (`coordkey:…`).
        pinned: String,
        got: String,
    },
    #[error("map-stream message {got} arrived where {expected} was due")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("map-stream message is not signed by the coordinator")]
    BadFrameSignature,
    #[error("signature is not 64 bytes of hex")]
    MalformedSignature,
}

fn sig_from_hex(text: &str) -> Result<[u8; 64], AuthError> {
    let mut sig = [0u8; 64];
    hex::decode_to_slice(text, &mut sig).map_err(|_| AuthError::MalformedSignature)?;
    Ok(sig)
}

/// The coordinator's keys.
#[derive(Clone)]
pub struct CoordinatorIdentity {
    pub identity: CoordinatorPrivate,
    pub proof: ProofPrivate,
}

impl std::fmt::Debug for CoordinatorIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorIdentity")
            .field("identity", &self.identity.public())
            .field("proof", &self.proof.public())
            .finish()
    }
}

fn info_message(proof_key: &ProofPublic) -> Vec<u8> {
    let mut m = DOMAIN_INFO.to_vec();
    m.push(0);
    m.extend_from_slice(proof_key.as_bytes());
    m
}

impl CoordinatorIdentity {
    pub fn generate() -> Self {
        CoordinatorIdentity {
            identity: CoordinatorPrivate::generate(),
            proof: ProofPrivate::generate(),
        }
    }

    pub fn public(&self) -> CoordinatorPublic {
        self.identity.public()
    }

    pub fn info(&self) -> CoordinatorInfo {
        let proof_key = self.proof.public();
        CoordinatorInfo {
            coordinator_key: self.identity.public(),
            proof_key,
            proof_key_signature: hex::encode(self.identity.sign(&info_message(&proof_key))),
        }
    }

    /// Checks a device's proof that it holds `node`'s private half.
    pub fn check_node_proof(
        &self,
        purpose: ProofPurpose,
        node: &NodePublic,
        device: &DevicePublic,
        timestamp: u64,
        proof: &str,
    ) -> bool {
        let Ok(proof) = hex::decode(proof) else {
            return false;
        };
        let shared = self.proof.to_dalek().diffie_hellman(&node.to_dalek());
        if !shared.was_contributory() {
            return false;
        }
        proof_mac(
            purpose,
            shared.as_bytes(),
            node,
            &self.proof.public(),
            device,
            timestamp,
        )
        .verify_slice(&proof)
        .is_ok()
    }

    /// Signs the `seq`-th message of the map stream opened with `nonce`.
    pub fn sign_frame(&self, nonce: &str, seq: u64, payload: String) -> SignedFrame {
        let signature = hex::encode(self.identity.sign(&frame_message(nonce, seq, &payload)));
        SignedFrame {
            seq,
            payload,
            signature,
        }
    }
}

impl CoordinatorInfo {
    /// Checks the proof key's signature, and the identity against `pinned`
    /// when the device already trusts a key.
    pub fn check(&self, pinned: Option<&CoordinatorPublic>) -> Result<(), AuthError> {
        if let Some(pinned) = pinned {
            if *pinned != self.coordinator_key {
                return Err(AuthError::KeyMismatch {
                    pinned: pinned.to_string(),
                    got: self.coordinator_key.to_string(),
                });
            }
        }
        let sig = sig_from_hex(&self.proof_key_signature)?;
        if self
            .coordinator_key
            .verify(&info_message(&self.proof_key), &sig)
        {
            Ok(())
        } else {
            Err(AuthError::BadInfoSignature)
        }
    }
}

fn proof_mac(
    purpose: ProofPurpose,
    shared: &[u8; 32],
    node: &NodePublic,
    proof_key: &ProofPublic,
    device: &DevicePublic,
    timestamp: u64,
) -> Hmac<Sha256> {
    let mut k = Sha256::new();
    k.update(DOMAIN_NODE_PROOF);
    k.update(shared);
    k.update(node.as_bytes());
    k.update(proof_key.as_bytes());
    let mut mac = Hmac::<Sha256>::new_from_slice(&k.finalize()).expect("HMAC takes any key length");
    mac.update(purpose.tag());
    mac.update(&[0]);
    mac.update(device.as_bytes());
    mac.update(&timestamp.to_be_bytes());
    mac
}

/// A device's proof that it holds `node` (hex), for a request signed by
/// `device` at `timestamp`; `None` when `proof_key` is a degenerate key.
pub fn node_proof(
    purpose: ProofPurpose,
    node: &NodePrivate,
    proof_key: &ProofPublic,
    device: &DevicePublic,
    timestamp: u64,
) -> Option<String> {
    let shared = node.to_dalek().diffie_hellman(&proof_key.to_dalek());
    if !shared.was_contributory() {
        return None;
    }
    let mac = proof_mac(
        purpose,
        shared.as_bytes(),
        &node.public(),
        proof_key,
        device,
        timestamp,
    );
    Some(hex::encode(mac.finalize().into_bytes()))
}

fn frame_message(nonce: &str, seq: u64, payload: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN_SERVER_FRAME.len() + nonce.len() + payload.len() + 32);
    m.extend_from_slice(DOMAIN_SERVER_FRAME);
    m.push(0);
    m.extend_from_slice(nonce.as_bytes());
    m.push(0);
    m.extend_from_slice(seq.to_string().as_bytes());
    m.push(0);
    m.extend_from_slice(payload.as_bytes());
    m
}

/// A map-stream message signed by the coordinator: `payload` is the JSON text
/// of a [`crate::api::ServerMessage`], the `seq`-th (from 0) of the stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedFrame {
    pub seq: u64,
    pub payload: String,
    pub signature: String,
}

/// The device's side of one map stream: checks that each message is the
/// next one of this connection, signed by the pinned coordinator.
#[derive(Debug)]
pub struct FrameVerifier {
    key: CoordinatorPublic,
    nonce: String,
    next: u64,
}

impl FrameVerifier {
    pub fn new(key: CoordinatorPublic, nonce: String) -> Self {
        FrameVerifier {
            key,
            nonce,
            next: 0,
        }
    }

    /// The payload of `frame` once it checks out.
    pub fn open<'a>(&mut self, frame: &'a SignedFrame) -> Result<&'a str, AuthError> {
        if frame.seq != self.next {
            return Err(AuthError::OutOfOrder {
                expected: self.next,
                got: frame.seq,
            });
        }
        let sig = sig_from_hex(&frame.signature)?;
        if !self
            .key
            .verify(&frame_message(&self.nonce, frame.seq, &frame.payload), &sig)
        {
            return Err(AuthError::BadFrameSignature);
        }
        self.next += 1;
        Ok(&frame.payload)
    }
}

/// A fresh nonce for a map stream, hex.
pub fn new_nonce() -> String {
    use rand_core::{OsRng, RngCore};
    let mut n = [0u8; NONCE_BYTES];
    OsRng.fill_bytes(&mut n);
    hex::encode(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::DevicePrivate;

    #[test]
    fn only_the_node_key_holder_can_prove_it() {
        let coord = CoordinatorIdentity::generate();
        let info = coord.info();
        info.check(None).unwrap();
        let node = NodePrivate::generate();
        let device = DevicePrivate::generate().public();
        let proof = node_proof(
            ProofPurpose::Register,
            &node,
            &info.proof_key,
            &device,
            1000,
        )
        .unwrap();
        assert!(coord.check_node_proof(
            ProofPurpose::Register,
            &node.public(),
            &device,
            1000,
            &proof
        ));
        // Someone else's device key, another time, another purpose, another
        // coordinator, another node key: all fail.
        let thief = DevicePrivate::generate().public();
        assert!(!coord.check_node_proof(
            ProofPurpose::Register,
            &node.public(),
            &thief,
            1000,
            &proof
        ));
        assert!(!coord.check_node_proof(
            ProofPurpose::Register,
            &node.public(),
            &device,
            1001,
            &proof
        ));
        assert!(!coord.check_node_proof(
            ProofPurpose::RotateKey,
            &node.public(),
            &device,
            1000,
            &proof
        ));
        assert!(!CoordinatorIdentity::generate().check_node_proof(
            ProofPurpose::Register,
            &node.public(),
            &device,
            1000,
            &proof
        ));
        let other = NodePrivate::generate().public();
        assert!(!coord.check_node_proof(ProofPurpose::Register, &other, &device, 1000, &proof));
        assert!(!coord.check_node_proof(
            ProofPurpose::Register,
            &node.public(),
            &device,
            1000,
            "zz"
        ));
        // A proof made against a forged proof key does not check either.
        let forged = ProofPrivate::generate().public();
        let p2 = node_proof(ProofPurpose::Register, &node, &forged, &device, 1000).unwrap();
        assert!(!coord.check_node_proof(
            ProofPurpose::Register,
            &node.public(),
            &device,
            1000,
            &p2
        ));
    }

    #[test]
    fn info_is_pinned_and_signed() {
        let coord = CoordinatorIdentity::generate();
        let mut info = coord.info();
        info.check(Some(&coord.public())).unwrap();
        let other = CoordinatorIdentity::generate();
        assert!(matches!(
            info.check(Some(&other.public())),
            Err(AuthError::KeyMismatch { .. })
        ));
        // A proof key swapped in by someone in the middle.
        info.proof_key = ProofPrivate::generate().public();
        assert_eq!(info.check(None), Err(AuthError::BadInfoSignature));
    }

    #[test]
    fn frames_bind_to_their_stream_and_their_place() {
        let coord = CoordinatorIdentity::generate();
        let nonce = new_nonce();
        let f0 = coord.sign_frame(&nonce, 0, "{\"type\":\"rotate_key\"}".into());
        let f1 = coord.sign_frame(&nonce, 1, "{\"type\":\"rotate_key\"}".into());
        let mut v = FrameVerifier::new(coord.public(), nonce.clone());
        // Out of order, then in order; a replay of an earlier one fails.
        assert!(matches!(
            v.open(&f1),
            Err(AuthError::OutOfOrder {
                expected: 0,
                got: 1
            })
        ));
        v.open(&f0).unwrap();
        v.open(&f1).unwrap();
        assert!(v.open(&f1).is_err());
        // Another connection's frames, another signer, a changed payload.
        let mut fresh = FrameVerifier::new(coord.public(), new_nonce());
        assert_eq!(fresh.open(&f0), Err(AuthError::BadFrameSignature));
        let mut v = FrameVerifier::new(CoordinatorIdentity::generate().public(), nonce.clone());
        assert_eq!(v.open(&f0), Err(AuthError::BadFrameSignature));
        let mut v = FrameVerifier::new(coord.public(), nonce);
        let mut tampered = f0.clone();
        tampered.payload = "{\"type\":\"full\"}".into();
        assert_eq!(v.open(&tampered), Err(AuthError::BadFrameSignature));
        tampered.signature = "00".into();
        assert_eq!(v.open(&tampered), Err(AuthError::MalformedSignature));
    }
}
