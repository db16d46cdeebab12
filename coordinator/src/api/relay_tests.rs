//! In-process tests of the relay revocation stream: who may open it, and what
//! relays hear on it.

use std::time::Duration;

use axum::body::Body as HttpBody;
use axum::http::{Request, StatusCode};
use futures_util::StreamExt as _;
use http_body_util::BodyExt as _;
use platform::api::{ApiError, RevocationMessage};
use platform::keys::{NodePrivate, NodePublic};
use platform::unix_now;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;
use tower::ServiceExt as _;

use crate::api::{router, SharedState};
use crate::store::test_store;

const PATH: &str = "/api/v1/relay/revocations";

struct Coordinator {
    state: SharedState,
    admin_token: String,
    relay_token: String,
    _dir: tempfile::TempDir,
}

async fn coordinator() -> Coordinator {
    let (store, dir) = test_store().await;
    let admin_token = store.init(unix_now()).await.unwrap();
    let relay_token = store.create_relay_token("r1", unix_now()).await.unwrap();
    let state = super::test_support::state(store, None);
    Coordinator {
        state,
        admin_token,
        relay_token,
        _dir: dir,
    }
}

/// A plain (not upgraded) request to the stream, with this bearer token.
async fn plain_get(c: &Coordinator, token: Option<&str>) -> (StatusCode, ApiError) {
    let mut req = Request::builder().uri(PATH);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = router(c.state.clone())
        .oneshot(req.body(HttpBody::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not a JSON error: {e}: {bytes:?}"));
    (status, body)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn serve(c: &Coordinator) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(c.state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

async fn open(
    addr: std::net::SocketAddr,
    token: &str,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut req = format!("ws://{addr}{PATH}").into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

async fn next(ws: &mut Ws) -> RevocationMessage {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("message in time")
            .expect("stream open")
            .unwrap();
        if let Message::Text(t) = msg {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

fn key(i: u32) -> NodePublic {
    let mut b = [0u8; 32];
    b[..4].copy_from_slice(&i.to_be_bytes());
    NodePublic::from_bytes(b)
}

#[tokio::test]
async fn revocation_stream_wants_a_relay_token() {
    let c = coordinator().await;
    for (token, why) in [
        (None, "no token"),
        (Some("relaytok-nope"), "unknown token"),
        (
            Some(c.admin_token.as_str()),
            "admin tokens are not relay tokens",
        ),
    ] {
        let (status, body) = plain_get(&c, token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{why}");
        assert_eq!(body.error.code, "unauthorized", "{why}");
    }
    // The right token but no WebSocket upgrade: a JSON error, not a hang.
    let (status, body) = plain_get(&c, Some(&c.relay_token)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.error.message.contains("WebSocket"), "{body:?}");

    // Over the wire, a bad token fails the upgrade itself.
    let addr = serve(&c).await;
    match open(addr, "relaytok-nope").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED)
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("opened with a bad token"),
    }
}

#[tokio::test]
async fn relays_hear_revocations_at_once() {
    let c = coordinator().await;
    let addr = serve(&c).await;
    let mut ws = open(addr, &c.relay_token).await.unwrap();
    assert_eq!(
        next(&mut ws).await,
        RevocationMessage::Resync,
        "the stream opens by flushing what the relay cached before it"
    );
    let revoked = NodePrivate::generate().public();
    c.state.hub.revoke_relay_access(revoked);
    assert_eq!(
        next(&mut ws).await,
        RevocationMessage::Revoked { node_key: revoked }
    );

    // Every open stream hears every revocation.
    let mut second = open(addr, &c.relay_token).await.unwrap();
    assert_eq!(next(&mut second).await, RevocationMessage::Resync);
    c.state.hub.revoke_relay_access(key(1));
    for ws in [&mut ws, &mut second] {
        assert_eq!(
            next(ws).await,
            RevocationMessage::Revoked { node_key: key(1) }
        );
    }
}

#[tokio::test]
async fn a_relay_that_falls_behind_is_told_to_resync() {
    let c = coordinator().await;
    let addr = serve(&c).await;
    let mut ws = open(addr, &c.relay_token).await.unwrap();
    assert_eq!(next(&mut ws).await, RevocationMessage::Resync);
    // Published without yielding (this test's runtime has one thread), so
    // the stream's task falls behind the hub's backlog before it runs.
    let total = 3000;
    for i in 0..total {
        c.state.hub.revoke_relay_access(key(i));
    }
    assert_eq!(
        next(&mut ws).await,
        RevocationMessage::Resync,
        "the lost keys are unknown: the relay must flush everything"
    );
    // Then the keys still in the backlog, in order, ending with the last.
    let RevocationMessage::Revoked { node_key: first } = next(&mut ws).await else {
        panic!("revocations resume after the resync")
    };
    assert_ne!(first, key(0), "the oldest were lost");
    let mut last = first;
    while last != key(total - 1) {
        match next(&mut ws).await {
            RevocationMessage::Revoked { node_key } => last = node_key,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Registers a device with `node` in a new network `name`.
async fn device_in_new_network(c: &Coordinator, name: &str, node: &NodePrivate) {
    use super::test_support::{call, register_body};
    use platform::keys::DevicePrivate;
    let (s, v) = call(
        &c.state,
        Some(&c.admin_token),
        "POST",
        "/api/v1/networks",
        Some(serde_json::json!({ "name": name }).to_string()),
    )
    .await;
    assert!(s.is_success(), "{v}");
    let (s, v) = call(
        &c.state,
        Some(&c.admin_token),
        "POST",
        &format!("/api/v1/networks/{name}/preauth-keys"),
        Some(serde_json::json!({ "reusable": true }).to_string()),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let auth = v["key"].as_str().unwrap().to_owned();
    let body = register_body(&DevicePrivate::generate(), node, &auth, name, unix_now());
    let (s, v) = call(&c.state, None, "POST", "/api/v1/register", Some(body)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn admission_answers_say_which_network_a_key_is_in() {
    use super::test_support::call;
    let c = coordinator().await;
    let (a, b) = (NodePrivate::generate(), NodePrivate::generate());
    device_in_new_network(&c, "alpha", &a).await;
    device_in_new_network(&c, "beta", &b).await;
    let mut ids = Vec::new();
    for (node, name) in [(&a, "alpha"), (&b, "beta")] {
        let path = format!("/api/v1/relay/admit/{}", node.public());
        let (s, v) = call(&c.state, Some(&c.relay_token), "GET", &path, None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["network"], name);
        ids.push(v["network_id"].as_i64().expect("a numeric network id"));
    }
    assert_ne!(ids[0], ids[1], "relays tell the networks apart by id");
}

#[tokio::test]
async fn relays_ask_about_many_keys_at_once() {
    use super::test_support::call;
    let c = coordinator().await;
    let (a, b) = (NodePrivate::generate(), NodePrivate::generate());
    device_in_new_network(&c, "alpha", &a).await;
    device_in_new_network(&c, "beta", &b).await;
    let stranger = NodePrivate::generate().public();
    let ask = |keys: Vec<String>, token: String| {
        let state = c.state.clone();
        async move {
            let body = serde_json::json!({ "node_keys": keys }).to_string();
            call(
                &state,
                Some(&token),
                "POST",
                "/api/v1/relay/admit",
                Some(body),
            )
            .await
        }
    };
    let keys = vec![
        a.public().to_string(),
        stranger.to_string(),
        b.public().to_string(),
    ];
    let (s, v) = ask(keys.clone(), c.relay_token.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let admitted = v["admitted"].as_array().unwrap();
    let named: Vec<&str> = admitted
        .iter()
        .map(|k| k["node_key"].as_str().unwrap())
        .collect();
    assert_eq!(
        named,
        [keys[0].as_str(), keys[2].as_str()],
        "not the stranger"
    );
    assert_ne!(admitted[0]["network_id"], admitted[1]["network_id"]);

    // Only relays may ask; bad questions get precise JSON errors.
    let (s, v) = ask(keys.clone(), c.admin_token.clone()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    let (s, v) = ask(vec!["nodekey:zz".into()], c.relay_token.clone()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("node_keys[0]"),
        "{v}"
    );
    let many = vec![stranger.to_string(); super::relay::MAX_ADMIT_BATCH + 1];
    let (s, v) = ask(many, c.relay_token.clone()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["code"], "bad_request");
    let (s, _) = ask(
        vec![stranger.to_string(); super::relay::MAX_ADMIT_BATCH],
        c.relay_token.clone(),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "a full batch fits the body limit");
}
