//! Each eligibility filter, one table per filter: which devices pass, which
//! fail, and what the failure says.

mod support;

use platform::capability::Tier;
use platform::jobs::{ComputeRules, Route, Sensitivity, Workload};
use platform::people::Role;
use scheduler::{explain, Filter, JobSpec, Outcome, Verdict};
use support::{chat, device, rules, sha_of, verdict, Device, CHAT, EMBED};

/// Rows of (what, job, device, expected failure: filter and a phrase of its
/// detail; None: eligible).
type Table = Vec<(
    &'static str,
    JobSpec,
    Device,
    Option<(Filter, &'static str)>,
)>;

fn run(table: Table) {
    for (what, spec, d, want) in table {
        let got = verdict(&spec, d);
        match (want, &got) {
            (None, None) => {}
            (Some((filter, phrase)), Some((f, detail))) => {
                assert_eq!(*f, filter, "{what}: {detail}");
                assert!(
                    detail.contains(phrase),
                    "{what}: {detail:?} does not say {phrase:?}"
                );
            }
            _ => panic!("{what}: expected {want:?}, got {got:?}"),
        }
    }
}

fn with(spec: JobSpec, change: impl FnOnce(&mut JobSpec)) -> JobSpec {
    let mut spec = spec;
    change(&mut spec);
    spec
}

#[test]
fn membership() {
    let member = chat(Role::Member);
    run(vec![
        ("a member's device", member.clone(), device("a"), None),
        (
            "no active owner",
            member.clone(),
            device("a").not_member(),
            Some((Filter::Membership, "not an active member")),
        ),
        (
            "key expired",
            member.clone(),
            device("a").revoked(),
            Some((Filter::Membership, "expired or removed")),
        ),
        (
            "expired and ownerless: the key is what matters",
            member,
            device("a").revoked().not_member(),
            Some((Filter::Membership, "expired")),
        ),
    ]);
}

#[test]
fn policy() {
    let private = |role| with(chat(role), |s| s.sensitivity = Sensitivity::Private);
    let sensitive = |role| with(chat(role), |s| s.sensitivity = Sensitivity::Sensitive);
    let pinned = |role| {
        with(sensitive(role), |s| {
            s.route = Route::Devices(vec!["a".into()]);
        })
    };
    run(vec![
        ("guest, public", chat(Role::Guest), device("a"), None),
        (
            "guest, private",
            private(Role::Guest),
            device("a"),
            Some((Filter::Policy, "lets a guest submit public jobs at most")),
        ),
        ("member, private", private(Role::Member), device("a"), None),
        (
            "member, sensitive, not pinned",
            sensitive(Role::Member),
            device("a"),
            Some((Filter::Policy, "only pinned to named devices")),
        ),
        (
            "member, sensitive, pinned",
            pinned(Role::Member),
            device("a"),
            None,
        ),
        (
            "admin, sensitive on a phone",
            sensitive(Role::Admin),
            device("a").tier(Tier::Tier1),
            Some((Filter::Policy, "sensitive jobs run on tier2 or above")),
        ),
        (
            "admin, sensitive on a laptop",
            sensitive(Role::Admin),
            device("a"),
            None,
        ),
        (
            "admin, sensitive, no report: counted as tier0",
            sensitive(Role::Admin),
            device("a").no_report(),
            Some((Filter::Policy, "the device is tier0")),
        ),
    ]);
}

#[test]
fn policy_minimum_tier_per_role() {
    let mut strict = rules();
    strict.policy.guest.min_tier = Tier::Tier3;
    let spec = chat(Role::Guest);
    let candidates = [
        device("small").build(),
        device("big").tier(Tier::Tier3).gpu().build(),
    ];
    let p = scheduler::place(&spec, &candidates, &strict);
    assert_eq!(support::ranked_names(&p), ["big"]);
    assert_eq!(p.rejected[0].failed_filter, Filter::Policy);
    assert!(p.rejected[0]
        .detail
        .contains("guest jobs run on tier3 or above"));
}

#[test]
fn policy_refusing_the_job_refuses_every_device_alike() {
    let mut rules = ComputeRules::default();
    rules.policy.guest.workloads = vec![Workload::Embeddings];
    let spec = chat(Role::Guest);
    let candidates = [device("a").build(), device("b").build()];
    let p = scheduler::place(&spec, &candidates, &rules);
    assert!(p.ranked.is_empty());
    assert_eq!(p.excluded.len(), 1, "one reason for all");
    assert_eq!(p.excluded[0].devices, 2);
    assert_eq!(
        p.explain_none(),
        "no eligible device: 2 failed policy (the network's policy does not let a guest run small_chat)"
    );
}

#[test]
fn route() {
    let to = |route: Route| with(chat(Role::Member), |s| s.route = route);
    let named = |names: &[&str]| {
        to(Route::Devices(
            names.iter().map(|n| n.to_string()).collect(),
        ))
    };
    run(vec![
        ("auto", to(Route::Auto), device("a"), None),
        ("local", to(Route::Local), device("a").relayed(), None),
        ("named", named(&["b", "a"]), device("a"), None),
        (
            "not named",
            named(&["gpu"]),
            device("a"),
            Some((Filter::Route, "not named in device:gpu")),
        ),
        (
            "tier at the floor",
            to(Route::Tier(Tier::Tier2)),
            device("a"),
            None,
        ),
        (
            "tier above the floor",
            to(Route::Tier(Tier::Tier2)),
            device("a").tier(Tier::Tier4).gpu(),
            None,
        ),
        (
            "tier below the floor",
            to(Route::Tier(Tier::Tier3)),
            device("a"),
            Some((Filter::Route, "tier2 is below tier:tier3")),
        ),
    ]);
}

#[test]
fn requirements() {
    let job = |change: fn(&mut JobSpec)| with(chat(Role::Member), change);
    let embed = JobSpec::new(Workload::Embeddings, Role::Member);
    run(vec![
        ("no needs", chat(Role::Member), device("a"), None),
        (
            "min tier met",
            job(|s| s.min_tier = Some(Tier::Tier2)),
            device("a"),
            None,
        ),
        (
            "min tier missed",
            job(|s| s.min_tier = Some(Tier::Tier3)),
            device("a"),
            Some((Filter::Requirements, "tier2; the job needs tier3 or above")),
        ),
        (
            "enough RAM",
            job(|s| s.min_ram_mb = 16 * 1024),
            device("a"),
            None,
        ),
        (
            "too little RAM",
            job(|s| s.min_ram_mb = 4096),
            device("a").ram_mb(2048),
            Some((Filter::Requirements, "2048 MiB RAM; the job needs 4096 MiB")),
        ),
        (
            "GPU present",
            job(|s| s.needs_gpu = true),
            device("a").gpu(),
            None,
        ),
        (
            "GPU missing",
            job(|s| s.needs_gpu = true),
            device("a"),
            Some((Filter::Requirements, "no GPU")),
        ),
        (
            "named model offered",
            job(|s| s.model = Some(CHAT.into())),
            device("a"),
            None,
        ),
        (
            "named model not offered",
            job(|s| s.model = Some("llama-3-70b".into())),
            device("a"),
            Some((Filter::Requirements, "does not offer llama-3-70b")),
        ),
        (
            "named model of the wrong kind",
            job(|s| s.model = Some(EMBED.into())),
            device("a"),
            Some((Filter::Requirements, "is a embedding model, not chat")),
        ),
        (
            "no model of the kind",
            chat(Role::Member),
            device("a").models(&[(EMBED, "embedding")]),
            Some((Filter::Requirements, "offers no chat model")),
        ),
        (
            "embeddings take an embedding model",
            embed.clone(),
            device("a"),
            None,
        ),
        (
            "embeddings on a chat-only device",
            embed,
            device("a").models(&[(CHAT, "chat")]),
            Some((Filter::Requirements, "offers no embedding model")),
        ),
        (
            "pinned sha matches",
            job(|s| {
                s.model = Some(CHAT.into());
                s.model_sha256 = Some(sha_of(CHAT).to_uppercase());
            }),
            device("a"),
            None,
        ),
        (
            "pinned sha differs",
            job(|s| {
                s.model = Some(CHAT.into());
                s.model_sha256 = Some(sha_of("other"));
            }),
            device("a"),
            Some((Filter::Requirements, "different sha256")),
        ),
        (
            "pinned sha, any model of the kind",
            job(|s| s.model_sha256 = Some(sha_of("other"))),
            device("a"),
            Some((Filter::Requirements, "no chat model with the sha256")),
        ),
        (
            "no capability report",
            chat(Role::Member),
            device("a").no_report(),
            Some((Filter::Requirements, "no capability report")),
        ),
        (
            "no compute offer: no models",
            chat(Role::Member),
            device("a").no_offer(),
            Some((Filter::Requirements, "offers no chat model")),
        ),
    ]);
}

#[test]
fn the_model_is_the_one_named_or_the_first_of_its_kind() {
    let d = || device("a").models(&[(EMBED, "embedding"), ("llama", "chat"), (CHAT, "chat")]);
    let p = support::place(&chat(Role::Member), vec![d()]);
    assert_eq!(p.best().map(|r| r.model.as_str()), Some("llama"));
    let mut named = chat(Role::Member);
    named.model = Some(CHAT.into());
    let p = support::place(&named, vec![d()]);
    assert_eq!(p.best().map(|r| r.model.as_str()), Some(CHAT));
}

#[test]
fn state() {
    let spec = chat(Role::Member);
    let s = |d: Device| (spec.clone(), d);
    let rows = vec![
        ("online and serving", s(device("a")), None),
        (
            "offline",
            s(device("a").offline()),
            Some((Filter::State, "offline")),
        ),
        (
            "not serving, with the worker's reason",
            s(device("a").not_serving(Some("not contributing: on battery"))),
            Some((Filter::State, "not contributing: on battery")),
        ),
        (
            "not serving, no reason given",
            s(device("a").not_serving(None)),
            Some((Filter::State, "not serving")),
        ),
        (
            "no job slots",
            s(device("a").slots(0, 0, 0)),
            Some((Filter::State, "no job slots")),
        ),
        (
            "all slots busy still queues",
            s(device("a").slots(2, 2, 3)),
            None,
        ),
        (
            "on battery, low",
            s(device("a").battery(19, false)),
            Some((Filter::State, "on battery at 19 %")),
        ),
        (
            "on battery at the floor",
            s(device("a").battery(20, false)),
            None,
        ),
        ("low battery, on AC", s(device("a").battery(5, true)), None),
    ];
    run(rows
        .into_iter()
        .map(|(what, (spec, d), want)| (what, spec, d, want))
        .collect());
}

#[test]
fn latency() {
    let within = |ms| with(chat(Role::Member), |s| s.max_latency_ms = Some(ms));
    run(vec![
        ("no limit", chat(Role::Member), device("a").rtt(900.0), None),
        ("within", within(100), device("a").rtt(100.0), None),
        (
            "above",
            within(100),
            device("a").rtt(250.0),
            Some((Filter::Latency, "rtt 250 ms above 100 ms")),
        ),
        (
            "relayed paths are judged on their measured rtt",
            within(100),
            device("a").rtt(60.0).relayed(),
            None,
        ),
        (
            "not measured yet",
            within(100),
            device("a").rtt_unknown(),
            None,
        ),
        ("this device", within(1), device("a").me(), None),
    ]);
}

#[test]
fn filters_run_in_order_and_later_ones_are_not_evaluated() {
    let spec = with(chat(Role::Member), |s| s.max_latency_ms = Some(5));
    let c = device("a").not_member().offline().rtt(50.0).build();
    let Some(Verdict::Rejected(r)) = explain(&spec, std::slice::from_ref(&c), &rules(), "a") else {
        panic!("a is rejected");
    };
    assert_eq!(r.failed_filter, Filter::Membership);
    let outcomes: Vec<_> = r.filters.iter().map(|f| (f.filter, f.outcome)).collect();
    assert_eq!(
        outcomes,
        [
            (Filter::Membership, Outcome::Failed),
            (Filter::Policy, Outcome::NotEvaluated),
            (Filter::Route, Outcome::NotEvaluated),
            (Filter::Requirements, Outcome::NotEvaluated),
            (Filter::State, Outcome::NotEvaluated),
            (Filter::Latency, Outcome::NotEvaluated),
        ]
    );
    assert!(r.filters[1..].iter().all(|f| f.detail.is_empty()));

    let c = device("a").offline().build();
    let Some(Verdict::Rejected(r)) = explain(&spec, std::slice::from_ref(&c), &rules(), "a") else {
        panic!("a is rejected");
    };
    assert_eq!(r.failed_filter, Filter::State);
    assert_eq!(r.filters[0].outcome, Outcome::Passed);
    assert_eq!(r.filters[0].detail, "owner is a member; key valid");
    assert_eq!(r.filters[3].detail, "tier2; runs qwen2.5-0.5b");
    assert_eq!(r.filters[5].outcome, Outcome::NotEvaluated);
}

#[test]
fn an_eligible_device_passes_every_filter_with_a_reason() {
    let spec = with(chat(Role::Member), |s| s.max_latency_ms = Some(50));
    let p = support::place(&spec, vec![device("a").slots(4, 1, 2)]);
    let best = p.best().expect("a is eligible");
    let details: Vec<_> = best.filters.iter().map(|f| f.detail.as_str()).collect();
    assert!(best.filters.iter().all(|f| f.outcome == Outcome::Passed));
    assert_eq!(
        details,
        [
            "owner is a member; key valid",
            "a member may run public small_chat jobs on tier2",
            "auto admits any device",
            "tier2; runs qwen2.5-0.5b",
            "serving; 1/4 slots busy, 2 queued",
            "rtt 10 ms within 50 ms",
        ]
    );
}
