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
//! receiver))` over `stamp u64 (big-endian) | type u8 | body`.
//!
//! The stamp grows with every message a sender instance seals (see
//! [`Stamper`]); a receiver keeps a [`ReplayWindow`] per sender and drops
//! what it has seen or what is too old, so a captured message replayed
//! (from any source address) does nothing.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};

use crate::keys::{DiscoPrivate, DiscoPublic, NodePublic};

pub const MAGIC: &[u8; 6] = b"CMdsc\x01";
const DOMAIN: &[u8] = b"crank-mesh/disco/v1";
const HEADER: usize = 6 + 32 + 12;
const STAMP: usize = 8;
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

/// The key two disco keys seal under. It costs a Diffie-Hellman, so a
/// receiver computes it once per peer, not per message (a flood of
/// messages naming a known sender must not cost a DH each).
#[derive(Clone)]
pub struct SharedKey(ChaCha20Poly1305);

impl SharedKey {
    pub fn new(mine: &DiscoPrivate, theirs: &DiscoPublic) -> Self {
        let shared = mine
            .to_dalek()
            .diffie_hellman(&x25519_dalek::PublicKey::from(*theirs.as_bytes()));
        let mut h = Sha256::new();
        h.update(DOMAIN);
        h.update(shared.as_bytes());
        SharedKey(ChaCha20Poly1305::new(&h.finalize()))
    }
}

impl std::fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedKey(…)")
    }
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

    /// Seals the message from `from` to `to`, stamped with `stamp` (from
    /// the sender's [`Stamper`]).
    pub fn seal(&self, from: &DiscoPrivate, to: &DiscoPublic, stamp: u64) -> Vec<u8> {
        self.seal_with(&SharedKey::new(from, to), &from.public(), stamp)
    }

    /// [`Message::seal`] with the pair's key already at hand; `from` is
    /// the sender's public disco key.
    pub fn seal_with(&self, key: &SharedKey, from: &DiscoPublic, stamp: u64) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        OsRng.fill_bytes(&mut nonce);
        let mut plain = stamp.to_be_bytes().to_vec();
        plain.extend_from_slice(&self.body());
        let sealed = key
            .0
            .encrypt(Nonce::from_slice(&nonce), plain.as_slice())
            .expect("sealing into a Vec cannot fail");
        let mut out = Vec::with_capacity(HEADER + sealed.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(from.as_bytes());
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

/// An opened message and the stamp its sender sealed it with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    pub stamp: u64,
    pub message: Message,
}

/// Opens a message sent to `me` by the holder of `from`.
pub fn open(packet: &[u8], me: &DiscoPrivate, from: &DiscoPublic) -> Result<Opened, DiscoError> {
    open_with(packet, &SharedKey::new(me, from), from)
}

/// [`open`] with the pair's key already at hand.
pub fn open_with(packet: &[u8], key: &SharedKey, from: &DiscoPublic) -> Result<Opened, DiscoError> {
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
    let plain = key
        .0
        .decrypt(Nonce::from_slice(nonce), &packet[HEADER..])
        .map_err(|_| DiscoError::BadSeal)?;
    let (stamp, body) = plain.split_at_checked(STAMP).ok_or(DiscoError::Malformed)?;
    let stamp = u64::from_be_bytes(stamp.try_into().map_err(|_| DiscoError::Malformed)?);
    Ok(Opened {
        stamp,
        message: Message::parse(body)?,
    })
}

/// Hands out the stamps of one sender instance: nanoseconds of wall-clock
/// time, but always more than the last one, so they never repeat even if
/// the clock steps back.
#[derive(Debug, Default)]
pub struct Stamper(AtomicU64);

