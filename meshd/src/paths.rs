//! The path machine: where one peer's packets go, pure and clock-injected.
//!
//! One per peer, holding everything that decides the path: the netmap's
//! endpoints and home relay, addresses learned from the peer's own
//! messages, the direct path found by disco pings, and where the peer's
//! authenticated packets last came from. The engine feeds it events (a
//! packet heard, a pong, a netmap change, the clock) and asks it where to
//! send; it answers with [`Targets`] and with disco messages to send
//! ([`Out`]). It does no I/O and reads no clock.
//!
//! **Peers that run meshd (disco)** get a direct path only from a pong:
//! receiving on a path does not prove that sending on it works. While
//! traffic flows the path is pinged every [`HEARTBEAT`]; a heartbeat
//! unanswered for [`PONG_GRACE`] is resent at once, and after
//! [`MISSES_TO_DROP`] misses in a row (or [`TRUST`] without a pong) the
//! path is dropped and traffic goes back to the relay while discovery
//! pings every candidate. Authenticated packets from an address that is
//! not the direct path are a hint, never a path: the address is pinged,
//! and its pong makes it the direct path (a peer that roamed is followed
//! within a round trip).
//!
//! **Stock WireGuard peers** (no disco) follow the source of their latest
//! authenticated packets, as WireGuard does, until it goes quiet for
//! [`SOURCE_STALE_AFTER`]; handshakes rotate through their endpoints.
//!
//! Candidates come from two places kept apart: the netmap (what the
//! coordinator says the peer reported) and what the peer's own messages
//! showed (ping sources, call-me-maybe lists, packet sources). The second
//! list is small and evicts its own oldest entry; it can never push out a
//! netmap endpoint, so messages from unexpected sources cannot cut a peer
//! off its real addresses.
#![deny(clippy::unchecked_time_subtraction)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use platform::disco::{new_tx_id, TxId};

/// A direct path is used for at most this long after its last pong.
pub const TRUST: Duration = Duration::from_millis(6500);
/// While the path is up and traffic flows, it is re-pinged this often.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A heartbeat unanswered this long is a miss: the path is pinged again.
pub const PONG_GRACE: Duration = Duration::from_secs(1);
/// Misses in a row that drop a direct path before [`TRUST`] runs out.
pub const MISSES_TO_DROP: u8 = 3;
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
/// An address the peer's packets come from (other than the direct path) is
/// pinged at most this often.
pub const PROBE_GAP: Duration = Duration::from_secs(1);
/// A stock WireGuard peer not heard from for this long may have moved: its
/// handshakes try all of its endpoints again.
pub const SOURCE_STALE_AFTER: Duration = Duration::from_secs(15);
/// A faster path must beat the current one by this much to replace it.
const BETTER_BY: f64 = 0.75;
const MAX_CANDIDATES: usize = 32;
/// Addresses learned from the peer's messages, beyond the netmap's.
const MAX_LEARNED: usize = 8;
const MAX_PENDING: usize = 64;

/// Handshake initiations with no working direct path go to this many of
/// the peer's candidate endpoints at once (the first to arrive gets the
/// answer; WireGuard ignores the copies), so the first contact does not
/// wait for a 5 s retry because one address in the list is dead.
pub const HANDSHAKE_FANOUT: usize = 4;

/// Where one packet goes: directly, through a relay, or both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Targets {
    pub direct: Option<SocketAddr>,
    pub relay: Option<u32>,
    /// More direct endpoints for the same datagram (handshake initiations).
    pub also: [Option<SocketAddr>; HANDSHAKE_FANOUT - 1],
}

impl Targets {
    /// Every direct endpoint to send to.
    pub fn direct_all(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.direct
            .iter()
            .chain(self.also.iter().flatten())
            .copied()
    }

    fn direct_only(ep: SocketAddr) -> Self {
        Targets {
            direct: Some(ep),
            ..Targets::default()
        }
    }
}

/// The path a peer's traffic takes now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Direct(SocketAddr),
    /// A direct endpoint being tried, not yet answered.
    Trying(SocketAddr),
    Relay(u32),
    None,
}

