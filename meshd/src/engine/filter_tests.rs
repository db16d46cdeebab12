use super::*;
use platform::filter::FilterRule;
use proptest::prelude::*;

const ME: [u8; 4] = [100, 64, 0, 1];
const ALPHA: [u8; 4] = [100, 64, 0, 2];
const BETA: [u8; 4] = [100, 64, 0, 3];

fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
    let total = 20 + l4.len();
    let mut p = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0,
        0,
        64,
        proto,
        0,
        0,
    ];
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(l4);
    p
}

fn ports(sport: u16, dport: u16) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&[0; 16]);
    l4
}

fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    v4(src, dst, 6, &ports(sport, dport))
}

/// A TCP segment with SYN set (and ACK when `ack`).
fn tcp_syn(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, ack: bool) -> Vec<u8> {
    let mut l4 = ports(sport, dport);
    l4[13] = if ack { 0x12 } else { 0x02 };
    v4(src, dst, 6, &l4)
}

fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    v4(src, dst, 17, &ports(sport, dport))
}

fn echo(src: [u8; 4], dst: [u8; 4], kind: u8, id: u16) -> Vec<u8> {
    let mut l4 = vec![kind, 0, 0, 0];
    l4.extend_from_slice(&id.to_be_bytes());
    l4.extend_from_slice(&[0, 1]);
    v4(src, dst, 1, &l4)
}

fn rule(sources: &[[u8; 4]], protos: Vec<Proto>, ports: &str) -> FilterRule {
    FilterRule {
        sources: sources
            .iter()
            .map(|a| IpPrefix::host(IpAddr::from(*a)))
            .collect(),
        protos,
        ports: platform::filter::parse_ports(ports).unwrap(),
    }
}

fn filter(rules: Vec<FilterRule>) -> Filter {
    let f = Filter::default();
    f.set_rules(&PacketFilter { rules }, &[IpAddr::from(ME)]);
    f
}

#[test]
fn a_rule_lets_in_exactly_its_source_protocol_and_ports() {
    let f = filter(vec![rule(&[ALPHA], vec![Proto::Tcp], "8421")]);
    let now = Instant::now();
    assert_eq!(f.inbound(&tcp(ALPHA, ME, 40000, 8421), now), Ok(()));
    assert_eq!(
        f.inbound(&tcp(ALPHA, ME, 40000, 22), now),
        Err(Drop::NoRule)
    );
    assert_eq!(
        f.inbound(&udp(ALPHA, ME, 40000, 8421), now),
        Err(Drop::NoRule)
    );
    assert_eq!(
        f.inbound(&tcp(BETA, ME, 40000, 8421), now),
        Err(Drop::NoRule)
    );
    // ICMP needs a rule for every port.
    assert_eq!(f.inbound(&echo(ALPHA, ME, 8, 7), now), Err(Drop::NoRule));
    // Not for this device.
    assert_eq!(
        f.inbound(&tcp(ALPHA, BETA, 1, 8421), now),
        Err(Drop::NotForUs)
    );
    assert_eq!(f.inbound(&[0x45, 0, 0], now), Err(Drop::Malformed));
}

#[test]
fn default_protocols_and_every_port_allow_ping() {
    let f = filter(vec![rule(&[ALPHA], Vec::new(), "*")]);
    let now = Instant::now();
    assert_eq!(f.inbound(&echo(ALPHA, ME, 8, 7), now), Ok(()));
    assert_eq!(f.inbound(&udp(ALPHA, ME, 1, 53), now), Ok(()));
    // GRE is not among the defaults.
    assert_eq!(
        f.inbound(&v4(ALPHA, ME, 47, &[0; 8]), now),
        Err(Drop::NoRule)
    );
}

#[test]
fn answers_to_our_own_flows_come_in_and_only_those() {
    let f = filter(Vec::new());
    let t0 = Instant::now();
    // Only a SYN opens a TCP flow.
    assert!(f.outbound(&tcp(ME, BETA, 50000, 22), t0));
    assert_eq!(f.inbound(&tcp(BETA, ME, 22, 50000), t0), Err(Drop::NoRule));
    assert!(f.outbound(&tcp_syn(ME, BETA, 50000, 22, false), t0));
    assert_eq!(f.inbound(&tcp(BETA, ME, 22, 50000), t0), Ok(()));
    // Another port of ours, or another peer, is not an answer.
    assert_eq!(f.inbound(&tcp(BETA, ME, 22, 50001), t0), Err(Drop::NoRule));
    assert_eq!(f.inbound(&tcp(ALPHA, ME, 22, 50000), t0), Err(Drop::NoRule));
    // Ping out, reply in; a request in is not a reply.
    assert!(f.outbound(&echo(ME, BETA, 8, 99), t0));
    assert_eq!(f.inbound(&echo(BETA, ME, 0, 99), t0), Ok(()));
    assert_eq!(f.inbound(&echo(BETA, ME, 0, 98), t0), Err(Drop::NoRule));
    assert_eq!(f.inbound(&echo(BETA, ME, 8, 99), t0), Err(Drop::NoRule));
    // UDP flows expire when idle.
    assert!(f.outbound(&udp(ME, BETA, 5353, 53), t0));
    assert_eq!(
        f.inbound(&udp(BETA, ME, 53, 5353), t0 + Duration::from_secs(60)),
        Ok(())
    );
    assert_eq!(
        f.inbound(
            &udp(BETA, ME, 53, 5353),
            t0 + Duration::from_secs(60) + UDP_IDLE
        ),
        Err(Drop::NoRule)
    );
}

