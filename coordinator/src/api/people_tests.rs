//! In-process tests of how people and devices get in and are shut out:
//! invites (happy path, expired, reused, revoked, wrong network, addressed),
//! approval and auto-approval, device-code pairing, device approval, the
//! denylist on re-registration, rotation, replayed and malformed requests,
//! and the audit trail each leaves.

use axum::http::StatusCode;
use platform::keys::{DevicePrivate, NodePrivate};
use platform::people::RotateKeyRequest;
use platform::signed::{Signed, DOMAIN_REGISTER, DOMAIN_ROTATE};
use platform::unix_now;
use serde_json::{json, Value};

use super::test_support::{self, device_code_body, register_body};
use super::SharedState;
use crate::store::test_store;

struct T {
    state: SharedState,
    owner: String,
    _dir: tempfile::TempDir,
}

impl T {
    async fn new() -> T {
        Self::with_clock(crate::clock::Clock::System).await
    }

    async fn with_clock(clock: crate::clock::Clock) -> T {
        let (store, dir) = test_store().await;
        let owner = store.init(clock.now()).await.unwrap();
        let state = test_support::state_with_clock(store, Some("https://coord.example"), clock);
        let t = T {
            state,
            owner,
            _dir: dir,
        };
        t.ok(
            Some(&t.owner.clone()),
            "POST",
            "/api/v1/networks",
            json!({"name": "home"}),
        )
        .await;
        t
    }

    async fn call(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        test_support::call(
            &self.state,
            token,
            method,
            path,
            body.map(|b| b.to_string()),
        )
        .await
    }

    async fn ok(&self, token: Option<&str>, method: &str, path: &str, body: Value) -> Value {
        let body = (!body.is_null()).then_some(body);
        let (status, v) = self.call(token, method, path, body).await;
        assert!(status.is_success(), "{method} {path}: {status} {v}");
        v
    }

    /// `method path` fails with `status` and a JSON error body.
    async fn fails(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Value,
        status: StatusCode,
    ) -> String {
        let body = (!body.is_null()).then_some(body);
        let (got, v) = self.call(token, method, path, body).await;
        assert_eq!(got, status, "{method} {path}: {v}");
        v["error"]["message"]
            .as_str()
            .expect("JSON error body")
            .to_owned()
    }

    async fn invite(&self, body: Value) -> String {
        let owner = self.owner.clone();
        let v = self
            .ok(Some(&owner), "POST", "/api/v1/networks/home/invites", body)
            .await;
        let link = v["link"].as_str().unwrap();
        assert!(
            link.starts_with("https://coord.example/api/v1/invites/meshinv-"),
            "{link}"
        );
        v["secret"].as_str().unwrap().to_owned()
    }

    async fn audit_actions(&self) -> Vec<String> {
        let owner = self.owner.clone();
        let v = self
            .ok(
                Some(&owner),
                "GET",
                "/api/v1/networks/home/audit",
                Value::Null,
            )
            .await;
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e["action"].as_str().unwrap().to_owned())
            .collect()
    }

    async fn count(&self, sql: &str) -> i64 {
        let (n,): (i64,) = sqlx::query_as(sql)
            .fetch_one(self.state.store.pool())
            .await
            .unwrap();
        n
    }
}

fn register(dev: &DevicePrivate, node: &NodePrivate, auth_key: &str, host: &str, ts: u64) -> Value {
    serde_json::from_str(&register_body(dev, node, auth_key, host, ts)).unwrap()
}

fn device_code(dev: &DevicePrivate, code: Option<&str>) -> Value {
    device_code_body(dev, "new-box", code)
}

