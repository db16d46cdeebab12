//! The data plane: TUN ↔ WireGuard sessions ↔ one UDP socket.
//!
//! Three tasks share the engine: TUN→UDP (encrypt), UDP→TUN (decrypt) and a
//! timer tick that drives handshakes and keepalives. Each task owns its
//! buffers; the packet path allocates nothing and takes only the peer's own
//! session lock. The relay path will sit beside the UDP socket as another
//! way out of `send_to_peer`.

mod peers;
mod tun_device;
mod udp;

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use platform::keys::{NodePrivate, NodePublic};
use platform::netmap::NetMap;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

pub use peers::PeerTable;
use peers::{IndexAllocator, Peer};
pub use tun_device::{TunConfig, DEFAULT_MTU};

/// Room for the largest datagram plus WireGuard overhead.
const BUF_SIZE: usize = 65_535 + 64;
/// How often WireGuard timers are driven.
const TIMER_TICK: Duration = Duration::from_millis(250);

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
        }
    }
}

/// What the engine knows about one peer's session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStats {
    pub endpoint: Option<SocketAddr>,
    pub last_handshake_secs_ago: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

struct Shared {
    private: NodePrivate,
    public: boringtun::x25519::PublicKey,
    secret: boringtun::x25519::StaticSecret,
    peers: ArcSwap<PeerTable>,
    indices: IndexAllocator,
    udp: udp::UdpPort,
    tun: ::tun::AsyncDevice,
    counters: Counters,
}

pub struct Engine {
    shared: Arc<Shared>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    tun_name: String,
    addresses: Vec<IpAddr>,
}

/// Where a result landed in the output buffer (boringtun hands back a slice of it).
fn range_in(base: usize, part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - base;
    start..start + part.len()
}

impl Engine {
    /// Creates the TUN device with `addresses`, binds the UDP socket and
    /// starts the packet tasks. Peers come from [`Engine::set_netmap`].
    /// Must run inside a tokio runtime.
    pub fn start(
        private: NodePrivate,
        tun: &TunConfig,
        addresses: &[IpAddr],
        routes: &[platform::addr::IpPrefix],
        udp_port: u16,
    ) -> anyhow::Result<Engine> {
        let device = tun_device::create(tun, addresses, routes)?;
        let udp = udp::UdpPort::bind(udp_port)?;
        let secret = private.to_dalek();
        let public = boringtun::x25519::PublicKey::from(&secret);
        // Random, so that a restarted engine does not reuse the indices its
        // previous instance handed out.
        let start_index = rand_core::RngCore::next_u32(&mut rand_core::OsRng);
        let shared = Arc::new(Shared {
            private,
            public,
            secret,
            peers: ArcSwap::from_pointee(PeerTable::default()),
            indices: IndexAllocator::new(start_index),
            udp,
            tun: device,
            counters: Counters::default(),
        });
        let tasks = vec![
            tokio::spawn(tun_to_udp(shared.clone())),
            tokio::spawn(udp_to_tun(shared.clone())),
            tokio::spawn(timers(shared.clone())),
        ];
        tracing::info!(tun = %tun.name, port = shared.udp.port(), "engine started");
        Ok(Engine {
            shared,
            tasks: std::sync::Mutex::new(tasks),
            tun_name: tun.name.clone(),
            addresses: addresses.to_vec(),
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

    /// Adds, changes and removes peers to match `netmap`, live.
    pub fn set_netmap(&self, netmap: &NetMap) {
        let old = self.shared.peers.load();
        let table = PeerTable::build(&old, netmap, &self.shared.private, &self.shared.indices);
        tracing::debug!(peers = table.by_key.len(), "peer table updated");
        self.shared.peers.store(Arc::new(table));
    }

    pub fn udp_port(&self) -> u16 {
        self.shared.udp.port()
    }

    pub fn tun_name(&self) -> &str {
        &self.tun_name
    }

    pub fn counters(&self) -> CounterSnapshot {
        self.shared.counters.snapshot()
    }

    pub fn peer_stats(&self, key: &NodePublic) -> Option<PeerStats> {
        let table = self.shared.peers.load();
        let peer = table.by_key.get(key)?;
        let st = peer.lock();
        let (since, tx, rx, _, _) = st.tunn.stats();
        Some(PeerStats {
            endpoint: st.endpoint_in_use(),
            last_handshake_secs_ago: since.map(|d| d.as_secs()),
            rx_bytes: rx as u64,
            tx_bytes: tx as u64,
        })
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        for t in self.tasks.get_mut().unwrap_or_else(|p| p.into_inner()).iter() {
            t.abort();
        }
    }
}

/// Encrypts packets read from the TUN device and sends them to their peer.
async fn tun_to_udp(shared: Arc<Shared>) {
    let mut inbuf = vec![0u8; BUF_SIZE];
    let mut outbuf = vec![0u8; BUF_SIZE];
    let out_base = outbuf.as_ptr() as usize;
    loop {
        let n = match shared.tun.recv(&mut inbuf).await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "reading TUN device; engine stops");
                return;
            }
        };
        let packet = &inbuf[..n];
        let Some(dst) = Tunn::dst_address(packet) else {
            bump(&shared.counters.drop_malformed);
            continue;
        };
        let table = shared.peers.load();
        let Some(peer) = table.by_ip.get(&dst) else {
            bump(&shared.counters.drop_no_route);
            continue;
        };
        let (range, target) = {
            let mut st = peer.lock();
            match st.tunn.encapsulate(packet, &mut outbuf) {
                TunnResult::WriteToNetwork(out) => {
                    let range = range_in(out_base, out);
                    (range.clone(), st.target_for(&outbuf[range]))
                }
                TunnResult::Err(e) => {
                    tracing::trace!(error = ?e, "encapsulate");
                    continue;
                }
                // Queued until the handshake completes.
                _ => continue,
            }
        };
        send_to_peer(&shared, &outbuf[range], target).await;
        bump(&shared.counters.tx_packets);
    }
}

