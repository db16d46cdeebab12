//! Requests a device signs with its device key: registration
//! (`POST /api/v1/register`), device-code pairing (`POST
//! /api/v1/device-codes`, `…/poll`) and node-key rotation (`POST
//! /api/v1/rotate-key`).

use axum::extract::State;
use axum::http::request::Parts;
use axum::Json;
use platform::api::{RegisterRequest, RegisterResponse};
use platform::control_auth::ProofPurpose;
use platform::people::{DeviceCode, DeviceCodeRequest, RotateKeyRequest, RotateKeyResponse};
use platform::signed::{Signed, SignedError, DOMAIN_DEVICE_CODE, DOMAIN_REGISTER, DOMAIN_ROTATE};

use super::{Body, SharedState};
use crate::error::AppError;
use crate::fanout;
use crate::store::{Pairing, Registration};

/// Maps a failed signature check to the status a client can act on.
pub fn signed_error(e: SignedError) -> AppError {
    match e {
        SignedError::BadPayload(m) => AppError::BadRequest(format!("signed payload: {m}")),
        other => AppError::Unauthorized(other.to_string()),
    }
}

fn no_proof() -> AppError {
    AppError::Unauthorized(
        "node_proof does not prove this device holds the node key (made against GET /api/v1/coordinator's proof_key)".into(),
    )
}

pub async fn register(
    State(s): State<SharedState>,
    Body(signed): Body<Signed>,
) -> Result<Json<RegisterResponse>, AppError> {
    let now = s.clock.now();
    let request: RegisterRequest = signed.verify(DOMAIN_REGISTER, now).map_err(signed_error)?;
    // Before anything is looked up: only the holder of a node key may claim it.
    if !s.identity.check_node_proof(
        ProofPurpose::Register,
        &request.node_key,
        &signed.device_key,
        request.timestamp,
        &request.node_proof,
    ) {
        return Err(no_proof());
    }
    let reg = Registration {
        device_key: signed.device_key,
        request,
    };
    let done = s.store.register(&reg, now).await?;
    let row = &done.row;
    tracing::info!(device = row.id, network = %row.network, name = %row.name, created = done.created, approved = row.approved, "device registered");
    if let Some(old) = done.replaced_node_key {
        fanout::replaced_key(&s, row, old);
    }
    fanout::device_changed(&s, row)?;
    Ok(Json(RegisterResponse {
        device_id: row.id,
        network: row.network.clone(),
        name: row.name.clone(),
        addresses: row.addresses()?,
    }))
}

/// Longest hostname a pairing may carry.
const MAX_HOSTNAME: usize = 255;

/// The answer to a pairing device, with where a member looks the code up
/// (`GET /api/v1/device-codes/{code}`, which says how to approve it).
fn device_code(s: &SharedState, parts: &Parts, p: Pairing) -> DeviceCode {
    DeviceCode {
        verification_url: format!(
            "{}/api/v1/device-codes/{}",
            super::members::base_url(s, parts),
            p.code
        ),
        code: p.code,
        expires_at: p.expires_at,
        status: p.status,
        auth_key: p.auth_key,
        network: p.network,
    }
}

/// A device with no key asks for a code a member can approve.
pub async fn start_device_code(
    State(s): State<SharedState>,
    parts: Parts,
    Body(signed): Body<Signed>,
) -> Result<Json<DeviceCode>, AppError> {
    let now = s.clock.now();
    let req: DeviceCodeRequest = signed
        .verify(DOMAIN_DEVICE_CODE, now)
        .map_err(signed_error)?;
    if req.hostname.len() > MAX_HOSTNAME {
        return Err(AppError::BadRequest("hostname is too long".into()));
    }
    let p = s
        .store
        .start_pairing(&signed.device_key, &req.hostname, now)
        .await?;
    Ok(Json(device_code(&s, &parts, p)))
}

/// The device asks whether its code was approved (only the device that
/// started the pairing can: the request is signed with its key).
pub async fn poll_device_code(
    State(s): State<SharedState>,
    parts: Parts,
    Body(signed): Body<Signed>,
) -> Result<Json<DeviceCode>, AppError> {
    let now = s.clock.now();
    let req: DeviceCodeRequest = signed
        .verify(DOMAIN_DEVICE_CODE, now)
        .map_err(signed_error)?;
    let code = req
        .code
        .ok_or_else(|| AppError::BadRequest("code is required".into()))?;
    let p = s.store.poll_pairing(&signed.device_key, &code, now).await?;
    Ok(Json(device_code(&s, &parts, p)))
}

/// The device replaces its node key; peers and relays follow at once.
pub async fn rotate_key(
    State(s): State<SharedState>,
    Body(signed): Body<Signed>,
) -> Result<Json<RotateKeyResponse>, AppError> {
    let now = s.clock.now();
    let req: RotateKeyRequest = signed.verify(DOMAIN_ROTATE, now).map_err(signed_error)?;
    if !s.identity.check_node_proof(
        ProofPurpose::RotateKey,
        &req.new_node_key,
        &signed.device_key,
        req.timestamp,
        &req.node_proof,
    ) {
        return Err(no_proof());
    }
    let rotated = s
        .store
        .rotate_node_key(
            &signed.device_key,
            &req.old_node_key,
            &req.new_node_key,
            now,
        )
        .await?;
    tracing::info!(device = rotated.row.id, old = %req.old_node_key.short(), new = %req.new_node_key.short(), "node key rotated");
    fanout::key_rotated(&s, &rotated)?;
    Ok(Json(RotateKeyResponse {
        node_key: req.new_node_key,
        key_expiry: rotated.row.key_expiry(),
    }))
}
