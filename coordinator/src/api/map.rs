//! `GET /api/v1/map`: the long-lived map stream of one device (WebSocket).
//!
//! The coordinator opens with a fresh nonce; the device answers with a hello
//! that signs it; it then gets its full netmap, then batches of peer
//! changes, each message signed by the coordinator for this stream
//! (`platform::control_auth`). Upstream it sends endpoint updates and
//! heartbeats.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::{IntoResponse as _, Response};
use platform::addr::OVERLAY_V4;
use platform::api::{ClientMessage, MapHello, ServerMessage};
use platform::control_auth::{new_nonce, CoordinatorIdentity};
use platform::netmap::{coalesce, DnsConfig, NetMap, PeerChange};
use platform::people::DeviceState;
use platform::signed::DOMAIN_MAP;
use platform::unix_now;
use tokio::sync::mpsc;

use super::register::signed_error;
use super::SharedState;
use crate::error::AppError;
use crate::fanout;
use crate::hub::Push;
use crate::store::DeviceRow;

/// How long a client has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most endpoints a device may report.
const MAX_ENDPOINTS: usize = 32;
/// Largest message accepted from a device.
const MAX_MESSAGE_BYTES: usize = 64 * 1024;

pub async fn map_stream(
    State(s): State<SharedState>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return AppError::BadRequest(format!(
                "the map stream is a WebSocket: {}",
                e.body_text()
            ))
            .into_response()
        }
    };
    ws.max_message_size(MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| async move {
            if let Err(e) = serve(s, socket).await {
                tracing::debug!(error = %e, "map stream ended");
            }
        })
}

/// One map stream's socket. Before the hello is accepted, messages go out as
/// they are (the challenge, or why the hello was refused); after it, each is
/// signed by the coordinator for this stream's nonce and its place in it.
struct Conn {
    socket: WebSocket,
    identity: Arc<CoordinatorIdentity>,
    nonce: String,
    seq: u64,
    authenticated: bool,
}

impl Conn {
    async fn send(&mut self, msg: &ServerMessage) -> anyhow::Result<()> {
        let text = serde_json::to_string(msg)?;
        let text = if self.authenticated {
            let frame = self.identity.sign_frame(&self.nonce, self.seq, text);
            self.seq += 1;
            serde_json::to_string(&ServerMessage::Signed { frame })?
        } else {
            text
        };
        self.socket.send(Message::Text(text.into())).await?;
        Ok(())
    }

    async fn refuse(&mut self, err: AppError) -> anyhow::Result<()> {
        let _ = self.send(&ServerMessage::Error { error: err.body() }).await;
        let _ = self.socket.send(Message::Close(None)).await;
        Err(anyhow::anyhow!("refused: {err}"))
    }
}

/// Sends the challenge, reads the hello and finds the device it proves.
async fn authenticate(s: &SharedState, conn: &mut Conn) -> Result<DeviceRow, AppError> {
    conn.send(&ServerMessage::Challenge {
        nonce: conn.nonce.clone(),
    })
    .await
    .map_err(|e| AppError::BadRequest(format!("sending the challenge: {e}")))?;
    let socket = &mut conn.socket;
    let first = tokio::time::timeout(HELLO_TIMEOUT, socket.recv())
        .await
        .map_err(|_| AppError::BadRequest("no hello within 10 s".into()))?;
    let text = match first {
        Some(Ok(Message::Text(t))) => t,
        _ => return Err(AppError::BadRequest("expected a text hello message".into())),
    };
    let msg: ClientMessage = serde_json::from_str(&text)
        .map_err(|e| AppError::BadRequest(format!("invalid message: {e}")))?;
    let ClientMessage::Hello { hello } = msg else {
        return Err(AppError::BadRequest(
            "the first message must be a hello".into(),
        ));
    };
    let now = unix_now();
    let payload: MapHello = hello.verify(DOMAIN_MAP, now).map_err(signed_error)?;
    if payload.nonce != conn.nonce {
        return Err(AppError::Unauthorized(
            "the hello answers another stream's challenge".into(),
        ));
    }
    let row = s
        .store
        .device_by_device_key(&hello.device_key)
        .await?
        .ok_or_else(|| AppError::Unauthorized("device is not registered".into()))?;
    if row.node_key()? != payload.node_key {
        return Err(AppError::Unauthorized(
            "node key does not match the registered one; register again".into(),
        ));
    }
    match row.state(now) {
        DeviceState::Revoked => {
            return Err(AppError::Forbidden(format!(
                "this device was revoked in network {:?}",
                row.network
            )))
        }
        DeviceState::KeyExpired => {
            return Err(AppError::Forbidden(
                "this device's node key has expired: register again with an auth key".into(),
            ))
        }
        DeviceState::Active | DeviceState::AwaitingApproval => {}
    }
    if row.disco_key.as_deref() != Some(payload.disco_key.to_string().as_str()) {
        s.store.set_disco_key(row.id, &payload.disco_key).await?;
        let row = s.store.device(&row.network, row.id).await?;
        fanout::device_changed(s, &row)?;
        return Ok(row);
    }
    Ok(row)
}