#[tokio::test]
async fn invites_from_link_to_membership() {
    let t = T::new().await;
    let owner = t.owner.clone();
    let secret = t.invite(json!({"role": "member"})).await;
    // Anyone with the link may look at it.
    let shown = t
        .ok(
            None,
            "GET",
            &format!("/api/v1/invites/{secret}"),
            Value::Null,
        )
        .await;
    assert_eq!(shown["role"], "member");
    let red = t
        .ok(
            None,
            "POST",
            &format!("/api/v1/invites/{secret}/redeem"),
            json!({"username": "bob"}),
        )
        .await;
    assert_eq!(red["member"]["status"], "pending");
    let bob = red["token"].as_str().unwrap().to_owned();
    // Pending: not in yet.
    let msg = t
        .fails(
            Some(&bob),
            "GET",
            "/api/v1/networks/home/devices",
            Value::Null,
            StatusCode::FORBIDDEN,
        )
        .await;
    assert!(msg.contains("waiting for an admin"), "{msg}");
    // Reused link.
    let msg = t
        .fails(
            None,
            "POST",
            &format!("/api/v1/invites/{secret}/redeem"),
            json!({"username": "eve"}),
            StatusCode::FORBIDDEN,
        )
        .await;
    assert!(msg.contains("already been used"), "{msg}");
    assert_eq!(
        t.count("SELECT COUNT(*) FROM users WHERE username = 'eve'")
            .await,
        0,
        "nothing half-written"
    );
    t.ok(
        Some(&owner),
        "POST",
        "/api/v1/networks/home/members/bob/approve",
        Value::Null,
    )
    .await;
    t.ok(
        Some(&bob),
        "GET",
        "/api/v1/networks/home/devices",
        Value::Null,
    )
    .await;
    // Members add their own devices.
    let key = t
        .ok(
            Some(&bob),
            "POST",
            "/api/v1/networks/home/preauth-keys",
            json!({}),
        )
        .await;
    let dev = t
        .ok(
            None,
            "POST",
            "/api/v1/register",
            register(
                &DevicePrivate::generate(),
                &NodePrivate::generate(),
                key["key"].as_str().unwrap(),
                "bob-laptop",
                unix_now(),
            ),
        )
        .await;
    let devices = t
        .ok(
            Some(&owner),
            "GET",
            "/api/v1/networks/home/devices",
            Value::Null,
        )
        .await;
    let d = devices
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == dev["device_id"])
        .unwrap();
    assert_eq!(d["owner"], "bob");

    // Nobody changes their own role; the owner cannot be demoted; the last
    // admin cannot leave.
    t.fails(
        Some(&owner),
        "PUT",
        "/api/v1/networks/home/members/admin/role",
        json!({"role": "member"}),
        StatusCode::FORBIDDEN,
    )
    .await;
    t.fails(
        Some(&owner),
        "DELETE",
        "/api/v1/networks/home/members/admin",
        Value::Null,
        StatusCode::FORBIDDEN,
    )
    .await;
    t.ok(
        Some(&owner),
        "PUT",
        "/api/v1/networks/home/members/bob/role",
        json!({"role": "admin"}),
    )
    .await;
    t.fails(
        Some(&bob),
        "PUT",
        "/api/v1/networks/home/members/bob/role",
        json!({"role": "member"}),
        StatusCode::FORBIDDEN,
    )
    .await;

    // Removing a member removes their devices and denylists them.
    t.ok(
        Some(&owner),
        "DELETE",
        "/api/v1/networks/home/members/bob",
        Value::Null,
    )
    .await;
    assert_eq!(t.count("SELECT COUNT(*) FROM devices").await, 0);
    assert_eq!(t.count("SELECT COUNT(*) FROM denylist").await, 2);
    let actions = t.audit_actions().await;
    for a in [
        "network.created",
        "invite.created",
        "invite.redeemed",
        "member.approved",
        "key.created",
        "device.registered",
        "member.role_changed",
        "member.removed",
    ] {
        assert!(
            actions.iter().any(|x| x == a),
            "{a} missing from {actions:?}"
        );
    }
    // Members see their own events only.
    let carol = {
        let s = t.invite(json!({"role": "member"})).await;
        let r = t
            .ok(
                None,
                "POST",
                &format!("/api/v1/invites/{s}/redeem"),
                json!({"username": "carol"}),
            )
            .await;
        t.ok(
            Some(&owner),
            "POST",
            "/api/v1/networks/home/members/carol/approve",
            Value::Null,
        )
        .await;
        r["token"].as_str().unwrap().to_owned()
    };
    let mine = t
        .ok(
            Some(&carol),
            "GET",
            "/api/v1/networks/home/audit",
            Value::Null,
        )
        .await;
    assert!(
        mine.as_array()
            .unwrap()
            .iter()
            .all(|e| e["actor"]["name"] == "carol"),
        "{mine}"
    );
    assert!(!mine.as_array().unwrap().is_empty());
}

