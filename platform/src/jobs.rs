//! Jobs on the compute mesh: what a submitter asks for and how it may be
//! routed, the network's compute rules (who may run what, credit rates,
//! scheduler weights), the ticket a submitting device signs for the worker
//! it chose, and the receipt the worker signs when the job is done.
//!
//! Tickets travel to the worker in the `x-crank-ticket` header (base64url of
//! the [`Signed`] JSON); receipts travel to the coordinator, which checks
//! both signatures and that they match before the ledger moves credits.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::capability::Tier;
use crate::keys::DevicePublic;
use crate::people::Role;
use crate::signed::{Signed, Timestamped};

/// Domain of a job ticket (signed by the submitting device).
pub const DOMAIN_TICKET: &str = "crank-mesh/job-ticket/v1";
/// Domain of a job receipt (signed by the worker).
pub const DOMAIN_RECEIPT: &str = "crank-mesh/job-receipt/v1";
/// Header carrying a ticket to the worker.
pub const TICKET_HEADER: &str = "x-crank-ticket";
/// Longest a ticket may be valid for, from its issue time.
pub const MAX_TICKET_LIFETIME_SECS: u64 = 3600;
/// Receipts in one submission to the coordinator.
pub const MAX_RECEIPTS_PER_BATCH: usize = 100;
/// Bytes of a job id, a model name or a device name in a ticket.
pub const MAX_ID_LEN: usize = 128;

/// A kind of work the mesh runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    Embeddings,
    SmallChat,
}

impl Workload {
    pub const ALL: [Workload; 2] = [Workload::Embeddings, Workload::SmallChat];

    pub fn as_str(self) -> &'static str {
        match self {
            Workload::Embeddings => "embeddings",
            Workload::SmallChat => "small_chat",
        }
    }

    /// The kind of model (`OfferedModel::kind`) that runs it.
    pub fn model_kind(self) -> &'static str {
        match self {
            Workload::Embeddings => "embedding",
            Workload::SmallChat => "chat",
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How private a job's data is: it limits who may submit it and where it
/// may run.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Sensitivity {
    #[default]
    Public,
    Private,
    Sensitive,
}

impl Sensitivity {
    pub fn as_str(self) -> &'static str {
        match self {
            Sensitivity::Public => "public",
            Sensitivity::Private => "private",
            Sensitivity::Sensitive => "sensitive",
        }
    }
}

impl fmt::Display for Sensitivity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Sensitivity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "public" => Ok(Sensitivity::Public),
            "private" => Ok(Sensitivity::Private),
            "sensitive" => Ok(Sensitivity::Sensitive),
            other => Err(format!(
                "unknown sensitivity {other:?} (public, private or sensitive)"
            )),
        }
    }
}

/// Where a job may go. Written `auto`, `device:NAME[,NAME…]`, `tier:tierN`
/// or `local` (in the `x-crank-route` header, a JSON field or `--route`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum Route {
    /// The best eligible device.
    #[default]
    Auto,
    /// Only these devices, best first.
    Devices(Vec<String>),
    /// Only devices of this tier or above.
    Tier(Tier),
    /// Direct paths before relayed ones (this device first when it serves).
    Local,
}

/// Devices named in one `device:` route.
pub const MAX_PINNED: usize = 16;

impl Route {
    /// The job is pinned to devices its submitter named.
    pub fn pinned(&self) -> bool {
        matches!(self, Route::Devices(_))
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::Auto => f.write_str("auto"),
            Route::Devices(d) => write!(f, "device:{}", d.join(",")),
            Route::Tier(t) => write!(f, "tier:{t}"),
            Route::Local => f.write_str("local"),
        }
    }
}

fn parse_tier(s: &str) -> Option<Tier> {
    Some(match s {
        "tier0" | "0" => Tier::Tier0,
        "tier1" | "1" => Tier::Tier1,
        "tier2" | "2" => Tier::Tier2,
        "tier3" | "3" => Tier::Tier3,
        "tier4" | "4" => Tier::Tier4,
        _ => return None,
    })
}

impl FromStr for Route {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        const FORMS: &str = "auto, local, device:NAME[,NAME…] or tier:tier0…tier4";
        match s.split_once(':') {
            None if s == "auto" => Ok(Route::Auto),
            None if s == "local" => Ok(Route::Local),
            Some(("device", names)) => {
                let names: Vec<String> = names
                    .split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned)
                    .collect();
                if names.is_empty() {
                    return Err(format!("route {s:?} names no device ({FORMS})"));
                }
                if names.len() > MAX_PINNED {
                    return Err(format!("a route names at most {MAX_PINNED} devices"));
                }
                if let Some(bad) = names.iter().find(|n| !valid_name(n)) {
                    return Err(format!("{bad:?} is not a device name"));
                }
                Ok(Route::Devices(names))
            }
            Some(("tier", t)) => parse_tier(t.trim())
                .map(Route::Tier)
                .ok_or_else(|| format!("unknown tier {t:?} in route (tier0…tier4)")),
            _ => Err(format!("unknown route {s:?} ({FORMS})")),
        }
    }
}