async fn send_to_peer(shared: &Shared, datagram: &[u8], target: Option<SocketAddr>) {
    let Some(target) = target else {
        bump(&shared.counters.drop_no_endpoint);
        return;
    };
    if let Err(e) = shared.udp.send_to(datagram, target).await {
        tracing::trace!(error = %e, %target, "send");
        bump(&shared.counters.drop_send_failed);
    }
}

/// Finds the peer a datagram is for, or counts why there is none.
fn peer_for(shared: &Shared, table: &PeerTable, datagram: &[u8]) -> Option<Arc<Peer>> {
    classify(&shared.secret, &shared.public, &shared.counters, table, datagram)
}

fn classify(
    secret: &boringtun::x25519::StaticSecret,
    public: &boringtun::x25519::PublicKey,
    counters: &Counters,
    table: &PeerTable,
    datagram: &[u8],
) -> Option<Arc<Peer>> {
    let index = match Tunn::parse_incoming_packet(datagram) {
        Err(_) => {
            bump(&counters.drop_malformed);
            return None;
        }
        Ok(Packet::HandshakeInit(init)) => {
            let Ok(half) = parse_handshake_anon(secret, public, &init) else {
                bump(&counters.drop_bad_handshake);
                return None;
            };
            let key = NodePublic::from_bytes(half.peer_static_public);
            let found = table.by_key.get(&key).cloned();
            if found.is_none() {
                bump(&counters.drop_unknown_peer);
            }
            return found;
        }
        Ok(Packet::HandshakeResponse(p)) => p.receiver_idx,
        Ok(Packet::PacketCookieReply(p)) => p.receiver_idx,
        Ok(Packet::PacketData(p)) => p.receiver_idx,
    };
    let found = table.by_index.get(&(index >> 8)).cloned();
    if found.is_none() {
        bump(&counters.drop_unknown_peer);
    }
    found
}

enum Decapsulated {
    Network(Range<usize>),
    Tunnel(Range<usize>, IpAddr),
    Done,
}

/// Decrypts datagrams from peers and writes their packets to the TUN device.
async fn udp_to_tun(shared: Arc<Shared>) {
    let mut inbuf = vec![0u8; BUF_SIZE];
    let mut outbuf = vec![0u8; BUF_SIZE];
    let out_base = outbuf.as_ptr() as usize;
    loop {
        let (n, from) = match shared.udp.recv_from(&mut inbuf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "UDP receive");
                continue;
            }
        };
        let table = shared.peers.load();
        let Some(peer) = peer_for(&shared, &table, &inbuf[..n]) else { continue };
        let mut datagram = &inbuf[..n];
        // The first call decrypts; repeated calls with an empty datagram
        // flush packets queued while the handshake was in flight.
        loop {
            let outcome = {
                let mut st = peer.lock();
                let outcome = match st.tunn.decapsulate(Some(from.ip()), datagram, &mut outbuf) {
                    TunnResult::Done => Decapsulated::Done,
                    TunnResult::WriteToNetwork(out) => Decapsulated::Network(range_in(out_base, out)),
                    TunnResult::WriteToTunnelV4(out, src) => Decapsulated::Tunnel(range_in(out_base, out), src.into()),
                    TunnResult::WriteToTunnelV6(out, src) => Decapsulated::Tunnel(range_in(out_base, out), src.into()),
                    TunnResult::Err(e) => {
                        count_decap_error(&shared.counters, &e);
                        Decapsulated::Done
                    }
                };
                if !datagram.is_empty() && !matches!(outcome, Decapsulated::Done) {
                    st.heard_from(from, Instant::now());
                }
                outcome
            };
            match outcome {
                Decapsulated::Done => break,
                Decapsulated::Network(range) => {
                    send_to_peer(&shared, &outbuf[range], Some(from)).await;
                    datagram = &[];
                }
                Decapsulated::Tunnel(range, src) => {
                    if range.is_empty() {
                        break; // keepalive
                    }
                    if !peer.allowed.contains(&src) {
                        bump(&shared.counters.drop_source_not_allowed);
                        break;
                    }
                    if let Err(e) = shared.tun.send(&outbuf[range]).await {
                        tracing::debug!(error = %e, "TUN write");
                    }
                    bump(&shared.counters.rx_packets);
                    break;
                }
            }
        }
    }
}

