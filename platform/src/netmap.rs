//! The network map a device works from, and the deltas that keep it current.
//!
//! The coordinator sends a full [`NetMap`] once per map stream, then only
//! [`PeerChange`]s. [`NetMap::apply`] folds changes in; [`NetMap::diff`] is its
//! inverse (`a.apply(a.diff(b)) == b`), and [`coalesce`] shrinks a batch
//! without changing what applying it does.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::addr::IpPrefix;
use crate::capability::Capabilities;
use crate::filter::PacketFilter;
use crate::jobs::ComputeRules;
use crate::keys::{DevicePublic, DiscoPublic, NodePublic};
use crate::people::Role;

/// What kind of device a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    /// Runs `meshd`.
    Mesh,
    /// A stock WireGuard device registered by an admin.
    Wireguard,
}

/// One device of the network, as its peers see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: i64,
    /// DNS-safe, unique within the network.
    pub name: String,
    pub kind: NodeKind,
    pub node_key: NodePublic,
    /// Absent for stock WireGuard devices.
    pub disco_key: Option<DiscoPublic>,
    /// Overlay addresses (IPv4 first, then IPv6).
    pub addresses: Vec<IpAddr>,
    /// Where its WireGuard socket may be reached directly.
    pub endpoints: Vec<SocketAddr>,
    pub online: bool,
    pub os: String,
    /// Relay region where the device can be reached when no direct path works.
    #[serde(default)]
    pub home_region: Option<u32>,
    /// Its latest capability report (tier, power, models on offer).
    /// (Boxed: most changes to a node do not touch it.)
    #[serde(default)]
    pub capabilities: Option<Box<Capabilities>>,
    /// The user the device belongs to (absent for stock WireGuard devices
    /// added by an admin before owners existed).
    #[serde(default)]
    pub owner: Option<String>,
    /// Unix time at which its node key expires; peers stop talking to it
    /// then. None: never.
    #[serde(default)]
    pub key_expiry: Option<u64>,
    /// The device's Ed25519 key: it signs job tickets and receipts.
    #[serde(default)]
    pub device_key: Option<DevicePublic>,
    /// The owner's role in the network.
    #[serde(default)]
    pub owner_role: Option<Role>,
    /// Tags an admin (or the key it joined with) gave the device; the
    /// access policy names devices by them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

impl Node {
    /// Whether the node key has expired at `now_unix`.
    pub fn key_expired(&self, now_unix: u64) -> bool {
        self.key_expiry.is_some_and(|t| t <= now_unix)
    }
}

/// Relays by region; delivered empty until relays are configured.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayMap {
    pub regions: Vec<RelayRegion>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayRegion {
    pub id: u32,
    pub code: String,
    /// Relay endpoints, `http://host:port/derp`; several relays of one
    /// region are alternatives.
    pub urls: Vec<String>,
    /// STUN servers of the region, `host:port`.
    #[serde(default)]
    pub stun: Vec<String>,
    /// For `https` relays with private certificates: the CA (PEM) they
    /// chain to, trusted beside the public roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
}

/// Name resolution settings for MagicDNS.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DnsConfig {
    /// The coordinator's base domain: names are
    /// `<device>.<network>.<suffix>`. Empty: MagicDNS is off.
    pub suffix: String,
    /// Resolvers for every name outside the mesh; empty: the ones the
    /// device's system had before.
    pub nameservers: Vec<IpAddr>,
    /// Names an admin added (relative to `<network>.<suffix>`, or absolute
    /// with a trailing dot).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_records: Vec<DnsRecord>,
    /// Split DNS: names under each domain go to these resolvers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub split: BTreeMap<String, Vec<SocketAddr>>,
}

impl DnsConfig {
    /// The zone of a network's names (`<network>.<suffix>`), if MagicDNS is on.
    pub fn zone(&self, network: &str) -> Option<String> {
        (!self.suffix.is_empty()).then(|| format!("{network}.{}", self.suffix))
    }
}

/// A DNS label as hosts use them: 1 to 63 letters, digits and hyphens,
/// not starting or ending with a hyphen.
pub fn is_dns_label(label: &str) -> bool {
    (1..=63).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// A DNS name of such labels, at most 253 characters, with or without one
/// trailing dot.
pub fn is_dns_name(name: &str) -> bool {
    let body = name.strip_suffix('.').unwrap_or(name);
    !body.is_empty() && body.len() <= 253 && body.split('.').all(is_dns_label)
}

/// An admin-set DNS record: a name and the address it resolves to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsRecord {
    pub name: String,
    pub address: IpAddr,
}

