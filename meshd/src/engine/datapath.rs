//! The packet loops: TUN → peers (encrypt), UDP and relays → TUN (decrypt),
//! and the timer tick. Each loop owns its buffers.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn};
use derp_client::RelayEvent;
use platform::keys::NodePublic;
use tokio::sync::mpsc;

use super::admission::{admit, Admission, CookieReplyBudget, Refused, COOKIE_REPLY_LEN};
use super::disco::{self, Via};
use super::offload::{self, Coalescer, Prepared, VnetHdr, PLAIN_HDR, VNET_HDR_LEN};
use super::peers::{Decapsulated, Peer, PeerTable, Targets, HANDSHAKE_INIT};
use super::udp::{RecvBatch, MAX_GSO_BYTES, MAX_GSO_SEGMENTS};
use super::{bump, filter, Counters, Shared, BUF_SIZE, TIMER_TICK};
use crate::paths::Out;

/// Encrypts packets read from the TUN device and sends them to their peer.
/// With offloads on, each read starts with a virtio-net header and may be
/// a TCP or UDP super-packet, split here into MTU-sized packets.
pub(super) async fn tun_to_peers(shared: Arc<Shared>) {
    let mut inbuf = vec![0u8; BUF_SIZE + VNET_HDR_LEN];
    let mut outbuf = vec![0u8; BUF_SIZE];
    let mut outs: Vec<Out> = Vec::new();
    let mut scratch: Vec<u8> = Vec::with_capacity(2 * BUF_SIZE);
    let mut segments = Vec::with_capacity(offload::MAX_SEGMENTS);
    let mut batch = SendBatch::new();
    let vnet = shared.offloads.vnet_hdr;
    loop {
        let n = match shared.tun.recv(&mut inbuf).await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "reading TUN device; engine stops");
                return;
            }
        };
        let (hdr, packet) = if vnet {
            match VnetHdr::parse(&inbuf[..n]) {
                Some(hdr) => (hdr, &mut inbuf[VNET_HDR_LEN..n]),
                None => {
                    bump(&shared.counters.drop_tun_malformed);
                    continue;
                }
            }
        } else {
            (VnetHdr::default(), &mut inbuf[..n])
        };
        match offload::prepare(&hdr, packet, &mut scratch, &mut segments) {
            Ok(Prepared::Whole) => seal_and_send(&shared, packet, &mut outbuf, &mut outs).await,
            Ok(Prepared::Split) => {
                bump(&shared.counters.tun_super_packets);
                for range in &segments {
                    seal_into_batch(&shared, &scratch[range.clone()], &mut batch, &mut outs).await;
                }
                batch.flush(&shared).await;
            }
            Err(why) => {
                tracing::trace!(?why, "TUN offload header");
                bump(&shared.counters.drop_tun_malformed);
            }
        }
    }
}

/// Encrypts one IP packet from this device for its peer and sends it.
async fn seal_and_send(shared: &Shared, packet: &[u8], outbuf: &mut [u8], outs: &mut Vec<Out>) {
    if let Some((range, targets, key)) = seal(shared, packet, outbuf, outs).await {
        send_to_peer(shared, &key, &outbuf[range], targets).await;
    }
}

/// Finds the peer `packet` is for and lets its session encrypt it into
/// `out`, sending what its path machine asks for on the way (pings,
/// call-me-maybes). The sealed datagram's range in `out`, where it goes
/// and the peer's key; `None` when it was dropped (counted) or queued
/// until a handshake completes.
async fn seal(
    shared: &Shared,
    packet: &[u8],
    out: &mut [u8],
    outs: &mut Vec<Out>,
) -> Option<(Range<usize>, Targets, NodePublic)> {
    let Some(dst) = Tunn::dst_address(packet) else {
        bump(&shared.counters.drop_malformed);
        return None;
    };
    let table = shared.peers.load();
    let Some(peer) = table.by_ip.get(&dst) else {
        tracing::trace!(%dst, "no peer has this address");
        bump(&shared.counters.drop_no_route);
        return None;
    };
    let now = Instant::now();
    if !shared.filter.outbound(packet, now) {
        bump(&shared.counters.filter_flows_full);
    }
    outs.clear();
    let sealed = peer.lock().encrypt(packet, out, now, outs);
    if !outs.is_empty() {
        disco::send_outs(shared, peer, outs).await;
    }
    match sealed {
        Ok(Some((range, targets))) => {
            bump(&shared.counters.tx_packets);
            Some((range, targets, peer.node_key))
        }
        // Queued until the handshake completes.
        Ok(None) => None,
        Err(e) => {
            tracing::trace!(error = ?e, "encapsulate");
            None
        }
    }
}

