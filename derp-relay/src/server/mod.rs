//! The relay server: authenticated clients, each with a bounded bulk queue
//! and a separate path-discovery queue, forwarding by destination node key.
//!
//! A slow reader only fills its own queues (later packets for it are dropped
//! and counted); nobody else waits on it. A client whose node key the
//! coordinator revokes is evicted at once (see [`revocations`]).

pub mod admission;
pub mod http;
pub mod mesh;
pub mod metrics;
pub mod ratelimit;
pub mod revocations;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use platform::keys::NodePublic;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::{mpsc, Notify};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::io::{write_frame, FrameReader, ReadError};
use crate::proto::frame::{Frame, FrameError, GoneReason, Key};
use crate::proto::handshake;
use admission::{Admission, Verdict};
use metrics::{Drop, Metrics};
use ratelimit::TokenBucket;

/// Packets queued per client before drops begin.
pub const BULK_QUEUE: usize = 512;
/// Path-discovery packets queued per client (kept apart so bulk cannot starve them).
pub const DISCO_QUEUE: usize = 64;
/// Time a client has to prove its key.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A keepalive goes to every client this often.
const KEEPALIVE: Duration = Duration::from_secs(30);
/// How long an evicted client's writer gets to deliver the closing frame.
const EVICT_FLUSH: Duration = Duration::from_secs(1);

pub struct RelayConfig {
    pub private: StaticSecret,
    pub admission: Admission,
    /// Bytes per second a client may send, and the burst above it.
    pub rate_limit: u64,
    pub burst: u64,
    /// Pre-shared key of this relay's mesh (relays of one region).
    pub mesh_key: Option<String>,
}

/// Frames queued for one client.
type Outbox = mpsc::Sender<Vec<u8>>;

struct Client {
    conn_id: u64,
    bulk: Outbox,
    disco: Outbox,
    /// Who has sent to this client: they hear when it goes away.
    senders: Mutex<HashSet<Key>>,
    /// Notified when the client's key is revoked: its connection ends.
    evict: Notify,
}

pub struct Relay {
    cfg: RelayConfig,
    public: Key,
    clients: Mutex<HashMap<Key, Arc<Client>>>,
    next_conn: AtomicU64,
    pub metrics: Metrics,
    /// Clients of mesh peers: client key → the relay it is connected to.
    remote: Mutex<HashMap<Key, Key>>,
    /// Links this relay opened to its mesh peers, by their relay key.
    mesh_links: Mutex<HashMap<Key, (u64, Outbox)>>,
}

fn encoded(frame: &Frame) -> Vec<u8> {
    let mut v = Vec::new();
    // Frames built here are always within limits.
    let _ = frame.encode(&mut v);
    v
}

impl Relay {
    pub fn new(cfg: RelayConfig) -> Arc<Self> {
        let public = PublicKey::from(&cfg.private).to_bytes();
        Arc::new(Relay {
            cfg,
            public,
            clients: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            metrics: Metrics::default(),
            remote: Mutex::new(HashMap::new()),
            mesh_links: Mutex::new(HashMap::new()),
        })
    }

    pub fn public_key(&self) -> Key {
        self.public
    }

    fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Arc<Client>>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn client_count(&self) -> usize {
        self.clients().len()
    }

