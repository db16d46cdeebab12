//! Devices of a network: list, remove, revoke, approve, key expiry and
//! rotation, device-code approval, and stock WireGuard peers.
//!
//! Admins act on every device; members on their own; guests see only
//! their own.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use platform::api::{CreateWireguardPeer, DeviceInfo, WireguardPeerCreated};
use platform::keys::NodePublic;
use platform::netmap::NodeKind;
use platform::people::{KeyExpiryOverride, Role};
use serde::Serialize;

use super::{ApiPath, Body, Caller, SharedState};
use crate::error::AppError;
use crate::fanout;
use crate::store::{DeviceRow, NetCtx, NewWireguardPeer};
use crate::wgquick;

fn device_info(s: &SharedState, row: &DeviceRow) -> Result<DeviceInfo, AppError> {
    row.to_info(fanout::online(s, row), s.clock.now())
}

/// A device of the network the caller may act on: any for admins, their
/// own for everyone else (others' devices are not found, not forbidden,
/// for guests, who may not even see them).
async fn own_or_admin(s: &SharedState, ctx: &NetCtx, id: i64) -> Result<DeviceRow, AppError> {
    let row = s.store.device(&ctx.name, id).await?;
    if ctx.is_admin() || row.user_id == Some(ctx.user.id) {
        return Ok(row);
    }
    if ctx.role.at_least(Role::Member) {
        Err(AppError::Forbidden(format!(
            "{} belongs to someone else; only admins act on others' devices",
            row.name
        )))
    } else {
        Err(AppError::NotFound(format!(
            "no device {id} in network {:?}",
            ctx.name
        )))
    }
}

pub async fn list_devices(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
) -> Result<Json<Vec<DeviceInfo>>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    let rows = s.store.network_devices(ctx.id).await?;
    let guest = !ctx.role.at_least(Role::Member);
    Ok(Json(
        rows.iter()
            .filter(|r| !guest || r.user_id == Some(ctx.user.id))
            .map(|r| device_info(&s, r))
            .collect::<Result<_, _>>()?,
    ))
}

pub async fn remove_device(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath((network, id)): ApiPath<(String, i64)>,
) -> Result<Json<DeviceInfo>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    own_or_admin(&s, &ctx, id).await?;
    let row = s
        .store
        .remove_device(&ctx.who(), ctx.id, id, s.clock.now())
        .await?;
    let info = device_info(&s, &row)?;
    fanout::device_shut_out(
        &s,
        &row,
        "forbidden",
        format!("this device was removed from network {:?}", ctx.name),
    )?;
    Ok(Json(info))
}

pub async fn revoke_device(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath((network, id)): ApiPath<(String, i64)>,
) -> Result<Json<DeviceInfo>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    ctx.require(Role::Admin)?;
    let row = s
        .store
        .revoke_device(&ctx.who(), ctx.id, id, s.clock.now())
        .await?;
    fanout::device_shut_out(
        &s,
        &row,
        "forbidden",
        format!("this device was revoked in network {:?}", ctx.name),
    )?;
    Ok(Json(device_info(&s, &row)?))
}

pub async fn approve_device(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath((network, id)): ApiPath<(String, i64)>,
) -> Result<Json<DeviceInfo>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    ctx.require(Role::Admin)?;
    let (_, row) = s
        .store
        .approve_device(&ctx.who(), ctx.id, id, s.clock.now())
        .await?;
    fanout::device_approved(&s, &row)?;
    Ok(Json(device_info(&s, &row)?))
}

pub async fn set_key_expiry(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath((network, id)): ApiPath<(String, i64)>,
    Body(req): Body<KeyExpiryOverride>,
) -> Result<Json<DeviceInfo>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    ctx.require(Role::Admin)?;
    let row = s
        .store
        .set_key_expiry_override(&ctx.who(), ctx.id, id, req.expiry_secs, s.clock.now())
        .await?;
    fanout::device_changed(&s, &row)?;
    Ok(Json(device_info(&s, &row)?))
}

