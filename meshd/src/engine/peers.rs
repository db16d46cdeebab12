//! The peer table: one WireGuard session (boringtun `Tunn`) per peer, found by
//! overlay address on send and by receiver index or static key on receive.
//!
//! The table is immutable once built and swapped whole when the netmap
//! changes, so the packet path reads it without a lock; only the peer's own
//! session state sits behind a mutex (both directions drive the same `Tunn`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};
use platform::disco::{ReplayWindow, SharedKey};
use platform::keys::{DiscoPrivate, DiscoPublic, NodePrivate, NodePublic};
use platform::netmap::NetMap;

use crate::paths::{Out, PathMachine};
pub use crate::paths::{Path, Targets};

use super::disco::Via;

/// Where a result landed in an output buffer (boringtun hands back a slice
/// of it).
pub(super) fn range_in(base: usize, part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - base;
    start..start + part.len()
}

/// What decrypting one datagram from a peer gave.
#[derive(Debug)]
pub(super) enum Decapsulated {
    /// A protocol message to send back (in the output buffer), and where.
    Network(Range<usize>, Targets),
    /// A packet for this device from overlay address `src`; empty for a
    /// keepalive.
    Tunnel(Range<usize>, IpAddr),
    Done,
    Error(WireGuardError),
}

/// WireGuard message type of a handshake initiation.
pub(super) const HANDSHAKE_INIT: u8 = 1;

pub struct PeerState {
    pub tunn: Tunn,
    /// Where the peer's packets go.
    pub paths: PathMachine,
    /// Disco stamps already used by this peer instance.
    pub disco_replay: ReplayWindow,
    /// A handshake initiation found nowhere to go: the peer was announced
    /// before its endpoints and home relay were known.
    stranded: bool,
    /// Quick handshake retries after this device's node key changed, or
    /// once a stranded handshake has somewhere to go.
    rehandshake: Option<Rehandshake>,
}

/// A session with a handshake this recent carries traffic worth keeping:
/// it gets a fresh handshake at once when the node key changes (WireGuard's
/// REJECT_AFTER_TIME; older sessions are gone anyway).
const ACTIVE_SESSION: Duration = Duration::from_secs(180);

/// Handshake retries after a node-key change. The peer drops initiations
/// under the new key until the coordinator has told it about the key (tens
/// of milliseconds after the rotation), and WireGuard's own retry would
/// wait 5 s: so retry at every chance, backing off to once a second, until
/// the peer answers or `REHANDSHAKE_FOR` has passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rehandshake {
    until: Instant,
    next: Instant,
    gap: Duration,
}

const REHANDSHAKE_FIRST_GAP: Duration = Duration::from_millis(200);
const REHANDSHAKE_MAX_GAP: Duration = Duration::from_secs(1);
const REHANDSHAKE_FOR: Duration = Duration::from_secs(15);

impl Rehandshake {
    pub fn new(now: Instant) -> Self {
        Rehandshake {
            until: now + REHANDSHAKE_FOR,
            next: now,
            gap: REHANDSHAKE_FIRST_GAP,
        }
    }

    /// Retries for an initiation that has just gone out: the first one
    /// a gap later.
    pub fn after_one(now: Instant) -> Self {
        Rehandshake {
            until: now + REHANDSHAKE_FOR,
            next: now + REHANDSHAKE_FIRST_GAP,
            gap: REHANDSHAKE_FIRST_GAP * 2,
        }
    }

    /// Whether to send a new initiation at `now`; `None` once it gave up.
    pub fn poll(&mut self, now: Instant) -> Option<bool> {
        if now >= self.until {
            return None;
        }
        if now < self.next {
            return Some(false);
        }
        self.next = now + self.gap;
        self.gap = (self.gap * 2).min(REHANDSHAKE_MAX_GAP);
        Some(true)
    }
}

