//! The relay server: authenticated clients, each with byte-bounded bulk and
//! path-discovery queues, forwarding by destination node key within the
//! sender's network.
//!
//! A slow reader only fills its own queues (later packets for it are dropped
//! and counted); nobody else waits on it. A client whose node key the
//! coordinator revokes is evicted at once (see [`revocations`]).
//!
//! Bounded under abuse: TCP connections and connections still proving a key
//! are capped ([`ConnLimits`]), a connection that has not proved a key may
//! only send a frame the size of the proof, the whole handshake has a
//! deadline, and an established connection that sends nothing for
//! [`ConnLimits::idle_timeout`] (keepalives flow every
//! [`ConnLimits::keepalive`]) or stops reading for
//! [`ConnLimits::write_timeout`] is closed.
//!
//! Concurrency: the client table, the mesh-peer tables and the admission
//! cache are behind std `Mutex`es, held only for lookups and inserts, never
//! across an await; each connection's writer is its own task, fed through
//! bounded queues ([`outbox`]).

pub mod admission;
pub mod http;
pub mod mesh;
pub mod metrics;
pub mod outbox;
pub mod ratelimit;
pub mod revocations;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use platform::keys::NodePublic;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::{Notify, Semaphore};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::io::{write_frame, FrameReader, ReadError};
use crate::proto::frame::{
    Frame, FrameError, FrameRef, GoneReason, Key, NetworkTag, HEADER_LEN, MAX_FRAME_PAYLOAD,
};
use crate::proto::handshake;
use admission::{Admission, Verdict};
use metrics::{Drop, Metrics};
use outbox::{outbox, Lane, Outbox, WriterTimes};
use ratelimit::TokenBucket;

/// How long an evicted client's writer gets to deliver the closing frame.
const EVICT_FLUSH: Duration = Duration::from_secs(1);
/// Largest frame a connection may send before it has proved its key: the
/// key proof itself.
const HANDSHAKE_FRAME_LIMIT: usize = 44 + handshake::MAX_SEALED;

/// Bounds on connections and on what each may hold, and its deadlines.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// TCP connections at once (clients, mesh peers, and those still in
    /// HTTP or proving a key); more are closed at accept.
    pub max_connections: usize,
    /// Connections that have not yet proved a key; more get a 503.
    pub max_handshakes: usize,
    /// Bytes queued for one client before its packets are dropped.
    pub queue_bytes: usize,
    /// Time to send the HTTP request and prove a key (admission included).
    pub handshake_timeout: Duration,
    /// A keepalive goes to every connection idle this long.
    pub keepalive: Duration,
    /// A connection that sends nothing (not even a keepalive) for this long
    /// is closed: a half-open link is found within it.
    pub idle_timeout: Duration,
    /// A write that stalls this long closes the connection.
    pub write_timeout: Duration,
}

impl Default for ConnLimits {
    /// 20,000 connections, 1,000 of them in their handshake; 512 KiB queued
    /// per client; 10 s to prove a key; a keepalive after 10 s of silence and
    /// a close after 30 s (three missed keepalives); writes stalled for 30 s.
    fn default() -> Self {
        ConnLimits {
            max_connections: 20_000,
            max_handshakes: 1_000,
            queue_bytes: 512 * 1024,
            handshake_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
        }
    }
}

impl ConnLimits {
    fn writer(&self) -> WriterTimes {
        WriterTimes {
            keepalive: self.keepalive,
            write_timeout: self.write_timeout,
        }
    }
}

pub struct RelayConfig {
    pub private: StaticSecret,
    pub admission: Admission,
    /// Bytes per second a client may send, and the burst above it.
    pub rate_limit: u64,
    pub burst: u64,
    /// Pre-shared key of this relay's mesh (relays of one region).
    pub mesh_key: Option<String>,
    pub limits: ConnLimits,
}

struct Client {
    conn_id: u64,
    /// The network the coordinator put this client's key in: it reaches
    /// only clients of the same one.
    network: NetworkTag,
    out: Outbox,
    /// Who has sent to this client: they hear when it goes away.
    senders: Mutex<HashSet<Key>>,
    /// Notified when the client's key is revoked: its connection ends.
    evict: Notify,
}

