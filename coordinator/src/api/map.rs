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
use platform::api::{full_in_pieces, ClientMessage, MapHello, ServerMessage, PEERS_PER_PIECE};
use platform::control_auth::{new_nonce, CoordinatorIdentity};
use platform::netmap::{coalesce, DnsConfig, NetMap, PeerChange};
use platform::people::DeviceState;
use platform::signed::DOMAIN_MAP;

use super::register::signed_error;
use super::SharedState;
use crate::error::AppError;
use crate::fanout;
use crate::hub::{Push, Subscription};
use crate::policy;
use crate::store::DeviceRow;

/// How long a client has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most endpoints a device may report.
const MAX_ENDPOINTS: usize = 32;
/// Largest message accepted from a device.
const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Longest a single message may take to go out. A device that stops
/// reading fills its socket buffer; past this its stream ends rather than
/// holding the task (and its netmaps) forever.
pub(crate) const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Silence after which a stream is ended: devices send a heartbeat every
/// few seconds, so one quiet this long is gone or stuck.
pub(crate) const IDLE_TIMEOUT: Duration =
    Duration::from_secs(3 * platform::api::OFFLINE_AFTER_SECS);

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
    /// The device takes a large full netmap in pieces (its hello said so).
    pieces: bool,
}

async fn send(conn: &mut Conn, msg: &ServerMessage) -> anyhow::Result<()> {
    let text = serde_json::to_string(msg)?;
    let text = if conn.authenticated {
        let frame = conn.identity.sign_frame(&conn.nonce, conn.seq, text);
        conn.seq += 1;
        serde_json::to_string(&ServerMessage::Signed { frame })?
    } else {
        text
    };
    send_within(&mut conn.socket, Message::Text(text.into()), SEND_TIMEOUT).await
}

/// Sends a full netmap: in pieces of [`PEERS_PER_PIECE`] peers to a device
/// that takes them (so no message, nor the socket's output buffer that
/// keeps the size of the largest, grows with the network), else whole.
async fn send_full(conn: &mut Conn, netmap: NetMap) -> anyhow::Result<()> {
    if !conn.pieces {
        return send(
            conn,
            &ServerMessage::Full {
                netmap: Box::new(netmap),
            },
        )
        .await;
    }
    for msg in full_in_pieces(netmap, PEERS_PER_PIECE) {
        send(conn, &msg).await?;
    }
    Ok(())
}

/// Sends one message, giving up after `limit`.
pub(crate) async fn send_within<S>(
    socket: &mut S,
    msg: Message,
    limit: Duration,
) -> anyhow::Result<()>
where
    S: futures_util::Sink<Message> + Unpin,
    S::Error: std::error::Error + Send + Sync + 'static,
{
    use futures_util::SinkExt as _;
    match tokio::time::timeout(limit, socket.send(msg)).await {
        Ok(sent) => Ok(sent?),
        Err(_) => anyhow::bail!("the device took longer than {limit:?} to take a message"),
    }
}

async fn refuse(conn: &mut Conn, err: AppError) -> anyhow::Result<()> {
    let _ = send(conn, &ServerMessage::Error { error: err.body() }).await;
    let _ = send_within(&mut conn.socket, Message::Close(None), SEND_TIMEOUT).await;
    Err(anyhow::anyhow!("refused: {err}"))
}

