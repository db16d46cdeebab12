//! Operator endpoints: networks, pre-auth keys, devices, stock WireGuard peers.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use platform::api::{
    CreateNetwork, CreatePreauthKey, CreateWireguardPeer, CreatedPreauthKey, DeviceInfo, Network,
    PreauthKeyInfo, WireguardPeerCreated,
};
use platform::keys::NodePublic;
use platform::netmap::{NodeKind, PeerChange};
use platform::unix_now;

use super::{Admin, ApiPath, Body, SharedState};
use crate::error::AppError;
use crate::store::{DeviceRow, NewWireguardPeer};
use crate::wgquick;

pub async fn create_network(
    _: Admin,
    State(s): State<SharedState>,
    Body(req): Body<CreateNetwork>,
) -> Result<(StatusCode, Json<Network>), AppError> {
    Ok((
        StatusCode::CREATED,
        Json(s.store.create_network(&req.name, unix_now()).await?),
    ))
}

pub async fn list_networks(
    _: Admin,
    State(s): State<SharedState>,
) -> Result<Json<Vec<Network>>, AppError> {
    Ok(Json(s.store.list_networks().await?))
}

pub async fn show_network(
    _: Admin,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
) -> Result<Json<Network>, AppError> {
    Ok(Json(s.store.network(&network).await?))
}

pub async fn create_preauth_key(
    _: Admin,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
    Body(req): Body<CreatePreauthKey>,
) -> Result<(StatusCode, Json<CreatedPreauthKey>), AppError> {
    Ok((
        StatusCode::CREATED,
        Json(
            s.store
                .create_preauth_key(&network, &req, unix_now())
                .await?,
        ),
    ))
}

pub async fn list_preauth_keys(
    _: Admin,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
) -> Result<Json<Vec<PreauthKeyInfo>>, AppError> {
    Ok(Json(s.store.list_preauth_keys(&network).await?))
}

pub async fn revoke_preauth_key(
    _: Admin,
    State(s): State<SharedState>,
    ApiPath((network, id)): ApiPath<(String, i64)>,
) -> Result<Json<PreauthKeyInfo>, AppError> {
    Ok(Json(s.store.revoke_preauth_key(&network, id).await?))
}

fn device_info(s: &SharedState, row: &DeviceRow) -> Result<DeviceInfo, AppError> {
    row.to_info(row.kind() == NodeKind::Wireguard || s.hub.is_online(row.network_id, row.id))
}

pub async fn list_devices(
    _: Admin,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
) -> Result<Json<Vec<DeviceInfo>>, AppError> {
    let net = s.store.network(&network).await?;
    let rows = s.store.network_devices(net.id).await?;
    Ok(Json(
        rows.iter()
            .map(|r| device_info(&s, r))
            .collect::<Result<_, _>>()?,
    ))
}

pub async fn remove_device(
    _: Admin,
    State(s): State<SharedState>,
    ApiPath((network, id)): ApiPath<(String, i64)>,
) -> Result<Json<DeviceInfo>, AppError> {
    let row = s.store.device(&network, id).await?;
    let info = device_info(&s, &row)?;
    s.store.delete_device(row.id).await?;
    s.hub.broadcast(
        row.network_id,
        row.id,
        PeerChange::Removed {
            node_key: row.node_key()?,
        },
    );
    Ok(Json(info))
}

async fn render_wg_quick(s: &SharedState, row: &DeviceRow) -> Result<String, AppError> {
    let peers = s
        .store
        .network_devices(row.network_id)
        .await?
        .iter()
        .map(|r| r.to_node(true))
        .collect::<Result<Vec<_>, _>>()?;
    let me = row.to_node(true)?;
    let port = me.endpoints.first().map(|e| e.port());
    Ok(wgquick::render(&row.network, &me, port, &peers))
}

pub async fn create_wireguard_peer(
    _: Admin,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
    Body(req): Body<CreateWireguardPeer>,
) -> Result<(StatusCode, Json<WireguardPeerCreated>), AppError> {
    let node_key = NodePublic::from_base64(&req.public_key)
        .map_err(|e| AppError::BadRequest(format!("public_key: {e}")))?;
    let peer = NewWireguardPeer {
        name: req.name,
        node_key,
        endpoint: req.endpoint,
    };
    let row = s
        .store
        .add_wireguard_peer(&network, &peer, unix_now())
        .await?;
    s.hub.broadcast(
        row.network_id,
        row.id,
        PeerChange::Upsert {
            node: row.to_node(true)?,
        },
    );
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
    _: Admin,
    State(s): State<SharedState>,
    ApiPath((network, id)): ApiPath<(String, i64)>,
) -> Result<String, AppError> {
    let row = s.store.device(&network, id).await?;
    if row.kind() != NodeKind::Wireguard {
        return Err(AppError::BadRequest(format!(
            "device {id} runs meshd; wg-quick configs are for stock WireGuard devices"
        )));
    }
    render_wg_quick(&s, &row).await
}