impl Stamper {
    /// The next stamp, given the wall clock `now_unix_ns`.
    pub fn next(&self, now_unix_ns: u64) -> u64 {
        let mut last = self.0.load(Ordering::Relaxed);
        loop {
            let next = now_unix_ns.max(last.saturating_add(1));
            match self
                .0
                .compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }
}

/// Stamps this far below the newest seen from a sender are refused
/// outright: messages may cross (relay and direct paths race), but not by
/// this much.
pub const REPLAY_WINDOW_NS: u64 = 10_000_000_000;
/// Stamps remembered per sender inside the window; past this, the oldest
/// is forgotten and everything up to it refused.
pub const REPLAY_REMEMBERED: usize = 256;

/// Which stamps one sender has already used (receiver side).
#[derive(Debug, Default, Clone)]
pub struct ReplayWindow {
    /// Stamps at or below this are refused.
    floor: u64,
    seen: BTreeSet<u64>,
}

impl ReplayWindow {
    /// Whether a message with `stamp` is new; records it if so.
    pub fn accept(&mut self, stamp: u64) -> bool {
        if stamp <= self.floor || self.seen.contains(&stamp) {
            return false;
        }
        self.seen.insert(stamp);
        let newest = self.seen.last().copied().unwrap_or(stamp);
        self.floor = self.floor.max(newest.saturating_sub(REPLAY_WINDOW_NS));
        while self.seen.len() > REPLAY_REMEMBERED {
            if let Some(oldest) = self.seen.pop_first() {
                self.floor = self.floor.max(oldest);
            }
        }
        let floor = self.floor;
        self.seen.retain(|s| *s > floor);
        true
    }
}

/// Runs arbitrary bytes through every disco decoder and checks what must
/// hold for any input. The body of the `disco_decode` fuzz target, and
/// replayed over its corpus in tests.
#[doc(hidden)]
pub fn fuzz_disco(data: &[u8]) {
    use std::sync::OnceLock;
    static KEYS: OnceLock<(DiscoPublic, DiscoPublic, SharedKey)> = OnceLock::new();
    let (me, them, key) = KEYS.get_or_init(|| {
        let (me, them) = (
            DiscoPrivate::from_bytes([1; 32]),
            DiscoPrivate::from_bytes([2; 32]),
        );
        (
            me.public(),
            them.public(),
            SharedKey::new(&me, &them.public()),
        )
    });
    let _ = sender(data);
    let _ = open_with(data, key, them);
    let _ = open_with(data, key, me);
    if let Ok(m) = Message::parse(data) {
        // Whatever decodes encodes back to the same bytes.
        assert_eq!(m.body(), data);
        let sealed = m.seal_with(key, them, 7);
        assert_eq!(
            open_with(&sealed, key, them),
            Ok(Opened {
                stamp: 7,
                message: m
            })
        );
    }
    // Stamps read from the input go through a replay window unharmed.
    let mut window = ReplayWindow::default();
    for chunk in data.chunks_exact(8) {
        let stamp = u64::from_be_bytes(chunk.try_into().unwrap_or([0; 8]));
        if window.accept(stamp) {
            assert!(!window.accept(stamp), "a stamp is accepted once");
        }
    }
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
        fn messages_round_trip_between_the_two_keys(m in arb_message(), stamp in any::<u64>()) {
            let (a, b) = (DiscoPrivate::generate(), DiscoPrivate::generate());
            let sealed = m.seal(&a, &b.public(), stamp);
            prop_assert!(is_disco(&sealed));
            prop_assert_eq!(sender(&sealed).unwrap(), a.public());
            prop_assert_eq!(
                open(&sealed, &b, &a.public()).unwrap(),
                Opened { stamp, message: m.clone() }
            );
            // The cached pair key opens it the same way, from either side.
            let key = SharedKey::new(&b, &a.public());
            prop_assert_eq!(
                open_with(&sealed, &key, &a.public()).unwrap().message,
                m.clone()
            );
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
        .seal(&a, &b.public(), 1);
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert_eq!(open(&sealed, &b, &a.public()), Err(DiscoError::BadSeal));
    }

    #[test]
    fn replayed_and_stale_stamps_are_refused() {
        let mut w = ReplayWindow::default();
        let t = 1_700_000_000_000_000_000u64;
        assert!(w.accept(t));
        assert!(!w.accept(t), "the same message again");
        // Crossing messages (a relayed one overtaken by a direct one) pass.
        assert!(w.accept(t + 5));
        assert!(w.accept(t + 3));
        assert!(!w.accept(t + 3));
        // Far ahead moves the window: what is now too old is refused,
        // even if never seen.
        let later = t + 60 * 1_000_000_000;
        assert!(w.accept(later));
        assert!(!w.accept(t + 4), "older than the window");
        assert!(w.accept(later - REPLAY_WINDOW_NS / 2));
    }

    #[test]
    fn a_flood_of_fresh_stamps_stays_bounded_and_still_refuses_replays() {
        let mut w = ReplayWindow::default();
        let t = 1_000u64;
        for i in 0..10_000 {
            assert!(w.accept(t + i));
        }
        assert!(w.seen.len() <= REPLAY_REMEMBERED);
        for i in 0..10_000 {
            assert!(!w.accept(t + i), "stamp {i} replayed");
        }
    }

    #[test]
    fn stamps_never_repeat_even_when_the_clock_steps_back() {
        let s = Stamper::default();
        let a = s.next(1_000);
        let b = s.next(1_000);
        let c = s.next(10);
        assert!(a < b && b < c, "{a} {b} {c}");
        assert_eq!(s.next(5_000), 5_000);
    }

    #[test]
    fn fuzz_corpus_replays_cleanly() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/disco_decode");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("seed corpus") {
            let path = entry.expect("corpus entry").path();
            fuzz_disco(&std::fs::read(&path).expect("corpus file"));
            n += 1;
        }
        assert!(n >= 5, "seed corpus has {n} files");
    }

    /// Regenerates the seed corpus of the `disco_decode` fuzz target:
    /// `cargo test -p platform -- --ignored write_disco_seed_corpus`.
    #[test]
    #[ignore = "writes fuzz/corpus/disco_decode"]
    fn write_disco_seed_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/disco_decode");
        std::fs::create_dir_all(&dir).unwrap();
        let (me, them) = (
            DiscoPrivate::from_bytes([1; 32]),
            DiscoPrivate::from_bytes([2; 32]),
        );
        let messages = [
            Message::Ping {
                tx: [7; 12],
                node_key: NodePublic::from_bytes([3; 32]),
            },
            Message::Pong {
                tx: [7; 12],
                src: "10.0.0.1:41641".parse().unwrap(),
            },
            Message::Pong {
                tx: [8; 12],
                src: "[2001:db8::1]:41641".parse().unwrap(),
            },
            Message::CallMeMaybe {
                endpoints: vec![
                    "192.0.2.1:1".parse().unwrap(),
                    "[2001:db8::2]:2".parse().unwrap(),
                ],
            },
        ];
        for (i, m) in messages.iter().enumerate() {
            let sealed = m.seal(&them, &me.public(), 1 + i as u64);
            std::fs::write(dir.join(format!("sealed-{i}")), &sealed).unwrap();
            std::fs::write(dir.join(format!("body-{i}")), m.body()).unwrap();
            std::fs::write(
                dir.join(format!("truncated-{i}")),
                &sealed[..sealed.len() / 2],
            )
            .unwrap();
        }
        std::fs::write(dir.join("magic-only"), MAGIC).unwrap();
        std::fs::write(
            dir.join("stamps"),
            [0u8, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 5],
        )
        .unwrap();
    }
}
