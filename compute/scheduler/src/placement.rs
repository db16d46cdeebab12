//! Placing one job: filter every candidate, score the eligible ones, rank
//! them, and keep the reasons as the job's debug view ([`Placement`], what
//! `meshd jobs show` prints).
//!
//! Ranking is by score, best first, ties broken by name (then node key), so
//! the same input always gives the same order. `device:` routes rank the
//! named devices by score too: naming them says where the job may go, not
//! in which order. `local` ranks this device first, then devices on direct
//! paths, then relayed ones, each group by score.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, Hasher};
use std::mem::Discriminant;

use platform::capability::Tier;
use platform::jobs::{ComputeRules, Route};
use serde::{Deserialize, Serialize};

use crate::candidate::Candidate;
use crate::filters::{self, Context, Filter, FilterCheck, Finding, Summary};
use crate::score::{Scorer, Term};
use crate::JobSpec;

/// How many ranked devices, and how many rejected ones, a placement keeps
/// with their full record (every filter's verdict, every score term).
/// Every other device is counted in [`Placement::eligible`] or
/// [`Placement::excluded`]: rendering every filter and term of thousands
/// of devices would cost far more than placing the job, and a job record
/// holds what a reader uses: the best devices, the nearest misses and why
/// the rest were excluded. [`explain`] gives any one device's record.
pub const KEPT: usize = 16;

/// An eligible device, with its score.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ranked {
    pub name: String,
    pub tier: Tier,
    /// The model it would run the job with.
    pub model: String,
    /// Reached without a relay (or this device itself).
    pub direct: bool,
    pub score: f64,
    /// Every feature's part in `score`.
    pub terms: Vec<Term>,
    /// Every filter's verdict (all passed).
    pub filters: Vec<FilterCheck>,
}

/// A device that cannot take the job, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    pub name: String,
    pub failed_filter: Filter,
    /// What the failed filter found.
    pub detail: String,
    /// Every filter's verdict, those after the failed one not evaluated.
    pub filters: Vec<FilterCheck>,
}

/// Devices one filter excluded for one reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exclusion {
    pub filter: Filter,
    /// The reason, without per-device measurements.
    pub detail: String,
    pub devices: usize,
}

/// Where a job may go and why, where it may not and why: the job's debug
/// view.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    /// The best eligible devices, best first; at most [`KEPT`].
    pub ranked: Vec<Ranked>,
    /// Eligible devices in all.
    pub eligible: usize,
    /// The nearest misses, at most [`KEPT`]: devices that failed a later
    /// filter first, then in the order the candidates came.
    pub rejected: Vec<Rejected>,
    /// Every rejected device, counted by the filter that excluded it and
    /// the reason; in filter order, most devices first.
    pub excluded: Vec<Exclusion>,
}

impl Placement {
    /// The device to send the job to.
    pub fn best(&self) -> Option<&Ranked> {
        self.ranked.first()
    }

    /// Why no device is eligible: each filter that excluded devices, in
    /// filter order, how many, and why (the commonest reasons first). With
    /// an eligible device, says which is best.
    pub fn explain_none(&self) -> String {
        if let Some(best) = self.best() {
            return format!(
                "{} eligible device{}; best: {} (score {:.3})",
                self.eligible,
                plural(self.eligible),
                best.name,
                best.score
            );
        }
        if self.excluded.is_empty() {
            return "no eligible device: there are no devices to choose from".into();
        }
        let mut parts = Vec::new();
        for filter in Filter::ALL {
            let reasons: Vec<&Exclusion> = self
                .excluded
                .iter()
                .filter(|e| e.filter == filter)
                .collect();
            if reasons.is_empty() {
                continue;
            }
            let count: usize = reasons.iter().map(|e| e.devices).sum();
            parts.push(format!("{count} failed {filter} ({})", summarise(&reasons)));
        }
        format!("no eligible device: {}", parts.join(", "))
    }
}

/// At most this many reasons are listed per filter.
const LISTED_REASONS: usize = 3;

fn summarise(reasons: &[&Exclusion]) -> String {
    let mut out = String::new();
    for (i, e) in reasons.iter().take(LISTED_REASONS).enumerate() {
        if i > 0 {
            out.push_str("; ");
        }
        out.push_str(&e.detail);
        if reasons.len() > 1 && e.devices > 1 {
            let _ = write!(out, " ×{}", e.devices);
        }
    }
    if reasons.len() > LISTED_REASONS {
        let _ = write!(out, "; {} more", reasons.len() - LISTED_REASONS);
    }
    out
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// One device's full record, from [`explain`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Eligible(Ranked),
    Rejected(Rejected),
}

