//! Direct-path discovery for one peer, pure and clock-injected.
//!
//! While traffic flows, the peer's candidate endpoints are pinged (disco
//! pings over UDP); the first pong makes that endpoint the direct path, a
//! faster one later replaces it, and a path whose pongs stop is dropped after
//! [`TRUST`], which sends traffic back to the relay. Without a direct path a
//! call-me-maybe goes through the relay so the peer pings back at the same
//! time and both NATs open.
//!
//! Candidates come from two places kept apart: the netmap (what the
//! coordinator says the peer reported) and what the peer's own messages
//! showed (ping sources, call-me-maybe lists). The second list is small
//! and evicts its own oldest entry; it can never push out a netmap
//! endpoint, so messages from unexpected sources cannot cut a peer off its
//! real addresses.
#![deny(clippy::unchecked_time_subtraction)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use platform::disco::{new_tx_id, TxId};

/// A direct path is used for this long after its last pong.
pub const TRUST: Duration = Duration::from_millis(6500);
/// While the path is up and traffic flows, it is re-pinged this often.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// Without a direct path, all candidates are pinged this often.
pub const DISCOVERY: Duration = Duration::from_millis(800);
/// Call-me-maybe is repeated at most this often.
pub const CALL_ME_MAYBE: Duration = Duration::from_secs(4);
/// With a direct path, all candidates are re-pinged this often, in case a
/// better one exists.
pub const UPGRADE: Duration = Duration::from_secs(20);
/// Traffic this recent means the peer is in use.
pub const ACTIVE: Duration = Duration::from_secs(5);
/// A ping unanswered this long is forgotten.
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// A faster path must beat the current one by this much to replace it.
const BETTER_BY: f64 = 0.75;
const MAX_CANDIDATES: usize = 32;
/// Addresses learned from the peer's messages, beyond the netmap's.
const MAX_LEARNED: usize = 8;
const MAX_PENDING: usize = 64;

/// Something to send on the peer's behalf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Out {
    /// A disco ping over UDP.
    Ping { tx: TxId, to: SocketAddr },
    /// A call-me-maybe through the relay, with our endpoints.
    CallMeMaybe,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Best {
    addr: SocketAddr,
    latency: Duration,
    last_pong: Instant,
    last_ping: Instant,
}

#[derive(Default, Debug)]
pub struct PathState {
    /// The netmap's endpoints for the peer.
    listed: Vec<SocketAddr>,
    /// Seen in the peer's messages and not listed; oldest first.
    learned: VecDeque<SocketAddr>,
    best: Option<Best>,
    pending: Vec<(TxId, SocketAddr, Instant)>,
    last_round: Option<Instant>,
    last_call_me_maybe: Option<Instant>,
    last_activity: Option<Instant>,
}

fn since(now: Instant, t: Option<Instant>) -> Option<Duration> {
    t.map(|t| now.saturating_duration_since(t))
}

impl PathState {
    /// Endpoints from the netmap (the first [`MAX_CANDIDATES`]); ones
    /// learned from the peer's own messages are kept beside them.
    pub fn set_candidates(&mut self, endpoints: &[SocketAddr]) {
        self.listed.clear();
        for e in endpoints {
            if self.listed.len() < MAX_CANDIDATES && !self.listed.contains(e) {
                self.listed.push(*e);
            }
        }
        let listed = &self.listed;
        self.learned.retain(|e| !listed.contains(e));
    }

    fn learn(&mut self, addr: SocketAddr) {
        if self.listed.contains(&addr) || self.learned.contains(&addr) {
            return;
        }
        if self.learned.len() >= MAX_LEARNED {
            self.learned.pop_front();
        }
        self.learned.push_back(addr);
    }

    /// Every endpoint worth pinging: the netmap's, then learned ones.
    pub fn candidates(&self) -> Vec<SocketAddr> {
        self.listed
            .iter()
            .chain(self.learned.iter())
            .copied()
            .collect()
    }

    pub fn note_activity(&mut self, now: Instant) {
        self.last_activity = Some(now);
    }

    fn active(&self, now: Instant) -> bool {
        since(now, self.last_activity).is_some_and(|d| d < ACTIVE)
    }

    /// Round-trip time of the direct path, while trusted.
    pub fn rtt(&self, now: Instant) -> Option<Duration> {
        self.best
            .filter(|b| now.saturating_duration_since(b.last_pong) < TRUST)
            .map(|b| b.latency)
    }

    /// The direct path, while trusted.
    pub fn direct(&self, now: Instant) -> Option<SocketAddr> {
        self.best
            .filter(|b| now.saturating_duration_since(b.last_pong) < TRUST)
            .map(|b| b.addr)
    }