    fn remote(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Key>> {
        self.remote.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mesh_links(&self) -> std::sync::MutexGuard<'_, HashMap<Key, (u64, Outbox)>> {
        self.mesh_links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells every mesh peer about a change among this relay's clients.
    fn announce(&self, frame: &Frame) {
        let bytes = encoded(frame);
        for (_, link) in self.mesh_links().values() {
            let _ = link.try_send(bytes.clone());
        }
    }

    /// Serves one client connection (after the HTTP upgrade) to its end.
    pub async fn serve_conn<S>(self: Arc<Self>, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, mut write) = tokio::io::split(stream);
        let mut reader = FrameReader::new(read);
        let mut scratch = Vec::new();
        let challenge = handshake::challenge();
        if write_frame(
            &mut write,
            &Frame::ServerKey {
                key: self.public,
                challenge,
            },
            &mut scratch,
        )
        .await
        .is_err()
        {
            return;
        }
        let (key, is_mesh) = match self.authenticate(&mut reader, &challenge).await {
            Ok(k) => k,
            Err(why) => {
                self.metrics.drop(why);
                let reason = why.label().to_owned();
                let _ = write_frame(&mut write, &Frame::Close { reason }, &mut scratch).await;
                let _ = write.shutdown().await;
                return;
            }
        };
        if is_mesh {
            let (tx, rx) = mpsc::channel(DISCO_QUEUE);
            let _ = tx.try_send(encoded(&Frame::ServerInfo));
            let (_, idle) = mpsc::channel(1);
            let writer = tokio::spawn(write_loop(self.clone(), write, idle, rx));
            self.serve_mesh_peer(&mut reader, key).await;
            writer.abort();
            return;
        }
        let node = NodePublic::from_bytes(key);
        let (bulk_tx, bulk_rx) = mpsc::channel(BULK_QUEUE);
        let (disco_tx, disco_rx) = mpsc::channel(DISCO_QUEUE);
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let client = Arc::new(Client {
            conn_id,
            bulk: bulk_tx,
            disco: disco_tx,
            senders: Mutex::new(HashSet::new()),
            evict: Notify::new(),
        });
        // A newer connection with the same key replaces the older one, whose
        // queues close and whose writer ends.
        if self.clients().insert(key, client.clone()).is_none() {
            self.metrics.clients.fetch_add(1, Ordering::Relaxed);
        }
        // Revoked between its admission and now: a revocation marks the key
        // denied before looking for its client, so one of the two sees the other.
        if self.cfg.admission.denies(&node, Instant::now()) {
            client.evict.notify_one();
        }
        self.metrics.accepted.fetch_add(1, Ordering::Relaxed);
        self.announce(&Frame::PeerPresent { key });
        tracing::debug!(node = %node.short(), "client admitted");
        let _ = client.bulk.try_send(encoded(&Frame::ServerInfo));
        let mut writer = tokio::spawn(write_loop(self.clone(), write, bulk_rx, disco_rx));
        let outcome = tokio::select! {
            outcome = self.read_loop(&mut reader, key, &client) => outcome,
            () = client.evict.notified() => Err(Drop::Revoked),
        };
        if let Err(why) = outcome {
            self.metrics.drop(why);
            tracing::debug!(node = %node.short(), reason = why.label(), "closing client");
        }
        self.depart(key, &client);
        if outcome == Err(Drop::Revoked) {
            // Say why (path-discovery frames go out first), then let the
            // writer end: it stops when that queue closes with our handle.
            let reason = Drop::Revoked.label().to_owned();
            let _ = client.disco.try_send(encoded(&Frame::Close { reason }));
            drop(client);
            let _ = tokio::time::timeout(EVICT_FLUSH, &mut writer).await;
        }
        writer.abort();
    }

    /// Checks the client's proof; returns its key and whether it is a mesh
    /// peer (another relay holding the mesh key).
    async fn authenticate<R: AsyncRead + Unpin>(
        &self,
        reader: &mut FrameReader<R>,
        challenge: &[u8; 16],
    ) -> Result<(Key, bool), Drop> {
        let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next())
            .await
            .map_err(|_| Drop::Unauthenticated)?;
        let (node_key, nonce, sealed) = match first {
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
                Some(ours) if mesh::keys_match(ours, &offered) => Ok((node_key, true)),
                _ => Err(Drop::Unauthenticated),
            };
        }
        match self
            .cfg
            .admission
            .check(NodePublic::from_bytes(node_key))
            .await
        {
            Verdict::Admit => Ok((node_key, false)),
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
        let mut bucket = TokenBucket::new(self.cfg.rate_limit, self.cfg.burst, Instant::now());
        let mut sent_to: HashSet<Key> = HashSet::new();
        loop {
            let frame = match reader.next().await {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(ReadError::Frame(FrameError::TooLong(_))) => return Err(Drop::Oversized),
                Err(ReadError::Frame(_)) => return Err(Drop::Malformed),
                Err(ReadError::Io(_)) => return Ok(()),
            };
            match frame {
                Frame::SendPacket { dst, data } => {
                    self.metrics.packets_in.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .bytes_in
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    if !bucket.take(data.len(), Instant::now()) {
                        self.metrics.drop(Drop::RateLimited);
                        continue;
                    }
                    self.forward(me, dst, &data, client, &mut sent_to);
                }
                Frame::Ping(d) => {
                    let _ = client.disco.try_send(encoded(&Frame::Pong(d)));
                }
                Frame::KeepAlive | Frame::Pong(_) | Frame::Unknown { .. } => {}
                Frame::Close { .. } => return Ok(()),
                Frame::ServerKey { .. }
                | Frame::ClientInfo { .. }
                | Frame::ServerInfo
                | Frame::RecvPacket { .. }
                | Frame::PeerGone { .. }
                | Frame::PeerPresent { .. }
                | Frame::ForwardPacket { .. } => return Err(Drop::UnexpectedFrame),
            }
        }
    }