/// An eligible candidate while ranking.
struct Eligible<'a> {
    index: usize,
    model: &'a str,
    tier: Tier,
    /// Ranks before any higher group (only `local` routes have several).
    group: u8,
    /// [`Scorer::partial`] until every device is filtered, then the score.
    score: f64,
}

/// The first [`KEPT`] devices (in candidate order) each filter rejected:
/// the nearest misses are among them.
#[derive(Default)]
struct Misses([Vec<usize>; Filter::ALL.len()]);

impl Misses {
    fn add(&mut self, filter: Filter, index: usize) {
        let first = &mut self.0[filter as usize];
        if first.len() < KEPT {
            first.push(index);
        }
    }

    /// Those that failed the latest filter first, in candidate order.
    fn nearest(&self) -> impl Iterator<Item = (Filter, usize)> + '_ {
        Filter::ALL
            .iter()
            .rev()
            .flat_map(|&f| self.0[f as usize].iter().map(move |&i| (f, i)))
            .take(KEPT)
    }
}

/// Devices filtered at a time (see [`place`]).
const BLOCK: usize = 64;

/// Lookup only: output order never depends on it.
type Groups<'a> = HashMap<(Filter, (Discriminant<Finding<'a>>, &'a str)), usize, FastHash>;
type FastHash = BuildHasherDefault<MultiplyRotate>;

/// The multiply-rotate hash of rustc's `FxHasher`: a few cycles for the
/// short keys of [`Groups`], looked up once per rejected device, where
/// std's SipHash would take a tenth of the placement. Keys come from the
/// network's own devices, and hash the same every run.
#[derive(Default)]
struct MultiplyRotate(u64);

impl MultiplyRotate {
    const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::SEED);
    }
}

