//! Eligibility: the filters a device must pass to be offered a job, always
//! in the order of [`Filter::ALL`], each with what it found.
//!
//! A check yields a `Finding` (borrowed, no allocation) either way, so
//! the hot path learns only the first failure and text is rendered only
//! for what the debug view shows.

use std::fmt;
use std::mem::{self, Discriminant};

use platform::capability::{OfferedModel, Tier};
use platform::jobs::{Route, Sensitivity, Workload};
use platform::people::Role;
use serde::{Deserialize, Serialize};

use crate::candidate::Candidate;
use crate::JobSpec;

/// A device on battery power below this charge gets no job.
pub const MIN_BATTERY_PERCENT: u8 = 20;

const MIB: u64 = 1 << 20;
const TIERS: [Tier; 5] = [
    Tier::Tier0,
    Tier::Tier1,
    Tier::Tier2,
    Tier::Tier3,
    Tier::Tier4,
];

/// One eligibility filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    /// The owner is an active member and the node key is valid.
    Membership,
    /// The network's policy lets the submitter run this job, and on this
    /// device's tier.
    Policy,
    /// The job's route admits the device.
    Route,
    /// Tier, RAM, GPU and the model the job needs.
    Requirements,
    /// Online, serving, a job slot, not on a flat battery.
    State,
    /// The path is fast enough for the job's latency limit.
    Latency,
}

impl Filter {
    /// Every filter, in the order they are applied (and declared:
    /// `filter as usize` is its place here).
    pub const ALL: [Filter; 6] = [
        Filter::Membership,
        Filter::Policy,
        Filter::Route,
        Filter::Requirements,
        Filter::State,
        Filter::Latency,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Filter::Membership => "membership",
            Filter::Policy => "policy",
            Filter::Route => "route",
            Filter::Requirements => "requirements",
            Filter::State => "state",
            Filter::Latency => "latency",
        }
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one filter made of one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Passed,
    Failed,
    /// An earlier filter already excluded the device.
    NotEvaluated,
}

/// One filter's verdict on one device, for the debug view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterCheck {
    pub filter: Filter,
    pub outcome: Outcome,
    /// What the filter found; empty when not evaluated.
    pub detail: String,
}

/// What a placement checks against, worked out once per job: the policy
/// answers depend on the job and on the tier only.
pub(crate) struct Context<'a> {
    pub spec: &'a JobSpec,
    submit: Result<(), String>,
    run_on: [Result<(), String>; 5],
    kind: &'static str,
}

impl<'a> Context<'a> {
    pub fn new(spec: &'a JobSpec, rules: &platform::jobs::ComputeRules) -> Self {
        let p = &rules.policy;
        let role = spec.submitter_role;
        Context {
            spec,
            submit: p.may_submit(role, spec.workload, spec.sensitivity, &spec.route),
            run_on: TIERS.map(|t| p.may_run_on(role, spec.sensitivity, t)),
            kind: spec.workload.model_kind(),
        }
    }
}

