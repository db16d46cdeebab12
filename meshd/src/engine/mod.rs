//! The data plane: TUN ↔ WireGuard sessions ↔ one UDP socket.
//!
//! Tasks: TUN→UDP (encrypt), UDP→TUN (decrypt), relays→TUN, a timer tick
//! that drives handshakes and keepalives, and a handshake task. Each task
//! owns its buffers; the packet path allocates nothing and takes only the
//! peer's own session lock.
//!
//! Handshake messages are the exception to "one loop per direction": the
//! UDP loop only checks their MACs and load ([`admission`]) and queues
//! them, boundedly, for the handshake task, which does the Diffie-Hellman;
//! a flood of initiations cannot stall decryption. Every task runs under
//! [`supervise`]: a panic is logged and counted and the task restarted.
//!
//! Lifetimes: the engine's tasks end with [`Engine::stop`]; the TUN device
//! and UDP socket close when the last `Arc<Engine>` goes, so nothing long
//! lived holds one ([`EngineSlot::stop`] lets go of both, and a pending
//! `meshd ping` holds only its answer channel).
#![deny(clippy::unchecked_time_subtraction)]

#[doc(hidden)]
pub mod admission;
mod datapath;
mod disco;
mod early;
pub mod filter;
pub mod offload;
mod peers;
mod relays;
#[cfg(test)]
mod sim;
mod stun;
mod supervise;
mod tun_device;
mod udp;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use boringtun::noise::rate_limiter::RateLimiter;
use platform::keys::{DiscoPrivate, NodePrivate, NodePublic};
use platform::netmap::NetMap;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

pub use disco::{PingPath, PingReply};
pub use peers::PeerTable;
use peers::{IndexAllocator, Path};
pub use tun_device::{TunConfig, DEFAULT_MTU};
pub use udp::UdpPort;

/// Room for the largest datagram plus WireGuard overhead.
const BUF_SIZE: usize = 65_535 + 64;
/// How often WireGuard timers are driven.
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Admitted handshake messages waiting for the handshake task; more are
/// dropped (and counted) until it catches up.
const HANDSHAKE_QUEUE: usize = 256;