#[test]
fn replies_to_what_a_rule_let_in_start_no_flow() {
    let f = filter(vec![rule(&[ALPHA], vec![Proto::Tcp, Proto::Udp], "22")]);
    let now = Instant::now();
    // alpha may reach our port 22; our answers from 22 record nothing, so
    // a flood of alpha's source ports cannot fill the table…
    for port in 1000..1100 {
        assert_eq!(f.inbound(&tcp_syn(ALPHA, ME, port, 22, false), now), Ok(()));
        assert!(f.outbound(&tcp_syn(ME, ALPHA, 22, port, true), now));
        assert!(f.outbound(&udp(ME, ALPHA, 22, port), now));
    }
    assert_eq!(f.flow_count(), 0);
    // …and once the rule is gone, alpha's packets to 22 stop.
    f.set_rules(&PacketFilter::default(), &[IpAddr::from(ME)]);
    assert_eq!(f.inbound(&tcp(ALPHA, ME, 1000, 22), now), Err(Drop::NoRule));
}

#[test]
fn an_icmp_error_about_our_flow_comes_in() {
    let f = filter(Vec::new());
    let now = Instant::now();
    let sent = udp(ME, BETA, 5000, 9);
    assert!(f.outbound(&sent, now));
    let mut l4 = vec![3, 3, 0, 0, 0, 0, 0, 0];
    l4.extend_from_slice(&sent[..28]);
    assert_eq!(f.inbound(&v4(BETA, ME, 1, &l4), now), Ok(()));
    // The same error about a flow we never started is dropped, and so is
    // one from a third peer about our flow with beta.
    let mut other = vec![3, 3, 0, 0, 0, 0, 0, 0];
    other.extend_from_slice(&udp(ME, BETA, 5001, 9)[..28]);
    assert_eq!(f.inbound(&v4(BETA, ME, 1, &other), now), Err(Drop::NoRule));
    assert_eq!(f.inbound(&v4(ALPHA, ME, 1, &l4), now), Err(Drop::NoRule));
}

/// An IPv4 fragment: identification `id`, offset in 8-byte units, more
/// fragments to come or not.
fn fragment(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    id: u16,
    offset: u16,
    more: bool,
    l4: &[u8],
) -> Vec<u8> {
    let mut p = v4(src, dst, proto, l4);
    p[4..6].copy_from_slice(&id.to_be_bytes());
    let flags = offset | if more { 0x2000 } else { 0 };
    p[6..8].copy_from_slice(&flags.to_be_bytes());
    p
}

#[test]
fn later_fragments_follow_their_first() {
    let f = filter(vec![rule(&[ALPHA], vec![Proto::Udp], "53")]);
    let now = Instant::now();
    // Allowed first fragment: its later fragments come in, others do not.
    assert_eq!(
        f.inbound(&fragment(ALPHA, ME, 17, 7, 0, true, &ports(999, 53)), now),
        Ok(())
    );
    assert_eq!(
        f.inbound(&fragment(ALPHA, ME, 17, 7, 185, false, &[0; 16]), now),
        Ok(())
    );
    assert_eq!(
        f.inbound(&fragment(ALPHA, ME, 17, 8, 185, false, &[0; 16]), now),
        Err(Drop::NoRule)
    );
    // A first fragment to a port no rule opens takes its followers down too.
    assert_eq!(
        f.inbound(&fragment(ALPHA, ME, 17, 9, 0, true, &ports(999, 54)), now),
        Err(Drop::NoRule)
    );
    assert_eq!(
        f.inbound(&fragment(ALPHA, ME, 17, 9, 185, false, &[0; 16]), now),
        Err(Drop::NoRule)
    );
    // A large answer to our own query, from a peer no rule names.
    assert!(f.outbound(&udp(ME, BETA, 5353, 53), now));
    assert_eq!(
        f.inbound(&fragment(BETA, ME, 17, 3, 0, true, &ports(53, 5353)), now),
        Ok(())
    );
    assert_eq!(
        f.inbound(&fragment(BETA, ME, 17, 3, 185, false, &[0; 16]), now),
        Ok(())
    );
    // Followers wait only so long.
    assert_eq!(
        f.inbound(
            &fragment(BETA, ME, 17, 3, 370, false, &[0; 16]),
            now + FRAGMENT_IDLE
        ),
        Err(Drop::NoRule)
    );
}

