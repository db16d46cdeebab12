//! wg-quick configuration for a stock WireGuard device in a network.

use std::fmt::Write as _;
use std::net::IpAddr;

use platform::netmap::Node;

/// The placeholder the owner replaces with the device's private key: the
/// coordinator never holds it.
pub const PRIVATE_KEY_PLACEHOLDER: &str = "<private key of this device>";

/// Keepalive so that peers behind NAT can reach the device.
const KEEPALIVE_SECS: u16 = 25;

fn host_prefix(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

fn join_hosts(addrs: &[IpAddr]) -> String {
    addrs.iter().map(host_prefix).collect::<Vec<_>>().join(", ")
}

/// Renders the config of `device`, with one `[Peer]` per other node.
pub fn render(network: &str, device: &Node, listen_port: Option<u16>, peers: &[Node]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Crank Mesh network {network:?}, device {:?}",
        device.name
    );
    let _ = writeln!(out, "[Interface]");
    let _ = writeln!(out, "PrivateKey = {PRIVATE_KEY_PLACEHOLDER}");
    let _ = writeln!(out, "Address = {}", join_hosts(&device.addresses));
    if let Some(port) = listen_port {
        let _ = writeln!(out, "ListenPort = {port}");
    }
    for peer in peers.iter().filter(|p| p.node_key != device.node_key) {
        let _ = writeln!(out);
        let _ = writeln!(out, "# {}", peer.name);
        let _ = writeln!(out, "[Peer]");
        let _ = writeln!(out, "PublicKey = {}", peer.node_key.to_base64());
        let _ = writeln!(out, "AllowedIPs = {}", join_hosts(&peer.addresses));
        if let Some(ep) = peer.endpoints.first() {
            let _ = writeln!(out, "Endpoint = {ep}");
        }
        let _ = writeln!(out, "PersistentKeepalive = {KEEPALIVE_SECS}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use platform::keys::NodePublic;
    use platform::netmap::NodeKind;

    fn node(b: u8, name: &str, endpoint: Option<&str>) -> Node {
        Node {
            id: i64::from(b),
            name: name.into(),
            kind: NodeKind::Mesh,
            node_key: NodePublic::from_bytes([b; 32]),
            disco_key: None,
            addresses: vec![
                format!("100.64.0.{b}").parse().unwrap(),
                format!("fd00::{b}").parse().unwrap(),
            ],
            endpoints: endpoint.into_iter().map(|e| e.parse().unwrap()).collect(),
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

    #[test]
    fn renders_interface_and_peers() {
        let me = node(9, "router", None);
        let peers = [
            node(1, "alpha", Some("10.0.0.1:41641")),
            node(2, "beta", None),
            me.clone(),
        ];
        let cfg = render("home", &me, Some(51820), &peers);
        assert!(
            cfg.contains("Address = 100.64.0.9/32, fd00::9/128\n"),
            "{cfg}"
        );
        assert!(cfg.contains("ListenPort = 51820\n"));
        assert_eq!(cfg.matches("[Peer]").count(), 2, "no peer entry for itself");
        assert!(cfg.contains(&format!(
            "PublicKey = {}\n",
            NodePublic::from_bytes([1; 32]).to_base64()
        )));
        assert!(
            cfg.contains("AllowedIPs = 100.64.0.1/32, fd00::1/128\nEndpoint = 10.0.0.1:41641\n")
        );
        let beta = cfg.split("# beta").nth(1).unwrap();
        assert!(!beta.contains("Endpoint"), "no endpoint known for beta");
    }
}