/// Encrypted datagrams for one destination, sent with one system call
/// (UDP segmentation offload): the segments of one TUN super-packet.
struct SendBatch {
    buf: Vec<u8>,
    len: usize,
    segment: usize,
    count: usize,
    to: Option<SocketAddr>,
    /// A datagram shorter than `segment` ended the batch.
    closed: bool,
}

impl SendBatch {
    fn new() -> Self {
        SendBatch {
            buf: vec![0u8; MAX_GSO_BYTES + BUF_SIZE],
            len: 0,
            segment: 0,
            count: 0,
            to: None,
            closed: false,
        }
    }

    /// Takes a datagram of `n` bytes for `to` that was sealed at `len`.
    fn fits(&self, n: usize, to: SocketAddr) -> bool {
        self.count == 0
            || (self.to == Some(to)
                && !self.closed
                && n <= self.segment
                && self.count < MAX_GSO_SEGMENTS
                && self.len + n <= MAX_GSO_BYTES)
    }

    fn take(&mut self, n: usize, to: SocketAddr) {
        if self.count == 0 {
            self.segment = n;
            self.to = Some(to);
        }
        self.closed = n < self.segment;
        self.len += n;
        self.count += 1;
    }

    async fn flush(&mut self, shared: &Shared) {
        if let (Some(to), true) = (self.to, self.count > 0) {
            if let Err(e) = shared
                .udp
                .send_segments(&self.buf[..self.len], self.segment, to)
                .await
            {
                tracing::trace!(error = %e, %to, "send");
                bump(&shared.counters.drop_send_failed);
            }
        }
        self.len = 0;
        self.count = 0;
        self.to = None;
        self.closed = false;
    }
}

/// Encrypts one IP packet straight into `batch` and adds it there when it
/// goes to a single direct endpoint (the batch is sent first when it
/// cannot take it); anything else (relayed, a handshake to several
/// endpoints) goes out at once, after the batch.
async fn seal_into_batch(
    shared: &Shared,
    packet: &[u8],
    batch: &mut SendBatch,
    outs: &mut Vec<Out>,
) {
    let at = batch.len;
    let Some((range, targets, key)) = seal(shared, packet, &mut batch.buf[at..], outs).await else {
        return;
    };
    let (start, n) = (at + range.start, range.len());
    let single = match targets {
        Targets {
            direct: Some(to),
            relay: None,
            also: [None, None, None],
        } => Some(to),
        _ => None,
    };
    match single {
        Some(to) => {
            if !batch.fits(n, to) {
                batch.flush(shared).await;
            }
            // Where the batch's next datagram belongs (0 after a flush).
            let end = batch.len;
            if end != start {
                batch.buf.copy_within(start..start + n, end);
            }
            batch.take(n, to);
        }
        None => {
            // Flushing leaves the bytes past the batch as they are.
            batch.flush(shared).await;
            send_to_peer(shared, &key, &batch.buf[start..start + n], targets).await;
        }
    }
}

/// Sends a datagram the ways `targets` says.
async fn send_to_peer(shared: &Shared, key: &NodePublic, datagram: &[u8], targets: Targets) {
    if targets.direct.is_none() && targets.relay.is_none() {
        bump(&shared.counters.drop_no_endpoint);
        return;
    }
    for target in targets.direct_all() {
        if let Err(e) = shared.udp.send_to(datagram, target).await {
            tracing::trace!(error = %e, %target, "send");
            bump(&shared.counters.drop_send_failed);
        }
    }
    if let Some(region) = targets.relay {
        if shared.relays.send(region, key, datagram) {
            bump(&shared.counters.tx_relayed);
        } else {
            bump(&shared.counters.drop_send_failed);
        }
    }
}

/// Who an admitted handshake message is from.
pub(super) enum Sender {
    Peer(Arc<Peer>),
    /// A well-formed initiation for us from a key the netmap does not list
    /// (yet: see [`super::early`]).
    Stranger(NodePublic),
    /// Nobody: counted by why.
    Nobody,
}

