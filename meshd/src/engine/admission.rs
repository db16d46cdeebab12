//! The first look at a datagram from the UDP socket, before any session
//! work: what kind it is, and for handshakes whether they earn the costly
//! part at all.
//!
//! A handshake message costs a Diffie-Hellman (two for a response) before
//! the sender is known. So MAC1 (a keyed hash over our public key, cheap)
//! is checked here first, and a [`RateLimiter`] counts what passes: over
//! its budget for the second, a handshake must also carry a valid MAC2,
//! which only a sender that received our cookie reply at its source
//! address can compute; others get that cookie reply and nothing else.
//! What is admitted still goes to a separate handshake task through a
//! bounded queue, so the receive loop never does a DH itself.
//!
//! Pure apart from the limiter's own clock: no sockets, no peer table.

use std::net::IpAddr;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};

/// Handshake messages per second (all peers together) accepted on MAC1
/// alone; past it, senders must prove their address with a cookie.
pub const HANDSHAKES_PER_SEC: u64 = 100;

/// Room for a cookie reply (64 bytes on the wire).
pub const COOKIE_REPLY_LEN: usize = 64;

/// What the receive loop does with a datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// A handshake message with valid MACs, within budget: queue it for
    /// the handshake task.
    Handshake,
    /// A data packet or cookie reply for the session with this receiver
    /// index (the peer's slot is `index >> 8`).
    Session { receiver_index: u32 },
    /// Under load and without a valid MAC2: send this cookie reply (its
    /// length in the caller's buffer) back to the source, and drop the
    /// handshake.
    CookieReply(usize),
    /// Dropped.
    Drop(Refused),
}

/// Why a datagram was dropped before any session saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not a WireGuard message of a known type and size.
    Malformed,
    /// A handshake whose MAC1 is wrong: not meant for our key.
    BadMac,
    /// Under load with no source address to send a cookie to.
    UnderLoad,
}

/// Sorts `datagram`, received from `src`, checking handshake MACs against
/// `limiter`. A cookie reply is written to the start of `reply`, which
/// must hold [`COOKIE_REPLY_LEN`] bytes.
pub fn admit(
    limiter: &RateLimiter,
    src: Option<IpAddr>,
    datagram: &[u8],
    reply: &mut [u8],
) -> Admission {
    match limiter.verify_packet(src, datagram, reply) {
        Ok(Packet::HandshakeInit(_) | Packet::HandshakeResponse(_)) => Admission::Handshake,
        Ok(Packet::PacketData(p)) => Admission::Session {
            receiver_index: p.receiver_idx,
        },
        Ok(Packet::PacketCookieReply(p)) => Admission::Session {
            receiver_index: p.receiver_idx,
        },
        Err(TunnResult::WriteToNetwork(cookie)) => Admission::CookieReply(cookie.len()),
        Err(TunnResult::Err(WireGuardError::InvalidMac)) => Admission::Drop(Refused::BadMac),
        Err(TunnResult::Err(WireGuardError::UnderLoad)) => Admission::Drop(Refused::UnderLoad),
        Err(_) => Admission::Drop(Refused::Malformed),
    }
}

/// Cookie replies each source may get per second, and in a burst.
pub const COOKIE_REPLIES_PER_SEC: f64 = 20.0;
pub const COOKIE_REPLY_BURST: f64 = 5.0;
/// Sources tracked at once; past it the table starts again (a flood from
/// spoofed addresses cannot grow it).
const REPLY_SOURCES: usize = 4096;

/// Under load every handshake without a MAC2 earns a cookie reply: one
/// send per received packet, which a flood from one address would turn
/// into our biggest cost. So each source (an IPv4 address, an IPv6 /64)
/// gets a few a second and the rest are dropped unanswered, as
/// wireguard-go's per-source limiter does. A sender that got a cookie
/// needs no more than one per two minutes.
#[derive(Default)]
pub struct CookieReplyBudget {
    sources: std::collections::HashMap<[u8; 8], (f64, std::time::Instant)>,
}

impl CookieReplyBudget {
    /// Whether `src` has used up its cookie replies for now: it has been
    /// sending handshakes without our cookie while we were under load,
    /// faster than any real peer would. Its handshakes are then dropped
    /// before any MAC or cookie work (as wireguard-go limits handshakes per
    /// source), until its budget refills.
    pub fn exhausted(&self, src: IpAddr, now: std::time::Instant) -> bool {
        self.sources
            .get(&Self::key(src))
            .is_some_and(|(tokens, last)| {
                let refill =
                    now.saturating_duration_since(*last).as_secs_f64() * COOKIE_REPLIES_PER_SEC;
                tokens + refill < 1.0
            })
    }

