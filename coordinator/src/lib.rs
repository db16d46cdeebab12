//! Crank Mesh coordinator: the control plane. Networks, pre-auth keys,
//! device registration and address allocation, and one map stream per device
//! carrying its netmap and then deltas.
#![forbid(unsafe_code)]

pub mod api;
pub mod error;
pub mod hub;
pub mod names;
pub mod store;
pub mod wgquick;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use platform::netmap::RelayMap;

/// Window over which map-stream changes are batched.
pub const BATCH_WINDOW: Duration = Duration::from_millis(50);

/// Builds the shared state of a server on the database in `state_dir`.
pub async fn app_state(state_dir: &Path, relay_map: RelayMap) -> anyhow::Result<api::SharedState> {
    let store = store::Store::open(state_dir).await?;
    if !store.is_initialized().await? {
        anyhow::bail!(
            "{} is not initialised: run `coordinator init --state-dir {}` first",
            state_dir.display(),
            state_dir.display()
        );
    }
    let grace = Duration::from_secs(platform::api::OFFLINE_AFTER_SECS);
    Ok(Arc::new(api::AppState {
        store,
        hub: hub::Hub::new(grace),
        batch_window: BATCH_WINDOW,
        relay_map,
    }))
}

/// Reads a relay map (JSON, the `RelayMap` shape) from `path`.
pub fn load_relay_map(path: &Path) -> anyhow::Result<RelayMap> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let map: RelayMap =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let mut ids: Vec<u32> = map.regions.iter().map(|r| r.id).collect();
    ids.sort_unstable();
    ids.dedup();
    anyhow::ensure!(
        ids.len() == map.regions.len(),
        "relay region ids must be unique"
    );
    anyhow::ensure!(
        map.regions.iter().all(|r| !r.urls.is_empty()),
        "every relay region needs a URL"
    );
    Ok(map)
}

/// Serves the API on `listen` until the process ends.
pub async fn serve(
    state_dir: &Path,
    listen: SocketAddr,
    relay_map: RelayMap,
) -> anyhow::Result<()> {
    let state = app_state(state_dir, relay_map).await?;
    tokio::spawn(api::run_sweeper(state.clone()));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    tracing::info!(addr = %listener.local_addr()?, "coordinator listening");
    axum::serve(listener, api::router(state))
        .await
        .context("serving")
}
