//! The public address of the engine's UDP socket as STUN servers see it.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use derp_proto::stun;
use rand_core::{OsRng, RngCore};

/// Unanswered requests are forgotten after this long.
const REQUEST_LIFETIME: Duration = Duration::from_secs(5);
const MAX_PENDING: usize = 16;

#[derive(Default)]
struct Inner {
    pending: Vec<(stun::TransactionId, Instant)>,
    seen: Option<SocketAddr>,
    /// Recent answers by transaction, for netcheck.
    answers: Vec<(stun::TransactionId, SocketAddr)>,
}

#[derive(Default)]
pub struct StunProbe {
    inner: Mutex<Inner>,
}

impl StunProbe {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new binding request to send, and its transaction id.
    pub fn request(&self, now: Instant) -> (stun::TransactionId, Vec<u8>) {
        let mut tx = [0u8; 12];
        OsRng.fill_bytes(&mut tx);
        let mut inner = self.lock();
        inner
            .pending
            .retain(|(_, at)| now.saturating_duration_since(*at) < REQUEST_LIFETIME);
        if inner.pending.len() >= MAX_PENDING {
            inner.pending.remove(0);
        }
        inner.pending.push((tx, now));
        (tx, stun::request(&tx))
    }

    /// The mapped address reported in answer to `tx`, once it came.
    pub fn answer(&self, tx: &stun::TransactionId) -> Option<SocketAddr> {
        self.lock()
            .answers
            .iter()
            .find(|(t, _)| t == tx)
            .map(|(_, a)| *a)
    }

    /// Consumes `datagram` if it answers one of our requests.
    pub fn take_response(&self, datagram: &[u8]) -> bool {
        // STUN success responses start 0x0101; WireGuard messages never do.
        if datagram.len() < 20 || datagram[0] != 0x01 || datagram[1] != 0x01 {
            return false;
        }
        let mut inner = self.lock();
        let found = inner
            .pending
            .iter()
            .enumerate()
            .find_map(|(i, (tx, _))| stun::parse_response(datagram, tx).map(|a| (i, a)));
        match found {
            Some((i, addr)) => {
                let (tx, _) = inner.pending.remove(i);
                let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
                inner.seen = Some(addr);
                if inner.answers.len() >= MAX_PENDING {
                    inner.answers.remove(0);
                }
                inner.answers.push((tx, addr));
                true
            }
            None => false,
        }
    }

    pub fn seen(&self) -> Option<SocketAddr> {
        self.lock().seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_answers_to_our_requests_count() {
        let probe = StunProbe::default();
        let (tx, req) = probe.request(Instant::now());
        assert_eq!(&req[8..20], &tx);
        let addr: SocketAddr = "203.0.113.7:41641".parse().unwrap();
        assert!(
            !probe.take_response(&stun::response(&[1; 12], addr)),
            "unknown transaction"
        );
        assert!(
            !probe.take_response(&[1, 0, 0, 0, 5, 5]),
            "WireGuard handshake"
        );
        assert!(probe.take_response(&stun::response(&tx, addr)));
        assert_eq!(probe.seen(), Some(addr));
        assert_eq!(probe.answer(&tx), Some(addr));
        assert!(
            !probe.take_response(&stun::response(&tx, addr)),
            "answered once"
        );
    }
}
