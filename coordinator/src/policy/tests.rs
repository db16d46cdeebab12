use std::collections::BTreeMap;
use std::net::IpAddr;

use platform::filter::{PacketFilter, Proto};
use platform::people::Role;
use proptest::prelude::*;

use super::compile::{allows, Principal};
use super::*;

fn dev(id: i64, name: &str, user: Option<&str>, role: Role, tags: &[&str]) -> DeviceFacts {
    DeviceFacts {
        id,
        name: name.into(),
        user: user.map(Into::into),
        role: Some(role),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        addrs: vec![
            IpAddr::from([100, 64, 0, id as u8]),
            format!("fd00::{id}").parse().unwrap(),
        ],
    }
}

/// alice (admin): laptop(1); bob (member): desktop(2), gpu box tagged(3);
/// carol (guest): phone(4).
fn network() -> Vec<DeviceFacts> {
    vec![
        dev(1, "laptop", Some("alice"), Role::Admin, &[]),
        dev(2, "desktop", Some("bob"), Role::Member, &[]),
        dev(3, "gpu", Some("bob"), Role::Member, &["tag:gpu"]),
        dev(4, "phone", Some("carol"), Role::Guest, &[]),
    ]
}

fn members() -> BTreeMap<String, Role> {
    BTreeMap::from([
        ("alice".into(), Role::Admin),
        ("bob".into(), Role::Member),
        ("carol".into(), Role::Guest),
    ])
}

fn compiled(text: &str) -> Compiled {
    Compiled::new(parse(text).unwrap(), network())
}

fn err(text: &str) -> PolicyError {
    parse(text).expect_err("should be refused")
}

/// Whether `filter` lets `src` in on `port`/`proto` (the engine's logic,
/// written plainly).
fn filter_allows(filter: &PacketFilter, src: IpAddr, port: u16, proto: Proto) -> bool {
    filter.rules.iter().any(|r| {
        r.sources.iter().any(|p| p.contains(src))
            && r.effective_protos().contains(&proto)
            && if proto.has_ports() {
                r.ports.iter().any(|p| p.contains(port))
            } else {
                r.ports.iter().any(|p| p.is_all())
            }
    })
}

#[test]
fn the_default_policy_joins_members_and_leaves_guests_alone() {
    let c = compiled(DEFAULT_POLICY);
    assert!(c.sees(1, 2));
    assert!(c.sees(2, 1));
    assert!(!c.sees(1, 4), "guests see nothing");
    assert!(!c.sees(4, 2));
    assert!(!c.sees(1, 3), "a tagged device is not a member's");
    let f = c.filter_for(2);
    assert!(filter_allows(
        &f,
        IpAddr::from([100, 64, 0, 1]),
        22,
        Proto::Tcp
    ));
    assert!(!filter_allows(
        &f,
        IpAddr::from([100, 64, 0, 4]),
        22,
        Proto::Tcp
    ));
    assert_eq!(c.filter_for(4), PacketFilter::default());
}

#[test]
fn comments_trailing_commas_and_every_selector_kind() {
    let c = compiled(
        r#"
        // Comments and trailing commas are fine.
        {
          "groups": { "group:eng": ["bob", "group:leads",], "group:leads": ["alice"] },
          "tags": { "tag:gpu": ["group:eng"] },
          "hosts": { "nas": "100.64.0.4", "lab": "10.9.0.0/16" },
          "acls": [
            /* eng reaches the GPU's API only */
            { "action": "accept", "src": ["group:eng"], "dst": ["tag:gpu:8421"], "proto": "tcp" },
            { "src": ["autogroup:guest"], "dst": ["autogroup:self:*"] },
            { "src": ["lab", "alice"], "dst": ["nas:22,80-81"] },
          ],
        }"#,
    );
    let gpu = c.filter_for(3);
    let alice = IpAddr::from([100, 64, 0, 1]);
    assert!(
        filter_allows(&gpu, alice, 8421, Proto::Tcp),
        "alice is in group:leads"
    );
    assert!(!filter_allows(&gpu, alice, 22, Proto::Tcp));
    assert!(!filter_allows(&gpu, alice, 8421, Proto::Udp));
    let nas = c.filter_for(4);
    assert!(filter_allows(
        &nas,
        IpAddr::from([10, 9, 3, 4]),
        81,
        Proto::Tcp
    ));
    assert!(filter_allows(&nas, alice, 22, Proto::Udp));
    assert!(!filter_allows(&nas, alice, 443, Proto::Tcp));
    assert!(!filter_allows(
        &nas,
        IpAddr::from([100, 64, 0, 2]),
        22,
        Proto::Tcp
    ));
    assert!(c.sees(1, 3) && c.sees(3, 2) && c.sees(1, 4));
    assert!(
        !c.sees(2, 4),
        "bob's desktop and carol's phone have no rule"
    );
    assert!(
        !c.sees(1, 2),
        "alice and bob have no rule between their untagged devices"
    );
}