/// A device name as the coordinator makes them: DNS label characters.
fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Serialize for Route {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Route {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What one role may run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolePolicy {
    pub workloads: Vec<Workload>,
    /// The most sensitive data this role may submit.
    pub max_sensitivity: Sensitivity,
    /// Jobs of this role run on devices of this tier or above.
    #[serde(default)]
    pub min_tier: Tier,
}

/// Which roles may run which workloads at which sensitivity. Defaults (from
/// the product spec): guests run public jobs only; `sensitive` jobs only for
/// admins, or for members on devices they pinned; phone-class devices
/// (tier0/tier1) never run `sensitive` jobs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ComputePolicy {
    pub admin: RolePolicy,
    pub member: RolePolicy,
    pub guest: RolePolicy,
    /// Members may submit `sensitive` jobs pinned to named devices.
    pub sensitive_when_pinned: bool,
    /// `sensitive` jobs run only on devices of this tier or above.
    pub sensitive_min_tier: Tier,
}

impl Default for ComputePolicy {
    fn default() -> Self {
        ComputePolicy {
            admin: RolePolicy {
                workloads: Workload::ALL.to_vec(),
                max_sensitivity: Sensitivity::Sensitive,
                min_tier: Tier::Tier0,
            },
            member: RolePolicy {
                workloads: Workload::ALL.to_vec(),
                max_sensitivity: Sensitivity::Private,
                min_tier: Tier::Tier0,
            },
            guest: RolePolicy {
                workloads: Workload::ALL.to_vec(),
                max_sensitivity: Sensitivity::Public,
                min_tier: Tier::Tier0,
            },
            sensitive_when_pinned: true,
            sensitive_min_tier: Tier::Tier2,
        }
    }
}

impl ComputePolicy {
    pub fn for_role(&self, role: Role) -> &RolePolicy {
        match role {
            Role::Admin => &self.admin,
            Role::Member => &self.member,
            Role::Guest => &self.guest,
        }
    }

    /// Whether `role` may submit this job at all; `Err` says why not.
    pub fn may_submit(
        &self,
        role: Role,
        workload: Workload,
        sensitivity: Sensitivity,
        route: &Route,
    ) -> Result<(), String> {
        let p = self.for_role(role);
        if !p.workloads.contains(&workload) {
            return Err(format!(
                "the network's policy does not let a {role} run {workload}"
            ));
        }
        let pinned_sensitive = sensitivity == Sensitivity::Sensitive
            && role == Role::Member
            && self.sensitive_when_pinned
            && route.pinned();
        if sensitivity > p.max_sensitivity && !pinned_sensitive {
            return Err(format!(
                "the network's policy lets a {role} submit {} jobs at most{}",
                p.max_sensitivity,
                if role == Role::Member && self.sensitive_when_pinned {
                    " (sensitive ones only pinned to named devices)"
                } else {
                    ""
                }
            ));
        }
        Ok(())
    }

    /// Whether a device of `tier` may run a job of `role` at `sensitivity`.
    pub fn may_run_on(
        &self,
        role: Role,
        sensitivity: Sensitivity,
        tier: Tier,
    ) -> Result<(), String> {
        let min = self.for_role(role).min_tier;
        if tier < min {
            return Err(format!(
                "{role} jobs run on {min} or above; the device is {tier}"
            ));
        }
        if sensitivity == Sensitivity::Sensitive && tier < self.sensitive_min_tier {
            return Err(format!(
                "sensitive jobs run on {} or above; the device is {tier}",
                self.sensitive_min_tier
            ));
        }
        Ok(())
    }
}

/// One micro-credit is a millionth of a credit; every amount is an integer
/// number of them.
pub const MICRO: u64 = 1_000_000;

/// What work costs and earns, per tier (index = tier number), in
/// micro-credits per minute of runtime.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CreditRates {
    /// Minted to the worker's owner per minute of validated work.
    pub earn_per_minute: [u64; 5],
    /// Burned from the submitter per minute of runtime.
    pub burn_per_minute: [u64; 5],
    /// Earnings are multiplied by this, in percent (100 = ×1).
    pub multiplier_percent: u32,
    /// Burns are rounded up to a multiple of this runtime.
    pub billing_granularity_ms: u64,
    /// Credited to each new member.
    pub initial_grant: u64,
    /// Members may spend from the network's shared pool when their own
    /// balance runs out.
    pub shared_pool: bool,
}

