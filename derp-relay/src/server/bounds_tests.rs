//! The relay's bounds under abuse: rate limits, deadlines and keepalives on
//! tokio's paused clock (in-memory pipes, no sockets), and the caps on
//! connections and on questions to the coordinator.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rand_core::OsRng;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
use x25519_dalek::{PublicKey, StaticSecret};

use super::admission::{Admission, AdmissionLimits};
use super::metrics::{Drop, Metrics};
use super::tests::{fake_coordinator_with, raw, relay_with, start_with, wait_for};
use super::{ConnLimits, Relay};
use crate::proto::frame::{Frame, Key};
use crate::proto::handshake;

/// The next frame on `s`, or `None` when the relay closed it.
async fn read_frame(s: &mut DuplexStream) -> Option<Frame> {
    let mut buf = vec![0u8; 5];
    s.read_exact(&mut buf).await.ok()?;
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    buf.resize(5 + len, 0);
    s.read_exact(&mut buf[5..]).await.ok()?;
    Some(Frame::decode(&buf).unwrap().unwrap().0)
}

async fn write(s: &mut DuplexStream, frames: &[Frame]) {
    let mut bytes = Vec::new();
    for f in frames {
        f.encode(&mut bytes).unwrap();
    }
    s.write_all(&bytes).await.unwrap();
}

/// A connection to `relay` over an in-memory pipe, before the handshake.
fn pipe(relay: &Arc<Relay>) -> DuplexStream {
    let (mine, theirs) = tokio::io::duplex(1 << 20);
    let permit = relay.handshake_permit().expect("under the handshake cap");
    tokio::spawn(relay.clone().serve_conn(theirs, permit));
    mine
}

/// A connection to `relay` that proved `secret`'s key (as a mesh peer with
/// `mesh_key`) and was admitted.
async fn pipe_client(
    relay: &Arc<Relay>,
    secret: &StaticSecret,
    mesh_key: Option<&str>,
) -> DuplexStream {
    let mut s = pipe(relay);
    let Some(Frame::ServerKey { key, challenge }) = read_frame(&mut s).await else {
        panic!("no server key")
    };
    let proof = handshake::seal(secret, &key, &challenge, mesh_key.map(str::to_owned)).unwrap();
    write(&mut s, &[proof]).await;
    assert_eq!(read_frame(&mut s).await, Some(Frame::ServerInfo));
    s
}

fn new_key() -> (StaticSecret, Key) {
    let secret = StaticSecret::random_from_rng(OsRng);
    let key = PublicKey::from(&secret).to_bytes();
    (secret, key)
}