#[tokio::test]
async fn expired_revoked_wrong_network_and_addressed_invites() {
    let t = T::with_clock(crate::clock::Clock::manual(unix_now())).await;
    let owner = t.owner.clone();
    let short = t.invite(json!({"role": "member", "expiry_secs": 1})).await;
    t.state.clock.advance(1);
    let msg = t
        .fails(
            None,
            "POST",
            &format!("/api/v1/invites/{short}/redeem"),
            json!({"username": "late"}),
            StatusCode::FORBIDDEN,
        )
        .await;
    assert!(msg.contains("expired"), "{msg}");
    let revoked = t.invite(json!({"role": "member"})).await;
    let id = t
        .ok(
            Some(&owner),
            "GET",
            "/api/v1/networks/home/invites",
            Value::Null,
        )
        .await
        .as_array()
        .unwrap()
        .last()
        .unwrap()["id"]
        .clone();
    // An invite of one network is not found through another.
    t.ok(
        Some(&owner),
        "POST",
        "/api/v1/networks",
        json!({"name": "lab"}),
    )
    .await;
    t.fails(
        Some(&owner),
        "DELETE",
        &format!("/api/v1/networks/lab/invites/{id}"),
        Value::Null,
        StatusCode::NOT_FOUND,
    )
    .await;
    t.ok(
        Some(&owner),
        "DELETE",
        &format!("/api/v1/networks/home/invites/{id}"),
        Value::Null,
    )
    .await;
    t.fails(
        None,
        "POST",
        &format!("/api/v1/invites/{revoked}/redeem"),
        json!({"username": "x"}),
        StatusCode::FORBIDDEN,
    )
    .await;
    t.fails(
        None,
        "POST",
        "/api/v1/invites/meshinv-nope/redeem",
        json!({"username": "x"}),
        StatusCode::NOT_FOUND,
    )
    .await;
    // Addressed to dan: nobody else.
    let for_dan = t.invite(json!({"role": "guest", "username": "dan"})).await;
    t.fails(
        None,
        "POST",
        &format!("/api/v1/invites/{for_dan}/redeem"),
        json!({"username": "mallory"}),
        StatusCode::FORBIDDEN,
    )
    .await;
    let red = t
        .ok(
            None,
            "POST",
            &format!("/api/v1/invites/{for_dan}/redeem"),
            json!({}),
        )
        .await;
    assert_eq!(red["member"]["username"], "dan");
    // Bad input: a precise 400, nothing stored.
    t.fails(
        None,
        "POST",
        &format!(
            "/api/v1/invites/{}/redeem",
            t.invite(json!({"role": "member"})).await
        ),
        json!({"username": "no spaces"}),
        StatusCode::BAD_REQUEST,
    )
    .await;
    t.fails(
        Some(&owner),
        "POST",
        "/api/v1/networks/home/invites",
        json!({"role": "owner"}),
        StatusCode::BAD_REQUEST,
    )
    .await;
    t.fails(
        Some(&owner),
        "POST",
        "/api/v1/networks/home/invites",
        json!({"role": "member", "expiry_secs": 0}),
        StatusCode::BAD_REQUEST,
    )
    .await;
    t.fails(
        Some(&owner),
        "PATCH",
        "/api/v1/networks/home/settings",
        json!({"bogus": true}),
        StatusCode::BAD_REQUEST,
    )
    .await;
    t.fails(
        Some(&owner),
        "PATCH",
        "/api/v1/networks/home/settings",
        json!({"auto_approve_emails": ["not-an-address"]}),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(
        t.count("SELECT COUNT(*) FROM users WHERE username = 'no spaces'")
            .await,
        0
    );
}

#[tokio::test]
async fn auto_approval_by_domain_and_allowlist() {
    let t = T::new().await;
    let owner = t.owner.clone();
    t.ok(
        Some(&owner),
        "PATCH",
        "/api/v1/networks/home/settings",
        json!({"auto_approve_domains": ["corp.com"], "auto_approve_emails": ["friend@else.org"]}),
    )
    .await;
    for (email, status) in [
        ("ann@corp.com", "active"),
        ("friend@else.org", "active"),
        ("eve@evil.com", "pending"),
    ] {
        let s = t.invite(json!({"role": "member", "email": email})).await;
        let user = email.split('@').next().unwrap();
        let r = t
            .ok(
                None,
                "POST",
                &format!("/api/v1/invites/{s}/redeem"),
                json!({"username": user}),
            )
            .await;
        assert_eq!(r["member"]["status"], status, "{email}");
    }
    // A share link with a self-claimed address is not trusted.
    let s = t.invite(json!({"role": "member"})).await;
    let r = t
        .ok(
            None,
            "POST",
            &format!("/api/v1/invites/{s}/redeem"),
            json!({"username": "zed", "email": "zed@corp.com"}),
        )
        .await;
    assert_eq!(r["member"]["status"], "pending");
}

#[tokio::test]
async fn device_code_pairing() {
    let t = T::new().await;
    let owner = t.owner.clone();
    let dev = DevicePrivate::generate();
    let started = t
        .ok(
            None,
            "POST",
            "/api/v1/device-codes",
            device_code(&dev, None),
        )
        .await;
    let code = started["code"].as_str().unwrap().to_owned();
    // Its verification URL shows a signed-in user what is waiting.
    let url = started["verification_url"].as_str().unwrap();
    let path = url.strip_prefix("https://coord.example").unwrap();
    let waiting = t.ok(Some(&owner), "GET", path, Value::Null).await;
    assert_eq!(waiting["hostname"], "new-box");
    t.fails(None, "GET", path, Value::Null, StatusCode::UNAUTHORIZED)
        .await;
    assert_eq!(started["status"], "pending");
    // Asking again gives the same code.
    let again = t
        .ok(
            None,
            "POST",
            "/api/v1/device-codes",
            device_code(&dev, None),
        )
        .await;
    assert_eq!(again["code"], code.as_str());
    let polled = t
        .ok(
            None,
            "POST",
            "/api/v1/device-codes/poll",
            device_code(&dev, Some(&code)),
        )
        .await;
    assert_eq!(polled["status"], "pending");
    assert!(polled["auth_key"].is_null());
    // Another device cannot collect it.
    t.fails(
        None,
        "POST",
        "/api/v1/device-codes/poll",
        device_code(&DevicePrivate::generate(), Some(&code)),
        StatusCode::NOT_FOUND,
    )
    .await;
    t.fails(
        Some(&owner),
        "POST",
        "/api/v1/networks/home/device-codes/BBBB-BBBB/approve",
        Value::Null,
        StatusCode::NOT_FOUND,
    )
    .await;
    t.ok(
        Some(&owner),
        "POST",
        &format!(
            "/api/v1/networks/home/device-codes/{}/approve",
            code.to_lowercase()
        ),
        Value::Null,
    )
    .await;
    let approved = t
        .ok(
            None,
            "POST",
            "/api/v1/device-codes/poll",
            device_code(&dev, Some(&code)),
        )
        .await;
    assert_eq!(approved["status"], "approved");
    assert_eq!(approved["network"], "home");
    let key = approved["auth_key"].as_str().unwrap().to_owned();
    // A second poll replaces the key; the first no longer works.
    let second = t
        .ok(
            None,
            "POST",
            "/api/v1/device-codes/poll",
            device_code(&dev, Some(&code)),
        )
        .await;
    let key2 = second["auth_key"].as_str().unwrap().to_owned();
    t.fails(
        None,
        "POST",
        "/api/v1/register",
        register(&dev, &NodePrivate::generate(), &key, "new-box", unix_now()),
        StatusCode::FORBIDDEN,
    )
    .await;
    let reg = t
        .ok(
            None,
            "POST",
            "/api/v1/register",
            register(&dev, &NodePrivate::generate(), &key2, "new-box", unix_now()),
        )
        .await;
    assert_eq!(reg["network"], "home");
    let devices = t
        .ok(
            Some(&owner),
            "GET",
            "/api/v1/networks/home/devices",
            Value::Null,
        )
        .await;
    assert_eq!(devices[0]["owner"], "admin");
    // The key is single-use: another device cannot ride on it.
    t.fails(
        None,
        "POST",
        "/api/v1/register",
        register(
            &DevicePrivate::generate(),
            &NodePrivate::generate(),
            &key2,
            "x",
            unix_now(),
        ),
        StatusCode::FORBIDDEN,
    )
    .await;
}

#[tokio::test]
async fn device_approval_revocation_and_the_denylist() {
    let t = T::new().await;
    let owner = t.owner.clone();
    // A member whose devices need approval.
    let s = t.invite(json!({"role": "member"})).await;
    let bob = t
        .ok(
            None,
            "POST",
            &format!("/api/v1/invites/{s}/redeem"),
            json!({"username": "bob"}),
        )
        .await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    t.ok(
        Some(&owner),
        "POST",
        "/api/v1/networks/home/members/bob/approve",
        Value::Null,
    )
    .await;
    t.ok(
        Some(&owner),
        "PATCH",
        "/api/v1/networks/home/settings",
        json!({"require_device_approval": true}),
    )
    .await;
    let key = t
        .ok(
            Some(&bob),
            "POST",
            "/api/v1/networks/home/preauth-keys",
            json!({"reusable": true}),
        )
        .await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let dev = DevicePrivate::generate();
    let node = NodePrivate::generate();
    let id = t
        .ok(
            None,
            "POST",
            "/api/v1/register",
            register(&dev, &node, &key, "phone", unix_now()),
        )
        .await["device_id"]
        .as_i64()
        .unwrap();
    let list = t
        .ok(
            Some(&owner),
            "GET",
            "/api/v1/networks/home/devices",
            Value::Null,
        )
        .await;
    assert_eq!(list[0]["state"], "awaiting_approval");
    // Relays refuse it until approved.
    let relay = t
        .state
        .store
        .create_relay_token("r", unix_now())
        .await
        .unwrap();
    let admit = format!("/api/v1/relay/admit/{}", node.public());
    t.fails(
        Some(&relay),
        "GET",
        &admit,
        Value::Null,
        StatusCode::NOT_FOUND,
    )
    .await;
    t.ok(
        Some(&owner),
        "POST",
        &format!("/api/v1/networks/home/devices/{id}/approve"),
        Value::Null,
    )
    .await;
    t.ok(Some(&relay), "GET", &admit, Value::Null).await;

    // Revoked: refused by relays, and on re-registration, with a clear error.
    t.ok(
        Some(&owner),
        "POST",
        &format!("/api/v1/networks/home/devices/{id}/revoke"),
        Value::Null,
    )
    .await;
    t.fails(
        Some(&relay),
        "GET",
        &admit,
        Value::Null,
        StatusCode::NOT_FOUND,
    )
    .await;
    let msg = t
        .fails(
            None,
            "POST",
            "/api/v1/register",
            register(&dev, &NodePrivate::generate(), &key, "phone", unix_now()),
            StatusCode::FORBIDDEN,
        )
        .await;
    assert!(msg.contains("re-approve"), "{msg}");
    t.ok(
        Some(&owner),
        "POST",
        &format!("/api/v1/networks/home/devices/{id}/approve"),
        Value::Null,
    )
    .await;
    t.ok(
        None,
        "POST",
        "/api/v1/register",
        register(&dev, &node, &key, "phone", unix_now()),
    )
    .await;

    // Removed: gone, and its keys stay out until an admin lifts them.
    t.ok(
        Some(&bob),
        "DELETE",
        &format!("/api/v1/networks/home/devices/{id}"),
        Value::Null,
    )
    .await;
    t.fails(
        None,
        "POST",
        "/api/v1/register",
        register(&dev, &NodePrivate::generate(), &key, "phone", unix_now()),
        StatusCode::FORBIDDEN,
    )
    .await;
    let deny = t
        .ok(
            Some(&owner),
            "GET",
            "/api/v1/networks/home/denylist",
            Value::Null,
        )
        .await;
    assert_eq!(deny.as_array().unwrap().len(), 2);
    for e in deny.as_array().unwrap() {
        t.ok(
            Some(&owner),
            "DELETE",
            &format!("/api/v1/networks/home/denylist/{}", e["id"]),
            Value::Null,
        )
        .await;
    }
    t.ok(
        None,
        "POST",
        "/api/v1/register",
        register(&dev, &node, &key, "phone", unix_now()),
    )
    .await;
    let actions = t.audit_actions().await;
    for a in [
        "settings.changed",
        "device.approved",
        "device.revoked",
        "device.removed",
        "denylist.lifted",
    ] {
        assert!(
            actions.iter().any(|x| x == a),
            "{a} missing from {actions:?}"
        );
    }
}

#[tokio::test]
async fn rotation_expiry_and_replays() {
    let t = T::with_clock(crate::clock::Clock::manual(unix_now())).await;
    let owner = t.owner.clone();
    let key = t
        .ok(
            Some(&owner),
            "POST",
            "/api/v1/networks/home/preauth-keys",
            json!({"reusable": true}),
        )
        .await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let dev = DevicePrivate::generate();
    let node = NodePrivate::generate();
    let body = register(&dev, &node, &key, "box", unix_now());
    let id = t.ok(None, "POST", "/api/v1/register", body.clone()).await["device_id"]
        .as_i64()
        .unwrap();
    let list = t
        .ok(
            Some(&owner),
            "GET",
            "/api/v1/networks/home/devices",
            Value::Null,
        )
        .await;
    let expiry = list[0]["key_expiry"].as_u64().unwrap();
    assert!(expiry >= unix_now() + 179 * 86400, "default 180 days");

    let rotate = |old: &NodePrivate, new: &NodePrivate, ts: u64| {
        let req = RotateKeyRequest {
            timestamp: ts,
            old_node_key: old.public(),
            new_node_key: new.public(),
            node_proof: test_support::rotate_proof(&dev, new, ts),
        };
        serde_json::to_value(Signed::sign(&dev, DOMAIN_ROTATE, &req)).unwrap()
    };
    let node2 = NodePrivate::generate();
    // A signed request reused after its window: refused.
    t.fails(
        None,
        "POST",
        "/api/v1/rotate-key",
        rotate(&node, &node2, unix_now() - 3600),
        StatusCode::UNAUTHORIZED,
    )
    .await;
    let stale_register = register(&dev, &node, &key, "box", unix_now() - 3600);
    t.fails(
        None,
        "POST",
        "/api/v1/register",
        stale_register,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    let r = t
        .ok(
            None,
            "POST",
            "/api/v1/rotate-key",
            rotate(&node, &node2, unix_now()),
        )
        .await;
    assert_eq!(r["node_key"], node2.public().to_string());
    // Replaying the same rotation within its window names the wrong old key.
    t.fails(
        None,
        "POST",
        "/api/v1/rotate-key",
        rotate(&node, &node2, unix_now()),
        StatusCode::CONFLICT,
    )
    .await;
    // Signed by another device: not registered.
    let other = DevicePrivate::generate();
    let fresh = NodePrivate::generate();
    let req = RotateKeyRequest {
        timestamp: unix_now(),
        old_node_key: node2.public(),
        new_node_key: fresh.public(),
        node_proof: test_support::rotate_proof(&other, &fresh, unix_now()),
    };
    t.fails(
        None,
        "POST",
        "/api/v1/rotate-key",
        serde_json::to_value(Signed::sign(&other, DOMAIN_ROTATE, &req)).unwrap(),
        StatusCode::UNAUTHORIZED,
    )
    .await;
    // A signature for one purpose is not valid for another.
    let fresh = NodePrivate::generate();
    let req = RotateKeyRequest {
        timestamp: unix_now(),
        old_node_key: node2.public(),
        new_node_key: fresh.public(),
        node_proof: test_support::rotate_proof(&dev, &fresh, unix_now()),
    };
    t.fails(
        None,
        "POST",
        "/api/v1/rotate-key",
        serde_json::to_value(Signed::sign(&dev, DOMAIN_REGISTER, &req)).unwrap(),
        StatusCode::UNAUTHORIZED,
    )
    .await;
    t.fails(
        None,
        "POST",
        "/api/v1/rotate-key",
        json!({"device_key": "x"}),
        StatusCode::BAD_REQUEST,
    )
    .await;

    // An admin sets this device's key to expire at once: relays refuse it.
    t.ok(
        Some(&owner),
        "PUT",
        &format!("/api/v1/networks/home/devices/{id}/key-expiry"),
        json!({"expiry_secs": 1}),
    )
    .await;
    t.state.clock.advance(2);
    let relay = t
        .state
        .store
        .create_relay_token("r", t.state.clock.now())
        .await
        .unwrap();
    t.fails(
        Some(&relay),
        "GET",
        &format!("/api/v1/relay/admit/{}", node2.public()),
        Value::Null,
        StatusCode::NOT_FOUND,
    )
    .await;
    let expired = t
        .state
        .store
        .take_newly_expired(t.state.clock.now())
        .await
        .unwrap();
    assert_eq!(expired.len(), 1);
    assert!(
        t.state
            .store
            .take_newly_expired(t.state.clock.now())
            .await
            .unwrap()
            .is_empty(),
        "handled once"
    );
    t.fails(
        None,
        "POST",
        "/api/v1/rotate-key",
        rotate(&node2, &NodePrivate::generate(), unix_now()),
        StatusCode::FORBIDDEN,
    )
    .await;
    let actions = t.audit_actions().await;
    for a in ["key.rotated", "key.expiry_changed", "key.expired"] {
        assert!(
            actions.iter().any(|x| x == a),
            "{a} missing from {actions:?}"
        );
    }
    // Network-wide rotation is recorded, and the device is due.
    t.ok(
        Some(&owner),
        "POST",
        "/api/v1/networks/home/rotate-keys",
        Value::Null,
    )
    .await;
    assert!(t.state.store.rotation_due(id).await.unwrap());
}