#[test]
fn autogroup_self_joins_a_users_own_devices_only() {
    let mut devices = network();
    devices.push(dev(5, "tablet", Some("bob"), Role::Member, &[]));
    let c = Compiled::new(
        parse(r#"{"acls": [{"src": ["autogroup:member"], "dst": ["autogroup:self:*"]}]}"#).unwrap(),
        devices,
    );
    assert!(c.sees(2, 5));
    assert!(!c.sees(1, 2));
    assert!(!c.sees(3, 2), "tagged devices are nobody's own");
    let f = c.filter_for(5);
    assert!(filter_allows(
        &f,
        IpAddr::from([100, 64, 0, 2]),
        1,
        Proto::Tcp
    ));
    assert!(!filter_allows(
        &f,
        IpAddr::from([100, 64, 0, 1]),
        1,
        Proto::Tcp
    ));
}

#[test]
fn a_star_source_is_every_address() {
    let c = compiled(
        r#"{"acls": [{"src": ["*"], "dst": ["laptop-host:443"]}], "hosts": {"laptop-host": "100.64.0.1"}}"#,
    );
    let f = c.filter_for(1);
    assert_eq!(
        f.rules[0].sources.len(),
        2,
        "0.0.0.0/0 and ::/0, not a list"
    );
    assert!(filter_allows(
        &f,
        IpAddr::from([192, 0, 2, 1]),
        443,
        Proto::Tcp
    ));
    assert!(c.sees(4, 1));
}

#[test]
fn refusals_name_the_line_and_the_problem() {
    let e = err("{\n  \"acls\": [\n    {\"src\": [\"group:nope\"], \"dst\": [\"*:*\"]}\n  ]\n}");
    assert_eq!(e.line, 3);
    assert!(e.message.contains("unknown group \"group:nope\""), "{e}");
    let e = err("{\n\"acls\": [{\"src\": [\"*\"],\n \"dst\": [\"tag:x:22\"]}]}");
    assert_eq!(e.line, 3);
    assert!(e.message.contains("unknown tag"), "{e}");
    // A plain name is a user's; one that is no member's is refused at upload.
    let p = parse("{\"acls\": [\n{\"src\": [\"alice\"], \"dst\": [\"printer:22\"]}]}").unwrap();
    let e = p.check_users(|u| members().contains_key(u)).unwrap_err();
    assert_eq!(e.line, 2);
    assert!(e.message.contains("\"printer\" is neither a member"), "{e}");
    let e = err("{\"acls\": [{\"src\": [\"*\"], \"dst\": [\"no thing:22\"]}]}");
    assert!(e.message.contains("unknown selector"), "{e}");
    let e = err("{\"acls\": [{\"src\": [\"autogroup:self\"], \"dst\": [\"*:*\"]}]}");
    assert!(e.message.contains("destination only"), "{e}");
    let e = err("{\"acls\": [{\"src\": [\"autogroup:everyone\"], \"dst\": [\"*:*\"]}]}");
    assert!(e.message.contains("unknown autogroup"), "{e}");
    let e = err("{\"acls\": [{\"src\": [\"*\"], \"dst\": [\"*:99999\"]}]}");
    assert!(e.message.contains("bad port"), "{e}");
    let e = err("{\"acls\": [{\"src\": [\"*\"], \"dst\": [\"*:*\"], \"action\": \"drop\"}]}");
    assert!(e.message.contains("only accept"), "{e}");
    let e = err("{\"acl\": []}");
    assert!(e.message.contains("unknown section"), "{e}");
    let e = err("{\"acls\": [{\"src\": [\"*\"]}]}");
    assert!(e.message.contains("needs dst"), "{e}");
    let e = err("{\"acls\": [ {\"src\": [\"*\"] \"dst\": []} ]}");
    assert_eq!(e.line, 1, "a syntax error names its line too: {e}");
    let e = err(&format!(
        "{{\"hosts\": {{\"a\": \"{}\"}}}}",
        "1".repeat(MAX_POLICY_BYTES)
    ));
    assert!(e.message.contains("at most"), "{e}");
}

#[test]
fn groups_that_form_a_cycle_are_refused() {
    let e = err(
        "{\n\"groups\": {\n \"group:a\": [\"group:b\"],\n \"group:b\": [\"x\", \"group:c\"],\n \"group:c\": [\"group:a\"]\n}}",
    );
    assert!(e.message.contains("cycle"), "{e}");
    assert!(
        e.message.contains("group:a → group:b → group:c → group:a"),
        "{e}"
    );
    assert_eq!(e.line, 3);
    let e = err("{\"groups\": {\"group:a\": [\"group:a\"]}}");
    assert!(e.message.contains("cycle"), "{e}");
    // A long chain, and a wide fan of groups naming one big one.
    let chain: Vec<String> = (0..40)
        .map(|i| format!("\"group:g{i}\": [\"group:g{}\"]", i + 1))
        .chain(std::iter::once("\"group:g40\": [\"u\"]".to_owned()))
        .collect();
    let e = err(&format!("{{\"groups\": {{{}}}}}", chain.join(",")));
    assert!(e.message.contains("nest deeper"), "{e}");
    let users: Vec<String> = (0..2000).map(|i| format!("\"u{i}\"")).collect();
    let mut groups = vec![format!("\"group:big\": [{}]", users.join(","))];
    groups.extend((0..100).map(|i| format!("\"group:f{i}\": [\"group:big\"]")));
    let e = err(&format!("{{\"groups\": {{{}}}}}", groups.join(",")));
    assert!(e.message.contains("expand to more than"), "{e}");
}

#[test]
fn tests_pass_or_name_the_failing_assertion() {
    let text = |accept: &str, deny: &str| {
        format!(
            r#"{{
  "tags": {{ "tag:gpu": ["bob"] }},
  "acls": [
    {{ "src": ["autogroup:member"], "dst": ["tag:gpu:8421"] }},
  ],
  "tests": [
    {{ "src": "alice", "accept": [{accept}], "deny": [{deny}] }},
  ],
}}"#
        )
    };
    let ok = Compiled::new(
        parse(&text(r#""tag:gpu:8421", "gpu:8421""#, r#""tag:gpu:22""#)).unwrap(),
        network(),
    );
    ok.run_tests(&members()).unwrap();
    let bad = Compiled::new(parse(&text(r#""tag:gpu:22""#, "")).unwrap(), network());
    let e = bad.run_tests(&members()).unwrap_err();
    assert_eq!(e.line, 7);
    assert!(
        e.message
            .contains("alice → tag:gpu:22 (tcp) should be accepted"),
        "{e}"
    );
    let bad = Compiled::new(parse(&text("", r#""tag:gpu:8421""#)).unwrap(), network());
    let e = bad.run_tests(&members()).unwrap_err();
    assert!(
        e.message
            .contains("should be denied, but the rule on line 4 accepts it"),
        "{e}"
    );
    // A guest is matched as a guest.
    let guest = Compiled::new(
        parse(r#"{"acls": [{"src": ["autogroup:member"], "dst": ["*:*"]}], "tests": [{"src": "carol", "deny": ["laptop:22"]}]}"#).unwrap(),
        network(),
    );
    guest.run_tests(&members()).unwrap();
    assert!(err(r#"{"tests": [{"src": "group:x", "accept": []}]}"#)
        .message
        .contains("unknown group"));
    assert!(err(r#"{"tests": [{"src": "*", "accept": []}]}"#)
        .message
        .contains("not a set"));
    assert!(
        err(r#"{"tests": [{"src": "alice", "accept": ["laptop:1-2"]}]}"#)
            .message
            .contains("one port")
    );
}

#[test]
fn evaluate_says_which_rule() {
    let c = compiled(
        r#"{"tags": {"tag:gpu": []}, "acls": [
            {"src": ["alice"], "dst": ["desktop-ip:22"]},
            {"src": ["autogroup:admin"], "dst": ["tag:gpu:*"]},
        ], "hosts": {"desktop-ip": "100.64.0.2"}}"#,
    );
    assert_eq!(
        c.evaluate("laptop", "desktop", 22, Proto::Tcp, &members()),
        Ok(Some(0))
    );
    assert_eq!(
        c.evaluate("alice", "100.64.0.2", 22, Proto::Tcp, &members()),
        Ok(Some(0))
    );
    assert_eq!(
        c.evaluate("laptop", "gpu", 7, Proto::Udp, &members()),
        Ok(Some(1))
    );
    assert_eq!(
        c.evaluate("laptop", "gpu", 7, Proto::Icmp, &members()),
        Ok(Some(1))
    );
    assert_eq!(
        c.evaluate("desktop", "laptop", 22, Proto::Tcp, &members()),
        Ok(None)
    );
    assert!(c
        .evaluate("group:none", "laptop", 22, Proto::Tcp, &members())
        .is_err());
}

#[test]
fn a_thousand_devices_and_two_hundred_rules_compile() {
    let mut groups = String::new();
    let mut acls = String::new();
    for g in 0..50 {
        let users: Vec<String> = (0..4).map(|u| format!("\"user{}\"", g * 4 + u)).collect();
        groups.push_str(&format!("\"group:g{g}\": [{}],", users.join(",")));
    }
    for r in 0..200 {
        acls.push_str(&format!(
            "{{\"src\": [\"group:g{}\"], \"dst\": [\"group:g{}:{}\", \"tag:t{}:*\"]}},",
            r % 50,
            (r * 7) % 50,
            8000 + r,
            r % 10
        ));
    }
    let tags: Vec<String> = (0..10).map(|t| format!("\"tag:t{t}\": []")).collect();
    let text = format!(
        "{{\"groups\": {{{groups}}}, \"tags\": {{{}}}, \"acls\": [{acls}]}}",
        tags.join(",")
    );
    let devices: Vec<DeviceFacts> = (0..1000)
        .map(|i| {
            let tags: Vec<String> = if i % 10 == 0 {
                vec![format!("tag:t{}", i % 7)]
            } else {
                Vec::new()
            };
            DeviceFacts {
                id: i,
                name: format!("d{i}"),
                user: Some(format!("user{}", i % 200)),
                role: Some(Role::Member),
                tags,
                addrs: vec![IpAddr::from(std::net::Ipv4Addr::from(
                    0x6440_0000u32 + i as u32 + 1,
                ))],
            }
        })
        .collect();
    let start = std::time::Instant::now();
    let c = Compiled::new(parse(&text).unwrap(), devices);
    let filters: usize = (0..1000).map(|i| c.filter_for(i).rules.len()).sum();
    eprintln!(
        "1000 devices, 200 rules: compiled with {filters} filter rules in {:?}",
        start.elapsed()
    );
    // user1's device 1 is in group:g0; rule 0 lets g0 reach g0 on 8000.
    let f = c.filter_for(1);
    assert!(filter_allows(
        &f,
        c.devices()[201].addrs[0],
        8000,
        Proto::Tcp
    ));
    assert!(!filter_allows(
        &f,
        c.devices()[201].addrs[0],
        8001,
        Proto::Tcp
    ));
}

fn arb_selector() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("*"),
        Just("alice"),
        Just("bob"),
        Just("carol"),
        Just("group:eng"),
        Just("tag:gpu"),
        Just("autogroup:member"),
        Just("autogroup:admin"),
        Just("autogroup:guest"),
        Just("100.64.0.2"),
        Just("100.64.0.0/30"),
    ]
}

proptest! {
    /// What a device's compiled filter lets in is exactly what the policy
    /// says (`allows`), pair by pair; and seeing each other is symmetric.
    #[test]
    fn compiled_filters_agree_with_the_policy(
        rules in proptest::collection::vec((proptest::collection::vec(arb_selector(), 1..3), arb_selector(), any::<bool>(), prop_oneof![Just("*"), Just("22"), Just("20-30")], any::<bool>()), 0..5),
        port in prop_oneof![Just(22u16), Just(25), Just(443)],
        proto in prop_oneof![Just(Proto::Tcp), Just(Proto::Udp), Just(Proto::Icmp)],
    ) {
        let acls: Vec<String> = rules.iter().map(|(src, dst, own, ports, tcp)| {
            let src: Vec<String> = src.iter().map(|s| format!("{s:?}")).collect();
            let dst = if *own { "autogroup:self".to_owned() } else { (*dst).to_owned() };
            let proto = if *tcp { r#", "proto": "tcp""# } else { "" };
            format!(r#"{{"src": [{}], "dst": ["{dst}:{ports}"]{proto}}}"#, src.join(","))
        }).collect();
        let text = format!(r#"{{"groups": {{"group:eng": ["bob", "alice"]}}, "tags": {{"tag:gpu": []}}, "acls": [{}]}}"#, acls.join(","));
        let c = Compiled::new(parse(&text).unwrap(), network());
        for a in c.devices() {
            for b in c.devices() {
                if a.id == b.id { continue; }
                let said = allows(&c.policy, &Principal::of(a), &Principal::of(b), port, proto).is_some();
                let filtered = filter_allows(&c.filter_for(b.id), a.addrs[0], port, proto);
                prop_assert_eq!(said, filtered, "{} → {}:{} {}\n{}", a.name, b.name, port, proto, text);
                prop_assert_eq!(c.sees(a.id, b.id), c.sees(b.id, a.id));
                if said {
                    prop_assert!(c.sees(a.id, b.id));
                }
            }
        }
    }

    /// Arbitrary text is refused or accepted, never a panic.
    #[test]
    fn arbitrary_documents_never_panic(text in "\\PC{0,200}") {
        let _ = parse(&text);
    }
}

/// Every seed of the policy fuzz target goes through without a panic.
#[test]
fn replays_the_fuzz_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/policy_parse");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        super::fuzz_policy(&std::fs::read(entry.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n >= 5, "the corpus has seeds ({n})");
    // The full seed parses (so the fuzzer starts from something valid).
    parse(&std::fs::read_to_string(dir.join("full")).unwrap()).unwrap();
}
