//! The access policy, device tags and MagicDNS settings of a network.
//!
//! Members read the policy and ask what it allows; admins replace it. A
//! replacement is parsed, its names checked and its tests run against the
//! network as it is; a failure is a 400 naming the line, and the running
//! policy stays. Tags are given by admins, or by a tag's owners.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use platform::api::DeviceInfo;
use platform::filter::Proto;
use platform::netmap::{is_dns_name, DnsConfig};
use platform::people::{EvaluateRequest, Evaluation, PolicyDocument, Role, SetTags};

use super::{ApiPath, Body, Caller, SharedState};
use crate::error::AppError;
use crate::fanout;
use crate::policy::{self, doc::split_host_port, Policy, DEFAULT_POLICY, MAX_POLICY_BYTES};
use crate::store::NetCtx;

/// The most tags one device may carry.
pub const MAX_TAGS: usize = 32;
/// The most extra records and split-DNS domains a network may have.
pub const MAX_DNS_ENTRIES: usize = 256;

pub async fn get_policy(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
) -> Result<Json<PolicyDocument>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    ctx.require(Role::Member)?;
    let text = s.store.policy_text(ctx.id).await?;
    Ok(Json(PolicyDocument {
        default: text.is_none(),
        policy: text.unwrap_or_else(|| DEFAULT_POLICY.to_owned()),
    }))
}

/// `PUT …/policy`: the body is the document itself (JSON with comments).
pub async fn put_policy(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<PolicyDocument>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    ctx.require(Role::Admin)?;
    let text = policy_text(body)?;
    let compiled = policy::set(&s, &ctx.who(), ctx.id, &text).await?;
    tracing::info!(
        network = ctx.id,
        rules = compiled.policy.acls.len(),
        "policy changed"
    );
    Ok(Json(PolicyDocument {
        policy: text,
        default: false,
    }))
}

/// The text of a policy body (any content type: it is JSON with comments).
fn policy_text(body: Result<Bytes, BytesRejection>) -> Result<String, AppError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            AppError::PayloadTooLarge(format!("a policy is at most {MAX_POLICY_BYTES} bytes"))
        } else {
            AppError::BadRequest(format!("could not read body: {e}"))
        }
    })?;
    String::from_utf8(bytes.to_vec())
        .map_err(|_| AppError::BadRequest("the policy is not UTF-8 text".into()))
}

/// `POST …/policy/check`: would this policy be accepted now? Nothing is
/// stored; the answer says how many rules and tests it has.
pub async fn check_policy(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    ctx.require(Role::Member)?;
    let text = policy_text(body)?;
    let compiled = policy::check(&s, ctx.id, &text).await?;
    Ok(Json(serde_json::json!({
        "ok": true,
        "rules": compiled.policy.acls.len(),
        "tests": compiled.policy.tests.len(),
    })))
}

/// `POST …/policy/evaluate`: may `src` reach `dst`, and by which rule?
pub async fn evaluate(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
    Body(req): Body<EvaluateRequest>,
) -> Result<Json<Evaluation>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    ctx.require(Role::Member)?;
    let proto: Proto = match &req.proto {
        Some(p) => p.parse().map_err(AppError::BadRequest)?,
        None => Proto::Tcp,
    };
    let (host, port) = split_host_port(&req.dst).map_err(AppError::BadRequest)?;
    let port: u16 = port
        .parse()
        .map_err(|_| AppError::BadRequest(format!("{:?}: name one port", req.dst)))?;
    let compiled = policy::current(&s, ctx.id).await?;
    let members = policy::member_roles(&s, ctx.id).await?;
    let rule = compiled
        .evaluate(&req.src, host, port, proto, &members)
        .map_err(AppError::BadRequest)?;
    Ok(Json(Evaluation {
        allowed: rule.is_some(),
        line: rule.map(|r| compiled.policy.acls[r].line),
        rule,
    }))
}

