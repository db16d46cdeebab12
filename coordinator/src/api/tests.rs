//! In-process API tests against a temporary SQLite database.

use std::time::Duration;

use axum::body::Body as HttpBody;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use platform::api::{
    ApiError, Capabilities, ClientMessage, CreatedPreauthKey, MapHello, RegisterRequest,
    RegisterResponse, ServerMessage, WireguardPeerCreated,
};
use platform::keys::{DevicePrivate, NodePrivate};
use platform::netmap::PeerChange;
use platform::signed::{Signed, DOMAIN_MAP, DOMAIN_REGISTER};
use platform::unix_now;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use tower::ServiceExt;

use super::test_support::{self, next_msg, open_stream, register_body, serve};
use super::{router, SharedState};
use crate::clock::Clock;
use crate::store::test_store;

struct Harness {
    state: SharedState,
    token: String,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn new() -> Self {
        Self::with_clock(Clock::System).await
    }

    async fn with_clock(clock: Clock) -> Self {
        let (store, dir) = test_store().await;
        let token = store.init(clock.now()).await.unwrap();
        let state = test_support::state_with_clock(store, None, clock);
        Harness {
            state,
            token,
            _dir: dir,
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
        admin: bool,
    ) -> (StatusCode, Value) {
        let token = admin.then_some(self.token.as_str());
        test_support::call(&self.state, token, method, path, body).await
    }

    async fn admin(&self, method: &str, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(method, path, Some(body.to_string()), true).await
    }

    async fn network_and_key(&self, key_opts: Value) -> String {
        self.admin("POST", "/api/v1/networks", json!({"name": "home"}))
            .await;
        let (status, v) = self
            .admin("POST", "/api/v1/networks/home/preauth-keys", key_opts)
            .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        serde_json::from_value::<CreatedPreauthKey>(v).unwrap().key
    }
}

fn error_of(v: &Value) -> ApiError {
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("not an API error body: {v} ({e})"))
}