/// Packet counters; drops are counted by reason.
#[derive(Default)]
pub struct Counters {
    pub tx_packets: AtomicU64,
    pub rx_packets: AtomicU64,
    pub drop_malformed: AtomicU64,
    pub drop_unknown_peer: AtomicU64,
    pub drop_bad_handshake: AtomicU64,
    pub drop_decrypt: AtomicU64,
    pub drop_source_not_allowed: AtomicU64,
    pub drop_no_route: AtomicU64,
    pub drop_no_endpoint: AtomicU64,
    pub drop_send_failed: AtomicU64,
    pub tx_relayed: AtomicU64,
    pub rx_relayed: AtomicU64,
    pub rx_disco: AtomicU64,
    pub cookie_replies: AtomicU64,
    pub drop_disco_replay: AtomicU64,
    pub drop_handshake_queue_full: AtomicU64,
    pub task_restarts: AtomicU64,
    pub drop_filter_no_rule: AtomicU64,
    pub drop_filter_not_for_us: AtomicU64,
    pub drop_filter_malformed: AtomicU64,
    pub filter_flows_full: AtomicU64,
    pub drop_tun_malformed: AtomicU64,
    pub tun_super_packets: AtomicU64,
    pub tun_coalesced: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterSnapshot {
    pub tx_packets: u64,
    pub rx_packets: u64,
    pub drop_malformed: u64,
    pub drop_unknown_peer: u64,
    pub drop_bad_handshake: u64,
    pub drop_decrypt: u64,
    pub drop_source_not_allowed: u64,
    pub drop_no_route: u64,
    pub drop_no_endpoint: u64,
    pub drop_send_failed: u64,
    pub tx_relayed: u64,
    pub rx_relayed: u64,
    pub rx_disco: u64,
    /// Handshakes answered with a cookie reply (over the handshake budget).
    #[serde(default)]
    pub cookie_replies: u64,
    /// Disco messages refused as replays.
    #[serde(default)]
    pub drop_disco_replay: u64,
    /// Handshakes dropped because the handshake task was behind.
    #[serde(default)]
    pub drop_handshake_queue_full: u64,
    /// Engine tasks restarted after a panic.
    #[serde(default)]
    pub task_restarts: u64,
    /// Packets from peers that no rule of the access policy allows (and
    /// that answer no flow this device started).
    #[serde(default)]
    pub drop_filter_no_rule: u64,
    /// Packets from peers addressed to an address that is not this device's.
    #[serde(default)]
    pub drop_filter_not_for_us: u64,
    /// Decrypted packets too short or inconsistent to classify.
    #[serde(default)]
    pub drop_filter_malformed: u64,
    /// Flows this device started that the flow table had no room for.
    #[serde(default)]
    pub filter_flows_full: u64,
    /// Packets from the TUN device whose offload header did not fit them.
    #[serde(default)]
    pub drop_tun_malformed: u64,
    /// Super-packets from the TUN device split into segments (TSO/USO).
    #[serde(default)]
    pub tun_super_packets: u64,
    /// Writes to the TUN device that coalesced several received TCP
    /// segments (GRO).
    #[serde(default)]
    pub tun_coalesced: u64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub fn snapshot(&self) -> CounterSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            tx_packets: l(&self.tx_packets),
            rx_packets: l(&self.rx_packets),
            drop_malformed: l(&self.drop_malformed),
            drop_unknown_peer: l(&self.drop_unknown_peer),
            drop_bad_handshake: l(&self.drop_bad_handshake),
            drop_decrypt: l(&self.drop_decrypt),
            drop_source_not_allowed: l(&self.drop_source_not_allowed),
            drop_no_route: l(&self.drop_no_route),
            drop_no_endpoint: l(&self.drop_no_endpoint),
            drop_send_failed: l(&self.drop_send_failed),
            tx_relayed: l(&self.tx_relayed),
            rx_relayed: l(&self.rx_relayed),
            rx_disco: l(&self.rx_disco),
            cookie_replies: l(&self.cookie_replies),
            drop_disco_replay: l(&self.drop_disco_replay),
            drop_handshake_queue_full: l(&self.drop_handshake_queue_full),
            task_restarts: l(&self.task_restarts),
            drop_filter_no_rule: l(&self.drop_filter_no_rule),
            drop_filter_not_for_us: l(&self.drop_filter_not_for_us),
            drop_filter_malformed: l(&self.drop_filter_malformed),
            filter_flows_full: l(&self.filter_flows_full),
            drop_tun_malformed: l(&self.drop_tun_malformed),
            tun_super_packets: l(&self.tun_super_packets),
            tun_coalesced: l(&self.tun_coalesced),
        }
    }
}

/// What the engine knows about one peer's session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStats {
    /// Direct endpoint in use (or being tried).
    pub endpoint: Option<SocketAddr>,
    /// The direct endpoint has answered.
    pub direct: bool,
    /// Relay region carrying the traffic, when not direct.
    pub relay: Option<u32>,
    pub last_handshake_secs_ago: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Round-trip time of the direct path, from disco pings.
    #[serde(default)]
    pub rtt_us: Option<u64>,
}

/// A `meshd ping` waiting for its answer.
pub struct PendingPing(tokio::sync::oneshot::Receiver<PingReply>);

impl PendingPing {
    /// The first answer within `timeout`; `None` if there was none, or the
    /// engine stopped meanwhile.
    pub async fn wait(self, timeout: Duration) -> Option<PingReply> {
        tokio::time::timeout(timeout, self.0).await.ok()?.ok()
    }
}

/// This device's node key in the forms the packet path needs; replaced
/// whole when the key rotates.
struct Identity {
    private: NodePrivate,
    node: NodePublic,
    public: boringtun::x25519::PublicKey,
    secret: boringtun::x25519::StaticSecret,
    /// Checks handshake MACs (keyed by `public`) and counts handshakes
    /// against [`admission::HANDSHAKES_PER_SEC`].
    limiter: Arc<RateLimiter>,
}

