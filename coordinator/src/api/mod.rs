//! The HTTP API under `/api/v1`.

mod devices;
mod fuzz;
mod ledger;
pub mod limits;
mod map;
mod members;
mod networks;
mod policy;
mod register;
mod relay;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::routing::{delete, get, post, put, MethodRouter};
use axum::Json;
use axum::Router;
use platform::control_auth::{CoordinatorIdentity, CoordinatorInfo};
use platform::netmap::{PeerChange, RelayMap};
use serde::de::DeserializeOwned;

use crate::clock::Clock;
use crate::error::AppError;
use crate::hub::Hub;
use crate::store::{Store, UserRow};

#[doc(hidden)]
pub use fuzz::fuzz_api_body;

/// Largest request body accepted anywhere in the API.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

pub struct AppState {
    pub store: Store,
    pub hub: Hub,
    /// The wall clock handlers read.
    pub clock: Clock,
    /// Rate limits on what devices and anonymous callers may ask.
    pub limits: limits::Limits,
    /// How long map-stream batches collect changes before sending.
    pub batch_window: Duration,
    /// Relays, delivered in every netmap.
    pub relay_map: RelayMap,
    /// Clients reach the API over TLS (links it hands out say https).
    pub tls: bool,
    /// The URL people reach the API at, for links; else taken from `Host`.
    pub public_url: Option<String>,
    /// Signs the map stream; checks node-key proofs.
    pub identity: Arc<CoordinatorIdentity>,
    /// Each network's compiled access policy.
    pub policies: crate::policy::Policies,
    /// MagicDNS names are `<device>.<network>.<base_domain>`; empty: off.
    pub base_domain: String,
}

/// The base domain of MagicDNS names unless the operator picks another
/// (`.internal` is reserved for private use, so it never clashes with a
/// public name).
pub const DEFAULT_BASE_DOMAIN: &str = "crank.internal";

pub type SharedState = Arc<AppState>;