impl Default for CreditRates {
    fn default() -> Self {
        CreditRates {
            earn_per_minute: [1, 2, 4, 10, 20].map(|c| c * MICRO),
            burn_per_minute: [2, 4, 6, 14, 28].map(|c| c * MICRO),
            multiplier_percent: 100,
            billing_granularity_ms: 1000,
            initial_grant: 100 * MICRO,
            shared_pool: true,
        }
    }
}

fn per_ms(rate_per_minute: u64, ms: u64, round_up: bool) -> u64 {
    let product = u128::from(rate_per_minute) * u128::from(ms);
    let q = if round_up {
        product.div_ceil(60_000)
    } else {
        product / 60_000
    };
    u64::try_from(q).unwrap_or(u64::MAX)
}

impl CreditRates {
    /// What `runtime_ms` on a `tier` device burns: the runtime rounded up
    /// to the billing granularity, at the tier's burn rate, rounded up to a
    /// whole micro-credit.
    pub fn burn(&self, tier: Tier, runtime_ms: u64) -> u64 {
        let g = self.billing_granularity_ms.max(1);
        let billed = runtime_ms.div_ceil(g).saturating_mul(g).max(g);
        per_ms(self.burn_per_minute[tier as usize], billed, true)
    }

    /// What `runtime_ms` of validated work on a `tier` device mints for its
    /// owner: the tier's earn rate times the multiplier, rounded down. A
    /// worker on battery or running hot (`capped`) earns at most the lowest
    /// tier's rate.
    pub fn mint(&self, tier: Tier, runtime_ms: u64, capped: bool) -> u64 {
        let mut rate = self.earn_per_minute[tier as usize];
        if capped {
            rate = rate.min(self.earn_per_minute[0]);
        }
        let rate = u128::from(rate) * u128::from(self.multiplier_percent) / 100;
        per_ms(u64::try_from(rate).unwrap_or(u64::MAX), runtime_ms, false)
    }

    /// The most a job may burn: its whole timeout on a `tier` device.
    pub fn estimate(&self, tier: Tier, timeout_ms: u64) -> u64 {
        self.burn(tier, timeout_ms)
    }

    /// Why these rates are unusable, if they are.
    pub fn check(&self) -> Result<(), String> {
        if self.billing_granularity_ms == 0 || self.billing_granularity_ms > 3_600_000 {
            return Err("billing granularity is 1 ms to 1 hour".into());
        }
        if self.multiplier_percent > 10_000 {
            return Err("the multiplier is at most 100× (10000 percent)".into());
        }
        let huge = 1_000_000 * MICRO;
        if self
            .earn_per_minute
            .iter()
            .chain(&self.burn_per_minute)
            .any(|r| *r > huge)
            || self.initial_grant > huge
        {
            return Err("rates and grants are at most 1,000,000 credits".into());
        }
        Ok(())
    }
}

/// Weights of the scheduler's linear score, per network, in thousandths
/// (−300 is −0.30). Each feature is normalised to [0, 1] before weighting
/// (see `compute::scheduler`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScoreWeights {
    pub rtt_ms: i32,
    pub is_plugged_in: i32,
    pub thermal_headroom: i32,
    pub idle_score: i32,
    pub credit_rate_efficiency: i32,
    /// Free capacity (slots free, queue empty), so one device is not flooded.
    pub load: i32,
}

impl Default for ScoreWeights {
    fn default() -> Self {
        ScoreWeights {
            rtt_ms: -300,
            is_plugged_in: 200,
            thermal_headroom: 200,
            idle_score: 150,
            credit_rate_efficiency: 150,
            load: 250,
        }
    }
}

impl ScoreWeights {
    pub fn check(&self) -> Result<(), String> {
        let all = [
            self.rtt_ms,
            self.is_plugged_in,
            self.thermal_headroom,
            self.idle_score,
            self.credit_rate_efficiency,
            self.load,
        ];
        if all.iter().any(|w| w.abs() > 10_000) {
            return Err("score weights are between -10000 and 10000 thousandths".into());
        }
        Ok(())
    }
}

/// A network's compute settings, carried in every device's netmap so that
/// devices place and admit jobs without asking the coordinator.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ComputeRules {
    pub policy: ComputePolicy,
    pub rates: CreditRates,
    pub weights: ScoreWeights,
}

