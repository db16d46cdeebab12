//! The credit ledger's vocabulary: accounts, entries and balances as the
//! API shows them, the balance a device asks for before it submits a job,
//! and the pure rules that turn a delivered receipt into ledger postings.
//!
//! Amounts are integer micro-credits ([`MICRO`] per credit). The ledger is
//! double-entry: every posting moves an amount from a debit account to a
//! credit account, so the balances of a network always sum to zero. The
//! `mint` account is where new credits come from and where burned ones go:
//! its balance is minus the credits in circulation.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::capability::{Capabilities, Tier};
use crate::jobs::{
    ticket_hash, CreditRates, JobStatus, Receipt, Ticket, DOMAIN_RECEIPT, DOMAIN_TICKET,
    MAX_ID_LEN, MICRO,
};
use crate::keys::DevicePublic;
use crate::signed::{Signed, SignedError, Timestamped, MAX_CLOCK_SKEW_SECS};

/// Domain of a device's balance request.
pub const DOMAIN_BALANCE: &str = "crank-mesh/balance/v1";

/// Receipts whose ticket was issued longer ago than this are refused:
/// a worker may deliver late after an outage, but not forever.
pub const MAX_TICKET_AGE_SECS: u64 = 30 * 86_400;
/// A receipt's runtime may exceed its ticket's timeout by this much
/// (the worker notices the timeout a little late).
pub const TIMEOUT_SLACK_MS: u64 = 5_000;
/// A receipt's runtime may exceed its own start-to-end span by this much
/// (clock granularity).
pub const WALL_SLACK_MS: u64 = 1_000;
/// Bytes of a receipt's free-text fields (worker name, output hash).
const MAX_RECEIPT_TEXT: usize = 128;
/// Bytes of a signed receipt's payload (its ticket included), and of a
/// ticket's: generous for what they hold, small enough that padding them
/// cannot bloat the append-only tables.
pub const MAX_RECEIPT_PAYLOAD: usize = 8 << 10;
pub const MAX_TICKET_PAYLOAD: usize = 4 << 10;

/// Where credits sit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Account {
    /// A member of the network, by user id.
    Member(i64),
    /// The network's shared pool, which members may draw on when the
    /// network's rules allow it.
    Pool,
    /// Source of minted credits and sink of burned ones.
    Mint,
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Account::Member(id) => write!(f, "member:{id}"),
            Account::Pool => f.write_str("pool"),
            Account::Mint => f.write_str("mint"),
        }
    }
}

impl FromStr for Account {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pool" => Ok(Account::Pool),
            "mint" => Ok(Account::Mint),
            other => other
                .strip_prefix("member:")
                .and_then(|id| id.parse().ok())
                .map(Account::Member)
                .ok_or_else(|| format!("{other:?} is not an account (member:ID, pool or mint)")),
        }
    }
}

impl Serialize for Account {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Account {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Why an entry was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// Credits given: a new member's initial grant, an admin's grant, or
    /// the pool covering a member's shortfall for one job.
    Grant,
    /// Credits earned by a worker's owner for validated work.
    Mint,
    /// Credits a submitter's job used up; they leave circulation.
    Burn,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Grant => "grant",
            EntryKind::Mint => "mint",
            EntryKind::Burn => "burn",
        }
    }
}

impl FromStr for EntryKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "grant" => Ok(EntryKind::Grant),
            "mint" => Ok(EntryKind::Mint),
            "burn" => Ok(EntryKind::Burn),
            other => Err(format!("unknown entry kind {other:?}")),
        }
    }
}

/// One row of the ledger: `amount` moved from `debit` to `credit`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub id: i64,
    pub network: String,
    /// The job it is for; `grant:<user id>` for a member's initial grant,
    /// `admin-grant:<hex>` for an admin's.
    pub job_id: String,
    pub chunk_id: u32,
    pub kind: EntryKind,
    pub debit: Account,
    pub credit: Account,
    /// Micro-credits, always positive.
    pub amount: u64,
    /// The receipt that caused it, if one did.
    #[serde(default)]
    pub receipt_id: Option<i64>,
    /// Follows the job through the logs (its job id).
    pub trace_id: String,
    /// Unix seconds.
    pub created_at: u64,
}

