//! What the in-process API tests share: a server state on a temporary
//! database, one way to call the router, signed device requests, and a
//! served router with map streams to it.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body as HttpBody;
use axum::http::{Request, StatusCode};
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use platform::api::{Capabilities, ClientMessage, MapHello, RegisterRequest, ServerMessage};
use platform::control_auth::{node_proof, CoordinatorIdentity, FrameVerifier, ProofPurpose};
use platform::keys::{DevicePrivate, DiscoPrivate, NodePrivate};
use platform::people::DeviceCodeRequest;
use platform::signed::{Signed, DOMAIN_DEVICE_CODE, DOMAIN_MAP, DOMAIN_REGISTER};
use platform::unix_now;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tower::ServiceExt;

use super::limits::Limits;
use super::{router, AppState, SharedState};
use crate::clock::Clock;
use crate::hub::Hub;
use crate::store::Store;

/// A server's state on `store`, batching map-stream changes for 10 ms.
pub fn state(store: Store, public_url: Option<&str>) -> SharedState {
    state_with_clock(store, public_url, Clock::System)
}

/// [`state`] reading the time from `clock`.
pub fn state_with_clock(store: Store, public_url: Option<&str>, clock: Clock) -> SharedState {
    build(store, public_url, clock, Limits::unlimited())
}

/// [`state`] with these rate limits (every other test runs without).
pub fn state_with_limits(store: Store, limits: Limits) -> SharedState {
    build(store, None, Clock::System, limits)
}

fn build(store: Store, public_url: Option<&str>, clock: Clock, limits: Limits) -> SharedState {
    Arc::new(AppState {
        store,
        hub: Hub::new(Duration::from_secs(20)),
        clock,
        limits,
        batch_window: Duration::from_millis(10),
        relay_map: Default::default(),
        tls: false,
        public_url: public_url.map(str::to_owned),
        identity: Arc::new(IDENTITY.clone()),
        policies: Default::default(),
        base_domain: crate::api::DEFAULT_BASE_DOMAIN.into(),
    })
}

/// Calls the router as the holder of `token` with a raw body; returns the
/// status and the body as JSON (or as a JSON string when it is not JSON).
pub async fn call(
    state: &SharedState,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<String>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req
        .header("content-type", "application/json")
        .body(body.map(HttpBody::from).unwrap_or_else(HttpBody::empty))
        .unwrap();
    let resp = router(state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, value)
}

/// A registration signed by `dev`, as JSON text.
pub fn register_body(
    dev: &DevicePrivate,
    node: &NodePrivate,
    auth_key: &str,
    host: &str,
    ts: u64,
) -> String {
    let req = RegisterRequest {
        timestamp: ts,
        auth_key: auth_key.into(),
        node_key: node.public(),
        disco_key: DiscoPrivate::generate().public(),
        hostname: host.into(),
        os: "linux".into(),
        capabilities: Capabilities {
            cpu_cores: 2,
            arch: "x86_64".into(),
            ram_bytes: 1 << 30,
            ..Default::default()
        },
        network: None,
        node_proof: node_proof(
            ProofPurpose::Register,
            node,
            &IDENTITY.info().proof_key,
            &dev.public(),
            ts,
        )
        .unwrap(),
    };
    serde_json::to_string(&Signed::sign(dev, DOMAIN_REGISTER, &req)).unwrap()
}

/// A device-code request signed by `dev`: a start (no code) or a poll.
pub fn device_code_body(dev: &DevicePrivate, host: &str, code: Option<&str>) -> Value {
    let req = DeviceCodeRequest {
        timestamp: unix_now(),
        hostname: host.into(),
        code: code.map(str::to_owned),
    };
    serde_json::to_value(Signed::sign(dev, DOMAIN_DEVICE_CODE, &req)).unwrap()
}

/// A map stream (WebSocket) to a served router, checking the coordinator's
/// signature on every message after the challenge.
pub struct Ws {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    verifier: Option<FrameVerifier>,
}

impl Ws {
    /// Connects; nothing is read or sent yet.
    pub async fn connect(addr: std::net::SocketAddr) -> Ws {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/api/v1/map"))
            .await
            .unwrap();
        Ws { ws, verifier: None }
    }