/// The peer an admitted handshake message is from, or counts why there is
/// none. For an initiation this costs a DH: call it only from the
/// handshake task.
pub(super) fn handshake_peer(
    secret: &boringtun::x25519::StaticSecret,
    public: &boringtun::x25519::PublicKey,
    counters: &Counters,
    table: &PeerTable,
    datagram: &[u8],
) -> Sender {
    let index = match Tunn::parse_incoming_packet(datagram) {
        Ok(Packet::HandshakeInit(init)) => {
            let Ok(half) = parse_handshake_anon(secret, public, &init) else {
                bump(&counters.drop_bad_handshake);
                return Sender::Nobody;
            };
            let key = NodePublic::from_bytes(half.peer_static_public);
            return match table.by_key.get(&key) {
                Some(peer) => Sender::Peer(peer.clone()),
                None => {
                    bump(&counters.drop_unknown_peer);
                    Sender::Stranger(key)
                }
            };
        }
        Ok(Packet::HandshakeResponse(p)) => p.receiver_idx,
        Ok(Packet::PacketCookieReply(p)) => p.receiver_idx,
        Ok(Packet::PacketData(p)) => p.receiver_idx,
        Err(_) => {
            bump(&counters.drop_malformed);
            return Sender::Nobody;
        }
    };
    match session_peer(counters, table, index) {
        Some(peer) => Sender::Peer(peer),
        None => Sender::Nobody,
    }
}

/// The peer holding the session with `receiver_index`.
fn session_peer(counters: &Counters, table: &PeerTable, receiver_index: u32) -> Option<Arc<Peer>> {
    let found = table.by_index.get(&(receiver_index >> 8)).cloned();
    if found.is_none() {
        bump(&counters.drop_unknown_peer);
    }
    found
}

/// Decrypts one datagram from `peer` and delivers what comes out: packets to
/// the TUN device, protocol replies back the way the datagram came.
async fn receive(
    shared: &Shared,
    peer: &Peer,
    datagram: &[u8],
    via: Via,
    buf: &mut [u8],
    tun: &mut TunOut,
) {
    // Packets for the TUN device are decrypted past room for the virtio-net
    // header, which is then written in front of them: no copy.
    let room = if shared.offloads.vnet_hdr {
        VNET_HDR_LEN
    } else {
        0
    };
    let mut datagram = datagram;
    let mut outs: Vec<Out> = Vec::new();
    // The first call decrypts; repeated calls with an empty datagram flush
    // packets queued while the handshake was in flight.
    loop {
        let outcome =
            peer.lock()
                .decrypt(datagram, via, &mut buf[room..], Instant::now(), &mut outs);
        let outbuf = &mut buf[room..];
        if !outs.is_empty() {
            disco::send_outs(shared, peer, &outs).await;
            outs.clear();
        }
        match outcome {
            Decapsulated::Done => return,
            Decapsulated::Error(e) => {
                count_decap_error(&shared.counters, &e);
                return;
            }
            Decapsulated::Network(range, targets) => {
                send_to_peer(shared, &peer.node_key, &outbuf[range], targets).await;
                datagram = &[];
            }
            Decapsulated::Tunnel(range, src) => {
                if range.is_empty() {
                    return; // keepalive
                }
                if !peer.allowed.contains(&src) {
                    bump(&shared.counters.drop_source_not_allowed);
                    return;
                }
                if let Err(why) = shared
                    .filter
                    .inbound(&outbuf[range.clone()], Instant::now())
                {
                    bump(match why {
                        filter::Drop::NoRule => &shared.counters.drop_filter_no_rule,
                        filter::Drop::NotForUs => &shared.counters.drop_filter_not_for_us,
                        filter::Drop::Malformed => &shared.counters.drop_filter_malformed,
                    });
                    tracing::trace!(%src, reason = ?why, "filtered");
                    return;
                }
                // In `buf`, the header goes just before the packet.
                tun.write(shared, &mut buf[range.start..room + range.end], room)
                    .await;
                bump(&shared.counters.rx_packets);
                return;
            }
        }
    }
}

/// Where decrypted packets go: straight to the TUN device, or, in the UDP
/// loop with TSO on, gathered for the receive batch and coalesced
/// ([`Coalescer`]) into as few writes as the flows allow.
pub(super) struct TunOut {
    gather: bool,
    arena: Vec<u8>,
    packets: Vec<Range<usize>>,
    out: Vec<u8>,
    writes: Vec<Range<usize>>,
    coalescer: Coalescer,
}