/// Reads the hello and finds the device it proves.
/// Sends the challenge, reads the hello and finds the device it proves.
async fn authenticate(s: &SharedState, conn: &mut Conn) -> Result<DeviceRow, AppError> {
    let challenge = ServerMessage::Challenge {
        nonce: conn.nonce.clone(),
    };
    send(conn, &challenge)
        .await
        .map_err(|e| AppError::BadRequest(format!("sending the challenge: {e}")))?;
    let first = tokio::time::timeout(HELLO_TIMEOUT, conn.socket.recv())
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
    let now = s.clock.now();
    let payload: MapHello = hello.verify(DOMAIN_MAP, now).map_err(signed_error)?;
    if payload.nonce != conn.nonce {
        return Err(AppError::Unauthorized(
            "the hello answers another stream's challenge".into(),
        ));
    }
    conn.pieces = payload.full_in_pieces;
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
    let policy = policy::current(s, me.network_id).await?;
    let rows = s.store.network_devices(me.network_id).await?;
    let now = s.clock.now();
    let mut self_node = None;
    let mut peers = BTreeMap::new();
    let awaiting_approval = !me.approved;
    for row in &rows {
        let node = row.to_node(fanout::online(s, row))?;
        if row.id == me.id {
            self_node = Some(node);
        } else if !awaiting_approval && row.is_visible(now) && policy.sees(me.id, row.id) {
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
        dns: DnsConfig {
            suffix: s.base_domain.clone(),
            ..s.store.dns_settings(me.network_id).await?
        },
        awaiting_approval,
        compute: s.store.compute_rules(me.network_id).await?,
        packet_filter: if awaiting_approval {
            Default::default()
        } else {
            policy.filter_for(me.id)
        },
    })
}

async fn serve(s: SharedState, socket: WebSocket) -> anyhow::Result<()> {
    let mut conn = Conn {
        socket,
        identity: s.identity.clone(),
        nonce: new_nonce(),
        seq: 0,
        authenticated: false,
        pieces: false,
    };
    let me = match authenticate(&s, &mut conn).await {
        Ok(row) => row,
        Err(e) => return refuse(&mut conn, e).await,
    };
    conn.authenticated = true;
    let node_key = me.node_key()?;
    // Who sees whom must be known before the stream is announced.
    policy::current(&s, me.network_id).await?;
    // Subscribe before reading the map, so no change falls in between.
    let mut sub = s
        .hub
        .connect(me.network_id, me.id, node_key, me.approved, Instant::now());
    let result = stream(&s, &me, &mut conn, &mut sub).await;
    s.hub.disconnect(
        me.network_id,
        me.id,
        sub.conn_id,
        me.ephemeral,
        Instant::now(),
    );
    let _ = s.store.touch(me.id, s.clock.now()).await;
    tracing::info!(device = me.id, name = %me.name, "map stream closed");
    result
}

