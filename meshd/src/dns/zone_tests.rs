//! Unit tests for [`super::Zone`]: every answer kind the zone can give.

use super::*;
use std::str::FromStr;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn name(s: &str) -> Name {
    Name::from_str(s).expect("test name")
}

fn spec() -> ZoneSpec {
    ZoneSpec {
        domain: "home.crank.internal".into(),
        hosts: vec![
            Host {
                name: "laptop".into(),
                addrs: vec![ip("100.64.0.1"), ip("fd7a:115c:a1e0::1")],
            },
            Host {
                name: "v4only".into(),
                addrs: vec![ip("100.64.0.2")],
            },
            Host {
                name: "bad_name".into(),
                addrs: vec![ip("100.64.0.9")],
            },
            Host {
                name: "-dash".into(),
                addrs: vec![ip("100.64.0.10")],
            },
        ],
        extra: vec![
            ExtraRecord {
                name: "printer.office".into(),
                addr: ip("192.168.1.20"),
            },
            ExtraRecord {
                name: "nas.example.com.".into(),
                addr: ip("fd00::20"),
            },
            ExtraRecord {
                name: "bad..name".into(),
                addr: ip("10.0.0.1"),
            },
        ],
        ttl: 60,
        reverse_ranges: vec![(ip("100.64.0.0"), 10), (ip("fd7a:115c:a1e0::"), 48)],
    }
}

fn zone() -> Zone {
    Zone::new(&spec()).expect("zone builds")
}

fn addrs(ans: &ZoneAnswer) -> Vec<IpAddr> {
    ans.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn ptrs(ans: &ZoneAnswer) -> Vec<String> {
    ans.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::PTR(p) => Some(p.0.to_ascii()),
            _ => None,
        })
        .collect()
}

fn has_soa(ans: &ZoneAnswer, owner: &str) -> bool {
    ans.authority
        .iter()
        .any(|r| matches!(r.data, RData::SOA(_)) && r.name == name(owner))
}

#[test]
fn a_record() {
    let ans = zone()
        .lookup(&name("laptop.home.crank.internal."), RecordType::A)
        .expect("authoritative");
    assert_eq!(ans.code, ResponseCode::NoError);
    assert_eq!(addrs(&ans), vec![ip("100.64.0.1")]);
    assert_eq!(ans.answers[0].ttl, 60);
    assert!(ans.authority.is_empty());
}

#[test]
fn aaaa_record() {
    let ans = zone()
        .lookup(&name("laptop.home.crank.internal."), RecordType::AAAA)
        .expect("authoritative");
    assert_eq!(addrs(&ans), vec![ip("fd7a:115c:a1e0::1")]);
}

#[test]
fn case_insensitive() {
    let ans = zone()
        .lookup(&name("LapTop.HOME.crank.Internal."), RecordType::A)
        .expect("authoritative");
    assert_eq!(addrs(&ans), vec![ip("100.64.0.1")]);
}

#[test]
fn ptr_v4() {
    let ans = zone()
        .lookup(&name("1.0.64.100.in-addr.arpa."), RecordType::PTR)
        .expect("authoritative");
    assert_eq!(ans.code, ResponseCode::NoError);
    assert_eq!(ptrs(&ans), vec!["laptop.home.crank.internal.".to_string()]);
}

#[test]
fn ptr_v6() {
    let rev = Name::from(ip("fd7a:115c:a1e0::1"));
    let ans = zone().lookup(&rev, RecordType::PTR).expect("authoritative");
    assert_eq!(ptrs(&ans), vec!["laptop.home.crank.internal.".to_string()]);
}

#[test]
fn ptr_for_extra_record_outside_ranges() {
    let z = zone();
    let rev = Name::from(ip("192.168.1.20"));
    assert!(z.is_authoritative(&rev));
    let ans = z.lookup(&rev, RecordType::PTR).expect("authoritative");
    assert_eq!(
        ptrs(&ans),
        vec!["printer.office.home.crank.internal.".to_string()]
    );
    // ...but a neighbour outside the overlay ranges is not ours.
    assert!(z
        .lookup(&Name::from(ip("192.168.1.21")), RecordType::PTR)
        .is_none());
}

#[test]
fn nxdomain_with_soa() {
    let ans = zone()
        .lookup(&name("nothere.home.crank.internal."), RecordType::A)
        .expect("authoritative");
    assert_eq!(ans.code, ResponseCode::NXDomain);
    assert!(ans.answers.is_empty());
    assert!(has_soa(&ans, "home.crank.internal."));
}

