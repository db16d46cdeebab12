//! The admission policy on a virtual clock: caching, outages, revocations,
//! and the bounds on memory and on questions to the coordinator.

use super::*;

const NET: NetworkTag = [7; 32];

fn key(i: u32) -> NodePublic {
    let mut b = [0u8; 32];
    b[..4].copy_from_slice(&i.to_be_bytes());
    NodePublic::from_bytes(b)
}

fn cache(t0: Instant) -> Cache {
    Cache::new(AdmissionLimits::default(), t0)
}

#[test]
fn caching_and_outage_policy() {
    let t0 = Instant::now();
    let known = NodePublic::from_bytes([1; 32]);
    let stranger = NodePublic::from_bytes([2; 32]);
    let mut c = cache(t0);
    assert_eq!(c.fresh(&known, t0), None);
    assert_eq!(
        c.decide(known, Answer::Known(NET), t0, t0),
        Verdict::Admit(NET)
    );
    assert_eq!(
        c.fresh(&known, t0 + Duration::from_secs(30)),
        Some(Verdict::Admit(NET))
    );
    assert_eq!(
        c.fresh(&known, t0 + ALLOW_TTL),
        None,
        "re-asked after the TTL"
    );
    // Coordinator down: the known key keeps working for a while, then not.
    let t = t0 + Duration::from_secs(120);
    assert_eq!(c.decide(known, Answer::NoAnswer, t, t), Verdict::Admit(NET));
    let t = t0 + STALE_ALLOW_LIMIT;
    assert_eq!(
        c.decide(known, Answer::NoAnswer, t, t),
        Verdict::Unavailable
    );
    // A key never admitted is refused while the coordinator is down.
    assert_eq!(
        c.decide(stranger, Answer::NoAnswer, t0, t0),
        Verdict::Unavailable
    );
    assert_eq!(c.decide(stranger, Answer::Unknown, t0, t0), Verdict::Deny);
    assert_eq!(
        c.fresh(&stranger, t0 + Duration::from_secs(1)),
        Some(Verdict::Deny)
    );
    assert_eq!(c.fresh(&stranger, t0 + DENY_TTL), None);
    // Revoked: the coordinator now says unknown.
    let t = t0 + Duration::from_secs(200);
    assert_eq!(c.decide(known, Answer::Unknown, t, t), Verdict::Deny);
}

#[test]
fn the_network_comes_from_the_latest_answer() {
    let t0 = Instant::now();
    let k = key(1);
    let mut c = cache(t0);
    c.decide(k, Answer::Known(NET), t0, t0);
    let other = network_tag(2);
    let t = t0 + ALLOW_TTL;
    assert_eq!(
        c.decide(k, Answer::Known(other), t, t),
        Verdict::Admit(other)
    );
    assert_eq!(c.fresh(&k, t), Some(Verdict::Admit(other)));
    assert_ne!(network_tag(1), network_tag(2));
    assert_ne!(network_tag(0), OPEN_NETWORK);
}

#[test]
fn revocations_deny_at_once_and_beat_older_answers() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let key = NodePublic::from_bytes([3; 32]);
    let mut c = cache(t0);
    assert_eq!(
        c.decide(key, Answer::Known(NET), t0, t0),
        Verdict::Admit(NET)
    );
    c.revoke(key, t0 + ms(1000));
    assert_eq!(
        c.fresh(&key, t0 + ms(1000)),
        Some(Verdict::Deny),
        "no waiting for the admit TTL"
    );
    // Asked before the revocation, answered after: stale news.
    assert_eq!(
        c.decide(key, Answer::Known(NET), t0 + ms(900), t0 + ms(1100)),
        Verdict::Deny
    );
    assert_eq!(c.fresh(&key, t0 + ms(1100)), Some(Verdict::Deny));
    // A coordinator outage does not bring a revoked key back.
    assert_eq!(
        c.decide(key, Answer::NoAnswer, t0 + ms(2000), t0 + ms(2000)),
        Verdict::Unavailable
    );
    // Asked again after the deny TTL: the coordinator has the last word.
    assert_eq!(c.fresh(&key, t0 + ms(1000) + DENY_TTL), None);
    assert_eq!(
        c.decide(key, Answer::Unknown, t0 + ms(7000), t0 + ms(7000)),
        Verdict::Deny
    );
    // A key never seen can be revoked too (it was admitted elsewhere).
    let other = NodePublic::from_bytes([4; 32]);
    c.revoke(other, t0);
    assert_eq!(c.fresh(&other, t0), Some(Verdict::Deny));
    // An answer to a later question wins over an older denial.
    assert_eq!(
        c.decide(other, Answer::Known(NET), t0 + ms(1), t0 + ms(2)),
        Verdict::Admit(NET)
    );
}