impl LedgerEntry {
    /// The header of the CSV export.
    pub const CSV_HEADER: &'static str =
        "id,network,job_id,chunk_id,kind,debit,credit,amount,receipt_id,trace_id,created_at";

    /// The entry as one CSV line (no newline), fields in [`Self::CSV_HEADER`]'s order.
    pub fn csv_row(&self) -> String {
        [
            self.id.to_string(),
            self.network.clone(),
            self.job_id.clone(),
            self.chunk_id.to_string(),
            self.kind.as_str().to_owned(),
            self.debit.to_string(),
            self.credit.to_string(),
            self.amount.to_string(),
            self.receipt_id.map(|r| r.to_string()).unwrap_or_default(),
            self.trace_id.clone(),
            self.created_at.to_string(),
        ]
        .iter()
        .map(|f| csv_field(f))
        .collect::<Vec<_>>()
        .join(",")
    }
}

/// One CSV field, quoted when it must be.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// An account's balance, micro-credits (negative for `mint`, and for a
/// member whose job overran what they and the pool had).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountBalance {
    pub account: Account,
    /// The member's username, for member accounts.
    #[serde(default)]
    pub user: Option<String>,
    pub balance: i64,
}

/// `GET /api/v1/networks/{net}/ledger/balances`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balances {
    pub network: String,
    pub accounts: Vec<AccountBalance>,
}

/// `POST /api/v1/networks/{net}/ledger/grants` (admins): credits minted
/// into a member's account, or into the pool when `member` is absent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRequest {
    #[serde(default)]
    pub member: Option<String>,
    /// Micro-credits, more than zero.
    pub amount: u64,
}

/// What a device signs ([`DOMAIN_BALANCE`]) to ask for its owner's credits
/// (`POST /api/v1/balance`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceRequest {
    pub timestamp: u64,
}

impl Timestamped for BalanceRequest {
    fn timestamp(&self) -> u64 {
        self.timestamp
    }
}

/// The answer to a [`BalanceRequest`], micro-credits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceAnswer {
    pub network: String,
    /// The device's owner.
    pub user: String,
    pub balance: i64,
    /// The network's shared pool.
    pub pool: i64,
    /// What the owner may spend: `balance + pool` when the network shares
    /// its pool, else `balance`.
    pub spendable: i64,
}

/// Micro-credits as credits, without trailing zeros (`12.5`, `-3`, `0.000001`).
pub fn format_credits(micro: i64) -> String {
    let sign = if micro < 0 { "-" } else { "" };
    let abs = micro.unsigned_abs();
    let whole = abs / MICRO;
    let frac = abs % MICRO;
    if frac == 0 {
        format!("{sign}{whole}")
    } else {
        let digits = format!("{frac:06}");
        format!("{sign}{whole}.{}", digits.trim_end_matches('0'))
    }
}

/// Credits written as a decimal (`12.5`, at most six decimals) as
/// micro-credits.
pub fn parse_credits(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?} is not an amount of credits (like 12 or 0.5)");
    let (whole, frac) = text.trim().split_once('.').unwrap_or((text.trim(), ""));
    if whole.is_empty() && frac.is_empty() {
        return Err(bad());
    }
    if frac.len() > 6
        || !whole
            .bytes()
            .chain(frac.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    let frac: u64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}").parse().map_err(|_| bad())?
    };
    whole
        .checked_mul(MICRO)
        .and_then(|w| w.checked_add(frac))
        .ok_or_else(bad)
}