#[test]
fn nodata_for_missing_type() {
    let z = zone();
    let ans = z
        .lookup(&name("v4only.home.crank.internal."), RecordType::AAAA)
        .expect("authoritative");
    assert_eq!(ans.code, ResponseCode::NoError);
    assert!(ans.answers.is_empty());
    assert!(has_soa(&ans, "home.crank.internal."));
    let mx = z
        .lookup(&name("laptop.home.crank.internal."), RecordType::MX)
        .expect("authoritative");
    assert_eq!(mx.code, ResponseCode::NoError);
    assert!(mx.answers.is_empty());
}

#[test]
fn apex_and_empty_non_terminal_are_nodata() {
    let z = zone();
    let apex = z
        .lookup(&name("home.crank.internal."), RecordType::A)
        .expect("ours");
    assert_eq!(apex.code, ResponseCode::NoError);
    assert!(apex.answers.is_empty());
    let soa = z
        .lookup(&name("home.crank.internal."), RecordType::SOA)
        .expect("ours");
    assert_eq!(soa.answers.len(), 1);
    let ent = z
        .lookup(&name("office.home.crank.internal."), RecordType::A)
        .expect("ours");
    assert_eq!(ent.code, ResponseCode::NoError);
    assert!(ent.answers.is_empty());
}

#[test]
fn extra_relative_and_absolute() {
    let z = zone();
    let rel = z
        .lookup(&name("printer.office.home.crank.internal."), RecordType::A)
        .expect("ours");
    assert_eq!(addrs(&rel), vec![ip("192.168.1.20")]);
    let abs = z
        .lookup(&name("NAS.example.com."), RecordType::AAAA)
        .expect("ours");
    assert_eq!(addrs(&abs), vec![ip("fd00::20")]);
    // A v6-only extra has no A record: NODATA, not NXDOMAIN.
    let abs_a = z
        .lookup(&name("nas.example.com."), RecordType::A)
        .expect("ours");
    assert_eq!(abs_a.code, ResponseCode::NoError);
    assert!(abs_a.answers.is_empty());
    // Siblings of an absolute extra are not ours.
    assert!(z.lookup(&name("www.example.com."), RecordType::A).is_none());
}

#[test]
fn invalid_names_skipped() {
    let z = zone();
    assert_eq!(z.skipped(), &["bad_name", "-dash", "bad..name"]);
    let ans = z
        .lookup(&name("bad_name.home.crank.internal."), RecordType::A)
        .expect("ours");
    assert_eq!(ans.code, ResponseCode::NXDomain);
    // No PTR was created for the skipped host's address.
    let rev = z
        .lookup(&Name::from(ip("100.64.0.9")), RecordType::PTR)
        .expect("in range");
    assert_eq!(rev.code, ResponseCode::NXDomain);
}

#[test]
fn reverse_authority_for_unknown_address_in_range() {
    let z = zone();
    let unknown4 = Name::from(ip("100.100.1.2"));
    assert!(z.is_authoritative(&unknown4));
    let ans = z.lookup(&unknown4, RecordType::PTR).expect("in range");
    assert_eq!(ans.code, ResponseCode::NXDomain);
    assert!(has_soa(&ans, "100.in-addr.arpa."));

    let unknown6 = Name::from(ip("fd7a:115c:a1e0:ab12::99"));
    let ans6 = z.lookup(&unknown6, RecordType::PTR).expect("in range");
    assert_eq!(ans6.code, ResponseCode::NXDomain);

    // Outside the ranges: not ours, must be forwarded.
    let outside = Name::from(ip("100.128.0.1"));
    assert!(!z.is_authoritative(&outside));
    assert!(z.lookup(&outside, RecordType::PTR).is_none());
    // A partial name above a known host is an empty non-terminal.
    let ent = z
        .lookup(&name("0.64.100.in-addr.arpa."), RecordType::PTR)
        .expect("ours");
    assert_eq!(ent.code, ResponseCode::NoError);
}

#[test]
fn foreign_names_not_authoritative() {
    let z = zone();
    assert!(!z.is_authoritative(&name("example.org.")));
    assert!(!z.is_authoritative(&name("crank.internal.")));
    assert!(z.lookup(&name("other.internal."), RecordType::A).is_none());
    assert!(z.is_authoritative(&name("x.y.home.crank.internal.")));
}

#[test]
fn bad_domain_and_range_rejected() {
    let mut s = spec();
    s.domain = "bad domain".into();
    assert!(matches!(Zone::new(&s), Err(ZoneError::InvalidDomain(_))));
    let mut s = spec();
    s.reverse_ranges = vec![(ip("100.64.0.0"), 33)];
    assert!(matches!(Zone::new(&s), Err(ZoneError::InvalidRange { .. })));
}