pub fn router(state: SharedState) -> Router {
    const NET: &str = "/api/v1/networks/{network}";
    // What anyone may call without a token is limited per source address.
    let limited = |m: MethodRouter<SharedState>| {
        m.layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::per_source,
        ))
    };
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/api/v1/coordinator", get(coordinator_info))
        .route("/api/v1/me", get(members::whoami))
        .route(
            "/api/v1/networks",
            post(networks::create_network).get(networks::list_networks),
        )
        .route(NET, get(networks::show_network))
        .route(
            &format!("{NET}/settings"),
            get(networks::get_settings).patch(networks::change_settings),
        )
        .route(
            &format!("{NET}/preauth-keys"),
            post(networks::create_preauth_key).get(networks::list_preauth_keys),
        )
        .route(
            &format!("{NET}/preauth-keys/{{id}}"),
            delete(networks::revoke_preauth_key),
        )
        .route(&format!("{NET}/audit"), get(networks::audit_log))
        .route(&format!("{NET}/denylist"), get(networks::list_denylist))
        .route(
            &format!("{NET}/denylist/{{id}}"),
            delete(networks::lift_denylist),
        )
        .route(&format!("{NET}/members"), get(members::list_members))
        .route(
            &format!("{NET}/members/{{user}}"),
            delete(members::remove_member),
        )
        .route(
            &format!("{NET}/members/{{user}}/role"),
            put(members::change_role),
        )
        .route(
            &format!("{NET}/members/{{user}}/approve"),
            post(members::approve_member),
        )
        .route(
            &format!("{NET}/invites"),
            post(members::create_invite).get(members::list_invites),
        )
        .route(
            &format!("{NET}/invites/{{id}}"),
            delete(members::revoke_invite),
        )
        .route("/api/v1/invites/{secret}", get(members::show_invite))
        .route(
            "/api/v1/invites/{secret}/redeem",
            post(members::redeem_invite),
        )
        .route(&format!("{NET}/devices"), get(devices::list_devices))
        .route(
            &format!("{NET}/devices/{{id}}"),
            delete(devices::remove_device),
        )
        .route(
            &format!("{NET}/devices/{{id}}/revoke"),
            post(devices::revoke_device),
        )
        .route(
            &format!("{NET}/devices/{{id}}/approve"),
            post(devices::approve_device),
        )
        .route(
            &format!("{NET}/devices/{{id}}/key-expiry"),
            put(devices::set_key_expiry),
        )
        .route(
            &format!("{NET}/devices/{{id}}/wg-quick"),
            get(devices::wg_quick_config),
        )
        .route(
            &format!("{NET}/device-codes/{{code}}/approve"),
            post(devices::approve_device_code),
        )
        .route(
            &format!("{NET}/rotate-keys"),
            post(devices::rotate_network_keys),
        )
        .route(
            &format!("{NET}/wireguard-peers"),
            post(devices::create_wireguard_peer),
        )
        .route("/api/v1/register", limited(post(register::register)))
        .route(
            "/api/v1/device-codes",
            limited(post(register::start_device_code)),
        )
        .route(
            "/api/v1/device-codes/poll",
            limited(post(register::poll_device_code)),
        )
        .route(
            "/api/v1/device-codes/{code}",
            get(devices::show_device_code),
        )
        .route("/api/v1/rotate-key", limited(post(register::rotate_key)))
        .route("/api/v1/relay/admit", post(relay::admit_batch))
        .route("/api/v1/relay/admit/{node_key}", get(relay::admit))
        .route("/api/v1/relay/revocations", get(relay::revocations))
        .route("/api/v1/map", limited(get(map::map_stream)))
        .route(
            &format!("{NET}/compute"),
            get(ledger::get_compute).put(ledger::put_compute),
        )
        .route(&format!("{NET}/ledger/balances"), get(ledger::balances))
        .route(&format!("{NET}/ledger/entries"), get(ledger::entries))
        .route(&format!("{NET}/ledger/export"), get(ledger::export))
        .route(&format!("{NET}/ledger/grants"), post(ledger::grant))
        .route(
            "/api/v1/receipts",
            post(ledger::receipts).layer(axum::extract::DefaultBodyLimit::max(
                ledger::MAX_BATCH_BYTES,
            )),
        )
        .route(
            &format!("{NET}/policy"),
            get(policy::get_policy).put(policy::put_policy).layer(
                axum::extract::DefaultBodyLimit::max(crate::policy::MAX_POLICY_BYTES),
            ),
        )
        .route(&format!("{NET}/policy/evaluate"), post(policy::evaluate))
        .route(
            &format!("{NET}/policy/check"),
            post(policy::check_policy).layer(axum::extract::DefaultBodyLimit::max(
                crate::policy::MAX_POLICY_BYTES,
            )),
        )
        .route(&format!("{NET}/devices/{{id}}/tags"), put(policy::set_tags))
        .route(
            &format!("{NET}/dns"),
            get(policy::get_dns).put(policy::put_dns),
        )
        .route("/api/v1/balance", post(ledger::device_balance))
        .route("/metrics", get(ledger::metrics))
        .fallback(|| async { AppError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async { AppError::MethodNotAllowed })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// How often the sweeper looks for node keys that expired.
const EXPIRY_CHECK: Duration = Duration::from_secs(5);
/// How often the sweeper looks for streams whose device is gone. Removal
/// through this server closes the stream at once; this catches every other
/// way a device disappears (another process on the same database, an
/// ephemeral device deleted as it reconnected, a stream that authenticated
/// just as its device was removed), within this interval.
pub(crate) const PRESENCE_CHECK: Duration = Duration::from_secs(2);

/// Marks devices offline, deletes departed ephemeral devices, and shuts out
/// devices whose node key expired, forever.
pub async fn run_sweeper(state: SharedState) {
    if let Err(e) = adopt_ephemeral(&state, Instant::now()).await {
        tracing::warn!(error = %e, "listing ephemeral devices at start");
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_expiry_check = Instant::now() - EXPIRY_CHECK;
    let mut last_presence_check = Instant::now();
    loop {
        tick.tick().await;
        if last_presence_check.elapsed() >= PRESENCE_CHECK {
            last_presence_check = Instant::now();
            if let Err(e) = close_streams_of_removed(&state).await {
                tracing::warn!(error = %e, "checking streams of removed devices");
            }
        }
        for gone in state.hub.sweep(Instant::now()) {
            match state
                .store
                .delete_device(gone.device_id, state.clock.now())
                .await
            {
                Ok(()) => {
                    tracing::info!(device = gone.device_id, "ephemeral device removed");
                    if let Err(e) =
                        crate::policy::device_gone(&state, gone.network_id, gone.device_id)
                    {
                        tracing::warn!(error = %e, "removing a device from the policy");
                    }
                    state.hub.revoke_relay_access(gone.node_key);
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
        if last_expiry_check.elapsed() >= EXPIRY_CHECK {
            last_expiry_check = Instant::now();
            if let Err(e) = shut_out_expired(&state).await {
                tracing::warn!(error = %e, "checking node-key expiry");
            }
        }
    }
}

/// At start, who was connected before is not known (a restart forgets it):
/// every ephemeral device without a stream starts its grace period at
/// `now`, and one that does not come back within it is deleted as if it
/// had just left. Pending deletions thus survive a restart.
pub(crate) async fn adopt_ephemeral(state: &SharedState, now: Instant) -> Result<(), AppError> {
    for row in state.store.ephemeral_devices().await? {
        state
            .hub
            .depart_ephemeral(row.network_id, row.id, row.node_key()?, now);
    }
    Ok(())
}

/// Ends every map stream whose device no longer exists or was revoked.
/// Returns how many it ended.
pub(crate) async fn close_streams_of_removed(state: &SharedState) -> Result<usize, AppError> {
    let live = state.hub.sessions();
    let ids: Vec<i64> = live.iter().map(|l| l.device_id).collect();
    let present = state.store.present_devices(&ids).await?;
    let mut closed = 0;
    for l in live.into_iter().filter(|l| !present.contains(&l.device_id)) {
        tracing::info!(
            device = l.device_id,
            "closing the stream of a removed device"
        );
        state.hub.close(
            l,
            platform::api::ApiErrorBody {
                code: "forbidden".into(),
                message: "this device was removed or revoked".into(),
            },
        );
        crate::policy::device_gone(state, l.network_id, l.device_id)?;
        closed += 1;
    }
    Ok(closed)
}

/// Devices whose node key expired since the last look are shut out once.
/// `GET /api/v1/coordinator`: the keys a device pins and proves its node
/// key against. Public: they are public keys.
async fn coordinator_info(State(s): State<SharedState>) -> Json<CoordinatorInfo> {
    Json(s.identity.info())
}

async fn shut_out_expired(state: &SharedState) -> Result<(), AppError> {
    for row in state.store.take_newly_expired(state.clock.now()).await? {
        tracing::info!(device = row.id, name = %row.name, "node key expired");
        crate::fanout::key_expired(state, &row)?;
    }
    Ok(())
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

/// A request made by a user, with their token (`Authorization: Bearer`).
pub struct Caller(pub UserRow);

impl FromRequestParts<SharedState> for Caller {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, AppError> {
        state
            .store
            .user_by_token(bearer(parts, "token")?)
            .await?
            .map(Caller)
            .ok_or_else(|| AppError::Unauthorized("invalid token".into()))
    }
}

/// A user when the request carries a token; nobody when it carries none.
/// A token that is present but wrong is still refused.
pub struct MaybeCaller(pub Option<UserRow>);

impl FromRequestParts<SharedState> for MaybeCaller {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, AppError> {
        if parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .is_none()
        {
            return Ok(MaybeCaller(None));
        }
        Caller::from_request_parts(parts, state)
            .await
            .map(|c| MaybeCaller(Some(c.0)))
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
mod ledger_tests;
#[cfg(test)]
mod matrix_tests;
#[cfg(test)]
mod people_tests;
#[cfg(test)]
mod policy_tests;
#[cfg(test)]
mod relay_tests;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;
