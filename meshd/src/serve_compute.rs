//! Serving compute on this device's overlay addresses only: the OpenAI-
//! compatible API of the `compute` crate, reachable from peers through the
//! tunnel, with callers named from the netmap. The service holds the
//! owner's settings, the loaded models and the policy's latest decision.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use compute::manifest::{verified_path, ModelKind, MANIFEST};
use compute::server::{ComputeServer, Gate, Models};
use compute::{EmbedBatcher, Embedder, Generator};
use platform::capability::{Capabilities, ComputeOffer, OfferedModel, MAX_TEXT};
use platform::netmap::NetMap;
use tokio::sync::watch;

use crate::contribute::{self, ComputeSettings};
use crate::control::MapState;

/// Port of the compute API on overlay addresses.
pub const COMPUTE_PORT: u16 = 8421;
/// Context of a chat job, in tokens.
const CHAT_CONTEXT: u32 = 2048;

/// Models loaded for serving, and what they are.
pub struct Loaded {
    pub models: Models,
    pub offered: Vec<OfferedModel>,
}

/// Loads the manifest models named in `wanted` (all when empty) that are
/// present and intact in `dir`; others are skipped with a warning: a device
/// serves what it has.
pub fn load(dir: &Path, wanted: &[String]) -> anyhow::Result<Loaded> {
    for name in wanted {
        anyhow::ensure!(
            MANIFEST.iter().any(|m| m.name == name),
            "no model {name:?} in the manifest (known: {})",
            MANIFEST
                .iter()
                .map(|m| m.name)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut models = Models {
        embedder: None,
        generator: None,
    };
    let mut offered = Vec::new();
    for spec in MANIFEST
        .iter()
        .filter(|m| wanted.is_empty() || wanted.iter().any(|w| w == m.name))
    {
        let path = match verified_path(dir, spec) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(model = spec.name, error = %e, "not serving this model");
                continue;
            }
        };
        let kind = match spec.kind {
            ModelKind::Embedding => {
                let embedder = Arc::new(Embedder::load(&path)?);
                models.embedder = Some((
                    spec.name.to_owned(),
                    Arc::new(EmbedBatcher::start(embedder)?),
                ));
                "embedding"
            }
            ModelKind::Chat => {
                models.generator = Some((
                    spec.name.to_owned(),
                    Arc::new(Generator::load(&path, CHAT_CONTEXT)?),
                ));
                "chat"
            }
        };
        offered.push(OfferedModel {
            name: spec.name.to_owned(),
            kind: kind.to_owned(),
            sha256: spec.sha256.to_owned(),
        });
        tracing::info!(model = spec.name, "model loaded");
    }
    anyhow::ensure!(
        !offered.is_empty(),
        "no model to serve in {} (run `meshd models fetch`)",
        dir.display()
    );
    Ok(Loaded { models, offered })
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max.saturating_sub('…'.len_utf8());
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// The device's compute service.
pub struct ComputeService {
    models_dir: PathBuf,
    settings: Mutex<ComputeSettings>,
    loaded: Mutex<Option<Arc<Loaded>>>,
    /// Why loading failed, while no models are loaded.
    load_error: Mutex<Option<String>>,
    /// The policy's latest decision: serve, or the reason not to.
    decision: watch::Sender<Result<(), String>>,
}

impl ComputeService {
    pub fn new(models_dir: PathBuf, settings: ComputeSettings) -> Self {
        ComputeService {
            models_dir,
            settings: Mutex::new(settings),
            loaded: Mutex::new(None),
            load_error: Mutex::new(None),
            decision: watch::channel(Err("starting".into())).0,
        }
    }

    pub fn settings(&self) -> ComputeSettings {
        self.settings.lock().expect("settings lock").clone()
    }

    pub fn set_settings(&self, settings: ComputeSettings) {
        *self.settings.lock().expect("settings lock") = settings;
    }

    /// Forgets the loaded models (jobs running keep theirs until done).
    pub fn unload(&self) {
        *self.loaded.lock().expect("models lock") = None;
    }

    pub fn loaded(&self) -> Option<Arc<Loaded>> {
        self.loaded.lock().expect("models lock").clone()
    }

    /// Loads the configured models unless they are loaded already.
    pub async fn ensure_loaded(&self) -> anyhow::Result<Arc<Loaded>> {
        if let Some(l) = self.loaded() {
            return Ok(l);
        }
        let (dir, wanted) = (self.models_dir.clone(), self.settings().models);
        let result = tokio::task::spawn_blocking(move || load(&dir, &wanted)).await?;
        match result {
            Ok(l) => {
                let l = Arc::new(l);
                *self.loaded.lock().expect("models lock") = Some(l.clone());
                *self.load_error.lock().expect("models lock") = None;
                Ok(l)
            }
            Err(e) => {
                *self.load_error.lock().expect("models lock") = Some(format!("{e:#}"));
                Err(e)
            }
        }
    }

    pub fn decision(&self) -> Result<(), String> {
        self.decision.borrow().clone()
    }

    /// Applies the policy to fresh readings; returns the new decision.
    /// Serving also needs the models loaded.
    pub fn decide(&self, caps: &Capabilities, others_busy: Option<f32>) -> Result<(), String> {
        let serving = self.decision().is_ok();
        let decision =
            contribute::decide(&self.settings(), caps, others_busy, serving).and_then(|()| {
                match self.loaded() {
                    Some(_) => Ok(()),
                    None => Err(match self.load_error.lock().expect("models lock").clone() {
                        Some(e) => format!("models unavailable: {e}"),
                        None => "loading models".into(),
                    }),
                }
            });
        self.decision.send_if_modified(|d| {
            if *d == decision {
                return false;
            }
            match &decision {
                Ok(()) => tracing::info!("contributing compute"),
                Err(reason) => tracing::info!(%reason, "not contributing compute"),
            }
            *d = decision.clone();
            true
        });
        decision
    }

    /// What the API consults before every job.
    pub fn gate(&self) -> Gate {
        let rx = self.decision.subscribe();
        Arc::new(move || rx.borrow().clone())
    }

    pub fn slots(&self, caps: &Capabilities) -> usize {
        self.settings()
            .slots
            .unwrap_or_else(|| contribute::default_slots(caps.tier, caps.cpu_cores))
    }

    pub fn queue(&self) -> usize {
        self.settings().queue.unwrap_or(contribute::DEFAULT_QUEUE)
    }

    /// llama.cpp threads of one job: the policy's share of the cores,
    /// divided among the slots (the build is CPU-only).
    pub fn threads_per_job(&self, caps: &Capabilities) -> usize {
        (contribute::threads(&self.settings().policy, caps.cpu_cores) / self.slots(caps).max(1))
            .max(1)
    }

    /// The capability report's compute part: absent on devices that never
    /// enabled compute.
    pub fn offer(&self, caps: &Capabilities) -> Option<ComputeOffer> {
        let loaded = self.loaded();
        if loaded.is_none() && !self.settings().enabled {
            return None;
        }
        let decision = self.decision();
        Some(ComputeOffer {
            models: loaded.map(|l| l.offered.clone()).unwrap_or_default(),
            serving: decision.is_ok(),
            // Within what a coordinator accepts, whatever an error said.
            reason: decision.err().map(|r| truncate(r, MAX_TEXT)),
            slots: u32::try_from(self.slots(caps)).unwrap_or(u32::MAX),
            port: COMPUTE_PORT,
            busy: 0,
            queued: 0,
        })
    }
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

/// Binds `addr`, waiting a moment while a listener of the previous API
/// (restarted by `meshd compute enable`) is still being dropped.
async fn bind_soon(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let mut tries = 0;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 40 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

/// Waits for the first netmap, then serves on each overlay address until
/// `stop` turns true (requests in flight finish) or the task is dropped.
pub async fn serve(
    models: Models,
    gate: Gate,
    mut map: watch::Receiver<MapState>,
    slots: usize,
    queue: usize,
    stop: watch::Receiver<bool>,
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
    let server = ComputeServer::new(
        models,
        netmap.self_node.name.clone(),
        whois,
        gate,
        slots,
        queue,
    );
    // Dropped with this task (session stop, `compute` changes): the
    // listeners go with it.
    let mut tasks = tokio::task::JoinSet::new();
    for addr in &netmap.self_node.addresses {
        let bind = SocketAddr::new(*addr, COMPUTE_PORT);
        let listener = match bind_soon(bind).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(%bind, error = %e, "compute API not served on this address");
                continue;
            }
        };
        tracing::info!(%bind, slots, queue, "compute API listening");
        let app = server
            .router()
            .into_make_service_with_connect_info::<SocketAddr>();
        let mut stop = stop.clone();
        tasks.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        });
    }
    anyhow::ensure!(
        !tasks.is_empty(),
        "could not bind the compute API on any overlay address"
    );
    while let Some(done) = tasks.join_next().await {
        done??;
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
            capabilities: None,
            owner: None,
            key_expiry: None,
            device_key: None,
            owner_role: None,
        }
    }

    #[test]
    fn long_reasons_are_cut_to_what_a_coordinator_takes() {
        let cut = truncate("é".repeat(300), MAX_TEXT);
        assert!(cut.len() <= MAX_TEXT && cut.ends_with('…'), "{}", cut.len());
        assert_eq!(truncate("short".into(), MAX_TEXT), "short");
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
            awaiting_approval: false,
            compute: Default::default(),
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
