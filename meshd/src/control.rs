//! The coordinator client: registration, and the map stream that keeps the
//! engine's peers current (full netmap, then deltas; heartbeats and endpoint
//! updates upstream; reconnects with backoff).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::{SinkExt as _, StreamExt as _};
use platform::api::{
    ApiError, Capabilities, ClientMessage, MapHello, RegisterRequest, RegisterResponse,
    ServerMessage, HEARTBEAT_INTERVAL_SECS,
};
use platform::control_auth::{node_proof, CoordinatorInfo, FrameVerifier, ProofPurpose};
use platform::keys::{CoordinatorPublic, NodePublic};
use platform::netmap::NetMap;
use platform::signed::{Signed, DOMAIN_MAP, DOMAIN_REGISTER};
use platform::unix_now;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::Connector;

use crate::engine::EngineSlot;
use crate::key_expiry;
use crate::keyring::KeyRing;
use crate::netcheck;
use crate::state::Keys;

/// How often local addresses are checked for changes.
const ENDPOINT_CHECK: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long the coordinator may take to answer a hello.
const HELLO_WAIT: Duration = Duration::from_secs(15);
/// Longest sleep before peer key expiries are looked at again (the wall
/// clock may jump).
const EXPIRY_RECHECK: Duration = Duration::from_secs(3600);

fn base_url(coordinator: &str) -> String {
    coordinator.trim_end_matches('/').to_owned()
}

/// Whom meshd trusts to be the coordinator: the public web roots (compiled
/// in by `webpki-roots`, so the same on every host, container and phone),
/// plus the private CA in `ca_file` if given. Read on every connection, so a
/// replaced CA file takes effect at the next reconnect.
fn coordinator_tls(
    ca_file: Option<&Path>,
) -> anyhow::Result<Arc<platform::tls::rustls::ClientConfig>> {
    let ca = ca_file
        .map(|p| std::fs::read(p).with_context(|| format!("reading the CA file {}", p.display())))
        .transpose()?;
    platform::tls::client_config(ca.as_deref()).context("the coordinator CA file")
}

/// The HTTP client for every request meshd makes to the coordinator (TLS
/// trust as in [`coordinator_tls`]); build each one here.
pub fn coordinator_http(ca_file: Option<&Path>) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .use_preconfigured_tls(Arc::unwrap_or_clone(coordinator_tls(ca_file)?))
        .build()
        .context("building the coordinator HTTP client")
}

/// Whether `e` is, or wraps in `io::Error`s, rustls rejecting a certificate.
fn is_rejected_certificate(mut e: &(dyn std::error::Error + 'static)) -> bool {
    use platform::tls::rustls;
    loop {
        if let Some(rustls::Error::InvalidCertificate(_)) = e.downcast_ref() {
            return true;
        }
        // An io::Error hides the error it wraps from `source()`: look inside.
        match e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            Some(inner) => e = inner,
            None => return false,
        }
    }
}

/// `err`, with what to do about it when it is the coordinator's certificate
/// that was rejected (unknown issuer, wrong name, expired).
pub(crate) fn explain_certificate(err: anyhow::Error, ca_file: Option<&Path>) -> anyhow::Error {
    match (err.chain().any(is_rejected_certificate), ca_file) {
        (false, _) => err,
        (true, None) => err.context(
            "the coordinator's certificate was rejected; if a private CA signed it, \
             pass that CA with --ca-file",
        ),
        (true, Some(ca)) => err.context(format!(
            "the coordinator's certificate was rejected (trusting the public roots and {})",
            ca.display()
        )),
    }
}

/// The coordinator's keys (`GET /api/v1/coordinator`), checked: its proof
/// key signed by its identity key, and that identity the one this device
/// pinned, if it pinned one.
pub async fn coordinator_info(
    http: &reqwest::Client,
    coordinator: &str,
    pin: Option<&CoordinatorPublic>,
) -> anyhow::Result<CoordinatorInfo> {
    let url = format!("{}/api/v1/coordinator", base_url(coordinator));
    let resp = http
        .get(&url)
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await
        .with_context(|| format!("asking {url} who it is"))?;
    anyhow::ensure!(
        resp.status().is_success(),
        "{url} answered {}: not a Crank Mesh coordinator?",
        resp.status()
    );
    let info: CoordinatorInfo = resp
        .json()
        .await
        .with_context(|| format!("reading {url}"))?;
    info.check(pin)?;
    Ok(info)
}