/// A client of a mesh peer.
#[derive(Clone, Copy)]
struct Remote {
    relay: Key,
    network: NetworkTag,
}

pub struct Relay {
    cfg: RelayConfig,
    public: Key,
    clients: Mutex<HashMap<Key, Arc<Client>>>,
    next_conn: AtomicU64,
    pub metrics: Metrics,
    /// Clients of mesh peers, by key.
    remote: Mutex<HashMap<Key, Remote>>,
    /// Links this relay opened to its mesh peers, by their relay key.
    mesh_links: Mutex<HashMap<Key, (u64, Outbox)>>,
    /// Permits for TCP connections (taken at accept, see [`http::serve`]).
    connections: Arc<Semaphore>,
    /// Permits for connections still proving their key.
    handshakes: Arc<Semaphore>,
}

fn encoded(frame: &Frame) -> Vec<u8> {
    let mut v = Vec::new();
    // Frames built here are always within limits.
    let _ = frame.encode(&mut v);
    v
}

/// The rate limiter's clock: tokio's, so tests can pause it.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl Relay {
    pub fn new(cfg: RelayConfig) -> Arc<Self> {
        let public = PublicKey::from(&cfg.private).to_bytes();
        let connections = Arc::new(Semaphore::new(cfg.limits.max_connections));
        let handshakes = Arc::new(Semaphore::new(cfg.limits.max_handshakes));
        Arc::new(Relay {
            cfg,
            public,
            clients: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            metrics: Metrics::default(),
            remote: Mutex::new(HashMap::new()),
            mesh_links: Mutex::new(HashMap::new()),
            connections,
            handshakes,
        })
    }

    pub fn public_key(&self) -> Key {
        self.public
    }

    pub fn limits(&self) -> &ConnLimits {
        &self.cfg.limits
    }

    pub fn admission(&self) -> &Admission {
        &self.cfg.admission
    }

    fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Arc<Client>>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn client_count(&self) -> usize {
        self.clients().len()
    }

    fn remote(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Remote>> {
        self.remote.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mesh_links(&self) -> std::sync::MutexGuard<'_, HashMap<Key, (u64, Outbox)>> {
        self.mesh_links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells every mesh peer about a change among this relay's clients.
    fn announce(&self, frame: &Frame) {
        let bytes = encoded(frame);
        for (_, link) in self.mesh_links().values() {
            let _ = link.push(&bytes, Lane::Disco);
        }
    }

    /// Serves one client connection (after the HTTP upgrade) to its end.
    /// `handshake` is the permit this connection holds while proving its
    /// key (see [`Relay::handshake_permit`]).
    pub async fn serve_conn<S>(
        self: Arc<Self>,
        stream: S,
        handshake: tokio::sync::OwnedSemaphorePermit,
    ) where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, mut write) = tokio::io::split(stream);
        let mut reader = FrameReader::new(read);
        reader.set_limit(HANDSHAKE_FRAME_LIMIT);
        let mut scratch = Vec::new();
        let challenge = handshake::challenge();
        let limits = self.cfg.limits;
        let proved = tokio::time::timeout(limits.handshake_timeout, async {
            write_frame(
                &mut write,
                &Frame::ServerKey {
                    key: self.public,
                    challenge,
                },
                &mut scratch,
            )
            .await
            .map_err(|_| Drop::Unauthenticated)?;
            self.authenticate(&mut reader, &challenge).await
        })
        .await
        .unwrap_or(Err(Drop::HandshakeTimeout));
        drop(handshake);
        let (key, peer) = match proved {
            Ok(k) => k,
            Err(why) => {
                self.metrics.drop(why);
                let reason = why.label().to_owned();
                let _ = tokio::time::timeout(limits.write_timeout, async {
                    let _ = write_frame(&mut write, &Frame::Close { reason }, &mut scratch).await;
                    let _ = write.shutdown().await;
                })
                .await;
                return;
            }
        };
        reader.set_limit(crate::proto::frame::MAX_FRAME_PAYLOAD);
        let network = match peer {
            Peer::Mesh => {
                // The queues stay open while the peer is served, so the
                // writer keeps the link alive with keepalives.
                let (out, inbox) = outbox(limits.queue_bytes);
                out.push(&encoded(&Frame::ServerInfo), Lane::Disco);
                let relay = self.clone();
                let mut writer = tokio::spawn(async move {
                    outbox::write_loop(&relay.metrics, write, inbox, limits.writer()).await
                });
                tokio::select! {
                    () = self.serve_mesh_peer(&mut reader, key) => {}
                    _ = &mut writer => {}
                }
                drop(out);
                writer.abort();
                return;
            }
            Peer::Client(network) => network,
        };
        let node = NodePublic::from_bytes(key);
        let (out, inbox) = outbox(limits.queue_bytes);
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let client = Arc::new(Client {
            conn_id,
            network,
            out,
            senders: Mutex::new(HashSet::new()),
            evict: Notify::new(),
        });
        // A newer connection with the same key replaces the older one, whose
        // queues close and whose writer ends.
        if self.clients().insert(key, client.clone()).is_none() {
            self.metrics.clients.inc();
        }
        // Revoked between its admission and now: a revocation marks the key
        // denied before looking for its client, so one of the two sees the other.
        if self.cfg.admission.denies(&node, Instant::now()) {
            client.evict.notify_one();
        }
        self.metrics.accepted.inc();
        self.announce(&Frame::PeerPresent { key, network });
        tracing::debug!(node = %node.short(), "client admitted");
        client.out.push(&encoded(&Frame::ServerInfo), Lane::Disco);
        let relay = self.clone();
        let mut writer = tokio::spawn(async move {
            outbox::write_loop(&relay.metrics, write, inbox, limits.writer()).await
        });
        let outcome = tokio::select! {
            outcome = self.read_loop(&mut reader, key, &client) => outcome,
            () = client.evict.notified() => Err(Drop::Revoked),
            _ = &mut writer => Err(Drop::WriteStalled),
        };
        if let Err(why) = outcome {
            self.metrics.drop(why);
            tracing::debug!(node = %node.short(), reason = why.label(), "closing client");
        }
        self.depart(key, &client);
        if outcome == Err(Drop::Revoked) {
            // Say why (path-discovery frames go out first), then let the
            // writer end: it stops when the queues close with our handle.
            let reason = Drop::Revoked.label().to_owned();
            client
                .out
                .push(&encoded(&Frame::Close { reason }), Lane::Disco);
            drop(client);
            let _ = tokio::time::timeout(EVICT_FLUSH, &mut writer).await;
        }
        writer.abort();
    }

    /// A permit for one more connection in its handshake, if under the cap.
    pub fn handshake_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.handshakes.clone().try_acquire_owned().ok()
    }

    /// A permit for one more TCP connection, if under the cap.
    pub fn connection_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }

    /// Checks the client's proof; returns its key and what it is: a client
    /// in a network, or a mesh peer (another relay holding the mesh key).
    async fn authenticate<R: AsyncRead + Unpin>(
        &self,
        reader: &mut FrameReader<R>,
        challenge: &[u8; 16],
    ) -> Result<(Key, Peer), Drop> {
        let (node_key, nonce, sealed) = match reader.next().await {
            Ok(Some(Frame::ClientInfo {
                node_key,
                nonce,
                sealed,
            })) => (node_key, nonce, sealed),
            Ok(_) => return Err(Drop::Unauthenticated),
            Err(ReadError::Frame(FrameError::TooLong(_))) => return Err(Drop::Oversized),
            Err(_) => return Err(Drop::Malformed),
        };
        let info = handshake::open(&self.cfg.private, challenge, &node_key, &nonce, &sealed)
            .map_err(|_| Drop::Unauthenticated)?;
        if let Some(offered) = info.mesh_key {
            return match &self.cfg.mesh_key {
                Some(ours) if mesh::keys_match(ours, &offered) => Ok((node_key, Peer::Mesh)),
                _ => Err(Drop::Unauthenticated),
            };
        }
        match self
            .cfg
            .admission
            .check(NodePublic::from_bytes(node_key), &self.metrics)
            .await
        {
            Verdict::Admit(network) => Ok((node_key, Peer::Client(network))),
            Verdict::Deny => Err(Drop::AdmissionDenied),
            Verdict::Unavailable => Err(Drop::AdmissionUnavailable),
        }
    }

    async fn read_loop<R: AsyncRead + Unpin>(
        &self,
        reader: &mut FrameReader<R>,
        me: Key,
        client: &Client,
    ) -> Result<(), Drop> {
        let mut bucket = TokenBucket::new(self.cfg.rate_limit, self.cfg.burst, now());
        let mut sent_to: HashSet<Key> = HashSet::new();
        let idle = self.cfg.limits.idle_timeout;
        loop {
            let frame = match tokio::time::timeout(idle, reader.next_ref()).await {
                Err(_) => return Err(Drop::IdleTimeout),
                Ok(Ok(Some(f))) => f,
                Ok(Ok(None)) => return Ok(()),
                Ok(Err(ReadError::Frame(FrameError::TooLong(_)))) => return Err(Drop::Oversized),
                Ok(Err(ReadError::Frame(_))) => return Err(Drop::Malformed),
                Ok(Err(ReadError::Io(_))) => return Ok(()),
            };
            let frame = match frame {
                // Forwarded from the reader's buffer into the target's
                // queue: no allocation of its own.
                FrameRef::SendPacket { dst, data } => {
                    self.metrics.packets_in.inc();
                    self.metrics.bytes_in.inc_by(data.len() as u64);
                    if !bucket.take(data.len(), now()) {
                        self.metrics.drop(Drop::RateLimited);
                        continue;
                    }
                    self.forward(me, dst, data, client, &mut sent_to);
                    continue;
                }
                FrameRef::RecvPacket { .. } | FrameRef::ForwardPacket { .. } => {
                    return Err(Drop::UnexpectedFrame)
                }
                FrameRef::Other(frame) => frame,
            };
            match frame {
                Frame::Ping(d) => {
                    client.out.push(&encoded(&Frame::Pong(d)), Lane::Disco);
                }
                Frame::KeepAlive | Frame::Pong(_) | Frame::Unknown { .. } => {}
                Frame::Close { .. } => return Ok(()),
                Frame::SendPacket { .. }
                | Frame::ServerKey { .. }
                | Frame::ClientInfo { .. }
                | Frame::ServerInfo
                | Frame::RecvPacket { .. }
                | Frame::PeerGone { .. }
                | Frame::PeerPresent { .. }
                | Frame::ForwardPacket { .. } => return Err(Drop::UnexpectedFrame),
            }
        }
    }

    /// Sends `data` from `me` (a client here) to `dst`, here or at a mesh
    /// peer, if `dst` is in the sender's network. A key of another network
    /// is answered exactly as a key that is not connected at all, so nobody
    /// learns whether another network's device is online.
    fn forward(&self, me: Key, dst: Key, data: &[u8], sender: &Client, sent_to: &mut HashSet<Key>) {
        let target = self.clients().get(&dst).cloned();
        let mut other_network = false;
        if let Some(target) = target {
            if target.network == sender.network {
                if sent_to.insert(dst) {
                    target
                        .senders
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(me);
                }
                self.deliver(&target, me, data);
                return;
            }
            other_network = true;
        }
        // Connected to a mesh peer? One hop there.
        let via = match self.remote().get(&dst) {
            Some(r) if r.network == sender.network => Some(r.relay),
            Some(_) => {
                other_network = true;
                None
            }
            None => None,
        };
        let link = via.and_then(|relay| self.mesh_links().get(&relay).map(|(_, l)| l.clone()));
        if let Some(link) = link {
            // Two keys where a client frame has one: a packet of the
            // largest size a client may send does not fit.
            let len = 64 + data.len();
            if len > MAX_FRAME_PAYLOAD {
                self.metrics.drop(Drop::Oversized);
                return;
            }
            let queued = link.push_with(HEADER_LEN + len, Lane::Bulk, |b| {
                Frame::encode_forward_packet(&me, &dst, data, b);
            });
            if !queued {
                self.metrics.drop(Drop::QueueFull);
            }
            return;
        }
        self.metrics.drop(if other_network {
            Drop::OtherNetwork
        } else {
            Drop::NoSuchPeer
        });
        let gone = encoded(&Frame::PeerGone {
            key: dst,
            reason: GoneReason::NotHere,
        });
        sender.out.push(&gone, Lane::Disco);
    }

    /// Queues a packet from `src` for a local client.
    fn deliver(&self, target: &Client, src: Key, data: &[u8]) {
        let lane = if platform::disco::is_disco(data) {
            Lane::Disco
        } else {
            Lane::Bulk
        };
        let len = HEADER_LEN + 32 + data.len();
        let queued = target.out.push_with(len, lane, |b| {
            Frame::encode_recv_packet(&src, data, b);
        });
        if !queued {
            self.metrics.drop(Drop::QueueFull);
        }
    }

    /// Reads what a mesh peer tells this relay: its clients coming and
    /// going, and packets for this relay's clients.
    async fn serve_mesh_peer<R: AsyncRead + Unpin>(&self, reader: &mut FrameReader<R>, relay: Key) {
        tracing::info!(relay = %hex::encode(&relay[..4]), "mesh peer connected");
        let idle = self.cfg.limits.idle_timeout;
        loop {
            let frame = match tokio::time::timeout(idle, reader.next_ref()).await {
                Ok(Ok(Some(f))) => f,
                Err(_) => {
                    self.metrics.drop(Drop::IdleTimeout);
                    break;
                }
                Ok(Ok(None) | Err(_)) => break,
            };
            let frame = match frame {
                FrameRef::ForwardPacket { src, dst, data } => {
                    self.metrics.packets_in.inc();
                    self.metrics.bytes_in.inc_by(data.len() as u64);
                    // The peer checked the networks; checked again here, so
                    // one relay's mistake does not cross networks.
                    let from = self.remote().get(&src).map(|r| r.network);
                    let target = self.clients().get(&dst).cloned();
                    match (target, from) {
                        (Some(t), Some(n)) if t.network == n => self.deliver(&t, src, data),
                        (Some(_), _) => self.metrics.drop(Drop::OtherNetwork),
                        (None, _) => self.metrics.drop(Drop::NoSuchPeer),
                    }
                    continue;
                }
                FrameRef::SendPacket { .. } | FrameRef::RecvPacket { .. } => continue,
                FrameRef::Other(frame) => frame,
            };
            match frame {
                Frame::PeerPresent { key, network } => {
                    self.remote().insert(key, Remote { relay, network });
                }
                Frame::PeerGone { key, .. } => {
                    let mut remote = self.remote();
                    if remote.get(&key).is_some_and(|r| r.relay == relay) {
                        remote.remove(&key);
                    }
                }
                _ => {}
            }
        }
        self.remote().retain(|_, r| r.relay != relay);
        tracing::info!(relay = %hex::encode(&relay[..4]), "mesh peer gone");
    }

    /// Removes a client that went away and tells those who sent to it.
    fn depart(&self, key: Key, client: &Client) {
        let removed = {
            let mut clients = self.clients();
            match clients.get(&key) {
                Some(c) if c.conn_id == client.conn_id => clients.remove(&key),
                _ => None,
            }
        };
        if removed.is_none() {
            return;
        }
        self.metrics.clients.dec();
        self.announce(&Frame::PeerGone {
            key,
            reason: GoneReason::Disconnected,
        });
        let senders: Vec<Key> = client
            .senders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        let gone = encoded(&Frame::PeerGone {
            key,
            reason: GoneReason::Disconnected,
        });
        let clients = self.clients();
        for s in senders {
            if let Some(c) = clients.get(&s) {
                c.out.push(&gone, Lane::Disco);
            }
        }
    }
}

/// What proved its key.
enum Peer {
    Client(NetworkTag),
    Mesh,
}

#[cfg(test)]
mod bounds_tests;
#[cfg(test)]
mod scoping_tests;
#[cfg(test)]
mod tests;
