//! Ranking under every routing mode, the score's terms, the debug view and
//! its explanations, and candidates built from a netmap.

mod support;

use std::collections::BTreeMap;

use platform::capability::Tier;
use platform::jobs::{ComputeRules, Route, MICRO};
use platform::netmap::{DnsConfig, NetMap, Node, NodeKind, RelayMap};
use platform::people::Role;
use scheduler::{
    candidates, estimated_cost, explain, Feature, Filter, JobSpec, PathInfo, Placement, Verdict,
    KEPT,
};
use support::{chat, device, place, ranked_names, rules};

fn routed(route: &str) -> JobSpec {
    let mut spec = chat(Role::Member);
    spec.route = route.parse().expect("a route");
    spec
}

#[test]
fn auto_ranks_every_eligible_device_by_score() {
    let p = place(
        &routed("auto"),
        vec![
            device("far").rtt(400.0),
            device("near").rtt(5.0),
            device("busy").rtt(5.0).slots(2, 2, 3),
            device("off").offline(),
        ],
    );
    // Slots full and a queue weigh more than 400 ms of rtt by default.
    assert_eq!(ranked_names(&p), ["near", "far", "busy"]);
    assert_eq!(p.eligible, 3);
    assert_eq!(p.rejected.len(), 1);
    assert_eq!(p.best().map(|b| b.name.as_str()), Some("near"));
}

#[test]
fn device_routes_rank_the_named_devices_by_score_not_by_listing() {
    let p = place(
        &routed("device:slow,fast"),
        vec![
            device("slow").rtt(300.0),
            device("fast").rtt(3.0),
            device("other").rtt(1.0),
        ],
    );
    assert_eq!(ranked_names(&p), ["fast", "slow"]);
    assert_eq!(p.rejected[0].name, "other");
    assert_eq!(p.rejected[0].failed_filter, Filter::Route);
}

#[test]
fn tier_routes_take_that_tier_or_above() {
    let p = place(
        &routed("tier:tier3"),
        vec![
            device("laptop"),
            device("gpu").tier(Tier::Tier3).gpu(),
            device("server").tier(Tier::Tier4).gpu(),
        ],
    );
    let mut names = ranked_names(&p);
    names.sort();
    assert_eq!(names, ["gpu", "server"]);
    assert_eq!(p.rejected[0].detail, "tier2 is below tier:tier3");
}

#[test]
fn local_puts_this_device_then_direct_paths_before_relayed_ones() {
    let p = place(
        &routed("local"),
        vec![
            device("relayed-fast").relayed().rtt(1.0).slots(8, 0, 0),
            device("direct-slow").rtt(900.0).battery(50, false),
            device("me").me().thermal(95, Some(100)).slots(1, 1, 4),
            device("direct-fast").rtt(2.0),
        ],
    );
    assert_eq!(
        ranked_names(&p),
        ["me", "direct-fast", "direct-slow", "relayed-fast"]
    );
    assert!(p.ranked[0].score < p.ranked[3].score, "despite the score");
    assert!(p.ranked[..3].iter().all(|r| r.direct));
    assert!(!p.ranked[3].direct);

    let auto = place(
        &routed("auto"),
        vec![
            device("relayed-fast").relayed().rtt(1.0).slots(8, 0, 0),
            device("me").me().thermal(95, Some(100)).slots(1, 1, 4),
        ],
    );
    assert_eq!(
        ranked_names(&auto),
        ["relayed-fast", "me"],
        "auto goes by score"
    );
}

#[test]
fn equal_scores_rank_by_name() {
    let p = place(&routed("auto"), vec![device("c"), device("a"), device("b")]);
    assert_eq!(ranked_names(&p), ["a", "b", "c"]);
    assert_eq!(p.ranked[0].score, p.ranked[2].score);
}

