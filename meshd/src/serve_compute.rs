//! Serving compute on this device's overlay addresses only: the OpenAI-
//! compatible API of the `compute` crate, reachable from peers through the
//! tunnel, with callers named from the netmap.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use compute::manifest::{verified_path, ModelKind, MANIFEST};
use compute::server::{ComputeServer, Models};
use compute::{EmbedBatcher, Embedder, Generator};
use platform::netmap::NetMap;
use tokio::sync::watch;

use crate::control::MapState;

/// Port of the compute API on overlay addresses.
pub const COMPUTE_PORT: u16 = 8421;
/// Context of a chat job, in tokens.
const CHAT_CONTEXT: u32 = 2048;

/// Loads every manifest model present and intact in `dir` (others are
/// skipped with a warning: a device serves what it has).
pub fn load(dir: &Path) -> anyhow::Result<Models> {
    let mut loaded = Models {
        embedder: None,
        generator: None,
    };
    for spec in &MANIFEST {
        let path = match verified_path(dir, spec) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(model = spec.name, error = %e, "not serving this model");
                continue;
            }
        };
        match spec.kind {
            ModelKind::Embedding => {
                let embedder = Arc::new(Embedder::load(&path)?);
                loaded.embedder = Some((
                    spec.name.to_owned(),
                    Arc::new(EmbedBatcher::start(embedder)?),
                ));
            }
            ModelKind::Chat => {
                loaded.generator = Some((
                    spec.name.to_owned(),
                    Arc::new(Generator::load(&path, CHAT_CONTEXT)?),
                ))
            }
        }
        tracing::info!(model = spec.name, "model loaded");
    }
    anyhow::ensure!(
        loaded.embedder.is_some() || loaded.generator.is_some(),
        "no model to serve in {} (run `meshd models fetch`)",
        dir.display()
    );
    Ok(loaded)
}

/// The name of the device holding overlay address `ip`.
fn whois(netmap: &NetMap, ip: IpAddr) -> Option<String> {
    if netmap.self_node.addresses.contains(&ip) {
        return Some(netmap.self_node.name.clone());
    }
    netmap
        .peers
        .values()
        .find(|p| p.addresses.contains(&ip))
        .map(|p| p.name.clone())
}

/// Waits for the first netmap, then serves on each overlay address until
/// the task is dropped.
pub async fn serve(
    models: Models,
    mut map: watch::Receiver<MapState>,
    slots: usize,
    queue: usize,
) -> anyhow::Result<()> {
    let netmap = map
        .wait_for(|m| m.netmap.is_some())
        .await
        .context("session ended")?
        .netmap
        .clone()
        .context("netmap")?;
    let lookup = map.clone();
    let whois =
        Arc::new(move |ip: IpAddr| lookup.borrow().netmap.as_ref().and_then(|n| whois(n, ip)));
    let server = ComputeServer::new(models, netmap.self_node.name.clone(), whois, slots, queue);
    let mut tasks = Vec::new();
    for addr in &netmap.self_node.addresses {
        let bind = SocketAddr::new(*addr, COMPUTE_PORT);
        let listener = match tokio::net::TcpListener::bind(bind).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(%bind, error = %e, "compute API not served on this address");
                continue;
            }
        };
        tracing::info!(%bind, "compute API listening");
        let app = server
            .router()
            .into_make_service_with_connect_info::<SocketAddr>();
        tasks.push(tokio::spawn(
            async move { axum::serve(listener, app).await },
        ));
    }
    anyhow::ensure!(
        !tasks.is_empty(),
        "could not bind the compute API on any overlay address"
    );
    for t in tasks {
        t.await??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use platform::keys::NodePublic;
    use platform::netmap::{DnsConfig, Node, NodeKind, RelayMap};

    fn node(b: u8, name: &str) -> Node {
        Node {
            id: i64::from(b),
            name: name.into(),
            kind: NodeKind::Mesh,
            node_key: NodePublic::from_bytes([b; 32]),
            disco_key: None,
            addresses: vec![IpAddr::from([100, 64, 0, b])],
            endpoints: vec![],
            online: true,
            os: "linux".into(),
            home_region: None,
        }
    }

    #[test]
    fn callers_are_named_from_the_netmap() {
        let peer = node(2, "alpha");
        let map = NetMap {
            network: "n".into(),
            self_node: node(1, "beta"),
            routes: vec![],
            peers: [(peer.node_key, peer)].into_iter().collect(),
            relay_map: RelayMap::default(),
            dns: DnsConfig::default(),
        };
        assert_eq!(
            whois(&map, IpAddr::from([100, 64, 0, 2])).as_deref(),
            Some("alpha")
        );
        assert_eq!(
            whois(&map, IpAddr::from([100, 64, 0, 1])).as_deref(),
            Some("beta")
        );
        assert_eq!(whois(&map, IpAddr::from([10, 0, 0, 9])), None);
    }
}
