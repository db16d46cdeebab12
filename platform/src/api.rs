//! Control API types shared by the coordinator and its clients.
//!
//! REST bodies under `/api/v1`, and the messages of the map stream
//! (`GET /api/v1/map`, a WebSocket carrying one JSON message per frame).

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

pub use crate::capability::Capabilities;
use crate::control_auth::SignedFrame;
use crate::filter::PacketFilter;
use crate::keys::{DiscoPublic, NodePublic};
use crate::netmap::{NetMap, Node, NodeKind, PeerChange};
use crate::people::DeviceState;
use crate::signed::{Signed, Timestamped};

/// How often a device says it is alive on the map stream.
pub const HEARTBEAT_INTERVAL_SECS: u64 = 5;
/// Silence after which the coordinator marks a device offline.
pub const OFFLINE_AFTER_SECS: u64 = 20;

/// Every API error body: `{"error":{"code","message"}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: ApiErrorBody,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiErrorBody {
    /// Stable, machine-readable: `bad_request`, `unauthorized`, …
    pub code: String,
    pub message: String,
}

/// Signed by the device key (domain [`crate::signed::DOMAIN_REGISTER`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub timestamp: u64,
    pub auth_key: String,
    pub node_key: NodePublic,
    pub disco_key: DiscoPublic,
    pub hostname: String,
    pub os: String,
    pub capabilities: Capabilities,
    /// Which network, when `auth_key` is a member token and the member
    /// belongs to more than one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Proof of holding `node_key`'s private half
    /// ([`crate::control_auth::node_proof`], purpose `Register`).
    pub node_proof: String,
}

impl Timestamped for RegisterRequest {
    fn timestamp(&self) -> u64 {
        self.timestamp
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub device_id: i64,
    pub network: String,
    pub name: String,
    pub addresses: Vec<IpAddr>,
}

/// Opens a map stream; signed by the device key (domain
/// [`crate::signed::DOMAIN_MAP`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapHello {
    pub timestamp: u64,
    pub node_key: NodePublic,
    /// Regenerated at every start of the daemon: a new one tells peers to
    /// drop their sessions with the old instance.
    pub disco_key: DiscoPublic,
    /// The nonce the coordinator sent on this connection
    /// ([`ServerMessage::Challenge`]): the hello opens no other stream.
    pub nonce: String,
    /// The device takes a large full netmap in pieces
    /// ([`ServerMessage::PartialFull`] then [`ServerMessage::Peers`]);
    /// devices from before pieces existed get one [`ServerMessage::Full`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub full_in_pieces: bool,
}

impl Timestamped for MapHello {
    fn timestamp(&self) -> u64 {
        self.timestamp
    }
}

/// Device → coordinator on the map stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// First message: proves the device key ([`MapHello`] inside).
    Hello { hello: Signed },
    /// The device's direct endpoints changed.
    Endpoints { endpoints: Vec<SocketAddr> },
    /// Alive; carries the capability report when it changed.
    Heartbeat { capabilities: Option<Capabilities> },
    /// The relay region the device listens on (lowest latency).
    HomeRegion { region: u32 },
}

/// Coordinator → device on the map stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// The first message of every stream, before the hello: the nonce the
    /// hello must sign.
    Challenge {
        nonce: String,
    },
    /// Every message after the hello comes wrapped in one of these, signed
    /// by the coordinator's identity key for this stream
    /// ([`crate::control_auth::FrameVerifier`]).
    Signed {
        frame: SignedFrame,
    },
    /// Sent once, first after the hello (and again when the device must
    /// resynchronise).
    Full {
        netmap: Box<NetMap>,
    },
    /// A full netmap whose peers do not all fit in one message: the rest
    /// follow at once in `remaining` [`ServerMessage::Peers`] messages, and
    /// the netmap is whole after the last (see [`full_in_pieces`]). Sent
    /// only to devices whose hello asked for pieces.
    PartialFull {
        netmap: Box<NetMap>,
        remaining: u32,
    },
    /// More peers of the [`ServerMessage::PartialFull`] before it.
    Peers {
        peers: Vec<Node>,
    },
    Delta {
        changes: Vec<PeerChange>,
    },
    /// The device's packet filter changed (the access policy, or the
    /// devices it names, did): it replaces the netmap's.
    Filter {
        filter: PacketFilter,
    },
    /// An admin asked every device of the network to renew its node key.
    RotateKey,
    /// The stream is closing for this reason.
    Error {
        error: ApiErrorBody,
    },
}

/// Peers per message when a full netmap goes in pieces: about 50 KB of
/// JSON each, so no message (and no buffer kept for one) grows with the
/// network.
pub const PEERS_PER_PIECE: usize = 64;

