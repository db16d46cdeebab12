//! Presence and fan-out of peer changes to live map streams.
//!
//! Each connected device has one session holding the sending half of its
//! change queue. A change in a network is pushed to the sessions of that
//! network only: the work is proportional to the peers it touches, and no map
//! is ever rebuilt. The clock is passed in, so the sweep is testable.
//!
//! Memory per stream is bounded: changes wait in a queue of
//! [`CHANGE_QUEUE`] entries, and a stream that falls further behind is
//! resynced with one full netmap instead of queueing more. Control signals
//! (close, key rotation, resync) are flags beside the queue and go first.
//!
//! A device waiting for an admin's approval has a session (it gets its own
//! netmap) but neither hears about peers nor is announced to them. Revoked
//! node keys are also published to relays, which drop them at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use platform::api::ApiErrorBody;
use platform::filter::PacketFilter;
use platform::keys::NodePublic;
use platform::netmap::PeerChange;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{broadcast, mpsc, Notify};

/// What the hub pushes to one map stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Push {
    Change(PeerChange),
    /// Renew the node key (an admin rotated the network's keys).
    RotateKey,
    /// Send the device a fresh full netmap (it was just approved, or it fell
    /// so far behind that its queued changes were dropped).
    Refresh,
    /// End the stream with this error (the device was removed or revoked).
    Close(ApiErrorBody),
    /// The device's packet filter changed.
    Filter(Arc<PacketFilter>),
}

/// Which devices of a network may know about each other (the access
/// policy's word): a change about a device reaches only the streams of
/// devices that see it.
pub trait Visibility: Send + Sync {
    fn sees(&self, viewer: i64, subject: i64) -> bool;
}

/// Revoked node keys kept for relays that fall behind.
const REVOCATION_BACKLOG: usize = 1024;

/// Peer changes one stream may have waiting. A stream that falls further
/// behind (its device reads slowly, or not at all) loses its queued changes
/// and gets one full netmap instead: its memory stays bounded whatever the
/// rate of changes, and it still ends up with the current state.
pub const CHANGE_QUEUE: usize = 256;

/// Control signals of one stream. They are flags, not queue entries, so
/// they can neither be lost to a full queue nor pile up: a close or a
/// resync is delivered ahead of whatever changes are waiting.
#[derive(Default)]
struct Signals {
    notify: Notify,
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    close: Option<ApiErrorBody>,
    resync: bool,
    rotate: bool,
    /// The newest filter not yet sent (a newer one replaces it).
    filter: Option<Arc<PacketFilter>>,
}

impl Signals {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn raise(&self, f: impl FnOnce(&mut Pending)) {
        f(&mut self.lock());
        self.notify.notify_one();
    }
}

struct Session {
    conn_id: u64,
    node_key: NodePublic,
    /// False while the device awaits approval: it hears nothing and is not
    /// announced.
    approved: bool,
    tx: mpsc::Sender<PeerChange>,
    signals: Arc<Signals>,
    last_heard: Instant,
    /// Silent past the grace period: shown offline until heard again.
    stale: bool,
}

impl Session {
    /// Queues a change; a full queue turns into one resync. Returns false
    /// when the stream has ended.
    fn push_change(&self, change: PeerChange, lagged: &AtomicU64) -> bool {
        match self.tx.try_send(change) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                let mut first = false;
                self.signals.raise(|p| {
                    first = !p.resync;
                    p.resync = true;
                });
                if first {
                    lagged.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(conn = self.conn_id, "map stream fell behind: resync");
                }
                true
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }

    fn push(&self, push: Push, lagged: &AtomicU64) -> bool {
        if self.tx.is_closed() {
            return false;
        }
        match push {
            Push::Change(c) => return self.push_change(c, lagged),
            Push::RotateKey => self.signals.raise(|p| p.rotate = true),
            Push::Refresh => self.signals.raise(|p| p.resync = true),
            Push::Close(why) => self.signals.raise(|p| {
                p.close.get_or_insert(why);
            }),
            Push::Filter(f) => self.signals.raise(|p| p.filter = Some(f)),
        }
        true
    }
}