fn term(p: &Placement, name: &str, feature: Feature) -> (Option<f64>, f64) {
    let r = p.ranked.iter().find(|r| r.name == name).expect("ranked");
    let t = r.terms.iter().find(|t| t.feature == feature).expect("term");
    (t.raw, t.normalised)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn features_are_normalised_as_documented() {
    let p = place(
        &routed("auto"),
        vec![
            device("direct")
                .rtt(100.0)
                .battery(80, false)
                .thermal(65, Some(100)),
            device("relayed").rtt(50.0).relayed().thermal(65, None),
            device("unknown")
                .rtt_unknown()
                .battery(80, true)
                .slots(4, 1, 1)
                .inflight(2),
            device("cheap").tier(Tier::Tier0).thermal(120, Some(100)),
            device("hot-scale").thermal(40, Some(30)),
        ],
    );
    let (raw, n) = term(&p, "direct", Feature::RttMs);
    assert_eq!(raw, Some(100.0));
    assert!(close(n, 0.1));
    assert!(
        close(term(&p, "relayed", Feature::RttMs).1, 0.2),
        "relay floor 200 ms"
    );
    assert_eq!(term(&p, "unknown", Feature::RttMs), (None, 1.0));

    assert_eq!(term(&p, "direct", Feature::IsPluggedIn).1, 0.0);
    assert_eq!(term(&p, "unknown", Feature::IsPluggedIn).1, 1.0, "on AC");
    assert_eq!(
        term(&p, "relayed", Feature::IsPluggedIn).1,
        1.0,
        "no battery"
    );

    assert!(close(term(&p, "direct", Feature::ThermalHeadroom).1, 0.5));
    assert!(
        close(term(&p, "relayed", Feature::ThermalHeadroom).1, 0.5),
        "100 °C assumed"
    );
    assert_eq!(term(&p, "unknown", Feature::ThermalHeadroom), (None, 0.5));
    assert_eq!(
        term(&p, "cheap", Feature::ThermalHeadroom).1,
        0.0,
        "clamped"
    );
    assert_eq!(term(&p, "hot-scale", Feature::ThermalHeadroom).1, 0.0);

    assert_eq!(term(&p, "unknown", Feature::IdleScore), (Some(3.0), 0.75));
    assert_eq!(term(&p, "direct", Feature::IdleScore).1, 1.0);

    // tier0 burns 2 credits a minute, tier2 6.
    assert_eq!(term(&p, "cheap", Feature::CreditRateEfficiency).1, 1.0);
    let (raw, n) = term(&p, "direct", Feature::CreditRateEfficiency);
    assert_eq!(raw, Some(6.0 * MICRO as f64));
    assert!(close(n, 1.0 / 3.0));

    assert_eq!(term(&p, "unknown", Feature::Load), (Some(3.0), 0.25));
    assert_eq!(term(&p, "direct", Feature::Load), (Some(0.0), 1.0));
}

#[test]
fn the_score_is_the_sum_of_its_weighted_terms() {
    let mut rules = ComputeRules::default();
    rules.weights.load = 1000;
    rules.weights.rtt_ms = -500;
    let candidates = [
        device("a").rtt(300.0).slots(4, 3, 1).build(),
        device("b").battery(60, false).thermal(70, None).build(),
    ];
    let p = scheduler::place(&chat(Role::Member), &candidates, &rules);
    for r in &p.ranked {
        let sum: f64 = r.terms.iter().map(|t| t.contribution).sum();
        assert!(close(sum, r.score), "{}: {sum} vs {}", r.name, r.score);
        for t in &r.terms {
            assert!((0.0..=1.0).contains(&t.normalised));
            assert!(close(t.contribution, t.normalised * t.weight));
        }
        let load = r.terms.iter().find(|t| t.feature == Feature::Load).unwrap();
        assert_eq!(load.weight, 1.0);
    }
}

#[test]
fn explain_none_names_each_filter_and_how_many_it_excluded() {
    let p = place(
        &routed("device:gpu,a,b"),
        vec![
            device("a").not_serving(Some("not contributing: on battery")),
            device("b").not_serving(Some("not contributing: on battery")),
            device("c"),
        ],
    );
    assert!(p.best().is_none());
    assert_eq!(
        p.explain_none(),
        "no eligible device: 1 failed route (not named in device:gpu,a,b), \
         2 failed state (not contributing: on battery)"
    );

    let mut spec = routed("auto");
    spec.min_ram_mb = 8192;
    spec.max_latency_ms = Some(100);
    let p = place(
        &spec,
        vec![
            device("a").offline(),
            device("b").offline(),
            device("c").not_serving(Some("too hot")),
            device("d").ram_mb(4096),
            device("e").ram_mb(2048),
            device("f").rtt(300.0),
            device("g").rtt(700.0),
        ],
    );
    assert_eq!(
        p.explain_none(),
        "no eligible device: 2 failed requirements (less than 8192 MiB RAM), \
         3 failed state (offline ×2; too hot), 2 failed latency (rtt above 100 ms)"
    );
}

#[test]
fn reasons_that_read_the_same_are_counted_together() {
    let p = place(
        &routed("auto"),
        vec![
            device("a").not_serving(None),
            device("b").not_serving(Some("not serving")),
            device("c").not_serving(Some("too hot")),
        ],
    );
    let counts: Vec<_> = p
        .excluded
        .iter()
        .map(|e| (e.detail.as_str(), e.devices))
        .collect();
    assert_eq!(counts, [("not serving", 2), ("too hot", 1)]);
}

#[test]
fn explain_none_with_no_devices_or_with_a_choice() {
    let p = place(&routed("auto"), vec![]);
    assert_eq!(
        p.explain_none(),
        "no eligible device: there are no devices to choose from"
    );
    assert!(p.best().is_none());
    let p = place(&routed("auto"), vec![device("a"), device("b")]);
    assert!(p
        .explain_none()
        .starts_with("2 eligible devices; best: a (score "));
}

#[test]
fn big_networks_keep_the_best_the_nearest_misses_and_counts() {
    let mut spec = routed("auto");
    spec.max_latency_ms = Some(100);
    let mut devices = Vec::new();
    for i in 0..40 {
        devices.push(device(&format!("ok-{i:02}")).rtt(f64::from(i)));
        devices.push(device(&format!("off-{i:02}")).offline());
        devices.push(device(&format!("guest-{i:02}")).not_member());
    }
    devices.push(device("slow").rtt(500.0));
    let candidates: Vec<_> = devices.into_iter().map(|d| d.build()).collect();
    let p = scheduler::place(&spec, &candidates, &rules());
    assert_eq!(p.eligible, 40);
    assert_eq!(p.ranked.len(), KEPT);
    let want: Vec<String> = (0..KEPT).map(|i| format!("ok-{i:02}")).collect();
    assert_eq!(ranked_names(&p), want);
    assert_eq!(p.rejected.len(), KEPT);
    assert_eq!(p.rejected[0].name, "slow", "the nearest miss first");
    assert!(p.rejected[1..]
        .iter()
        .all(|r| r.failed_filter == Filter::State));
    let counts: Vec<_> = p.excluded.iter().map(|e| (e.filter, e.devices)).collect();
    assert_eq!(
        counts,
        [
            (Filter::Membership, 40),
            (Filter::State, 40),
            (Filter::Latency, 1)
        ]
    );

    let Some(Verdict::Eligible(r)) = explain(&spec, &candidates, &rules(), "ok-39") else {
        panic!("ok-39 is eligible");
    };
    assert_eq!(r.filters.len(), Filter::ALL.len());
    assert_eq!(r.terms.len(), Feature::ALL.len());
    assert!(r.score < p.ranked[KEPT - 1].score);
    let Some(Verdict::Rejected(r)) = explain(&spec, &candidates, &rules(), "guest-07") else {
        panic!("guest-07 is rejected");
    };
    assert_eq!(r.failed_filter, Filter::Membership);
    assert!(explain(&spec, &candidates, &rules(), "nobody").is_none());
}

#[test]
fn the_debug_view_round_trips_through_json() {
    let p = place(
        &routed("local"),
        vec![
            device("me").me().battery(40, false).thermal(50, Some(90)),
            device("peer").rtt_unknown().relayed(),
            device("off").offline(),
        ],
    );
    let json = serde_json::to_string(&p).unwrap();
    let back: Placement = serde_json::from_str(&json).unwrap();
    assert_eq!(back.rejected, p.rejected);
    assert_eq!(back.excluded, p.excluded);
    assert_eq!(back.eligible, p.eligible);
    for (a, b) in back.ranked.iter().zip(&p.ranked) {
        assert_eq!(
            (&a.name, &a.model, a.tier, &a.filters),
            (&b.name, &b.model, b.tier, &b.filters)
        );
        assert!(close(a.score, b.score));
        for (x, y) in a.terms.iter().zip(&b.terms) {
            assert_eq!((x.feature, x.raw.is_some()), (y.feature, y.raw.is_some()));
            assert!(close(x.contribution, y.contribution));
        }
    }
    assert!(json.contains(r#""failed_filter":"state""#));
    assert!(json.contains(r#""feature":"rtt_ms""#));
}

#[test]
fn job_specs_have_defaults() {
    let spec: JobSpec = serde_json::from_str(r#"{"workload":"embeddings"}"#).unwrap();
    assert_eq!(spec.route, Route::Auto);
    assert_eq!(
        spec.submitter_role,
        Role::Guest,
        "the least role when unstated"
    );
    assert_eq!(
        (spec.min_ram_mb, spec.needs_gpu, spec.model),
        (0, false, None)
    );
    let spec: JobSpec = serde_json::from_str(
        r#"{"workload":"small_chat","route":"device:a,b","min_tier":"tier3","submitter_role":"admin","sensitivity":"sensitive"}"#,
    )
    .unwrap();
    assert_eq!(spec.route, Route::Devices(vec!["a".into(), "b".into()]));
    assert_eq!(spec.min_tier, Some(Tier::Tier3));
    let json = serde_json::to_string(&spec).unwrap();
    assert_eq!(serde_json::from_str::<JobSpec>(&json).unwrap(), spec);
}

#[test]
fn estimated_cost_is_the_whole_timeout_at_the_tier_rate() {
    let rules = rules();
    assert_eq!(estimated_cost(&rules, Tier::Tier3, 30_000), 7 * MICRO);
    assert_eq!(estimated_cost(&rules, Tier::Tier0, 60_000), 2 * MICRO);
    assert_eq!(
        estimated_cost(&rules, Tier::Tier2, 1),
        rules.rates.burn(Tier::Tier2, 1000),
        "billed by the second"
    );
}

fn node(name: &str, key: u8) -> Node {
    Node {
        id: i64::from(key),
        name: name.into(),
        kind: NodeKind::Mesh,
        node_key: platform::keys::NodePublic::from_bytes([key; 32]),
        disco_key: None,
        addresses: Vec::new(),
        endpoints: Vec::new(),
        online: true,
        os: "linux".into(),
        home_region: None,
        capabilities: device(name).build().capabilities.map(Box::new),
        owner: Some("ann".into()),
        key_expiry: None,
        device_key: None,
        owner_role: Some(Role::Member),
        tags: Vec::new(),
    }
}

#[test]
fn candidates_come_from_the_netmap() {
    let mut me = node("me", 1);
    me.online = false;
    let mut expired = node("expired", 2);
    expired.key_expiry = Some(1000);
    let mut later = node("later", 3);
    later.key_expiry = Some(1001);
    let mut ownerless = node("ownerless", 4);
    ownerless.owner = None;
    let mut roleless = node("roleless", 5);
    roleless.owner_role = None;
    let mut asleep = node("asleep", 7);
    asleep.online = false;
    let peers: BTreeMap<_, _> = [expired, later, ownerless, roleless, asleep]
        .into_iter()
        .map(|n| (n.node_key, n))
        .collect();
    let map = NetMap {
        network: "home".into(),
        self_node: me,
        routes: Vec::new(),
        peers,
        relay_map: RelayMap::default(),
        dns: DnsConfig::default(),
        awaiting_approval: false,
        packet_filter: Default::default(),
        compute: ComputeRules::default(),
    };
    let paths = |key: &platform::keys::NodePublic| PathInfo {
        rtt_ms: Some(f64::from(key.as_bytes()[0]) * 10.0),
        direct: key.as_bytes()[0] & 1 == 0,
    };
    let inflight = |name: &str| u32::from(name == "later") * 2;
    let cs = candidates(&map, &paths, &inflight, 1000);
    let names: Vec<_> = cs.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["me", "expired", "later", "ownerless", "roleless", "asleep"]
    );
    let by = |n: &str| cs.iter().find(|c| c.name == n).unwrap();
    assert!(by("me").is_self && by("me").online, "this device is up");
    assert_eq!(by("me").path, PathInfo::LOCAL);
    assert!(cs[1..].iter().all(|c| !c.is_self));
    assert!(by("expired").revoked && !by("later").revoked);
    assert!(!by("ownerless").member && !by("roleless").member && by("later").member);
    assert!(!by("asleep").online);
    assert_eq!(by("later").inflight, 2);
    assert_eq!(by("later").path.rtt_ms, Some(30.0));
    assert!(!by("later").path.direct && by("expired").path.direct);
    assert!(by("later").capabilities.is_some());

    let p = scheduler::place(&chat(Role::Member), &cs, &map.compute);
    assert_eq!(ranked_names(&p), ["me", "later"]);
}

/// A peer the coordinator has not seen (it just restarted) but whose direct
/// path answered is online to the scheduler; one with no live path is not.
#[test]
fn a_peer_that_answers_is_online_whatever_the_coordinator_last_saw() {
    let me = node("me", 1);
    let mut answering = node("answering", 2);
    answering.online = false;
    let mut silent = node("silent", 3);
    silent.online = false;
    let map = NetMap {
        network: "home".into(),
        self_node: me,
        routes: Vec::new(),
        peers: [answering, silent]
            .into_iter()
            .map(|n| (n.node_key, n))
            .collect(),
        relay_map: RelayMap::default(),
        dns: DnsConfig::default(),
        awaiting_approval: false,
        packet_filter: Default::default(),
        compute: ComputeRules::default(),
    };
    let paths = |key: &platform::keys::NodePublic| PathInfo {
        rtt_ms: Some(1.0),
        direct: key.as_bytes()[0] == 2,
    };
    let cs = candidates(&map, &paths, &|_: &str| 0, 1000);
    let by = |n: &str| cs.iter().find(|c| c.name == n).unwrap();
    assert!(by("answering").online);
    assert!(!by("silent").online);
}
