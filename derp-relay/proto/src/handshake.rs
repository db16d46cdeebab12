//! The client's proof of its node key.
//!
//! The relay opens with its public key and a fresh challenge. The client
//! answers with its node key and a box sealed to the relay: ChaCha20-Poly1305
//! under `SHA-256(domain || X25519(client, relay) || client || relay)`, holding
//! the challenge. Only the holder of the node key's private half can seal a
//! box the relay opens, and the challenge makes an old box useless on a new
//! connection.

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use x25519_dalek::{PublicKey, StaticSecret};

use super::frame::{Frame, Key};

const DOMAIN: &[u8] = b"crank-mesh/derp/v1";
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest sealed client info accepted.
pub const MAX_SEALED: usize = 1024;

/// What the client seals.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    pub version: u32,
    /// The relay's challenge, hex.
    pub challenge: String,
    /// Pre-shared key of a relay mesh, when the client is another relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandshakeError {
    #[error("client key is not a usable X25519 key")]
    WeakKey,
    #[error("sealed client info does not open: wrong key")]
    BadSeal,
    #[error("client info is not valid: {0}")]
    BadInfo(String),
    #[error("client info answers another challenge")]
    WrongChallenge,
    #[error("client speaks protocol version {0}")]
    Version(u32),
    #[error("sealed client info is too large")]
    TooLarge,
}

fn cipher(
    shared: &x25519_dalek::SharedSecret,
    client: &Key,
    relay: &Key,
) -> Result<ChaCha20Poly1305, HandshakeError> {
    if !shared.was_contributory() {
        return Err(HandshakeError::WeakKey);
    }
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(shared.as_bytes());
    h.update(client);
    h.update(relay);
    Ok(ChaCha20Poly1305::new(&h.finalize()))
}

/// A fresh challenge for a new connection.
pub fn challenge() -> [u8; 16] {
    let mut c = [0u8; 16];
    OsRng.fill_bytes(&mut c);
    c
}

/// Client side: the `ClientInfo` frame answering `challenge`.
pub fn seal(
    node_private: &StaticSecret,
    relay: &Key,
    challenge: &[u8; 16],
    mesh_key: Option<String>,
) -> Result<Frame, HandshakeError> {
    let node_key = PublicKey::from(node_private).to_bytes();
    let shared = node_private.diffie_hellman(&PublicKey::from(*relay));
    let cipher = cipher(&shared, &node_key, relay)?;
    let info = ClientInfo {
        version: PROTOCOL_VERSION,
        challenge: hex::encode(challenge),
        mesh_key,
    };
    let plain = serde_json::to_vec(&info).map_err(|e| HandshakeError::BadInfo(e.to_string()))?;
    let mut nonce = [0u8; 12];
    OsRng.fill_bytes(&mut nonce);
    let sealed = cipher
        .encrypt(Nonce::from_slice(&nonce), plain.as_slice())
        .map_err(|_| HandshakeError::BadSeal)?;
    Ok(Frame::ClientInfo {
        node_key,
        nonce,
        sealed,
    })
}

/// Relay side: opens a client's sealed info and checks it.
pub fn open(
    relay_private: &StaticSecret,
    challenge: &[u8; 16],
    node_key: &Key,
    nonce: &[u8; 12],
    sealed: &[u8],
) -> Result<ClientInfo, HandshakeError> {
    if sealed.len() > MAX_SEALED {
        return Err(HandshakeError::TooLarge);
    }
    let relay = PublicKey::from(relay_private).to_bytes();
    let shared = relay_private.diffie_hellman(&PublicKey::from(*node_key));
    let cipher = cipher(&shared, node_key, &relay)?;
    let plain = cipher
        .decrypt(Nonce::from_slice(nonce), sealed)
        .map_err(|_| HandshakeError::BadSeal)?;
    let info: ClientInfo =
        serde_json::from_slice(&plain).map_err(|e| HandshakeError::BadInfo(e.to_string()))?;
    if info.version != PROTOCOL_VERSION {
        return Err(HandshakeError::Version(info.version));
    }
    if info.challenge != hex::encode(challenge) {
        return Err(HandshakeError::WrongChallenge);
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys() -> (StaticSecret, StaticSecret) {
        (
            StaticSecret::random_from_rng(OsRng),
            StaticSecret::random_from_rng(OsRng),
        )
    }

    fn unpack(f: Frame) -> (Key, [u8; 12], Vec<u8>) {
        match f {
            Frame::ClientInfo {
                node_key,
                nonce,
                sealed,
            } => (node_key, nonce, sealed),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn proves_the_node_key() {
        let (client, relay) = keys();
        let relay_pub = PublicKey::from(&relay).to_bytes();
        let ch = challenge();
        let (node_key, nonce, sealed) =
            unpack(seal(&client, &relay_pub, &ch, Some("psk".into())).unwrap());
        let info = open(&relay, &ch, &node_key, &nonce, &sealed).unwrap();
        assert_eq!(info.mesh_key.as_deref(), Some("psk"));

        // Replayed on a connection with another challenge.
        assert_eq!(
            open(&relay, &challenge(), &node_key, &nonce, &sealed),
            Err(HandshakeError::WrongChallenge)
        );
        // Claiming someone else's key.
        let (other, _) = keys();
        let claimed = PublicKey::from(&other).to_bytes();
        assert_eq!(
            open(&relay, &ch, &claimed, &nonce, &sealed),
            Err(HandshakeError::BadSeal)
        );
        // Sealed to another relay.
        let (_, relay2) = keys();
        assert_eq!(
            open(&relay2, &ch, &node_key, &nonce, &sealed),
            Err(HandshakeError::BadSeal)
        );
        // A low-order key gives no secret.
        assert_eq!(
            open(&relay, &ch, &[0u8; 32], &nonce, &sealed),
            Err(HandshakeError::WeakKey)
        );
    }

    proptest! {
        #[test]
        fn garbage_never_opens_or_panics(key in any::<[u8; 32]>(), nonce in any::<[u8; 12]>(), sealed in proptest::collection::vec(any::<u8>(), 0..200)) {
            let relay = StaticSecret::random_from_rng(OsRng);
            prop_assert!(open(&relay, &[0; 16], &key, &nonce, &sealed).is_err());
        }
    }
}
