//! Properties of placement over arbitrary networks and jobs.

mod support;

use std::collections::BTreeSet;

use platform::capability::Tier;
use platform::jobs::{Route, Sensitivity, Workload};
use platform::people::Role;
use proptest::prelude::*;
use scheduler::{explain, place, Candidate, Filter, JobSpec, Outcome, Verdict, KEPT};
use support::{device, rules, CHAT, EMBED};

const TIERS: [Tier; 5] = [
    Tier::Tier0,
    Tier::Tier1,
    Tier::Tier2,
    Tier::Tier3,
    Tier::Tier4,
];
const MODELS: [(&str, &str); 3] = [(CHAT, "chat"), (EMBED, "embedding"), ("llama", "chat")];

fn arb_device(index: usize) -> impl Strategy<Value = Candidate> {
    // Mostly devices that could take a job, so that rankings are long.
    let models = prop_oneof![3 => Just(0b111u8), 2 => 0u8..8];
    let hardware = (
        0..5usize,
        1u64..32,
        any::<bool>(),
        models,
        prop::bool::weighted(0.05),
    );
    let offer = (
        prop::bool::weighted(0.85),
        prop_oneof![9 => 1u32..5, 1 => Just(0u32)],
        0u32..4,
        0u32..3,
        prop::bool::weighted(0.05),
    );
    let power = (
        proptest::option::of((0u8..=100, any::<bool>())),
        proptest::option::of((20i32..110, proptest::option::of(60i32..110))),
    );
    let standing = (
        prop::bool::weighted(0.9),
        prop::bool::weighted(0.9),
        prop::bool::weighted(0.05),
        prop::bool::weighted(0.85),
        prop::bool::weighted(0.7),
    );
    let path = (proptest::option::of(0.0f64..600.0), any::<bool>(), 0u32..3);
    (hardware, offer, power, standing, path).prop_map(
        move |(
            (tier, ram_gb, gpu, models, no_report),
            (serving, slots, busy, queued, no_offer),
            (battery, thermal),
            (online, member, revoked, reported, me),
            (rtt, direct, inflight),
        )| {
            let offered: Vec<_> = MODELS
                .iter()
                .enumerate()
                .filter(|(i, _)| models & (1 << i) != 0)
                .map(|(_, m)| *m)
                .collect();
            let mut d = device(&format!("d{index:02}"))
                .tier(TIERS[tier])
                .ram_mb(ram_gb * 1024)
                .models(&offered)
                .slots(slots, busy, queued)
                .inflight(inflight);
            if gpu {
                d = d.gpu();
            }
            if !serving {
                d = d.not_serving(if slots % 2 == 0 {
                    Some("paused by owner")
                } else {
                    None
                });
            }
            if let Some((percent, on_ac)) = battery {
                d = d.battery(percent, on_ac);
            }
            if let Some((celsius, critical)) = thermal {
                d = d.thermal(celsius, critical);
            }
            d = match rtt {
                Some(ms) => d.rtt(ms),
                None => d.rtt_unknown(),
            };
            if !direct {
                d = d.relayed();
            }
            if !online {
                d = d.offline();
            }
            if !member {
                d = d.not_member();
            }
            if revoked {
                d = d.revoked();
            }
            if no_offer {
                d = d.no_offer();
            }
            if no_report && !reported {
                d = d.no_report();
            }
            if me && index == 0 {
                d = d.me();
            }
            d.build()
        },
    )
}

fn arb_devices(max: usize) -> impl Strategy<Value = Vec<Candidate>> {
    (0..=max).prop_flat_map(|n| (0..n).map(arb_device).collect::<Vec<_>>())
}

fn arb_route(devices: usize) -> impl Strategy<Value = Route> {
    prop_oneof![
        3 => Just(Route::Auto),
        3 => Just(Route::Local),
        1 => (0..5usize).prop_map(|t| Route::Tier(TIERS[t])),
        1 => proptest::collection::vec(0..devices.max(1) + 2, 1..8).prop_map(|picks| {
            Route::Devices(picks.into_iter().map(|i| format!("d{i:02}")).collect())
        }),
    ]
}

