//! Crank Mesh coordinator: the control plane. Networks, pre-auth keys,
//! device registration and address allocation, and one map stream per device
//! carrying its netmap and then deltas.
#![forbid(unsafe_code)]

pub mod api;
pub mod client;
pub mod clock;
pub mod error;
pub mod fanout;
pub mod hub;
pub mod names;
pub mod policy;
pub mod policy_cli;
pub mod remote;
pub mod store;
pub mod tls;
pub mod wgquick;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use platform::netmap::RelayMap;

/// Window over which map-stream changes are batched.
pub const BATCH_WINDOW: Duration = Duration::from_millis(50);

/// Builds the shared state of a server on the database in `state_dir`.
/// `tls` says whether clients reach it over TLS (for the links it hands out).
pub async fn app_state(
    state_dir: &Path,
    relay_map: RelayMap,
    tls: bool,
) -> anyhow::Result<api::SharedState> {
    app_state_with(state_dir, relay_map, tls, &ServeOptions::default()).await
}

/// How a server runs, beyond where and on what.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub store: store::StoreOptions,
    /// MagicDNS names are `<device>.<network>.<base_domain>`; empty: off.
    pub base_domain: String,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            store: Default::default(),
            base_domain: api::DEFAULT_BASE_DOMAIN.into(),
        }
    }
}

/// [`app_state`] with `options`.
pub async fn app_state_with(
    state_dir: &Path,
    relay_map: RelayMap,
    tls: bool,
    options: &ServeOptions,
) -> anyhow::Result<api::SharedState> {
    let store = store::Store::open_with(state_dir, &options.store).await?;
    if !store.is_initialized().await? {
        anyhow::bail!(
            "{} is not initialised: run `coordinator init --state-dir {}` first",
            state_dir.display(),
            state_dir.display()
        );
    }
    let identity = Arc::new(store.identity().await?);
    let grace = Duration::from_secs(platform::api::OFFLINE_AFTER_SECS);
    Ok(Arc::new(api::AppState {
        store,
        hub: hub::Hub::new(grace),
        clock: clock::Clock::System,
        limits: Default::default(),
        batch_window: BATCH_WINDOW,
        relay_map,
        tls,
        public_url: None,
        identity,
        policies: Default::default(),
        base_domain: options.base_domain.clone(),
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

/// How [`serve`] speaks to its clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TLS with this certificate chain and private key (PEM files).
    Tls { cert: PathBuf, key: PathBuf },
    /// Plain HTTP. Pre-auth keys and admin tokens then cross the network in
    /// the clear, so it is refused on a non-loopback address unless
    /// `insecure` says so (`--insecure-http`: behind a TLS-terminating proxy,
    /// or in a test lab).
    Http { insecure: bool },
}

/// Serves the API on `listen` until the process ends.
pub async fn serve(
    state_dir: &Path,
    listen: SocketAddr,
    relay_map: RelayMap,
    transport: Transport,
    options: &ServeOptions,
) -> anyhow::Result<()> {
    // Checked before anything is opened or bound.
    let tls = match &transport {
        Transport::Tls { cert, key } => Some(tls::server_config(cert, key)?),
        Transport::Http { insecure } => {
            anyhow::ensure!(
                *insecure || listen.ip().to_canonical().is_loopback(),
                "refusing to serve plain HTTP on {listen}: pre-auth keys and admin tokens \
                 would cross the network unencrypted; serve TLS with --tls-cert and \
                 --tls-key, listen on a loopback address behind a TLS proxy, or pass \
                 --insecure-http"
            );
            None
        }
    };
    let state = app_state_with(state_dir, relay_map, tls.is_some(), options).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    serve_on(listener, state, tls).await
}

/// Serves the API on a bound `listener`, over TLS when `tls` is given, until
/// the process ends. [`serve`] without the checks, for tests.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    state: api::SharedState,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
) -> anyhow::Result<()> {
    tokio::spawn(api::run_sweeper(state.clone()));
    let addr = listener.local_addr()?;
    tracing::info!(%addr, tls = tls.is_some(), "coordinator listening");
    let app = api::router(state).into_make_service_with_connect_info::<api::limits::PeerAddr>();
    match tls {
        Some(config) => axum::serve(tls::TlsListener::new(listener, config)?, app).await,
        None => axum::serve(listener, app).await,
    }
    .context("serving")
}