/// The messages that carry `netmap` to a device that takes it in pieces:
/// one [`ServerMessage::Full`] when its peers fit in one piece, else a
/// [`ServerMessage::PartialFull`] with the first `per_piece` peers and
/// [`ServerMessage::Peers`] messages with the rest, `per_piece` each.
pub fn full_in_pieces(mut netmap: NetMap, per_piece: usize) -> Vec<ServerMessage> {
    let per_piece = per_piece.max(1);
    if netmap.peers.len() <= per_piece {
        return vec![ServerMessage::Full {
            netmap: Box::new(netmap),
        }];
    }
    let mut rest: Vec<Node> = Vec::new();
    let all = std::mem::take(&mut netmap.peers);
    for (i, (key, node)) in all.into_iter().enumerate() {
        if i < per_piece {
            netmap.peers.insert(key, node);
        } else {
            rest.push(node);
        }
    }
    let mut pieces: Vec<ServerMessage> = Vec::new();
    let mut rest = rest.into_iter().peekable();
    while rest.peek().is_some() {
        pieces.push(ServerMessage::Peers {
            peers: rest.by_ref().take(per_piece).collect(),
        });
    }
    let mut out = Vec::with_capacity(pieces.len() + 1);
    out.push(ServerMessage::PartialFull {
        netmap: Box::new(netmap),
        remaining: pieces.len() as u32,
    });
    out.extend(pieces);
    out
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateNetwork {
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub id: i64,
    pub name: String,
    pub created_at: u64,
    pub device_count: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatePreauthKey {
    #[serde(default)]
    pub reusable: bool,
    #[serde(default)]
    pub ephemeral: bool,
    /// Lifetime in seconds; none means it never expires.
    #[serde(default)]
    pub expiry_secs: Option<u64>,
    /// Tags (`tag:NAME`, declared in the policy) every device registered
    /// with the key gets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreauthKeyInfo {
    pub id: i64,
    pub network: String,
    /// The first characters of the key, to tell keys apart.
    pub prefix: String,
    pub reusable: bool,
    pub ephemeral: bool,
    pub created_at: u64,
    pub expires_at: Option<u64>,
    pub revoked: bool,
    pub used_count: i64,
}

/// Returned once, at creation: the only time the key itself is shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedPreauthKey {
    pub key: String,
    pub info: PreauthKeyInfo,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub id: i64,
    pub network: String,
    pub name: String,
    pub hostname: String,
    pub kind: NodeKind,
    pub node_key: NodePublic,
    pub addresses: Vec<IpAddr>,
    pub endpoints: Vec<SocketAddr>,
    pub os: String,
    pub ephemeral: bool,
    pub online: bool,
    pub created_at: u64,
    pub last_seen: Option<u64>,
    /// The device's latest capability report.
    #[serde(default)]
    pub capabilities: Option<Capabilities>,
    /// The user it belongs to.
    #[serde(default)]
    pub owner: Option<String>,
    pub state: DeviceState,
    /// When its node key expires (None: never).
    #[serde(default)]
    pub key_expiry: Option<u64>,
    /// Its tags (`tag:NAME`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// Registers a stock WireGuard device by its public key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateWireguardPeer {
    pub name: String,
    /// Base64, as `wg pubkey` prints it.
    pub public_key: String,
    #[serde(default)]
    pub endpoint: Option<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireguardPeerCreated {
    pub device: DeviceInfo,
    /// A wg-quick config; its `PrivateKey` line is left for the owner to fill.
    pub wg_quick_config: String,
}

/// How often the coordinator sends a keepalive on a relay's revocation stream;
/// a relay that hears nothing for three of these reconnects.
pub const REVOCATION_KEEPALIVE_SECS: u64 = 15;

/// Coordinator → relay on the revocation stream
/// (`GET /api/v1/relay/revocations`, a WebSocket carrying one JSON message per
/// frame), so relays drop revoked node keys at once instead of when their
/// admission cache expires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RevocationMessage {
    /// This node key no longer admits anyone (its device was removed or
    /// revoked, or it rotated to a new key): refuse it and disconnect it.
    Revoked { node_key: NodePublic },
    /// Revocations may have been missed (the stream just opened, or the relay
    /// fell behind): forget every cached admission.
    Resync,
    /// Nothing happened; the stream is alive.
    KeepAlive,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{DevicePrivate, DiscoPrivate, NodePrivate};
    use crate::netmap::tests::arb_netmap;
    use proptest::prelude::*;

    fn round_trip<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(v: &T) {
        let json = serde_json::to_string(v).unwrap();
        assert_eq!(&serde_json::from_str::<T>(&json).unwrap(), v, "{json}");
    }

    proptest! {
        #[test]
        fn register_request_round_trips(host in "[a-zA-Z0-9 ._-]{0,30}", ts in any::<u64>(), cores in any::<u32>()) {
            let r = RegisterRequest {
                timestamp: ts,
                auth_key: "meshkey-abc".into(),
                node_key: NodePrivate::generate().public(),
                disco_key: DiscoPrivate::generate().public(),
                hostname: host,
                os: "linux".into(),
                capabilities: Capabilities { cpu_cores: cores, arch: "x86_64".into(), ram_bytes: 1 << 30, ..Default::default() },
                network: None,
                node_proof: "00".into(),
            };
            round_trip(&r);
            let signed = Signed::sign(&DevicePrivate::generate(), crate::signed::DOMAIN_REGISTER, &r);
            round_trip(&ClientMessage::Hello { hello: signed });
        }

        #[test]
        fn a_netmap_in_pieces_is_whole_again(m in arb_netmap(), per_piece in 1usize..5) {
            let messages = full_in_pieces(m.clone(), per_piece);
            let mut it = messages.into_iter();
            let whole = match it.next().unwrap() {
                ServerMessage::Full { netmap } => {
                    prop_assert!(m.peers.len() <= per_piece);
                    prop_assert_eq!(it.next(), None);
                    *netmap
                }
                ServerMessage::PartialFull { mut netmap, remaining } => {
                    prop_assert_eq!(netmap.peers.len(), per_piece);
                    let rest: Vec<ServerMessage> = it.collect();
                    prop_assert_eq!(rest.len(), remaining as usize);
                    for piece in rest {
                        let ServerMessage::Peers { peers } = piece else {
                            return Err(TestCaseError::fail("a piece that is not peers"));
                        };
                        prop_assert!(!peers.is_empty() && peers.len() <= per_piece);
                        netmap.peers.extend(peers.into_iter().map(|n| (n.node_key, n)));
                    }
                    *netmap
                }
                other => return Err(TestCaseError::fail(format!("{other:?}"))),
            };
            prop_assert_eq!(whole, m);
        }

        #[test]
        fn server_messages_round_trip(m in arb_netmap()) {
            round_trip(&ServerMessage::Full { netmap: Box::new(m.clone()) });
            round_trip(&ServerMessage::PartialFull { netmap: Box::new(m.clone()), remaining: 3 });
            round_trip(&ServerMessage::Peers { peers: m.peers.values().cloned().collect() });
            let changes = m.peers.values().map(|n| PeerChange::Upsert { node: Box::new(n.clone()) }).collect();
            round_trip(&ServerMessage::Delta { changes });
            round_trip(&ServerMessage::RotateKey);
        }

        #[test]
        fn client_messages_round_trip(port in any::<u16>(), ip in any::<[u8; 4]>()) {
            round_trip(&ClientMessage::Endpoints { endpoints: vec![SocketAddr::from((ip, port))] });
            round_trip(&ClientMessage::Heartbeat { capabilities: None });
            round_trip(&ClientMessage::HomeRegion { region: u32::from(port) });
        }

        #[test]
        fn garbage_never_panics(s in ".{0,200}") {
            let _ = serde_json::from_str::<ClientMessage>(&s);
            let _ = serde_json::from_str::<ServerMessage>(&s);
            let _ = serde_json::from_str::<RevocationMessage>(&s);
        }

        #[test]
        fn revocation_messages_round_trip(key in any::<[u8; 32]>()) {
            round_trip(&RevocationMessage::Revoked { node_key: NodePublic::from_bytes(key) });
            round_trip(&RevocationMessage::Resync);
            round_trip(&RevocationMessage::KeepAlive);
        }
    }

    #[test]
    fn revocation_messages_have_a_stable_shape() {
        let key = NodePublic::from_bytes([7; 32]);
        let json = serde_json::to_value(RevocationMessage::Revoked { node_key: key }).unwrap();
        assert_eq!(json["type"], "revoked");
        assert_eq!(json["node_key"], key.to_string());
        assert_eq!(
            serde_json::to_string(&RevocationMessage::Resync).unwrap(),
            r#"{"type":"resync"}"#
        );
        assert_eq!(
            serde_json::to_string(&RevocationMessage::KeepAlive).unwrap(),
            r#"{"type":"keep_alive"}"#
        );
        assert!(serde_json::from_str::<RevocationMessage>(r#"{"type":"revoked"}"#).is_err());
    }

    #[test]
    fn rest_bodies_round_trip() {
        round_trip(&ApiError {
            error: ApiErrorBody {
                code: "bad_request".into(),
                message: "x".into(),
            },
        });
        round_trip(&CreatePreauthKey {
            reusable: true,
            ephemeral: false,
            expiry_secs: Some(3600),
            tags: vec!["tag:gpu".into()],
        });
        let defaults: CreatePreauthKey = serde_json::from_str("{}").unwrap();
        assert_eq!(defaults, CreatePreauthKey::default());
        round_trip(&CreateWireguardPeer {
            name: "router".into(),
            public_key: NodePrivate::generate().public().to_base64(),
            endpoint: Some("10.0.0.9:51820".parse().unwrap()),
        });
    }
}