/// Why a delivered receipt is not entered. Delivering it again will not
/// help.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("receipt: {0}")]
    ReceiptSignature(SignedError),
    #[error("the embedded ticket: {0}")]
    TicketSignature(SignedError),
    #[error("ticket: {0}")]
    TicketShape(String),
    #[error("receipt: {0}")]
    ReceiptShape(String),
    #[error("the receipt's ticket_hash does not match its ticket")]
    TicketHashMismatch,
    #[error("the receipt's job id is not its ticket's")]
    JobIdMismatch,
    #[error("the ticket is addressed to another worker than the receipt's signer")]
    NotTheAddressee,
    #[error("the ticket was issued more than {} days ago", MAX_TICKET_AGE_SECS / 86_400)]
    TicketTooOld,
    #[error("the ticket was issued in the future")]
    TicketFromTheFuture,
    #[error("runtime {runtime_ms} ms exceeds the ticket's timeout of {timeout_ms} ms")]
    OverTimeout { runtime_ms: u64, timeout_ms: u64 },
    #[error("runtime {runtime_ms} ms exceeds the {span_ms} ms between start and end")]
    OverWallClock { runtime_ms: u64, span_ms: u64 },
    #[error("the worker is not a registered device")]
    UnknownWorker,
    #[error("the worker device is revoked or not approved")]
    WorkerRevoked,
    #[error("the ticket is for network {ticket:?}; the worker is in {worker:?}")]
    WrongNetwork { ticket: String, worker: String },
    #[error("the ticket was not signed by a device of the worker's network")]
    ForeignSubmitter,
    #[error("the ticket's submitting device is revoked or not approved")]
    SubmitterRevoked,
    #[error("the ticket's submitting device has no owner to charge")]
    NoPayer,
    #[error("the receipts for this ticket add up to more than its timeout")]
    TicketUsedUp,
}

/// A receipt whose signatures verify, with what the checks that need no
/// database found.
#[derive(Clone, Debug)]
pub struct OpenedReceipt {
    pub receipt: Receipt,
    /// SHA-256 of the signed payload, hex: identical deliveries share it.
    pub receipt_hash: String,
    /// The worker: who signed the receipt.
    pub worker_key: DevicePublic,
    /// The ticket and its signer (the submitting device), or why the
    /// receipt is unacceptable on its own.
    pub checked: Result<(Ticket, DevicePublic), Refusal>,
}

/// The job and chunk a receipt claims, read without trusting it (to name
/// a refusal in the answer).
pub fn claimed_ids(signed: &Signed) -> (String, u32) {
    #[derive(Deserialize)]
    struct Ids {
        #[serde(default)]
        job_id: String,
        #[serde(default)]
        chunk_id: u32,
    }
    serde_json::from_str::<Ids>(&signed.payload)
        .map(|i| (i.job_id, i.chunk_id))
        .unwrap_or_default()
}

/// Opens a receipt ([`DOMAIN_RECEIPT`], at any age) and its ticket
/// ([`DOMAIN_TICKET`]) and checks that they belong together: the hash,
/// the job, the addressee, the ticket's age at `now_unix`, and runtimes
/// within the ticket's timeout and the receipt's own span. `Err` only when
/// the receipt's own signature fails; everything else lands in `checked`.
pub fn open_receipt(signed: &Signed, now_unix: u64) -> Result<OpenedReceipt, Refusal> {
    if signed.payload.len() > MAX_RECEIPT_PAYLOAD {
        return Err(Refusal::ReceiptShape(format!(
            "a receipt is at most {MAX_RECEIPT_PAYLOAD} bytes"
        )));
    }
    let receipt: Receipt = signed
        .open(DOMAIN_RECEIPT)
        .map_err(Refusal::ReceiptSignature)?;
    let receipt_hash = hex::encode(Sha256::digest(signed.payload.as_bytes()));
    let checked = check(&receipt, &signed.device_key, now_unix);
    Ok(OpenedReceipt {
        receipt,
        receipt_hash,
        worker_key: signed.device_key,
        checked,
    })
}