/// Registers this device with the coordinator described by `info` (from
/// [`coordinator_info`], checked against the pin), proving it holds its
/// node key.
pub async fn register(
    http: &reqwest::Client,
    coordinator: &str,
    info: &CoordinatorInfo,
    keys: &Keys,
    auth_key: &str,
    hostname: &str,
    capabilities: Capabilities,
) -> anyhow::Result<RegisterResponse> {
    let timestamp = unix_now();
    let node_proof = node_proof(
        ProofPurpose::Register,
        &keys.node,
        &info.proof_key,
        &keys.device.public(),
        timestamp,
    )
    .context("the coordinator's proof key is unusable")?;
    let req = RegisterRequest {
        timestamp,
        auth_key: auth_key.to_owned(),
        node_key: keys.node.public(),
        disco_key: keys.disco.public(),
        hostname: hostname.to_owned(),
        os: std::env::consts::OS.to_owned(),
        capabilities,
        network: None,
        node_proof,
    };
    let body = Signed::sign(&keys.device, DOMAIN_REGISTER, &req);
    post_signed(http, coordinator, "/api/v1/register", &body)
        .await
        .map_err(anyhow::Error::from)
        .context("registering with the coordinator")
}

/// How long one request to the coordinator may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a request to the coordinator failed.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The coordinator answered with an error (`{"error":{code,message}}`).
    #[error("coordinator refused ({status}): {message}")]
    Refused {
        status: reqwest::StatusCode,
        code: String,
        message: String,
    },
    /// No answer, or none that could be read: the request may or may not
    /// have taken effect.
    #[error("no answer from the coordinator at {url}: {source}")]
    NoAnswer {
        url: String,
        #[source]
        source: reqwest::Error,
    },
}

impl CoordinatorError {
    /// The coordinator surely did not act on the request: it answered 4xx,
    /// or the connection never opened. (A 5xx may come after a change was
    /// made; a lost answer says nothing.)
    pub fn not_acted_on(&self) -> bool {
        match self {
            CoordinatorError::Refused { status, .. } => status.is_client_error(),
            CoordinatorError::NoAnswer { source, .. } => source.is_connect(),
        }
    }

    pub fn status(&self) -> Option<reqwest::StatusCode> {
        match self {
            CoordinatorError::Refused { status, .. } => Some(*status),
            CoordinatorError::NoAnswer { .. } => None,
        }
    }
}

/// POSTs a signed body to `path` of the coordinator's API and reads the
/// JSON answer. `http` comes from [`coordinator_http`].
pub async fn post_signed<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    coordinator: &str,
    path: &str,
    body: &Signed,
) -> Result<T, CoordinatorError> {
    let url = format!("{}{path}", base_url(coordinator));
    let no_answer = |source| CoordinatorError::NoAnswer {
        url: url.clone(),
        source,
    };
    let resp = http
        .post(&url)
        .json(body)
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await
        .map_err(no_answer)?;
    let status = resp.status();
    if status.is_success() {
        return resp.json().await.map_err(no_answer);
    }
    let text = resp.text().await.unwrap_or_default();
    let (code, message) = match serde_json::from_str::<ApiError>(&text) {
        Ok(e) => (e.error.code, e.error.message),
        Err(_) => (String::new(), text),
    };
    Err(CoordinatorError::Refused {
        status,
        code,
        message,
    })
}

/// What the map stream shares with the daemon.
#[derive(Default)]
pub struct MapState {
    pub netmap: Option<NetMap>,
    pub connected: bool,
    /// Why the last session ended, if it failed.
    pub last_error: Option<String>,
    /// How many times the coordinator asked for a new node key (an admin
    /// rotated the network's keys); the daemon renews when it grows.
    pub rotate_requests: u64,
}