impl PeerState {
    /// Encrypts `packet` (an IP packet from this device) into `out`.
    /// Returns the datagram's place in `out` and where it goes; `None`
    /// when it was queued behind a handshake that is under way. Disco
    /// messages to send meanwhile (looking for a direct path) land in
    /// `outs`.
    pub(super) fn encrypt(
        &mut self,
        packet: &[u8],
        out: &mut [u8],
        now: Instant,
        outs: &mut Vec<Out>,
    ) -> Result<Option<(Range<usize>, Targets)>, WireGuardError> {
        self.paths.note_activity(now);
        if self.paths.direct(now).is_none() {
            // Look for a direct path now, not at the next tick.
            self.paths.poll(now, outs);
        }
        let base = out.as_ptr() as usize;
        let range = match self.tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(d) => range_in(base, d),
            TunnResult::Err(e) => return Err(e),
            _ => return Ok(None),
        };
        if out[range.start] == HANDSHAKE_INIT {
            self.initiation_sent(now);
        }
        let targets = self.targets_for(&out[range.clone()], now);
        Ok(Some((range, targets)))
    }

    /// Decrypts one datagram that came `via` somewhere into `out`; an
    /// empty `datagram` flushes packets queued while a handshake was in
    /// flight (call again until [`Decapsulated::Done`]). Disco messages to
    /// send (probing where the peer's packets come from) land in `outs`.
    pub(super) fn decrypt(
        &mut self,
        datagram: &[u8],
        via: Via,
        out: &mut [u8],
        now: Instant,
        outs: &mut Vec<Out>,
    ) -> Decapsulated {
        let src_ip = match via {
            Via::Udp(addr) => Some(addr.ip()),
            Via::Relay(_) => None,
        };
        let base = out.as_ptr() as usize;
        let outcome = match self.tunn.decapsulate(src_ip, datagram, out) {
            TunnResult::Done => Decapsulated::Done,
            TunnResult::WriteToNetwork(d) => {
                let range = range_in(base, d);
                let targets = match via {
                    Via::Udp(from) => self.paths.reply_targets(from, now),
                    Via::Relay(region) => Targets {
                        relay: Some(region),
                        ..Targets::default()
                    },
                };
                Decapsulated::Network(range, targets)
            }
            TunnResult::WriteToTunnelV4(d, src) => {
                Decapsulated::Tunnel(range_in(base, d), src.into())
            }
            TunnResult::WriteToTunnelV6(d, src) => {
                Decapsulated::Tunnel(range_in(base, d), src.into())
            }
            TunnResult::Err(e) => Decapsulated::Error(e),
        };
        let authenticated = !datagram.is_empty()
            && matches!(
                outcome,
                Decapsulated::Network(..) | Decapsulated::Tunnel(..)
            );
        if authenticated {
            self.answered();
            match via {
                Via::Udp(from) => self.paths.heard_direct(from, now, outs),
                Via::Relay(region) => self.paths.heard_via_relay(region),
            }
        }
        if matches!(&outcome, Decapsulated::Tunnel(range, _) if !range.is_empty()) {
            // Real traffic (not a keepalive): keep looking after the path.
            self.paths.note_activity(now);
        }
        outcome
    }

    /// One timer tick: path upkeep (disco messages land in `outs`) and
    /// WireGuard's timers. Returns a datagram to send (a handshake or
    /// keepalive) in `buf`, and where.
    pub(super) fn tick(
        &mut self,
        now: Instant,
        buf: &mut [u8],
        outs: &mut Vec<Out>,
    ) -> Option<(Range<usize>, Targets)> {
        self.paths.expire(now);
        self.paths.poll(now, outs);
        let base = buf.as_ptr() as usize;
        let result = if self.rehandshake_due(now) {
            // After a node-key change: don't wait out WireGuard's 5 s retry.
            self.tunn.format_handshake_initiation(buf, true)
        } else {
            self.tunn.update_timers(buf)
        };
        let range = match result {
            TunnResult::WriteToNetwork(d) => range_in(base, d),
            _ => return None,
        };
        let targets = self.targets_for(&buf[range.clone()], now);
        Some((range, targets))
    }

    /// Where to send `packet`; a handshake initiation with nowhere to go
    /// is remembered, to be sent again once the peer has a route.
    pub fn targets_for(&mut self, packet: &[u8], now: Instant) -> Targets {
        let handshake = packet.first() == Some(&HANDSHAKE_INIT);
        let targets = self.paths.targets(handshake, now);
        if handshake && targets == Targets::default() {
            self.stranded = true;
        }
        targets
    }

    /// This device's node key changed: the session goes on under `secret`
    /// (same index, endpoints and path state); one that carried traffic
    /// lately gets quick fresh handshakes ([`Rehandshake`]).
    pub fn set_static_key(
        &mut self,
        secret: boringtun::x25519::StaticSecret,
        public: boringtun::x25519::PublicKey,
        now: Instant,
    ) {
        let active = self
            .tunn
            .time_since_last_handshake()
            .is_some_and(|d| d < ACTIVE_SESSION);
        self.tunn.set_static_private(secret, public, None);
        self.rehandshake = active.then(|| Rehandshake::new(now));
    }

    /// Whether the timer should force a new handshake initiation now.
    pub fn rehandshake_due(&mut self, now: Instant) -> bool {
        let Some(r) = self.rehandshake.as_mut() else {
            return false;
        };
        match r.poll(now) {
            Some(due) => due,
            None => {
                self.rehandshake = None;
                false
            }
        }
    }

    /// An initiation for this peer just went out with traffic queued
    /// behind it. If there never was a session with the peer, this is
    /// first contact: the peer may not know of us yet (the coordinator's
    /// announcement races our packet) or our relay link may still be
    /// coming up, and WireGuard would wait 5 s to try again. Retry
    /// quickly instead, until it answers.
    pub fn initiation_sent(&mut self, now: Instant) {
        if self.rehandshake.is_none() && self.tunn.time_since_last_handshake().is_none() {
            self.rehandshake = Some(Rehandshake::after_one(now));
        }
    }

    /// The peer answered under the current keys: handshakes are settled.
    pub fn answered(&mut self) {
        self.rehandshake = None;
        self.stranded = false;
    }

    /// The netmap changed this peer's endpoints or relay. A handshake that
    /// had nowhere to go (the coordinator announces a device before it has
    /// reported where it listens) is sent again at once instead of after
    /// WireGuard's 5 s retry.
    fn route_updated(&mut self, now: Instant) {
        if self.stranded && self.paths.reachable() {
            self.stranded = false;
            self.rehandshake = Some(Rehandshake::new(now));
        }
    }
}