fn arb_spec(devices: usize) -> impl Strategy<Value = JobSpec> {
    (
        (
            prop::bool::weighted(0.3),
            prop_oneof![3 => Just(None), 1 => (0..MODELS.len()).prop_map(Some)],
            arb_route(devices),
        ),
        (
            prop_oneof![3 => Just(None), 1 => (0..5usize).prop_map(Some)],
            prop::bool::weighted(0.1),
            prop_oneof![3 => Just(0u64), 1 => 1024u64..16_384],
            prop_oneof![2 => Just(None), 1 => (1u64..500).prop_map(Some)],
        ),
        (
            prop_oneof![6 => Just(0usize), 2 => Just(1), 1 => Just(2)],
            0..3usize,
        ),
    )
        .prop_map(
            |((embeddings, model, route), (min_tier, needs_gpu, min_ram_mb, latency), (s, r))| {
                let workload = if embeddings {
                    Workload::Embeddings
                } else {
                    Workload::SmallChat
                };
                let mut spec = JobSpec::new(workload, Role::ALL[r]);
                spec.model = model.map(|m| MODELS[m].0.to_owned());
                spec.route = route;
                spec.min_tier = min_tier.map(|t| TIERS[t]);
                spec.needs_gpu = needs_gpu;
                spec.min_ram_mb = min_ram_mb;
                spec.max_latency_ms = latency;
                spec.sensitivity = [
                    Sensitivity::Public,
                    Sensitivity::Private,
                    Sensitivity::Sensitive,
                ][s];
                spec
            },
        )
}

fn arb_case(max: usize) -> impl Strategy<Value = (JobSpec, Vec<Candidate>)> {
    arb_devices(max).prop_flat_map(|cs| (arb_spec(cs.len()), Just(cs)))
}

/// What every eligible device must be, checked without the scheduler's own
/// filter code.
fn plainly_fit(spec: &JobSpec, c: &Candidate) -> bool {
    let Some(caps) = &c.capabilities else {
        return false;
    };
    let Some(offer) = &caps.compute else {
        return false;
    };
    let routed = match &spec.route {
        Route::Auto | Route::Local => true,
        Route::Devices(names) => names.contains(&c.name),
        Route::Tier(t) => caps.tier >= *t,
    };
    let kind = spec.workload.model_kind();
    let has_model = offer
        .models
        .iter()
        .any(|m| m.kind == kind && spec.model.as_ref().is_none_or(|n| *n == m.name));
    let battery_ok = caps
        .battery
        .as_ref()
        .is_none_or(|b| b.on_ac || b.percent >= scheduler::MIN_BATTERY_PERCENT);
    let fast = match (spec.max_latency_ms, c.path.rtt_ms) {
        (Some(max), Some(rtt)) => rtt <= max as f64,
        _ => true,
    };
    c.member
        && !c.revoked
        && c.online
        && routed
        && spec.min_tier.is_none_or(|t| caps.tier >= t)
        && caps.ram_bytes >> 20 >= spec.min_ram_mb
        && (!spec.needs_gpu || !caps.gpus.is_empty())
        && has_model
        && offer.serving
        && offer.slots > 0
        && battery_ok
        && fast
}

