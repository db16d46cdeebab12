//! Integration tests for the MagicDNS server over real loopback sockets.

mod dns_common;
use dns_common as common;

use std::time::{Duration, Instant};

use common::*;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use meshd::dns::{Config, MagicDns, Options};

const LOCAL: &str = "127.0.0.1:0";

async fn start(config: Config) -> MagicDns {
    let addr = LOCAL.parse().expect("addr");
    MagicDns::start(&[addr], config).await.expect("start")
}

fn mesh_only() -> Config {
    Config {
        zone: mesh_zone("100.64.0.1"),
        ..Config::default()
    }
}

#[tokio::test]
async fn local_answers_over_udp_and_tcp() {
    let dns = start(mesh_only()).await;
    let addr = dns.local_addrs()[0];

    let udp = udp_query(addr, 0x1234, "LAPTOP.home.crank.internal.", RecordType::A).await;
    assert_eq!(udp.metadata.id, 0x1234);
    assert_eq!(udp.metadata.response_code, ResponseCode::NoError);
    assert!(udp.metadata.authoritative);
    assert_eq!(a_addrs(&udp), vec![ip("100.64.0.1")]);

    let tcp = tcp_query(
        addr,
        0x4321,
        "laptop.home.crank.internal.",
        RecordType::AAAA,
    )
    .await;
    assert_eq!(tcp.metadata.id, 0x4321);
    assert!(tcp.metadata.authoritative);
    assert_eq!(a_addrs(&tcp), vec![ip("fd7a:115c:a1e0::1")]);

    let nx = udp_query(addr, 7, "ghost.home.crank.internal.", RecordType::A).await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert!(nx.metadata.authoritative);
    assert!(has_soa(&nx));

    // Unknown address in the overlay range: NXDOMAIN locally, never forwarded.
    let ptr = udp_query(addr, 8, "9.9.100.100.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(ptr.metadata.response_code, ResponseCode::NXDomain);

    let stats = dns.stats();
    assert_eq!(stats.local_answers, 2);
    assert_eq!(stats.nxdomain, 2);
    assert_eq!(stats.forwarded + stats.refused, 0);
    dns.stop().await.expect("stop");
}

#[tokio::test]
async fn update_changes_answers_without_rebinding() {
    let dns = start(mesh_only()).await;
    let addr = dns.local_addrs()[0];
    let before = udp_query(addr, 1, "laptop.home.crank.internal.", RecordType::A).await;
    assert_eq!(a_addrs(&before), vec![ip("100.64.0.1")]);

    let mut config = mesh_only();
    config.zone = mesh_zone("100.64.0.77");
    config.zone.hosts[0].name = "laptop2".into();
    config.zone.hosts.push(meshd::dns::Host {
        name: "not valid!".into(),
        addrs: vec![ip("100.64.0.5")],
    });
    assert_eq!(
        dns.update(config).expect("update"),
        1,
        "one invalid host skipped"
    );

    assert_eq!(dns.local_addrs()[0], addr);
    let after = udp_query(addr, 2, "laptop2.home.crank.internal.", RecordType::A).await;
    assert_eq!(a_addrs(&after), vec![ip("100.64.0.77")]);
    let gone = udp_query(addr, 3, "laptop.home.crank.internal.", RecordType::A).await;
    assert_eq!(gone.metadata.response_code, ResponseCode::NXDomain);
    dns.stop().await.expect("stop");
}

#[tokio::test]
async fn split_and_default_forwarding() {
    let (corp, _corp_srv) = fake_upstream(&[("corp.example.", &[("git", "10.1.0.5")])]).await;
    // The default upstream also claims corp.example with another address:
    // getting 10.1.0.5 proves the split route was taken.
    let (public, _pub_srv) = fake_upstream(&[
        ("example.net.", &[("www", "192.0.2.80")]),
        ("corp.example.", &[("git", "192.0.2.99")]),
    ])
    .await;

    let config = Config {
        zone: mesh_zone("100.64.0.1"),
        split: vec![("corp.example".into(), vec![corp])],
        upstream: vec![public],
    };
    let dns = start(config).await;
    let addr = dns.local_addrs()[0];

    let git = udp_query(addr, 0xaaaa, "git.corp.example.", RecordType::A).await;
    assert_eq!(git.metadata.id, 0xaaaa);
    assert_eq!(a_addrs(&git), vec![ip("10.1.0.5")]);

    let www = udp_query(addr, 0xbbbb, "www.example.net.", RecordType::A).await;
    assert_eq!(www.metadata.id, 0xbbbb);
    assert_eq!(a_addrs(&www), vec![ip("192.0.2.80")]);

    // Upstream NXDOMAIN passes through, with its SOA, under the client's id.
    let nx = udp_query(addr, 0xcccc, "missing.example.net.", RecordType::A).await;
    assert_eq!(nx.metadata.id, 0xcccc);
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert!(has_soa(&nx));

    // Over TCP too.
    let tcp = tcp_query(addr, 0xdddd, "git.corp.example.", RecordType::A).await;
    assert_eq!(a_addrs(&tcp), vec![ip("10.1.0.5")]);

    // The mesh names still win over forwarding.
    let mesh = udp_query(addr, 5, "laptop.home.crank.internal.", RecordType::A).await;
    assert!(mesh.metadata.authoritative);

    let stats = dns.stats();
    assert_eq!(stats.forwarded, 4);
    assert_eq!(stats.forward_failures, 0);
    assert_eq!(stats.local_answers, 1);
    dns.stop().await.expect("stop");
}

#[tokio::test]
async fn no_upstream_is_refused() {
    let dns = start(mesh_only()).await;
    let addr = dns.local_addrs()[0];
    let reply = udp_query(addr, 9, "www.example.org.", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
    assert_eq!(reply.metadata.id, 9);
    assert_eq!(dns.stats().refused, 1);
    dns.stop().await.expect("stop");
}

#[tokio::test]
async fn garbage_is_counted_and_survived() {
    let dns = start(mesh_only()).await;
    let addr = dns.local_addrs()[0];

    // A runt: no reply at all.
    assert!(udp_raw(addr, b"\x01\x02junk", Duration::from_millis(300))
        .await
        .is_none());
    // A header claiming one question that is not there: FORMERR, same id.
    let bad = [
        0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xff, 0xff,
    ];
    let reply = udp_raw(addr, &bad, Duration::from_secs(2))
        .await
        .expect("formerr");
    let msg = hickory_proto::op::Message::from_vec(&reply).expect("decode");
    assert_eq!(msg.metadata.id, 0xabcd);
    assert_eq!(msg.metadata.response_code, ResponseCode::FormErr);
    // A query with zero questions reaches the handler: FORMERR too.
    let empty = [0x00, 0x07, 0x01, 0x00, 0, 0, 0, 0, 0, 0, 0, 0];
    let reply = udp_raw(addr, &empty, Duration::from_secs(2))
        .await
        .expect("formerr");
    let msg = hickory_proto::op::Message::from_vec(&reply).expect("decode");
    assert_eq!(msg.metadata.response_code, ResponseCode::FormErr);

    let ok = udp_query(addr, 10, "laptop.home.crank.internal.", RecordType::A).await;
    assert_eq!(a_addrs(&ok), vec![ip("100.64.0.1")]);
    assert_eq!(dns.stats().malformed, 3);
    dns.stop().await.expect("stop");
}

#[tokio::test]
async fn inflight_cap_sheds_fast() {
    // An upstream that never answers: a bound UDP socket nobody reads.
    let blackhole = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let config = Config {
        zone: mesh_zone("100.64.0.1"),
        split: vec![],
        upstream: vec![blackhole.local_addr().expect("addr")],
    };
    let opts = Options {
        max_inflight_forwards: 2,
        forward_timeout: Duration::from_millis(800),
        ..Options::default()
    };
    let bind = LOCAL.parse().expect("addr");
    let dns = MagicDns::start_with_options(&[bind], config, opts)
        .await
        .expect("start");
    let addr = dns.local_addrs()[0];

    let slow: Vec<_> = (0..2)
        .map(|i| {
            tokio::spawn(async move {
                udp_query(
                    addr,
                    100 + i,
                    &format!("slow{i}.example.org."),
                    RecordType::A,
                )
                .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;

    let started = Instant::now();
    for i in 0..5u16 {
        let reply = udp_query(
            addr,
            200 + i,
            &format!("shed{i}.example.org."),
            RecordType::A,
        )
        .await;
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(reply.metadata.id, 200 + i);
    }
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "shed replies must be fast"
    );
    assert_eq!(dns.stats().forward_shed, 5);

    for task in slow {
        let reply = task.await.expect("join");
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    }
    let stats = dns.stats();
    assert_eq!(stats.forward_failures, 7);
    assert_eq!(stats.forwarded, 0);
    // Local names are unaffected by a saturated forwarder.
    let ok = udp_query(addr, 11, "laptop.home.crank.internal.", RecordType::A).await;
    assert_eq!(a_addrs(&ok), vec![ip("100.64.0.1")]);
    dns.stop().await.expect("stop");
}

#[tokio::test]
async fn stop_frees_the_ports() {
    let dns = start(mesh_only()).await;
    let addr = dns.local_addrs()[0];
    let _ = udp_query(addr, 1, "laptop.home.crank.internal.", RecordType::A).await;
    let _ = tcp_query(addr, 2, "laptop.home.crank.internal.", RecordType::A).await;
    dns.stop().await.expect("stop");
    let again = MagicDns::start(&[addr], mesh_only())
        .await
        .expect("rebind same port");
    assert_eq!(again.local_addrs()[0], addr);
    again.stop().await.expect("stop");
}

#[tokio::test]
async fn own_address_is_never_an_upstream() {
    let dns = start(mesh_only()).await;
    let addr = dns.local_addrs()[0];
    let mut config = mesh_only();
    config.upstream = vec![addr];
    dns.update(config).expect("update");
    let reply = udp_query(addr, 12, "www.example.org.", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
    dns.stop().await.expect("stop");
}
