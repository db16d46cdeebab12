//! The coordinator client: registration, and the map stream that keeps the
//! engine's peers current (full netmap, then deltas; heartbeats and endpoint
//! updates upstream; reconnects with backoff).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::{SinkExt as _, StreamExt as _};
use platform::api::{
    ApiError, Capabilities, ClientMessage, MapHello, RegisterRequest, RegisterResponse,
    ServerMessage, HEARTBEAT_INTERVAL_SECS,
};
use platform::netmap::NetMap;
use platform::signed::{Signed, DOMAIN_MAP, DOMAIN_REGISTER};
use platform::unix_now;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::endpoints::local_endpoints;
use crate::engine::EngineSlot;
use crate::netcheck;
use crate::state::Keys;

/// How often local addresses are checked for changes.
const ENDPOINT_CHECK: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long an endpoint check waits for STUN answers.
const STUN_WAIT: Duration = Duration::from_millis(500);

fn base_url(coordinator: &str) -> String {
    coordinator.trim_end_matches('/').to_owned()
}

/// Registers this device with the coordinator.
pub async fn register(
    coordinator: &str,
    keys: &Keys,
    auth_key: &str,
    hostname: &str,
    capabilities: Capabilities,
) -> anyhow::Result<RegisterResponse> {
    let req = RegisterRequest {
        timestamp: unix_now(),
        auth_key: auth_key.to_owned(),
        node_key: keys.node.public(),
        disco_key: keys.disco.public(),
        hostname: hostname.to_owned(),
        os: std::env::consts::OS.to_owned(),
        capabilities,
    };
    let body = Signed::sign(&keys.device, DOMAIN_REGISTER, &req);
    let url = format!("{}/api/v1/register", base_url(coordinator));
    let resp = reqwest::Client::new()
        .post(&url)
        .json(&body)
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .with_context(|| format!("reaching the coordinator at {url}"))?;
    let status = resp.status();
    if status.is_success() {
        return resp.json().await.context("reading the registration reply");
    }
    let text = resp.text().await.unwrap_or_default();
    match serde_json::from_str::<ApiError>(&text) {
        Ok(e) => anyhow::bail!(
            "coordinator refused registration ({status}): {}",
            e.error.message
        ),
        Err(_) => anyhow::bail!("coordinator refused registration ({status}): {text}"),
    }
}

/// What the map stream shares with the daemon.
#[derive(Default)]
pub struct MapState {
    pub netmap: Option<NetMap>,
    pub connected: bool,
    /// Why the last session ended, if it failed.
    pub last_error: Option<String>,
}

/// Keeps a map stream open for as long as the task lives.
pub async fn run_map_stream(
    coordinator: String,
    keys: Arc<Keys>,
    engine: Arc<EngineSlot>,
    state: watch::Sender<MapState>,
    mut caps: watch::Receiver<Capabilities>,
) {
    let mut backoff = Duration::from_millis(500);
    loop {
        match map_session(&coordinator, &keys, &engine, &state, &mut caps).await {
            Ok(()) => backoff = Duration::from_millis(500),
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::warn!(error = %msg, "map stream");
                state.send_modify(|s| s.last_error = Some(msg));
            }
        }
        state.send_modify(|s| s.connected = false);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn map_session(
    coordinator: &str,
    keys: &Keys,
    engine: &EngineSlot,
    state: &watch::Sender<MapState>,
    caps: &mut watch::Receiver<Capabilities>,
) -> anyhow::Result<()> {
    let url = format!(
        "{}/api/v1/map",
        base_url(coordinator).replacen("http", "ws", 1)
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let hello = Signed::sign(
        &keys.device,
        DOMAIN_MAP,
        &MapHello {
            timestamp: unix_now(),
            node_key: keys.node.public(),
            disco_key: keys.disco.public(),
        },
    );
    send(&mut ws, &ClientMessage::Hello { hello }).await?;

    let mut netmap: Option<NetMap> = None;
    let mut reported: Vec<SocketAddr> = Vec::new();
    let mut heartbeat = tokio::time::interval(Duration::from_secs(HEARTBEAT_INTERVAL_SECS));
    let mut caps_sent = false;
    let mut endpoint_check = tokio::time::interval(ENDPOINT_CHECK);
    loop {
        tokio::select! {
            msg = ws.next() => {
                let Some(msg) = msg else { return Ok(()) };
                let text = match msg? {
                    Message::Text(t) => t,
                    Message::Close(_) => return Ok(()),
                    _ => continue,
                };
                let msg: ServerMessage = serde_json::from_str(&text).context("coordinator sent an invalid message")?;
                match msg {
                    ServerMessage::Full { netmap: full } => {
                        tracing::info!(peers = full.peers.len(), network = %full.network, "netmap received");
                        netmap = Some(*full);
                    }
                    ServerMessage::Delta { changes } => {
                        let Some(map) = netmap.as_mut() else { anyhow::bail!("delta before the full netmap") };
                        tracing::debug!(changes = changes.len(), "netmap delta");
                        map.apply(&changes);
                    }
                    ServerMessage::Error { error } => anyhow::bail!("coordinator closed the stream: {}", error.message),
                }
                if let Some(map) = &netmap {
                    let fresh = engine.get().is_none();
                    engine.apply(map).await?;
                    state.send_modify(|s| { s.netmap = Some(map.clone()); s.connected = true; s.last_error = None; });
                    if fresh {
                        // Report endpoints as soon as there is a socket.
                        endpoint_check.reset_immediately();
                    }
                }
            }
            // Every heartbeat of a new session carries the report once;
            // after that only changes do, as soon as they happen.
            _ = heartbeat.tick() => {
                let report = (!caps_sent).then(|| caps.borrow_and_update().clone());
                caps_sent = true;
                send(&mut ws, &ClientMessage::Heartbeat { capabilities: report }).await?;
            }
            Ok(()) = caps.changed(), if caps_sent => {
                let report = caps.borrow_and_update().clone();
                send(&mut ws, &ClientMessage::Heartbeat { capabilities: Some(report) }).await?;
            }
            _ = endpoint_check.tick() => {
                let (Some(map), Some(e)) = (&netmap, engine.get()) else { continue };
                if e.home_region().is_none() && !map.relay_map.regions.is_empty() {
                    let latencies = netcheck::relay_latencies(&map.relay_map).await;
                    if let Some(region) = netcheck::pick_home(&latencies) {
                        tracing::info!(region, "home relay region chosen");
                        e.set_home_region(region);
                        send(&mut ws, &ClientMessage::HomeRegion { region }).await?;
                    }
                }
                let stun = netcheck::stun_servers(&map.relay_map).await;
                if !stun.is_empty() {
                    // Short wait: the answers usually take a round trip.
                    e.stun_report(&stun, STUN_WAIT).await;
                    if e.public_endpoint().is_none() {
                        endpoint_check.reset_after(Duration::from_secs(1));
                    }
                }
                let mut now = local_endpoints(e.udp_port(), &map.routes, e.tun_name());
                if let Some(public) = e.public_endpoint() {
                    now.push(public);
                    now.sort();
                    now.dedup();
                }
                e.set_own_endpoints(now.clone());
                if now != reported {
                    tracing::debug!(endpoints = ?now, "reporting endpoints");
                    send(&mut ws, &ClientMessage::Endpoints { endpoints: now.clone() }).await?;
                    reported = now;
                }
            }
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn send(ws: &mut Ws, msg: &ClientMessage) -> anyhow::Result<()> {
    ws.send(Message::text(serde_json::to_string(msg)?))
        .await
        .context("writing to the map stream")
}
