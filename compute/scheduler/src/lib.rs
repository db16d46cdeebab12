//! Crank Mesh job placement: which device runs a job, and why.
//!
//! The submitting device builds [`Candidate`]s from its netmap
//! ([`candidates`]), then [`place`] runs every candidate through the
//! eligibility filters ([`Filter::ALL`], in order) and ranks the eligible
//! ones by a linear score over normalised features (see [`score`]), with
//! the network's weights. The [`Placement`] it returns is also the job's
//! debug view: the best devices and the nearest misses with what each
//! filter found and each feature weighed, and every other device counted by
//! why it was excluded ([`explain`] gives any one device's full record).
//!
//! Pure: no I/O, no clock (`now_unix` is an argument), no randomness; the
//! same input gives the same placement.
#![forbid(unsafe_code)]

pub mod candidate;
pub mod filters;
pub mod placement;
pub mod score;

use platform::capability::Tier;
use platform::jobs::{ComputeRules, Route, Sensitivity, Workload};
use platform::people::Role;
use serde::{Deserialize, Serialize};

pub use candidate::{candidates, Candidate, PathInfo};
pub use filters::{Filter, FilterCheck, Outcome, MIN_BATTERY_PERCENT};
pub use placement::{explain, place, Exclusion, Placement, Ranked, Rejected, Verdict, KEPT};
pub use score::{Feature, Term};

/// What a job needs from the device that runs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub workload: Workload,
    /// None: any offered model of the workload's kind
    /// ([`Workload::model_kind`]).
    #[serde(default)]
    pub model: Option<String>,
    /// The model file's SHA-256 (hex), when the job pins one.
    #[serde(default)]
    pub model_sha256: Option<String>,
    #[serde(default)]
    pub route: Route,
    #[serde(default)]
    pub min_tier: Option<Tier>,
    #[serde(default)]
    pub needs_gpu: bool,
    #[serde(default)]
    pub min_ram_mb: u64,
    /// The slowest path rtt the job accepts.
    #[serde(default)]
    pub max_latency_ms: Option<u64>,
    #[serde(default)]
    pub sensitivity: Sensitivity,
    /// Unstated, the submitter is taken for a guest: the role that may do
    /// least.
    #[serde(default = "least_role")]
    pub submitter_role: Role,
}

fn least_role() -> Role {
    Role::Guest
}

impl JobSpec {
    /// A public job of `workload` with no requirements beyond a model of
    /// its kind, routed `auto`.
    pub fn new(workload: Workload, submitter_role: Role) -> Self {
        JobSpec {
            workload,
            model: None,
            model_sha256: None,
            route: Route::Auto,
            min_tier: None,
            needs_gpu: false,
            min_ram_mb: 0,
            max_latency_ms: None,
            sensitivity: Sensitivity::Public,
            submitter_role,
        }
    }
}

/// The most a job may burn on a `tier` device: its whole timeout at the
/// tier's rate (the ticket's `max_cost`).
pub fn estimated_cost(rules: &ComputeRules, tier: Tier, timeout_ms: u64) -> u64 {
    rules.rates.estimate(tier, timeout_ms)
}