impl Identity {
    fn new(private: NodePrivate) -> Self {
        let secret = private.to_dalek();
        let public = boringtun::x25519::PublicKey::from(&secret);
        Identity {
            node: private.public(),
            limiter: Arc::new(RateLimiter::new(&public, admission::HANDSHAKES_PER_SEC)),
            public,
            secret,
            private,
        }
    }
}

struct Shared {
    identity: ArcSwap<Identity>,
    peers: ArcSwap<PeerTable>,
    /// Serialises peer-table rebuilds with node-key changes, so no session
    /// is built with a key that was just replaced.
    rebuilding: std::sync::Mutex<()>,
    indices: IndexAllocator,
    udp: Arc<UdpPort>,
    tun: ::tun::AsyncDevice,
    /// What the TUN device offloads; packets carry a virtio-net header
    /// when `offloads.vnet_hdr`.
    offloads: offload::Offloads,
    counters: Counters,
    relays: relays::Relays,
    stun: stun::StunProbe,
    disco: disco::Disco,
    /// Admitted handshake messages for the handshake task.
    handshakes: tokio::sync::mpsc::Sender<datapath::PendingHandshake>,
    /// Initiations from keys not (yet) in the netmap.
    early: std::sync::Mutex<early::EarlyInitiations>,
    /// What peers may send this device.
    filter: filter::Filter,
}

impl Shared {
    fn install_netmap(&self, netmap: &NetMap, now_unix: u64) {
        self.relays.set_map(&netmap.relay_map);
        self.filter
            .set_rules(&netmap.packet_filter, &netmap.self_node.addresses);
        let _one = self.rebuilding.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.peers.load();
        let identity = self.identity.load();
        let table = PeerTable::build(&old, netmap, &identity.private, &self.indices, now_unix);
        tracing::debug!(peers = table.by_key.len(), "peer table updated");
        let due = self
            .early
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take_known(|k| table.by_key.contains_key(k), Instant::now());
        self.peers.store(Arc::new(table));
        // Answered now that their senders are peers, through the normal
        // handshake path (checked again there).
        for kept in due {
            tracing::debug!(via = ?kept.via, "answering an initiation that came before its sender's announcement");
            self.queue_handshake(&kept.datagram, kept.via);
        }
    }

    /// Hands an admitted handshake message to the handshake task, or
    /// counts it dropped when the task is behind.
    fn queue_handshake(&self, datagram: &[u8], via: disco::Via) {
        match self.handshakes.try_reserve() {
            // Copied only once there is room for it.
            Ok(slot) => slot.send(datapath::PendingHandshake {
                datagram: datagram.to_vec(),
                via,
            }),
            Err(_) => bump(&self.counters.drop_handshake_queue_full),
        }
    }

    /// Keeps an initiation from `sender`, not a peer yet, for a moment.
    fn remember_early(&self, sender: NodePublic, datagram: &[u8], via: disco::Via) {
        self.early
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remember(sender, datagram, via, Instant::now());
    }
}

pub struct Engine {
    shared: Arc<Shared>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    tun_name: String,
    /// The host owns the TUN device and its configuration.
    host_managed: bool,
    addresses: Vec<IpAddr>,
}