#[derive(Default)]
struct Inner {
    next_conn: u64,
    /// network id → device id → session
    networks: HashMap<i64, HashMap<i64, Session>>,
    /// Ephemeral devices that went away, with when.
    departed_ephemeral: HashMap<i64, (i64, NodePublic, Instant)>,
    /// network id → who sees whom. A network without one (hub tests) is
    /// fully visible: the coordinator installs one before any of the
    /// network's streams connects.
    visibility: HashMap<i64, Arc<dyn Visibility>>,
}

pub struct Hub {
    inner: Mutex<Inner>,
    grace: Duration,
    queue: usize,
    revocations: broadcast::Sender<NodePublic>,
    /// Times a stream fell behind and was resynced (for metrics).
    lagged: AtomicU64,
}

/// What a connection gets from the hub: its queue of changes and its
/// control signals. Dropped or replaced, the stream is over.
pub struct Subscription {
    pub conn_id: u64,
    changes: mpsc::Receiver<PeerChange>,
    signals: Arc<Signals>,
}

impl Subscription {
    /// The next thing to tell the device: a close, a key rotation or a
    /// resync before any queued change. `None` once a newer stream of the
    /// device replaced this one. Cancel-safe (for `select!`).
    pub async fn recv(&mut self) -> Option<Push> {
        let signals = self.signals.clone();
        loop {
            let notified = signals.notify.notified();
            if let Some(p) = self.take_signal() {
                return Some(p);
            }
            tokio::select! {
                biased;
                () = notified => {}
                change = self.changes.recv() => return change.map(Push::Change),
            }
        }
    }

    /// A queued change that is ready now, unless a signal waits (it goes
    /// first: after a resync the queued changes are stale).
    pub fn try_recv_change(&mut self) -> Option<PeerChange> {
        {
            let p = self.signals.lock();
            if p.close.is_some() || p.resync || p.rotate || p.filter.is_some() {
                return None;
            }
        }
        self.changes.try_recv().ok()
    }

    /// What [`Subscription::recv`] would return now, without waiting.
    #[cfg(test)]
    fn try_recv(&mut self) -> Option<Push> {
        self.take_signal()
            .or_else(|| self.changes.try_recv().ok().map(Push::Change))
    }

    fn take_signal(&mut self) -> Option<Push> {
        let mut p = self.signals.lock();
        if let Some(why) = &p.close {
            return Some(Push::Close(why.clone()));
        }
        if std::mem::take(&mut p.rotate) {
            return Some(Push::RotateKey);
        }
        if std::mem::take(&mut p.resync) {
            // The full netmap carries the current filter.
            p.filter = None;
            drop(p);
            // Everything queued so far is older than the netmap about to
            // be read, so it is dropped rather than replayed on top of it.
            while self.changes.try_recv().is_ok() {}
            return Some(Push::Refresh);
        }
        if let Some(f) = p.filter.take() {
            return Some(Push::Filter(f));
        }
        None
    }
}

/// An ephemeral device gone for longer than the grace period.
#[derive(Debug, PartialEq, Eq)]
pub struct Expired {
    pub network_id: i64,
    pub device_id: i64,
    pub node_key: NodePublic,
}

/// One live stream, as [`Hub::sessions`] lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveSession {
    pub network_id: i64,
    pub device_id: i64,
    pub conn_id: u64,
}

impl Inner {
    fn broadcast(&self, network_id: i64, subject: i64, change: &PeerChange, lagged: &AtomicU64) {
        let vis = self.visibility.get(&network_id);
        if let Some(sessions) = self.networks.get(&network_id) {
            for (id, s) in sessions {
                if *id != subject && s.approved && vis.is_none_or(|v| v.sees(*id, subject)) {
                    // A closed receiver means the connection is ending; it
                    // removes itself.
                    s.push_change(change.clone(), lagged);
                }
            }
        }
    }
}