impl TunOut {
    pub(super) fn new(gather: bool) -> Self {
        TunOut {
            gather,
            arena: Vec::new(),
            packets: Vec::new(),
            out: Vec::new(),
            writes: Vec::new(),
            coalescer: Coalescer::default(),
        }
    }

    /// One packet for the TUN device, after `room` bytes kept free for the
    /// virtio-net header.
    async fn write(&mut self, shared: &Shared, framed: &mut [u8], room: usize) {
        if self.gather {
            let start = self.arena.len();
            self.arena.extend_from_slice(&framed[room..]);
            self.packets.push(start..self.arena.len());
            return;
        }
        framed[..room].copy_from_slice(&PLAIN_HDR[..room]);
        if let Err(e) = shared.tun.send(framed).await {
            tracing::debug!(error = %e, "TUN write");
        }
    }

    /// Writes what was gathered.
    async fn flush(&mut self, shared: &Shared) {
        if self.packets.is_empty() {
            return;
        }
        let packets: Vec<&[u8]> = self
            .packets
            .iter()
            .map(|r| &self.arena[r.clone()])
            .collect();
        self.out.clear();
        self.writes.clear();
        self.coalescer
            .coalesce(&packets, &mut self.out, &mut self.writes);
        drop(packets);
        for w in &self.writes {
            // A GSO type in the header: several segments in one write.
            if self.out[w.start + 1] != 0 {
                bump(&shared.counters.tun_coalesced);
            }
            if let Err(e) = shared.tun.send(&self.out[w.clone()]).await {
                tracing::debug!(error = %e, "TUN write");
            }
        }
        self.arena.clear();
        self.packets.clear();
    }
}

/// A handshake message waiting for the handshake task.
pub(super) struct PendingHandshake {
    pub datagram: Vec<u8>,
    pub via: Via,
}

/// Decrypts datagrams from the UDP socket (and picks out STUN answers).
/// Handshake messages are only checked (MAC1, load) and handed on: their
/// Diffie-Hellman runs in [`handshakes`], never here.
pub(super) async fn udp_to_tun(shared: Arc<Shared>) {
    let mut batch = RecvBatch::new(UDP_BATCH, BUF_SIZE);
    let mut outbuf = vec![0u8; BUF_SIZE];
    let mut cookie = [0u8; COOKIE_REPLY_LEN];
    let mut cookie_budget = CookieReplyBudget::default();
    let mut tun = TunOut::new(shared.offloads.tso);
    loop {
        if let Err(e) = shared.udp.recv_batch(&mut batch).await {
            tracing::debug!(error = %e, "UDP receive");
            continue;
        }
        // One look at the peer table and identity per batch.
        let table = shared.peers.load();
        let identity = shared.identity.load_full();
        for (datagram, from) in batch.iter() {
            from_udp(
                &shared,
                &table,
                &identity.limiter,
                datagram,
                from,
                (&mut outbuf, &mut tun),
                (&mut cookie, &mut cookie_budget),
            )
            .await;
        }
        tun.flush(&shared).await;
    }
}

/// Datagrams taken from the socket per receive call.
const UDP_BATCH: usize = 32;

/// One datagram from the UDP socket.
async fn from_udp(
    shared: &Shared,
    table: &PeerTable,
    limiter: &RateLimiter,
    datagram: &[u8],
    from: SocketAddr,
    (outbuf, tun): (&mut [u8], &mut TunOut),
    (cookie, budget): (&mut [u8; COOKIE_REPLY_LEN], &mut CookieReplyBudget),
) {
    if shared.stun.take_response(datagram) {
        return;
    }
    if platform::disco::is_disco(datagram) {
        disco::handle(shared, table, datagram, Via::Udp(from), None).await;
        return;
    }
    let handshake = matches!(datagram.first(), Some(1 | 2));
    if handshake && budget.exhausted(from.ip(), Instant::now()) {
        bump(&shared.counters.drop_bad_handshake);
        return;
    }
    match admit(limiter, Some(from.ip()), datagram, cookie) {
        Admission::Session { receiver_index } => {
            if let Some(peer) = session_peer(&shared.counters, table, receiver_index) {
                receive(shared, &peer, datagram, Via::Udp(from), outbuf, tun).await;
            }
        }
        Admission::Handshake => shared.queue_handshake(datagram, Via::Udp(from)),
        Admission::CookieReply(len) if budget.allow(from.ip(), Instant::now()) => {
            bump(&shared.counters.cookie_replies);
            if let Err(e) = shared.udp.send_to(&cookie[..len], from).await {
                tracing::trace!(error = %e, %from, "cookie reply");
            }
        }
        Admission::CookieReply(_) => bump(&shared.counters.drop_bad_handshake),
        Admission::Drop(Refused::Malformed) => bump(&shared.counters.drop_malformed),
        Admission::Drop(Refused::BadMac | Refused::UnderLoad) => {
            bump(&shared.counters.drop_bad_handshake)
        }
    }
}