#[tokio::test]
async fn registration_happy_path() {
    let h = Harness::new().await;
    let key = h.network_and_key(json!({"reusable": true})).await;
    let dev = DevicePrivate::generate();
    let node = NodePrivate::generate();
    let (status, v) = h
        .call(
            "POST",
            "/api/v1/register",
            Some(register_body(&dev, &node, &key, "Laptop", unix_now())),
            false,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let resp: RegisterResponse = serde_json::from_value(v).unwrap();
    assert_eq!(resp.name, "laptop");
    assert_eq!(resp.network, "home");
    assert_eq!(resp.addresses[0].to_string(), "100.64.0.1");
    assert!(resp.addresses[1].to_string().starts_with("fd"));

    // Re-registering keeps the addresses; a clash gets a suffix.
    let (_, again) = h
        .call(
            "POST",
            "/api/v1/register",
            Some(register_body(&dev, &node, &key, "Laptop", unix_now())),
            false,
        )
        .await;
    assert_eq!(
        serde_json::from_value::<RegisterResponse>(again)
            .unwrap()
            .addresses,
        resp.addresses
    );
    let (_, other) = h
        .call(
            "POST",
            "/api/v1/register",
            Some(register_body(
                &DevicePrivate::generate(),
                &NodePrivate::generate(),
                &key,
                "laptop",
                unix_now(),
            )),
            false,
        )
        .await;
    assert_eq!(
        serde_json::from_value::<RegisterResponse>(other)
            .unwrap()
            .name,
        "laptop-2"
    );

    let (status, devices) = h
        .admin("GET", "/api/v1/networks/home/devices", json!(null))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(devices.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn registration_rejections_are_precise() {
    let h = Harness::with_clock(Clock::manual(unix_now())).await;
    let one_off = h.network_and_key(json!({})).await;
    let dev = DevicePrivate::generate();
    let node = NodePrivate::generate();

    // Bad signature: body signed by one key, claiming another.
    let mut forged: Value =
        serde_json::from_str(&register_body(&dev, &node, &one_off, "a", unix_now())).unwrap();
    forged["device_key"] = json!(DevicePrivate::generate().public().to_string());
    let (status, v) = h
        .call("POST", "/api/v1/register", Some(forged.to_string()), false)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_of(&v).error.code, "unauthorized");
    assert!(error_of(&v).error.message.contains("signature"), "{v}");

    // Stale timestamp.
    let (status, v) = h
        .call(
            "POST",
            "/api/v1/register",
            Some(register_body(&dev, &node, &one_off, "a", 1000)),
            false,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");

    // Unknown key.
    let (status, v) = h
        .call(
            "POST",
            "/api/v1/register",
            Some(register_body(&dev, &node, "meshkey-nope", "a", unix_now())),
            false,
        )
        .await;
    assert_eq!(
        (status, error_of(&v).error.message.as_str()),
        (StatusCode::UNAUTHORIZED, "unknown auth key")
    );

    // One-off key: first use works, a second device is refused.
    let (status, _) = h
        .call(
            "POST",
            "/api/v1/register",
            Some(register_body(&dev, &node, &one_off, "a", unix_now())),
            false,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, v) = h
        .call(
            "POST",
            "/api/v1/register",
            Some(register_body(
                &DevicePrivate::generate(),
                &NodePrivate::generate(),
                &one_off,
                "b",
                unix_now(),
            )),
            false,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        error_of(&v).error.message.contains("already been used"),
        "{v}"
    );

    // Revoked key.
    let (_, created) = h
        .admin(
            "POST",
            "/api/v1/networks/home/preauth-keys",
            json!({"reusable": true}),
        )
        .await;
    let created: CreatedPreauthKey = serde_json::from_value(created).unwrap();
    let (status, _) = h
        .admin(
            "DELETE",
            &format!("/api/v1/networks/home/preauth-keys/{}", created.info.id),
            json!(null),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, v) = h
        .call(
            "POST",
            "/api/v1/register",
            Some(register_body(
                &DevicePrivate::generate(),
                &NodePrivate::generate(),
                &created.key,
                "c",
                unix_now(),
            )),
            false,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(error_of(&v).error.message.contains("revoked"), "{v}");

    // Expired key: expiry in the past relative to the registration time.
    let (_, created) = h
        .admin(
            "POST",
            "/api/v1/networks/home/preauth-keys",
            json!({"expiry_secs": 1}),
        )
        .await;
    let created: CreatedPreauthKey = serde_json::from_value(created).unwrap();
    let clock = &h.state.clock;
    let (status, _) = h
        .call(
            "POST",
            "/api/v1/register",
            Some(register_body(
                &DevicePrivate::generate(),
                &NodePrivate::generate(),
                &created.key,
                "d0",
                clock.now(),
            )),
            false,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "good until its expiry");
    let (_, created) = h
        .admin(
            "POST",
            "/api/v1/networks/home/preauth-keys",
            json!({"expiry_secs": 1}),
        )
        .await;
    let created: CreatedPreauthKey = serde_json::from_value(created).unwrap();
    clock.advance(1);
    let (status, v) = h
        .call(
            "POST",
            "/api/v1/register",
            Some(register_body(
                &DevicePrivate::generate(),
                &NodePrivate::generate(),
                &created.key,
                "d",
                clock.now(),
            )),
            false,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(error_of(&v).error.message.contains("expired"), "{v}");
}

#[tokio::test]
async fn malformed_requests_get_json_errors() {
    let h = Harness::new().await;
    let (status, v) = h
        .call("POST", "/api/v1/register", Some("{not json".into()), false)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&v).error.code, "bad_request");
    let (status, v) = h
        .call(
            "POST",
            "/api/v1/register",
            Some(json!({"device_key": 5}).to_string()),
            false,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let (status, v) = h
        .admin("POST", "/api/v1/networks", json!({"name": 7}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let (status, v) = h
        .call(
            "POST",
            "/api/v1/networks",
            Some(json!({"name": "x"}).to_string()),
            false,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_of(&v).error.code, "unauthorized");
    let (status, v) = h.admin("GET", "/api/v1/nowhere", json!(null)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    error_of(&v);
    let (status, v) = h.admin("PUT", "/api/v1/networks", json!(null)).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    error_of(&v);
    let (status, v) = h
        .admin(
            "DELETE",
            "/api/v1/networks/home/preauth-keys/abc",
            json!(null),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    error_of(&v);
    let (status, v) = h.call("GET", "/api/v1/map", None, false).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    error_of(&v);
    let huge = format!(
        "{{\"name\":\"{}\"}}",
        "a".repeat(super::MAX_BODY_BYTES + 10)
    );
    let (status, v) = h.call("POST", "/api/v1/networks", Some(huge), true).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    error_of(&v);
    let (status, v) = h
        .admin("POST", "/api/v1/networks/ghost/preauth-keys", json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    error_of(&v);
    let (status, v) = h
        .admin("POST", "/api/v1/networks", json!({"name": "home"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (status, v) = h
        .admin("POST", "/api/v1/networks", json!({"name": "home"}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    let (status, v) = h
        .admin(
            "POST",
            "/api/v1/networks/home/wireguard-peers",
            json!({"name": "r", "public_key": "short"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
}

#[tokio::test]
async fn map_stream_sends_full_map_then_deltas() {
    let h = Harness::new().await;
    let key = h.network_and_key(json!({"reusable": true})).await;
    let addr = serve(&h.state).await;

    let (a_dev, a_node) = (DevicePrivate::generate(), NodePrivate::generate());
    let (b_dev, b_node) = (DevicePrivate::generate(), NodePrivate::generate());
    for (d, n, host) in [(&a_dev, &a_node, "a"), (&b_dev, &b_node, "b")] {
        let (s, v) = h
            .call(
                "POST",
                "/api/v1/register",
                Some(register_body(d, n, &key, host, unix_now())),
                false,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }

    let mut a = open_stream(addr, &a_dev, &a_node).await;
    let first = next_msg(&mut a).await;
    let ServerMessage::Full { netmap } = first else {
        panic!("full map first, got {first:?}")
    };
    assert_eq!(netmap.self_node.name, "a");
    assert_eq!(netmap.peers.len(), 1);
    assert!(!netmap.peers[&b_node.public()].online);
    assert_eq!(netmap.routes.len(), 2);

    // b comes online and reports endpoints: a hears both as deltas.
    let mut b = open_stream(addr, &b_dev, &b_node).await;
    let ServerMessage::Full { .. } = next_msg(&mut b).await else {
        panic!()
    };
    let ep: std::net::SocketAddr = "10.1.2.3:41641".parse().unwrap();
    b.send(Message::text(
        serde_json::to_string(&ClientMessage::Endpoints {
            endpoints: vec![ep],
        })
        .unwrap(),
    ))
    .await
    .unwrap();
    let mut seen = Vec::new();
    // b's hello may also bring an upsert (its new disco key) in its own
    // batch: read until both awaited changes came (next_msg bounds the wait).
    let wanted = |seen: &Vec<PeerChange>| {
        seen.iter()
            .any(|c| matches!(c, PeerChange::Online { online: true, .. }))
            && seen
                .iter()
                .any(|c| matches!(c, PeerChange::Endpoints { .. }))
    };
    while !wanted(&seen) {
        let ServerMessage::Delta { changes } = next_msg(&mut a).await else {
            panic!("delta expected")
        };
        seen.extend(changes);
    }
    assert!(
        seen.contains(&PeerChange::Online {
            node_key: b_node.public(),
            online: true
        }),
        "{seen:?}"
    );
    assert!(
        seen.contains(&PeerChange::Endpoints {
            node_key: b_node.public(),
            endpoints: vec![ep]
        }),
        "{seen:?}"
    );

    // A stock WireGuard peer added by the admin appears as an upsert.
    let wg_key = NodePrivate::generate().public();
    let (s, v) = h
        .admin(
            "POST",
            "/api/v1/networks/home/wireguard-peers",
            json!({"name": "router", "public_key": wg_key.to_base64()}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let created: WireguardPeerCreated = serde_json::from_value(v).unwrap();
    assert!(created
        .wg_quick_config
        .contains(&format!("PublicKey = {}", a_node.public().to_base64())));
    assert!(created
        .wg_quick_config
        .contains("Endpoint = 10.1.2.3:41641"));
    let ServerMessage::Delta { changes } = next_msg(&mut a).await else {
        panic!()
    };
    assert!(
        matches!(&changes[0], PeerChange::Upsert { node } if node.node_key == wg_key),
        "{changes:?}"
    );

    // A capability report in b's heartbeat reaches a and the admin API.
    let mut caps = Capabilities {
        cpu_cores: 8,
        arch: "aarch64".into(),
        ram_bytes: 16 << 30,
        ..Default::default()
    };
    caps.tier = caps.derive_tier("linux");
    b.send(Message::text(
        serde_json::to_string(&ClientMessage::Heartbeat {
            capabilities: Some(caps.clone()),
        })
        .unwrap(),
    ))
    .await
    .unwrap();
    let ServerMessage::Delta { changes } = next_msg(&mut a).await else {
        panic!()
    };
    assert!(
        matches!(&changes[..], [PeerChange::Upsert { node }] if node.node_key == b_node.public() && node.capabilities.as_deref() == Some(&caps)),
        "{changes:?}"
    );
    let (_, devices) = h
        .admin("GET", "/api/v1/networks/home/devices", json!(null))
        .await;
    let reported: Vec<platform::api::DeviceInfo> = serde_json::from_value(devices).unwrap();
    assert!(reported.iter().any(|d| d.node_key == b_node.public()
        && d.capabilities
            .as_ref()
            .is_some_and(|c| c.tier.to_string() == "tier2")));
    // b goes away: a sees it offline.
    b.close().await.unwrap();
    let ServerMessage::Delta { changes } = next_msg(&mut a).await else {
        panic!()
    };
    assert_eq!(
        changes,
        vec![PeerChange::Online {
            node_key: b_node.public(),
            online: false
        }]
    );
}

#[tokio::test]
async fn map_stream_refuses_unknown_devices_and_garbage() {
    let h = Harness::new().await;
    let addr = serve(&h.state).await;

    let mut ws = open_stream(addr, &DevicePrivate::generate(), &NodePrivate::generate()).await;
    let ServerMessage::Error { error } = next_msg(&mut ws).await else {
        panic!("error expected")
    };
    assert_eq!(error.code, "unauthorized");

    let mut ws = test_support::Ws::connect(addr).await;
    ws.send(Message::text("{\"type\":\"heartbeat\""))
        .await
        .unwrap();
    let ServerMessage::Error { error } = next_msg(&mut ws).await else {
        panic!("error expected")
    };
    assert_eq!(error.code, "bad_request");
}

#[tokio::test]
async fn relays_ask_whether_a_node_key_may_connect() {
    let h = Harness::new().await;
    let key = h.network_and_key(json!({"reusable": true})).await;
    let relay_token = h
        .state
        .store
        .create_relay_token("r1", unix_now())
        .await
        .unwrap();
    let node = NodePrivate::generate();
    let (s, _) = h
        .call(
            "POST",
            "/api/v1/register",
            Some(register_body(
                &DevicePrivate::generate(),
                &node,
                &key,
                "a",
                unix_now(),
            )),
            false,
        )
        .await;
    assert_eq!(s, StatusCode::OK);

    let ask = |k: String, token: Option<String>| {
        let mut req = Request::builder().uri(format!("/api/v1/relay/admit/{k}"));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(HttpBody::empty()).unwrap();
        let app = router(h.state.clone());
        async move { app.oneshot(req).await.unwrap().status() }
    };
    assert_eq!(
        ask(node.public().to_string(), Some(relay_token.clone())).await,
        StatusCode::OK
    );
    assert_eq!(
        ask(
            NodePrivate::generate().public().to_string(),
            Some(relay_token.clone())
        )
        .await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        ask("nodekey:zz".into(), Some(relay_token)).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        ask(node.public().to_string(), None).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        ask(node.public().to_string(), Some(h.token.clone())).await,
        StatusCode::UNAUTHORIZED,
        "admin tokens are not relay tokens"
    );
}

/// Approval, rotation and removal as a device's map stream sees them.
#[tokio::test]
async fn map_stream_follows_approval_rotation_and_removal() {
    let h = Harness::new().await;
    let key = h.network_and_key(json!({"reusable": true})).await;
    let addr = serve(&h.state).await;

    let (a_dev, a_node) = (DevicePrivate::generate(), NodePrivate::generate());
    let body = register_body(&a_dev, &a_node, &key, "a", unix_now());
    assert_eq!(
        h.call("POST", "/api/v1/register", Some(body), false)
            .await
            .0,
        StatusCode::OK
    );
    let mut a = open_stream(addr, &a_dev, &a_node).await;
    let ServerMessage::Full { .. } = next_msg(&mut a).await else {
        panic!()
    };

    // A member's device in a network that wants approval: no peers yet.
    let (s, _) = h
        .admin(
            "PATCH",
            "/api/v1/networks/home/settings",
            json!({"require_device_approval": true}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, inv) = h
        .admin(
            "POST",
            "/api/v1/networks/home/invites",
            json!({"role": "member"}),
        )
        .await;
    let secret = inv["secret"].as_str().unwrap();
    let (_, red) = h
        .call(
            "POST",
            &format!("/api/v1/invites/{secret}/redeem"),
            Some(json!({"username": "bob"}).to_string()),
            false,
        )
        .await;
    h.admin(
        "POST",
        "/api/v1/networks/home/members/bob/approve",
        Value::Null,
    )
    .await;
    let bob = red["token"].as_str().unwrap().to_owned();
    let req = Request::builder()
        .method("POST")
        .uri("/api/v1/networks/home/preauth-keys")
        .header("authorization", format!("Bearer {bob}"))
        .header("content-type", "application/json")
        .body(HttpBody::from("{}"))
        .unwrap();
    let resp = router(h.state.clone()).oneshot(req).await.unwrap();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let bob_key = serde_json::from_slice::<CreatedPreauthKey>(&bytes)
        .unwrap()
        .key;
    let (b_dev, b_node) = (DevicePrivate::generate(), NodePrivate::generate());
    let body = register_body(&b_dev, &b_node, &bob_key, "b", unix_now());
    let (s, v) = h.call("POST", "/api/v1/register", Some(body), false).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let b_id = v["device_id"].as_i64().unwrap();
    let mut b = open_stream(addr, &b_dev, &b_node).await;
    let ServerMessage::Full { netmap } = next_msg(&mut b).await else {
        panic!()
    };
    assert!(netmap.awaiting_approval);
    assert!(netmap.peers.is_empty(), "no peers before approval");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), a.next())
            .await
            .is_err(),
        "a hears nothing of an unapproved device"
    );

    // Approved: b gets a fresh full netmap on the same stream, a an upsert.
    let (s, v) = h
        .admin(
            "POST",
            &format!("/api/v1/networks/home/devices/{b_id}/approve"),
            Value::Null,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let ServerMessage::Full { netmap } = next_msg(&mut b).await else {
        panic!("fresh netmap")
    };
    assert!(!netmap.awaiting_approval);
    assert_eq!(netmap.peers.len(), 1);
    let ServerMessage::Delta { changes } = next_msg(&mut a).await else {
        panic!()
    };
    assert!(changes.iter().any(|c| matches!(c, PeerChange::Upsert { node } if node.node_key == b_node.public() && node.owner.as_deref() == Some("bob"))), "{changes:?}");

    // b rotates: a swaps the old key for the new one.
    let b_node2 = NodePrivate::generate();
    let now = unix_now();
    let rotate = platform::people::RotateKeyRequest {
        timestamp: now,
        old_node_key: b_node.public(),
        new_node_key: b_node2.public(),
        node_proof: test_support::rotate_proof(&b_dev, &b_node2, now),
    };
    let body = serde_json::to_string(&Signed::sign(
        &b_dev,
        platform::signed::DOMAIN_ROTATE,
        &rotate,
    ))
    .unwrap();
    let (s, v) = h
        .call("POST", "/api/v1/rotate-key", Some(body), false)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let ServerMessage::Delta { changes } = next_msg(&mut a).await else {
        panic!()
    };
    assert!(
        changes.contains(&PeerChange::Removed {
            node_key: b_node.public()
        }),
        "{changes:?}"
    );
    assert!(
        changes
            .iter()
            .any(|c| matches!(c, PeerChange::Upsert { node } if node.node_key == b_node2.public())),
        "{changes:?}"
    );

    // An admin asks for network-wide rotation: both streams hear it.
    h.admin("POST", "/api/v1/networks/home/rotate-keys", Value::Null)
        .await;
    assert_eq!(next_msg(&mut a).await, ServerMessage::RotateKey);
    assert_eq!(next_msg(&mut b).await, ServerMessage::RotateKey);

    // Revoked: a drops it, b's stream ends with the reason, and b cannot
    // open a new one.
    let (s, _) = h
        .admin(
            "POST",
            &format!("/api/v1/networks/home/devices/{b_id}/revoke"),
            Value::Null,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let ServerMessage::Delta { changes } = next_msg(&mut a).await else {
        panic!()
    };
    assert!(
        changes.contains(&PeerChange::Removed {
            node_key: b_node2.public()
        }),
        "{changes:?}"
    );
    let ServerMessage::Error { error } = next_msg(&mut b).await else {
        panic!("error before close")
    };
    assert!(error.message.contains("revoked"), "{error:?}");
    let mut again = open_stream(addr, &b_dev, &b_node2).await;
    let ServerMessage::Error { error } = next_msg(&mut again).await else {
        panic!()
    };
    assert_eq!(error.code, "forbidden");
}

/// A registration claiming a node key without its private half (someone
/// else's key, seen in a netmap) is refused; so is a proof made for another
/// device key or time. Before node proofs, the first claimant won the key.
#[tokio::test]
async fn registration_proves_the_node_key() {
    let h = Harness::new().await;
    let key = h.network_and_key(json!({"reusable": true})).await;
    let victim_node = NodePrivate::generate();
    let thief = DevicePrivate::generate();
    let now = unix_now();
    let honest: Value = serde_json::from_str(&register_body(
        &thief,
        &NodePrivate::generate(),
        &key,
        "t",
        now,
    ))
    .unwrap();
    let mut req: RegisterRequest =
        serde_json::from_str(honest["payload"].as_str().unwrap()).unwrap();
    // The thief's own valid proof, but for the victim's node key.
    req.node_key = victim_node.public();
    let body = serde_json::to_string(&Signed::sign(&thief, DOMAIN_REGISTER, &req)).unwrap();
    let (status, v) = h.call("POST", "/api/v1/register", Some(body), false).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("node_proof"),
        "{v}"
    );
    // A victim's genuine registration, replayed under the thief's device key.
    let victim_dev = DevicePrivate::generate();
    let genuine: Value =
        serde_json::from_str(&register_body(&victim_dev, &victim_node, &key, "v", now)).unwrap();
    let victim_req: RegisterRequest =
        serde_json::from_str(genuine["payload"].as_str().unwrap()).unwrap();
    let body = serde_json::to_string(&Signed::sign(&thief, DOMAIN_REGISTER, &victim_req)).unwrap();
    let (status, _) = h.call("POST", "/api/v1/register", Some(body), false).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Garbage proof.
    req.node_proof = "not hex".into();
    let body = serde_json::to_string(&Signed::sign(&thief, DOMAIN_REGISTER, &req)).unwrap();
    let (status, _) = h.call("POST", "/api/v1/register", Some(body), false).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The victim itself registers fine.
    let (status, v) = h
        .call("POST", "/api/v1/register", Some(genuine.to_string()), false)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
}

/// A hello captured from one stream opens no other: it signs that stream's
/// nonce. Before the challenge, a hello replayed for 300 s.
#[tokio::test]
async fn a_captured_hello_opens_no_other_stream() {
    let h = Harness::new().await;
    let key = h.network_and_key(json!({"reusable": true})).await;
    let (dev, node) = (DevicePrivate::generate(), NodePrivate::generate());
    let (status, _) = h
        .call(
            "POST",
            "/api/v1/register",
            Some(register_body(&dev, &node, &key, "a", unix_now())),
            false,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let addr = serve(&h.state).await;
    // The genuine stream: its hello is what an eavesdropper captures.
    let mut first = test_support::Ws::connect(addr).await;
    let nonce = first.challenge().await;
    let hello = Signed::sign(
        &dev,
        DOMAIN_MAP,
        &MapHello {
            timestamp: unix_now(),
            node_key: node.public(),
            disco_key: platform::keys::DiscoPrivate::generate().public(),
            nonce,
            full_in_pieces: false,
        },
    );
    let text = serde_json::to_string(&ClientMessage::Hello { hello }).unwrap();
    first.send(Message::text(text.clone())).await.unwrap();
    let ServerMessage::Full { .. } = next_msg(&mut first).await else {
        panic!("the genuine stream gets its netmap")
    };
    // Replayed on a new connection: refused.
    let mut replay = test_support::Ws::connect(addr).await;
    let fresh = replay.challenge().await;
    assert_ne!(fresh, test_support::IDENTITY.public().to_string());
    replay.send(Message::text(text)).await.unwrap();
    let ServerMessage::Error { error } = next_msg(&mut replay).await else {
        panic!("refusal expected")
    };
    assert_eq!(error.code, "unauthorized");
    assert!(error.message.contains("challenge"), "{}", error.message);
}

/// Every message after the hello is signed for its stream and place: the
/// coordinator's info is signed, and `next_msg` checks each signature.
#[tokio::test]
async fn the_coordinator_publishes_its_keys() {
    let h = Harness::new().await;
    let (status, v) = h.call("GET", "/api/v1/coordinator", None, false).await;
    assert_eq!(status, StatusCode::OK);
    let info: platform::control_auth::CoordinatorInfo = serde_json::from_value(v).unwrap();
    assert_eq!(info.coordinator_key, test_support::IDENTITY.public());
    info.check(Some(&test_support::IDENTITY.public())).unwrap();
}

/// Registers a device with `key` and opens its map stream, past the
/// full netmap. Returns its id and the stream.
async fn device_with_stream(
    h: &Harness,
    addr: std::net::SocketAddr,
    key: &str,
    host: &str,
) -> (i64, test_support::Ws) {
    let (dev, node) = (DevicePrivate::generate(), NodePrivate::generate());
    let (s, v) = h
        .call(
            "POST",
            "/api/v1/register",
            Some(register_body(&dev, &node, key, host, unix_now())),
            false,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let mut ws = open_stream(addr, &dev, &node).await;
    let ServerMessage::Full { .. } = next_msg(&mut ws).await else {
        panic!("full netmap first")
    };
    (v["device_id"].as_i64().unwrap(), ws)
}

/// A device that asks for pieces gets a large full netmap as a partial
/// one and the rest of its peers in pieces of `PEERS_PER_PIECE`; one that
/// does not (an older meshd) gets it whole.
#[tokio::test]
async fn a_large_netmap_goes_in_pieces_to_devices_that_take_them() {
    use platform::api::PEERS_PER_PIECE;
    let h = Harness::new().await;
    let key = h.network_and_key(json!({"reusable": true})).await;
    let addr = serve(&h.state).await;
    let devices = PEERS_PER_PIECE + 6;
    let mut keys = Vec::new();
    for i in 0..devices {
        let (dev, node) = (DevicePrivate::generate(), NodePrivate::generate());
        let (s, v) = h
            .call(
                "POST",
                "/api/v1/register",
                Some(register_body(
                    &dev,
                    &node,
                    &key,
                    &format!("d{i}"),
                    unix_now(),
                )),
                false,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        keys.push((dev, node));
    }
    let (dev, node) = &keys[0];
    let mut ws = test_support::open_stream_as(addr, dev, node, true).await;
    let ServerMessage::PartialFull { netmap, remaining } = next_msg(&mut ws).await else {
        panic!("a partial netmap first")
    };
    assert_eq!(netmap.peers.len(), PEERS_PER_PIECE);
    assert_eq!(remaining, 1);
    let ServerMessage::Peers { peers } = next_msg(&mut ws).await else {
        panic!("then the rest of the peers")
    };
    assert_eq!(peers.len(), devices - 1 - PEERS_PER_PIECE);
    let mut all: std::collections::BTreeSet<_> = netmap.peers.keys().copied().collect();
    all.extend(peers.iter().map(|p| p.node_key));
    assert_eq!(all.len(), devices - 1, "every peer once");
    assert!(!all.contains(&node.public()), "not itself");

    let (dev, node) = &keys[1];
    let mut ws = test_support::open_stream_as(addr, dev, node, false).await;
    let ServerMessage::Full { netmap } = next_msg(&mut ws).await else {
        panic!("the whole netmap for a device that did not ask for pieces")
    };
    assert_eq!(netmap.peers.len(), devices - 1);
}

/// A device removed behind this server's back (another process on the same
/// database, the ephemeral sweep racing a reconnect) still loses its stream:
/// the presence check ends it.
#[tokio::test]
async fn streams_of_devices_removed_elsewhere_are_closed() {
    let h = Harness::new().await;
    let key = h.network_and_key(json!({"reusable": true})).await;
    let addr = serve(&h.state).await;
    let (gone, mut gone_ws) = device_with_stream(&h, addr, &key, "gone").await;
    let (_, mut kept_ws) = device_with_stream(&h, addr, &key, "kept").await;
    let _ = next_msg(&mut gone_ws).await; // "kept" came online

    assert_eq!(super::close_streams_of_removed(&h.state).await.unwrap(), 0);
    sqlx::query("DELETE FROM devices WHERE id = ?")
        .bind(gone)
        .execute(h.state.store.pool())
        .await
        .unwrap();
    assert_eq!(super::close_streams_of_removed(&h.state).await.unwrap(), 1);
    let ServerMessage::Error { error } = next_msg(&mut gone_ws).await else {
        panic!("the removed device's stream ends with an error")
    };
    assert_eq!(error.code, "forbidden");
    if let Ok(Some(Ok(Message::Text(t)))) =
        tokio::time::timeout(Duration::from_millis(200), kept_ws.next()).await
    {
        assert!(
            !t.contains("\"error\""),
            "the other device keeps its stream: {t}"
        );
    }
    assert!(super::PRESENCE_CHECK <= Duration::from_secs(5));
}

/// An ephemeral device that went away just before a restart is still
/// deleted after the grace period: the new process finds it at start.
#[tokio::test]
async fn pending_ephemeral_deletions_survive_a_restart() {
    let h = Harness::new().await;
    let key = h
        .network_and_key(json!({"reusable": true, "ephemeral": true}))
        .await;
    let addr = serve(&h.state).await;
    let (id, ws) = device_with_stream(&h, addr, &key, "passing").await;
    drop(ws);
    // A new process on the same database: nothing connected, nothing
    // pending in memory until the start-up scan.
    let restarted = test_support::state(h.state.store.clone(), None);
    let t0 = std::time::Instant::now();
    assert!(restarted.hub.sweep(t0 + Duration::from_secs(60)).is_empty());
    super::adopt_ephemeral(&restarted, t0).await.unwrap();
    assert!(restarted.hub.sweep(t0 + Duration::from_secs(10)).is_empty());
    let gone = restarted.hub.sweep(t0 + Duration::from_secs(21));
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].device_id, id);
}

#[tokio::test]
async fn anonymous_endpoints_are_limited_per_source() {
    let (store, _dir) = test_store().await;
    let limits = super::limits::Limits {
        by_source: super::limits::Limiter::new(
            super::limits::Rate {
                burst: 2,
                every: Duration::from_secs(60),
            },
            16,
        ),
        ..super::limits::Limits::unlimited()
    };
    let state = test_support::state_with_limits(store, limits);
    let send = |path: &'static str| {
        let state = state.clone();
        async move {
            let req = Request::builder()
                .method("POST")
                .uri(path)
                .header("content-type", "application/json")
                .body(HttpBody::from("{}"))
                .unwrap();
            router(state).oneshot(req).await.unwrap()
        }
    };
    assert_eq!(
        send("/api/v1/register").await.status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        send("/api/v1/rotate-key").await.status(),
        StatusCode::BAD_REQUEST
    );
    let resp = send("/api/v1/device-codes").await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(error_of(&v).error.code, "too_many_requests");
    // Other endpoints are not behind this limit.
    let req = Request::builder()
        .uri("/healthz")
        .body(HttpBody::empty())
        .unwrap();
    assert_eq!(
        router(state.clone()).oneshot(req).await.unwrap().status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_device_flooding_reports_is_cut_off() {
    let (store, dir) = test_store().await;
    let token = store.init(unix_now()).await.unwrap();
    let limits = super::limits::Limits {
        device_reports: super::limits::Limiter::new(
            super::limits::Rate {
                burst: 3,
                every: Duration::from_secs(3600),
            },
            16,
        ),
        ..super::limits::Limits::unlimited()
    };
    let h = Harness {
        state: test_support::state_with_limits(store, limits),
        token,
        _dir: dir,
    };
    let key = h.network_and_key(json!({"reusable": true})).await;
    let addr = serve(&h.state).await;
    let (_, mut ws) = device_with_stream(&h, addr, &key, "noisy").await;
    for port in 1..=4u16 {
        let ep = std::net::SocketAddr::from(([10, 0, 0, 1], port));
        ws.send(Message::text(
            serde_json::to_string(&ClientMessage::Endpoints {
                endpoints: vec![ep],
            })
            .unwrap(),
        ))
        .await
        .unwrap();
    }
    let ServerMessage::Error { error } = next_msg(&mut ws).await else {
        panic!("the fourth report is refused")
    };
    assert_eq!(error.code, "too_many_requests");
    let row = h.state.store.network_devices(1).await.unwrap();
    assert_eq!(
        row[0].endpoints().unwrap(),
        vec![std::net::SocketAddr::from(([10, 0, 0, 1], 3))],
        "the reports within the limit were applied"
    );
}
