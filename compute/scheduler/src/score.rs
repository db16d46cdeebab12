//! The linear score that orders eligible devices: each feature normalised
//! to [0, 1], times the network's weight (`ScoreWeights`, thousandths, so
//! 250 weighs 0.25), summed. Higher is better; a negative weight makes a
//! feature a cost (as `rtt_ms`'s does by default).
//!
//! | feature | raw | normalised |
//! |---|---|---|
//! | `rtt_ms` | measured path rtt, ms | min(rtt, [`RTT_CEILING_MS`]) / [`RTT_CEILING_MS`], a relayed path's rtt taken as at least [`RELAY_FLOOR_MS`]; unknown (or not finite) rtt 1 |
//! | `is_plugged_in` | 1 or 0 | 1 with no battery or on AC power, else 0 |
//! | `thermal_headroom` | hottest zone, °C | (critical − t) / (critical − [`COOL_CELSIUS`]), clamped; critical [`DEFAULT_CRITICAL_CELSIUS`] when not reported; no reading 0.5 |
//! | `idle_score` | free slots | (slots − busy) / slots |
//! | `credit_rate_efficiency` | tier's burn rate, µcredits/min | cheapest burn rate among eligible devices / this one's (1 when free) |
//! | `load` | queued + this device's jobs in flight there | 1 / (1 + raw) |

use platform::capability::{Capabilities, Tier};
use platform::jobs::{CreditRates, ScoreWeights};
use serde::{Deserialize, Serialize};

use crate::candidate::Candidate;

/// A relayed path is scored as if its rtt were at least this: a relay
/// adds hops and shares its bandwidth, which one ping does not show.
pub const RELAY_FLOOR_MS: f64 = 200.0;
/// Rtts at or above this are all equally bad.
pub const RTT_CEILING_MS: f64 = 1000.0;
/// A device this cool has all its thermal headroom.
pub const COOL_CELSIUS: f64 = 30.0;
/// The critical temperature assumed where a device reports none.
pub const DEFAULT_CRITICAL_CELSIUS: f64 = 100.0;
/// Thermal headroom of a device that reports no temperature: neither
/// rewarded nor punished.
pub const UNKNOWN_THERMAL_HEADROOM: f64 = 0.5;

/// One feature of the score, named as in `ScoreWeights`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    RttMs,
    IsPluggedIn,
    ThermalHeadroom,
    IdleScore,
    CreditRateEfficiency,
    Load,
}

impl Feature {
    /// In declaration order: `feature as usize` is its place here.
    pub const ALL: [Feature; 6] = [
        Feature::RttMs,
        Feature::IsPluggedIn,
        Feature::ThermalHeadroom,
        Feature::IdleScore,
        Feature::CreditRateEfficiency,
        Feature::Load,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Feature::RttMs => "rtt_ms",
            Feature::IsPluggedIn => "is_plugged_in",
            Feature::ThermalHeadroom => "thermal_headroom",
            Feature::IdleScore => "idle_score",
            Feature::CreditRateEfficiency => "credit_rate_efficiency",
            Feature::Load => "load",
        }
    }

    /// The feature's weight in `weights`, as a factor.
    pub fn weight(self, weights: &ScoreWeights) -> f64 {
        let thousandths = match self {
            Feature::RttMs => weights.rtt_ms,
            Feature::IsPluggedIn => weights.is_plugged_in,
            Feature::ThermalHeadroom => weights.thermal_headroom,
            Feature::IdleScore => weights.idle_score,
            Feature::CreditRateEfficiency => weights.credit_rate_efficiency,
            Feature::Load => weights.load,
        };
        f64::from(thousandths) / 1000.0
    }
}

impl std::fmt::Display for Feature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One feature's part in a device's score.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Term {
    pub feature: Feature,
    /// The measurement; None where the device reports none.
    pub raw: Option<f64>,
    /// In [0, 1].
    pub normalised: f64,
    pub weight: f64,
    /// `normalised × weight`.
    pub contribution: f64,
}

/// A feature's raw value and its normalised form.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Value {
    raw: Option<f64>,
    normalised: f64,
}

/// Scores devices for one placement.
///
/// `credit_rate_efficiency` compares a device with the cheapest eligible
/// one, known only once every device is filtered; so a placement takes the
/// rest of the score ([`Scorer::partial`]) while it filters, and adds that
/// term ([`Scorer::efficiency`]) from the device's tier afterwards, without
/// reading the device again.
pub(crate) struct Scorer<'a> {
    weights: [f64; 6],
    rates: &'a CreditRates,
}

impl<'a> Scorer<'a> {
    pub fn new(weights: &ScoreWeights, rates: &'a CreditRates) -> Self {
        Scorer {
            weights: Feature::ALL.map(|f| f.weight(weights)),
            rates,
        }
    }