/// Everything a device needs to take part in its network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetMap {
    pub network: String,
    pub self_node: Node,
    /// Routes for the overlay: the IPv4 /10 and the network's ULA /48.
    pub routes: Vec<IpPrefix>,
    pub peers: BTreeMap<NodePublic, Node>,
    pub relay_map: RelayMap,
    pub dns: DnsConfig,
    /// The network requires an admin to approve this device, and none has
    /// yet: it has no peers until then.
    #[serde(default)]
    pub awaiting_approval: bool,
    /// Who may run what, credit rates and scheduler weights.
    #[serde(default)]
    pub compute: ComputeRules,
    /// What this device accepts from its peers (the network's access
    /// policy, reduced to this device). Absent: nothing.
    #[serde(default)]
    pub packet_filter: PacketFilter,
}

/// One change to a device's view of its peers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PeerChange {
    /// A peer appeared, or its record changed as a whole (re-registration).
    Upsert {
        node: Box<Node>,
    },
    Removed {
        node_key: NodePublic,
    },
    Endpoints {
        node_key: NodePublic,
        endpoints: Vec<SocketAddr>,
    },
    Online {
        node_key: NodePublic,
        online: bool,
    },
}

impl PeerChange {
    pub fn node_key(&self) -> NodePublic {
        match self {
            PeerChange::Upsert { node } => node.node_key,
            PeerChange::Removed { node_key }
            | PeerChange::Endpoints { node_key, .. }
            | PeerChange::Online { node_key, .. } => *node_key,
        }
    }
}

impl NetMap {
    /// The node (this device or a peer) holding overlay address `ip`.
    pub fn node_by_address(&self, ip: IpAddr) -> Option<&Node> {
        std::iter::once(&self.self_node)
            .chain(self.peers.values())
            .find(|n| n.addresses.contains(&ip))
    }

    /// Applies changes in order. Changes about unknown peers (other than
    /// upserts) are ignored: the peer was removed in the meantime.
    pub fn apply(&mut self, changes: &[PeerChange]) {
        for change in changes {
            match change {
                PeerChange::Upsert { node } => {
                    if node.node_key == self.self_node.node_key {
                        self.self_node = (**node).clone();
                    } else {
                        self.peers.insert(node.node_key, (**node).clone());
                    }
                }
                PeerChange::Removed { node_key } => {
                    self.peers.remove(node_key);
                }
                PeerChange::Endpoints {
                    node_key,
                    endpoints,
                } => {
                    if let Some(p) = self.peers.get_mut(node_key) {
                        p.endpoints.clone_from(endpoints);
                    }
                }
                PeerChange::Online { node_key, online } => {
                    if let Some(p) = self.peers.get_mut(node_key) {
                        p.online = *online;
                    }
                }
            }
        }
    }

    /// The changes that turn this map's peers into `other`'s.
    pub fn diff(&self, other: &NetMap) -> Vec<PeerChange> {
        let mut out = Vec::new();
        for key in self.peers.keys() {
            if !other.peers.contains_key(key) {
                out.push(PeerChange::Removed { node_key: *key });
            }
        }
        for (key, new) in &other.peers {
            match self.peers.get(key) {
                None => out.push(PeerChange::Upsert {
                    node: Box::new(new.clone()),
                }),
                Some(old) if old == new => {}
                Some(old) => {
                    let mut only_soft = old.clone();
                    only_soft.endpoints.clone_from(&new.endpoints);
                    only_soft.online = new.online;
                    if only_soft != *new {
                        out.push(PeerChange::Upsert {
                            node: Box::new(new.clone()),
                        });
                        continue;
                    }
                    if old.endpoints != new.endpoints {
                        out.push(PeerChange::Endpoints {
                            node_key: *key,
                            endpoints: new.endpoints.clone(),
                        });
                    }
                    if old.online != new.online {
                        out.push(PeerChange::Online {
                            node_key: *key,
                            online: new.online,
                        });
                    }
                }
            }
        }
        out
    }
}