/// What a submitting device authorises a worker to run: signed with the
/// submitter's device key ([`DOMAIN_TICKET`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// 128 random bits, hex; the same for every attempt of one job.
    pub job_id: String,
    pub network: String,
    /// The submitting device, by name.
    pub submitter_device: String,
    /// Its owner.
    pub submitter_user: String,
    pub workload: Workload,
    pub model: String,
    pub route: Route,
    #[serde(default)]
    pub sensitivity: Sensitivity,
    /// The most the job may burn, micro-credits.
    pub max_cost: u64,
    pub timeout_ms: u64,
    /// Unix seconds.
    pub issued_at: u64,
    pub expires_at: u64,
    /// The worker chosen: its name, and its device key (the addressee).
    pub worker: String,
    pub worker_key: DevicePublic,
    /// 1 for the first try; retries elsewhere get new tickets.
    pub attempt: u32,
}

impl Timestamped for Ticket {
    fn timestamp(&self) -> u64 {
        self.issued_at
    }
}

impl Ticket {
    /// Why the ticket's fields are unacceptable, if they are.
    pub fn check_shape(&self) -> Result<(), String> {
        let long = [
            &self.job_id,
            &self.network,
            &self.submitter_device,
            &self.submitter_user,
            &self.model,
            &self.worker,
        ]
        .iter()
        .any(|s| s.is_empty() || s.len() > MAX_ID_LEN);
        if long {
            return Err(format!("ticket fields are 1–{MAX_ID_LEN} bytes"));
        }
        if !self.job_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("a job id is hex".into());
        }
        if self.timeout_ms > MAX_TICKET_LIFETIME_SECS * 1000 {
            return Err(format!(
                "a job's timeout is at most {MAX_TICKET_LIFETIME_SECS} s"
            ));
        }
        if self.expires_at <= self.issued_at
            || self.expires_at - self.issued_at > MAX_TICKET_LIFETIME_SECS
        {
            return Err(format!(
                "a ticket expires after its issue time and within {MAX_TICKET_LIFETIME_SECS} s"
            ));
        }
        Ok(())
    }
}

/// How a job ended on the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Ok,
    Failed,
    /// The caller went away before the end (a stream cut short).
    Cancelled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Ok => "ok",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }
}

/// What a worker did for a ticket: signed with the worker's device key
/// ([`DOMAIN_RECEIPT`]) and carrying the ticket, so the coordinator can
/// check that the two match.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// [`ticket_hash`] of `ticket`.
    pub ticket_hash: String,
    pub ticket: Signed,
    pub job_id: String,
    /// The piece of the job this receipt is for: the ticket's attempt − 1
    /// (a job run whole on its first try is chunk 0).
    pub chunk_id: u32,
    /// The worker, by name.
    pub worker: String,
    /// Unix milliseconds.
    pub started_at_ms: u64,
    pub ended_at_ms: u64,
    pub runtime_ms: u64,
    /// Tokens generated (chat) or inputs embedded (embeddings).
    pub units: u64,
    /// SHA-256 of the output, hex.
    pub output_sha256: String,
    pub status: JobStatus,
}

impl Timestamped for Receipt {
    fn timestamp(&self) -> u64 {
        self.ended_at_ms / 1000
    }
}

/// SHA-256 of a signed ticket's exact payload text, hex: what a receipt
/// names it by.
pub fn ticket_hash(ticket: &Signed) -> String {
    hex::encode(Sha256::digest(ticket.payload.as_bytes()))
}

/// Receipts a worker delivers to the coordinator (`POST /api/v1/receipts`):
/// each is signed on its own, so the batch needs no signature of its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptBatch {
    pub receipts: Vec<Signed>,
}

