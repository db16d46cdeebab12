//! When node keys stop being usable, as pure rules over unix seconds: when
//! this device renews its own key, which peers the engine still talks to,
//! and when that set next changes (so the netmap is re-applied at that
//! moment instead of every packet checking the clock).

use platform::netmap::{NetMap, Node};

/// Renewal never starts earlier than this before expiry.
pub const RENEW_LEAD_MAX_SECS: u64 = 7 * 24 * 3600;

/// When to renew a node key that expires at `expiry` and that the
/// coordinator accepted at `obtained_at`: once less than
/// min(7 days, a third of its lifetime) remains. A third keeps short test
/// lifetimes (minutes) and long ones (months) renewing well ahead of time;
/// the cap keeps a 180-day key from renewing two months early. Without
/// `obtained_at` (keys from before it was kept) the 7 days apply.
/// `None`: the key never expires.
pub fn renew_at(obtained_at: Option<u64>, expiry: Option<u64>) -> Option<u64> {
    let expiry = expiry?;
    let lead = match obtained_at {
        Some(t) => (expiry.saturating_sub(t) / 3).min(RENEW_LEAD_MAX_SECS),
        None => RENEW_LEAD_MAX_SECS,
    };
    Some(expiry.saturating_sub(lead))
}

/// The peers the engine talks to at `now`: those whose key has not expired.
/// A later upsert with a renewed key brings a peer back.
pub fn active_peers(netmap: &NetMap, now: u64) -> impl Iterator<Item = &Node> {
    netmap
        .peers
        .values()
        .filter(move |n| n.node_key != netmap.self_node.node_key && !n.key_expired(now))
}

/// The next moment after `now` at which a peer's key expires: when
/// [`active_peers`] changes next, unless the netmap changes first.
pub fn next_peer_expiry(netmap: &NetMap, now: u64) -> Option<u64> {
    netmap
        .peers
        .values()
        .filter_map(|n| n.key_expiry)
        .filter(|&t| t > now)
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use platform::keys::{NodePrivate, NodePublic};
    use platform::netmap::{DnsConfig, NodeKind, RelayMap};

    fn node(key: NodePublic, last: u8, _endpoints: &[&str]) -> Node {
        Node {
            id: i64::from(last),
            name: format!("n{last}"),
            kind: NodeKind::Mesh,
            node_key: key,
            disco_key: None,
            addresses: vec![std::net::IpAddr::from([100, 64, 0, last])],
            endpoints: vec![],
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

    fn netmap(me: &NodePrivate, peers: Vec<Node>) -> NetMap {
        NetMap {
            network: "t".into(),
            self_node: node(me.public(), 1, &[]),
            routes: vec![],
            peers: peers.into_iter().map(|n| (n.node_key, n)).collect(),
            relay_map: RelayMap::default(),
            dns: DnsConfig::default(),
            awaiting_approval: false,
            packet_filter: Default::default(),
            compute: Default::default(),
        }
    }

    const DAY: u64 = 24 * 3600;

    #[test]
    fn renewal_starts_a_third_before_expiry_at_most_seven_days() {
        let t0 = 1_000_000_000;
        // 180 days: capped at 7 days before expiry.
        assert_eq!(
            renew_at(Some(t0), Some(t0 + 180 * DAY)),
            Some(t0 + 173 * DAY)
        );
        // 9 days: a third (3 days) before.
        assert_eq!(renew_at(Some(t0), Some(t0 + 9 * DAY)), Some(t0 + 6 * DAY));
        // One hour (a test network): at 40 minutes.
        assert_eq!(renew_at(Some(t0), Some(t0 + 3600)), Some(t0 + 2400));
        // Exactly 21 days: both rules agree.
        assert_eq!(renew_at(Some(t0), Some(t0 + 21 * DAY)), Some(t0 + 14 * DAY));
    }

    #[test]
    fn renewal_without_history_or_expiry() {
        let t0 = 1_000_000_000;
        assert_eq!(renew_at(Some(t0), None), None, "never expires");
        assert_eq!(renew_at(None, None), None);
        assert_eq!(renew_at(None, Some(t0 + 30 * DAY)), Some(t0 + 23 * DAY));
        // Unknown age and a short lifetime: due at once (then the age is known).
        assert_eq!(renew_at(None, Some(t0 + DAY)), Some(t0 - 6 * DAY));
        // Already expired, or obtained after the expiry (clock trouble): due.
        assert_eq!(renew_at(Some(t0), Some(t0 - 10)), Some(t0 - 10));
        assert_eq!(renew_at(None, Some(5)), Some(0));
    }

    #[test]
    fn a_fresh_key_is_not_due_again_at_once() {
        // Renewing at the rule's moment yields a key due well in the future.
        let lifetime = 3600;
        let now = 5_000_000;
        let due = renew_at(Some(now), Some(now + lifetime)).unwrap();
        assert!(due > now + lifetime / 2);
    }

    #[test]
    fn expired_peers_are_left_out_until_renewed() {
        let me = NodePrivate::generate();
        let (a, b, c) = (
            NodePrivate::generate().public(),
            NodePrivate::generate().public(),
            NodePrivate::generate().public(),
        );
        let mut na = node(a, 2, &[]);
        na.key_expiry = Some(100);
        let mut nb = node(b, 3, &[]);
        nb.key_expiry = Some(200);
        let nc = node(c, 4, &[]); // never expires
        let mut map = netmap(&me, vec![na, nb, nc]);
        fn keys(map: &NetMap, now: u64) -> Vec<NodePublic> {
            active_peers(map, now).map(|n| n.node_key).collect()
        }

        assert_eq!(keys(&map, 99).len(), 3);
        assert_eq!(next_peer_expiry(&map, 99), Some(100));
        // At the expiry second itself the key is no longer good.
        assert!(!keys(&map, 100).contains(&a));
        assert_eq!(next_peer_expiry(&map, 100), Some(200));
        assert_eq!(keys(&map, 250), vec![c]);
        assert_eq!(next_peer_expiry(&map, 250), None);

        // An upsert with a renewed key brings the peer back.
        let mut renewed = node(a, 2, &[]);
        renewed.key_expiry = Some(1000);
        map.apply(&[platform::netmap::PeerChange::Upsert {
            node: Box::new(renewed),
        }]);
        assert!(keys(&map, 250).contains(&a));
        assert_eq!(next_peer_expiry(&map, 250), Some(1000));
    }

    #[test]
    fn this_device_is_never_its_own_peer() {
        let me = NodePrivate::generate();
        let mut map = netmap(&me, vec![]);
        // The coordinator may list this device among the peers (an upsert
        // racing a rotation); the engine must not build a tunnel to itself.
        let mut twin = node(me.public(), 9, &[]);
        twin.id = 99;
        map.peers.insert(me.public(), twin);
        assert_eq!(active_peers(&map, 0).count(), 0);
    }
}