async fn full_netmap(s: &SharedState, me: &DeviceRow) -> Result<NetMap, AppError> {
    let rows = s.store.network_devices(me.network_id).await?;
    let now = unix_now();
    let mut self_node = None;
    let mut peers = BTreeMap::new();
    let awaiting_approval = !me.approved;
    for row in &rows {
        let node = row.to_node(fanout::online(s, row))?;
        if row.id == me.id {
            self_node = Some(node);
        } else if !awaiting_approval && row.is_visible(now) {
            peers.insert(node.node_key, node);
        }
    }
    let self_node = self_node.ok_or_else(|| AppError::NotFound("device was removed".into()))?;
    Ok(NetMap {
        network: me.network.clone(),
        self_node,
        routes: vec![OVERLAY_V4, s.store.ula_prefix().await?.prefix()],
        peers,
        relay_map: s.relay_map.clone(),
        dns: DnsConfig::default(),
        awaiting_approval,
        compute: s.store.compute_rules(me.network_id).await?,
    })
}

async fn serve(s: SharedState, socket: WebSocket) -> anyhow::Result<()> {
    let mut conn = Conn {
        socket,
        identity: s.identity.clone(),
        nonce: new_nonce(),
        seq: 0,
        authenticated: false,
    };
    let me = match authenticate(&s, &mut conn).await {
        Ok(row) => row,
        Err(e) => return conn.refuse(e).await,
    };
    conn.authenticated = true;
    let node_key = me.node_key()?;
    // Subscribe before reading the map, so no change falls in between.
    let mut sub = s
        .hub
        .connect(me.network_id, me.id, node_key, me.approved, Instant::now());
    let result = stream(&s, &me, &mut conn, sub.conn_id, &mut sub.changes).await;
    s.hub.disconnect(
        me.network_id,
        me.id,
        sub.conn_id,
        me.ephemeral,
        Instant::now(),
    );
    let _ = s.store.touch(me.id, unix_now()).await;
    tracing::info!(device = me.id, name = %me.name, "map stream closed");
    result
}

