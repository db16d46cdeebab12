//! The credit ledger: initial and admin grants, delivered receipts turned
//! into burn and mint entries, balances and entries for reading.
//!
//! Entries are append-only (triggers refuse UPDATE and DELETE) and
//! double-entry; `ledger_balances` is kept by a trigger in the same
//! transaction as each entry, so it always equals the sum of the entries.
//! A batch of receipts is one transaction: a crash leaves either all of a
//! batch's receipts with their entries and events, or none.

use platform::jobs::{JobStatus, ReceiptOutcome, Ticket, MICRO};
use platform::ledger::{
    earning_tier, format_credits, job_postings, Account, AccountBalance, EntryKind, JobCharge,
    LedgerEntry, OpenedReceipt, Posting, Refusal, TIMEOUT_SLACK_MS,
};
use platform::signed::Signed;
use rand_core::{OsRng, RngCore};
use serde_json::json;
use sqlx::SqliteConnection;

use super::audit::{self, Change, Who};
use super::devices::SELECT_DEVICE;
use super::{DeviceRow, Store};
use crate::error::AppError;

/// The job id of a member's initial grant: one per member and network,
/// ever (leaving and rejoining does not grant again).
pub fn initial_grant_job(user_id: i64) -> String {
    format!("grant:{user_id}")
}

/// A receipt as delivered, opened (or refused) off the database.
pub struct Delivered {
    pub signed: Signed,
    pub opened: Result<OpenedReceipt, Refusal>,
    /// The job and chunk it claims, for the answer.
    pub job_id: String,
    pub chunk_id: u32,
}

/// What became of one receipt.
#[derive(Debug)]
pub struct Ingested {
    pub job_id: String,
    pub chunk_id: u32,
    pub outcome: ReceiptOutcome,
    pub error: Option<String>,
    /// What was written, when it was recorded now.
    pub recorded: Option<Recorded>,
}

/// A receipt entered in the ledger.
#[derive(Debug)]
pub struct Recorded {
    pub network: String,
    pub receipt_id: i64,
    pub ok: bool,
    pub worker: String,
    pub submitter: String,
    pub burned: u64,
    pub minted: u64,
    pub from_pool: u64,
}

impl Ingested {
    fn answer(d: &Delivered, outcome: ReceiptOutcome, error: Option<String>) -> Self {
        Ingested {
            job_id: d.job_id.clone(),
            chunk_id: d.chunk_id,
            outcome,
            error,
            recorded: None,
        }
    }

    fn refused(d: &Delivered, why: Refusal) -> Self {
        Self::answer(d, ReceiptOutcome::Refused, Some(why.to_string()))
    }
}

/// A receipt that passed every check, with what the checks found.
struct Admitted<'a> {
    d: &'a Delivered,
    opened: &'a OpenedReceipt,
    ticket: &'a Ticket,
    worker: DeviceRow,
    submitter: DeviceRow,
    payer: i64,
}

/// Which entries to list.
pub struct EntryQuery {
    pub network_id: i64,
    /// Only entries moving credits to or from this account.
    pub account: Option<Account>,
    /// Only entries of receipts this device worked or submitted.
    pub device_id: Option<i64>,
    /// Only entries after this id (paging).
    pub after: i64,
    pub limit: u32,
}

type EntryRow = (
    i64,
    String,
    String,
    i64,
    String,
    String,
    String,
    i64,
    Option<i64>,
    String,
    i64,
);

fn corrupt(what: &str, e: impl std::fmt::Display) -> AppError {
    AppError::Internal(anyhow::anyhow!("stored {what} is invalid: {e}"))
}

fn to_entry(
    (id, network, job_id, chunk_id, kind, debit, credit, amount, receipt_id, trace_id, at): EntryRow,
) -> Result<LedgerEntry, AppError> {
    Ok(LedgerEntry {
        id,
        network,
        job_id,
        chunk_id: u32::try_from(chunk_id).map_err(|e| corrupt("chunk id", e))?,
        kind: kind.parse().map_err(|e| corrupt("entry kind", e))?,
        debit: debit.parse().map_err(|e| corrupt("account", e))?,
        credit: credit.parse().map_err(|e| corrupt("account", e))?,
        amount: u64::try_from(amount).map_err(|e| corrupt("amount", e))?,
        receipt_id,
        trace_id,
        created_at: at.max(0) as u64,
    })
}