/// Something to send on the peer's behalf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Out {
    /// A disco ping over UDP.
    Ping { tx: TxId, to: SocketAddr },
    /// A call-me-maybe through the home relay, with our endpoints.
    CallMeMaybe { region: u32 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Best {
    addr: SocketAddr,
    latency: Duration,
    last_pong: Instant,
    last_ping: Instant,
    /// Heartbeats in a row that went unanswered.
    misses: u8,
}

/// One peer's path state; see the module docs.
#[derive(Debug)]
pub struct PathMachine {
    /// The peer runs meshd: direct paths come from pongs only.
    disco: bool,
    /// The netmap's endpoints for the peer.
    listed: Vec<SocketAddr>,
    /// Seen in the peer's messages and not listed; oldest first.
    learned: VecDeque<SocketAddr>,
    /// The listed endpoint handshakes try next (while there is no path).
    next_candidate: usize,
    /// The relay region where the peer listens, as the netmap says.
    home_region: Option<u32>,
    /// The relay region the peer's latest authenticated packets came
    /// through: where to answer while the netmap does not (yet) name its
    /// home relay (a device that has just joined reports it a moment after
    /// it starts talking).
    heard_via_relay: Option<u32>,
    best: Option<Best>,
    pending: Vec<(TxId, SocketAddr, Instant)>,
    last_round: Option<Instant>,
    last_call_me_maybe: Option<Instant>,
    last_activity: Option<Instant>,
    last_probe: Option<Instant>,
    /// Where the peer's latest authenticated packets came from directly.
    source: Option<(SocketAddr, Instant)>,
    /// The netmap no longer lists `source`: a stock WireGuard peer's
    /// source is dropped at the next tick unless heard there again first.
    source_unlisted: bool,
}

fn since(now: Instant, t: Option<Instant>) -> Option<Duration> {
    t.map(|t| now.saturating_duration_since(t))
}

impl PathMachine {
    /// The machine for a peer; `disco`: it runs meshd and answers pings.
    pub fn new(disco: bool) -> Self {
        PathMachine {
            disco,
            listed: Vec::new(),
            learned: VecDeque::new(),
            next_candidate: 0,
            home_region: None,
            heard_via_relay: None,
            best: None,
            pending: Vec::new(),
            last_round: None,
            last_call_me_maybe: None,
            last_activity: None,
            last_probe: None,
            source: None,
            source_unlisted: false,
        }
    }

    /// What the netmap says: the peer's endpoints (the first
    /// [`MAX_CANDIDATES`]; learned ones are kept beside them) and home relay.
    pub fn set_netmap(&mut self, endpoints: &[SocketAddr], home_region: Option<u32>) {
        let mut listed = Vec::new();
        for e in endpoints {
            if listed.len() < MAX_CANDIDATES && !listed.contains(e) {
                listed.push(*e);
            }
        }
        if let Some((src, _)) = self.source {
            if !listed.contains(&src) && !listed.is_empty() {
                // Keep following a roaming peer, but let handshakes try the
                // new addresses if it goes quiet. (A flag, not a back-dated
                // timestamp: subtracting from an `Instant` panics where the
                // clock starts near zero, as it does shortly after boot.)
                self.source_unlisted = true;
            }
        }
        if listed != self.listed {
            self.listed = listed;
            self.next_candidate = 0;
        }
        let listed = &self.listed;
        self.learned.retain(|e| !listed.contains(e));
        self.home_region = home_region;
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

    /// The netmap's endpoints.
    pub fn listed(&self) -> &[SocketAddr] {
        &self.listed
    }

    /// Every endpoint worth pinging: the netmap's, then learned ones.
    pub fn candidates(&self) -> Vec<SocketAddr> {
        self.listed
            .iter()
            .chain(self.learned.iter())
            .copied()
            .collect()
    }

    /// Whether a packet has anywhere to go at all.
    pub fn reachable(&self) -> bool {
        !self.listed.is_empty() || self.home_region().is_some() || self.source.is_some()
    }

    pub fn note_activity(&mut self, now: Instant) {
        self.last_activity = Some(now);
    }

    fn active(&self, now: Instant) -> bool {
        since(now, self.last_activity).is_some_and(|d| d < ACTIVE)
    }

    fn trusted(&self, now: Instant) -> Option<&Best> {
        self.best
            .as_ref()
            .filter(|b| now.saturating_duration_since(b.last_pong) < TRUST)
    }

    /// Round-trip time of the direct path, while trusted.
    pub fn rtt(&self, now: Instant) -> Option<Duration> {
        self.trusted(now).map(|b| b.latency)
    }

    /// A direct endpoint known to work: for a disco peer the path its
    /// pongs prove, for a stock WireGuard peer where its packets come from.
    pub fn direct(&self, now: Instant) -> Option<SocketAddr> {
        if self.disco {
            self.trusted(now).map(|b| b.addr)
        } else {
            self.source.map(|(addr, _)| addr)
        }
    }

    /// A disco peer's recent packet source: unproven, used only when there
    /// is neither a direct path nor a relay.
    fn unproven(&self, now: Instant) -> Option<SocketAddr> {
        self.source
            .filter(|(_, at)| now.saturating_duration_since(*at) < TRUST)
            .map(|(addr, _)| addr)
    }

    /// The relay region to reach the peer through: its home relay, else
    /// the one it was last heard through.
    pub fn home_region(&self) -> Option<u32> {
        self.home_region.or(self.heard_via_relay)
    }

    fn current_candidate(&self) -> Option<SocketAddr> {
        self.listed
            .get(self.next_candidate % self.listed.len().max(1))
            .copied()
    }

    /// Where to send a packet (`handshake`: a handshake initiation). With a
    /// direct path, there. Else through the peer's home relay when it has
    /// one, while handshake initiations also try its endpoints in turn.
    /// With neither, every packet tries the current candidate.
    pub fn targets(&mut self, handshake: bool, now: Instant) -> Targets {
        if let Some(ep) = self.direct(now) {
            return Targets::direct_only(ep);
        }
        let n = self.listed.len();
        if handshake && n > 0 {
            self.next_candidate = (self.next_candidate + 1) % n;
        }
        let candidate = self.current_candidate();
        let mut targets = match self.home_region() {
            Some(region) => Targets {
                direct: candidate.filter(|_| handshake),
                relay: Some(region),
                ..Targets::default()
            },
            None => Targets {
                direct: if handshake {
                    candidate
                } else {
                    self.unproven(now).or(candidate)
                },
                ..Targets::default()
            },
        };
        if handshake {
            for (k, slot) in targets
                .also
                .iter_mut()
                .enumerate()
                .take(n.saturating_sub(1))
            {
                *slot = self.listed.get((self.next_candidate + 1 + k) % n).copied();
            }
        }
        targets
    }

    /// Where to answer a protocol message (a handshake response, say) that
    /// came over UDP from `from`: there, and also along the path we would
    /// send on, since `from` reaching us does not prove we reach it.
    pub fn reply_targets(&self, from: SocketAddr, now: Instant) -> Targets {
        match self.direct(now) {
            Some(ep) if ep == from => Targets::direct_only(from),
            Some(ep) => Targets {
                direct: Some(from),
                also: [Some(ep), None, None],
                ..Targets::default()
            },
            None => Targets {
                direct: Some(from),
                relay: if self.disco { self.home_region() } else { None },
                ..Targets::default()
            },
        }
    }

    pub fn path(&self, now: Instant) -> Path {
        if let Some(ep) = self.direct(now) {
            return Path::Direct(ep);
        }
        if let Some(region) = self.home_region() {
            return Path::Relay(region);
        }
        match self.unproven(now).or(self.current_candidate()) {
            Some(ep) => Path::Trying(ep),
            None => Path::None,
        }
    }

    /// A packet that came through relay `region` authenticated as this
    /// peer.
    pub fn heard_via_relay(&mut self, region: u32) {
        self.heard_via_relay = Some(region);
    }

    /// A packet from `from` authenticated as this peer. A stock WireGuard
    /// peer is answered there from now on. A disco peer's address is
    /// pinged if it is not the direct path (at most every [`PROBE_GAP`]):
    /// its pong, not this packet, makes it one.
    pub fn heard_direct(&mut self, from: SocketAddr, now: Instant, out: &mut Vec<Out>) {
        self.source = Some((from, now));
        self.source_unlisted = false;
        if !self.disco || self.trusted(now).is_some_and(|b| b.addr == from) {
            return;
        }
        self.learn(from);
        if since(now, self.last_probe).is_none_or(|d| d >= PROBE_GAP) {
            self.last_probe = Some(now);
            self.ping(from, now, out);
        }
    }

    /// Forgets a stock WireGuard peer's source once it went quiet or the
    /// netmap moved the peer elsewhere. Call on every timer tick.
    pub fn expire(&mut self, now: Instant) {
        let stale = self
            .source
            .is_some_and(|(_, at)| now.saturating_duration_since(at) > SOURCE_STALE_AFTER);
        if self.source_unlisted || stale {
            self.source = None;
            self.source_unlisted = false;
        }
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
    pub fn poll(&mut self, now: Instant, out: &mut Vec<Out>) {
        self.pending
            .retain(|(_, _, sent)| now.saturating_duration_since(*sent) < PING_TIMEOUT);
        if !self.disco || !self.active(now) {
            return;
        }
        if let Some(addr) = self.direct(now) {
            if self.heartbeat(addr, now, out) {
                return;
            }
        }
        match self.direct(now) {
            None => {
                if since(now, self.last_round).is_none_or(|d| d >= DISCOVERY) {
                    self.ping_all(now, out);
                }
                if let Some(region) = self.home_region() {
                    if since(now, self.last_call_me_maybe).is_none_or(|d| d >= CALL_ME_MAYBE) {
                        self.last_call_me_maybe = Some(now);
                        out.push(Out::CallMeMaybe { region });
                    }
                }
            }
            Some(_) => {
                if since(now, self.last_round).is_none_or(|d| d >= UPGRADE) {
                    self.ping_all(now, out);
                }
            }
        }
    }

    /// Heartbeats on the direct path at `addr`: a ping every
    /// [`HEARTBEAT`], and at once after an unanswered one; the path is
    /// dropped after [`MISSES_TO_DROP`] in a row. True if it pinged.
    fn heartbeat(&mut self, addr: SocketAddr, now: Instant, out: &mut Vec<Out>) -> bool {
        let Some(b) = self.best.as_mut() else {
            return false;
        };
        let waited = now.saturating_duration_since(b.last_ping);
        if b.last_ping > b.last_pong && waited >= PONG_GRACE {
            b.misses += 1;
            if b.misses >= MISSES_TO_DROP {
                tracing::debug!(%addr, "direct path stopped answering; back to the relay");
                self.best = None;
                return false;
            }
        } else if waited < HEARTBEAT {
            return false;
        }
        b.last_ping = now;
        self.ping(addr, now, out);
        true
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
        // The peer's packets now come from here, and it answers here: it
        // moved (or its way to us did), so follow it.
        let moved = self.unproven(now) == Some(addr);
        let replace = match self.best {
            None => true,
            Some(b) if b.addr == addr => true,
            Some(b) if now.saturating_duration_since(b.last_pong) >= TRUST => true,
            Some(_) if moved => true,
            Some(b) => latency.as_secs_f64() < b.latency.as_secs_f64() * BETTER_BY,
        };
        if replace {
            self.best = Some(Best {
                addr,
                latency,
                last_pong: now,
                last_ping: now,
                misses: 0,
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
        let mut p = PathMachine::new(true);
        p.set_netmap(&[addr("10.0.0.1:1")], Some(1));
        let mut out = Vec::new();
        p.poll(Instant::now(), &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn first_pong_gives_a_direct_path_that_expires_without_pongs() {
        let t0 = Instant::now();
        let mut p = PathMachine::new(true);
        p.set_netmap(&[addr("10.0.0.1:1"), addr("192.168.1.5:1")], Some(1));
        p.note_activity(t0);
        let mut out = Vec::new();
        p.poll(t0, &mut out);
        assert_eq!(pings(&out).len(), 2);
        assert!(out.contains(&Out::CallMeMaybe { region: 1 }));
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
        let mut p = PathMachine::new(true);
        let a = addr("10.0.0.1:1");
        p.set_netmap(&[a], Some(1));
        let mut now = t0;
        p.note_activity(now);
        let mut out = Vec::new();
        p.poll(now, &mut out);
        let Out::Ping { tx, .. } = out[0].clone() else {
            panic!()
        };
        p.on_pong(&tx, a, now);
        // Thirty seconds of traffic, ticks every 250 ms, every pong answered.
        for _ in 0..120 {
            now += Duration::from_millis(250);
            p.note_activity(now);
            let mut out = Vec::new();
            p.poll(now, &mut out);
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
        let mut p = PathMachine::new(true);
        p.set_netmap(&[slow, fast], Some(1));
        p.note_activity(t0);
        let mut out = Vec::new();
        p.poll(t0, &mut out);
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
        p.poll(t1, &mut out);
        p.on_pong(&tx_of(&out, slow), slow, t1 + Duration::from_millis(20));
        p.on_pong(&tx_of(&out, fast), fast, t1 + Duration::from_millis(2));
        assert_eq!(p.direct(t1 + Duration::from_millis(20)), Some(fast));
    }

    #[test]
    fn pings_from_many_sources_never_push_out_netmap_endpoints() {
        let t0 = Instant::now();
        let real = [addr("10.0.0.1:41641"), addr("198.51.100.7:41641")];
        let mut p = PathMachine::new(true);
        p.set_netmap(&real, Some(1));
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
        p.poll(t0, &mut out);
        for r in real {
            assert!(pings(&out).contains(&r));
        }
    }

    /// A peer's view of the network in the simulation.
    struct Side {
        paths: PathMachine,
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
                paths: PathMachine::new(true),
                public: addr("198.51.100.1:40000"),
                filtered: a_nat,
                opened: vec![],
            },
            Side {
                paths: PathMachine::new(true),
                public: addr("198.51.100.2:40000"),
                filtered: b_nat,
                opened: vec![],
            },
        ];
        // Each knows the other's public (STUN) endpoint and a useless private one.
        sides[0]
            .paths
            .set_netmap(&[addr("192.168.1.2:41641"), sides[1].public], Some(1));
        sides[1]
            .paths
            .set_netmap(&[addr("192.168.7.9:41641"), sides[0].public], Some(1));
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
                side.paths.poll(now, &mut out);
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
                        Out::CallMeMaybe { .. } => in_flight.push((
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