pub struct Peer {
    pub node_key: NodePublic,
    /// Overlay addresses this peer may send from (and is routed to).
    pub allowed: Vec<IpAddr>,
    /// Session index; receivers see it in the top 24 bits.
    pub index: u32,
    /// The peer's instance: a new disco key means it restarted.
    pub disco_key: Option<DiscoPublic>,
    /// The key disco messages with this peer are sealed under, computed
    /// (a DH) on first use rather than for every message.
    disco_shared: OnceLock<SharedKey>,
    state: Mutex<PeerState>,
}

impl Peer {
    /// The disco key shared with this peer, given ours; `None` for peers
    /// without disco (stock WireGuard).
    pub fn disco_shared(&self, mine: &DiscoPrivate) -> Option<&SharedKey> {
        let theirs = self.disco_key?;
        Some(
            self.disco_shared
                .get_or_init(|| SharedKey::new(mine, &theirs)),
        )
    }

    pub fn lock(&self) -> MutexGuard<'_, PeerState> {
        // A panic while holding the lock leaves a usable Tunn behind.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Lookup structures over the current peers.
#[derive(Default)]
pub struct PeerTable {
    pub by_key: HashMap<NodePublic, Arc<Peer>>,
    pub by_ip: HashMap<IpAddr, Arc<Peer>>,
    pub by_index: HashMap<u32, Arc<Peer>>,
    pub by_disco: HashMap<DiscoPublic, Arc<Peer>>,
}

/// Hands out WireGuard session indices (24 bits; boringtun keeps the low 8).
pub struct IndexAllocator(AtomicU32);

impl IndexAllocator {
    pub fn new(start: u32) -> Self {
        IndexAllocator(AtomicU32::new(start))
    }
    fn next(&self) -> u32 {
        self.0.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff
    }
}

/// Keepalive for peers that may sit behind NAT.
const PERSISTENT_KEEPALIVE_SECS: u16 = 25;

impl PeerTable {
    /// Builds the table for `netmap`, keeping the sessions of peers whose key
    /// and addresses are unchanged, and leaving out peers whose key has
    /// expired at `now_unix`.
    pub fn build(
        old: &PeerTable,
        netmap: &NetMap,
        private: &NodePrivate,
        indices: &IndexAllocator,
        now_unix: u64,
    ) -> PeerTable {
        let mut table = PeerTable::default();
        for node in crate::key_expiry::active_peers(netmap, now_unix) {
            let peer = match old.by_key.get(&node.node_key) {
                Some(existing)
                    if existing.allowed == node.addresses
                        && existing.disco_key == node.disco_key =>
                {
                    let mut st = existing.lock();
                    st.paths.set_netmap(&node.endpoints, node.home_region);
                    st.route_updated(Instant::now());
                    drop(st);
                    existing.clone()
                }
                _ => {
                    let index = indices.next();
                    let tunn = Tunn::new(
                        private.to_dalek(),
                        node.node_key.to_dalek(),
                        None,
                        Some(PERSISTENT_KEEPALIVE_SECS),
                        index,
                        None,
                    );
                    let mut paths = PathMachine::new(node.disco_key.is_some());
                    paths.set_netmap(&node.endpoints, node.home_region);
                    let state = PeerState {
                        paths,
                        tunn,
                        disco_replay: ReplayWindow::default(),
                        stranded: false,
                        rehandshake: None,
                    };
                    Arc::new(Peer {
                        node_key: node.node_key,
                        allowed: node.addresses.clone(),
                        index,
                        disco_key: node.disco_key,
                        disco_shared: OnceLock::new(),
                        state: Mutex::new(state),
                    })
                }
            };
            table.by_index.insert(peer.index, peer.clone());
            if let Some(d) = peer.disco_key {
                table.by_disco.insert(d, peer.clone());
            }
            for ip in &peer.allowed {
                table.by_ip.insert(*ip, peer.clone());
            }
            table.by_key.insert(node.node_key, peer);
        }
        table
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::paths::HANDSHAKE_FANOUT;
    use platform::netmap::{DnsConfig, Node, NodeKind, RelayMap};
    use std::collections::BTreeMap;
    use std::net::SocketAddr;

    pub(crate) fn node(key: NodePublic, last: u8, eps: &[&str]) -> Node {
        Node {
            id: i64::from(last),
            name: format!("n{last}"),
            kind: NodeKind::Mesh,
            node_key: key,
            disco_key: None,
            addresses: vec![IpAddr::from([100, 64, 0, last])],
            endpoints: eps.iter().map(|e| e.parse().unwrap()).collect(),
            online: true,
            os: "linux".into(),
            home_region: None,
            capabilities: None,
            owner: None,
            key_expiry: None,
            device_key: None,
            owner_role: None,
            tags: Vec::new(),
        }
    }

    pub(crate) fn netmap(me: &NodePrivate, peers: Vec<Node>) -> NetMap {
        NetMap {
            network: "t".into(),
            self_node: node(me.public(), 1, &[]),
            routes: vec![],
            peers: peers
                .into_iter()
                .map(|n| (n.node_key, n))
                .collect::<BTreeMap<_, _>>(),
            relay_map: RelayMap::default(),
            dns: DnsConfig::default(),
            awaiting_approval: false,
            packet_filter: Default::default(),
            compute: Default::default(),
        }
    }

    #[test]
    fn rebuild_keeps_sessions_and_drops_removed_peers() {
        let me = NodePrivate::generate();
        let (a, b) = (
            NodePrivate::generate().public(),
            NodePrivate::generate().public(),
        );
        let idx = IndexAllocator::new(7);
        let t1 = PeerTable::build(
            &PeerTable::default(),
            &netmap(&me, vec![node(a, 2, &[]), node(b, 3, &[])]),
            &me,
            &idx,
            0,
        );
        assert_eq!(t1.by_key.len(), 2);
        assert!(t1.by_ip.contains_key(&IpAddr::from([100, 64, 0, 3])));
        let t2 = PeerTable::build(
            &t1,
            &netmap(&me, vec![node(a, 2, &["10.0.0.2:1"])]),
            &me,
            &idx,
            0,
        );
        assert_eq!(t2.by_key.len(), 1);
        assert!(Arc::ptr_eq(&t1.by_key[&a], &t2.by_key[&a]), "session kept");
        assert!(!t2.by_ip.contains_key(&IpAddr::from([100, 64, 0, 3])));
        assert_eq!(t2.by_index.len(), 1);

        // The peer restarted (new disco key): a fresh session.
        let mut restarted = node(a, 2, &["10.0.0.2:1"]);
        restarted.disco_key = Some(platform::keys::DiscoPrivate::generate().public());
        let t3 = PeerTable::build(&t2, &netmap(&me, vec![restarted]), &me, &idx, 0);
        assert!(
            !Arc::ptr_eq(&t2.by_key[&a], &t3.by_key[&a]),
            "session replaced"
        );
    }

    #[test]
    fn handshakes_rotate_through_candidates_until_confirmed() {
        let me = NodePrivate::generate();
        let a = NodePrivate::generate().public();
        let idx = IndexAllocator::new(1);
        let t = PeerTable::build(
            &PeerTable::default(),
            &netmap(&me, vec![node(a, 2, &["10.0.0.1:1", "10.0.0.2:1"])]),
            &me,
            &idx,
            0,
        );
        let mut st = t.by_key[&a].lock();
        let now = Instant::now();
        let init = [HANDSHAKE_INIT, 0, 0, 0];
        let data = [4, 0, 0, 0];
        let first = st.targets_for(&init, now).direct.unwrap();
        let second = st.targets_for(&init, now).direct.unwrap();
        assert_ne!(first, second);
        assert_eq!(
            st.targets_for(&data, now),
            Targets {
                direct: Some(second),
                relay: None,
                ..Targets::default()
            },
            "data follows the last try"
        );
        assert_eq!(st.paths.path(now), Path::Trying(second));
        let roamed: SocketAddr = "192.168.1.9:5".parse().unwrap();
        st.paths.heard_direct(roamed, now, &mut Vec::new());
        assert_eq!(st.targets_for(&init, now).direct, Some(roamed));
        assert_eq!(st.paths.path(now), Path::Direct(roamed));
        st.paths.expire(now + Duration::from_secs(16));
        assert_ne!(st.targets_for(&init, now).direct, Some(roamed));
    }

    #[test]
    fn a_handshake_without_a_direct_path_tries_several_candidates_at_once() {
        let me = NodePrivate::generate();
        let a = NodePrivate::generate().public();
        let eps = [
            "10.0.0.1:1",
            "10.0.0.2:1",
            "192.0.2.3:1",
            "198.51.100.4:1",
            "203.0.113.5:1",
        ];
        let t = PeerTable::build(
            &PeerTable::default(),
            &netmap(&me, vec![node(a, 2, &eps)]),
            &me,
            &IndexAllocator::new(1),
            0,
        );
        let mut st = t.by_key[&a].lock();
        let now = Instant::now();
        let init = [HANDSHAKE_INIT, 0, 0, 0];
        let first: Vec<SocketAddr> = st.targets_for(&init, now).direct_all().collect();
        assert_eq!(first.len(), HANDSHAKE_FANOUT, "{first:?}");
        let unique: std::collections::HashSet<_> = first.iter().collect();
        assert_eq!(unique.len(), HANDSHAKE_FANOUT);
        // The retry covers the one left out.
        let second: Vec<SocketAddr> = st.targets_for(&init, now).direct_all().collect();
        let covered: std::collections::HashSet<_> = first.iter().chain(&second).collect();
        assert_eq!(covered.len(), eps.len());
        // Data is not multiplied.
        assert_eq!(st.targets_for(&[4, 0, 0, 0], now).direct_all().count(), 1);
        // Once a path answers, handshakes go there alone.
        st.paths.heard_direct(second[0], now, &mut Vec::new());
        assert_eq!(
            st.targets_for(&init, now).direct_all().collect::<Vec<_>>(),
            vec![second[0]]
        );
    }

    #[test]
    fn a_peer_heard_through_a_relay_is_answered_there_until_the_netmap_names_its_own() {
        let me = NodePrivate::generate();
        let a = NodePrivate::generate().public();
        let idx = IndexAllocator::new(1);
        // Just joined: no endpoints, no home relay reported yet.
        let t = PeerTable::build(
            &PeerTable::default(),
            &netmap(&me, vec![node(a, 2, &[])]),
            &me,
            &idx,
            0,
        );
        let data = [4, 0, 0, 0];
        let now = Instant::now();
        assert_eq!(
            t.by_key[&a].lock().targets_for(&data, now),
            Targets::default()
        );
        t.by_key[&a].lock().paths.heard_via_relay(3);
        assert_eq!(
            t.by_key[&a].lock().targets_for(&data, now).relay,
            Some(3),
            "answered through the relay it spoke through"
        );
        // The netmap's word wins once it has one.
        let mut n = node(a, 2, &[]);
        n.home_region = Some(7);
        let t = PeerTable::build(&t, &netmap(&me, vec![n]), &me, &idx, 0);
        assert_eq!(t.by_key[&a].lock().targets_for(&data, now).relay, Some(7));
    }

    #[test]
    fn relay_carries_traffic_until_a_direct_path_answers() {
        let me = NodePrivate::generate();
        let a = NodePrivate::generate().public();
        let mut n = node(a, 2, &["10.0.0.1:1"]);
        n.home_region = Some(7);
        let t = PeerTable::build(
            &PeerTable::default(),
            &netmap(&me, vec![n]),
            &me,
            &IndexAllocator::new(1),
            0,
        );
        let mut st = t.by_key[&a].lock();
        let now = Instant::now();
        let init = [HANDSHAKE_INIT, 0, 0, 0];
        let data = [4, 0, 0, 0];
        let direct: SocketAddr = "10.0.0.1:1".parse().unwrap();
        assert_eq!(
            st.targets_for(&init, now),
            Targets {
                direct: Some(direct),
                relay: Some(7),
                ..Targets::default()
            },
            "handshakes try both"
        );
        assert_eq!(
            st.targets_for(&data, now),
            Targets {
                direct: None,
                relay: Some(7),
                ..Targets::default()
            },
            "data goes relayed"
        );
        assert_eq!(st.paths.path(now), Path::Relay(7));
        st.paths.heard_direct(direct, now, &mut Vec::new());
        assert_eq!(
            st.targets_for(&data, now),
            Targets {
                direct: Some(direct),
                relay: None,
                ..Targets::default()
            }
        );
        // The direct path goes silent: back to the relay.
        st.paths.expire(now + Duration::from_secs(16));
        assert_eq!(
            st.targets_for(&data, now),
            Targets {
                direct: None,
                relay: Some(7),
                ..Targets::default()
            }
        );
    }

    #[test]
    fn rehandshakes_back_off_then_give_up() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut r = Rehandshake::new(t0);
        assert_eq!(r.poll(t0), Some(true), "at once");
        assert_eq!(r.poll(t0 + ms(100)), Some(false));
        assert_eq!(r.poll(t0 + ms(200)), Some(true));
        assert_eq!(r.poll(t0 + ms(500)), Some(false), "gap doubled");
        assert_eq!(r.poll(t0 + ms(600)), Some(true));
        assert_eq!(r.poll(t0 + ms(1399)), Some(false));
        assert_eq!(r.poll(t0 + ms(1400)), Some(true));
        assert_eq!(r.poll(t0 + ms(2399)), Some(false), "capped at a second");
        assert_eq!(r.poll(t0 + ms(2400)), Some(true));
        assert_eq!(r.poll(t0 + REHANDSHAKE_FOR), None, "gives up");
    }