/// What became of one delivered receipt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptOutcome {
    /// Entered in the ledger now.
    Recorded,
    /// The same receipt was entered before.
    Duplicate,
    /// A different receipt was entered for the same job and chunk (409).
    Conflict,
    /// Not acceptable (bad signature, mismatched ticket, unknown device):
    /// delivering it again will not help.
    Refused,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptResult {
    pub job_id: String,
    pub chunk_id: u32,
    pub outcome: ReceiptOutcome,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptBatchResult {
    pub results: Vec<ReceiptResult>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::DevicePrivate;

    #[test]
    fn routes_parse_and_print() {
        for (text, route) in [
            ("auto", Route::Auto),
            ("local", Route::Local),
            ("device:gpu-box", Route::Devices(vec!["gpu-box".into()])),
            ("device:a,b", Route::Devices(vec!["a".into(), "b".into()])),
            ("tier:tier2", Route::Tier(Tier::Tier2)),
        ] {
            assert_eq!(text.parse::<Route>().unwrap(), route);
            assert_eq!(route.to_string(), text);
            let json = serde_json::to_string(&route).unwrap();
            assert_eq!(serde_json::from_str::<Route>(&json).unwrap(), route);
        }
        for bad in [
            "",
            "devices:a",
            "device:",
            "tier:tier9",
            "fast",
            "device:a b",
        ] {
            let e = bad.parse::<Route>().unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
    }

    #[test]
    fn default_policy_follows_the_spec() {
        let p = ComputePolicy::default();
        let auto = Route::Auto;
        let pinned = Route::Devices(vec!["a".into()]);
        use Sensitivity::*;
        assert!(p
            .may_submit(Role::Guest, Workload::SmallChat, Public, &auto)
            .is_ok());
        assert!(p
            .may_submit(Role::Guest, Workload::SmallChat, Private, &auto)
            .is_err());
        assert!(p
            .may_submit(Role::Guest, Workload::SmallChat, Sensitive, &pinned)
            .is_err());
        assert!(p
            .may_submit(Role::Member, Workload::Embeddings, Private, &auto)
            .is_ok());
        assert!(p
            .may_submit(Role::Member, Workload::Embeddings, Sensitive, &auto)
            .is_err());
        assert!(p
            .may_submit(Role::Member, Workload::Embeddings, Sensitive, &pinned)
            .is_ok());
        assert!(p
            .may_submit(Role::Admin, Workload::Embeddings, Sensitive, &auto)
            .is_ok());
        assert!(p.may_run_on(Role::Admin, Sensitive, Tier::Tier1).is_err());
        assert!(p.may_run_on(Role::Admin, Sensitive, Tier::Tier2).is_ok());
        assert!(p.may_run_on(Role::Guest, Public, Tier::Tier0).is_ok());
    }

    #[test]
    fn burns_round_up_and_mints_round_down() {
        let r = CreditRates::default();
        // tier2: 6 credits/min burn, 4/min earn; 1 s granularity.
        assert_eq!(r.burn(Tier::Tier2, 1), 100_000, "one second billed");
        assert_eq!(r.burn(Tier::Tier2, 1000), 100_000);
        assert_eq!(r.burn(Tier::Tier2, 1001), 200_000);
        assert_eq!(r.burn(Tier::Tier2, 60_000), 6 * MICRO);
        assert_eq!(r.mint(Tier::Tier2, 60_000, false), 4 * MICRO);
        assert_eq!(r.mint(Tier::Tier2, 1, false), 66);
        assert_eq!(r.mint(Tier::Tier4, 60_000, true), MICRO, "capped at tier0");
        let double = CreditRates {
            multiplier_percent: 200,
            ..CreditRates::default()
        };
        assert_eq!(double.mint(Tier::Tier2, 60_000, false), 8 * MICRO);
        assert_eq!(r.estimate(Tier::Tier3, 30_000), 7 * MICRO);
        assert!(r.check().is_ok());
        assert!(CreditRates {
            billing_granularity_ms: 0,
            ..CreditRates::default()
        }
        .check()
        .is_err());
    }

    #[test]
    fn receipts_name_their_ticket_by_hash() {
        let k = DevicePrivate::generate();
        let t = Ticket {
            job_id: "ab12".into(),
            network: "home".into(),
            submitter_device: "laptop".into(),
            submitter_user: "ann".into(),
            workload: Workload::SmallChat,
            model: "m".into(),
            route: Route::Auto,
            sensitivity: Sensitivity::Public,
            max_cost: 5,
            timeout_ms: 1000,
            issued_at: 100,
            expires_at: 160,
            worker: "gpu".into(),
            worker_key: DevicePrivate::generate().public(),
            attempt: 1,
        };
        assert!(t.check_shape().is_ok());
        let signed = Signed::sign(&k, DOMAIN_TICKET, &t);
        let h = ticket_hash(&signed);
        assert_eq!(h.len(), 64);
        let mut other = t.clone();
        other.attempt = 2;
        assert_ne!(ticket_hash(&Signed::sign(&k, DOMAIN_TICKET, &other)), h);
        assert_eq!(
            signed.verify::<Ticket>(DOMAIN_TICKET, 120).unwrap(),
            t,
            "round trip"
        );
        assert!(signed.verify::<Ticket>(DOMAIN_RECEIPT, 120).is_err());
        let mut bad = t;
        bad.expires_at = bad.issued_at + MAX_TICKET_LIFETIME_SECS + 1;
        assert!(bad.check_shape().is_err());
    }
}