/// Runs admitted handshake messages: finds the peer (a DH for an
/// initiation) and lets its session answer. An initiation from a key the
/// netmap does not list yet is kept for when it does.
pub(super) async fn handshakes(
    shared: Arc<Shared>,
    queue: Arc<tokio::sync::Mutex<mpsc::Receiver<PendingHandshake>>>,
) {
    let mut queue = queue.lock().await;
    let mut outbuf = vec![0u8; BUF_SIZE];
    let mut tun = TunOut::new(false);
    while let Some(h) = queue.recv().await {
        let sender = {
            let identity = shared.identity.load();
            handshake_peer(
                &identity.secret,
                &identity.public,
                &shared.counters,
                &shared.peers.load(),
                &h.datagram,
            )
        };
        match sender {
            Sender::Peer(peer) => {
                receive(&shared, &peer, &h.datagram, h.via, &mut outbuf, &mut tun).await
            }
            Sender::Stranger(key) => shared.remember_early(key, &h.datagram, h.via),
            Sender::Nobody => {}
        }
    }
}

/// Handles what the relay links report.
pub(super) async fn relay_to_tun(
    shared: Arc<Shared>,
    events: Arc<tokio::sync::Mutex<mpsc::Receiver<(u32, RelayEvent)>>>,
) {
    let mut events = events.lock().await;
    let mut outbuf = vec![0u8; BUF_SIZE];
    // What a relay link delivered together is written together: TCP runs
    // coalesced into one TUN write, as on the UDP path.
    let mut tun = TunOut::new(shared.offloads.tso);
    let mut cookie = [0u8; COOKIE_REPLY_LEN];
    let mut batch = Vec::with_capacity(RELAY_BATCH);
    while events.recv_many(&mut batch, RELAY_BATCH).await > 0 {
        for (region, event) in batch.drain(..) {
            relay_event(&shared, region, event, &mut outbuf, &mut tun, &mut cookie).await;
        }
        tun.flush(&shared).await;
    }
}

/// Relay events handled before the TUN writes they produced are flushed.
const RELAY_BATCH: usize = 64;

async fn relay_event(
    shared: &Arc<Shared>,
    region: u32,
    event: RelayEvent,
    outbuf: &mut [u8],
    tun: &mut TunOut,
    cookie: &mut [u8; COOKIE_REPLY_LEN],
) {
    match event {
        RelayEvent::Packet { src, data } => {
            let key = NodePublic::from_bytes(src);
            let table = shared.peers.load();
            if platform::disco::is_disco(&data) {
                disco::handle(shared, &table, &data, Via::Relay(region), Some(key)).await;
                return;
            }
            // The relay vouches for the sender's key; the WireGuard
            // session still authenticates every packet.
            let Some(peer) = table.by_key.get(&key).cloned() else {
                // Maybe an initiation from a device we are about to hear
                // of: the handshake task checks it and keeps it if so.
                let admitted = data.first() == Some(&HANDSHAKE_INIT)
                    && admit(&shared.identity.load().limiter, None, &data, cookie)
                        == Admission::Handshake;
                if admitted {
                    shared.queue_handshake(&data, Via::Relay(region));
                } else {
                    bump(&shared.counters.drop_unknown_peer);
                }
                return;
            };
            bump(&shared.counters.rx_relayed);
            receive(shared, &peer, &data, Via::Relay(region), outbuf, tun).await;
        }
        RelayEvent::Connected => {
            tracing::info!(region, "relay connected");
            shared.relays.mark(region, true);
        }
        RelayEvent::Disconnected { reason } => {
            tracing::warn!(region, %reason, "relay link down");
            shared.relays.mark(region, false);
        }
        RelayEvent::PeerGone { key, reason } => {
            tracing::debug!(region, peer = %NodePublic::from_bytes(key).short(), ?reason, "peer not at relay");
        }
    }
}