    /// Runs `datagram` through `tunn`, returning what it wants sent back.
    fn feed(tunn: &mut Tunn, datagram: &[u8]) -> Option<Vec<u8>> {
        let mut out = vec![0u8; 2048];
        match tunn.decapsulate(None, datagram, &mut out) {
            boringtun::noise::TunnResult::WriteToNetwork(p) => Some(p.to_vec()),
            _ => None,
        }
    }

    /// A handshake initiation from `tunn` (`force`: even if one is in flight).
    fn initiation(tunn: &mut Tunn, force: bool) -> Vec<u8> {
        let mut buf = vec![0u8; 256];
        match tunn.format_handshake_initiation(&mut buf, force) {
            boringtun::noise::TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => panic!("no initiation"),
        }
    }

    #[test]
    fn node_key_change_keeps_the_peer_and_rehandshakes_under_the_new_key() {
        let (old, new, them) = (
            NodePrivate::generate(),
            NodePrivate::generate(),
            NodePrivate::generate(),
        );
        let t = PeerTable::build(
            &PeerTable::default(),
            &netmap(&old, vec![node(them.public(), 2, &[])]),
            &old,
            &IndexAllocator::new(3),
            0,
        );
        let peer = t.by_key[&them.public()].clone();
        let mut st = peer.lock();
        // A session under the old key.
        let mut theirs = Tunn::new(
            them.to_dalek(),
            old.public().to_dalek(),
            None,
            None,
            9,
            None,
        );
        let init = initiation(&mut st.tunn, false);
        let response = feed(&mut theirs, &init).expect("response");
        let keepalive = feed(&mut st.tunn, &response).expect("keepalive");
        assert!(feed(&mut theirs, &keepalive).is_none());
        assert!(st.tunn.time_since_last_handshake().is_some());
        let now = Instant::now();
        assert!(!st.rehandshake_due(now), "nothing to do before a change");

        st.set_static_key(new.to_dalek(), new.public().to_dalek(), now);
        assert!(
            st.rehandshake_due(now),
            "an active session rehandshakes at once"
        );
        let init = initiation(&mut st.tunn, true);
        // A peer that still knows only the old key refuses it ...
        assert!(feed(&mut theirs, &init).is_none());
        // ... and once told the new key (a fresh session), accepts.
        let mut told = Tunn::new(
            them.to_dalek(),
            new.public().to_dalek(),
            None,
            None,
            10,
            None,
        );
        let response = feed(&mut told, &init).expect("response under the new key");
        assert!(feed(&mut st.tunn, &response).is_some(), "session up");
        st.answered();
        assert!(!st.rehandshake_due(now + Duration::from_secs(1)));
        assert_eq!(
            peer.index,
            t.by_index.keys().copied().next().unwrap(),
            "same slot"
        );
    }