/// Reads `s` up to the answer to a ping: everything the relay did for the
/// frames sent before it is done by then.
async fn until_pong(s: &mut DuplexStream, id: u8) -> Vec<Frame> {
    write(s, &[Frame::Ping([id; 8])]).await;
    let mut before = Vec::new();
    loop {
        match read_frame(s).await.expect("open") {
            Frame::Pong(d) if d == [id; 8] => return before,
            f => before.push(f),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_rate_limit_passes_exactly_the_burst_then_the_rate() {
    let relay = relay_with(Admission::Open, 10_000, None, ConnLimits::default());
    let (a_secret, _) = new_key();
    let (b_secret, b_key) = new_key();
    let mut a = pipe_client(&relay, &a_secret, None).await;
    let mut b = pipe_client(&relay, &b_secret, None).await;
    let packet = Frame::SendPacket {
        dst: b_key,
        data: vec![0u8; 1000],
    };
    // 100 kB at once against a 10 kB burst: ten pass.
    write(&mut a, &vec![packet.clone(); 100]).await;
    until_pong(&mut a, 1).await;
    assert_eq!(relay.metrics.drops(Drop::RateLimited), 90);
    let got = until_pong(&mut b, 2).await;
    assert_eq!(got.len(), 10, "{got:?}");
    // Half a second later, 5 kB more have accrued: five pass.
    tokio::time::advance(Duration::from_millis(500)).await;
    write(&mut a, &vec![packet; 100]).await;
    until_pong(&mut a, 3).await;
    assert_eq!(relay.metrics.drops(Drop::RateLimited), 185);
    assert_eq!(until_pong(&mut b, 4).await.len(), 5);
}

#[tokio::test(start_paused = true)]
async fn silent_connections_are_closed_and_keepalives_keep_them_open() {
    // The deadline falls between keepalives, so the count is exact.
    let limits = ConnLimits {
        keepalive: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(25),
        ..ConnLimits::default()
    };
    let relay = relay_with(Admission::Open, 1 << 30, None, limits);
    let (quiet_secret, _) = new_key();
    let (chatty_secret, _) = new_key();
    let mut quiet = pipe_client(&relay, &quiet_secret, None).await;
    let mut chatty = pipe_client(&relay, &chatty_secret, None).await;
    let start = tokio::time::Instant::now();
    let chatter = tokio::spawn(async move {
        // Answers the relay's keepalives with its own, as clients do.
        while let Some(f) = read_frame(&mut chatty).await {
            assert_eq!(f, Frame::KeepAlive);
            write(&mut chatty, &[Frame::KeepAlive]).await;
            if start.elapsed() > Duration::from_secs(120) {
                return Some(chatty);
            }
        }
        None
    });
    // The relay sends keepalives to the silent one, then gives up on it.
    let mut keepalives = 0;
    while let Some(f) = read_frame(&mut quiet).await {
        assert_eq!(f, Frame::KeepAlive);
        keepalives += 1;
    }
    assert_eq!(
        start.elapsed(),
        limits.idle_timeout,
        "closed on the deadline"
    );
    assert_eq!(keepalives, 2, "one per keepalive interval before it");
    assert_eq!(relay.metrics.drops(Drop::IdleTimeout), 1);
    let chatty = chatter.await.unwrap();
    assert!(chatty.is_some(), "a client that talks stays connected");
    assert_eq!(relay.client_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_connection_that_does_not_prove_a_key_in_time_is_closed() {
    let limits = ConnLimits::default();
    let relay = relay_with(Admission::Open, 1 << 30, None, limits);
    let mut s = pipe(&relay);
    let start = tokio::time::Instant::now();
    assert!(matches!(
        read_frame(&mut s).await,
        Some(Frame::ServerKey { .. })
    ));
    // Half a proof, then nothing.
    s.write_all(&[0x02, 0, 0, 0, 100, 1, 2, 3]).await.unwrap();
    assert!(matches!(
        read_frame(&mut s).await,
        Some(Frame::Close { .. })
    ));
    assert_eq!(read_frame(&mut s).await, None);
    assert_eq!(start.elapsed(), limits.handshake_timeout);
    assert_eq!(relay.metrics.drops(Drop::HandshakeTimeout), 1);
    // Before proving a key, a frame larger than a proof is refused unread.
    let mut s = pipe(&relay);
    read_frame(&mut s).await;
    s.write_all(&[0x02, 0, 0, 0x10, 0]).await.unwrap();
    assert!(
        matches!(read_frame(&mut s).await, Some(Frame::Close { reason }) if reason == "oversized")
    );
}

#[tokio::test(start_paused = true)]
async fn inbound_mesh_links_hear_keepalives() {
    let psk = "region-psk-0123456789";
    let limits = ConnLimits::default();
    let relay = relay_with(Admission::Open, 1 << 30, Some(psk), limits);
    let (peer_secret, _) = new_key();
    let mut link = pipe_client(&relay, &peer_secret, Some(psk)).await;
    let start = tokio::time::Instant::now();
    for i in 1..=3u32 {
        let frame = tokio::time::timeout(limits.keepalive * 2, read_frame(&mut link))
            .await
            .expect("a keepalive in time");
        assert_eq!(frame, Some(Frame::KeepAlive));
        assert_eq!(start.elapsed(), limits.keepalive * i);
        write(&mut link, &[Frame::KeepAlive]).await;
    }
    assert_eq!(relay.client_count(), 0, "a mesh peer is not a client");
}

#[tokio::test]
async fn connections_over_the_caps_are_refused() {
    let limits = ConnLimits {
        max_connections: 3,
        max_handshakes: 1,
        ..ConnLimits::default()
    };
    let (relay, url) = start_with(Admission::Open, 1 << 30, None, limits).await;
    // One connection sits in its handshake, proving nothing.
    let (_stuck, _, _) = raw(&url).await;
    // A second one may not start a handshake meanwhile: a JSON 503.
    let resp = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
        .get(&url)
        .header("connection", "upgrade")
        .header("upgrade", "crank-derp")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_handshakes");
    assert_eq!(relay.metrics.drops(Drop::TooManyHandshakes), 1);
    // That connection closes; the stuck one keeps its permit.
    wait_for("the refused connection released", || {
        relay.connections.available_permits() == 2
    })
    .await;

    // Three TCP connections at most, whatever they are doing.
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches("/derp")
        .to_owned();
    let _second = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let _third = tokio::net::TcpStream::connect(&addr).await.unwrap();
    wait_for("two more connections", || {
        relay.connections.available_permits() == 0
    })
    .await;
    let mut fourth = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), fourth.read(&mut buf))
        .await
        .expect("closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert_eq!(relay.metrics.drops(Drop::TooManyConnections), 1);
}

#[tokio::test]
async fn random_keys_cost_the_coordinator_a_bounded_number_of_questions() {
    let coord = fake_coordinator_with(Vec::new(), Duration::ZERO).await;
    let limits = AdmissionLimits {
        asks_per_sec: 0,
        ask_burst: 5,
        ..AdmissionLimits::default()
    };
    let admission = Admission::coordinator(&coord.url, "t".into(), None, limits).unwrap();
    let (relay, url) = start_with(admission, 1 << 30, None, ConnLimits::default()).await;
    let mut tries = Vec::new();
    for _ in 0..40 {
        let url = url.clone();
        tries.push(tokio::spawn(async move {
            let (mut s, relay_key, challenge) = raw(&url).await;
            let mut f = Vec::new();
            let (secret, _) = new_key();
            handshake::seal(&secret, &relay_key, &challenge, None)
                .unwrap()
                .encode(&mut f)
                .unwrap();
            s.write_all(&f).await.unwrap();
            super::tests::drain(s).await
        }));
    }
    for t in tries {
        let reply = String::from_utf8_lossy(&t.await.unwrap()).into_owned();
        assert!(reply.contains("admission_"), "{reply}");
    }
    assert_eq!(coord.asked.load(Ordering::SeqCst), 5, "the burst, no more");
    assert_eq!(relay.metrics.drops(Drop::AdmissionDenied), 5);
    assert_eq!(relay.metrics.drops(Drop::AdmissionUnavailable), 35);
    assert_eq!(relay.metrics.admission_throttled.get(), 35);
    assert_eq!(relay.admission().cached(), (0, 5));
}

#[tokio::test]
async fn concurrent_checks_of_one_key_share_one_question() {
    let (_, key) = new_key();
    let coord = fake_coordinator_with(vec![(key, 4)], Duration::from_millis(200)).await;
    let limits = AdmissionLimits {
        asks_per_sec: 0,
        ask_burst: 100,
        ..AdmissionLimits::default()
    };
    let admission = Admission::coordinator(&coord.url, "t".into(), None, limits).unwrap();
    let metrics = Metrics::default();
    let node = platform::keys::NodePublic::from_bytes(key);
    let verdicts =
        futures_util::future::join_all((0..20).map(|_| admission.check(node, &metrics))).await;
    let expected = super::admission::Verdict::Admit(super::admission::network_tag(4));
    assert!(verdicts.iter().all(|v| *v == expected), "{verdicts:?}");
    assert_eq!(coord.asked.load(Ordering::SeqCst), 1);
    assert_eq!(metrics.admission_asks.get(), 1);
}