fn check(
    r: &Receipt,
    signer: &DevicePublic,
    now_unix: u64,
) -> Result<(Ticket, DevicePublic), Refusal> {
    if r.worker.is_empty()
        || r.worker.len() > MAX_ID_LEN
        || r.output_sha256.len() > MAX_RECEIPT_TEXT
    {
        return Err(Refusal::ReceiptShape(format!(
            "worker is 1–{MAX_ID_LEN} bytes, output_sha256 at most {MAX_RECEIPT_TEXT}"
        )));
    }
    if r.ticket.payload.len() > MAX_TICKET_PAYLOAD {
        return Err(Refusal::TicketShape(format!(
            "a ticket is at most {MAX_TICKET_PAYLOAD} bytes"
        )));
    }
    let ticket: Ticket = r
        .ticket
        .open(DOMAIN_TICKET)
        .map_err(Refusal::TicketSignature)?;
    ticket.check_shape().map_err(Refusal::TicketShape)?;
    // One receipt per ticket: a worker cannot bill one ticket as many
    // pieces, nor claim another attempt's.
    if ticket.attempt == 0 || r.chunk_id != ticket.attempt - 1 {
        return Err(Refusal::ReceiptShape(format!(
            "a receipt is for its ticket's attempt: chunk {} is not attempt {} − 1",
            r.chunk_id, ticket.attempt
        )));
    }
    if ticket_hash(&r.ticket) != r.ticket_hash {
        return Err(Refusal::TicketHashMismatch);
    }
    if ticket.job_id != r.job_id {
        return Err(Refusal::JobIdMismatch);
    }
    if ticket.worker_key != *signer {
        return Err(Refusal::NotTheAddressee);
    }
    if ticket.issued_at > now_unix + MAX_CLOCK_SKEW_SECS {
        return Err(Refusal::TicketFromTheFuture);
    }
    if now_unix.saturating_sub(ticket.issued_at) > MAX_TICKET_AGE_SECS {
        return Err(Refusal::TicketTooOld);
    }
    if r.runtime_ms > ticket.timeout_ms.saturating_add(TIMEOUT_SLACK_MS) {
        return Err(Refusal::OverTimeout {
            runtime_ms: r.runtime_ms,
            timeout_ms: ticket.timeout_ms,
        });
    }
    // The work happened while the ticket was good, and not in the future.
    let skew_ms = MAX_CLOCK_SKEW_SECS * 1000;
    if r.started_at_ms.saturating_add(skew_ms) < ticket.issued_at.saturating_mul(1000)
        || r.ended_at_ms
            > now_unix
                .saturating_add(MAX_CLOCK_SKEW_SECS)
                .saturating_mul(1000)
    {
        return Err(Refusal::ReceiptShape(
            "the job's start and end are not within its ticket's life and now".into(),
        ));
    }
    let span_ms = r.ended_at_ms.saturating_sub(r.started_at_ms);
    if r.ended_at_ms < r.started_at_ms || r.runtime_ms > span_ms.saturating_add(WALL_SLACK_MS) {
        return Err(Refusal::OverWallClock {
            runtime_ms: r.runtime_ms,
            span_ms,
        });
    }
    Ok((ticket, r.ticket.device_key))
}

/// Battery below this critical-point margin, or this hot without one,
/// caps what a worker earns.
const HOT_MARGIN_CELSIUS: i32 = 10;
const HOT_WITHOUT_CRITICAL: i32 = 85;

/// The tier a worker earns at and whether its earnings are capped, from
/// the coordinator's latest stored report of it (`None`: it never
/// reported; tier0, uncapped). The tier is the lower of the reported one
/// and the one its hardware report derives on `os`, so a device cannot
/// claim more than its hardware. Capped: on battery without external
/// power, or within 10 °C of its thermal zone's critical point (85 °C
/// where the platform exposes none).
pub fn earning_tier(caps: Option<&Capabilities>, os: &str) -> (Tier, bool) {
    let Some(c) = caps else {
        return (Tier::Tier0, false);
    };
    let tier = c.tier.min(c.derive_tier(os));
    let on_battery = c.battery.as_ref().is_some_and(|b| !b.on_ac);
    let hot = c
        .thermal
        .as_ref()
        .is_some_and(|t| match t.critical_celsius {
            Some(crit) => t.celsius >= crit - HOT_MARGIN_CELSIUS,
            None => t.celsius >= HOT_WITHOUT_CRITICAL,
        });
    (tier, on_battery || hot)
}

