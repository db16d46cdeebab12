//! The I/O side of path discovery: sealing and sending what the per-peer
//! path state asks for, and handling disco messages from UDP and relays.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use platform::disco::{self, Message, TxId};
use platform::keys::{DiscoPrivate, DiscoPublic, NodePublic};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::peers::{Peer, PeerTable};
use super::{bump, Shared};
use crate::paths::Out;

/// How a datagram arrived, and so how to answer it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Via {
    Udp(SocketAddr),
    Relay(u32),
}

/// The path a `meshd ping` answer took.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "via", rename_all = "snake_case")]
pub enum PingPath {
    Direct { endpoint: SocketAddr },
    Relay { region: u32 },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingReply {
    pub path: PingPath,
    pub rtt_us: u64,
}

type Waiter = (Instant, oneshot::Sender<PingReply>);

pub(super) struct Disco {
    pub private: DiscoPrivate,
    /// `private`'s public half, computed once.
    public: DiscoPublic,
    /// Stamps every message this instance seals (receivers refuse replays).
    stamper: disco::Stamper,
    /// This device's endpoints, offered in call-me-maybe.
    pub own_endpoints: ArcSwap<Vec<SocketAddr>>,
    /// `meshd ping`s waiting for their pong.
    waiters: Mutex<HashMap<TxId, Waiter>>,
}

impl Disco {
    pub fn new(private: DiscoPrivate) -> Self {
        Disco {
            public: private.public(),
            private,
            stamper: disco::Stamper::default(),
            own_endpoints: ArcSwap::from_pointee(Vec::new()),
            waiters: Mutex::new(HashMap::new()),
        }
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, HashMap<TxId, Waiter>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a user ping; the receiver gets its first answer.
    pub fn expect(&self, tx: TxId, now: Instant) -> oneshot::Receiver<PingReply> {
        let (send, recv) = oneshot::channel();
        let mut w = self.waiters();
        w.retain(|_, (sent, s)| {
            !s.is_closed() && now.saturating_duration_since(*sent) < Duration::from_secs(30)
        });
        w.insert(tx, (now, send));
        recv
    }
}

/// Sends one disco message to `peer`, directly or through its relay.
pub(super) async fn send(shared: &Shared, peer: &Peer, msg: &Message, via: Via) {
    let Some(key) = peer.disco_shared(&shared.disco.private) else {
        return;
    };
    let stamp = shared
        .disco
        .stamper
        .next(platform::unix_now_ms().saturating_mul(1_000_000));
    let sealed = msg.seal_with(key, &shared.disco.public, stamp);
    match via {
        Via::Udp(to) => {
            if let Err(e) = shared.udp.send_to(&sealed, to).await {
                tracing::trace!(error = %e, %to, "disco send");
            }
        }
        Via::Relay(region) => {
            shared.relays.send(region, &peer.node_key, &sealed);
        }
    }
}

/// Sends what a peer's path state asked for.
pub(super) async fn send_outs(shared: &Shared, peer: &Peer, outs: &[Out]) {
    for o in outs {
        match o {
            Out::Ping { tx, to } => {
                send(
                    shared,
                    peer,
                    &Message::Ping {
                        tx: *tx,
                        node_key: shared.identity.load().node,
                    },
                    Via::Udp(*to),
                )
                .await;
            }
            Out::CallMeMaybe { region } => {
                let endpoints = shared.disco.own_endpoints.load().to_vec();
                send(
                    shared,
                    peer,
                    &Message::CallMeMaybe { endpoints },
                    Via::Relay(*region),
                )
                .await;
            }
        }
    }
}

/// Handles one disco message. `relay_src` is the node key the relay says
/// sent it (for messages that came through a relay).
pub(super) async fn handle(
    shared: &Shared,
    table: &PeerTable,
    packet: &[u8],
    via: Via,
    relay_src: Option<NodePublic>,
) {
    let Ok(sender) = disco::sender(packet) else {
        bump(&shared.counters.drop_malformed);
        return;
    };
    let Some(peer) = table.by_disco.get(&sender).cloned() else {
        bump(&shared.counters.drop_unknown_peer);
        return;
    };
    if relay_src.is_some_and(|k| k != peer.node_key) {
        bump(&shared.counters.drop_unknown_peer);
        return;
    }
    let Some(key) = peer.disco_shared(&shared.disco.private) else {
        return;
    };
    let msg = match disco::open_with(packet, key, &sender) {
        Ok(opened) if peer.lock().disco_replay.accept(opened.stamp) => opened.message,
        Ok(_) => {
            // Seen before, or too old: a replay, from wherever it came.
            bump(&shared.counters.drop_disco_replay);
            return;
        }
        Err(e) => {
            tracing::trace!(error = %e, "disco open");
            bump(&shared.counters.drop_bad_handshake);
            return;
        }
    };
    let now = Instant::now();
    bump(&shared.counters.rx_disco);
    match msg {
        Message::Ping { tx, node_key } => {
            if node_key != peer.node_key {
                bump(&shared.counters.drop_unknown_peer);
                return;
            }
            let mut outs = Vec::new();
            let src = match via {
                Via::Udp(from) => {
                    peer.lock().paths.on_ping(from, now, &mut outs);
                    from
                }
                Via::Relay(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            };
            send(shared, &peer, &Message::Pong { tx, src }, via).await;
            send_outs(shared, &peer, &outs).await;
        }
        Message::Pong { tx, .. } => {
            let waiter = shared.disco.waiters().remove(&tx);
            if let Some((sent, reply)) = waiter {
                let path = match via {
                    Via::Udp(endpoint) => PingPath::Direct { endpoint },
                    Via::Relay(region) => PingPath::Relay { region },
                };
                let rtt_us = u64::try_from(now.saturating_duration_since(sent).as_micros())
                    .unwrap_or(u64::MAX);
                let _ = reply.send(PingReply { path, rtt_us });
            }
            if let Via::Udp(from) = via {
                peer.lock().paths.on_pong(&tx, from, now);
            }
        }
        Message::CallMeMaybe { endpoints } => {
            let mut outs = Vec::new();
            peer.lock()
                .paths
                .on_call_me_maybe(&endpoints, now, &mut outs);
            send_outs(shared, &peer, &outs).await;
        }
    }
}