    #[test]
    fn idle_sessions_wait_for_traffic_after_a_key_change() {
        let (old, new, them) = (
            NodePrivate::generate(),
            NodePrivate::generate(),
            NodePrivate::generate(),
        );
        let t = PeerTable::build(
            &PeerTable::default(),
            &netmap(&old, vec![node(them.public(), 2, &[])]),
            &old,
            &IndexAllocator::new(3),
            0,
        );
        let mut st = t.by_key[&them.public()].lock();
        let now = Instant::now();
        st.set_static_key(new.to_dalek(), new.public().to_dalek(), now);
        assert!(!st.rehandshake_due(now));
    }

    #[test]
    fn a_handshake_with_nowhere_to_go_is_resent_once_the_peer_has_an_endpoint() {
        let (me, them) = (NodePrivate::generate(), NodePrivate::generate());
        let idx = IndexAllocator::new(1);
        // Announced before it reported where it listens.
        let bare = PeerTable::build(
            &PeerTable::default(),
            &netmap(&me, vec![node(them.public(), 2, &[])]),
            &me,
            &idx,
            0,
        );
        let peer = bare.by_key[&them.public()].clone();
        let init = initiation(&mut peer.lock().tunn, false);
        let now = Instant::now();
        assert_eq!(peer.lock().targets_for(&init, now), Targets::default());
        assert!(!peer.lock().rehandshake_due(now), "still nowhere to go");

        // A change that still gives no route keeps it waiting ...
        let still_bare = PeerTable::build(
            &bare,
            &netmap(&me, vec![node(them.public(), 2, &[])]),
            &me,
            &idx,
            0,
        );
        assert!(!still_bare.by_key[&them.public()]
            .lock()
            .rehandshake_due(now));
        // ... and its endpoint sends the handshake again at once.
        let t = PeerTable::build(
            &still_bare,
            &netmap(&me, vec![node(them.public(), 2, &["10.0.0.2:41641"])]),
            &me,
            &idx,
            0,
        );
        let mut st = t.by_key[&them.public()].lock();
        assert!(st.rehandshake_due(Instant::now()));
        st.answered();
        assert!(!st.rehandshake_due(Instant::now() + Duration::from_secs(1)));
    }

