//! Compute rules and the credit ledger over HTTP: a network's rules
//! (members read, admins write), receipts delivered by workers, balances,
//! entries and their export, admin grants, a device asking for its owner's
//! spendable credits, and the ledger's OpenMetrics counters.

use std::sync::LazyLock;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, StreamExt as _};
use platform::jobs::{
    ComputeRules, ReceiptBatch, ReceiptBatchResult, ReceiptOutcome, ReceiptResult,
    MAX_RECEIPTS_PER_BATCH,
};
use platform::ledger::{
    claimed_ids, open_receipt, Account, BalanceAnswer, BalanceRequest, Balances, GrantRequest,
    LedgerEntry, DOMAIN_BALANCE,
};
use platform::people::{DeviceState, Role};
use platform::signed::Signed;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::Value;

use super::register::signed_error;
use super::{ApiPath, Body, Caller, SharedState};
use crate::error::AppError;
use crate::fanout;
use crate::store::compute_rules::check_rules;
use crate::store::ledger::{Delivered, EntryQuery, Ingested};
use crate::store::NetCtx;

/// Largest receipt batch body: room for [`MAX_RECEIPTS_PER_BATCH`]
/// receipts of 8 KiB (a receipt with its ticket is about 1.5 KiB).
pub const MAX_BATCH_BYTES: usize = MAX_RECEIPTS_PER_BATCH * 8 * 1024;
/// Most entries one listing returns.
const MAX_ENTRIES: u32 = 10_000;
/// Entries read per page while exporting.
const EXPORT_PAGE: u32 = 1_000;

/// Counters since the process started, shared by every server state in
/// the process (Prometheus counters may reset on restart).
struct LedgerMetrics {
    minted: Counter,
    burned: Counter,
    receipts: Family<OutcomeLabels, Counter>,
    registry: Registry,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

static METRICS: LazyLock<LedgerMetrics> = LazyLock::new(|| {
    let (minted, burned) = (Counter::default(), Counter::default());
    let receipts = Family::<OutcomeLabels, Counter>::default();
    // Every outcome is shown, at 0 until it happens.
    for (_, outcome) in OUTCOMES {
        receipts.get_or_create_owned(&OutcomeLabels { outcome });
    }
    let mut registry = Registry::default();
    // Counters are named without `_total`: the encoder appends it.
    registry.register(
        "crank_credits_minted_micro",
        "Micro-credits minted for validated work",
        minted.clone(),
    );
    registry.register(
        "crank_credits_burned_micro",
        "Micro-credits burned by submitted jobs",
        burned.clone(),
    );
    registry.register(
        "crank_receipts",
        "Receipts delivered, by outcome",
        receipts.clone(),
    );
    LedgerMetrics {
        minted,
        burned,
        receipts,
        registry,
    }
});

const OUTCOMES: [(ReceiptOutcome, &str); 4] = [
    (ReceiptOutcome::Recorded, "recorded"),
    (ReceiptOutcome::Duplicate, "duplicate"),
    (ReceiptOutcome::Conflict, "conflict"),
    (ReceiptOutcome::Refused, "refused"),
];

fn outcome_label(o: ReceiptOutcome) -> &'static str {
    OUTCOMES
        .iter()
        .find(|(x, _)| *x == o)
        .map_or(OUTCOMES[0].1, |(_, label)| label)
}

/// `GET /metrics`: the ledger's counters in the OpenMetrics text format.
pub async fn metrics() -> impl IntoResponse {
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &METRICS.registry);
    (
        [(header::CONTENT_TYPE, platform::OPENMETRICS_CONTENT_TYPE)],
        text,
    )
}

/// Any member reads the rules (devices get them in the netmap anyway).
pub async fn get_compute(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
) -> Result<Json<ComputeRules>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    Ok(Json(s.store.compute_rules(ctx.id).await?))
}

/// Admins replace the rules (fields left out take their defaults); every
/// connected device gets them in a fresh netmap.
pub async fn put_compute(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
    Body(body): Body<Value>,
) -> Result<Json<ComputeRules>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    ctx.require(Role::Admin)?;
    let rules = check_rules(&body)?;
    if s.store
        .set_compute_rules(&ctx.who(), ctx.id, &rules, s.clock.now())
        .await?
    {
        let devices = s.store.network_devices(ctx.id).await?;
        let told = fanout::settings_changed(&s, &devices);
        tracing::info!(network = ctx.id, devices = told, "compute rules changed");
    }
    Ok(Json(rules))
}