    fn forward(&self, me: Key, dst: Key, data: &[u8], sender: &Client, sent_to: &mut HashSet<Key>) {
        let target = self.clients().get(&dst).cloned();
        if let Some(target) = target {
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
        // Connected to a mesh peer? One hop there.
        let via = self.remote().get(&dst).copied();
        let link = via.and_then(|relay| self.mesh_links().get(&relay).map(|(_, l)| l.clone()));
        if let Some(link) = link {
            if link
                .try_send(encoded(&Frame::ForwardPacket {
                    src: me,
                    dst,
                    data: data.to_vec(),
                }))
                .is_err()
            {
                self.metrics.drop(Drop::QueueFull);
            }
            return;
        }
        self.metrics.drop(Drop::NoSuchPeer);
        let _ = sender.disco.try_send(encoded(&Frame::PeerGone {
            key: dst,
            reason: GoneReason::NotHere,
        }));
    }

    /// Queues a packet from `src` for a local client.
    fn deliver(&self, target: &Client, src: Key, data: &[u8]) {
        let mut frame = Vec::with_capacity(5 + 32 + data.len());
        Frame::encode_recv_packet(&src, data, &mut frame);
        let queue = if platform::disco::is_disco(data) {
            &target.disco
        } else {
            &target.bulk
        };
        if queue.try_send(frame).is_err() {
            self.metrics.drop(Drop::QueueFull);
        }
    }

    /// Reads what a mesh peer tells this relay: its clients coming and
    /// going, and packets for this relay's clients.
    async fn serve_mesh_peer<R: AsyncRead + Unpin>(&self, reader: &mut FrameReader<R>, relay: Key) {
        tracing::info!(relay = %hex::encode(&relay[..4]), "mesh peer connected");
        loop {
            match reader.next().await {
                Ok(Some(Frame::PeerPresent { key })) => {
                    self.remote().insert(key, relay);
                }
                Ok(Some(Frame::PeerGone { key, .. })) => {
                    let mut remote = self.remote();
                    if remote.get(&key) == Some(&relay) {
                        remote.remove(&key);
                    }
                }
                Ok(Some(Frame::ForwardPacket { src, dst, data })) => {
                    self.metrics.packets_in.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .bytes_in
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    let target = self.clients().get(&dst).cloned();
                    match target {
                        Some(t) => self.deliver(&t, src, &data),
                        None => self.metrics.drop(Drop::NoSuchPeer),
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        self.remote().retain(|_, r| *r != relay);
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
        self.metrics.clients.fetch_sub(1, Ordering::Relaxed);
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
                let _ = c.disco.try_send(gone.clone());
            }
        }
    }
}

/// Writes queued frames, path discovery first, with a keepalive when idle.
async fn write_loop<W: AsyncWrite + Unpin>(
    relay: Arc<Relay>,
    mut write: W,
    mut bulk: mpsc::Receiver<Vec<u8>>,
    mut disco: mpsc::Receiver<Vec<u8>>,
) {
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.tick().await;
    let mut scratch = Vec::new();
    loop {
        let frame = tokio::select! {
            biased;
            f = disco.recv() => f,
            f = bulk.recv() => f,
            _ = keepalive.tick() => {
                if write_frame(&mut write, &Frame::KeepAlive, &mut scratch).await.is_err() || write.flush().await.is_err() {
                    return;
                }
                continue;
            }
        };
        let Some(frame) = frame else { return };
        relay.metrics.packets_out.fetch_add(1, Ordering::Relaxed);
        relay
            .metrics
            .bytes_out
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        if write.write_all(&frame).await.is_err() || write.flush().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