#[test]
fn an_icmp_error_about_our_ping_comes_in() {
    let f = filter(Vec::new());
    let now = Instant::now();
    let ping = echo(ME, BETA, 8, 42);
    assert!(f.outbound(&ping, now));
    let mut l4 = vec![3, 1, 0, 0, 0, 0, 0, 0];
    l4.extend_from_slice(&ping);
    assert_eq!(f.inbound(&v4(BETA, ME, 1, &l4), now), Ok(()));
    let mut other = vec![3, 1, 0, 0, 0, 0, 0, 0];
    other.extend_from_slice(&echo(ME, BETA, 8, 43));
    assert_eq!(f.inbound(&v4(BETA, ME, 1, &other), now), Err(Drop::NoRule));
}

#[test]
fn the_flow_table_is_bounded() {
    let f = filter(Vec::new());
    let now = Instant::now();
    for i in 0..MAX_FLOWS {
        assert!(f.outbound(&udp(ME, BETA, (i % 60000) as u16, (i / 60000) as u16), now));
    }
    assert!(!f.outbound(&udp(ME, ALPHA, 1, 1), now));
    assert_eq!(f.flow_count(), MAX_FLOWS);
    // Once the old flows are idle long enough, new ones fit again.
    assert!(f.outbound(&udp(ME, ALPHA, 1, 1), now + UDP_IDLE + SWEEP_EVERY));
    assert_eq!(f.flow_count(), 1);
}

#[test]
fn wider_prefixes_and_merged_ranges() {
    let f = Filter::default();
    f.set_rules(
        &PacketFilter {
            rules: vec![
                FilterRule {
                    sources: vec!["100.64.0.0/10".parse().unwrap()],
                    protos: vec![Proto::Tcp],
                    ports: platform::filter::parse_ports("80,8000-8999").unwrap(),
                },
                rule(&[ALPHA], vec![Proto::Tcp], "9000-9100,8500-9050"),
            ],
        },
        &[IpAddr::from(ME)],
    );
    let now = Instant::now();
    assert_eq!(f.inbound(&tcp(BETA, ME, 1, 8999), now), Ok(()));
    assert_eq!(f.inbound(&tcp(BETA, ME, 1, 9000), now), Err(Drop::NoRule));
    assert_eq!(f.inbound(&tcp(ALPHA, ME, 1, 9100), now), Ok(()));
    assert_eq!(f.inbound(&tcp(ALPHA, ME, 1, 9101), now), Err(Drop::NoRule));
    assert_eq!(
        f.inbound(&tcp([10, 0, 0, 1], ME, 1, 80), now),
        Err(Drop::NoRule)
    );
}

#[test]
fn ipv6_packets_are_classified_through_extension_headers() {
    let me: Ipv6Addr = "fd00::1".parse().unwrap();
    let peer: Ipv6Addr = "fd00::2".parse().unwrap();
    let f = Filter::default();
    f.set_rules(
        &PacketFilter {
            rules: vec![FilterRule {
                sources: vec![IpPrefix::host(peer.into())],
                protos: vec![Proto::Udp],
                ports: vec![PortRange::one(53)],
            }],
        },
        &[me.into()],
    );
    // Hop-by-hop options (8 bytes), then UDP to port 53.
    let mut payload = vec![17, 0, 0, 0, 0, 0, 0, 0];
    payload.extend_from_slice(&ports(1000, 53));
    let mut p = vec![0x60, 0, 0, 0, 0, payload.len() as u8, 0, 64];
    p.extend_from_slice(&peer.octets());
    p.extend_from_slice(&me.octets());
    p.extend_from_slice(&payload);
    assert_eq!(f.inbound(&p, Instant::now()), Ok(()));
    p[40 + 8 + 3] = 54;
    assert_eq!(f.inbound(&p, Instant::now()), Err(Drop::NoRule));
}

proptest! {
    /// Whatever arrives, the filter answers without panicking.
    #[test]
    fn arbitrary_packets_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
        let f = filter(vec![rule(&[ALPHA], Vec::new(), "*")]);
        let now = Instant::now();
        let _ = f.inbound(&bytes, now);
        let _ = f.outbound(&bytes, now);
    }

    /// Merged ranges accept exactly what the ranges they came from accept.
    #[test]
    fn merged_ranges_mean_the_same(ranges in proptest::collection::vec((any::<u16>(), 0u16..500), 0..12), port in any::<u16>()) {
        let ranges: Vec<PortRange> = ranges.into_iter().map(|(a, l)| PortRange { first: a, last: a.saturating_add(l) }).collect();
        let mut allowed = Allowed::default();
        allowed.add(Proto::Tcp, &ranges);
        allowed.finish();
        prop_assert_eq!(allowed.allows(Proto::Tcp, Some(port)), ranges.iter().any(|r| r.contains(port)));
    }
}
