//! People: who am I, the members of a network, their roles and approval,
//! and invites (created by admins, redeemed by anyone holding the link).

use axum::extract::State;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use platform::people::{
    ChangeRole, CreateInvite, CreatedInvite, InviteInfo, Member, RedeemInvite, Redeemed, Role,
    WhoAmI,
};

use super::{ApiPath, Body, Caller, MaybeCaller, SharedState};
use crate::error::AppError;
use crate::fanout;

pub async fn whoami(
    Caller(user): Caller,
    State(s): State<SharedState>,
) -> Result<Json<WhoAmI>, AppError> {
    Ok(Json(s.store.whoami(&user).await?))
}

/// Members and admins see everyone; a guest sees only themselves.
pub async fn list_members(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
) -> Result<Json<Vec<Member>>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    let mut members = s.store.list_members(ctx.id).await?;
    if !ctx.role.at_least(Role::Member) {
        members.retain(|m| m.user_id == ctx.user.id);
    }
    Ok(Json(members))
}

pub async fn change_role(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath((network, username)): ApiPath<(String, String)>,
    Body(req): Body<ChangeRole>,
) -> Result<Json<Member>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    let member = s
        .store
        .set_role(&ctx, &username, req.role, s.clock.now())
        .await?;
    let devices = s.store.devices_of_member(ctx.id, member.user_id).await?;
    fanout::owner_role_changed(&s, &devices)?;
    Ok(Json(member))
}

pub async fn approve_member(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath((network, username)): ApiPath<(String, String)>,
) -> Result<Json<Member>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    Ok(Json(
        s.store
            .approve_member(&ctx, &username, s.clock.now())
            .await?,
    ))
}

/// An admin removes a member, or a member leaves; their devices go too.
pub async fn remove_member(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath((network, username)): ApiPath<(String, String)>,
) -> Result<Json<Member>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    let (member, devices) = s
        .store
        .remove_member(&ctx, &username, s.clock.now())
        .await?;
    for d in &devices {
        fanout::device_shut_out(
            &s,
            d,
            "forbidden",
            format!(
                "{} was removed from network {:?}",
                member.username, ctx.name
            ),
        )?;
    }
    Ok(Json(member))
}

/// Where share links point: the coordinator as the caller reached it.
pub(super) fn base_url(s: &SharedState, parts: &Parts) -> String {
    if let Some(url) = &s.public_url {
        return url.trim_end_matches('/').to_owned();
    }
    let host = parts
        .headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    format!("{}://{host}", if s.tls { "https" } else { "http" })
}

pub async fn create_invite(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
    parts: Parts,
    Body(req): Body<CreateInvite>,
) -> Result<(StatusCode, Json<CreatedInvite>), AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    let (secret, info) = s.store.create_invite(&ctx, &req, s.clock.now()).await?;
    let link = format!("{}/api/v1/invites/{secret}", base_url(&s, &parts));
    Ok((
        StatusCode::CREATED,
        Json(CreatedInvite { link, secret, info }),
    ))
}

pub async fn list_invites(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
) -> Result<Json<Vec<InviteInfo>>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    Ok(Json(s.store.list_invites(&ctx).await?))
}

pub async fn revoke_invite(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath((network, id)): ApiPath<(String, i64)>,
) -> Result<Json<InviteInfo>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    Ok(Json(s.store.revoke_invite(&ctx, id, s.clock.now()).await?))
}

/// What the link offers (anyone holding it may look before redeeming).
pub async fn show_invite(
    State(s): State<SharedState>,
    ApiPath(secret): ApiPath<String>,
) -> Result<Json<InviteInfo>, AppError> {
    Ok(Json(s.store.invite_by_secret(&secret).await?))
}

/// Anyone holding the link may redeem it: with a token as themselves, or as
/// a new user.
pub async fn redeem_invite(
    MaybeCaller(user): MaybeCaller,
    State(s): State<SharedState>,
    ApiPath(secret): ApiPath<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Redeemed>), AppError> {
    // An empty body is fine: a member redeeming with their token.
    let body: RedeemInvite = if body.is_empty() {
        RedeemInvite::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| AppError::BadRequest(format!("invalid JSON body: {e}")))?
    };
    let redeemed = s
        .store
        .redeem_invite(&secret, user.as_ref(), &body, s.clock.now())
        .await?;
    Ok((StatusCode::CREATED, Json(redeemed)))
}
