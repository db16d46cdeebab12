//! What relays ask: may this node key use the relay?

use axum::extract::State;
use axum::Json;
use platform::keys::NodePublic;
use serde::Serialize;

use super::{ApiPath, RelayAuth, SharedState};
use crate::error::AppError;

#[derive(Serialize)]
pub struct Admitted {
    pub network: String,
    pub name: String,
}

/// 200 for a registered device, 404 for anything else (removed devices
/// included: a relay's cache forgets them within a minute).
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
        .ok_or_else(|| AppError::NotFound("no device has this node key".into()))?;
    Ok(Json(Admitted {
        network: row.network,
        name: row.name,
    }))
}
