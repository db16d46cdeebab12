//! `POST /api/v1/register`: a device joins a network with a pre-auth key.

use axum::extract::State;
use axum::Json;
use platform::api::{RegisterRequest, RegisterResponse};
use platform::netmap::PeerChange;
use platform::signed::{Signed, SignedError, DOMAIN_REGISTER};
use platform::unix_now;

use super::{Body, SharedState};
use crate::error::AppError;
use crate::store::Registration;

/// Maps a failed signature check to the status a client can act on.
pub fn signed_error(e: SignedError) -> AppError {
    match e {
        SignedError::BadPayload(m) => AppError::BadRequest(format!("signed payload: {m}")),
        other => AppError::Unauthorized(other.to_string()),
    }
}

pub async fn register(
    State(s): State<SharedState>,
    Body(signed): Body<Signed>,
) -> Result<Json<RegisterResponse>, AppError> {
    let now = unix_now();
    let request: RegisterRequest = signed.verify(DOMAIN_REGISTER, now).map_err(signed_error)?;
    let reg = Registration {
        device_key: signed.device_key,
        request,
    };
    let (row, created) = s.store.register(&reg, now).await?;
    tracing::info!(device = row.id, network = %row.network, name = %row.name, created, "device registered");
    let online = s.hub.is_online(row.network_id, row.id);
    s.hub.broadcast(
        row.network_id,
        row.id,
        PeerChange::Upsert {
            node: row.to_node(online)?,
        },
    );
    Ok(Json(RegisterResponse {
        device_id: row.id,
        network: row.network.clone(),
        name: row.name.clone(),
        addresses: row.addresses()?,
    }))
}