    #[test]
    fn first_contact_retries_quickly_until_answered_and_only_once_per_silence() {
        let (me, them) = (NodePrivate::generate(), NodePrivate::generate());
        let t = PeerTable::build(
            &PeerTable::default(),
            &netmap(&me, vec![node(them.public(), 2, &["10.0.0.2:41641"])]),
            &me,
            &IndexAllocator::new(1),
            0,
        );
        let mut st = t.by_key[&them.public()].lock();
        let t0 = Instant::now();
        let _ = initiation(&mut st.tunn, false);
        st.initiation_sent(t0);
        assert!(!st.rehandshake_due(t0), "the first one has just gone");
        // Well before WireGuard's 5 s retry, and again after it.
        assert!(st.rehandshake_due(t0 + Duration::from_millis(200)));
        assert!(!st.rehandshake_due(t0 + Duration::from_millis(300)));
        assert!(st.rehandshake_due(t0 + Duration::from_millis(700)));
        // Sending more while it retries does not restart the schedule.
        st.initiation_sent(t0 + Duration::from_millis(750));
        assert!(!st.rehandshake_due(t0 + Duration::from_millis(800)));
        st.answered();
        assert!(!st.rehandshake_due(t0 + Duration::from_secs(3)));
        // Gave up after REHANDSHAKE_FOR without an answer: WireGuard's own
        // timers go on alone.
        let mut r = Rehandshake::after_one(t0);
        assert_eq!(r.poll(t0 + REHANDSHAKE_FOR), None);
    }