impl Hasher for MultiplyRotate {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        for &b in chunks.remainder() {
            self.add(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Where `spec` may run among `candidates`, under the network's `rules`.
pub fn place(spec: &JobSpec, candidates: &[Candidate], rules: &ComputeRules) -> Placement {
    let ctx = Context::new(spec, rules);
    let scorer = Scorer::new(&rules.weights, &rules.rates);
    let mut eligible = Vec::with_capacity(candidates.len());
    let mut misses = Misses::default();
    let mut groups = Groups::default();
    let mut exclusions: Vec<(Filter, Finding<'_>, usize)> = Vec::new();
    for (block, devices) in candidates.chunks(BLOCK).enumerate() {
        // Models first, in a loop of their own (see `filters::model`), a
        // block at a time so the filters find the block's devices in cache.
        let mut models = [None; BLOCK];
        for (model, c) in models.iter_mut().zip(devices) {
            *model = filters::model(&ctx, c).ok().map(|m| m.name.as_str());
        }
        for (i, (c, model)) in devices.iter().zip(models).enumerate() {
            let index = block * BLOCK + i;
            match filters::evaluate(&ctx, c, model) {
                Ok(model) => eligible.push(Eligible {
                    index,
                    model,
                    tier: c.tier(),
                    group: group(&spec.route, c),
                    score: scorer.partial(c),
                }),
                Err((filter, why)) => {
                    misses.add(filter, index);
                    let slot = *groups.entry((filter, why.group())).or_insert_with(|| {
                        exclusions.push((filter, why, 0));
                        exclusions.len() - 1
                    });
                    exclusions[slot].2 += 1;
                }
            }
        }
    }

    let cheapest = cheapest(rules, eligible.iter().map(|e| e.tier));
    for e in &mut eligible {
        e.score += scorer.efficiency(e.tier, cheapest);
    }
    let best = first(KEPT, &eligible, |a, b| {
        let (ca, cb) = (&candidates[a.index], &candidates[b.index]);
        a.group
            .cmp(&b.group)
            .then(b.score.total_cmp(&a.score))
            .then_with(|| by_name(ca, cb))
    });

    Placement {
        ranked: best
            .iter()
            .map(|e| {
                let c = &candidates[e.index];
                ranked(&ctx, scorer.terms(c, cheapest), c, e.model, e.score)
            })
            .collect(),
        eligible: eligible.len(),
        rejected: misses
            .nearest()
            .map(|(filter, index)| rejected(&ctx, &candidates[index], filter))
            .collect(),
        excluded: excluded(exclusions),
    }
}

/// Rejections counted by filter and reason: in filter order, most devices
/// first. Reasons that read the same are one, whatever finding they came
/// from.
fn excluded(counted: Vec<(Filter, Finding<'_>, usize)>) -> Vec<Exclusion> {
    let mut out: Vec<Exclusion> = counted
        .into_iter()
        .map(|(filter, why, devices)| Exclusion {
            filter,
            detail: Summary(why).to_string(),
            devices,
        })
        .collect();
    out.sort_by(|a, b| (a.filter, &a.detail).cmp(&(b.filter, &b.detail)));
    out.dedup_by(|later, kept| {
        let same = (later.filter, &later.detail) == (kept.filter, &kept.detail);
        if same {
            kept.devices += later.devices;
        }
        same
    });
    out.sort_by(|a, b| {
        a.filter
            .cmp(&b.filter)
            .then(b.devices.cmp(&a.devices))
            .then_with(|| a.detail.cmp(&b.detail))
    });
    out
}

/// One device's full record for `spec`, scored as [`place`] would score it
/// among `candidates`; None when no candidate has that name.
pub fn explain(
    spec: &JobSpec,
    candidates: &[Candidate],
    rules: &ComputeRules,
    name: &str,
) -> Option<Verdict> {
    let c = candidates.iter().find(|c| c.name == name)?;
    let ctx = Context::new(spec, rules);
    let model = match filters::evaluate(&ctx, c, None) {
        Ok(model) => model,
        Err((filter, _)) => return Some(Verdict::Rejected(rejected(&ctx, c, filter))),
    };
    let eligible = candidates
        .iter()
        .filter(|c| filters::evaluate(&ctx, c, None).is_ok())
        .map(Candidate::tier);
    let cheapest = cheapest(rules, eligible);
    let scorer = Scorer::new(&rules.weights, &rules.rates);
    let score = scorer.score(c, cheapest);
    let terms = scorer.terms(c, cheapest);
    Some(Verdict::Eligible(ranked(&ctx, terms, c, model, score)))
}

/// The lowest burn rate among the eligible devices' tiers: the reference
/// for `credit_rate_efficiency`.
fn cheapest(rules: &ComputeRules, eligible: impl Iterator<Item = Tier>) -> u64 {
    eligible
        .map(|tier| rules.rates.burn_per_minute[tier as usize])
        .min()
        .unwrap_or(0)
}

fn ranked(ctx: &Context<'_>, terms: Vec<Term>, c: &Candidate, model: &str, score: f64) -> Ranked {
    Ranked {
        name: c.name.clone(),
        tier: c.tier(),
        model: model.to_owned(),
        direct: c.is_near(),
        score,
        terms,
        filters: filters::record(ctx, c),
    }
}

fn rejected(ctx: &Context<'_>, c: &Candidate, failed: Filter) -> Rejected {
    let filters = filters::record(ctx, c);
    let detail = filters
        .iter()
        .find(|f| f.filter == failed)
        .map(|f| f.detail.clone())
        .unwrap_or_default();
    Rejected {
        name: c.name.clone(),
        failed_filter: failed,
        detail,
        filters,
    }
}

fn by_name(a: &Candidate, b: &Candidate) -> Ordering {
    a.name
        .cmp(&b.name)
        .then_with(|| a.node_key.cmp(&b.node_key))
}

/// The first `n` of `items` in `order`, sorted. Most items of a long list
/// take one comparison (against the last kept), so this is cheaper than
/// sorting or selecting over thousands.
fn first<T>(n: usize, items: &[T], order: impl Fn(&T, &T) -> Ordering) -> Vec<&T> {
    let mut kept: Vec<&T> = Vec::with_capacity(n + 1);
    for item in items {
        if kept.len() == n && kept.last().is_none_or(|last| order(item, last).is_ge()) {
            continue;
        }
        let at = kept.partition_point(|k| order(k, item).is_lt());
        kept.insert(at, item);
        kept.truncate(n);
    }
    kept
}

fn group(route: &Route, c: &Candidate) -> u8 {
    match route {
        Route::Local if c.is_self => 0,
        Route::Local if c.path.direct => 1,
        Route::Local => 2,
        _ => 0,
    }
}
