//! Path-discovery (disco) messages: pings, pongs and call-me-maybe, sealed
//! between two devices' disco keys.
//!
//! They travel beside WireGuard packets, over UDP and through relays, and
//! start with [`MAGIC`], which no WireGuard message does (those start with a
//! type byte 1–4 and three zero bytes), so a relay can queue them apart
//! without seeing inside.
//!
//! Wire form: `MAGIC | sender disco key (32) | nonce (12) | sealed`, where
//! `sealed` is ChaCha20-Poly1305 under `SHA-256(domain || X25519(sender,
//! receiver))` over `type u8 | body`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};

use crate::keys::{DiscoPrivate, DiscoPublic, NodePublic};

pub const MAGIC: &[u8; 6] = b"CMdsc\x01";
const DOMAIN: &[u8] = b"crank-mesh/disco/v1";
const HEADER: usize = 6 + 32 + 12;
/// Most endpoints one call-me-maybe carries.
pub const MAX_ENDPOINTS: usize = 32;

pub fn is_disco(packet: &[u8]) -> bool {
    packet.starts_with(MAGIC)
}

pub type TxId = [u8; 12];

pub fn new_tx_id() -> TxId {
    let mut t = [0u8; 12];
    OsRng.fill_bytes(&mut t);
    t
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// "Are you there on this path?" Carries the sender's node key.
    Ping { tx: TxId, node_key: NodePublic },
    /// The answer, saying where the ping came from as the answerer saw it.
    Pong { tx: TxId, src: SocketAddr },
    /// Sent through the relay: "ping me at these endpoints", so both sides
    /// send at once and open their NATs.
    CallMeMaybe { endpoints: Vec<SocketAddr> },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoError {
    #[error("not a disco message")]
    NotDisco,
    #[error("disco message too short")]
    Short,
    #[error("disco message does not open (wrong keys or tampered)")]
    BadSeal,
    #[error("disco message body is malformed")]
    Malformed,
}

fn cipher(mine: &DiscoPrivate, theirs: &DiscoPublic) -> ChaCha20Poly1305 {
    let shared = mine
        .to_dalek()
        .diffie_hellman(&x25519_dalek::PublicKey::from(*theirs.as_bytes()));
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(shared.as_bytes());
    ChaCha20Poly1305::new(&h.finalize())
}

fn put_addr(out: &mut Vec<u8>, a: &SocketAddr) {
    match a.ip() {
        IpAddr::V4(v4) => {
            out.push(4);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(6);
            out.extend_from_slice(&v6.octets());
        }
    }
    out.extend_from_slice(&a.port().to_be_bytes());
}

fn take_addr(b: &mut &[u8]) -> Result<SocketAddr, DiscoError> {
    let (&family, rest) = b.split_first().ok_or(DiscoError::Malformed)?;
    let len = match family {
        4 => 4,
        6 => 16,
        _ => return Err(DiscoError::Malformed),
    };
    if rest.len() < len + 2 {
        return Err(DiscoError::Malformed);
    }
    let ip: IpAddr = if len == 4 {
        Ipv4Addr::from(<[u8; 4]>::try_from(&rest[..4]).map_err(|_| DiscoError::Malformed)?).into()
    } else {
        Ipv6Addr::from(<[u8; 16]>::try_from(&rest[..16]).map_err(|_| DiscoError::Malformed)?).into()
    };
    let port = u16::from_be_bytes([rest[len], rest[len + 1]]);
    *b = &rest[len + 2..];
    Ok(SocketAddr::new(ip, port))
}

impl Message {
    fn body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        match self {
            Message::Ping { tx, node_key } => {
                out.push(1);
                out.extend_from_slice(tx);
                out.extend_from_slice(node_key.as_bytes());
            }
            Message::Pong { tx, src } => {
                out.push(2);
                out.extend_from_slice(tx);
                put_addr(&mut out, src);
            }
            Message::CallMeMaybe { endpoints } => {
                out.push(3);
                let n = endpoints.len().min(MAX_ENDPOINTS);
                out.push(n as u8);
                for e in &endpoints[..n] {
                    put_addr(&mut out, e);
                }
            }
        }
        out
    }

    fn parse(b: &[u8]) -> Result<Message, DiscoError> {
        let (&kind, mut rest) = b.split_first().ok_or(DiscoError::Malformed)?;
        let msg = match kind {
            1 | 2 => {
                if rest.len() < 12 {
                    return Err(DiscoError::Malformed);
                }
                let tx: TxId = rest[..12].try_into().map_err(|_| DiscoError::Malformed)?;
                rest = &rest[12..];
                if kind == 1 {
                    let key: [u8; 32] = rest
                        .get(..32)
                        .ok_or(DiscoError::Malformed)?
                        .try_into()
                        .map_err(|_| DiscoError::Malformed)?;
                    rest = &rest[32..];
                    Message::Ping {
                        tx,
                        node_key: NodePublic::from_bytes(key),
                    }
                } else {
                    Message::Pong {
                        tx,
                        src: take_addr(&mut rest)?,
                    }
                }
            }
            3 => {
                let (&n, r) = rest.split_first().ok_or(DiscoError::Malformed)?;
                rest = r;
                if usize::from(n) > MAX_ENDPOINTS {
                    return Err(DiscoError::Malformed);
                }
                let mut endpoints = Vec::with_capacity(n.into());
                for _ in 0..n {
                    endpoints.push(take_addr(&mut rest)?);
                }
                Message::CallMeMaybe { endpoints }
            }
            _ => return Err(DiscoError::Malformed),
        };
        if !rest.is_empty() {
            return Err(DiscoError::Malformed);
        }
        Ok(msg)
    }

    /// Seals the message from `from` to `to`.
    pub fn seal(&self, from: &DiscoPrivate, to: &DiscoPublic) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        OsRng.fill_bytes(&mut nonce);
        let sealed = cipher(from, to)
            .encrypt(Nonce::from_slice(&nonce), self.body().as_slice())
            .expect("sealing into a Vec cannot fail");
        let mut out = Vec::with_capacity(HEADER + sealed.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(from.public().as_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }
}

/// The sender's disco key, read without opening the box (to find the peer).
pub fn sender(packet: &[u8]) -> Result<DiscoPublic, DiscoError> {
    if !is_disco(packet) {
        return Err(DiscoError::NotDisco);
    }
    let key: [u8; 32] = packet
        .get(6..38)
        .ok_or(DiscoError::Short)?
        .try_into()
        .map_err(|_| DiscoError::Short)?;
    Ok(DiscoPublic::from_bytes(key))
}

/// Opens a message sent to `me` by the holder of `from`.
pub fn open(packet: &[u8], me: &DiscoPrivate, from: &DiscoPublic) -> Result<Message, DiscoError> {
    if packet.len() < HEADER + 16 {
        return Err(if is_disco(packet) {
            DiscoError::Short
        } else {
            DiscoError::NotDisco
        });
    }
    if sender(packet)? != *from {
        return Err(DiscoError::BadSeal);
    }
    let nonce = &packet[38..50];
    let plain = cipher(me, from)
        .decrypt(Nonce::from_slice(nonce), &packet[HEADER..])
        .map_err(|_| DiscoError::BadSeal)?;
    Message::parse(&plain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn wireguard_messages_are_never_disco() {
        for kind in 1u8..=4 {
            let mut wg = vec![kind, 0, 0, 0];
            wg.extend_from_slice(&[0x43; 40]);
            assert!(!is_disco(&wg));
        }
        assert!(!is_disco(b"CMd"));
    }

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
        ]
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<[u8; 12]>(), any::<[u8; 32]>()).prop_map(|(tx, k)| Message::Ping {
                tx,
                node_key: NodePublic::from_bytes(k)
            }),
            (any::<[u8; 12]>(), arb_addr()).prop_map(|(tx, src)| Message::Pong { tx, src }),
            proptest::collection::vec(arb_addr(), 0..MAX_ENDPOINTS)
                .prop_map(|endpoints| Message::CallMeMaybe { endpoints }),
        ]
    }

    proptest! {
        #[test]
        fn messages_round_trip_between_the_two_keys(m in arb_message()) {
            let (a, b) = (DiscoPrivate::generate(), DiscoPrivate::generate());
            let sealed = m.seal(&a, &b.public());
            prop_assert!(is_disco(&sealed));
            prop_assert_eq!(sender(&sealed).unwrap(), a.public());
            prop_assert_eq!(open(&sealed, &b, &a.public()).unwrap(), m.clone());
            // Nobody else opens it.
            let c = DiscoPrivate::generate();
            prop_assert_eq!(open(&sealed, &c, &a.public()), Err(DiscoError::BadSeal));
            // Bodies reject trailing bytes.
            let mut body = m.body();
            body.push(0);
            prop_assert_eq!(Message::parse(&body), Err(DiscoError::Malformed));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            let me = DiscoPrivate::generate();
            let _ = sender(&bytes);
            let _ = open(&bytes, &me, &DiscoPrivate::generate().public());
            let _ = Message::parse(&bytes);
        }
    }

    #[test]
    fn tampering_is_detected() {
        let (a, b) = (DiscoPrivate::generate(), DiscoPrivate::generate());
        let mut sealed = Message::CallMeMaybe {
            endpoints: vec!["10.0.0.1:5".parse().unwrap()],
        }
        .seal(&a, &b.public());
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert_eq!(open(&sealed, &b, &a.public()), Err(DiscoError::BadSeal));
    }
}