async fn stream(
    s: &SharedState,
    me: &DeviceRow,
    conn: &mut Conn,
    sub: &mut Subscription,
) -> anyhow::Result<()> {
    let conn_id = sub.conn_id;
    let netmap = match full_netmap(s, me).await {
        Ok(m) => m,
        Err(e) => return refuse(conn, e).await,
    };
    send_full(conn, netmap).await?;
    s.store.touch(me.id, s.clock.now()).await?;
    tracing::info!(device = me.id, name = %me.name, "map stream open");
    if s.store.rotation_due(me.id).await? {
        send(conn, &ServerMessage::RotateKey).await?;
    }
    let mut idle_deadline = tokio::time::Instant::now() + IDLE_TIMEOUT;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(idle_deadline) => {
                return refuse(conn, AppError::BadRequest(format!(
                    "nothing heard for {} s", IDLE_TIMEOUT.as_secs()
                ))).await;
            }
            incoming = conn.socket.recv() => {
                let Some(incoming) = incoming else { return Ok(()) };
                idle_deadline = tokio::time::Instant::now() + IDLE_TIMEOUT;
                match incoming? {
                    Message::Text(text) => {
                        if let Err(e) = handle_client_message(s, me, conn_id, &text).await {
                            return refuse(conn, e).await;
                        }
                    }
                    Message::Close(_) => return Ok(()),
                    Message::Binary(_) => return refuse(conn, AppError::BadRequest("binary messages are not accepted".into())).await,
                    Message::Ping(_) | Message::Pong(_) => {}
                }
            }
            first = sub.recv() => {
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
                    // Bounded by the queue: a signal (close, resync) that
                    // arrived meanwhile stops the batch and goes next.
                    while let Some(c) = sub.try_recv_change() {
                        batch.push(c);
                    }
                }
                if !batch.is_empty() {
                    send(conn, &ServerMessage::Delta { changes: coalesce(batch) }).await?;
                }
                match then {
                    None | Some(Push::Change(_)) => {}
                    Some(Push::RotateKey) => send(conn, &ServerMessage::RotateKey).await?,
                    Some(Push::Filter(filter)) => {
                        send(conn, &ServerMessage::Filter { filter: (*filter).clone() }).await?;
                    }
                    Some(Push::Refresh) => {
                        let row = s.store.device(&me.network, me.id).await?;
                        let netmap = full_netmap(s, &row).await?;
                        send_full(conn, netmap).await?;
                    }
                    Some(Push::Close(error)) => {
                        let _ = send(conn, &ServerMessage::Error { error }).await;
                        let _ = send_within(&mut conn.socket, Message::Close(None), SEND_TIMEOUT).await;
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Reads one message from a device and checks what can be checked
/// without the database.
pub(crate) fn parse_client_message(text: &str) -> Result<ClientMessage, AppError> {
    let msg: ClientMessage = serde_json::from_str(text)
        .map_err(|e| AppError::BadRequest(format!("invalid message: {e}")))?;
    match &msg {
        ClientMessage::Heartbeat {
            capabilities: Some(caps),
        } => caps
            .check()
            .map_err(|e| AppError::BadRequest(format!("capabilities: {e}")))?,
        ClientMessage::Endpoints { endpoints } if endpoints.len() > MAX_ENDPOINTS => {
            return Err(AppError::BadRequest(format!(
                "at most {MAX_ENDPOINTS} endpoints"
            )))
        }
        _ => {}
    }
    Ok(msg)
}

async fn handle_client_message(
    s: &SharedState,
    me: &DeviceRow,
    conn_id: u64,
    text: &str,
) -> Result<(), AppError> {
    let msg = parse_client_message(text)?;
    s.hub.heard(me.network_id, me.id, conn_id, Instant::now());
    let reports = matches!(
        msg,
        ClientMessage::Endpoints { .. }
            | ClientMessage::HomeRegion { .. }
            | ClientMessage::Heartbeat {
                capabilities: Some(_)
            }
    );
    if reports {
        // Each report is a write and a message to every peer.
        let now = tokio::time::Instant::now().into_std();
        if let Err(wait) = s.limits.device_reports.check(me.id, now) {
            return Err(AppError::TooManyRequests(format!(
                "too many reports from this device; retry in {} s",
                wait.as_secs().max(1)
            )));
        }
    }
    match msg {
        ClientMessage::Hello { .. } => {
            return Err(AppError::BadRequest("hello was already sent".into()))
        }
        ClientMessage::Heartbeat { capabilities: None } => {}
        ClientMessage::Heartbeat {
            capabilities: Some(caps),
        } => {
            let row = s.store.device(&me.network, me.id).await?;
            if row.capabilities().ok().flatten().as_ref() == Some(&caps) {
                // A new session repeating the stored report: nothing changed.
                return Ok(());
            }
            s.store.set_capabilities(me.id, &caps).await?;
            fanout::device_changed(s, &s.store.device(&me.network, me.id).await?)?;
        }
        ClientMessage::Endpoints { mut endpoints } => {
            endpoints.sort();
            endpoints.dedup();
            s.store.set_endpoints(me.id, &endpoints).await?;
            // Read back: the node key may have been rotated since the hello.
            let row = s.store.device(&me.network, me.id).await?;
            if row.is_visible(s.clock.now()) {
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

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// A device that never takes another message.
    struct Stuck;

    impl futures_util::Sink<Message> for Stuck {
        type Error = std::io::Error;
        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Pending
        }
        fn start_send(self: Pin<&mut Self>, _: Message) -> Result<(), Self::Error> {
            Ok(())
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Pending
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn a_stuck_device_does_not_hold_the_stream() {
        let err = send_within(
            &mut Stuck,
            Message::Text("{}".into()),
            Duration::from_millis(1),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("longer than"), "{err}");
    }
}