impl Engine {
    /// Creates the TUN device with the netmap's addresses and routes,
    /// installs its peers (those whose key is still good at `now_unix`) and
    /// only then starts the packet tasks on `udp`, so that datagrams which
    /// arrived before the engine (a peer's first handshake, sent as soon as
    /// the coordinator announced this device) wait in the socket and are
    /// answered, not dropped as coming from strangers.
    pub async fn start(
        private: NodePrivate,
        disco_private: DiscoPrivate,
        tun: &TunConfig,
        netmap: &NetMap,
        now_unix: u64,
        udp: Arc<UdpPort>,
    ) -> anyhow::Result<Engine> {
        let addresses = &netmap.self_node.addresses;
        let (device, offloads) = tun_device::create(tun, addresses, &netmap.routes).await?;
        let identity = Identity::new(private);
        // Random, so that a restarted engine does not reuse the indices its
        // previous instance handed out.
        let start_index = rand_core::RngCore::next_u32(&mut rand_core::OsRng);
        let (relay_tx, relay_rx) = tokio::sync::mpsc::channel(relays::EVENT_QUEUE);
        let (handshake_tx, handshake_rx) = tokio::sync::mpsc::channel(HANDSHAKE_QUEUE);
        let shared = Arc::new(Shared {
            relays: relays::Relays::new(identity.secret.clone(), relay_tx),
            stun: stun::StunProbe::default(),
            disco: disco::Disco::new(disco_private),
            identity: ArcSwap::from_pointee(identity),
            peers: ArcSwap::from_pointee(PeerTable::default()),
            rebuilding: std::sync::Mutex::new(()),
            indices: IndexAllocator::new(start_index),
            udp,
            tun: device,
            offloads,
            counters: Counters::default(),
            handshakes: handshake_tx,
            early: std::sync::Mutex::default(),
            filter: filter::Filter::default(),
        });
        shared.install_netmap(netmap, now_unix);
        // Receivers outlive a panicking task: its restart takes them over.
        let handshake_rx = Arc::new(tokio::sync::Mutex::new(handshake_rx));
        let relay_rx = Arc::new(tokio::sync::Mutex::new(relay_rx));
        let restarts = {
            let shared = shared.clone();
            move || bump(&shared.counters.task_restarts)
        };
        let s = &shared;
        let tasks = vec![
            supervise::spawn("tun→peers", restarts.clone(), {
                let s = s.clone();
                move || datapath::tun_to_peers(s.clone())
            }),
            supervise::spawn("udp→tun", restarts.clone(), {
                let s = s.clone();
                move || datapath::udp_to_tun(s.clone())
            }),
            supervise::spawn("handshakes", restarts.clone(), {
                let s = s.clone();
                move || datapath::handshakes(s.clone(), handshake_rx.clone())
            }),
            supervise::spawn("relays→tun", restarts.clone(), {
                let s = s.clone();
                move || datapath::relay_to_tun(s.clone(), relay_rx.clone())
            }),
            supervise::spawn("timers", restarts, {
                let s = s.clone();
                move || datapath::timers(s.clone())
            }),
        ];
        tracing::info!(tun = %tun.name, port = shared.udp.port(), "engine started");
        Ok(Engine {
            shared,
            tasks: std::sync::Mutex::new(tasks),
            tun_name: tun.name.clone(),
            host_managed: tun.host_managed(),
            addresses: addresses.clone(),
        })
    }