#[test]
fn clear_forgets_every_answer() {
    let t0 = Instant::now();
    let admitted = NodePublic::from_bytes([5; 32]);
    let refused = NodePublic::from_bytes([6; 32]);
    let mut c = cache(t0);
    c.decide(admitted, Answer::Known(NET), t0, t0);
    c.decide(refused, Answer::Unknown, t0, t0);
    c.clear();
    assert_eq!(c.fresh(&admitted, t0), None, "asked again");
    assert_eq!(c.fresh(&refused, t0), None, "asked again");
    // Nothing vouches for the once-admitted key in an outage any more.
    assert_eq!(
        c.decide(admitted, Answer::NoAnswer, t0, t0),
        Verdict::Unavailable
    );
}

#[test]
fn random_keys_do_not_grow_the_cache_past_its_bounds() {
    let t0 = Instant::now();
    let limits = AdmissionLimits {
        max_admitted: 100,
        max_refused: 50,
        ..AdmissionLimits::default()
    };
    let mut c = Cache::new(limits, t0);
    // Devices the coordinator knows, admitted first.
    for i in 0..100 {
        c.decide(key(i), Answer::Known(NET), t0, t0);
    }
    // Then a flood of keys it does not know, all within one deny TTL.
    let ms = Duration::from_millis;
    for i in 1000..11_000u32 {
        let t = t0 + ms(u64::from(i - 1000) / 10);
        c.decide(key(i), Answer::Unknown, t, t);
        assert!(c.counts().1 <= 50, "refused entries bounded");
    }
    assert_eq!(c.counts(), (100, 50));
    // Refusals never push admitted devices out.
    for i in 0..100 {
        assert_eq!(c.fresh(&key(i), t0 + ms(999)), Some(Verdict::Admit(NET)));
    }
    // The newest refusals are the ones kept.
    assert_eq!(c.fresh(&key(10_999), t0 + ms(999)), Some(Verdict::Deny));
    assert_eq!(c.fresh(&key(1000), t0 + ms(999)), None);

    // Admitted entries past their outage window make room before live ones.
    let later = t0 + STALE_ALLOW_LIMIT;
    c.decide(key(50), Answer::Known(NET), later, later);
    c.decide(key(200), Answer::Known(NET), later, later);
    assert_eq!(c.counts().0, 2, "the 99 expired entries went first");
    // Full of live entries: the oldest goes.
    for i in 300..398 {
        c.decide(key(i), Answer::Known(NET), later, later);
    }
    let t = later + ms(1);
    c.decide(key(500), Answer::Known(NET), t, t);
    assert_eq!(c.counts().0, 100);
    assert_eq!(c.fresh(&key(500), t), Some(Verdict::Admit(NET)));
}

#[test]
fn questions_to_the_coordinator_draw_on_a_budget() {
    let t0 = Instant::now();
    let limits = AdmissionLimits {
        asks_per_sec: 10,
        ask_burst: 20,
        ..AdmissionLimits::default()
    };
    let mut c = Cache::new(limits, t0);
    let asked = (0..1000).filter(|_| c.may_ask(t0)).count();
    assert_eq!(asked, 20, "the burst, then nothing");
    let t1 = t0 + Duration::from_secs(1);
    let asked = (0..1000).filter(|_| c.may_ask(t1)).count();
    assert_eq!(asked, 10, "the rate per second after that");
    // Over budget is an outage for that key: a recently admitted one still
    // gets in, a stranger does not.
    c.decide(key(1), Answer::Known(NET), t0, t0);
    assert_eq!(
        c.decide(key(1), Answer::NoAnswer, t1 + ALLOW_TTL, t1 + ALLOW_TTL),
        Verdict::Admit(NET)
    );
    assert_eq!(
        c.decide(key(2), Answer::NoAnswer, t1, t1),
        Verdict::Unavailable
    );
}
