//! Handshake initiations that came before the coordinator told us about
//! their sender.
//!
//! A device that has just joined pings at once; its initiation races the
//! coordinator's delta that announces it to the peer. When the initiation
//! wins, the peer cannot answer it yet, and WireGuard's own retry would
//! come only after 5 s. So an initiation from a key we do not know (its
//! MACs checked, its static key decrypted) is kept for a few seconds, and
//! answered the moment a netmap makes its sender a peer. Bounded: a flood
//! of strangers only replaces older strangers, and a kept initiation is
//! run through the normal handshake path again (nothing is trusted because
//! it was kept).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use platform::keys::NodePublic;

use super::disco::Via;

/// Strangers remembered at once; the oldest makes room for a newcomer.
pub(super) const CAPACITY: usize = 64;
/// How long an initiation is worth answering: the sender retries after
/// WireGuard's REKEY_TIMEOUT (5 s) anyway.
pub(super) const KEEP_FOR: Duration = Duration::from_secs(5);

/// One kept initiation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Kept {
    pub datagram: Vec<u8>,
    pub via: Via,
    at: Instant,
}

#[derive(Default)]
pub(super) struct EarlyInitiations {
    kept: HashMap<NodePublic, Kept>,
}

impl EarlyInitiations {
    /// Keeps the latest initiation from `sender`.
    pub fn remember(&mut self, sender: NodePublic, datagram: &[u8], via: Via, now: Instant) {
        self.kept
            .retain(|_, k| now.saturating_duration_since(k.at) < KEEP_FOR);
        if !self.kept.contains_key(&sender) && self.kept.len() >= CAPACITY {
            let oldest = self
                .kept
                .iter()
                .min_by_key(|(_, k)| k.at)
                .map(|(key, _)| *key);
            if let Some(key) = oldest {
                self.kept.remove(&key);
            }
        }
        self.kept.insert(
            sender,
            Kept {
                datagram: datagram.to_vec(),
                via,
                at: now,
            },
        );
    }

    /// Takes the fresh initiations whose sender `is_peer` now says is one.
    pub fn take_known(&mut self, is_peer: impl Fn(&NodePublic) -> bool, now: Instant) -> Vec<Kept> {
        if self.kept.is_empty() {
            return Vec::new();
        }
        let known: Vec<NodePublic> = self.kept.keys().filter(|k| is_peer(k)).copied().collect();
        known
            .into_iter()
            .filter_map(|key| self.kept.remove(&key))
            .filter(|k| now.saturating_duration_since(k.at) < KEEP_FOR)
            .collect()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.kept.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use platform::keys::NodePrivate;

    fn udp(port: u16) -> Via {
        Via::Udp(std::net::SocketAddr::from(([192, 0, 2, 1], port)))
    }

    #[test]
    fn an_initiation_waits_for_its_sender_to_become_a_peer() {
        let t0 = Instant::now();
        let mut early = EarlyInitiations::default();
        let a = NodePrivate::generate().public();
        let b = NodePrivate::generate().public();
        early.remember(a, b"first", udp(1), t0);
        early.remember(a, b"newer", Via::Relay(7), t0);
        early.remember(b, b"other", udp(2), t0);

        assert!(early.take_known(|_| false, t0).is_empty());
        let got = early.take_known(|k| *k == a, t0 + Duration::from_secs(1));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].datagram, b"newer", "the latest one is kept");
        assert_eq!(got[0].via, Via::Relay(7));
        assert!(
            early.take_known(|k| *k == a, t0).is_empty(),
            "answered once, not again"
        );
        assert_eq!(early.len(), 1);
    }

    #[test]
    fn stale_initiations_are_not_answered() {
        let t0 = Instant::now();
        let mut early = EarlyInitiations::default();
        let a = NodePrivate::generate().public();
        early.remember(a, b"old", udp(1), t0);
        assert!(early.take_known(|_| true, t0 + KEEP_FOR).is_empty());
    }

    #[test]
    fn a_flood_of_strangers_stays_bounded_and_keeps_the_newest() {
        let t0 = Instant::now();
        let mut early = EarlyInitiations::default();
        let mut keys = Vec::new();
        for i in 0..(CAPACITY as u64 * 4) {
            let k = NodePrivate::generate().public();
            early.remember(k, b"x", udp(1), t0 + Duration::from_micros(i));
            keys.push(k);
            assert!(early.len() <= CAPACITY);
        }
        let newest = *keys.last().unwrap();
        let oldest = keys[0];
        let now = t0 + Duration::from_millis(1);
        assert_eq!(early.take_known(|k| *k == newest, now).len(), 1);
        assert!(early.take_known(|k| *k == oldest, now).is_empty());
    }
}