impl Hub {
    pub fn new(grace: Duration) -> Self {
        Self::with_queue(grace, CHANGE_QUEUE)
    }

    /// A hub whose streams queue at most `queue` changes each.
    pub fn with_queue(grace: Duration, queue: usize) -> Self {
        Hub {
            inner: Mutex::new(Inner::default()),
            grace,
            queue: queue.max(1),
            revocations: broadcast::channel(REVOCATION_BACKLOG).0,
            lagged: AtomicU64::new(0),
        }
    }

    /// How many times a stream fell behind and was resynced.
    pub fn lagged_total(&self) -> u64 {
        self.lagged.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a live stream for a device, replacing an older one (whose
    /// queue closes, ending that connection). Tells its peers it is online
    /// (unless it awaits approval).
    pub fn connect(
        &self,
        network_id: i64,
        device_id: i64,
        node_key: NodePublic,
        approved: bool,
        now: Instant,
    ) -> Subscription {
        let mut inner = self.lock();
        inner.next_conn += 1;
        let conn_id = inner.next_conn;
        inner.departed_ephemeral.remove(&device_id);
        let (tx, rx) = mpsc::channel(self.queue);
        let signals = Arc::new(Signals::default());
        let session = Session {
            conn_id,
            node_key,
            approved,
            tx,
            signals: signals.clone(),
            last_heard: now,
            stale: false,
        };
        let previous = inner
            .networks
            .entry(network_id)
            .or_default()
            .insert(device_id, session);
        let was_online = previous.is_some_and(|p| !p.stale && p.approved);
        if !was_online && approved {
            inner.broadcast(
                network_id,
                device_id,
                &PeerChange::Online {
                    node_key,
                    online: true,
                },
                &self.lagged,
            );
        }
        Subscription {
            conn_id,
            changes: rx,
            signals,
        }
    }

    /// The device spoke on its stream.
    pub fn heard(&self, network_id: i64, device_id: i64, conn_id: u64, now: Instant) {
        let mut inner = self.lock();
        let Some(s) = inner
            .networks
            .get_mut(&network_id)
            .and_then(|n| n.get_mut(&device_id))
        else {
            return;
        };
        if s.conn_id != conn_id {
            return;
        }
        s.last_heard = now;
        if s.stale {
            s.stale = false;
            if !s.approved {
                return;
            }
            let node_key = s.node_key;
            inner.broadcast(
                network_id,
                device_id,
                &PeerChange::Online {
                    node_key,
                    online: true,
                },
                &self.lagged,
            );
        }
    }

    /// The stream of `conn_id` ended. Returns true when it was the device's
    /// current stream (so the device is now offline).
    pub fn disconnect(
        &self,
        network_id: i64,
        device_id: i64,
        conn_id: u64,
        ephemeral: bool,
        now: Instant,
    ) -> bool {
        let mut inner = self.lock();
        let Some(sessions) = inner.networks.get_mut(&network_id) else {
            return false;
        };
        if sessions.get(&device_id).map(|s| s.conn_id) != Some(conn_id) {
            return false;
        }
        let s = sessions.remove(&device_id).expect("checked above");
        if sessions.is_empty() {
            inner.networks.remove(&network_id);
        }
        if !s.stale && s.approved {
            inner.broadcast(
                network_id,
                device_id,
                &PeerChange::Online {
                    node_key: s.node_key,
                    online: false,
                },
                &self.lagged,
            );
        }
        if ephemeral {
            inner
                .departed_ephemeral
                .insert(device_id, (network_id, s.node_key, now));
        }
        true
    }

    pub fn is_online(&self, network_id: i64, device_id: i64) -> bool {
        self.lock()
            .networks
            .get(&network_id)
            .and_then(|n| n.get(&device_id))
            .is_some_and(|s| !s.stale)
    }

    /// Installs who sees whom in a network (replacing what was there).
    pub fn set_visibility(&self, network_id: i64, vis: Arc<dyn Visibility>) {
        self.lock().visibility.insert(network_id, vis);
    }

    /// The devices of a network with an approved live stream.
    pub fn live_devices(&self, network_id: i64) -> Vec<i64> {
        self.lock()
            .networks
            .get(&network_id)
            .map(|n| {
                n.iter()
                    .filter(|(_, s)| s.approved)
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Sends a change to every live stream of the network that sees the
    /// device (`subject`), except the device's own.
    pub fn broadcast(&self, network_id: i64, subject: i64, change: PeerChange) {
        self.lock()
            .broadcast(network_id, subject, &change, &self.lagged);
    }

    /// Sends to one device's stream, if it has one. Returns whether it did.
    pub fn send_to(&self, network_id: i64, device_id: i64, push: Push) -> bool {
        self.lock()
            .networks
            .get(&network_id)
            .and_then(|n| n.get(&device_id))
            .is_some_and(|s| s.push(push, &self.lagged))
    }

    /// Ends one stream with `why`, if it is still the device's current one.
    pub fn close(&self, live: LiveSession, why: ApiErrorBody) {
        if let Some(s) = self
            .lock()
            .networks
            .get(&live.network_id)
            .and_then(|n| n.get(&live.device_id))
            .filter(|s| s.conn_id == live.conn_id)
        {
            s.push(Push::Close(why), &self.lagged);
        }
    }

    /// Every live stream.
    pub fn sessions(&self) -> Vec<LiveSession> {
        let inner = self.lock();
        inner
            .networks
            .iter()
            .flat_map(|(network_id, n)| {
                n.iter().map(|(device_id, s)| LiveSession {
                    network_id: *network_id,
                    device_id: *device_id,
                    conn_id: s.conn_id,
                })
            })
            .collect()
    }

    /// The device was approved: from now on it hears about its peers and
    /// they about it (the caller sends both sides their upserts).
    pub fn approve(&self, network_id: i64, device_id: i64) {
        if let Some(s) = self
            .lock()
            .networks
            .get_mut(&network_id)
            .and_then(|n| n.get_mut(&device_id))
        {
            s.approved = true;
        }
    }

    /// The session's node key changed (rotation) without a new stream.
    pub fn set_node_key(&self, network_id: i64, device_id: i64, node_key: NodePublic) {
        if let Some(s) = self
            .lock()
            .networks
            .get_mut(&network_id)
            .and_then(|n| n.get_mut(&device_id))
        {
            s.node_key = node_key;
        }
    }

    /// Asks every live device of the network to renew its node key.
    /// Returns how many were asked.
    pub fn rotate_all(&self, network_id: i64) -> usize {
        self.lock().networks.get(&network_id).map_or(0, |n| {
            n.values()
                .filter(|s| s.push(Push::RotateKey, &self.lagged))
                .count()
        })
    }

    /// Tells relays to drop `key` now rather than when their cache expires.
    pub fn revoke_relay_access(&self, key: NodePublic) {
        // No relay listening is fine: they ask before admitting anyway.
        let _ = self.revocations.send(key);
    }

    /// Revoked node keys from now on (for relays' revocation streams).
    pub fn revocations(&self) -> broadcast::Receiver<NodePublic> {
        self.revocations.subscribe()
    }

    /// Starts the grace period of an ephemeral device that has no stream
    /// here (as at a restart, when nobody is connected yet): unless it
    /// connects within the grace period, [`Hub::sweep`] returns it for
    /// deletion. A device that is connected is left alone.
    pub fn depart_ephemeral(
        &self,
        network_id: i64,
        device_id: i64,
        node_key: NodePublic,
        now: Instant,
    ) {
        let mut inner = self.lock();
        let connected = inner
            .networks
            .get(&network_id)
            .is_some_and(|n| n.contains_key(&device_id));
        if !connected {
            inner
                .departed_ephemeral
                .entry(device_id)
                .or_insert((network_id, node_key, now));
        }
    }

    /// Marks devices silent past the grace period offline, and returns the
    /// ephemeral devices gone longer than it (for the caller to delete).
    pub fn sweep(&self, now: Instant) -> Vec<Expired> {
        let mut inner = self.lock();
        let mut went_silent = Vec::new();
        for (network_id, sessions) in &mut inner.networks {
            for (device_id, s) in sessions.iter_mut() {
                if !s.stale && now.saturating_duration_since(s.last_heard) > self.grace {
                    s.stale = true;
                    went_silent.push((*network_id, *device_id, s.node_key));
                }
            }
        }
        for (network_id, device_id, node_key) in went_silent {
            inner.broadcast(
                network_id,
                device_id,
                &PeerChange::Online {
                    node_key,
                    online: false,
                },
                &self.lagged,
            );
        }
        let grace = self.grace;
        let mut expired = Vec::new();
        inner
            .departed_ephemeral
            .retain(|device_id, (network_id, node_key, since)| {
                let keep = now.saturating_duration_since(*since) <= grace;
                if !keep {
                    expired.push(Expired {
                        network_id: *network_id,
                        device_id: *device_id,
                        node_key: *node_key,
                    });
                }
                keep
            });
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> NodePublic {
        NodePublic::from_bytes([b; 32])
    }

    fn drain(rx: &mut Subscription) -> Vec<PeerChange> {
        let mut out = Vec::new();
        while let Some(p) = rx.try_recv() {
            match p {
                Push::Change(c) => out.push(c),
                other => panic!("unexpected push {other:?}"),
            }
        }
        out
    }

    #[test]
    fn presence_follows_connections_and_silence() {
        let hub = Hub::new(Duration::from_secs(20));
        let t0 = Instant::now();
        let mut a = hub.connect(1, 10, key(1), true, t0);
        let b = hub.connect(1, 11, key(2), true, t0);
        let mut other_net = hub.connect(2, 20, key(3), true, t0);
        assert_eq!(
            drain(&mut a),
            vec![PeerChange::Online {
                node_key: key(2),
                online: true
            }]
        );
        assert!(
            drain(&mut other_net).is_empty(),
            "changes never cross networks"
        );

        // b goes silent: offline after the grace period, back when heard.
        hub.heard(1, 10, a.conn_id, t0 + Duration::from_secs(15));
        assert!(hub.sweep(t0 + Duration::from_secs(19)).is_empty());
        assert!(drain(&mut a).is_empty());
        hub.sweep(t0 + Duration::from_secs(21));
        assert_eq!(
            drain(&mut a),
            vec![PeerChange::Online {
                node_key: key(2),
                online: false
            }]
        );
        assert!(!hub.is_online(1, 11));
        assert!(hub.is_online(1, 10));
        hub.heard(1, 11, b.conn_id, t0 + Duration::from_secs(22));
        assert_eq!(
            drain(&mut a),
            vec![PeerChange::Online {
                node_key: key(2),
                online: true
            }]
        );

        // A stale connection id does not take the device down.
        assert!(!hub.disconnect(1, 11, b.conn_id + 100, false, t0));
        assert!(hub.disconnect(1, 11, b.conn_id, false, t0));
        assert_eq!(
            drain(&mut a),
            vec![PeerChange::Online {
                node_key: key(2),
                online: false
            }]
        );
    }

    /// Sees only pairs it lists.
    struct Pairs(Vec<(i64, i64)>);

    impl Visibility for Pairs {
        fn sees(&self, a: i64, b: i64) -> bool {
            self.0.contains(&(a, b)) || self.0.contains(&(b, a))
        }
    }

    #[test]
    fn changes_and_presence_reach_only_devices_that_see_the_subject() {
        let hub = Hub::new(Duration::from_secs(20));
        hub.set_visibility(1, Arc::new(Pairs(vec![(1, 2)])));
        let t0 = Instant::now();
        let mut a = hub.connect(1, 1, key(1), true, t0);
        let mut c = hub.connect(1, 3, key(3), true, t0);
        let _b = hub.connect(1, 2, key(2), true, t0);
        assert_eq!(drain(&mut a).len(), 1, "a sees b come online");
        assert!(drain(&mut c).is_empty(), "c does not learn b exists");
        hub.broadcast(1, 2, PeerChange::Removed { node_key: key(2) });
        assert_eq!(drain(&mut a).len(), 1);
        assert!(drain(&mut c).is_empty());
    }

    #[test]
    fn the_newest_filter_wins_and_a_resync_carries_it() {
        let hub = Hub::new(Duration::from_secs(20));
        let mut a = hub.connect(1, 1, key(1), true, Instant::now());
        let filter = |n: u16| {
            Arc::new(PacketFilter {
                rules: vec![platform::filter::FilterRule {
                    sources: Vec::new(),
                    protos: Vec::new(),
                    ports: vec![platform::filter::PortRange::one(n)],
                }],
            })
        };
        hub.send_to(1, 1, Push::Filter(filter(1)));
        hub.send_to(1, 1, Push::Filter(filter(2)));
        assert_eq!(a.try_recv(), Some(Push::Filter(filter(2))));
        assert_eq!(a.try_recv(), None);
        hub.send_to(1, 1, Push::Filter(filter(3)));
        hub.send_to(1, 1, Push::Refresh);
        assert_eq!(
            a.try_recv(),
            Some(Push::Refresh),
            "the full netmap has the filter"
        );
        assert_eq!(a.try_recv(), None);
    }

    #[test]
    fn reconnect_replaces_old_stream() {
        let hub = Hub::new(Duration::from_secs(20));
        let t0 = Instant::now();
        let mut watcher = hub.connect(1, 1, key(1), true, t0);
        let mut first = hub.connect(1, 2, key(2), true, t0);
        drain(&mut watcher);
        let _second = hub.connect(1, 2, key(2), true, t0);
        assert!(drain(&mut watcher).is_empty(), "still online, no flap");
        assert!(first.try_recv().is_none());
        assert!(
            first.changes.is_closed(),
            "the replaced stream's queue is closed"
        );
        assert!(
            !hub.disconnect(1, 2, first.conn_id, false, t0),
            "old stream ending is not a departure"
        );
        assert!(hub.is_online(1, 2));
    }

    #[test]
    fn unapproved_devices_hear_nothing_and_are_not_announced() {
        let hub = Hub::new(Duration::from_secs(20));
        let t0 = Instant::now();
        let mut a = hub.connect(1, 1, key(1), true, t0);
        let mut pending = hub.connect(1, 2, key(2), false, t0);
        assert!(drain(&mut a).is_empty(), "pending device not announced");
        hub.broadcast(1, 1, PeerChange::Removed { node_key: key(9) });
        assert!(drain(&mut pending).is_empty());
        hub.approve(1, 2);
        hub.broadcast(1, 1, PeerChange::Removed { node_key: key(9) });
        assert_eq!(drain(&mut pending).len(), 1);
        assert!(hub.send_to(1, 2, Push::RotateKey));
        assert_eq!(pending.try_recv().unwrap(), Push::RotateKey);
        assert_eq!(hub.rotate_all(1), 2);
        let mut revoked = hub.revocations();
        hub.revoke_relay_access(key(2));
        assert_eq!(revoked.try_recv().unwrap(), key(2));
    }

    #[test]
    fn ephemeral_devices_expire_after_grace() {
        let hub = Hub::new(Duration::from_secs(20));
        let t0 = Instant::now();
        let s = hub.connect(1, 5, key(5), true, t0);
        hub.disconnect(1, 5, s.conn_id, true, t0);
        assert!(hub.sweep(t0 + Duration::from_secs(10)).is_empty());
        assert_eq!(
            hub.sweep(t0 + Duration::from_secs(21)),
            vec![Expired {
                network_id: 1,
                device_id: 5,
                node_key: key(5)
            }]
        );
        assert!(hub.sweep(t0 + Duration::from_secs(40)).is_empty());
    }

    #[test]
    fn ephemeral_devices_found_at_a_restart_get_their_grace_period() {
        let hub = Hub::new(Duration::from_secs(20));
        let t0 = Instant::now();
        // Device 5 reconnects in time, device 6 never does; device 7 is
        // connected when the restart's scan finds it.
        let live = hub.connect(1, 7, key(7), true, t0);
        for d in [5, 6, 7] {
            hub.depart_ephemeral(1, d, key(d as u8), t0);
        }
        let back = hub.connect(1, 5, key(5), true, t0 + Duration::from_secs(3));
        assert_eq!(
            hub.sweep(t0 + Duration::from_secs(21)),
            vec![Expired {
                network_id: 1,
                device_id: 6,
                node_key: key(6)
            }]
        );
        drop((live, back));
    }

    #[test]
    fn a_slow_stream_is_bounded_and_resynced() {
        let hub = Hub::with_queue(Duration::from_secs(20), 4);
        let t0 = Instant::now();
        let mut slow = hub.connect(1, 1, key(1), true, t0);
        for i in 0..1000u32 {
            hub.broadcast(
                1,
                99,
                PeerChange::Removed {
                    node_key: key((i % 200) as u8),
                },
            );
        }
        assert_eq!(
            slow.changes.len(),
            4,
            "the queue never grows past its bound"
        );
        assert_eq!(hub.lagged_total(), 1, "one resync however far behind");
        assert_eq!(
            slow.try_recv(),
            Some(Push::Refresh),
            "a stream that fell behind gets a full netmap first"
        );
        assert!(
            slow.try_recv().is_none(),
            "the stale changes are dropped, not replayed over the new netmap"
        );
        hub.broadcast(1, 99, PeerChange::Removed { node_key: key(7) });
        assert_eq!(
            drain(&mut slow),
            vec![PeerChange::Removed { node_key: key(7) }]
        );
    }

    #[test]
    fn close_goes_ahead_of_a_full_queue() {
        let hub = Hub::with_queue(Duration::from_secs(20), 2);
        let t0 = Instant::now();
        let mut sub = hub.connect(1, 1, key(1), true, t0);
        for _ in 0..2 {
            hub.broadcast(1, 99, PeerChange::Removed { node_key: key(2) });
        }
        let why = ApiErrorBody {
            code: "forbidden".into(),
            message: "removed".into(),
        };
        assert!(hub.send_to(1, 1, Push::Close(why.clone())));
        assert!(
            sub.try_recv_change().is_none(),
            "nothing goes before the close"
        );
        assert_eq!(sub.try_recv(), Some(Push::Close(why.clone())));
        assert_eq!(
            sub.try_recv(),
            Some(Push::Close(why.clone())),
            "the close stays until the stream ends"
        );
        // A close for an older connection of the device is ignored.
        let mut newer = hub.connect(1, 1, key(1), true, t0);
        hub.close(
            LiveSession {
                network_id: 1,
                device_id: 1,
                conn_id: sub.conn_id,
            },
            why.clone(),
        );
        assert!(newer.try_recv().is_none());
        assert_eq!(
            hub.sessions(),
            vec![LiveSession {
                network_id: 1,
                device_id: 1,
                conn_id: newer.conn_id
            }]
        );
    }

    #[tokio::test]
    async fn recv_wakes_for_signals_and_changes() {
        let hub = Arc::new(Hub::new(Duration::from_secs(20)));
        let mut sub = hub.connect(1, 1, key(1), true, Instant::now());
        let h = hub.clone();
        let waiter = tokio::spawn(async move { sub.recv().await });
        tokio::task::yield_now().await;
        assert_eq!(h.rotate_all(1), 1);
        assert_eq!(waiter.await.unwrap(), Some(Push::RotateKey));
    }
}