/// What a filter found, passing or failing. Rendered by `Display`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Finding<'a> {
    Member,
    NotMember,
    Revoked,
    Allowed {
        role: Role,
        sensitivity: Sensitivity,
        workload: Workload,
        tier: Tier,
    },
    Refused(&'a str),
    AnyDevice(&'a Route),
    Named(&'a Route),
    NotNamed(&'a Route),
    RouteTier {
        have: Tier,
        need: Tier,
    },
    NoReport,
    BelowMinTier {
        have: Tier,
        need: Tier,
    },
    TooLittleRam {
        have_mb: u64,
        need_mb: u64,
    },
    NoGpu,
    NoModelOfKind(&'static str),
    NoModelWithSha(&'static str),
    ModelMissing(&'a str),
    ModelWrongKind {
        name: &'a str,
        kind: &'a str,
        want: &'static str,
    },
    ModelShaMismatch(&'a str),
    Meets {
        tier: Tier,
        model: &'a str,
    },
    Offline,
    NoOffer,
    NotServing(Option<&'a str>),
    NoSlots,
    LowBattery(u8),
    Serving {
        busy: u32,
        slots: u32,
        queued: u32,
    },
    NoLatencyLimit,
    RttUnknown,
    RttWithin {
        rtt: f64,
        max: u64,
    },
    RttAbove {
        rtt: f64,
        max: u64,
    },
}

impl fmt::Display for Finding<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Finding::Member => f.write_str("owner is a member; key valid"),
            Finding::NotMember => f.write_str("owner is not an active member of the network"),
            Finding::Revoked => f.write_str("node key expired or removed"),
            Finding::Allowed {
                role,
                sensitivity,
                workload,
                tier,
            } => write!(
                f,
                "a {role} may run {sensitivity} {workload} jobs on {tier}"
            ),
            Finding::Refused(why) => f.write_str(why),
            Finding::AnyDevice(route) => write!(f, "{route} admits any device"),
            Finding::Named(route) => write!(f, "named in {route}"),
            Finding::NotNamed(route) => write!(f, "not named in {route}"),
            Finding::RouteTier { have, need } if have >= need => {
                write!(f, "{have} meets tier:{need}")
            }
            Finding::RouteTier { have, need } => write!(f, "{have} is below tier:{need}"),
            Finding::NoReport => f.write_str("no capability report"),
            Finding::BelowMinTier { have, need } => {
                write!(f, "{have}; the job needs {need} or above")
            }
            Finding::TooLittleRam { have_mb, need_mb } => {
                write!(f, "{have_mb} MiB RAM; the job needs {need_mb} MiB")
            }
            Finding::NoGpu => f.write_str("no GPU; the job needs one"),
            Finding::NoModelOfKind(kind) => write!(f, "offers no {kind} model"),
            Finding::NoModelWithSha(kind) => {
                write!(f, "offers no {kind} model with the sha256 the job pins")
            }
            Finding::ModelMissing(name) => write!(f, "does not offer {name}"),
            Finding::ModelWrongKind { name, kind, want } => {
                write!(f, "{name} is a {kind} model, not {want}")
            }
            Finding::ModelShaMismatch(name) => {
                write!(f, "{name} has a different sha256 than the job pins")
            }
            Finding::Meets { tier, model } => write!(f, "{tier}; runs {model}"),
            Finding::Offline => f.write_str("offline"),
            Finding::NoOffer => f.write_str("offers no compute"),
            Finding::NotServing(Some(reason)) => f.write_str(reason),
            Finding::NotServing(None) => f.write_str("not serving"),
            Finding::NoSlots => f.write_str("serving with no job slots"),
            Finding::LowBattery(percent) => write!(
                f,
                "on battery at {percent} % (below {MIN_BATTERY_PERCENT} %)"
            ),
            Finding::Serving {
                busy,
                slots,
                queued,
            } => write!(f, "serving; {busy}/{slots} slots busy, {queued} queued"),
            Finding::NoLatencyLimit => f.write_str("no latency limit"),
            Finding::RttUnknown => f.write_str("rtt not measured yet"),
            Finding::RttWithin { rtt, max } => write!(f, "rtt {rtt:.0} ms within {max} ms"),
            Finding::RttAbove { rtt, max } => write!(f, "rtt {rtt:.0} ms above {max} ms"),
        }
    }
}

impl<'a> Finding<'a> {
    /// Findings that read the same once per-device measurements are left
    /// out share a group: same kind, same worker- or policy-given text.
    pub(crate) fn group(&self) -> (Discriminant<Finding<'a>>, &'a str) {
        let text = match *self {
            Finding::Refused(text) | Finding::NotServing(Some(text)) => text,
            Finding::ModelWrongKind { kind, .. } => kind,
            _ => "",
        };
        (mem::discriminant(self), text)
    }
}

/// A finding without the device's own measurement ("less than 2048 MiB
/// RAM", not "1024 MiB RAM; …"): how a group of them reads.
pub(crate) struct Summary<'a>(pub Finding<'a>);

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Finding::RouteTier { need, .. } => write!(f, "below tier:{need}"),
            Finding::BelowMinTier { need, .. } => write!(f, "below {need}"),
            Finding::TooLittleRam { need_mb, .. } => write!(f, "less than {need_mb} MiB RAM"),
            Finding::LowBattery(_) => write!(f, "on battery below {MIN_BATTERY_PERCENT} %"),
            Finding::RttAbove { max, .. } => write!(f, "rtt above {max} ms"),
            other => other.fmt(f),
        }
    }
}

/// One filter on one device: why it fails, if it does.
fn check<'a>(filter: Filter, ctx: &'a Context<'a>, c: &'a Candidate) -> Result<(), Finding<'a>> {
    match filter {
        Filter::Membership => membership(c),
        Filter::Policy => policy(ctx, c),
        Filter::Route => route(ctx, c),
        Filter::Requirements => requirements(ctx, c, None).map(|_| ()),
        Filter::State => state(c),
        Filter::Latency => latency(ctx, c),
    }
}