fn count_decap_error(c: &Counters, e: &WireGuardError) {
    match e {
        WireGuardError::InvalidMac
        | WireGuardError::WrongKey
        | WireGuardError::InvalidTai64nTimestamp
        | WireGuardError::WrongTai64nTimestamp => bump(&c.drop_bad_handshake),
        WireGuardError::InvalidPacket
        | WireGuardError::IncorrectPacketLength
        | WireGuardError::WrongPacketType => bump(&c.drop_malformed),
        _ => bump(&c.drop_decrypt),
    }
    tracing::trace!(error = ?e, "decapsulate");
}

/// Drives handshake retries, rekeys and keepalives for every peer.
pub(super) async fn timers(shared: Arc<Shared>) {
    let mut buf = vec![0u8; BUF_SIZE];
    let mut tick = tokio::time::interval(TIMER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut outs: Vec<Out> = Vec::new();
    loop {
        tick.tick().await;
        // The handshake budget is per second; this resets it once a second.
        shared.identity.load().limiter.reset_count();
        let table = shared.peers.load_full();
        let now = Instant::now();
        for peer in table.by_key.values() {
            outs.clear();
            let due = peer.lock().tick(now, &mut buf, &mut outs);
            if !outs.is_empty() {
                disco::send_outs(&shared, peer, &outs).await;
            }
            if let Some((range, targets)) = due {
                send_to_peer(&shared, &peer.node_key, &buf[range], targets).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::peers::tests::{netmap, node};
    use crate::engine::peers::IndexAllocator;
    use platform::keys::NodePrivate;

    /// A handshake initiation from `from` to `to`.
    fn handshake(from: &NodePrivate, to: NodePublic) -> Vec<u8> {
        let mut t = Tunn::new(from.to_dalek(), to.to_dalek(), None, None, 1, None);
        let mut buf = vec![0u8; 256];
        match t.format_handshake_initiation(&mut buf, false) {
            boringtun::noise::TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => panic!("no handshake"),
        }
    }

    #[test]
    fn receive_path_sorts_datagrams_and_counts_drops() {
        let me = NodePrivate::generate();
        let known = NodePrivate::generate();
        let stranger = NodePrivate::generate();
        let table = PeerTable::build(
            &PeerTable::default(),
            &netmap(&me, vec![node(known.public(), 2, &[])]),
            &me,
            &IndexAllocator::new(5),
            0,
        );
        let (secret, public) = (me.to_dalek(), me.public().to_dalek());
        let c = Counters::default();

        let found = handshake_peer(
            &secret,
            &public,
            &c,
            &table,
            &handshake(&known, me.public()),
        );
        assert!(
            matches!(found, Sender::Peer(p) if p.node_key == known.public()),
            "handshake from a known peer finds it"
        );

        let from_stranger = handshake_peer(
            &secret,
            &public,
            &c,
            &table,
            &handshake(&stranger, me.public()),
        );
        assert!(
            matches!(from_stranger, Sender::Stranger(k) if k == stranger.public()),
            "a stranger's initiation names it (to be kept for when it is announced)"
        );
        assert_eq!(c.snapshot().drop_unknown_peer, 1);

        // Meant for someone else: does not decrypt with our key.
        let other = NodePrivate::generate().public();
        assert!(matches!(
            handshake_peer(&secret, &public, &c, &table, &handshake(&known, other)),
            Sender::Nobody
        ));
        assert_eq!(c.snapshot().drop_bad_handshake, 1);

        for garbage in [
            &b""[..],
            b"x",
            b"garbage that is no wireguard",
            &[4u8, 0, 0, 0, 1, 2],
        ] {
            assert!(matches!(
                handshake_peer(&secret, &public, &c, &table, garbage),
                Sender::Nobody
            ));
        }
        assert_eq!(c.snapshot().drop_malformed, 4);

        // A well-formed data packet for an index nobody holds.
        let mut data = vec![4u8, 0, 0, 0];
        data.extend_from_slice(&0xdead_beef_u32.to_le_bytes());
        data.extend_from_slice(&[0u8; 8 + 16]);
        assert!(matches!(
            handshake_peer(&secret, &public, &c, &table, &data),
            Sender::Nobody
        ));
        assert_eq!(c.snapshot().drop_unknown_peer, 2);
    }
}