    pub async fn send(
        &mut self,
        msg: Message,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        self.ws.send(msg).await
    }

    pub async fn close(&mut self) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        self.ws.close(None).await
    }

    /// The next frame as it comes, unchecked.
    pub async fn next(&mut self) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>> {
        self.ws.next().await
    }

    /// The raw text of the next message, within 5 s.
    pub async fn next_text(&mut self) -> String {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(5), self.ws.next())
                .await
                .expect("message in time")
                .unwrap()
                .unwrap();
            if let Message::Text(t) = msg {
                return t.to_string();
            }
        }
    }

    /// Reads the challenge; returns its nonce.
    pub async fn challenge(&mut self) -> String {
        let text = self.next_text().await;
        let Ok(ServerMessage::Challenge { nonce }) = serde_json::from_str(&text) else {
            panic!("challenge expected, got {text}")
        };
        self.verifier = Some(FrameVerifier::new(IDENTITY.public(), nonce.clone()));
        nonce
    }
}

/// The proof that `dev` holds `new` in a key rotation signed at `ts`.
pub fn rotate_proof(dev: &DevicePrivate, new: &NodePrivate, ts: u64) -> String {
    node_proof(
        ProofPurpose::RotateKey,
        new,
        &IDENTITY.info().proof_key,
        &dev.public(),
        ts,
    )
    .unwrap()
}

/// The identity every test server speaks as.
pub static IDENTITY: std::sync::LazyLock<CoordinatorIdentity> =
    std::sync::LazyLock::new(CoordinatorIdentity::generate);

/// Serves the router on a loopback port for as long as the test runs.
pub async fn serve(state: &SharedState) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Opens a map stream as `dev` with node key `node`: the challenge read,
/// the signed hello sent.
pub async fn open_stream(
    addr: std::net::SocketAddr,
    dev: &DevicePrivate,
    node: &NodePrivate,
) -> Ws {
    open_stream_as(addr, dev, node, false).await
}

/// [`open_stream`], asking for a large full netmap in pieces (as meshd
/// does) when `pieces`.
pub async fn open_stream_as(
    addr: std::net::SocketAddr,
    dev: &DevicePrivate,
    node: &NodePrivate,
    pieces: bool,
) -> Ws {
    let mut ws = Ws::connect(addr).await;
    let nonce = ws.challenge().await;
    let hello = Signed::sign(
        dev,
        DOMAIN_MAP,
        &MapHello {
            timestamp: unix_now(),
            node_key: node.public(),
            disco_key: DiscoPrivate::generate().public(),
            nonce,
            full_in_pieces: pieces,
        },
    );
    ws.send(Message::text(
        serde_json::to_string(&ClientMessage::Hello { hello }).unwrap(),
    ))
    .await
    .unwrap();
    ws
}

/// The next message on a map stream, within 5 s: a signed one opened (and
/// its signature and place checked), a challenge taken note of.
/// The next message of a map stream other than a packet-filter update
/// (those come whenever the devices a filter names change; tests of them
/// read [`next_msg_any`]).
pub async fn next_msg(ws: &mut Ws) -> ServerMessage {
    loop {
        match next_msg_any(ws).await {
            ServerMessage::Filter { .. } => {}
            other => return other,
        }
    }
}

/// The next message of a map stream, verified and unwrapped.
pub async fn next_msg_any(ws: &mut Ws) -> ServerMessage {
    loop {
        let text = ws.next_text().await;
        let msg: ServerMessage = serde_json::from_str(&text).unwrap();
        match msg {
            ServerMessage::Challenge { nonce } => {
                ws.verifier = Some(FrameVerifier::new(IDENTITY.public(), nonce));
            }
            ServerMessage::Signed { frame } => {
                let verifier = ws
                    .verifier
                    .as_mut()
                    .expect("a signed message before the challenge");
                let payload = verifier
                    .open(&frame)
                    .expect("signed by the coordinator, in order");
                return serde_json::from_str(payload).unwrap();
            }
            other => return other,
        }
    }
}