async fn stream(
    s: &SharedState,
    me: &DeviceRow,
    conn: &mut Conn,
    conn_id: u64,
    changes: &mut mpsc::UnboundedReceiver<Push>,
) -> anyhow::Result<()> {
    let netmap = match full_netmap(s, me).await {
        Ok(m) => m,
        Err(e) => return conn.refuse(e).await,
    };
    conn.send(&ServerMessage::Full {
        netmap: Box::new(netmap),
    })
    .await?;
    s.store.touch(me.id, unix_now()).await?;
    tracing::info!(device = me.id, name = %me.name, "map stream open");
    if s.store.rotation_due(me.id).await? {
        conn.send(&ServerMessage::RotateKey).await?;
    }
    loop {
        tokio::select! {
            incoming = conn.socket.recv() => {
                let Some(incoming) = incoming else { return Ok(()) };
                match incoming? {
                    Message::Text(text) => {
                        if let Err(e) = handle_client_message(s, me, conn_id, &text).await {
                            return conn.refuse(e).await;
                        }
                    }
                    Message::Close(_) => return Ok(()),
                    Message::Binary(_) => return conn.refuse(AppError::BadRequest("binary messages are not accepted".into())).await,
                    Message::Ping(_) | Message::Pong(_) => {}
                }
            }
            first = changes.recv() => {
                // None: a newer stream of this device replaced this one.
                let Some(first) = first else { return Ok(()) };
                let mut batch = Vec::new();
                let mut then = None;
                match first {
                    Push::Change(c) => batch.push(c),
                    other => then = Some(other),
                }
                if then.is_none() {
                    tokio::time::sleep(s.batch_window).await;
                    while let Ok(more) = changes.try_recv() {
                        match more {
                            Push::Change(c) => batch.push(c),
                            other => { then = Some(other); break; }
                        }
                    }
                }
                if !batch.is_empty() {
                    conn.send(&ServerMessage::Delta { changes: coalesce(batch) }).await?;
                }
                match then {
                    None | Some(Push::Change(_)) => {}
                    Some(Push::RotateKey) => conn.send(&ServerMessage::RotateKey).await?,
                    Some(Push::Refresh) => {
                        let row = s.store.device(&me.network, me.id).await?;
                        let netmap = full_netmap(s, &row).await?;
                        conn.send(&ServerMessage::Full { netmap: Box::new(netmap) }).await?;
                    }
                    Some(Push::Close(error)) => {
                        let _ = conn.send(&ServerMessage::Error { error }).await;
                        let _ = conn.socket.send(Message::Close(None)).await;
                        return Ok(());
                    }
                }
            }
        }
    }
}

async fn handle_client_message(
    s: &SharedState,
    me: &DeviceRow,
    conn_id: u64,
    text: &str,
) -> Result<(), AppError> {
    let msg: ClientMessage = serde_json::from_str(text)
        .map_err(|e| AppError::BadRequest(format!("invalid message: {e}")))?;
    s.hub.heard(me.network_id, me.id, conn_id, Instant::now());
    match msg {
        ClientMessage::Hello { .. } => {
            return Err(AppError::BadRequest("hello was already sent".into()))
        }
        ClientMessage::Heartbeat { capabilities: None } => {}
        ClientMessage::Heartbeat {
            capabilities: Some(caps),
        } => {
            caps.check()
                .map_err(|e| AppError::BadRequest(format!("capabilities: {e}")))?;
            let row = s.store.device(&me.network, me.id).await?;
            if row.capabilities().ok().flatten().as_ref() == Some(&caps) {
                // A new session repeating the stored report: nothing changed.
                return Ok(());
            }
            s.store.set_capabilities(me.id, &caps).await?;
            fanout::device_changed(s, &s.store.device(&me.network, me.id).await?)?;
        }
        ClientMessage::Endpoints { mut endpoints } => {
            if endpoints.len() > MAX_ENDPOINTS {
                return Err(AppError::BadRequest(format!(
                    "at most {MAX_ENDPOINTS} endpoints"
                )));
            }
            endpoints.sort();
            endpoints.dedup();
            s.store.set_endpoints(me.id, &endpoints).await?;
            // Read back: the node key may have been rotated since the hello.
            let row = s.store.device(&me.network, me.id).await?;
            if row.is_visible(unix_now()) {
                s.hub.broadcast(
                    me.network_id,
                    me.id,
                    PeerChange::Endpoints {
                        node_key: row.node_key()?,
                        endpoints,
                    },
                );
            }
        }
        ClientMessage::HomeRegion { region } => {
            if !s.relay_map.regions.iter().any(|r| r.id == region) {
                return Err(AppError::BadRequest(format!("no relay region {region}")));
            }
            s.store.set_home_region(me.id, region).await?;
            fanout::device_changed(s, &s.store.device(&me.network, me.id).await?)?;
        }
    }
    Ok(())
}