/// One movement of credits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Posting {
    pub kind: EntryKind,
    pub debit: Account,
    pub credit: Account,
    pub amount: u64,
}

/// What one receipt charges and earns, and the balances it meets.
#[derive(Clone, Debug)]
pub struct JobCharge {
    /// The worker's earning tier and cap ([`earning_tier`]).
    pub tier: Tier,
    pub capped: bool,
    pub runtime_ms: u64,
    pub status: JobStatus,
    /// The submitting device's owner.
    pub payer: i64,
    /// The worker's owner (none: nobody earns).
    pub earner: Option<i64>,
    /// Balances before this job.
    pub payer_balance: i64,
    pub pool_balance: i64,
    /// The most the submitter signed for ([`Ticket::max_cost`]).
    pub max_cost: u64,
}

/// The postings for one receipt, in order:
/// - when the payer's balance does not cover the burn and the network
///   shares its pool, a grant from the pool to the payer of the shortfall
///   (as much as the pool holds);
/// - the burn, `rates.burn(tier, runtime)`, from the payer to `mint`; what
///   neither covered leaves the payer below zero (the one way a balance
///   goes negative: a single job's overrun);
/// - for `ok` receipts only, the mint, `rates.mint(tier, runtime, capped)`,
///   from `mint` to the worker's owner. Failed and cancelled jobs burn
///   their runtime and earn nothing.
///
/// A worker whose owner is the payer burns and mints like any other: the
/// books stay uniform, and at rates where earning does not exceed burning
/// running jobs on one's own devices nets a loss, never a profit.
pub fn job_postings(rates: &CreditRates, c: &JobCharge) -> Vec<Posting> {
    let mut out = Vec::with_capacity(3);
    let payer = Account::Member(c.payer);
    // Never more than the submitter signed for, whatever the worker
    // reports about itself since.
    let burn = rates.burn(c.tier, c.runtime_ms).min(c.max_cost);
    let have = u64::try_from(c.payer_balance).unwrap_or(0);
    let mut covered = burn.min(have);
    if rates.shared_pool && burn > have {
        let from_pool = (burn - have).min(u64::try_from(c.pool_balance).unwrap_or(0));
        covered += from_pool;
        if from_pool > 0 {
            out.push(Posting {
                kind: EntryKind::Grant,
                debit: Account::Pool,
                credit: payer,
                amount: from_pool,
            });
        }
    }
    if burn > 0 {
        out.push(Posting {
            kind: EntryKind::Burn,
            debit: payer,
            credit: Account::Mint,
            amount: burn,
        });
    }
    if let (JobStatus::Ok, Some(earner)) = (c.status, c.earner) {
        // Only what was paid for is earned: a payer who has run dry mints
        // nothing for anyone (two members cannot print credits by running
        // one of them into debt).
        let mint = rates.mint(c.tier, c.runtime_ms, c.capped).min(covered);
        if mint > 0 {
            out.push(Posting {
                kind: EntryKind::Mint,
                debit: Account::Mint,
                credit: Account::Member(earner),
                amount: mint,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capability::{Battery, Thermal};
    use crate::jobs::{Route, Sensitivity, Workload};
    use crate::keys::DevicePrivate;
    use proptest::prelude::*;

    const NOW: u64 = 1_800_000_000;

    fn ticket(worker: &DevicePrivate) -> Ticket {
        Ticket {
            job_id: "ab12".into(),
            network: "home".into(),
            submitter_device: "laptop".into(),
            submitter_user: "ann".into(),
            workload: Workload::SmallChat,
            model: "m".into(),
            route: Route::Auto,
            sensitivity: Sensitivity::Public,
            max_cost: 5 * MICRO,
            timeout_ms: 30_000,
            issued_at: NOW - 100,
            expires_at: NOW - 40,
            worker: "gpu".into(),
            worker_key: worker.public(),
            attempt: 1,
        }
    }

    fn receipt(ticket: Signed) -> Receipt {
        Receipt {
            ticket_hash: ticket_hash(&ticket),
            job_id: "ab12".into(),
            ticket,
            chunk_id: 0,
            worker: "gpu".into(),
            started_at_ms: (NOW - 90) * 1000,
            ended_at_ms: (NOW - 80) * 1000,
            runtime_ms: 10_000,
            units: 42,
            output_sha256: "00".repeat(32),
            status: JobStatus::Ok,
        }
    }

    #[test]
    fn accounts_and_kinds_read_back() {
        for a in [Account::Member(7), Account::Pool, Account::Mint] {
            assert_eq!(a.to_string().parse::<Account>().unwrap(), a);
            let json = serde_json::to_string(&a).unwrap();
            assert_eq!(serde_json::from_str::<Account>(&json).unwrap(), a);
        }
        for bad in ["member:", "member:x", "pool2", ""] {
            assert!(bad.parse::<Account>().is_err(), "{bad}");
        }
        for k in [EntryKind::Grant, EntryKind::Mint, EntryKind::Burn] {
            assert_eq!(k.as_str().parse::<EntryKind>().unwrap(), k);
        }
    }

    #[test]
    fn credits_print_and_parse() {
        assert_eq!(format_credits(12_500_000), "12.5");
        assert_eq!(format_credits(-3 * MICRO as i64), "-3");
        assert_eq!(format_credits(1), "0.000001");
        assert_eq!(parse_credits("12.5").unwrap(), 12_500_000);
        assert_eq!(parse_credits("0.000001").unwrap(), 1);
        assert_eq!(parse_credits(".5").unwrap(), 500_000);
        assert_eq!(parse_credits("7").unwrap(), 7 * MICRO);
        for bad in ["", ".", "1.0000001", "-1", "1e3", "x", "99999999999999999"] {
            assert!(parse_credits(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn csv_rows_follow_the_header() {
        let e = LedgerEntry {
            id: 1,
            network: "home".into(),
            job_id: "grant:3".into(),
            chunk_id: 0,
            kind: EntryKind::Grant,
            debit: Account::Mint,
            credit: Account::Member(3),
            amount: 100,
            receipt_id: None,
            trace_id: "grant:3".into(),
            created_at: 9,
        };
        assert_eq!(
            e.csv_row(),
            "1,home,grant:3,0,grant,mint,member:3,100,,grant:3,9"
        );
        assert_eq!(
            e.csv_row().split(',').count(),
            LedgerEntry::CSV_HEADER.split(',').count()
        );
        assert_eq!(csv_field("a,\"b\""), "\"a,\"\"b\"\"\"");
    }

    #[test]
    fn a_matching_receipt_opens() {
        let (sub, worker) = (DevicePrivate::generate(), DevicePrivate::generate());
        let t = Signed::sign(&sub, DOMAIN_TICKET, &ticket(&worker));
        let signed = Signed::sign(&worker, DOMAIN_RECEIPT, &receipt(t));
        let o = open_receipt(&signed, NOW).unwrap();
        let (t, signer) = o.checked.unwrap();
        assert_eq!(signer, sub.public());
        assert_eq!(t.job_id, "ab12");
        assert_eq!(o.receipt_hash.len(), 64);
        assert_eq!(claimed_ids(&signed), ("ab12".into(), 0));
        // Days late is fine.
        assert!(open_receipt(&signed, NOW + 20 * 86_400)
            .unwrap()
            .checked
            .is_ok());
    }

    #[test]
    fn mismatches_are_refused_with_their_reason() {
        let (sub, worker) = (DevicePrivate::generate(), DevicePrivate::generate());
        let good = ticket(&worker);
        let t = Signed::sign(&sub, DOMAIN_TICKET, &good);
        let refusal = |r: Receipt, key: &DevicePrivate, now: u64| {
            open_receipt(&Signed::sign(key, DOMAIN_RECEIPT, &r), now)
                .unwrap()
                .checked
                .unwrap_err()
        };
        let mut r = receipt(t.clone());
        r.ticket_hash = "00".repeat(32);
        assert_eq!(refusal(r, &worker, NOW), Refusal::TicketHashMismatch);
        let mut r = receipt(t.clone());
        r.job_id = "cd34".into();
        assert_eq!(refusal(r, &worker, NOW), Refusal::JobIdMismatch);
        let other = DevicePrivate::generate();
        assert_eq!(
            refusal(receipt(t.clone()), &other, NOW),
            Refusal::NotTheAddressee
        );
        assert_eq!(
            refusal(receipt(t.clone()), &worker, NOW + 31 * 86_400),
            Refusal::TicketTooOld
        );
        assert_eq!(
            refusal(receipt(t.clone()), &worker, NOW - 1000),
            Refusal::TicketFromTheFuture
        );
        let mut r = receipt(t.clone());
        r.runtime_ms = 35_001;
        r.ended_at_ms = r.started_at_ms + 40_000;
        assert!(matches!(
            refusal(r, &worker, NOW),
            Refusal::OverTimeout { .. }
        ));
        let mut r = receipt(t.clone());
        r.runtime_ms = 11_001;
        assert!(matches!(
            refusal(r, &worker, NOW),
            Refusal::OverWallClock { .. }
        ));
        let mut r = receipt(t.clone());
        r.ended_at_ms = r.started_at_ms - 1;
        assert!(matches!(
            refusal(r, &worker, NOW),
            Refusal::OverWallClock { .. }
        ));
        // A ticket signed for another purpose.
        let wrong = Signed::sign(&sub, DOMAIN_RECEIPT, &good);
        assert!(matches!(
            refusal(receipt(wrong), &worker, NOW),
            Refusal::TicketSignature(SignedError::BadSignature)
        ));
        // A forged receipt signature is refused before anything else.
        let mut s = Signed::sign(&worker, DOMAIN_RECEIPT, &receipt(t));
        s.device_key = other.public();
        assert!(matches!(
            open_receipt(&s, NOW),
            Err(Refusal::ReceiptSignature(SignedError::BadSignature))
        ));
    }

    #[test]
    fn battery_and_heat_cap_earnings() {
        let gib = 1u64 << 30;
        let mut c = Capabilities {
            cpu_cores: 8,
            arch: "x86_64".into(),
            ram_bytes: 16 * gib,
            tier: Tier::Tier4,
            ..Default::default()
        };
        assert_eq!(
            earning_tier(Some(&c), "linux"),
            (Tier::Tier2, false),
            "no more than the hardware derives"
        );
        c.battery = Some(Battery {
            percent: 80,
            charging: false,
            on_ac: false,
        });
        assert_eq!(earning_tier(Some(&c), "linux"), (Tier::Tier2, true));
        c.battery = Some(Battery {
            percent: 80,
            charging: true,
            on_ac: true,
        });
        assert!(!earning_tier(Some(&c), "linux").1);
        c.thermal = Some(Thermal {
            celsius: 90,
            zone: "cpu".into(),
            critical_celsius: Some(100),
        });
        assert!(
            earning_tier(Some(&c), "linux").1,
            "within 10 °C of critical"
        );
        c.thermal = Some(Thermal {
            celsius: 89,
            zone: "cpu".into(),
            critical_celsius: Some(100),
        });
        assert!(!earning_tier(Some(&c), "linux").1);
        c.thermal = Some(Thermal {
            celsius: 85,
            zone: "cpu".into(),
            critical_celsius: None,
        });
        assert!(earning_tier(Some(&c), "linux").1);
        assert_eq!(earning_tier(None, "linux"), (Tier::Tier0, false));
    }

    fn charge(status: JobStatus, payer_balance: i64, pool_balance: i64) -> JobCharge {
        JobCharge {
            tier: Tier::Tier2,
            capped: false,
            runtime_ms: 60_000,
            status,
            payer: 1,
            earner: Some(2),
            payer_balance,
            pool_balance,
            max_cost: u64::MAX,
        }
    }

    #[test]
    fn burns_stop_at_the_tickets_price_and_a_dry_payer_mints_nothing() {
        let rates = CreditRates::default();
        let capped = JobCharge {
            max_cost: MICRO,
            ..charge(JobStatus::Ok, 100 * MICRO as i64, 0)
        };
        let p = job_postings(&rates, &capped);
        assert_eq!((p[0].kind, p[0].amount), (EntryKind::Burn, MICRO));
        assert_eq!(
            (p[1].kind, p[1].amount),
            (EntryKind::Mint, MICRO),
            "earned at most what was paid"
        );
        let dry = job_postings(&rates, &charge(JobStatus::Ok, -5 * MICRO as i64, 0));
        assert_eq!(dry.len(), 1, "a burn into debt, and no mint: {dry:?}");
        assert_eq!(dry[0].kind, EntryKind::Burn);
        let half = job_postings(&rates, &charge(JobStatus::Ok, MICRO as i64, 0));
        assert_eq!(
            half.last().map(|p| (p.kind, p.amount)),
            Some((EntryKind::Mint, MICRO))
        );
    }

    #[test]
    fn burns_draw_on_the_pool_and_failures_earn_nothing() {
        let rates = CreditRates::default();
        let six = 6 * MICRO;
        let p = job_postings(&rates, &charge(JobStatus::Ok, 100 * MICRO as i64, 0));
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].kind, EntryKind::Burn);
        assert_eq!(p[0].amount, six);
        assert_eq!(
            (p[1].kind, p[1].credit, p[1].amount),
            (EntryKind::Mint, Account::Member(2), 4 * MICRO)
        );
        let p = job_postings(&rates, &charge(JobStatus::Failed, 100 * MICRO as i64, 0));
        assert_eq!(p.len(), 1, "failed jobs burn and mint nothing");
        assert_eq!(p[0].kind, EntryKind::Burn);
        // 2 credits of their own, the pool covers the other 4.
        let p = job_postings(
            &rates,
            &charge(JobStatus::Ok, 2 * MICRO as i64, 50 * MICRO as i64),
        );
        assert_eq!(
            (p[0].kind, p[0].debit, p[0].amount),
            (EntryKind::Grant, Account::Pool, 4 * MICRO)
        );
        assert_eq!(p[1].amount, six);
        // The pool holds only 1: the payer overruns by 3.
        let p = job_postings(
            &rates,
            &charge(JobStatus::Cancelled, 2 * MICRO as i64, MICRO as i64),
        );
        assert_eq!((p[0].amount, p[1].amount, p.len()), (MICRO, six, 2));
        let solo = CreditRates {
            shared_pool: false,
            ..CreditRates::default()
        };
        let p = job_postings(&solo, &charge(JobStatus::Ok, 0, 50 * MICRO as i64));
        assert_eq!(p[0].kind, EntryKind::Burn, "no pool draw when not shared");
    }

    proptest! {
        #[test]
        fn postings_never_overdraw_the_pool(
            payer in -100_000_000i64..200_000_000,
            pool in 0i64..200_000_000,
            runtime in 0u64..600_000,
            tier in 0usize..5,
            shared in any::<bool>(),
        ) {
            let rates = CreditRates { shared_pool: shared, ..CreditRates::default() };
            let tiers = [Tier::Tier0, Tier::Tier1, Tier::Tier2, Tier::Tier3, Tier::Tier4];
            let c = JobCharge { tier: tiers[tier], runtime_ms: runtime, ..charge(JobStatus::Ok, payer, pool) };
            let p = job_postings(&rates, &c);
            let from_pool: u64 = p.iter().filter(|x| x.debit == Account::Pool).map(|x| x.amount).sum();
            prop_assert!(from_pool as i64 <= pool);
            let burn: u64 = p.iter().filter(|x| x.kind == EntryKind::Burn).map(|x| x.amount).sum();
            prop_assert_eq!(burn, rates.burn(c.tier, runtime));
            // The pool is drawn only for what the payer lacks.
            let after = payer + from_pool as i64 - burn as i64;
            prop_assert!(from_pool == 0 || after <= 0);
            prop_assert!(p.iter().all(|x| x.amount > 0 && x.debit != x.credit));
        }
    }
}
