//! The relay on loopback with real clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand_core::OsRng;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use x25519_dalek::{PublicKey, StaticSecret};

use super::admission::{Admission, AdmissionLimits};
use super::metrics::Drop;
use super::{http, ConnLimits, Relay, RelayConfig};
use crate::client::{RelayClient, RelayEvent};
use crate::proto::frame::{Frame, GoneReason, Key};

pub(super) async fn start(admission: Admission, rate_limit: u64) -> (Arc<Relay>, String) {
    start_meshed(admission, rate_limit, None).await
}

pub(super) async fn start_meshed(
    admission: Admission,
    rate_limit: u64,
    mesh_key: Option<&str>,
) -> (Arc<Relay>, String) {
    start_with(admission, rate_limit, mesh_key, ConnLimits::default()).await
}

pub(super) fn relay_with(
    admission: Admission,
    rate_limit: u64,
    mesh_key: Option<&str>,
    limits: ConnLimits,
) -> Arc<Relay> {
    Relay::new(RelayConfig {
        private: StaticSecret::random_from_rng(OsRng),
        admission,
        rate_limit,
        burst: rate_limit.min(1 << 20),
        mesh_key: mesh_key.map(str::to_owned),
        limits,
    })
}

pub(super) async fn start_with(
    admission: Admission,
    rate_limit: u64,
    mesh_key: Option<&str>,
    limits: ConnLimits,
) -> (Arc<Relay>, String) {
    let relay = relay_with(admission, rate_limit, mesh_key, limits);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(http::serve(listener, relay.clone(), None));
    (relay, format!("http://{addr}/derp"))
}

/// Admission by the coordinator at `url`, with default limits.
pub(super) fn asking(url: &str) -> Admission {
    Admission::coordinator(url, "t".into(), None, AdmissionLimits::default()).unwrap()
}

pub(super) struct Peer {
    pub(super) key: Key,
    pub(super) client: RelayClient,
    pub(super) events: mpsc::Receiver<((), RelayEvent)>,
}

impl Peer {
    pub(super) async fn connect(url: &str) -> Peer {
        Self::connect_as(url, StaticSecret::random_from_rng(OsRng)).await
    }

    pub(super) async fn connect_as(url: &str, secret: StaticSecret) -> Peer {
        let key = PublicKey::from(&secret).to_bytes();
        let (tx, events) = mpsc::channel(1024);
        let client = RelayClient::spawn(url.to_owned(), secret, (), tx);
        let mut p = Peer {
            key,
            client,
            events,
        };
        match p.next().await {
            RelayEvent::Connected => p,
            other => panic!("not connected: {other:?}"),
        }
    }

    pub(super) async fn next(&mut self) -> RelayEvent {
        tokio::time::timeout(Duration::from_secs(5), self.events.recv())
            .await
            .expect("event in time")
            .expect("open")
            .1
    }

    pub(super) async fn next_packet(&mut self) -> (Key, Vec<u8>) {
        loop {
            match self.next().await {
                RelayEvent::Packet { src, data } => return (src, data),
                RelayEvent::PeerGone { .. } => continue,
                other => panic!("{other:?}"),
            }
        }
    }
}