    fn key(src: IpAddr) -> [u8; 8] {
        match src {
            IpAddr::V4(v4) => {
                let mut k = [0u8; 8];
                k[..4].copy_from_slice(&v4.octets());
                k[4] = 4;
                k
            }
            IpAddr::V6(v6) => {
                let mut k = [0u8; 8];
                k.copy_from_slice(&v6.octets()[..8]);
                k
            }
        }
    }

    /// Whether `src` may get a cookie reply at `now` (and spends one).
    pub fn allow(&mut self, src: IpAddr, now: std::time::Instant) -> bool {
        let key = Self::key(src);
        if self.sources.len() >= REPLY_SOURCES && !self.sources.contains_key(&key) {
            self.sources.clear();
        }
        let (tokens, last) = self.sources.entry(key).or_insert((COOKIE_REPLY_BURST, now));
        let refill = now.saturating_duration_since(*last).as_secs_f64() * COOKIE_REPLIES_PER_SEC;
        *tokens = (*tokens + refill).min(COOKIE_REPLY_BURST);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Runs arbitrary bytes through the admission path and the packet parser
/// under a limiter that is always under load (so the cookie path runs
/// too); checks what must hold for any input. The body of the
/// `wireguard_admission` fuzz target, and replayed over its corpus in
/// tests.
#[doc(hidden)]
#[cfg_attr(not(test), allow(dead_code))] // used by the fuzz target and tests
pub fn fuzz_admission(data: &[u8]) {
    use std::sync::OnceLock;
    static LIMITERS: OnceLock<(RateLimiter, RateLimiter)> = OnceLock::new();
    let (open, loaded) = LIMITERS.get_or_init(|| {
        let key = boringtun::x25519::PublicKey::from([9u8; 32]);
        (RateLimiter::new(&key, u64::MAX), RateLimiter::new(&key, 0))
    });
    let mut reply = [0u8; COOKIE_REPLY_LEN];
    let parsed = Tunn::parse_incoming_packet(data).is_ok();
    for (limiter, src) in [
        (open, Some(IpAddr::from([192, 0, 2, 1]))),
        (loaded, Some(IpAddr::from([192, 0, 2, 1]))),
        (loaded, None),
    ] {
        match admit(limiter, src, data, &mut reply) {
            Admission::Drop(Refused::Malformed) => assert!(!parsed),
            Admission::CookieReply(n) => {
                assert_eq!(n, COOKIE_REPLY_LEN);
                // A cookie reply is no bigger than what provoked it.
                assert!(n <= data.len());
                assert!(matches!(
                    Tunn::parse_incoming_packet(&reply[..n]),
                    Ok(Packet::PacketCookieReply(_))
                ));
            }
            Admission::Session { receiver_index } => {
                assert!(parsed);
                assert_eq!(data.get(4..8), Some(&receiver_index.to_le_bytes()[..]));
            }
            Admission::Handshake | Admission::Drop(_) => assert!(parsed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use platform::keys::NodePrivate;

    /// A handshake initiation from `tunn`, forced (even if one is in flight).
    fn initiation(tunn: &mut Tunn) -> Vec<u8> {
        let mut buf = vec![0u8; 256];
        match tunn.format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => panic!("no initiation"),
        }
    }

    fn tunn(from: &NodePrivate, to: &NodePrivate) -> Tunn {
        Tunn::new(from.to_dalek(), to.public().to_dalek(), None, None, 1, None)
    }

    #[test]
    fn handshakes_for_another_key_are_refused_on_mac1() {
        let (me, other, them) = (
            NodePrivate::generate(),
            NodePrivate::generate(),
            NodePrivate::generate(),
        );
        let limiter = RateLimiter::new(&me.public().to_dalek(), HANDSHAKES_PER_SEC);
        let mut reply = [0u8; COOKIE_REPLY_LEN];
        let src = Some(IpAddr::from([10, 0, 0, 2]));
        let mine = initiation(&mut tunn(&them, &me));
        assert_eq!(
            admit(&limiter, src, &mine, &mut reply),
            Admission::Handshake
        );
        let not_mine = initiation(&mut tunn(&them, &other));
        assert_eq!(
            admit(&limiter, src, &not_mine, &mut reply),
            Admission::Drop(Refused::BadMac)
        );
        // A flipped bit anywhere in the message breaks MAC1 too.
        let mut tampered = mine.clone();
        tampered[50] ^= 1;
        assert_eq!(
            admit(&limiter, src, &tampered, &mut reply),
            Admission::Drop(Refused::BadMac)
        );
    }

    #[test]
    fn over_budget_only_senders_holding_our_cookie_get_through() {
        let (me, them) = (NodePrivate::generate(), NodePrivate::generate());
        let limiter = RateLimiter::new(&me.public().to_dalek(), 3);
        let mut reply = [0u8; COOKIE_REPLY_LEN];
        let src = Some(IpAddr::from([10, 0, 0, 2]));
        let mut initiator = tunn(&them, &me);
        for _ in 0..3 {
            let init = initiation(&mut initiator);
            assert_eq!(
                admit(&limiter, src, &init, &mut reply),
                Admission::Handshake
            );
        }
        // Over budget: a cookie reply instead of a DH.
        let init = initiation(&mut initiator);
        let Admission::CookieReply(n) = admit(&limiter, src, &init, &mut reply) else {
            panic!("no cookie reply under load");
        };
        // Through a relay there is no address to prove: dropped.
        assert_eq!(
            admit(&limiter, None, &init, &mut reply),
            Admission::Drop(Refused::UnderLoad)
        );
        // The real initiator takes the cookie and retries with MAC2 ...
        let mut scratch = [0u8; 256];
        assert!(matches!(
            initiator.decapsulate(None, &reply[..n], &mut scratch),
            TunnResult::Done
        ));
        let retry = initiation(&mut initiator);
        assert_eq!(
            admit(&limiter, src, &retry, &mut reply),
            Admission::Handshake
        );
        // ... which does not carry over to another (spoofed) address.
        assert!(matches!(
            admit(
                &limiter,
                Some(IpAddr::from([10, 0, 0, 66])),
                &retry,
                &mut reply
            ),
            Admission::CookieReply(_)
        ));
    }

    #[test]
    fn each_source_gets_a_few_cookie_replies_a_second() {
        use std::time::{Duration, Instant};
        let mut budget = CookieReplyBudget::default();
        let t0 = Instant::now();
        let flooder: IpAddr = "192.0.2.7".parse().unwrap();
        assert!(!budget.exhausted(flooder, t0));
        let granted = (0..1000).filter(|_| budget.allow(flooder, t0)).count();
        assert_eq!(granted, COOKIE_REPLY_BURST as usize);
        assert!(
            budget.exhausted(flooder, t0),
            "its handshakes are dropped unread"
        );
        assert!(!budget.exhausted(flooder, t0 + Duration::from_millis(60)));
        // Others are not held back by it; an IPv6 /64 counts as one source.
        assert!(budget.allow("192.0.2.8".parse().unwrap(), t0));
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        let same_64 = (0..10)
            .filter(|i| budget.allow(v6(&format!("2001:db8::{i:x}")), t0))
            .count();
        assert_eq!(same_64, COOKIE_REPLY_BURST as usize);
        // A second later the flooder has earned its rate again, no more.
        let later = t0 + Duration::from_secs(1);
        let again = (0..1000).filter(|_| budget.allow(flooder, later)).count();
        assert_eq!(again, COOKIE_REPLY_BURST as usize, "refilled to the burst");
        // Spoofed sources cannot grow the table without bound.
        for i in 0..(REPLY_SOURCES as u32 * 3) {
            budget.allow(IpAddr::from(i.to_be_bytes()), later);
            assert!(budget.sources.len() <= REPLY_SOURCES);
        }
    }

    #[test]
    fn data_and_garbage_are_sorted_without_the_limiter() {
        let me = NodePrivate::generate();
        // Always under load: data must not care.
        let limiter = RateLimiter::new(&me.public().to_dalek(), 0);
        let mut reply = [0u8; COOKIE_REPLY_LEN];
        let mut data = vec![4u8, 0, 0, 0];
        data.extend_from_slice(&0x0000_2a01_u32.to_le_bytes());
        data.extend_from_slice(&[0u8; 8 + 16]);
        assert_eq!(
            admit(&limiter, None, &data, &mut reply),
            Admission::Session {
                receiver_index: 0x2a01
            }
        );
        for garbage in [&b""[..], b"x", &[1u8, 0, 0, 0, 5], &[4u8, 0, 0, 0, 1, 2]] {
            assert_eq!(
                admit(&limiter, None, garbage, &mut reply),
                Admission::Drop(Refused::Malformed)
            );
        }
    }

    #[test]
    fn fuzz_corpus_replays_cleanly() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus/wireguard_admission");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("seed corpus") {
            let path = entry.expect("corpus entry").path();
            fuzz_admission(&std::fs::read(&path).expect("corpus file"));
            n += 1;
        }
        assert!(n >= 5, "seed corpus has {n} files");
    }
}