    #[test]
    fn endpoint_changes_alone_force_no_handshake() {
        let (me, them) = (NodePrivate::generate(), NodePrivate::generate());
        let idx = IndexAllocator::new(1);
        let first = PeerTable::build(
            &PeerTable::default(),
            &netmap(&me, vec![node(them.public(), 2, &["10.0.0.2:41641"])]),
            &me,
            &idx,
            0,
        );
        let init = initiation(&mut first.by_key[&them.public()].lock().tunn, false);
        let sent = first.by_key[&them.public()]
            .lock()
            .targets_for(&init, Instant::now());
        assert_eq!(sent.direct, Some("10.0.0.2:41641".parse().unwrap()));
        let t = PeerTable::build(
            &first,
            &netmap(&me, vec![node(them.public(), 2, &["10.0.0.3:41641"])]),
            &me,
            &idx,
            0,
        );
        assert!(!t.by_key[&them.public()]
            .lock()
            .rehandshake_due(Instant::now()));
    }

    #[test]
    fn a_confirmed_endpoint_the_netmap_drops_goes_at_the_next_tick_unless_heard_again() {
        let (me, them) = (NodePrivate::generate(), NodePrivate::generate());
        let idx = IndexAllocator::new(1);
        let map = |eps: &[&str]| netmap(&me, vec![node(them.public(), 2, eps)]);
        let t = PeerTable::build(&PeerTable::default(), &map(&["10.0.0.2:1"]), &me, &idx, 0);
        let peer = t.by_key[&them.public()].clone();
        let now = Instant::now();
        let roamed: SocketAddr = "192.168.1.9:5".parse().unwrap();
        peer.lock().paths.heard_direct(roamed, now, &mut Vec::new());
        // The netmap moves the peer elsewhere. This used to back-date the
        // last receive time by `Instant::now() - 15 s`, which panics on a
        // clock that started less than 15 s ago.
        let _ = PeerTable::build(&t, &map(&["10.0.0.3:1"]), &me, &idx, 0);
        assert_eq!(
            peer.lock().paths.direct(now),
            Some(roamed),
            "kept until the tick"
        );
        peer.lock().paths.expire(now);
        assert_eq!(peer.lock().paths.direct(now), None, "dropped at the tick");

        // Heard from again before the tick: kept.
        peer.lock().paths.heard_direct(roamed, now, &mut Vec::new());
        let _ = PeerTable::build(&t, &map(&["10.0.0.4:1"]), &me, &idx, 0);
        peer.lock().paths.heard_direct(roamed, now, &mut Vec::new());
        peer.lock().paths.expire(now);
        assert_eq!(peer.lock().paths.direct(now), Some(roamed));
    }

    #[test]
    fn expired_peers_get_no_session() {
        let me = NodePrivate::generate();
        let (a, b) = (
            NodePrivate::generate().public(),
            NodePrivate::generate().public(),
        );
        let mut na = node(a, 2, &[]);
        na.key_expiry = Some(1000);
        let map = netmap(&me, vec![na, node(b, 3, &[])]);
        let idx = IndexAllocator::new(1);
        let before = PeerTable::build(&PeerTable::default(), &map, &me, &idx, 999);
        assert_eq!(before.by_key.len(), 2);
        let after = PeerTable::build(&before, &map, &me, &idx, 1000);
        assert!(!after.by_key.contains_key(&a));
        assert!(!after.by_ip.contains_key(&IpAddr::from([100, 64, 0, 2])));
        assert!(Arc::ptr_eq(&before.by_key[&b], &after.by_key[&b]));
    }
}
