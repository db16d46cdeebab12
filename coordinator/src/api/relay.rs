//! What relays ask: may this node key use the relay? And what they are told:
//! which node keys were revoked (pushed, so revoked devices lose the relays
//! at once rather than when a relay's cache expires).

use std::time::Duration;

use anyhow::Context as _;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::{IntoResponse as _, Response};
use axum::Json;
use platform::api::{RevocationMessage, REVOCATION_KEEPALIVE_SECS};
use platform::keys::NodePublic;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use super::{ApiPath, Body, RelayAuth, SharedState};
use crate::error::AppError;

/// What a relay learns of an admitted node key: relays forward only between
/// keys of one network, which they tell apart by `network_id` (stable, unlike
/// the name).
#[derive(Serialize)]
pub struct Admitted {
    pub network_id: i64,
    pub network: String,
    pub name: String,
}

/// 200 (with its network) for a device that may take part now, 404 for
/// anything else:
/// unknown, removed, revoked, awaiting approval, or with an expired node key
/// (relays also hear of removals at once on the revocation stream).
pub async fn admit(
    _: RelayAuth,
    State(s): State<SharedState>,
    ApiPath(node_key): ApiPath<String>,
) -> Result<Json<Admitted>, AppError> {
    let key: NodePublic = node_key
        .parse()
        .map_err(|e| AppError::BadRequest(format!("node key: {e}")))?;
    let row = s
        .store
        .device_by_node_key(&key)
        .await?
        .filter(|row| row.is_visible(s.clock.now()))
        .ok_or_else(|| AppError::NotFound("no admitted device has this node key".into()))?;
    Ok(Json(Admitted {
        network_id: row.network_id,
        network: row.network,
        name: row.name,
    }))
}

/// Most node keys one batch question may carry (the body stays well under
/// the request body limit).
pub const MAX_ADMIT_BATCH: usize = 500;

#[derive(Deserialize)]
pub struct AdmitBatch {
    pub node_keys: Vec<String>,
}

#[derive(Serialize)]
pub struct AdmittedKey {
    pub node_key: NodePublic,
    pub network_id: i64,
}

#[derive(Serialize)]
pub struct AdmitBatchAnswer {
    /// The keys asked about that may take part now; any other is refused.
    pub admitted: Vec<AdmittedKey>,
}

/// `POST /api/v1/relay/admit`: [`admit`] for up to [`MAX_ADMIT_BATCH`] keys
/// at once. A relay that must re-check every connected client (after its
/// revocation stream was lost) asks 20 times for 10,000 clients, not 10,000.
pub async fn admit_batch(
    _: RelayAuth,
    State(s): State<SharedState>,
    Body(req): Body<AdmitBatch>,
) -> Result<Json<AdmitBatchAnswer>, AppError> {
    if req.node_keys.len() > MAX_ADMIT_BATCH {
        return Err(AppError::BadRequest(format!(
            "at most {MAX_ADMIT_BATCH} node keys per question, not {}",
            req.node_keys.len()
        )));
    }
    let keys = req
        .node_keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            k.parse::<NodePublic>()
                .map_err(|e| AppError::BadRequest(format!("node_keys[{i}]: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let now = s.clock.now();
    let mut admitted = Vec::new();
    for key in keys {
        if let Some(row) = s
            .store
            .device_by_node_key(&key)
            .await?
            .filter(|row| row.is_visible(now))
        {
            admitted.push(AdmittedKey {
                node_key: key,
                network_id: row.network_id,
            });
        }
    }
    Ok(Json(AdmitBatchAnswer { admitted }))
}

/// Longest a keepalive or revocation may take to go out before the relay is
/// presumed gone.
const REVOCATION_SEND_TIMEOUT: Duration = Duration::from_secs(REVOCATION_KEEPALIVE_SECS);

/// `GET /api/v1/relay/revocations`: a WebSocket on which the relay hears every
/// node key revoked from now on, the moment it is. It opens with `resync` (the
/// relay flushes what it cached before), and says `resync` again whenever the
/// relay fell so far behind that revocations were lost.
pub async fn revocations(
    _: RelayAuth,
    State(s): State<SharedState>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return AppError::BadRequest(format!(
                "the revocation stream is a WebSocket: {}",
                e.body_text()
            ))
            .into_response()
        }
    };
    // Subscribed before the opening `resync`, so whatever the relay's flush
    // does not cover is delivered.
    let revoked = s.hub.revocations();
    ws.on_upgrade(move |socket| async move {
        tracing::info!("relay revocation stream open");
        match push_revocations(socket, revoked).await {
            Ok(()) => tracing::info!("relay revocation stream closed"),
            Err(e) => tracing::info!(error = format!("{e:#}"), "relay revocation stream ended"),
        }
    })
}

async fn send(socket: &mut WebSocket, msg: &RevocationMessage) -> anyhow::Result<()> {
    let text = serde_json::to_string(msg)?;
    tokio::time::timeout(
        REVOCATION_SEND_TIMEOUT,
        socket.send(Message::Text(text.into())),
    )
    .await
    .context("relay not reading")??;
    Ok(())
}

async fn push_revocations(
    mut socket: WebSocket,
    mut revoked: broadcast::Receiver<NodePublic>,
) -> anyhow::Result<()> {
    send(&mut socket, &RevocationMessage::Resync).await?;
    let every = Duration::from_secs(REVOCATION_KEEPALIVE_SECS);
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    // After a slow send, one keepalive, not a burst of them.
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let msg = tokio::select! {
            r = revoked.recv() => match r {
                Ok(node_key) => RevocationMessage::Revoked { node_key },
                Err(RecvError::Lagged(missed)) => {
                    // Which keys were lost is unknown: the relay must forget all.
                    tracing::warn!(missed, "relay fell behind on revocations; asking it to resync");
                    RevocationMessage::Resync
                }
                Err(RecvError::Closed) => return Ok(()),
            },
            _ = keepalive.tick() => RevocationMessage::KeepAlive,
            incoming = socket.recv() => match incoming {
                None | Some(Ok(Message::Close(_))) => return Ok(()),
                Some(Err(e)) => return Err(e.into()),
                // Relays send nothing else; pings are answered by axum.
                Some(Ok(_)) => continue,
            },
        };
        send(&mut socket, &msg).await?;
    }
}
