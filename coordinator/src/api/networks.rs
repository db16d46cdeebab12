//! Networks as their members see them: create and list, settings,
//! pre-auth keys, the audit log and the denylist.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use platform::api::{CreateNetwork, CreatePreauthKey, CreatedPreauthKey, Network, PreauthKeyInfo};
use platform::people::{AuditEvent, DenylistEntry, NetworkSettings, Role, SettingsChange};
use serde::Deserialize;

use super::{ApiPath, Body, Caller, SharedState};
use crate::error::AppError;
use crate::store::audit::AuditQuery;

pub async fn create_network(
    Caller(user): Caller,
    State(s): State<SharedState>,
    Body(req): Body<CreateNetwork>,
) -> Result<(StatusCode, Json<Network>), AppError> {
    Ok((
        StatusCode::CREATED,
        Json(
            s.store
                .create_network(&req.name, &user, s.clock.now())
                .await?,
        ),
    ))
}

pub async fn list_networks(
    Caller(user): Caller,
    State(s): State<SharedState>,
) -> Result<Json<Vec<Network>>, AppError> {
    Ok(Json(s.store.networks_of(&user).await?))
}

pub async fn show_network(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
) -> Result<Json<Network>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    Ok(Json(s.store.network(&ctx.name).await?))
}

pub async fn get_settings(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
) -> Result<Json<NetworkSettings>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    ctx.require(Role::Member)?;
    Ok(Json(s.store.settings(ctx.id).await?))
}

pub async fn change_settings(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
    Body(change): Body<SettingsChange>,
) -> Result<Json<NetworkSettings>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    ctx.require(Role::Admin)?;
    Ok(Json(
        s.store
            .change_settings(&ctx.who(), ctx.id, &change, s.clock.now())
            .await?,
    ))
}

pub async fn create_preauth_key(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
    Body(req): Body<CreatePreauthKey>,
) -> Result<(StatusCode, Json<CreatedPreauthKey>), AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    ctx.require(Role::Member)?;
    if !req.tags.is_empty() {
        let compiled = crate::policy::current(&s, ctx.id).await?;
        super::policy::check_tags(&compiled.policy, &ctx, &req.tags)?;
    }
    Ok((
        StatusCode::CREATED,
        Json(
            s.store
                .create_preauth_key(ctx.id, &ctx.user, &req, s.clock.now())
                .await?,
        ),
    ))
}

pub async fn list_preauth_keys(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
) -> Result<Json<Vec<PreauthKeyInfo>>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    ctx.require(Role::Member)?;
    let only = (!ctx.is_admin()).then_some(ctx.user.id);
    Ok(Json(s.store.list_preauth_keys(ctx.id, only).await?))
}

pub async fn revoke_preauth_key(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath((network, id)): ApiPath<(String, i64)>,
) -> Result<Json<PreauthKeyInfo>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    ctx.require(Role::Member)?;
    let only = (!ctx.is_admin()).then_some(ctx.user.id);
    Ok(Json(
        s.store
            .revoke_preauth_key(&ctx.who(), ctx.id, id, only, s.clock.now())
            .await?,
    ))
}

#[derive(Deserialize)]
pub struct AuditParams {
    /// Unix seconds.
    pub since: Option<u64>,
    pub limit: Option<u32>,
}

/// Most events one call returns.
const MAX_AUDIT_EVENTS: u32 = 10_000;

/// Admins see every event of the network; others only their own.
pub async fn audit_log(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
    params: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<AuditEvent>>, AppError> {
    let Query(params) =
        params.map_err(|e| AppError::BadRequest(format!("query: {}", e.body_text())))?;
    let ctx = s.store.network_for(&network, &user).await?;
    let q = AuditQuery {
        network_id: ctx.id,
        only_user: (!ctx.is_admin()).then_some(ctx.user.id),
        since: params.since,
        limit: params
            .limit
            .unwrap_or(MAX_AUDIT_EVENTS)
            .min(MAX_AUDIT_EVENTS),
    };
    Ok(Json(s.store.audit_events(&q).await?))
}

pub async fn list_denylist(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
) -> Result<Json<Vec<DenylistEntry>>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    ctx.require(Role::Admin)?;
    Ok(Json(s.store.denylist(ctx.id).await?))
}

pub async fn lift_denylist(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath((network, id)): ApiPath<(String, i64)>,
) -> Result<StatusCode, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    ctx.require(Role::Admin)?;
    s.store
        .lift_denylist(&ctx.who(), ctx.id, id, s.clock.now())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