/// Drops changes that a later change in the same batch makes moot, keeping
/// the order of the rest. Applying the result equals applying the input.
pub fn coalesce(changes: Vec<PeerChange>) -> Vec<PeerChange> {
    // Walk backwards, remembering per key what later changes already settle.
    #[derive(Default, Clone, Copy)]
    struct Settled {
        everything: bool,
        endpoints: bool,
        online: bool,
    }
    let mut settled: BTreeMap<NodePublic, Settled> = BTreeMap::new();
    let mut keep = Vec::with_capacity(changes.len());
    for change in changes.into_iter().rev() {
        let s = settled.entry(change.node_key()).or_default();
        let moot = s.everything
            || matches!(change, PeerChange::Endpoints { .. }) && s.endpoints
            || matches!(change, PeerChange::Online { .. }) && s.online;
        if moot {
            continue;
        }
        match &change {
            PeerChange::Upsert { .. } | PeerChange::Removed { .. } => s.everything = true,
            PeerChange::Endpoints { .. } => s.endpoints = true,
            PeerChange::Online { .. } => s.online = true,
        }
        keep.push(change);
    }
    keep.reverse();
    keep
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::keys::NodePublic;
    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, SocketAddrV4};

    pub(crate) fn arb_node(key: u8) -> impl Strategy<Value = Node> {
        (
            any::<i64>(),
            "[a-z][a-z0-9-]{0,12}",
            any::<bool>(),
            vec((any::<u32>(), any::<u16>()), 0..3),
            any::<bool>(),
            any::<[u8; 4]>(),
        )
            .prop_map(move |(id, name, wg, eps, online, v4)| Node {
                id,
                name,
                kind: if wg {
                    NodeKind::Wireguard
                } else {
                    NodeKind::Mesh
                },
                node_key: NodePublic::from_bytes([key; 32]),
                disco_key: (!wg).then(|| crate::keys::DiscoPublic::from_bytes([key ^ 0xff; 32])),
                addresses: vec![IpAddr::V4(Ipv4Addr::from(v4))],
                endpoints: eps
                    .into_iter()
                    .map(|(ip, port)| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
                    .collect(),
                online,
                os: "linux".into(),
                home_region: None,
                capabilities: None,
                owner: None,
                key_expiry: None,
                device_key: None,
                owner_role: None,
                tags: Vec::new(),
            })
    }

    fn arb_peers() -> impl Strategy<Value = BTreeMap<NodePublic, Node>> {
        btree_map(1u8..12, any::<u8>(), 0..8).prop_flat_map(|keys| {
            let nodes: Vec<_> = keys.keys().map(|k| arb_node(*k)).collect();
            nodes.prop_map(|ns| ns.into_iter().map(|n| (n.node_key, n)).collect())
        })
    }

    pub(crate) fn arb_netmap() -> impl Strategy<Value = NetMap> {
        (arb_node(0), arb_peers()).prop_map(|(self_node, peers)| NetMap {
            network: "home".into(),
            self_node,
            routes: vec![crate::addr::OVERLAY_V4],
            peers,
            relay_map: RelayMap::default(),
            dns: DnsConfig::default(),
            awaiting_approval: false,
            compute: Default::default(),
            packet_filter: Default::default(),
        })
    }

    fn arb_change() -> impl Strategy<Value = PeerChange> {
        (1u8..6, 0u8..4, arb_node(1), any::<bool>(), any::<u16>()).prop_map(
            |(k, kind, mut node, online, port)| {
                let node_key = NodePublic::from_bytes([k; 32]);
                node.node_key = node_key;
                match kind {
                    0 => PeerChange::Upsert {
                        node: Box::new(node),
                    },
                    1 => PeerChange::Removed { node_key },
                    2 => PeerChange::Endpoints {
                        node_key,
                        endpoints: vec![SocketAddr::from(([10, 0, 0, k], port))],
                    },
                    _ => PeerChange::Online { node_key, online },
                }
            },
        )
    }

    proptest! {
        #[test]
        fn diff_then_apply_reaches_target(a in arb_netmap(), b in arb_netmap()) {
            let mut b = b;
            b.self_node = a.self_node.clone();
            let mut patched = a.clone();
            patched.apply(&a.diff(&b));
            prop_assert_eq!(patched, b);
        }

        #[test]
        fn coalesce_preserves_meaning(a in arb_netmap(), changes in vec(arb_change(), 0..30)) {
            let mut full = a.clone();
            full.apply(&changes);
            let short = coalesce(changes.clone());
            prop_assert!(short.len() <= changes.len());
            let mut folded = a;
            folded.apply(&short);
            prop_assert_eq!(folded, full);
        }

        #[test]
        fn netmap_json_round_trips(m in arb_netmap()) {
            let json = serde_json::to_string(&m).unwrap();
            prop_assert_eq!(serde_json::from_str::<NetMap>(&json).unwrap(), m);
        }

        #[test]
        fn change_json_round_trips(c in arb_change()) {
            let json = serde_json::to_string(&c).unwrap();
            prop_assert_eq!(serde_json::from_str::<PeerChange>(&json).unwrap(), c);
        }
    }

    #[test]
    fn dns_names_are_checked_label_by_label() {
        assert!(is_dns_name("beta.home.crank.internal"));
        assert!(is_dns_name("corp.example."));
        assert!(is_dns_name("x-1"));
        for bad in [
            "", ".", "a..b", "a..", "-a.b", "a-.b", "a b", "a\nb", "_srv.x",
        ] {
            assert!(!is_dns_name(bad), "{bad:?}");
        }
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(is_dns_name(&["a"; 127].join(".")), "253 characters");
        assert!(!is_dns_name(&["a"; 128].join(".")), "over 253 characters");
    }

    #[test]
    fn coalesce_keeps_last_endpoint_update() {
        let k = NodePublic::from_bytes([3; 32]);
        let e = |p| PeerChange::Endpoints {
            node_key: k,
            endpoints: vec![SocketAddr::from(([1, 1, 1, 1], p))],
        };
        let out = coalesce(vec![
            e(1),
            PeerChange::Online {
                node_key: k,
                online: true,
            },
            e(2),
        ]);
        assert_eq!(
            out,
            vec![
                PeerChange::Online {
                    node_key: k,
                    online: true
                },
                e(2)
            ]
        );
    }
}