/// The model a device would run the job with when it passes every filter;
/// otherwise the first filter it fails, and why. `looked_up` is the name of
/// the model [`model`] found for it, when the caller looked already.
///
/// The filters are called directly, in the order of [`Filter::ALL`]: this
/// runs for every device of a placement.
pub(crate) fn evaluate<'a>(
    ctx: &'a Context<'a>,
    c: &'a Candidate,
    looked_up: Option<&'a str>,
) -> Result<&'a str, (Filter, Finding<'a>)> {
    let fail = |filter| move |why| (filter, why);
    membership(c).map_err(fail(Filter::Membership))?;
    policy(ctx, c).map_err(fail(Filter::Policy))?;
    route(ctx, c).map_err(fail(Filter::Route))?;
    let model = requirements(ctx, c, looked_up).map_err(fail(Filter::Requirements))?;
    state(c).map_err(fail(Filter::State))?;
    latency(ctx, c).map_err(fail(Filter::Latency))?;
    Ok(model)
}

/// Every filter's verdict, those after the first failure not evaluated.
pub(crate) fn record(ctx: &Context<'_>, c: &Candidate) -> Vec<FilterCheck> {
    let mut failed = false;
    Filter::ALL
        .iter()
        .map(|&filter| {
            let (outcome, detail) = if failed {
                (Outcome::NotEvaluated, String::new())
            } else {
                match check(filter, ctx, c) {
                    Ok(()) => (Outcome::Passed, note(filter, ctx, c).to_string()),
                    Err(why) => {
                        failed = true;
                        (Outcome::Failed, why.to_string())
                    }
                }
            };
            FilterCheck {
                filter,
                outcome,
                detail,
            }
        })
        .collect()
}

/// What a filter the device passed found: the debug view's account of a
/// pass. (The checks themselves only say why a device fails, which is all
/// a placement needs of the thousands it rejects or only counts.)
fn note<'a>(filter: Filter, ctx: &'a Context<'a>, c: &'a Candidate) -> Finding<'a> {
    let spec = ctx.spec;
    match filter {
        Filter::Membership => Finding::Member,
        Filter::Policy => Finding::Allowed {
            role: spec.submitter_role,
            sensitivity: spec.sensitivity,
            workload: spec.workload,
            tier: c.tier(),
        },
        Filter::Route => match &spec.route {
            Route::Tier(need) => Finding::RouteTier {
                have: c.tier(),
                need: *need,
            },
            route @ Route::Devices(_) => Finding::Named(route),
            route => Finding::AnyDevice(route),
        },
        Filter::Requirements => Finding::Meets {
            tier: c.tier(),
            model: requirements(ctx, c, None).unwrap_or_default(),
        },
        Filter::State => {
            let offer = c
                .capabilities
                .as_ref()
                .and_then(|caps| caps.compute.as_ref());
            Finding::Serving {
                busy: offer.map_or(0, |o| o.busy),
                slots: offer.map_or(0, |o| o.slots),
                queued: offer.map_or(0, |o| o.queued),
            }
        }
        Filter::Latency => match (spec.max_latency_ms, c.path.rtt_ms) {
            (None, _) => Finding::NoLatencyLimit,
            (Some(max), Some(rtt)) if rtt.is_finite() => Finding::RttWithin { rtt, max },
            (Some(_), _) => Finding::RttUnknown,
        },
    }
}

#[inline]
fn membership(c: &Candidate) -> Result<(), Finding<'_>> {
    if c.revoked {
        Err(Finding::Revoked)
    } else if !c.member {
        Err(Finding::NotMember)
    } else {
        Ok(())
    }
}

#[inline]
fn policy<'a>(ctx: &'a Context<'a>, c: &Candidate) -> Result<(), Finding<'a>> {
    ctx.submit
        .as_ref()
        .and(ctx.run_on[c.tier() as usize].as_ref())
        .map(|_| ())
        .map_err(|why| Finding::Refused(why))
}

#[inline]
fn route<'a>(ctx: &'a Context<'a>, c: &Candidate) -> Result<(), Finding<'a>> {
    let route = &ctx.spec.route;
    match route {
        Route::Auto | Route::Local => Ok(()),
        Route::Devices(names) if names.contains(&c.name) => Ok(()),
        Route::Devices(_) => Err(Finding::NotNamed(route)),
        Route::Tier(need) if c.tier() >= *need => Ok(()),
        Route::Tier(need) => Err(Finding::RouteTier {
            have: c.tier(),
            need: *need,
        }),
    }
}

