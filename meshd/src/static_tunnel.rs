//! `meshd tunnel`: the engine with a fixed peer list and no coordinator,
//! configured like a plain WireGuard interface. Used to measure the data
//! plane on its own, and handy for point-to-point links.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use anyhow::Context as _;
use platform::addr::IpPrefix;
use platform::keys::{NodePrivate, NodePublic};
use platform::netmap::{DnsConfig, NetMap, Node, NodeKind, RelayMap};

use crate::engine::{Engine, TunConfig, UdpPort};

/// `PUBLIC_KEY_BASE64,ENDPOINT,ALLOWED_IP[+ALLOWED_IP…]`
#[derive(Clone, Debug)]
pub struct StaticPeer {
    pub public_key: NodePublic,
    pub endpoint: Option<SocketAddr>,
    pub allowed: Vec<IpAddr>,
}

impl FromStr for StaticPeer {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let mut parts = s.splitn(3, ',');
        let key = parts.next().context("peer: missing public key")?;
        let public_key = NodePublic::from_base64(key).context("peer: public key")?;
        let endpoint = match parts.next() {
            Some("") | None => None,
            Some(e) => Some(e.parse().context("peer: endpoint must be IP:PORT")?),
        };
        let allowed = parts
            .next()
            .context("peer: missing allowed IPs")?
            .split('+')
            .map(|ip| {
                ip.parse::<IpAddr>()
                    .with_context(|| format!("peer: allowed IP {ip:?}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(StaticPeer {
            public_key,
            endpoint,
            allowed,
        })
    }
}

fn node(id: i64, key: NodePublic, addresses: Vec<IpAddr>, endpoints: Vec<SocketAddr>) -> Node {
    Node {
        id,
        name: format!("peer{id}"),
        kind: NodeKind::Wireguard,
        node_key: key,
        disco_key: None,
        addresses,
        endpoints,
        online: true,
        os: String::new(),
        home_region: None,
        capabilities: None,
        owner: None,
        key_expiry: None,
        device_key: None,
        owner_role: None,
        tags: Vec::new(),
    }
}

/// Runs until SIGTERM or Ctrl-C.
pub async fn run(
    private_key_file: &std::path::Path,
    tun: TunConfig,
    port: u16,
    address: IpPrefix,
    peers: Vec<StaticPeer>,
) -> anyhow::Result<()> {
    let text = crate::state::read_secret(private_key_file)?;
    let private = NodePrivate::from_base64(&text)
        .context("private key file must hold a base64 key (wg genkey)")?;
    let mut peer_map = std::collections::BTreeMap::new();
    for (i, p) in peers.iter().enumerate() {
        let n = node(
            i as i64 + 1,
            p.public_key,
            p.allowed.clone(),
            p.endpoint.into_iter().collect(),
        );
        peer_map.insert(p.public_key, n);
    }
    let netmap = NetMap {
        network: "static".into(),
        self_node: node(0, private.public(), vec![address.addr], vec![]),
        routes: vec![address],
        peers: peer_map,
        relay_map: RelayMap::default(),
        dns: DnsConfig::default(),
        awaiting_approval: false,
        packet_filter: platform::filter::PacketFilter::allow_all(),
        compute: Default::default(),
    };
    // Static peers are plain WireGuard: the disco key is never used.
    let engine = Engine::start(
        private,
        platform::keys::DiscoPrivate::generate(),
        &tun,
        &netmap,
        platform::unix_now(),
        std::sync::Arc::new(UdpPort::bind(port)?),
    )
    .await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    engine.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_peer_specs() {
        let key = NodePrivate::generate().public().to_base64();
        let p: StaticPeer = format!("{key},10.0.0.2:51820,100.64.3.2+fd00::2")
            .parse()
            .unwrap();
        assert_eq!(p.endpoint, Some("10.0.0.2:51820".parse().unwrap()));
        assert_eq!(p.allowed.len(), 2);
        let p: StaticPeer = format!("{key},,100.64.3.2").parse().unwrap();
        assert_eq!(p.endpoint, None);
        assert!(format!("{key},nope,100.64.3.2")
            .parse::<StaticPeer>()
            .is_err());
        assert!("short,,1.2.3.4".parse::<StaticPeer>().is_err());
    }
}