/// `POST /api/v1/receipts`: workers deliver signed receipts. Each gets its
/// own outcome; only a malformed body fails the whole request.
pub async fn receipts(
    State(s): State<SharedState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ReceiptBatchResult>, AppError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            AppError::PayloadTooLarge(format!(
                "a receipt batch is at most {MAX_BATCH_BYTES} bytes"
            ))
        } else {
            AppError::BadRequest(format!("could not read body: {e}"))
        }
    })?;
    let batch: ReceiptBatch = serde_json::from_slice(&bytes)
        .map_err(|e| AppError::BadRequest(format!("invalid JSON body: {e}")))?;
    if batch.receipts.len() > MAX_RECEIPTS_PER_BATCH {
        return Err(AppError::PayloadTooLarge(format!(
            "at most {MAX_RECEIPTS_PER_BATCH} receipts per batch"
        )));
    }
    let now = s.clock.now();
    // Two signatures per receipt: off the async workers.
    let delivered = tokio::task::spawn_blocking(move || {
        batch
            .receipts
            .into_iter()
            .map(|signed| {
                let (job_id, chunk_id) = claimed_ids(&signed);
                Delivered {
                    opened: open_receipt(&signed, now),
                    signed,
                    job_id,
                    chunk_id,
                }
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| AppError::Internal(anyhow::anyhow!("checking signatures: {e}")))?;
    let results = s.store.ingest_receipts(&delivered, now).await?;
    for r in &results {
        report(r);
    }
    Ok(Json(ReceiptBatchResult {
        results: results
            .into_iter()
            .map(|r| ReceiptResult {
                job_id: r.job_id,
                chunk_id: r.chunk_id,
                outcome: r.outcome,
                error: r.error,
            })
            .collect(),
    }))
}

/// Counts a committed outcome and logs it under the job's trace id.
fn report(r: &Ingested) {
    METRICS
        .receipts
        .get_or_create(&OutcomeLabels {
            outcome: outcome_label(r.outcome),
        })
        .inc();
    let span = tracing::info_span!("job", trace_id = %r.job_id, chunk = r.chunk_id);
    let _entered = span.enter();
    let Some(rec) = &r.recorded else {
        match r.outcome {
            ReceiptOutcome::Duplicate => tracing::debug!("receipt delivered again"),
            _ => tracing::info!(
                outcome = ?r.outcome,
                error = r.error.as_deref().unwrap_or(""),
                "receipt not entered"
            ),
        }
        return;
    };
    METRICS.minted.inc_by(rec.minted);
    METRICS.burned.inc_by(rec.burned);
    tracing::debug!(network = %rec.network, worker = %rec.worker, submitter = %rec.submitter, receipt = rec.receipt_id, "receipt entered");
    if rec.ok {
        tracing::info!(receipt = rec.receipt_id, "job_completed");
    } else {
        tracing::info!(receipt = rec.receipt_id, "job_failed");
    }
    if rec.burned > 0 {
        tracing::info!(
            amount = rec.burned,
            from_pool = rec.from_pool,
            "credits_burned"
        );
    }
    if rec.minted > 0 {
        tracing::info!(amount = rec.minted, "credits_minted");
    }
}

/// Admins see every account; others their own and the pool.
pub async fn balances(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
) -> Result<Json<Balances>, AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    let mut accounts = s.store.balances(ctx.id).await?;
    if !ctx.is_admin() {
        let own = Account::Member(ctx.user.id);
        accounts.retain(|a| a.account == own || a.account == Account::Pool);
    }
    Ok(Json(Balances {
        network: ctx.name,
        accounts,
    }))
}

#[derive(Deserialize)]
pub struct EntryParams {
    /// Only entries to or from this member's account.
    pub member: Option<String>,
    /// Only entries of jobs this device ran or submitted.
    pub device: Option<String>,
    /// Only entries after this id.
    pub after: Option<i64>,
    pub limit: Option<u32>,
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, AppError> {
    q.map(|Query(t)| t)
        .map_err(|e| AppError::BadRequest(format!("query: {}", e.body_text())))
}

/// The account a listing may show: admins name anyone (or no one: all);
/// others only themselves.
async fn account_filter(
    s: &SharedState,
    ctx: &NetCtx,
    member: Option<&str>,
) -> Result<Option<Account>, AppError> {
    match member {
        Some(name) if ctx.is_admin() => {
            let u = s
                .store
                .user_by_name(name)
                .await?
                .ok_or_else(|| AppError::NotFound(format!("no user named {name:?}")))?;
            Ok(Some(Account::Member(u.id)))
        }
        Some(name) if name != ctx.user.username => Err(AppError::Forbidden(
            "only admins see other members' entries".into(),
        )),
        _ if ctx.is_admin() => Ok(None),
        _ => Ok(Some(Account::Member(ctx.user.id))),
    }
}

/// Admins see every entry; others the entries of their own account.
pub async fn entries(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
    params: Result<Query<EntryParams>, QueryRejection>,
) -> Result<Json<Vec<LedgerEntry>>, AppError> {
    let params = query(params)?;
    let ctx = s.store.network_for(&network, &user).await?;
    let account = account_filter(&s, &ctx, params.member.as_deref()).await?;
    let device_id = match &params.device {
        None => None,
        Some(name) => {
            let d = s.store.device_named(ctx.id, name).await?;
            // Guests do not learn which devices others have.
            if ctx.role == Role::Guest && d.user_id != Some(ctx.user.id) {
                return Err(AppError::NotFound(format!(
                    "no device named {name:?} in this network"
                )));
            }
            Some(d.id)
        }
    };
    let q = EntryQuery {
        network_id: ctx.id,
        account,
        device_id,
        after: params.after.unwrap_or(0),
        limit: params.limit.unwrap_or(1000).clamp(1, MAX_ENTRIES),
    };
    Ok(Json(s.store.ledger_entries(&q).await?))
}

#[derive(Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    #[default]
    Jsonl,
    Csv,
}

#[derive(Deserialize)]
pub struct ExportParams {
    #[serde(default)]
    pub format: ExportFormat,
}

/// Every entry of the network, oldest first, streamed page by page: JSON
/// lines, or CSV with a header row (admins).
pub async fn export(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
    params: Result<Query<ExportParams>, QueryRejection>,
) -> Result<Response, AppError> {
    let format = query(params)?.format;
    let ctx = s.store.network_for(&network, &user).await?;
    ctx.require(Role::Admin)?;
    let network_id = ctx.id;
    let header_row = match format {
        ExportFormat::Csv => format!("{}\n", LedgerEntry::CSV_HEADER),
        ExportFormat::Jsonl => String::new(),
    };
    let pages = stream::unfold(Some(0i64), move |after| {
        let s = s.clone();
        async move {
            let q = EntryQuery {
                network_id,
                account: None,
                device_id: None,
                after: after?,
                limit: EXPORT_PAGE,
            };
            let page = match s.store.ledger_entries(&q).await {
                Ok(p) if p.is_empty() => return None,
                Ok(p) => p,
                Err(e) => return Some((Err(e), None)),
            };
            let next = page.last().map(|e| e.id);
            let mut text = String::new();
            for e in &page {
                match format {
                    ExportFormat::Csv => text.push_str(&e.csv_row()),
                    ExportFormat::Jsonl => match serde_json::to_string(e) {
                        Ok(line) => text.push_str(&line),
                        Err(err) => return Some((Err(anyhow::Error::from(err).into()), None)),
                    },
                }
                text.push('\n');
            }
            Some((Ok(Bytes::from(text)), next))
        }
    });
    let body = stream::once(async move { Ok::<_, AppError>(Bytes::from(header_row)) }).chain(pages);
    let content_type = match format {
        ExportFormat::Csv => "text/csv; charset=utf-8",
        ExportFormat::Jsonl => "application/x-ndjson",
    };
    Ok((
        [(header::CONTENT_TYPE, content_type)],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

/// Admins mint credits into a member's account or the pool (which members
/// draw on when the network shares it).
pub async fn grant(
    Caller(user): Caller,
    State(s): State<SharedState>,
    ApiPath(network): ApiPath<String>,
    Body(req): Body<GrantRequest>,
) -> Result<(StatusCode, Json<LedgerEntry>), AppError> {
    let ctx = s.store.network_for(&network, &user).await?;
    ctx.require(Role::Admin)?;
    let (to, label) = match &req.member {
        None => (Account::Pool, "pool".to_owned()),
        Some(name) => {
            let m = s.store.member(ctx.id, name).await?;
            (Account::Member(m.user_id), format!("member:{name}"))
        }
    };
    let entry = s
        .store
        .admin_grant(&ctx.who(), ctx.id, to, &label, req.amount, s.clock.now())
        .await?;
    tracing::info!(network = ctx.id, account = %to, amount = req.amount, "credits granted");
    Ok((StatusCode::CREATED, Json(entry)))
}

/// `POST /api/v1/balance`: a device asks what its owner may spend.
pub async fn device_balance(
    State(s): State<SharedState>,
    Body(signed): Body<Signed>,
) -> Result<Json<BalanceAnswer>, AppError> {
    let _: BalanceRequest = signed
        .verify(DOMAIN_BALANCE, s.clock.now())
        .map_err(signed_error)?;
    let row = s
        .store
        .device_by_device_key(&signed.device_key)
        .await?
        .ok_or_else(|| AppError::Unauthorized("device is not registered".into()))?;
    if row.state(s.clock.now()) == DeviceState::Revoked {
        return Err(AppError::Forbidden(format!(
            "this device was revoked in network {:?}",
            row.network
        )));
    }
    let (Some(user_id), Some(user)) = (row.user_id, row.owner.clone()) else {
        return Err(AppError::Forbidden("this device has no owner".into()));
    };
    let rules = s.store.compute_rules(row.network_id).await?;
    let balance = s
        .store
        .balance(row.network_id, Account::Member(user_id))
        .await?;
    let pool = s.store.balance(row.network_id, Account::Pool).await?;
    let spendable = if rules.rates.shared_pool {
        balance.saturating_add(pool)
    } else {
        balance
    };
    Ok(Json(BalanceAnswer {
        network: row.network,
        user,
        balance,
        pool,
        spendable,
    }))
}
