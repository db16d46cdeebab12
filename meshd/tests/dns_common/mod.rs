//! Helpers for the server tests: fake upstream servers and raw DNS queries.

#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use hickory_server::Server;
use meshd::dns::{Host, ZoneSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

pub fn mesh_zone(laptop: &str) -> ZoneSpec {
    ZoneSpec {
        domain: "home.crank.internal".into(),
        hosts: vec![Host {
            name: "laptop".into(),
            addrs: vec![ip(laptop), ip("fd7a:115c:a1e0::1")],
        }],
        extra: vec![],
        ttl: 60,
        reverse_ranges: vec![(ip("100.64.0.0"), 10)],
    }
}

/// A hickory server with in-memory primary zones: (origin, [(host, v4)]).
/// Keep the returned server alive for as long as it should answer.
pub async fn fake_upstream(zones: &[(&str, &[(&str, &str)])]) -> (SocketAddr, Server<Catalog>) {
    let mut catalog = Catalog::new();
    for (origin, hosts) in zones {
        let (name, zone) = in_memory_zone(origin, hosts);
        catalog.upsert(name, vec![Arc::new(zone)]);
    }
    let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
    let addr = udp.local_addr().expect("addr");
    let tcp = TcpListener::bind(addr).await.expect("bind tcp");
    let mut server = Server::new(catalog);
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 16);
    (addr, server)
}

fn in_memory_zone(origin: &str, hosts: &[(&str, &str)]) -> (LowerName, InMemoryZoneHandler) {
    let origin = Name::from_str(origin).expect("origin");
    let mut zone = InMemoryZoneHandler::<TokioRuntimeProvider>::empty(
        origin.clone(),
        ZoneType::Primary,
        AxfrPolicy::Deny,
    );
    let soa = SOA::new(
        Name::from_str("ns")
            .expect("ns")
            .append_domain(&origin)
            .expect("ns name"),
        Name::from_str("admin")
            .expect("a")
            .append_domain(&origin)
            .expect("admin name"),
        7,
        3600,
        600,
        86400,
        30,
    );
    assert!(zone.upsert_mut(Record::from_rdata(origin.clone(), 300, RData::SOA(soa)), 7));
    for (host, addr) in hosts {
        let name = Name::from_str(host)
            .expect("host")
            .append_domain(&origin)
            .expect("fqdn");
        let v4 = addr.parse().expect("v4");
        assert!(zone.upsert_mut(Record::from_rdata(name, 300, RData::A(A(v4))), 7));
    }
    (LowerName::from(origin), zone)
}

pub fn query_msg(id: u16, name: &str, rtype: RecordType) -> Vec<u8> {
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(Name::from_str(name).expect("qname"), rtype));
    msg.to_vec().expect("encode query")
}

/// Sends raw bytes over UDP and waits up to `wait` for one reply.
pub async fn udp_raw(server: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("client bind");
    sock.send_to(bytes, server).await.expect("send");
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(wait, sock.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

pub async fn udp_query(server: SocketAddr, id: u16, name: &str, rtype: RecordType) -> Message {
    let reply = udp_raw(server, &query_msg(id, name, rtype), Duration::from_secs(5))
        .await
        .expect("udp reply");
    Message::from_vec(&reply).expect("decode reply")
}

pub async fn tcp_query(server: SocketAddr, id: u16, name: &str, rtype: RecordType) -> Message {
    let msg = query_msg(id, name, rtype);
    let mut stream = TcpStream::connect(server).await.expect("connect");
    let len = u16::try_from(msg.len()).expect("len");
    stream
        .write_all(&len.to_be_bytes())
        .await
        .expect("write len");
    stream.write_all(&msg).await.expect("write");
    let mut len_buf = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut len_buf))
        .await
        .expect("tcp reply in time")
        .expect("read len");
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len_buf))];
    stream.read_exact(&mut body).await.expect("read body");
    Message::from_vec(&body).expect("decode reply")
}

pub fn a_addrs(msg: &Message) -> Vec<IpAddr> {
    msg.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

pub fn has_soa(msg: &Message) -> bool {
    msg.authorities
        .iter()
        .any(|r| matches!(r.data, RData::SOA(_)))
}