/// Keeps a map stream open for as long as the task lives.
pub async fn run_map_stream(
    coordinator: String,
    ca_file: Option<PathBuf>,
    pin: CoordinatorPublic,
    keys: Arc<KeyRing>,
    engine: Arc<EngineSlot>,
    state: watch::Sender<MapState>,
    mut caps: watch::Receiver<Capabilities>,
) {
    let mut backoff = Duration::from_millis(500);
    loop {
        match map_session(
            &coordinator,
            ca_file.as_deref(),
            &pin,
            &keys,
            &engine,
            &state,
            &mut caps,
        )
        .await
        {
            Ok(()) => backoff = Duration::from_millis(500),
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::warn!(error = %msg, "map stream");
                state.send_modify(|s| s.last_error = Some(msg));
            }
        }
        state.send_modify(|s| s.connected = false);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Opens the map stream: a hello with the current node key, and with the
/// pending one if the coordinator refuses that (an unsettled rotation, see
/// `keyring.rs`). Returns the stream and its full netmap.
async fn open_stream(
    coordinator: &str,
    ca_file: Option<&Path>,
    pin: &CoordinatorPublic,
    keys: &KeyRing,
) -> anyhow::Result<(Ws, NetMap, FrameVerifier)> {
    let url = format!(
        "{}/api/v1/map",
        base_url(coordinator).replacen("http", "ws", 1)
    );
    let candidates = keys.hello_candidates();
    let current = keys.current();
    let mut refusal = String::new();
    for (i, node) in candidates.iter().enumerate() {
        if i > 0 {
            tracing::info!(node = %node.public().short(), error = %refusal, "current node key refused; trying the pending one");
        }
        let tls = Connector::Rustls(coordinator_tls(ca_file)?);
        let (mut ws, _) =
            tokio_tungstenite::connect_async_tls_with_config(&url, None, false, Some(tls))
                .await
                .map_err(|e| explain_certificate(e.into(), ca_file))
                .with_context(|| format!("connecting to {url}"))?;
        let nonce = match tokio::time::timeout(HELLO_WAIT, next_raw(&mut ws))
            .await
            .map_err(|_| anyhow::anyhow!("no challenge within {HELLO_WAIT:?}"))??
        {
            Some(ServerMessage::Challenge { nonce }) => nonce,
            Some(other) => anyhow::bail!("expected the challenge first, got {other:?}"),
            None => anyhow::bail!("the coordinator closed the stream before its challenge"),
        };
        let mut verifier = FrameVerifier::new(*pin, nonce.clone());
        let hello = Signed::sign(
            &current.device,
            DOMAIN_MAP,
            &MapHello {
                timestamp: unix_now(),
                node_key: node.public(),
                disco_key: current.disco.public(),
                nonce,
                full_in_pieces: true,
            },
        );
        send(&mut ws, &ClientMessage::Hello { hello }).await?;
        let mut partial = None;
        let first = tokio::time::timeout(
            HELLO_WAIT,
            next_message(&mut ws, &mut verifier, &mut partial),
        )
        .await
        .map_err(|_| anyhow::anyhow!("no netmap within {HELLO_WAIT:?}"))??;
        match first {
            Some(ServerMessage::Full { netmap }) => {
                if let Err(e) = keys.settle(&node.public()) {
                    tracing::warn!(error = format!("{e:#}"), "storing the settled node key");
                }
                return Ok((ws, *netmap, verifier));
            }
            Some(ServerMessage::Error { error }) => refusal = error.message,
            Some(other) => anyhow::bail!("expected the netmap first, got {other:?}"),
            None => anyhow::bail!("the coordinator closed the stream before the netmap"),
        }
    }
    anyhow::bail!("coordinator closed the stream: {refusal}")
}

/// The next message of the stream as it came; `None` when it closed.
async fn next_raw(ws: &mut Ws) -> anyhow::Result<Option<ServerMessage>> {
    while let Some(msg) = ws.next().await {
        let text = match msg? {
            Message::Text(t) => t,
            Message::Close(_) => return Ok(None),
            _ => continue,
        };
        return serde_json::from_str(&text)
            .map(Some)
            .context("coordinator sent an invalid message");
    }
    Ok(None)
}

/// The next message after the hello: signed by the pinned coordinator for
/// this stream and its place in it, else the stream is dropped. An unsigned
/// refusal (the hello was not accepted) is passed on as it is: it can only
/// end the stream.
async fn next_piece(
    ws: &mut Ws,
    verifier: &mut FrameVerifier,
) -> anyhow::Result<Option<ServerMessage>> {
    match next_raw(ws).await? {
        None => Ok(None),
        Some(ServerMessage::Signed { frame }) => {
            let payload = verifier
                .open(&frame)
                .context("a map-stream message failed its check")?;
            match serde_json::from_str(payload).context("coordinator sent an invalid message")? {
                ServerMessage::Signed { .. } | ServerMessage::Challenge { .. } => {
                    anyhow::bail!("coordinator sent a nested or late challenge")
                }
                msg => Ok(Some(msg)),
            }
        }
        Some(ServerMessage::Error { error }) => Ok(Some(ServerMessage::Error { error })),
        Some(other) => anyhow::bail!("unsigned map-stream message refused: {other:?}"),
    }
}

/// A full netmap that came in pieces, until its last piece.
type Partial = Option<(Box<NetMap>, u32)>;

/// The next message, a full netmap sent in pieces put back together
/// (returned as one [`ServerMessage::Full`]). The pieces gathered so far
/// live in `partial`, outside the future: it may be dropped between
/// messages (in a `select!`) without losing any.
async fn next_message(
    ws: &mut Ws,
    verifier: &mut FrameVerifier,
    partial: &mut Partial,
) -> anyhow::Result<Option<ServerMessage>> {
    loop {
        let msg = next_piece(ws, verifier).await?;
        match (msg, partial.take()) {
            (Some(ServerMessage::PartialFull { netmap, remaining }), None) => {
                if remaining == 0 {
                    return Ok(Some(ServerMessage::Full { netmap }));
                }
                *partial = Some((netmap, remaining));
            }
            (Some(ServerMessage::Peers { peers }), Some((mut netmap, remaining))) => {
                netmap
                    .peers
                    .extend(peers.into_iter().map(|n| (n.node_key, n)));
                if remaining <= 1 {
                    return Ok(Some(ServerMessage::Full { netmap }));
                }
                *partial = Some((netmap, remaining - 1));
            }
            (Some(ServerMessage::Peers { .. }), None) => {
                anyhow::bail!("coordinator sent peers without a netmap")
            }
            (_, Some(_)) => anyhow::bail!("the stream broke off in the middle of a netmap"),
            (other, None) => return Ok(other),
        }
    }
}

/// Makes `map` describe this device under `key` after a rotation (the
/// coordinator does not send a device its own new record); true if it
/// changed.
fn patch_self(map: &mut NetMap, key: NodePublic, expiry: Option<Option<u64>>) -> bool {
    if map.self_node.node_key == key {
        return false;
    }
    map.peers.remove(&key);
    map.self_node.node_key = key;
    if let Some(expiry) = expiry {
        map.self_node.key_expiry = expiry;
    }
    true
}

async fn map_session(
    coordinator: &str,
    ca_file: Option<&Path>,
    pin: &CoordinatorPublic,
    keys: &KeyRing,
    engine: &EngineSlot,
    state: &watch::Sender<MapState>,
    caps: &mut watch::Receiver<Capabilities>,
) -> anyhow::Result<()> {
    let mut key_changes = keys.subscribe();
    let (mut ws, full, mut verifier) = open_stream(coordinator, ca_file, pin, keys).await?;
    key_changes.mark_unchanged();
    // The key the coordinator accepted (a settled rotation may have changed it).
    engine.set_node_key(&keys.current().node);
    tracing::info!(peers = full.peers.len(), network = %full.network, "netmap received");
    let mut netmap: Option<NetMap> = Some(full);
    let mut apply_now = true;
    // When the next peer key expires: the netmap is applied again then.
    let mut next_expiry: Option<u64> = None;
    let mut reporter = netcheck::Reporter::default();
    // A full netmap (a resync) arriving in pieces.
    let mut partial = None;
    let mut heartbeat = tokio::time::interval(Duration::from_secs(HEARTBEAT_INTERVAL_SECS));
    let mut caps_sent = false;
    let mut endpoint_check = tokio::time::interval(ENDPOINT_CHECK);
    loop {
        if apply_now {
            apply_now = false;
            if let Some(map) = &netmap {
                let now = unix_now();
                let fresh = engine.get().is_none();
                engine.apply(map, now).await?;
                next_expiry = key_expiry::next_peer_expiry(map, now);
                state.send_modify(|s| {
                    s.netmap = Some(map.clone());
                    s.connected = true;
                    s.last_error = None;
                });
                if fresh {
                    // Report endpoints as soon as there is a socket.
                    endpoint_check.reset_immediately();
                }
            }
        }
        let expiry_wait = next_expiry
            .map(|t| Duration::from_secs(t.saturating_sub(unix_now())).min(EXPIRY_RECHECK));
        tokio::select! {
            msg = next_message(&mut ws, &mut verifier, &mut partial) => {
                let Some(msg) = msg? else { return Ok(()) };
                match msg {
                    ServerMessage::Full { netmap: full } => {
                        tracing::info!(peers = full.peers.len(), network = %full.network, "netmap received");
                        netmap = Some(*full);
                    }
                    ServerMessage::Delta { changes } => {
                        let Some(map) = netmap.as_mut() else { anyhow::bail!("delta before the full netmap") };
                        tracing::debug!(changes = changes.len(), "netmap delta");
                        map.apply(&changes);
                    }
                    ServerMessage::Filter { filter } => {
                        let Some(map) = netmap.as_mut() else { anyhow::bail!("filter before the full netmap") };
                        tracing::debug!(rules = filter.rules.len(), "packet filter changed");
                        map.packet_filter = filter;
                    }
                    ServerMessage::Error { error } => anyhow::bail!("coordinator closed the stream: {}", error.message),
                    ServerMessage::Challenge { .. } | ServerMessage::Signed { .. } | ServerMessage::PartialFull { .. } | ServerMessage::Peers { .. } => anyhow::bail!("unexpected message on the map stream"),
                    ServerMessage::RotateKey => {
                        tracing::info!("the coordinator asks for a new node key");
                        state.send_modify(|s| s.rotate_requests += 1);
                        continue;
                    }
                }
                apply_now = true;
            }
            // A rotation: the engine switches at once. A pending key means
            // the coordinator's answer was lost: a new hello settles it.
            Ok(()) = key_changes.changed() => {
                let current = key_changes.borrow_and_update().clone();
                if current.pending_node.is_some() {
                    return Ok(());
                }
                let node = current.node.public();
                engine.set_node_key(&current.node);
                if let Some(map) = netmap.as_mut() {
                    if patch_self(map, node, keys.rotated_expiry(&node)) {
                        apply_now = true;
                    }
                }
            }
            _ = tokio::time::sleep(expiry_wait.unwrap_or(EXPIRY_RECHECK)), if expiry_wait.is_some() => {
                tracing::debug!("a peer key expired; applying the netmap again");
                apply_now = true;
            }
            // Every heartbeat of a new session carries the report once;
            // after that only changes do, as soon as they happen.
            _ = heartbeat.tick() => {
                let report = (!caps_sent).then(|| caps.borrow_and_update().clone());
                caps_sent = true;
                send(&mut ws, &ClientMessage::Heartbeat { capabilities: report }).await?;
            }
            Ok(()) = caps.changed(), if caps_sent => {
                let report = caps.borrow_and_update().clone();
                send(&mut ws, &ClientMessage::Heartbeat { capabilities: Some(report) }).await?;
            }
            // The engine's measurements decide what the coordinator hears.
            _ = endpoint_check.tick() => {
                let (Some(map), Some(e)) = (&netmap, engine.get()) else { continue };
                let findings = reporter.check(&e, map).await;
                if let Some(retry) = findings.retry_in {
                    endpoint_check.reset_after(retry);
                }
                for message in &findings.messages {
                    send(&mut ws, message).await?;
                }
            }
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn send(ws: &mut Ws, msg: &ClientMessage) -> anyhow::Result<()> {
    ws.send(Message::text(serde_json::to_string(msg)?))
        .await
        .context("writing to the map stream")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    /// A server on 127.0.0.1 with a certificate from a private CA no client
    /// here trusts; it only ever handshakes. Returns its address.
    async fn untrusted_server() -> SocketAddr {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let config =
            platform::tls::server_config(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
                .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = acceptor.accept(tcp).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn an_untrusted_certificate_says_to_pass_the_ca() {
        let addr = untrusted_server().await;
        let err = coordinator_http(None)
            .unwrap()
            .get(format!("https://{addr}/"))
            .send()
            .await
            .unwrap_err();
        let msg = format!("{:#}", explain_certificate(err.into(), None));
        assert!(msg.contains("--ca-file"), "{msg}");

        // The map stream's WebSocket, the same.
        let tls = Connector::Rustls(coordinator_tls(None).unwrap());
        let url = format!("wss://{addr}/api/v1/map");
        let err = tokio_tungstenite::connect_async_tls_with_config(url, None, false, Some(tls))
            .await
            .unwrap_err();
        let msg = format!("{:#}", explain_certificate(err.into(), None));
        assert!(msg.contains("--ca-file"), "{msg}");

        // Other errors pass through as they are.
        let other = explain_certificate(anyhow::anyhow!("connection refused"), None);
        assert_eq!(format!("{other:#}"), "connection refused");
    }

    /// A map-stream server that challenges, takes any hello, and answers
    /// with `answer(nonce)` as its next frame.
    async fn map_server(answer: fn(&str) -> Vec<String>) -> String {
        use axum::extract::ws::{Message as AxMessage, WebSocketUpgrade};
        let app = axum::Router::new().route(
            "/api/v1/map",
            axum::routing::get(move |ws: WebSocketUpgrade| async move {
                ws.on_upgrade(move |mut socket| async move {
                    let nonce = platform::control_auth::new_nonce();
                    let challenge = ServerMessage::Challenge {
                        nonce: nonce.clone(),
                    };
                    let text = serde_json::to_string(&challenge).unwrap();
                    let _ = socket.send(AxMessage::Text(text.into())).await;
                    let _hello = socket.recv().await;
                    for text in answer(&nonce) {
                        let _ = socket.send(AxMessage::Text(text.into())).await;
                    }
                    let _ = socket.recv().await;
                })
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    fn node(id: i64) -> platform::netmap::Node {
        platform::netmap::Node {
            id,
            name: format!("d{id}"),
            kind: platform::netmap::NodeKind::Mesh,
            node_key: platform::keys::NodePrivate::generate().public(),
            disco_key: None,
            addresses: vec![std::net::IpAddr::from([100, 64, 0, 1])],
            endpoints: vec![],
            online: true,
            os: "linux".into(),
            home_region: None,
            capabilities: None,
            owner: None,
            key_expiry: None,
            device_key: None,
            owner_role: None,
            tags: Vec::new(),
        }
    }

    /// A netmap of this device and `peers` others.
    fn netmap_with(peers: i64) -> NetMap {
        NetMap {
            network: "home".into(),
            self_node: node(1),
            routes: vec![],
            peers: (2..peers + 2)
                .map(|i| {
                    let n = node(i);
                    (n.node_key, n)
                })
                .collect(),
            relay_map: Default::default(),
            dns: Default::default(),
            awaiting_approval: false,
            packet_filter: Default::default(),
            compute: Default::default(),
        }
    }

    fn full_netmap() -> String {
        serde_json::to_string(&ServerMessage::Full {
            netmap: Box::new(netmap_with(0)),
        })
        .unwrap()
    }

    fn trusted() -> &'static platform::control_auth::CoordinatorIdentity {
        static ID: std::sync::LazyLock<platform::control_auth::CoordinatorIdentity> =
            std::sync::LazyLock::new(platform::control_auth::CoordinatorIdentity::generate);
        &ID
    }

    async fn open(url: &str) -> anyhow::Result<NetMap> {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::state::StateDir::open(dir.path()).unwrap();
        let keys = KeyRing::new(state.clone(), state.keys().unwrap());
        open_stream(url, None, &trusted().public(), &keys)
            .await
            .map(|(_, netmap, _)| netmap)
    }

    /// The netmap is taken only when the pinned coordinator signed it for
    /// this stream: signed by another key, for another stream, or not
    /// signed at all, the stream is dropped. (Before pinning, any server
    /// that passed TLS could hand a device its peers.)
    #[tokio::test]
    async fn only_the_pinned_coordinator_gives_a_netmap() {
        let url = map_server(|nonce| {
            let frame = trusted().sign_frame(nonce, 0, full_netmap());
            vec![serde_json::to_string(&ServerMessage::Signed { frame }).unwrap()]
        })
        .await;
        let netmap = open(&url).await.unwrap();
        assert_eq!(netmap.network, "home");

        let url = map_server(|nonce| {
            let other = platform::control_auth::CoordinatorIdentity::generate();
            let frame = other.sign_frame(nonce, 0, full_netmap());
            vec![serde_json::to_string(&ServerMessage::Signed { frame }).unwrap()]
        })
        .await;
        let err = format!("{:#}", open(&url).await.unwrap_err());
        assert!(err.contains("not signed by the coordinator"), "{err}");

        let url = map_server(|_| {
            let stale = platform::control_auth::new_nonce();
            let frame = trusted().sign_frame(&stale, 0, full_netmap());
            vec![serde_json::to_string(&ServerMessage::Signed { frame }).unwrap()]
        })
        .await;
        let err = format!("{:#}", open(&url).await.unwrap_err());
        assert!(err.contains("not signed by the coordinator"), "{err}");

        let url = map_server(|_| vec![full_netmap()]).await;
        let err = format!("{:#}", open(&url).await.unwrap_err());
        assert!(err.contains("unsigned"), "{err}");
    }

    /// Signed messages, in order, for the stream of `nonce`.
    fn signed(nonce: &str, messages: Vec<ServerMessage>) -> Vec<String> {
        messages
            .iter()
            .enumerate()
            .map(|(seq, m)| {
                let frame =
                    trusted().sign_frame(nonce, seq as u64, serde_json::to_string(m).unwrap());
                serde_json::to_string(&ServerMessage::Signed { frame }).unwrap()
            })
            .collect()
    }

    /// A netmap sent in pieces is whole when the stream hands it over; a
    /// stream that breaks off in the middle of one gives none.
    #[tokio::test]
    async fn a_netmap_in_pieces_is_put_back_together() {
        let url =
            map_server(|nonce| signed(nonce, platform::api::full_in_pieces(netmap_with(5), 2)))
                .await;
        let netmap = open(&url).await.unwrap();
        let ids: Vec<i64> = netmap
            .peers
            .values()
            .map(|n| n.id)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(ids, vec![2, 3, 4, 5, 6], "every peer, once");
        assert!(netmap.peers.iter().all(|(k, n)| *k == n.node_key));

        let url = map_server(|nonce| {
            let mut pieces = platform::api::full_in_pieces(netmap_with(5), 2);
            // The last piece replaced by another message.
            pieces.pop();
            pieces.push(ServerMessage::RotateKey);
            signed(nonce, pieces)
        })
        .await;
        let err = format!("{:#}", open(&url).await.unwrap_err());
        assert!(err.contains("middle of a netmap"), "{err}");
    }
}