pub(super) async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn forwards_between_clients_and_reports_departures() {
    let (relay, url) = start(Admission::Open, 1 << 30).await;
    let mut a = Peer::connect(&url).await;
    let mut b = Peer::connect(&url).await;
    assert_eq!(relay.client_count(), 2);

    assert!(a.client.send(b.key, b"hello b"));
    assert_eq!(b.next_packet().await, (a.key, b"hello b".to_vec()));
    assert!(b.client.send(a.key, b"hello a"));
    assert_eq!(a.next_packet().await, (b.key, b"hello a".to_vec()));

    // To a key that is not here: a notice back, counted.
    let nobody = [9u8; 32];
    assert!(a.client.send(nobody, b"?"));
    match a.next().await {
        RelayEvent::PeerGone { key, reason } => {
            assert_eq!((key, reason), (nobody, GoneReason::NotHere))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(relay.metrics.drops(Drop::NoSuchPeer), 1);

    // b leaves: a, who sent to it, hears.
    drop(b.client);
    match a.next().await {
        RelayEvent::PeerGone { key, reason } => {
            assert_eq!((key, reason), (b.key, GoneReason::Disconnected))
        }
        other => panic!("{other:?}"),
    }
    wait_for("b removed", || relay.client_count() == 1).await;
    assert!(relay.metrics.render().contains("derp_clients 1"));
}

/// Opens a raw upgraded connection and returns it after the server's key frame.
pub(super) async fn raw(url: &str) -> (TcpStream, Key, [u8; 16]) {
    let addr: SocketAddr = url
        .trim_start_matches("http://")
        .trim_end_matches("/derp")
        .parse()
        .unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET /derp HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: crank-derp\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.unwrap());
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let mut frame = [0u8; 5 + 48];
    s.read_exact(&mut frame).await.unwrap();
    let Some((Frame::ServerKey { key, challenge }, _)) = Frame::decode(&frame).unwrap() else {
        panic!()
    };
    (s, key, challenge)
}

/// Reads until the server closes, returning what it sent.
pub(super) async fn drain(mut s: TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("server closes");
    out
}

#[tokio::test]
async fn bad_clients_are_closed_with_a_counted_reason_and_others_carry_on() {
    let (relay, url) = start(Admission::Open, 1 << 30).await;
    let a = Peer::connect(&url).await;
    let mut b = Peer::connect(&url).await;

    // Unauthenticated: a packet before any proof.
    let (mut s, _, _) = raw(&url).await;
    let mut f = Vec::new();
    Frame::SendPacket {
        dst: a.key,
        data: b"sneaky".to_vec(),
    }
    .encode(&mut f)
    .unwrap();
    s.write_all(&f).await.unwrap();
    let reply = drain(s).await;
    assert!(String::from_utf8_lossy(&reply).contains("unauthenticated"));
    assert_eq!(relay.metrics.drops(Drop::Unauthenticated), 1);

    // A key it cannot prove: sealed with another secret.
    let (mut s, relay_key, challenge) = raw(&url).await;
    let mut sealed = crate::proto::handshake::seal(
        &StaticSecret::random_from_rng(OsRng),
        &relay_key,
        &challenge,
        None,
    )
    .unwrap();
    if let Frame::ClientInfo { node_key, .. } = &mut sealed {
        *node_key = a.key;
    }
    let mut f = Vec::new();
    sealed.encode(&mut f).unwrap();
    s.write_all(&f).await.unwrap();
    drain(s).await;
    assert_eq!(relay.metrics.drops(Drop::Unauthenticated), 2);

    // Oversized frame header.
    let (mut s, _, _) = raw(&url).await;
    s.write_all(&[0x04, 0xff, 0xff, 0xff, 0xff]).await.unwrap();
    drain(s).await;
    assert_eq!(relay.metrics.drops(Drop::Oversized), 1);

    // Malformed after authenticating: a frame only servers send.
    let secret = StaticSecret::random_from_rng(OsRng);
    let (mut s, relay_key, challenge) = raw(&url).await;
    let mut f = Vec::new();
    crate::proto::handshake::seal(&secret, &relay_key, &challenge, None)
        .unwrap()
        .encode(&mut f)
        .unwrap();
    Frame::RecvPacket {
        src: a.key,
        data: vec![1],
    }
    .encode(&mut f)
    .unwrap();
    s.write_all(&f).await.unwrap();
    drain(s).await;
    assert_eq!(relay.metrics.drops(Drop::UnexpectedFrame), 1);

    // The good clients never noticed.
    assert!(a.client.send(b.key, b"still here"));
    assert_eq!(b.next_packet().await, (a.key, b"still here".to_vec()));
    assert_eq!(relay.client_count(), 2);
}

#[tokio::test]
async fn a_slow_reader_does_not_stall_others_and_disco_gets_through() {
    let (relay, url) = start(Admission::Open, 1 << 30).await;
    let a = Peer::connect(&url).await;
    let mut b = Peer::connect(&url).await;
    let mut c = Peer::connect(&url).await;

    // A client that proves its key, then never reads.
    let secret = StaticSecret::random_from_rng(OsRng);
    let stuck_key = PublicKey::from(&secret).to_bytes();
    let (mut stuck, relay_key, challenge) = raw(&url).await;
    let mut f = Vec::new();
    crate::proto::handshake::seal(&secret, &relay_key, &challenge, None)
        .unwrap()
        .encode(&mut f)
        .unwrap();
    stuck.write_all(&f).await.unwrap();
    wait_for("stuck admitted", || relay.client_count() == 4).await;

    // Flood it far past what its socket and queue hold.
    let payload = vec![0x04u8; 1200];
    for _ in 0..20_000 {
        while !a.client.send(stuck_key, &payload) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    wait_for("queue-full drops", || {
        relay.metrics.drops(Drop::QueueFull) > 0
    })
    .await;

    // Meanwhile b and c talk normally.
    for i in 0..50u8 {
        assert!(b.client.send(c.key, &[i]));
        assert_eq!(c.next_packet().await, (b.key, vec![i]));
    }
    let mut disco = platform::disco::MAGIC.to_vec();
    disco.extend_from_slice(b"ping");
    assert!(c.client.send(b.key, &disco));
    assert_eq!(b.next_packet().await, (c.key, disco));
    drop(stuck);
}

/// A coordinator stand-in answering admission checks: the keys it knows,
/// with their network ids. It counts the questions it was asked, and takes
/// `delay` to answer each.
pub(super) struct FakeCoordinator {
    pub(super) url: String,
    pub(super) asked: Arc<std::sync::atomic::AtomicUsize>,
}

pub(super) async fn fake_coordinator_with(
    known: Vec<(Key, i64)>,
    delay: Duration,
) -> FakeCoordinator {
    use axum::extract::Path;
    use axum::http::StatusCode;
    use axum::response::IntoResponse as _;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let known: std::collections::HashMap<String, i64> = known
        .into_iter()
        .map(|(k, n)| (platform::keys::NodePublic::from_bytes(k).to_string(), n))
        .collect();
    let known = Arc::new(known);
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    let app = axum::Router::new().route(
        "/api/v1/relay/admit/{key}",
        axum::routing::get(move |Path(key): Path<String>| {
            let known = known.clone();
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(delay).await;
                match known.get(&key) {
                    Some(id) => axum::Json(serde_json::json!({
                        "network_id": id, "network": format!("n{id}"), "name": "d"
                    }))
                    .into_response(),
                    None => StatusCode::NOT_FOUND.into_response(),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    FakeCoordinator {
        url: format!("http://{addr}"),
        asked,
    }
}

async fn fake_coordinator(known: Key) -> String {
    fake_coordinator_with(vec![(known, 1)], Duration::ZERO)
        .await
        .url
}

#[tokio::test]
async fn admission_asks_the_coordinator() {
    let secret = StaticSecret::random_from_rng(OsRng);
    let known = PublicKey::from(&secret).to_bytes();
    let coord = fake_coordinator(known).await;
    let (relay, url) = start(asking(&coord), 1 << 30).await;

    let (tx, mut events) = mpsc::channel(16);
    let _ok = RelayClient::spawn(url.clone(), secret, (), tx);
    assert!(matches!(
        events.recv().await.unwrap().1,
        RelayEvent::Connected
    ));

    let (tx, mut events) = mpsc::channel(16);
    let _stranger = RelayClient::spawn(url.clone(), StaticSecret::random_from_rng(OsRng), (), tx);
    match events.recv().await.unwrap().1 {
        RelayEvent::Disconnected { reason } => {
            assert!(reason.contains("admission_denied"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(relay.metrics.drops(Drop::AdmissionDenied) >= 1);

    // Coordinator unreachable: unknown keys are refused.
    let (relay, url) = start(asking("http://127.0.0.1:1"), 1 << 30).await;
    let (tx, mut events) = mpsc::channel(16);
    let _c = RelayClient::spawn(url, StaticSecret::random_from_rng(OsRng), (), tx);
    match events.recv().await.unwrap().1 {
        RelayEvent::Disconnected { reason } => {
            assert!(reason.contains("admission_unavailable"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(relay.metrics.drops(Drop::AdmissionUnavailable), 1);
}

#[tokio::test]
async fn stun_tells_the_client_its_address() {
    let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(http::serve_stun(server));
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.send_to(b"not stun", addr).await.unwrap();
    let tx = [7u8; 12];
    client
        .send_to(&crate::proto::stun::request(&tx), addr)
        .await
        .unwrap();
    let mut buf = [0u8; 200];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), client.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        crate::proto::stun::parse_response(&buf[..n], &tx),
        Some(client.local_addr().unwrap())
    );
}

#[tokio::test]
async fn plain_http_to_the_relay_endpoint_gets_a_json_error() {
    let (_relay, url) = start(Admission::Open, 1 << 30).await;
    let resp = reqwest::get(&url).await.unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::UPGRADE_REQUIRED);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upgrade_required");
}

#[tokio::test]
async fn meshed_relays_forward_one_hop_between_their_clients() {
    let psk = "region-psk-0123456789";
    let (r1, url1) = start_meshed(Admission::Open, 1 << 30, Some(psk)).await;
    let (r2, url2) = start_meshed(Admission::Open, 1 << 30, Some(psk)).await;
    tokio::spawn(super::mesh::run_link(r1.clone(), mesh_peer(&url2, &r2)));
    tokio::spawn(super::mesh::run_link(r2.clone(), mesh_peer(&url1, &r1)));

    let mut a = Peer::connect(&url1).await;
    let mut b = Peer::connect(&url2).await;
    // Presence travels over the mesh; then packets do, both ways.
    let mut delivered = false;
    for _ in 0..100 {
        assert!(a.client.send(b.key, b"across"));
        if let Ok(Some((_, RelayEvent::Packet { src, data }))) =
            tokio::time::timeout(Duration::from_millis(50), b.events.recv()).await
        {
            assert_eq!((src, data), (a.key, b"across".to_vec()));
            delivered = true;
            break;
        }
    }
    assert!(delivered, "no packet crossed the mesh");
    assert!(b.client.send(a.key, b"and back"));
    assert_eq!(a.next_packet().await, (b.key, b"and back".to_vec()));
    assert_eq!(r1.client_count(), 1, "mesh links are not clients");
    assert_eq!(r2.client_count(), 1);

    // A relay with the wrong key is refused.
    let (r3, _) = start_meshed(Admission::Open, 1 << 30, Some("another-psk-0123456")).await;
    tokio::spawn(super::mesh::run_link(r3, mesh_peer(&url1, &r1)));
    wait_for("wrong mesh key refused", || {
        r1.metrics.drops(Drop::Unauthenticated) >= 1
    })
    .await;
}

/// `relay`, at `url`, as a mesh peer to link to.
pub(super) fn mesh_peer(url: &str, relay: &Relay) -> super::mesh::MeshPeer {
    super::mesh::MeshPeer {
        target: url.to_owned().into(),
        key: relay.public_key(),
    }
}

/// A private CA and a certificate for 127.0.0.1 signed by it (PEM files in `dir`).
fn private_ca(dir: &std::path::Path) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let (cert_path, key_path) = (dir.join("relay.crt"), dir.join("relay.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (ca.pem(), cert_path, key_path)
}

#[tokio::test]
async fn clients_reach_a_tls_relay_that_chains_to_their_ca() {
    let dir = std::env::temp_dir().join(format!("derp-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ca_pem, cert, key) = private_ca(&dir);
    let config = crate::tls::server_config(&cert, &key).unwrap();
    let relay = relay_with(Admission::Open, 1 << 30, None, ConnLimits::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/derp", listener.local_addr().unwrap());
    tokio::spawn(http::serve(listener, relay.clone(), Some(config)));

    let target = crate::client::RelayTarget {
        url: url.clone(),
        ca_pem: Some(ca_pem),
    };
    let mut peers = Vec::new();
    for _ in 0..2 {
        let secret = StaticSecret::random_from_rng(OsRng);
        let key = PublicKey::from(&secret).to_bytes();
        let (tx, mut events) = mpsc::channel(16);
        let client = RelayClient::spawn(target.clone(), secret, (), tx);
        match events.recv().await.unwrap().1 {
            RelayEvent::Connected => {}
            other => panic!("{other:?}"),
        }
        peers.push(Peer {
            key,
            client,
            events,
        });
    }
    assert!(peers[0].client.send(peers[1].key, b"over tls"));
    let from = peers[0].key;
    assert_eq!(peers[1].next_packet().await, (from, b"over tls".to_vec()));

    // Without the CA the certificate is not trusted.
    let (tx, mut events) = mpsc::channel(16);
    let _c = RelayClient::spawn(url, StaticSecret::random_from_rng(OsRng), (), tx);
    match events.recv().await.unwrap().1 {
        RelayEvent::Disconnected { reason } => assert!(reason.contains("TLS"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A coordinator stand-in with a revocation stream: admits the keys in
/// `known`; each stream opens with `resync`, then relays what the test sends
/// (`None` closes the stream).
struct RevokingCoordinator {
    url: String,
    known: Arc<std::sync::Mutex<std::collections::HashSet<platform::keys::NodePublic>>>,
    push: tokio::sync::broadcast::Sender<Option<platform::api::RevocationMessage>>,
    /// Batch questions asked (after each resync).
    batches: Arc<std::sync::atomic::AtomicUsize>,
}

async fn revoking_coordinator() -> RevokingCoordinator {
    use axum::extract::ws::{Message, WebSocketUpgrade};
    use axum::extract::Path;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse as _;
    use platform::api::RevocationMessage;
    let known = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let (push, _) = tokio::sync::broadcast::channel::<Option<RevocationMessage>>(64);
    let admit_known = known.clone();
    let stream_push = push.clone();
    let batches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (batch_known, batch_count) = (known.clone(), batches.clone());
    let app = axum::Router::new()
        .route(
            "/api/v1/relay/admit",
            axum::routing::post(move |axum::Json(q): axum::Json<serde_json::Value>| {
                batch_count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let known = batch_known.lock().unwrap().clone();
                async move {
                    let admitted: Vec<_> = q["node_keys"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|k| known.contains(&k.as_str().unwrap().parse().unwrap()))
                        .map(|k| serde_json::json!({"node_key": k, "network_id": 1}))
                        .collect();
                    axum::Json(serde_json::json!({ "admitted": admitted }))
                }
            }),
        )
        .route(
            "/api/v1/relay/admit/{key}",
            axum::routing::get(move |Path(key): Path<String>| {
                let known = admit_known.clone();
                async move {
                    let key: platform::keys::NodePublic = key.parse().unwrap();
                    if known.lock().unwrap().contains(&key) {
                        axum::Json(serde_json::json!({"network_id": 1})).into_response()
                    } else {
                        StatusCode::NOT_FOUND.into_response()
                    }
                }
            }),
        )
        .route(
            "/api/v1/relay/revocations",
            axum::routing::get(move |headers: HeaderMap, ws: WebSocketUpgrade| {
                let mut rx = stream_push.subscribe();
                async move {
                    if headers.get("authorization").and_then(|v| v.to_str().ok())
                        != Some("Bearer t")
                    {
                        return StatusCode::UNAUTHORIZED.into_response();
                    }
                    ws.on_upgrade(move |mut socket| async move {
                        let mut next = Some(RevocationMessage::Resync);
                        while let Some(msg) = next {
                            let text = serde_json::to_string(&msg).unwrap();
                            if socket.send(Message::Text(text.into())).await.is_err() {
                                return;
                            }
                            next = rx.recv().await.ok().flatten();
                        }
                    })
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    RevokingCoordinator {
        url: format!("http://{addr}"),
        known,
        push,
        batches,
    }
}

impl RevokingCoordinator {
    /// A device the coordinator knows, connected to the relay at `url`.
    async fn device(&self, url: &str) -> Peer {
        let secret = StaticSecret::random_from_rng(OsRng);
        let key = PublicKey::from(&secret).to_bytes();
        self.known
            .lock()
            .unwrap()
            .insert(platform::keys::NodePublic::from_bytes(key));
        let (tx, events) = mpsc::channel(64);
        let client = RelayClient::spawn(url.to_owned(), secret, (), tx);
        let mut p = Peer {
            key,
            client,
            events,
        };
        match p.next().await {
            RelayEvent::Connected => p,
            other => panic!("not connected: {other:?}"),
        }
    }

    /// The coordinator forgets `key`; `push` says so on the stream.
    fn forget(&self, key: Key, push: bool) {
        let key = platform::keys::NodePublic::from_bytes(key);
        self.known.lock().unwrap().remove(&key);
        if push {
            let msg = platform::api::RevocationMessage::Revoked { node_key: key };
            self.push.send(Some(msg)).unwrap();
        }
    }
}

/// The next disconnection of `p`, within `within`; other events are skipped.
async fn disconnected(p: &mut Peer, within: Duration) -> String {
    tokio::time::timeout(within, async {
        loop {
            match p.events.recv().await.expect("open").1 {
                RelayEvent::Disconnected { reason } => return reason,
                _ => continue,
            }
        }
    })
    .await
    .expect("disconnected in time")
}

#[tokio::test]
async fn revoked_clients_are_evicted_at_once() {
    use std::sync::atomic::Ordering;
    let coord = revoking_coordinator().await;
    let (relay, url) = start(asking(&coord.url), 1 << 30).await;
    let _stream = tokio::spawn(super::revocations::run(relay.clone()));
    wait_for("the revocation stream", || {
        relay.metrics.revocation_stream_up.get() == 1
    })
    .await;

    let mut a = coord.device(&url).await;
    let mut b = coord.device(&url).await;
    assert!(b.client.send(a.key, b"before"));
    assert_eq!(a.next_packet().await, (b.key, b"before".to_vec()));

    // Revoked while its admission is still cached for most of a minute: gone
    // at once, told why, and those it talked to hear it left.
    coord.forget(a.key, true);
    let reason = disconnected(&mut a, Duration::from_secs(2)).await;
    assert!(reason.contains("revoked"), "{reason}");
    match b.next().await {
        RelayEvent::PeerGone { key, reason } => {
            assert_eq!((key, reason), (a.key, GoneReason::Disconnected))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(relay.client_count(), 1);
    assert_eq!(relay.metrics.drops(Drop::Revoked), 1);
    assert_eq!(relay.metrics.revocations.get(), 1);
    assert!(relay.metrics.render().contains("derp_revocations_total 1"));
    // Its client reconnects on its own, and is refused.
    let reason = disconnected(&mut a, Duration::from_secs(5)).await;
    assert!(reason.contains("admission_denied"), "{reason}");

    // A revocation the relay missed (the stream dropped): the reconnect's
    // resync asks again about every connected client.
    coord.push.send(None).unwrap();
    coord.forget(b.key, false);
    let reason = disconnected(&mut b, Duration::from_secs(5)).await;
    assert!(reason.contains("revoked"), "{reason}");
    assert_eq!(relay.client_count(), 0);
    assert_eq!(
        relay.metrics.revocation_resyncs.get(),
        2,
        "one resync per stream"
    );
    assert_eq!(
        coord.batches.load(Ordering::SeqCst),
        1,
        "the connected clients re-checked in one batch question"
    );
    assert_eq!(relay.metrics.drops(Drop::Revoked), 2);
}

#[tokio::test]
async fn open_relays_hold_no_revocation_stream() {
    let (relay, _) = start(Admission::Open, 1 << 30).await;
    tokio::time::timeout(Duration::from_secs(1), super::revocations::run(relay))
        .await
        .expect("returns at once");
}