fn db_amount(amount: u64) -> Result<i64, AppError> {
    i64::try_from(amount).map_err(|_| AppError::BadRequest("amount is too large".into()))
}

/// One entry to append.
struct NewEntry<'a> {
    network_id: i64,
    job_id: &'a str,
    chunk_id: u32,
    posting: Posting,
    receipt_id: Option<i64>,
    now: u64,
}

async fn append(conn: &mut SqliteConnection, e: NewEntry<'_>) -> Result<i64, AppError> {
    let r = sqlx::query(
        "INSERT INTO ledger_entries (network_id, job_id, chunk_id, kind, debit, credit, amount, \
         receipt_id, trace_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(e.network_id)
    .bind(e.job_id)
    .bind(i64::from(e.chunk_id))
    .bind(e.posting.kind.as_str())
    .bind(e.posting.debit.to_string())
    .bind(e.posting.credit.to_string())
    .bind(db_amount(e.posting.amount)?)
    .bind(e.receipt_id)
    .bind(e.job_id)
    .bind(e.now as i64)
    .execute(conn)
    .await?;
    Ok(r.last_insert_rowid())
}

async fn event(
    conn: &mut SqliteConnection,
    network_id: i64,
    job_id: &str,
    kind: &str,
    detail: serde_json::Value,
    now: u64,
) -> Result<(), AppError> {
    sqlx::query(
        "INSERT INTO job_events (network_id, job_id, kind, trace_id, detail, at) \
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(network_id)
    .bind(job_id)
    .bind(kind)
    .bind(job_id)
    .bind(detail.to_string())
    .bind(now as i64)
    .execute(conn)
    .await?;
    Ok(())
}

async fn device_by_key(
    conn: &mut SqliteConnection,
    key: &str,
) -> Result<Option<DeviceRow>, AppError> {
    Ok(
        sqlx::query_as(&format!("{SELECT_DEVICE} WHERE d.device_key = ?"))
            .bind(key)
            .fetch_optional(conn)
            .await?,
    )
}

impl Store {
    pub(super) async fn balance_in(
        conn: &mut SqliteConnection,
        network_id: i64,
        account: Account,
    ) -> Result<i64, AppError> {
        let row: Option<(i64,)> = sqlx::query_as(
            "SELECT balance FROM ledger_balances WHERE network_id = ? AND account = ?",
        )
        .bind(network_id)
        .bind(account.to_string())
        .fetch_optional(conn)
        .await?;
        Ok(row.map_or(0, |r| r.0))
    }

    pub async fn balance(&self, network_id: i64, account: Account) -> Result<i64, AppError> {
        Self::balance_in(&mut *self.pool().acquire().await?, network_id, account).await
    }

    /// A member who just became active gets the network's initial grant,
    /// once per network ever; in the caller's transaction.
    pub(super) async fn grant_initial(
        conn: &mut SqliteConnection,
        network_id: i64,
        user_id: i64,
        now: u64,
    ) -> Result<(), AppError> {
        let amount = Self::compute_rules_in(conn, network_id)
            .await?
            .rates
            .initial_grant;
        if amount == 0 {
            return Ok(());
        }
        let job = initial_grant_job(user_id);
        sqlx::query(
            "INSERT INTO ledger_entries (network_id, job_id, chunk_id, kind, debit, credit, amount, \
             trace_id, created_at) VALUES (?, ?, 0, 'grant', 'mint', ?, ?, ?, ?) \
             ON CONFLICT (network_id, job_id, chunk_id, kind) DO NOTHING",
        )
        .bind(network_id)
        .bind(&job)
        .bind(Account::Member(user_id).to_string())
        .bind(db_amount(amount)?)
        .bind(&job)
        .bind(now as i64)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// An admin mints credits into a member's account or the pool.
    /// `label` names the account in the audit log.
    pub async fn admin_grant(
        &self,
        who: &Who,
        network_id: i64,
        to: Account,
        label: &str,
        amount: u64,
        now: u64,
    ) -> Result<LedgerEntry, AppError> {
        if amount == 0 || amount > 1_000_000 * MICRO {
            return Err(AppError::BadRequest(
                "a grant is more than 0 and at most 1,000,000 credits".into(),
            ));
        }
        let mut id = [0u8; 16];
        OsRng.fill_bytes(&mut id);
        let job = format!("admin-grant:{}", hex::encode(id));
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let entry_id = append(
            &mut tx,
            NewEntry {
                network_id,
                job_id: &job,
                chunk_id: 0,
                posting: Posting {
                    kind: EntryKind::Grant,
                    debit: Account::Mint,
                    credit: to,
                    amount,
                },
                receipt_id: None,
                now,
            },
        )
        .await?;
        audit::record(
            &mut tx,
            who,
            Change::new(network_id, "ledger.granted", format!("account:{label}"))
                .to(format!("{} credits", format_credits(db_amount(amount)?))),
            now,
        )
        .await?;
        let entry = Self::entry_in(&mut tx, entry_id).await?;
        tx.commit().await?;
        Ok(entry)
    }

    async fn entry_in(conn: &mut SqliteConnection, id: i64) -> Result<LedgerEntry, AppError> {
        let row: EntryRow = sqlx::query_as(&format!("{SELECT_ENTRY} WHERE e.id = ?"))
            .bind(id)
            .fetch_one(conn)
            .await?;
        to_entry(row)
    }

    /// Enters a batch of delivered receipts, in order, in one transaction.
    pub async fn ingest_receipts(
        &self,
        batch: &[Delivered],
        now: u64,
    ) -> Result<Vec<Ingested>, AppError> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        let mut out = Vec::with_capacity(batch.len());
        for d in batch {
            out.push(Self::ingest_one(&mut tx, d, now).await?);
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn ingest_one(
        conn: &mut SqliteConnection,
        d: &Delivered,
        now: u64,
    ) -> Result<Ingested, AppError> {
        let o = match &d.opened {
            Ok(o) => o,
            Err(why) => return Ok(Ingested::refused(d, why.clone())),
        };
        let r = &o.receipt;
        let Some(worker) = device_by_key(conn, &o.worker_key.to_string()).await? else {
            return Ok(Ingested::refused(d, Refusal::UnknownWorker));
        };
        let earlier: Option<(String,)> = sqlx::query_as(
            "SELECT receipt_hash FROM receipts WHERE network_id = ? AND job_id = ? AND chunk_id = ?",
        )
        .bind(worker.network_id)
        .bind(&r.job_id)
        .bind(i64::from(r.chunk_id))
        .fetch_optional(&mut *conn)
        .await?;
        if let Some((hash,)) = earlier {
            return Ok(if hash == o.receipt_hash {
                Ingested::answer(d, ReceiptOutcome::Duplicate, None)
            } else {
                Ingested::answer(
                    d,
                    ReceiptOutcome::Conflict,
                    Some("a different receipt was entered for this job and chunk".into()),
                )
            });
        }
        if worker.revoked_at.is_some() || !worker.approved {
            return Ok(Ingested::refused(d, Refusal::WorkerRevoked));
        }
        let (ticket, submitter_key) = match &o.checked {
            Ok(t) => t,
            Err(why) => return Ok(Ingested::refused(d, why.clone())),
        };
        if ticket.network != worker.network {
            return Ok(Ingested::refused(
                d,
                Refusal::WrongNetwork {
                    ticket: ticket.network.clone(),
                    worker: worker.network.clone(),
                },
            ));
        }
        let submitter = match device_by_key(conn, &submitter_key.to_string()).await? {
            Some(s) if s.network_id == worker.network_id => s,
            _ => return Ok(Ingested::refused(d, Refusal::ForeignSubmitter)),
        };
        if submitter.revoked_at.is_some() || !submitter.approved {
            return Ok(Ingested::refused(d, Refusal::SubmitterRevoked));
        }
        let Some(payer) = submitter.user_id else {
            return Ok(Ingested::refused(d, Refusal::NoPayer));
        };
        let (used,): (i64,) = sqlx::query_as(
            "SELECT COALESCE(SUM(runtime_ms), 0) FROM receipts WHERE network_id = ? AND ticket_hash = ?",
        )
        .bind(worker.network_id)
        .bind(&r.ticket_hash)
        .fetch_one(&mut *conn)
        .await?;
        let used = u64::try_from(used).unwrap_or(0);
        if used.saturating_add(r.runtime_ms) > ticket.timeout_ms.saturating_add(TIMEOUT_SLACK_MS) {
            return Ok(Ingested::refused(d, Refusal::TicketUsedUp));
        }
        Self::enter(
            conn,
            Admitted {
                d,
                opened: o,
                ticket,
                worker,
                submitter,
                payer,
            },
            now,
        )
        .await
    }

    /// Writes an admitted receipt: the receipt, its postings and its events.
    async fn enter(
        conn: &mut SqliteConnection,
        a: Admitted<'_>,
        now: u64,
    ) -> Result<Ingested, AppError> {
        let Admitted {
            d,
            opened: o,
            ticket,
            worker,
            submitter,
            payer,
        } = a;
        let r = &o.receipt;
        let network_id = worker.network_id;
        let rules = Self::compute_rules_in(conn, network_id).await?;
        let caps = worker.capabilities().ok().flatten();
        let (tier, capped) = earning_tier(caps.as_ref(), &worker.os);
        let charge = JobCharge {
            tier,
            capped,
            runtime_ms: r.runtime_ms,
            status: r.status,
            payer,
            earner: worker.user_id,
            payer_balance: Self::balance_in(conn, network_id, Account::Member(payer)).await?,
            pool_balance: Self::balance_in(conn, network_id, Account::Pool).await?,
            max_cost: ticket.max_cost,
        };
        let postings = job_postings(&rules.rates, &charge);

        let receipt_id = sqlx::query(
            "INSERT INTO receipts (network_id, job_id, chunk_id, receipt_hash, worker_device_id, \
             submitter_device_id, workload, model, runtime_ms, units, status, ticket_hash, \
             received_at, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(network_id)
        .bind(&r.job_id)
        .bind(i64::from(r.chunk_id))
        .bind(&o.receipt_hash)
        .bind(worker.id)
        .bind(submitter.id)
        .bind(ticket.workload.as_str())
        .bind(&ticket.model)
        .bind(db_amount(r.runtime_ms)?)
        .bind(db_amount(r.units)?)
        .bind(r.status.as_str())
        .bind(&r.ticket_hash)
        .bind(now as i64)
        .bind(serde_json::to_string(&d.signed).map_err(anyhow::Error::from)?)
        .execute(&mut *conn)
        .await?
        .last_insert_rowid();
        for p in &postings {
            append(
                conn,
                NewEntry {
                    network_id,
                    job_id: &r.job_id,
                    chunk_id: r.chunk_id,
                    posting: *p,
                    receipt_id: Some(receipt_id),
                    now,
                },
            )
            .await?;
        }
        let sum = |kind: EntryKind, debit: Option<Account>| -> u64 {
            postings
                .iter()
                .filter(|p| p.kind == kind && debit.is_none_or(|a| a == p.debit))
                .map(|p| p.amount)
                .sum()
        };
        let rec = Recorded {
            network: worker.network.clone(),
            receipt_id,
            ok: r.status == JobStatus::Ok,
            worker: worker.name.clone(),
            submitter: submitter.name.clone(),
            burned: sum(EntryKind::Burn, None),
            minted: sum(EntryKind::Mint, None),
            from_pool: sum(EntryKind::Grant, Some(Account::Pool)),
        };
        let detail = json!({
            "chunk_id": r.chunk_id,
            "receipt_id": receipt_id,
            "worker": rec.worker,
            "submitter": rec.submitter,
            "workload": ticket.workload,
            "model": ticket.model,
            "status": r.status,
            "runtime_ms": r.runtime_ms,
            "units": r.units,
            "tier": tier,
            "capped": capped,
        });
        let done = if rec.ok {
            "job_completed"
        } else {
            "job_failed"
        };
        event(conn, network_id, &r.job_id, done, detail.clone(), now).await?;
        if rec.burned > 0 {
            let mut detail = detail.clone();
            detail["amount"] = json!(rec.burned);
            detail["from_pool"] = json!(rec.from_pool);
            detail["account"] = json!(Account::Member(payer));
            event(conn, network_id, &r.job_id, "credits_burned", detail, now).await?;
        }
        if rec.minted > 0 {
            let mut detail = detail;
            detail["amount"] = json!(rec.minted);
            detail["account"] = json!(worker.user_id.map(Account::Member));
            event(conn, network_id, &r.job_id, "credits_minted", detail, now).await?;
        }
        Ok(Ingested {
            job_id: r.job_id.clone(),
            chunk_id: r.chunk_id,
            outcome: ReceiptOutcome::Recorded,
            error: None,
            recorded: Some(rec),
        })
    }

    /// Every account of a network with its balance: the pool and `mint`
    /// first, then members by name.
    pub async fn balances(&self, network_id: i64) -> Result<Vec<AccountBalance>, AppError> {
        let rows: Vec<(String, i64, Option<String>)> = sqlx::query_as(
            "SELECT b.account, b.balance, u.username FROM ledger_balances b \
             LEFT JOIN users u ON b.account = 'member:' || u.id WHERE b.network_id = ?",
        )
        .bind(network_id)
        .fetch_all(self.pool())
        .await?;
        let mut out = rows
            .into_iter()
            .map(|(account, balance, user)| {
                Ok(AccountBalance {
                    account: account.parse().map_err(|e| corrupt("account", e))?,
                    user,
                    balance,
                })
            })
            .collect::<Result<Vec<_>, AppError>>()?;
        out.sort_by(|a, b| {
            let rank = |x: &AccountBalance| match x.account {
                Account::Pool => 0,
                Account::Mint => 1,
                Account::Member(_) => 2,
            };
            (rank(a), &a.user, a.account).cmp(&(rank(b), &b.user, b.account))
        });
        Ok(out)
    }

    pub async fn ledger_entries(&self, q: &EntryQuery) -> Result<Vec<LedgerEntry>, AppError> {
        let account = q.account.map(|a| a.to_string());
        let rows: Vec<EntryRow> = sqlx::query_as(&format!(
            "{SELECT_ENTRY} LEFT JOIN receipts r ON r.id = e.receipt_id \
             WHERE e.network_id = ? AND e.id > ? \
             AND (? IS NULL OR e.debit = ? OR e.credit = ?) \
             AND (? IS NULL OR r.worker_device_id = ? OR r.submitter_device_id = ?) \
             ORDER BY e.id LIMIT ?"
        ))
        .bind(q.network_id)
        .bind(q.after)
        .bind(&account)
        .bind(&account)
        .bind(&account)
        .bind(q.device_id)
        .bind(q.device_id)
        .bind(q.device_id)
        .bind(i64::from(q.limit))
        .fetch_all(self.pool())
        .await?;
        rows.into_iter().map(to_entry).collect()
    }

    /// A device of the network by name (removed devices are not found).
    pub async fn device_named(&self, network_id: i64, name: &str) -> Result<DeviceRow, AppError> {
        sqlx::query_as(&format!(
            "{SELECT_DEVICE} WHERE d.network_id = ? AND d.name = ?"
        ))
        .bind(network_id)
        .bind(name)
        .fetch_optional(self.pool())
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no device named {name:?} in this network")))
    }
}

const SELECT_ENTRY: &str = "SELECT e.id, n.name, e.job_id, e.chunk_id, e.kind, e.debit, e.credit, \
     e.amount, e.receipt_id, e.trace_id, e.created_at FROM ledger_entries e \
     JOIN networks n ON n.id = e.network_id";