    /// The score without `credit_rate_efficiency`.
    pub fn partial(&self, c: &Candidate) -> f64 {
        let caps = c.capabilities.as_ref();
        let w = |f: Feature| self.weights[f as usize];
        rtt(c).normalised * w(Feature::RttMs)
            + plugged_in(caps).normalised * w(Feature::IsPluggedIn)
            + thermal_headroom(caps).normalised * w(Feature::ThermalHeadroom)
            + idle(caps).normalised * w(Feature::IdleScore)
            + load(c).normalised * w(Feature::Load)
    }

    /// `credit_rate_efficiency`'s part in the score of a `tier` device,
    /// when the cheapest eligible device burns `cheapest` per minute.
    pub fn efficiency(&self, tier: Tier, cheapest: u64) -> f64 {
        let weight = self.weights[Feature::CreditRateEfficiency as usize];
        rate_efficiency(self.rates, tier, cheapest).normalised * weight
    }

    pub fn score(&self, c: &Candidate, cheapest: u64) -> f64 {
        self.partial(c) + self.efficiency(c.tier(), cheapest)
    }

    pub fn terms(&self, c: &Candidate, cheapest: u64) -> Vec<Term> {
        Feature::ALL
            .iter()
            .zip(self.values(c, cheapest))
            .zip(self.weights)
            .map(|((&feature, v), weight)| Term {
                feature,
                raw: v.raw,
                normalised: v.normalised,
                weight,
                contribution: v.normalised * weight,
            })
            .collect()
    }

    /// In the order of [`Feature::ALL`].
    fn values(&self, c: &Candidate, cheapest: u64) -> [Value; 6] {
        let caps = c.capabilities.as_ref();
        [
            rtt(c),
            plugged_in(caps),
            thermal_headroom(caps),
            idle(caps),
            rate_efficiency(self.rates, c.tier(), cheapest),
            load(c),
        ]
    }
}

fn rate_efficiency(rates: &CreditRates, tier: Tier, cheapest: u64) -> Value {
    let rate = rates.burn_per_minute[tier as usize];
    let normalised = if rate == 0 {
        1.0
    } else {
        cheapest.min(rate) as f64 / rate as f64
    };
    Value {
        raw: Some(rate as f64),
        normalised,
    }
}

fn rtt(c: &Candidate) -> Value {
    match c.path.rtt_ms.filter(|r| r.is_finite()) {
        None => Value {
            raw: None,
            normalised: 1.0,
        },
        Some(rtt) => {
            let effective = if c.path.direct || c.is_self {
                rtt
            } else {
                rtt.max(RELAY_FLOOR_MS)
            };
            Value {
                raw: Some(rtt),
                normalised: (effective / RTT_CEILING_MS).clamp(0.0, 1.0),
            }
        }
    }
}

fn plugged_in(caps: Option<&Capabilities>) -> Value {
    let on_power = caps
        .and_then(|c| c.battery.as_ref())
        .is_none_or(|b| b.on_ac);
    let v = if on_power { 1.0 } else { 0.0 };
    Value {
        raw: Some(v),
        normalised: v,
    }
}

fn thermal_headroom(caps: Option<&Capabilities>) -> Value {
    let Some(t) = caps.and_then(|c| c.thermal.as_ref()) else {
        return Value {
            raw: None,
            normalised: UNKNOWN_THERMAL_HEADROOM,
        };
    };
    let celsius = f64::from(t.celsius);
    let critical = t
        .critical_celsius
        .map_or(DEFAULT_CRITICAL_CELSIUS, f64::from);
    // A critical point at or below the cool mark leaves no range to scale.
    let span = (critical - COOL_CELSIUS).max(1.0);
    Value {
        raw: Some(celsius),
        normalised: ((critical - celsius) / span).clamp(0.0, 1.0),
    }
}

fn idle(caps: Option<&Capabilities>) -> Value {
    let offer = caps.and_then(|c| c.compute.as_ref());
    let (slots, busy) = offer.map_or((0, 0), |o| (o.slots, o.busy));
    let free = slots.saturating_sub(busy);
    let normalised = if slots == 0 {
        0.0
    } else {
        f64::from(free) / f64::from(slots)
    };
    Value {
        raw: Some(f64::from(free)),
        normalised,
    }
}

fn load(c: &Candidate) -> Value {
    let queued = c
        .capabilities
        .as_ref()
        .and_then(|caps| caps.compute.as_ref())
        .map_or(0, |o| o.queued);
    let waiting = f64::from(queued) + f64::from(c.inflight);
    Value {
        raw: Some(waiting),
        normalised: 1.0 / (1.0 + waiting),
    }
}