    /// Stops the packet tasks and waits until they are gone, so that the
    /// TUN device closes when the engine is dropped.
    pub async fn stop(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    pub fn addresses(&self) -> &[IpAddr] {
        &self.addresses
    }

    /// Adds, changes and removes peers to match `netmap`, live; peers
    /// whose key has expired at `now_unix` are left out.
    pub fn set_netmap(&self, netmap: &NetMap, now_unix: u64) {
        self.shared.install_netmap(netmap, now_unix);
    }

    /// Switches to a new node key (rotation) with as little loss as
    /// possible: each peer's session keeps its index and state and only
    /// swaps the static key (its current keys end: WireGuard binds them to
    /// both ends' static keys), peers talked to recently get fresh
    /// handshakes at once and quickly retried while they learn the new key
    /// from the coordinator, and relay links reconnect under the new key.
    pub fn set_node_key(&self, key: &NodePrivate) {
        let _one = self
            .shared
            .rebuilding
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if self.shared.identity.load().node == key.public() {
            return;
        }
        let identity = Identity::new(key.clone());
        let (secret, public) = (identity.secret.clone(), identity.public);
        self.shared.identity.store(Arc::new(identity));
        let now = Instant::now();
        for peer in self.shared.peers.load().by_key.values() {
            peer.lock().set_static_key(secret.clone(), public, now);
        }
        self.shared.relays.set_node(secret);
        tracing::info!(node = %key.public().short(), "engine switched to the new node key");
    }

    pub fn udp_port(&self) -> u16 {
        self.shared.udp.port()
    }

    /// Adds local service addresses (MagicDNS) to the TUN device; they go
    /// with it.
    pub async fn add_service_addresses(&self, addresses: &[IpAddr]) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.host_managed,
            "the host configures this TUN device: it must add {addresses:?} itself"
        );
        tun_device::add_addresses(&self.tun_name, addresses).await
    }

    /// Whether the host owns the TUN device (a descriptor it handed in).
    pub fn host_managed(&self) -> bool {
        self.host_managed
    }

    pub fn tun_name(&self) -> &str {
        &self.tun_name
    }

    /// Listens on `region`'s relay from now on.
    pub fn set_home_region(&self, region: u32) {
        self.shared.relays.set_home(region);
    }

    pub fn home_region(&self) -> Option<u32> {
        self.shared.relays.home()
    }

    pub fn relay_up(&self, region: u32) -> bool {
        self.shared.relays.is_up(region)
    }

    /// Asks `servers` what address this engine's socket has from outside.
    pub async fn probe_stun(&self, servers: &[SocketAddr]) -> Vec<derp_proto::stun::TransactionId> {
        let mut txs = Vec::with_capacity(servers.len());
        for server in servers {
            let (tx, req) = self.shared.stun.request(Instant::now());
            if let Err(e) = self.shared.udp.send_to(&req, *server).await {
                tracing::debug!(error = %e, %server, "STUN request");
            }
            txs.push(tx);
        }
        txs
    }

    /// Asks each STUN server in turn and waits up to `wait` for the answers:
    /// what each saw as this socket's address.
    pub async fn stun_report(
        &self,
        servers: &[SocketAddr],
        wait: std::time::Duration,
    ) -> Vec<(SocketAddr, Option<SocketAddr>)> {
        let txs = self.probe_stun(servers).await;
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline && txs.iter().any(|t| self.shared.stun.answer(t).is_none())
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        servers
            .iter()
            .zip(&txs)
            .map(|(s, t)| (*s, self.shared.stun.answer(t)))
            .collect()
    }

    /// This device's direct endpoints, offered to peers in call-me-maybe.
    pub fn set_own_endpoints(&self, endpoints: Vec<SocketAddr>) {
        self.shared.disco.own_endpoints.store(Arc::new(endpoints));
    }

    /// Sends a disco ping to `key` on every path it may take (the direct
    /// path if there is one, else every candidate and the relay). The
    /// answer is awaited on the returned [`PendingPing`], which does not
    /// keep the engine alive: a ping outstanding when the engine stops
    /// ends at once without an answer.
    pub async fn ping(&self, key: &NodePublic) -> anyhow::Result<PendingPing> {
        let table = self.shared.peers.load_full();
        let peer = table
            .by_key
            .get(key)
            .ok_or_else(|| anyhow::anyhow!("no such peer"))?;
        anyhow::ensure!(
            peer.disco_key.is_some(),
            "peer does not run meshd (stock WireGuard): it cannot answer pings"
        );
        let now = Instant::now();
        let tx = platform::disco::new_tx_id();
        let reply = self.shared.disco.expect(tx, now);
        let (direct, candidates, home) = {
            let st = peer.lock();
            (
                st.paths.direct(now),
                st.paths.candidates(),
                st.paths.home_region(),
            )
        };
        let msg = platform::disco::Message::Ping {
            tx,
            node_key: self.shared.identity.load().node,
        };
        match direct {
            Some(ep) => disco::send(&self.shared, peer, &msg, disco::Via::Udp(ep)).await,
            None => {
                for c in candidates {
                    disco::send(&self.shared, peer, &msg, disco::Via::Udp(c)).await;
                }
                if let Some(region) = home {
                    disco::send(&self.shared, peer, &msg, disco::Via::Relay(region)).await;
                }
            }
        }
        // Traffic to ping counts as use: discovery runs meanwhile.
        peer.lock().paths.note_activity(now);
        Ok(PendingPing(reply))
    }

    /// What the TUN device offloads.
    pub fn offloads(&self) -> offload::Offloads {
        self.shared.offloads
    }

    /// The last address STUN reported for this engine's socket.
    pub fn public_endpoint(&self) -> Option<SocketAddr> {
        self.shared.stun.seen()
    }

    pub fn counters(&self) -> CounterSnapshot {
        self.shared.counters.snapshot()
    }

    pub fn peer_stats(&self, key: &NodePublic) -> Option<PeerStats> {
        let table = self.shared.peers.load();
        let peer = table.by_key.get(key)?;
        let st = peer.lock();
        let (since, tx, rx, _, _) = st.tunn.stats();
        let now = Instant::now();
        let rtt_us = st
            .paths
            .rtt(now)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let (endpoint, direct, relay) = match st.paths.path(now) {
            Path::Direct(ep) => (Some(ep), true, None),
            Path::Trying(ep) => (Some(ep), false, None),
            Path::Relay(region) => (None, false, Some(region)),
            Path::None => (None, false, None),
        };
        Some(PeerStats {
            endpoint,
            direct,
            relay,
            last_handshake_secs_ago: since.map(|d| d.as_secs()),
            rx_bytes: rx as u64,
            tx_bytes: tx as u64,
            rtt_us,
        })
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        for t in self
            .tasks
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            t.abort();
        }
    }
}