proptest! {
    #[test]
    fn never_ranks_a_device_that_fails_a_filter((spec, cs) in arb_case(24)) {
        let p = place(&spec, &cs, &rules());
        for r in &p.ranked {
            prop_assert!(r.filters.iter().all(|f| f.outcome == Outcome::Passed), "{r:?}");
            let c = cs.iter().find(|c| c.name == r.name).unwrap();
            prop_assert!(plainly_fit(&spec, c), "{} ranked: {c:?}", r.name);
        }
        for r in &p.rejected {
            let c = cs.iter().find(|c| c.name == r.name).unwrap();
            prop_assert!(!plainly_fit(&spec, c) || r.failed_filter == Filter::Policy, "{r:?}");
        }
    }

    #[test]
    fn the_same_input_places_the_same_way((spec, cs) in arb_case(24)) {
        let a = place(&spec, &cs, &rules());
        let b = place(&spec, &cs, &rules());
        prop_assert_eq!(&a, &b);
        let mut reversed = cs.clone();
        reversed.reverse();
        let c = place(&spec, &reversed, &rules());
        prop_assert_eq!(&a.ranked, &c.ranked, "the ranking ignores input order");
        prop_assert_eq!(&a.excluded, &c.excluded);
    }

    #[test]
    fn scores_never_increase_down_the_ranking((spec, cs) in arb_case(24)) {
        prop_assume!(spec.route != Route::Local);
        let p = place(&spec, &cs, &rules());
        for pair in p.ranked.windows(2) {
            prop_assert!(pair[0].score >= pair[1].score, "{} before {}", pair[0].name, pair[1].name);
            if pair[0].score == pair[1].score {
                prop_assert!(pair[0].name < pair[1].name);
            }
        }
    }

    #[test]
    fn local_ranks_this_device_then_direct_then_relayed((spec, cs) in arb_case(24)) {
        let mut spec = spec;
        spec.route = Route::Local;
        let p = place(&spec, &cs, &rules());
        let group = |name: &str| {
            let c = cs.iter().find(|c| c.name == name).unwrap();
            if c.is_self { 0 } else if c.path.direct { 1 } else { 2 }
        };
        for pair in p.ranked.windows(2) {
            let (a, b) = (group(&pair[0].name), group(&pair[1].name));
            prop_assert!(a <= b);
            if a == b {
                prop_assert!(pair[0].score >= pair[1].score);
            }
        }
    }

    #[test]
    fn every_device_is_counted_once((spec, cs) in arb_case(150)) {
        let p = place(&spec, &cs, &rules());
        let excluded: usize = p.excluded.iter().map(|e| e.devices).sum();
        prop_assert_eq!(p.eligible + excluded, cs.len());
        prop_assert_eq!(p.ranked.len(), p.eligible.min(KEPT));
        prop_assert_eq!(p.rejected.len(), excluded.min(KEPT));
        let listed: Vec<&str> = p.ranked.iter().map(|r| r.name.as_str())
            .chain(p.rejected.iter().map(|r| r.name.as_str()))
            .collect();
        let distinct: BTreeSet<&str> = listed.iter().copied().collect();
        prop_assert_eq!(distinct.len(), listed.len(), "no device twice");
        if cs.len() <= KEPT {
            let all: BTreeSet<&str> = cs.iter().map(|c| c.name.as_str()).collect();
            prop_assert_eq!(distinct, all, "small networks list every device");
        }
    }

    #[test]
    fn rejected_records_stop_at_the_failed_filter((spec, cs) in arb_case(24)) {
        let p = place(&spec, &cs, &rules());
        for r in &p.rejected {
            let at = Filter::ALL.iter().position(|f| *f == r.failed_filter).unwrap();
            for (i, check) in r.filters.iter().enumerate() {
                prop_assert_eq!(check.filter, Filter::ALL[i]);
                let want = match i.cmp(&at) {
                    std::cmp::Ordering::Less => Outcome::Passed,
                    std::cmp::Ordering::Equal => Outcome::Failed,
                    std::cmp::Ordering::Greater => Outcome::NotEvaluated,
                };
                prop_assert_eq!(check.outcome, want);
            }
            prop_assert_eq!(&r.filters[at].detail, &r.detail);
        }
    }

    #[test]
    fn the_kept_ranking_is_the_head_of_the_whole_one((spec, cs) in arb_case(100)) {
        prop_assume!(spec.route != Route::Local);
        let p = place(&spec, &cs, &rules());
        let mut all: Vec<(f64, String)> = cs
            .iter()
            .filter_map(|c| match explain(&spec, &cs, &rules(), &c.name) {
                Some(Verdict::Eligible(r)) => Some((r.score, r.name)),
                _ => None,
            })
            .collect();
        all.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        prop_assert_eq!(all.len(), p.eligible);
        let head: Vec<&str> = all.iter().take(KEPT).map(|(_, n)| n.as_str()).collect();
        let ranked: Vec<&str> = p.ranked.iter().map(|r| r.name.as_str()).collect();
        prop_assert_eq!(ranked, head);
        for (r, (score, _)) in p.ranked.iter().zip(&all) {
            prop_assert!((r.score - score).abs() < 1e-9);
        }
    }
}