fn count_decap_error(c: &Counters, e: &WireGuardError) {
    match e {
        WireGuardError::InvalidMac | WireGuardError::WrongKey | WireGuardError::InvalidTai64nTimestamp
        | WireGuardError::WrongTai64nTimestamp => bump(&c.drop_bad_handshake),
        WireGuardError::InvalidPacket | WireGuardError::IncorrectPacketLength | WireGuardError::WrongPacketType => {
            bump(&c.drop_malformed)
        }
        _ => bump(&c.drop_decrypt),
    }
    tracing::trace!(error = ?e, "decapsulate");
}

/// Drives handshake retries, rekeys and keepalives for every peer.
async fn timers(shared: Arc<Shared>) {
    let mut buf = vec![0u8; BUF_SIZE];
    let base = buf.as_ptr() as usize;
    let mut tick = tokio::time::interval(TIMER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let table = shared.peers.load_full();
        let now = Instant::now();
        for peer in table.by_key.values() {
            let (range, target) = {
                let mut st = peer.lock();
                st.expire_endpoint(now);
                match st.tunn.update_timers(&mut buf) {
                    TunnResult::WriteToNetwork(out) => {
                        let range = range_in(base, out);
                        (range.clone(), st.target_for(&buf[range]))
                    }
                    _ => continue,
                }
            };
            send_to_peer(&shared, &buf[range], target).await;
        }
    }
}

/// The engine of a joined device, started once the first netmap says which
/// addresses it has (and restarted if they ever change).
pub struct EngineSlot {
    private: NodePrivate,
    tun: TunConfig,
    udp_port: u16,
    engine: std::sync::Mutex<Option<Arc<Engine>>>,
}

impl EngineSlot {
    pub fn new(private: NodePrivate, tun: TunConfig, udp_port: u16) -> Self {
        EngineSlot { private, tun, udp_port, engine: std::sync::Mutex::new(None) }
    }

    pub fn get(&self) -> Option<Arc<Engine>> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Starts the engine for `netmap` if needed and hands it the peers.
    pub async fn apply(&self, netmap: &NetMap) -> anyhow::Result<Arc<Engine>> {
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
                let e = Arc::new(Engine::start(
                    self.private.clone(),
                    &self.tun,
                    &netmap.self_node.addresses,
                    &netmap.routes,
                    self.udp_port,
                )?);
                *self.engine.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
                e
            }
        };
        engine.set_netmap(netmap);
        Ok(engine)
    }

    /// Stops the engine; the TUN device goes away with it.
    pub async fn stop(&self) {
        let engine = self.engine.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(e) = engine {
            e.stop().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peers::tests::{netmap, node};

    /// A handshake initiation from `from` to `to`.
    fn handshake(from: &NodePrivate, to: NodePublic) -> Vec<u8> {
        let mut t = Tunn::new(from.to_dalek(), to.to_dalek(), None, None, 1, None);
        let mut buf = vec![0u8; 256];
        match t.format_handshake_initiation(&mut buf, false) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => panic!("no handshake"),
        }
    }

    #[test]
    fn receive_path_sorts_datagrams_and_counts_drops() {
        let me = NodePrivate::generate();
        let known = NodePrivate::generate();
        let stranger = NodePrivate::generate();
        let table = PeerTable::build(&PeerTable::default(), &netmap(&me, vec![node(known.public(), 2, &[])]), &me, &IndexAllocator::new(5));
        let (secret, public) = (me.to_dalek(), me.public().to_dalek());
        let c = Counters::default();

        let found = classify(&secret, &public, &c, &table, &handshake(&known, me.public()));
        assert!(found.is_some(), "handshake from a known peer finds it");

        assert!(classify(&secret, &public, &c, &table, &handshake(&stranger, me.public())).is_none());
        assert_eq!(c.snapshot().drop_unknown_peer, 1);

        // Meant for someone else: does not decrypt with our key.
        let other = NodePrivate::generate().public();
        assert!(classify(&secret, &public, &c, &table, &handshake(&known, other)).is_none());
        assert_eq!(c.snapshot().drop_bad_handshake, 1);

        for garbage in [&b""[..], b"x", b"garbage that is no wireguard", &[4u8, 0, 0, 0, 1, 2]] {
            assert!(classify(&secret, &public, &c, &table, garbage).is_none());
        }
        assert_eq!(c.snapshot().drop_malformed, 4);

        // A well-formed data packet for an index nobody holds.
        let mut data = vec![4u8, 0, 0, 0];
        data.extend_from_slice(&0xdead_beef_u32.to_le_bytes());
        data.extend_from_slice(&[0u8; 8 + 16]);
        assert!(classify(&secret, &public, &c, &table, &data).is_none());
        assert_eq!(c.snapshot().drop_unknown_peer, 2);
    }
}