/// Whether the caller may give these tags: each must be declared in the
/// policy, and the caller an admin or among the tag's owners.
pub fn check_tags(policy: &Policy, ctx: &NetCtx, tags: &[String]) -> Result<(), AppError> {
    if tags.len() > MAX_TAGS {
        return Err(AppError::BadRequest(format!("at most {MAX_TAGS} tags")));
    }
    for tag in tags {
        let owners = policy.tag_owners.get(tag).ok_or_else(|| {
            AppError::BadRequest(format!(
                "unknown tag {tag:?}: declare it under \"tags\" in the policy"
            ))
        })?;
        if !ctx.is_admin() && !owners.contains(&ctx.user.username) {
            return Err(AppError::Forbidden(format!(
                "only admins and the owners of {tag} may give it"
            )));
        }
    }
    Ok(())
}

/// `PUT …/devices/{id}/tags`: the device's tags become exactly these.
pub async fn set_tags(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath((network, id)): ApiPath<(String, i64)>,
    Body(req): Body<SetTags>,
) -> Result<Json<DeviceInfo>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    ctx.require(Role::Member)?;
    let mut tags = req.tags;
    tags.sort();
    tags.dedup();
    let compiled = policy::current(&s, ctx.id).await?;
    check_tags(&compiled.policy, &ctx, &tags)?;
    let row = s.store.device(&ctx.name, id).await?;
    // A tag takes a device's user identity away: only its owner (or an
    // admin) may trade that for a tag's.
    if !ctx.is_admin() && row.owner.as_deref() != Some(ctx.user.username.as_str()) {
        return Err(AppError::Forbidden(
            "only admins and the device's owner may change its tags".into(),
        ));
    }
    // Taking tags away is an admin's (or the removed tags' owners') call too.
    let removed: Vec<String> = row
        .tags()?
        .into_iter()
        .filter(|t| !tags.contains(t))
        .collect();
    if !ctx.is_admin() {
        for t in &removed {
            if !compiled
                .policy
                .tag_owners
                .get(t)
                .is_some_and(|o| o.contains(&ctx.user.username))
            {
                return Err(AppError::Forbidden(format!(
                    "only admins and the owners of {t} may take it away"
                )));
            }
        }
    }
    let row = s
        .store
        .set_device_tags(&ctx.who(), &row, &tags, s.clock.now())
        .await?;
    fanout::device_changed(&s, &row)?;
    // The device's own filter and peers follow from its tags.
    s.hub
        .send_to(row.network_id, row.id, crate::hub::Push::Refresh);
    Ok(Json(row.to_info(fanout::online(&s, &row), s.clock.now())?))
}

pub async fn get_dns(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
) -> Result<Json<DnsConfig>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    ctx.require(Role::Member)?;
    Ok(Json(DnsConfig {
        suffix: s.base_domain.clone(),
        ..s.store.dns_settings(ctx.id).await?
    }))
}

/// `PUT …/dns`: extra records, split DNS and resolvers (the base domain
/// is the coordinator's and is ignored here). Every connected device gets
/// them in a fresh netmap.
pub async fn put_dns(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
    Body(mut req): Body<DnsConfig>,
) -> Result<Json<DnsConfig>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    ctx.require(Role::Admin)?;
    req.suffix.clear();
    check_dns(&req)?;
    if s.store
        .set_dns_settings(&ctx.who(), ctx.id, &req, s.clock.now())
        .await?
    {
        let devices = s.store.network_devices(ctx.id).await?;
        fanout::settings_changed(&s, &devices);
    }
    req.suffix.clone_from(&s.base_domain);
    Ok(Json(req))
}

fn check_dns(d: &DnsConfig) -> Result<(), AppError> {
    if d.extra_records.len() > MAX_DNS_ENTRIES
        || d.split.len() > MAX_DNS_ENTRIES
        || d.nameservers.len() > 8
    {
        return Err(AppError::BadRequest(format!(
            "at most {MAX_DNS_ENTRIES} records, {MAX_DNS_ENTRIES} split domains and 8 resolvers"
        )));
    }
    for r in &d.extra_records {
        if !is_dns_name(&r.name) {
            return Err(AppError::BadRequest(format!(
                "{:?} is not a DNS name",
                r.name
            )));
        }
    }
    for (domain, resolvers) in &d.split {
        if !is_dns_name(domain) {
            return Err(AppError::BadRequest(format!(
                "{domain:?} is not a DNS name"
            )));
        }
        if resolvers.is_empty() || resolvers.len() > 8 {
            return Err(AppError::BadRequest(format!(
                "{domain}: give 1 to 8 resolvers"
            )));
        }
    }
    Ok(())
}
