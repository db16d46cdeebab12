//! The HTTP API under `/api/v1`.

mod admin;
mod map;
mod register;
mod relay;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::routing::{delete, get, post};
use axum::Router;
use platform::netmap::{PeerChange, RelayMap};
use serde::de::DeserializeOwned;

use crate::error::AppError;
use crate::hub::Hub;
use crate::store::Store;

/// Largest request body accepted anywhere in the API.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

pub struct AppState {
    pub store: Store,
    pub hub: Hub,
    /// How long map-stream batches collect changes before sending.
    pub batch_window: Duration,
    /// Relays, delivered in every netmap.
    pub relay_map: RelayMap,
}

pub type SharedState = Arc<AppState>;

pub fn router(state: SharedState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/api/v1/networks",
            post(admin::create_network).get(admin::list_networks),
        )
        .route("/api/v1/networks/{network}", get(admin::show_network))
        .route(
            "/api/v1/networks/{network}/preauth-keys",
            post(admin::create_preauth_key).get(admin::list_preauth_keys),
        )
        .route(
            "/api/v1/networks/{network}/preauth-keys/{id}",
            delete(admin::revoke_preauth_key),
        )
        .route(
            "/api/v1/networks/{network}/devices",
            get(admin::list_devices),
        )
        .route(
            "/api/v1/networks/{network}/devices/{id}",
            delete(admin::remove_device),
        )
        .route(
            "/api/v1/networks/{network}/devices/{id}/wg-quick",
            get(admin::wg_quick_config),
        )
        .route(
            "/api/v1/networks/{network}/wireguard-peers",
            post(admin::create_wireguard_peer),
        )
        .route("/api/v1/register", post(register::register))
        .route("/api/v1/relay/admit/{node_key}", get(relay::admit))
        .route("/api/v1/map", get(map::map_stream))
        .fallback(|| async { AppError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async { AppError::MethodNotAllowed })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Marks devices offline and deletes departed ephemeral devices, forever.
pub async fn run_sweeper(state: SharedState) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        for gone in state.hub.sweep(Instant::now()) {
            match state.store.delete_device(gone.device_id).await {
                Ok(()) => {
                    tracing::info!(device = gone.device_id, "ephemeral device removed");
                    state.hub.broadcast(
                        gone.network_id,
                        gone.device_id,
                        PeerChange::Removed {
                            node_key: gone.node_key,
                        },
                    );
                }
                Err(e) => tracing::warn!(error = %e, "removing ephemeral device"),
            }
        }
    }
}

/// The bearer token of a request.
fn bearer<'a>(parts: &'a Parts, what: &str) -> Result<&'a str, AppError> {
    let header = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| AppError::Unauthorized(format!("missing Authorization: Bearer <{what}>")))?;
    header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| AppError::Unauthorized(format!("Authorization must be `Bearer <{what}>`")))
}

/// A request authenticated with an admin API token (`Authorization: Bearer`).
pub struct Admin;

impl FromRequestParts<SharedState> for Admin {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, AppError> {
        if state
            .store
            .admin_token_valid(bearer(parts, "admin token")?)
            .await?
        {
            Ok(Admin)
        } else {
            Err(AppError::Unauthorized("invalid admin token".into()))
        }
    }
}

/// A request from a relay, authenticated with a relay token.
pub struct RelayAuth;

impl FromRequestParts<SharedState> for RelayAuth {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, AppError> {
        if state
            .store
            .relay_token_valid(bearer(parts, "relay token")?)
            .await?
        {
            Ok(RelayAuth)
        } else {
            Err(AppError::Unauthorized("invalid relay token".into()))
        }
    }
}

/// Path parameters whose parse failures are JSON errors.
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AppError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e| AppError::BadRequest(format!("invalid path: {}", e.body_text())))
    }
}

/// A JSON body whose every failure is a precise JSON error.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, AppError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    AppError::PayloadTooLarge(format!(
                        "request body is larger than {MAX_BODY_BYTES} bytes"
                    ))
                } else {
                    AppError::BadRequest(format!("could not read body: {e}"))
                }
            })?;
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| AppError::BadRequest(format!("invalid JSON body: {e}")))
    }
}

#[cfg(test)]
mod tests;