    fn ping(&mut self, to: SocketAddr, now: Instant, out: &mut Vec<Out>) {
        let tx = new_tx_id();
        if self.pending.len() >= MAX_PENDING {
            self.pending.remove(0);
        }
        self.pending.push((tx, to, now));
        out.push(Out::Ping { tx, to });
    }

    fn ping_all(&mut self, now: Instant, out: &mut Vec<Out>) {
        for addr in self.candidates() {
            self.ping(addr, now, out);
        }
        self.last_round = Some(now);
    }

    /// What to send now. Call on every timer tick and whenever traffic to
    /// the peer has no direct path.
    pub fn poll(&mut self, now: Instant, has_relay: bool, out: &mut Vec<Out>) {
        self.pending
            .retain(|(_, _, sent)| now.saturating_duration_since(*sent) < PING_TIMEOUT);
        if !self.active(now) {
            return;
        }
        match self.direct(now) {
            None => {
                if since(now, self.last_round).is_none_or(|d| d >= DISCOVERY) {
                    self.ping_all(now, out);
                }
                if has_relay
                    && since(now, self.last_call_me_maybe).is_none_or(|d| d >= CALL_ME_MAYBE)
                {
                    self.last_call_me_maybe = Some(now);
                    out.push(Out::CallMeMaybe);
                }
            }
            Some(addr) => {
                if since(now, self.last_round).is_none_or(|d| d >= UPGRADE) {
                    self.ping_all(now, out);
                } else if let Some(b) = self.best.as_mut() {
                    if now.saturating_duration_since(b.last_ping) >= HEARTBEAT {
                        b.last_ping = now;
                        self.ping(addr, now, out);
                    }
                }
            }
        }
    }

    /// A pong arrived over UDP from `from`. Returns its round-trip time if
    /// it answered one of our pings.
    pub fn on_pong(&mut self, tx: &TxId, from: SocketAddr, now: Instant) -> Option<Duration> {
        let i = self
            .pending
            .iter()
            .position(|(t, addr, _)| t == tx && *addr == from)?;
        let (_, addr, sent) = self.pending.remove(i);
        let latency = now.saturating_duration_since(sent);
        let replace = match self.best {
            None => true,
            Some(b) if b.addr == addr => true,
            Some(b) if now.saturating_duration_since(b.last_pong) >= TRUST => true,
            Some(b) => latency.as_secs_f64() < b.latency.as_secs_f64() * BETTER_BY,
        };
        if replace {
            self.best = Some(Best {
                addr,
                latency,
                last_pong: now,
                last_ping: now,
            });
        }
        Some(latency)
    }

    /// The peer pinged us from `from`: it may be reachable there. Without a
    /// direct path, ping back at once: its ping just opened its NAT for us.
    pub fn on_ping(&mut self, from: SocketAddr, now: Instant, out: &mut Vec<Out>) {
        self.learn(from);
        if self.direct(now).is_none() {
            self.ping(from, now, out);
        }
    }

    /// The peer asked us to ping it at `endpoints` (through the relay).
    pub fn on_call_me_maybe(&mut self, endpoints: &[SocketAddr], now: Instant, out: &mut Vec<Out>) {
        for e in endpoints.iter().take(MAX_CANDIDATES) {
            self.learn(*e);
        }
        for e in endpoints.iter().take(MAX_CANDIDATES) {
            self.ping(*e, now, out);
        }
        self.note_activity(now);
    }
}

#[cfg(test)]
mod tests {
    //! A simulated network: two peers, each maybe behind a NAT, a relay that
    //! always delivers, virtual time, loss and latency.
    use super::*;
    use std::collections::HashMap;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn pings(out: &[Out]) -> Vec<SocketAddr> {
        out.iter()
            .filter_map(|o| {
                if let Out::Ping { to, .. } = o {
                    Some(*to)
                } else {
                    None
                }
            })
            .collect()
    }