/// The engine of a joined device, started once the first netmap says which
/// addresses it has (and restarted if they ever change).
pub struct EngineSlot {
    /// The node key an engine starts with (the latest, after rotations).
    private: std::sync::Mutex<NodePrivate>,
    disco: DiscoPrivate,
    tun: TunConfig,
    /// Bound before the device registers and kept across engine restarts;
    /// let go by [`EngineSlot::stop`].
    udp: std::sync::Mutex<Option<Arc<UdpPort>>>,
    engine: std::sync::Mutex<Option<Arc<Engine>>>,
}

impl EngineSlot {
    pub fn new(
        private: NodePrivate,
        disco: DiscoPrivate,
        tun: TunConfig,
        udp: Arc<UdpPort>,
    ) -> Self {
        EngineSlot {
            private: std::sync::Mutex::new(private),
            disco,
            tun,
            udp: std::sync::Mutex::new(Some(udp)),
            engine: std::sync::Mutex::new(None),
        }
    }

    pub fn get(&self) -> Option<Arc<Engine>> {
        self.engine
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Uses `key` from now on: in the running engine at once, and in any
    /// engine started later.
    pub fn set_node_key(&self, key: &NodePrivate) {
        *self.private.lock().unwrap_or_else(|p| p.into_inner()) = key.clone();
        if let Some(e) = self.get() {
            e.set_node_key(key);
        }
    }

    /// Starts the engine for `netmap` if needed and hands it the peers
    /// (those whose key is still good at `now_unix`): a new engine gets
    /// them before it reads its first packet.
    pub async fn apply(&self, netmap: &NetMap, now_unix: u64) -> anyhow::Result<Arc<Engine>> {
        let current = self.get();
        let engine = match current {
            Some(e) if e.addresses() == netmap.self_node.addresses.as_slice() => e,
            other => {
                if let Some(old) = other {
                    tracing::info!("overlay addresses changed; restarting the engine");
                    old.stop().await;
                    *self.engine.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    drop(old);
                }
                let private = self
                    .private
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                let udp = self
                    .udp
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("the engine was stopped"))?;
                let e = Arc::new(
                    Engine::start(
                        private,
                        self.disco.clone(),
                        &self.tun,
                        netmap,
                        now_unix,
                        udp,
                    )
                    .await?,
                );
                *self.engine.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
                return Ok(e);
            }
        };
        engine.set_netmap(netmap, now_unix);
        Ok(engine)
    }

    /// Stops the engine for good: its tasks end, and the TUN device and
    /// UDP port close unless something still holds the engine itself (the
    /// slot may live on in views of the ended session; it holds neither).
    pub async fn stop(&self) {
        self.udp.lock().unwrap_or_else(|p| p.into_inner()).take();
        let engine = self.engine.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(e) = engine {
            e.stop().await;
            let others = Arc::strong_count(&e) - 1;
            if others > 0 {
                tracing::warn!(holders = others, "stopped engine still referenced; its port and TUN device stay open until they let go");
                return;
            }
            drop(e);
            // The device goes with the last descriptor, a moment later:
            // what follows (`meshd down` returning, the next `up`) must not
            // see it.
            if !self.tun.host_managed()
                && !tun_device::wait_gone(&self.tun.name, Duration::from_secs(3)).await
            {
                tracing::warn!(tun = %self.tun.name, "TUN device still present 3 s after the engine stopped");
            }
        }
    }
}