#[derive(Serialize)]
pub struct PairingApproved {
    pub code: String,
    pub hostname: String,
    pub network: String,
}

#[derive(Serialize)]
pub struct WaitingDevice {
    pub code: String,
    pub hostname: String,
    pub expires_at: u64,
    /// How to approve it into a network.
    pub approve: String,
}

/// What a pairing device's verification URL shows a signed-in user.
pub async fn show_device_code(
    Caller(_): Caller,
    State(s): State<SharedState>,
    ApiPath(code): ApiPath<String>,
) -> Result<Json<WaitingDevice>, AppError> {
    let (code, hostname, expires_at) = s.store.waiting_device(&code, s.clock.now()).await?;
    Ok(Json(WaitingDevice {
        approve: format!(
            "coordinator device approve --network NETWORK {code}  (POST /api/v1/networks/NETWORK/device-codes/{code}/approve)"
        ),
        code,
        hostname,
        expires_at,
    }))
}

/// A member approves a waiting device's code; the device becomes theirs.
pub async fn approve_device_code(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath((network, code)): ApiPath<(String, String)>,
) -> Result<Json<PairingApproved>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    let hostname = s.store.approve_pairing(&ctx, &code, s.clock.now()).await?;
    Ok(Json(PairingApproved {
        code: crate::store::normalize_code(&code),
        hostname,
        network: ctx.name,
    }))
}

#[derive(Serialize)]
pub struct RotationRequested {
    /// Devices connected now, asked to renew at once; the others renew
    /// when they next connect (their keys are older than the request).
    pub asked: usize,
}

/// An admin asks every device of the network to renew its node key.
pub async fn rotate_network_keys(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
) -> Result<(StatusCode, Json<RotationRequested>), AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    ctx.require(Role::Admin)?;
    s.store.record_rotation_request(&ctx, s.clock.now()).await?;
    let asked = s.hub.rotate_all(ctx.id);
    Ok((StatusCode::ACCEPTED, Json(RotationRequested { asked })))
}

/// A stock WireGuard device's config: the peers the access policy lets it
/// talk to (its packets are filtered by each peer's own filter too).
async fn render_wg_quick(s: &SharedState, row: &DeviceRow) -> Result<String, AppError> {
    let now = s.clock.now();
    let policy = crate::policy::current(s, row.network_id).await?;
    let peers = s
        .store
        .network_devices(row.network_id)
        .await?
        .iter()
        .filter(|r| r.is_visible(now) && policy.sees(row.id, r.id))
        .map(|r| r.to_node(true))
        .collect::<Result<Vec<_>, _>>()?;
    let me = row.to_node(true)?;
    let port = me.endpoints.first().map(|e| e.port());
    Ok(wgquick::render(&row.network, &me, port, &peers))
}

pub async fn create_wireguard_peer(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
    Body(req): Body<CreateWireguardPeer>,
) -> Result<(StatusCode, Json<WireguardPeerCreated>), AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    ctx.require(Role::Admin)?;
    let node_key = NodePublic::from_base64(&req.public_key)
        .map_err(|e| AppError::BadRequest(format!("public_key: {e}")))?;
    let peer = NewWireguardPeer {
        name: req.name,
        node_key,
        endpoint: req.endpoint,
    };
    let row = s
        .store
        .add_wireguard_peer(&ctx, &peer, s.clock.now())
        .await?;
    fanout::device_changed(&s, &row)?;
    let wg_quick_config = render_wg_quick(&s, &row).await?;
    Ok((
        StatusCode::CREATED,
        Json(WireguardPeerCreated {
            device: device_info(&s, &row)?,
            wg_quick_config,
        }),
    ))
}

pub async fn wg_quick_config(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath((network, id)): ApiPath<(String, i64)>,
) -> Result<String, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    let row = own_or_admin(&s, &ctx, id).await?;
    if row.kind() != NodeKind::Wireguard {
        return Err(AppError::BadRequest(format!(
            "device {id} runs meshd; wg-quick configs are for stock WireGuard devices"
        )));
    }
    render_wg_quick(&s, &row).await
}