    #[test]
    fn idle_peers_are_not_pinged() {
        let mut p = PathState::default();
        p.set_candidates(&[addr("10.0.0.1:1")]);
        let mut out = Vec::new();
        p.poll(Instant::now(), true, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn first_pong_gives_a_direct_path_that_expires_without_pongs() {
        let t0 = Instant::now();
        let mut p = PathState::default();
        p.set_candidates(&[addr("10.0.0.1:1"), addr("192.168.1.5:1")]);
        p.note_activity(t0);
        let mut out = Vec::new();
        p.poll(t0, true, &mut out);
        assert_eq!(pings(&out).len(), 2);
        assert!(out.contains(&Out::CallMeMaybe));
        let Out::Ping { tx, to } = out[1].clone() else {
            panic!()
        };
        assert_eq!(
            p.on_pong(&tx, to, t0 + Duration::from_millis(3)),
            Some(Duration::from_millis(3))
        );
        assert_eq!(p.direct(t0 + Duration::from_millis(3)), Some(to));
        // A pong for a ping we never sent, or from elsewhere, counts for nothing.
        assert_eq!(p.on_pong(&[9; 12], to, t0), None);
        // Silence: the path is dropped after TRUST.
        assert_eq!(p.direct(t0 + TRUST + Duration::from_millis(10)), None);
    }

    #[test]
    fn heartbeats_keep_a_used_path_alive() {
        let t0 = Instant::now();
        let mut p = PathState::default();
        let a = addr("10.0.0.1:1");
        p.set_candidates(&[a]);
        let mut now = t0;
        p.note_activity(now);
        let mut out = Vec::new();
        p.poll(now, false, &mut out);
        let Out::Ping { tx, .. } = out[0].clone() else {
            panic!()
        };
        p.on_pong(&tx, a, now);
        // Thirty seconds of traffic, ticks every 250 ms, every pong answered.
        for _ in 0..120 {
            now += Duration::from_millis(250);
            p.note_activity(now);
            let mut out = Vec::new();
            p.poll(now, false, &mut out);
            for o in out {
                if let Out::Ping { tx, to } = o {
                    p.on_pong(&tx, to, now + Duration::from_millis(1));
                }
            }
            assert_eq!(p.direct(now), Some(a), "path lost at {:?}", now - t0);
        }
    }

    #[test]
    fn a_clearly_faster_path_replaces_the_current_one() {
        let t0 = Instant::now();
        let (slow, fast) = (addr("203.0.113.5:1"), addr("10.0.0.5:1"));
        let mut p = PathState::default();
        p.set_candidates(&[slow, fast]);
        p.note_activity(t0);
        let mut out = Vec::new();
        p.poll(t0, true, &mut out);
        let tx_of = |out: &[Out], a: SocketAddr| {
            out.iter()
                .find_map(|o| match o {
                    Out::Ping { tx, to } if *to == a => Some(*tx),
                    _ => None,
                })
                .unwrap()
        };
        p.on_pong(&tx_of(&out, slow), slow, t0 + Duration::from_millis(20));
        assert_eq!(p.direct(t0 + Duration::from_millis(20)), Some(slow));
        p.on_pong(&tx_of(&out, fast), fast, t0 + Duration::from_millis(21));
        assert_eq!(
            p.direct(t0 + Duration::from_millis(21)),
            Some(slow),
            "not faster: sent at the same time"
        );
        // The upgrade round finds fast clearly quicker.
        let t1 = t0 + UPGRADE + Duration::from_millis(1);
        p.note_activity(t1);
        let mut out = Vec::new();
        p.poll(t1, true, &mut out);
        p.on_pong(&tx_of(&out, slow), slow, t1 + Duration::from_millis(20));
        p.on_pong(&tx_of(&out, fast), fast, t1 + Duration::from_millis(2));
        assert_eq!(p.direct(t1 + Duration::from_millis(20)), Some(fast));
    }

    #[test]
    fn pings_from_many_sources_never_push_out_netmap_endpoints() {
        let t0 = Instant::now();
        let real = [addr("10.0.0.1:41641"), addr("198.51.100.7:41641")];
        let mut p = PathState::default();
        p.set_candidates(&real);
        let mut out = Vec::new();
        // Pings (say, one captured ping replayed) from a hundred sources.
        for i in 0..100u16 {
            p.on_ping(addr(&format!("203.0.113.9:{}", 1000 + i)), t0, &mut out);
        }
        let c = p.candidates();
        for r in real {
            assert!(c.contains(&r), "{r} evicted");
        }
        assert!(
            c.len() <= real.len() + MAX_LEARNED,
            "{} candidates",
            c.len()
        );
        // The newest learned ones are kept (a real peer that moved is found).
        assert!(c.contains(&addr("203.0.113.9:1099")));
        // Discovery still pings the real endpoints.
        p.note_activity(t0);
        let mut out = Vec::new();
        p.poll(t0, false, &mut out);
        for r in real {
            assert!(pings(&out).contains(&r));
        }
    }

    /// A peer's view of the network in the simulation.
    struct Side {
        paths: PathState,
        /// Its endpoint as seen from the other side (after NAT).
        public: SocketAddr,
        /// Behind an endpoint-dependent-filtering NAT: only addresses it
        /// sent to may reach it.
        filtered: bool,
        opened: Vec<SocketAddr>,
    }

    /// Two sides behind NATs, joined by a relay, in virtual time. Returns the
    /// time until both have a direct path, if within `limit`.
    fn punch(a_nat: bool, b_nat: bool, loss_every: usize, limit: Duration) -> Option<Duration> {
        let t0 = Instant::now();
        let mut sides = [
            Side {
                paths: PathState::default(),
                public: addr("198.51.100.1:40000"),
                filtered: a_nat,
                opened: vec![],
            },
            Side {
                paths: PathState::default(),
                public: addr("198.51.100.2:40000"),
                filtered: b_nat,
                opened: vec![],
            },
        ];
        // Each knows the other's public (STUN) endpoint and a useless private one.
        sides[0]
            .paths
            .set_candidates(&[addr("192.168.1.2:41641"), sides[1].public]);
        sides[1]
            .paths
            .set_candidates(&[addr("192.168.7.9:41641"), sides[0].public]);
        let latency = Duration::from_millis(15);
        let mut in_flight: Vec<(Instant, usize, Msg)> = Vec::new();
        #[derive(Clone)]
        enum Msg {
            Ping(TxId, SocketAddr),
            Pong(TxId),
            CallMeMaybe(Vec<SocketAddr>),
        }
        let mut sent = 0usize;
        let mut now = t0;
        let publics: HashMap<usize, SocketAddr> =
            [(0, sides[0].public), (1, sides[1].public)].into();
        while now - t0 < limit {
            // Traffic flows both ways (over the relay at first).
            for (i, side) in sides.iter_mut().enumerate() {
                side.paths.note_activity(now);
                let mut out = Vec::new();
                side.paths.poll(now, true, &mut out);
                for o in out {
                    let other = 1 - i;
                    match o {
                        Out::Ping { tx, to } => {
                            side.opened.push(to);
                            sent += 1;
                            if to == publics[&other]
                                && (loss_every == 0 || !sent.is_multiple_of(loss_every))
                            {
                                in_flight.push((now + latency, other, Msg::Ping(tx, publics[&i])));
                            }
                        }
                        Out::CallMeMaybe => in_flight.push((
                            now + latency * 3,
                            other,
                            Msg::CallMeMaybe(vec![publics[&i]]),
                        )),
                    }
                }
            }
            let (due, later): (Vec<_>, Vec<_>) =
                in_flight.into_iter().partition(|(t, _, _)| *t <= now);
            in_flight = later;
            for (_, to, msg) in due {
                let from_other = publics[&(1 - to)];
                match msg {
                    Msg::Ping(tx, from) => {
                        let side = &mut sides[to];
                        if side.filtered && !side.opened.contains(&from) {
                            continue; // dropped by the NAT
                        }
                        let mut back = Vec::new();
                        side.paths.on_ping(from, now, &mut back);
                        side.opened.push(from);
                        for o in back {
                            if let Out::Ping { tx, to: dst } = o {
                                if dst == publics[&(1 - to)] {
                                    in_flight.push((
                                        now + latency,
                                        1 - to,
                                        Msg::Ping(tx, publics[&to]),
                                    ));
                                }
                            }
                        }
                        in_flight.push((now + latency, 1 - to, Msg::Pong(tx)));
                    }
                    Msg::Pong(tx) => {
                        sides[to].paths.on_pong(&tx, from_other, now);
                    }
                    Msg::CallMeMaybe(eps) => {
                        let mut out = Vec::new();
                        sides[to].paths.on_call_me_maybe(&eps, now, &mut out);
                        for o in out {
                            if let Out::Ping { tx, to: dst } = o {
                                sides[to].opened.push(dst);
                                if dst == publics[&(1 - to)] {
                                    in_flight.push((
                                        now + latency,
                                        1 - to,
                                        Msg::Ping(tx, publics[&to]),
                                    ));
                                }
                            }
                        }
                    }
                }
            }
            if sides.iter().all(|s| s.paths.direct(now).is_some()) {
                return Some(now - t0);
            }
            now += Duration::from_millis(50);
        }
        None
    }

    #[test]
    fn both_behind_nat_punch_through_within_two_seconds() {
        let took = punch(true, true, 0, Duration::from_secs(10)).expect("direct path");
        assert!(took <= Duration::from_secs(2), "took {took:?}");
    }

    #[test]
    fn punching_survives_loss() {
        let took = punch(true, true, 3, Duration::from_secs(10)).expect("direct path despite loss");
        assert!(took <= Duration::from_secs(4), "took {took:?}");
    }

    #[test]
    fn public_peers_connect_at_once() {
        let took = punch(false, false, 0, Duration::from_secs(10)).expect("direct path");
        assert!(took <= Duration::from_millis(200), "took {took:?}");
    }
}