/// The name of the model the device would run the job with, or why it
/// cannot. `looked_up`: the name [`model`] found, when the caller looked
/// already.
#[inline]
fn requirements<'a>(
    ctx: &'a Context<'a>,
    c: &'a Candidate,
    looked_up: Option<&'a str>,
) -> Result<&'a str, Finding<'a>> {
    let spec = ctx.spec;
    let caps = c.capabilities.as_ref().ok_or(Finding::NoReport)?;
    if let Some(need) = spec.min_tier {
        if caps.tier < need {
            return Err(Finding::BelowMinTier {
                have: caps.tier,
                need,
            });
        }
    }
    let have_mb = caps.ram_bytes / MIB;
    if have_mb < spec.min_ram_mb {
        return Err(Finding::TooLittleRam {
            have_mb,
            need_mb: spec.min_ram_mb,
        });
    }
    if spec.needs_gpu && caps.gpus.is_empty() {
        return Err(Finding::NoGpu);
    }
    match looked_up {
        Some(name) => Ok(name),
        None => model(ctx, c).map(|m| m.name.as_str()),
    }
}

/// The offered model a device would run the job with (the one named, or
/// the first of the workload's kind), matching the pinned sha256; or why
/// there is none.
///
/// The one part of a filter that reads a device's model list, memory of
/// its own: [`crate::place`] looks models up for a block of devices in a
/// loop of their own before filtering the block, where those reads overlap
/// instead of stalling the filters device by device (what counts over
/// thousands of devices).
#[inline]
pub(crate) fn model<'a>(
    ctx: &'a Context<'a>,
    c: &'a Candidate,
) -> Result<&'a OfferedModel, Finding<'a>> {
    let spec = ctx.spec;
    let caps = c.capabilities.as_ref().ok_or(Finding::NoReport)?;
    let offered: &[OfferedModel] = caps.compute.as_ref().map_or(&[], |o| &o.models);
    match &spec.model {
        None => {
            let mut of_kind = false;
            for m in offered.iter().filter(|m| m.kind == ctx.kind) {
                if sha_matches(spec, m) {
                    return Ok(m);
                }
                of_kind = true;
            }
            Err(if of_kind {
                Finding::NoModelWithSha(ctx.kind)
            } else {
                Finding::NoModelOfKind(ctx.kind)
            })
        }
        Some(name) => {
            let m = offered
                .iter()
                .find(|m| m.name == *name)
                .ok_or(Finding::ModelMissing(name))?;
            if m.kind != ctx.kind {
                return Err(Finding::ModelWrongKind {
                    name,
                    kind: &m.kind,
                    want: ctx.kind,
                });
            }
            if !sha_matches(spec, m) {
                return Err(Finding::ModelShaMismatch(name));
            }
            Ok(m)
        }
    }
}

fn sha_matches(spec: &JobSpec, m: &OfferedModel) -> bool {
    spec.model_sha256
        .as_deref()
        .is_none_or(|want| want.eq_ignore_ascii_case(&m.sha256))
}

#[inline]
fn state(c: &Candidate) -> Result<(), Finding<'_>> {
    if !c.online {
        return Err(Finding::Offline);
    }
    let caps = c.capabilities.as_ref().ok_or(Finding::NoOffer)?;
    let offer = caps.compute.as_ref().ok_or(Finding::NoOffer)?;
    // The worker's own contribution policy (battery, heat, owner's choice)
    // decides `serving`, and its reason is the best explanation there is;
    // the battery rule below only catches a worker that serves regardless.
    if !offer.serving {
        return Err(Finding::NotServing(offer.reason.as_deref()));
    }
    if offer.slots == 0 {
        return Err(Finding::NoSlots);
    }
    match caps.battery.as_ref() {
        Some(b) if !b.on_ac && b.percent < MIN_BATTERY_PERCENT => {
            Err(Finding::LowBattery(b.percent))
        }
        _ => Ok(()),
    }
}

#[inline]
fn latency<'a>(ctx: &Context<'_>, c: &Candidate) -> Result<(), Finding<'a>> {
    match (ctx.spec.max_latency_ms, c.path.rtt_ms) {
        (Some(max), Some(rtt)) if rtt.is_finite() && rtt > max as f64 => {
            Err(Finding::RttAbove { rtt, max })
        }
        _ => Ok(()),
    }
}
