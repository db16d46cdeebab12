//! The permission matrix: every network route × every role → allowed
//! (2xx) or refused (403 for a member without the role; 404 for anyone
//! outside the network, and for a guest asking about others' devices, so
//! nothing leaks). Each case runs on a fresh database with the same cast.

use axum::http::StatusCode;
use platform::keys::{DevicePrivate, NodePrivate};
use platform::unix_now;
use serde_json::{json, Value};

use super::test_support::{self, device_code_body, register_body};
use super::SharedState;
use crate::store::test_store;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Owner,
    Admin,
    Member,
    Guest,
    /// A member of another network only.
    Outsider,
}

const EVERYONE: [Who; 5] = [
    Who::Owner,
    Who::Admin,
    Who::Member,
    Who::Guest,
    Who::Outsider,
];

/// The cast and the things they act on.
struct World {
    state: SharedState,
    tokens: Vec<(Who, String)>,
    member_device: i64,
    pending_device: i64,
    wg_device: i64,
    member_key: i64,
    invite: i64,
    denylisted: i64,
    code: String,
    _dir: tempfile::TempDir,
}

/// The shared call, with a JSON body.
async fn call(
    state: &SharedState,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    test_support::call(state, token, method, path, body.map(|b| b.to_string())).await
}

fn registration(auth_key: &str, host: &str) -> Value {
    let body = register_body(
        &DevicePrivate::generate(),
        &NodePrivate::generate(),
        auth_key,
        host,
        unix_now(),
    );
    serde_json::from_str(&body).unwrap()
}

impl World {
    async fn new() -> World {
        let (store, dir) = test_store().await;
        let owner = store.init(unix_now()).await.unwrap();
        let state = test_support::state(store, None);
        let s = &state;
        let ok = |r: (StatusCode, Value)| {
            assert!(r.0.is_success(), "fixture step failed: {} {}", r.0, r.1);
            r.1
        };
        ok(call(
            s,
            Some(&owner),
            "POST",
            "/api/v1/networks",
            Some(json!({"name": "home"})),
        )
        .await);
        let mut tokens = vec![(Who::Owner, owner.clone())];
        let join = |name: &'static str, role: &'static str| {
            let (s, owner) = (s.clone(), owner.clone());
            async move {
                let inv = call(
                    &s,
                    Some(&owner),
                    "POST",
                    "/api/v1/networks/home/invites",
                    Some(json!({"role": role})),
                )
                .await
                .1;
                let secret = inv["secret"].as_str().unwrap().to_owned();
                let red = call(
                    &s,
                    None,
                    "POST",
                    &format!("/api/v1/invites/{secret}/redeem"),
                    Some(json!({"username": name})),
                )
                .await;
                assert_eq!(red.0, StatusCode::CREATED, "{}", red.1);
                red.1["token"].as_str().unwrap().to_owned()
            }
        };
        let admin = join("admin2", "admin").await;
        let member = join("mem", "member").await;
        let guest = join("gst", "guest").await;
        let _pending = join("pend", "member").await;
        for u in ["admin2", "mem", "gst"] {
            ok(call(
                s,
                Some(&owner),
                "POST",
                &format!("/api/v1/networks/home/members/{u}/approve"),
                None,
            )
            .await);
        }
        tokens.extend([
            (Who::Admin, admin),
            (Who::Member, member.clone()),
            (Who::Guest, guest),
        ]);

        // The outsider owns another network and is nobody in this one.
        let outsider = call(
            s,
            Some(&owner),
            "POST",
            "/api/v1/networks",
            Some(json!({"name": "other"})),
        )
        .await;
        assert!(outsider.0.is_success());
        let out_inv = ok(call(
            s,
            Some(&owner),
            "POST",
            "/api/v1/networks/other/invites",
            Some(json!({"role": "admin", "username": "out"})),
        )
        .await);
        let out = ok(call(
            s,
            None,
            "POST",
            &format!(
                "/api/v1/invites/{}/redeem",
                out_inv["secret"].as_str().unwrap()
            ),
            None,
        )
        .await);
        let out_token = out["token"].as_str().unwrap().to_owned();
        ok(call(
            s,
            Some(&owner),
            "POST",
            "/api/v1/networks/other/members/out/approve",
            None,
        )
        .await);
        tokens.push((Who::Outsider, out_token));

        let key = ok(call(
            s,
            Some(&member),
            "POST",
            "/api/v1/networks/home/preauth-keys",
            Some(json!({"reusable": true})),
        )
        .await);
        let member_key = key["info"]["id"].as_i64().unwrap();
        let key = key["key"].as_str().unwrap().to_owned();
        let member_device = ok(call(
            s,
            None,
            "POST",
            "/api/v1/register",
            Some(registration(&key, "mem-laptop")),
        )
        .await)["device_id"]
            .as_i64()
            .unwrap();
        let gone = ok(call(
            s,
            None,
            "POST",
            "/api/v1/register",
            Some(registration(&key, "mem-old")),
        )
        .await)["device_id"]
            .as_i64()
            .unwrap();
        ok(call(
            s,
            Some(&owner),
            "DELETE",
            &format!("/api/v1/networks/home/devices/{gone}"),
            None,
        )
        .await);
        let denylisted = ok(call(
            s,
            Some(&owner),
            "GET",
            "/api/v1/networks/home/denylist",
            None,
        )
        .await)[0]["id"]
            .as_i64()
            .unwrap();
        ok(call(
            s,
            Some(&owner),
            "PATCH",
            "/api/v1/networks/home/settings",
            Some(json!({"require_device_approval": true})),
        )
        .await);
        let pending_device = ok(call(
            s,
            None,
            "POST",
            "/api/v1/register",
            Some(registration(&key, "mem-phone")),
        )
        .await)["device_id"]
            .as_i64()
            .unwrap();
        let wg = ok(call(s, Some(&owner), "POST", "/api/v1/networks/home/wireguard-peers", Some(json!({"name": "router", "public_key": NodePrivate::generate().public().to_base64()}))).await);
        let wg_device = wg["device"]["id"].as_i64().unwrap();
        let invite = ok(call(
            s,
            Some(&owner),
            "POST",
            "/api/v1/networks/home/invites",
            Some(json!({"role": "guest"})),
        )
        .await)["info"]["id"]
            .as_i64()
            .unwrap();
        let dc = device_code_body(&DevicePrivate::generate(), "new-box", None);
        let code = ok(call(s, None, "POST", "/api/v1/device-codes", Some(dc)).await)["code"]
            .as_str()
            .unwrap()
            .to_owned();
        World {
            state,
            tokens,
            member_device,
            pending_device,
            wg_device,
            member_key,
            invite,
            denylisted,
            code,
            _dir: dir,
        }
    }

    fn token(&self, who: Who) -> &str {
        &self.tokens.iter().find(|(w, _)| *w == who).unwrap().1
    }
}

/// One route: how to call it, and who may.
struct Case {
    method: &'static str,
    path: fn(&World) -> String,
    body: Option<fn() -> Value>,
    allowed: &'static [Who],
    /// What a refused member of the network gets (403, or 404 where the
    /// target must stay invisible to them).
    refused: fn(Who) -> StatusCode,
}

const ADMINS: &[Who] = &[Who::Owner, Who::Admin];
const MEMBERS: &[Who] = &[Who::Owner, Who::Admin, Who::Member];
const ALL_IN: &[Who] = &[Who::Owner, Who::Admin, Who::Member, Who::Guest];

fn forbidden(_: Who) -> StatusCode {
    StatusCode::FORBIDDEN
}

/// Guests do not see others' devices at all.
fn hidden_from_guests(who: Who) -> StatusCode {
    if who == Who::Guest {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::FORBIDDEN
    }
}

fn cases() -> Vec<Case> {
    fn c(
        method: &'static str,
        path: fn(&World) -> String,
        body: Option<fn() -> Value>,
        allowed: &'static [Who],
    ) -> Case {
        Case {
            method,
            path,
            body,
            allowed,
            refused: forbidden,
        }
    }
    vec![
        c("GET", |_| "/api/v1/networks/home".into(), None, ALL_IN),
        c(
            "GET",
            |_| "/api/v1/networks/home/settings".into(),
            None,
            MEMBERS,
        ),
        c(
            "PATCH",
            |_| "/api/v1/networks/home/settings".into(),
            Some(|| json!({"key_expiry_secs": 86400})),
            ADMINS,
        ),
        c(
            "POST",
            |_| "/api/v1/networks/home/preauth-keys".into(),
            Some(|| json!({})),
            MEMBERS,
        ),
        c(
            "GET",
            |_| "/api/v1/networks/home/preauth-keys".into(),
            None,
            MEMBERS,
        ),
        c(
            "DELETE",
            |w| format!("/api/v1/networks/home/preauth-keys/{}", w.member_key),
            None,
            MEMBERS,
        ),
        c(
            "GET",
            |_| "/api/v1/networks/home/audit".into(),
            None,
            ALL_IN,
        ),
        c(
            "GET",
            |_| "/api/v1/networks/home/denylist".into(),
            None,
            ADMINS,
        ),
        c(
            "DELETE",
            |w| format!("/api/v1/networks/home/denylist/{}", w.denylisted),
            None,
            ADMINS,
        ),
        c(
            "GET",
            |_| "/api/v1/networks/home/members".into(),
            None,
            ALL_IN,
        ),
        c(
            "PUT",
            |_| "/api/v1/networks/home/members/pend/role".into(),
            Some(|| json!({"role": "guest"})),
            ADMINS,
        ),
        c(
            "POST",
            |_| "/api/v1/networks/home/members/pend/approve".into(),
            None,
            ADMINS,
        ),
        c(
            "DELETE",
            |_| "/api/v1/networks/home/members/pend".into(),
            None,
            ADMINS,
        ),
        c(
            "POST",
            |_| "/api/v1/networks/home/invites".into(),
            Some(|| json!({"role": "member"})),
            ADMINS,
        ),
        c(
            "GET",
            |_| "/api/v1/networks/home/invites".into(),
            None,
            ADMINS,
        ),
        c(
            "DELETE",
            |w| format!("/api/v1/networks/home/invites/{}", w.invite),
            None,
            ADMINS,
        ),
        c(
            "GET",
            |_| "/api/v1/networks/home/devices".into(),
            None,
            ALL_IN,
        ),
        Case {
            method: "DELETE",
            path: |w| format!("/api/v1/networks/home/devices/{}", w.member_device),
            body: None,
            allowed: MEMBERS,
            refused: hidden_from_guests,
        },
        c(
            "POST",
            |w| format!("/api/v1/networks/home/devices/{}/revoke", w.member_device),
            None,
            ADMINS,
        ),
        c(
            "POST",
            |w| format!("/api/v1/networks/home/devices/{}/approve", w.pending_device),
            None,
            ADMINS,
        ),
        c(
            "PUT",
            |w| {
                format!(
                    "/api/v1/networks/home/devices/{}/key-expiry",
                    w.member_device
                )
            },
            Some(|| json!({"expiry_secs": 0})),
            ADMINS,
        ),
        Case {
            method: "GET",
            path: |w| format!("/api/v1/networks/home/devices/{}/wg-quick", w.wg_device),
            body: None,
            allowed: ADMINS,
            refused: hidden_from_guests,
        },
        c(
            "POST",
            |w| format!("/api/v1/networks/home/device-codes/{}/approve", w.code),
            None,
            MEMBERS,
        ),
        c(
            "POST",
            |_| "/api/v1/networks/home/rotate-keys".into(),
            None,
            ADMINS,
        ),
        c(
            "GET",
            |_| "/api/v1/networks/home/compute".into(),
            None,
            ALL_IN,
        ),
        c(
            "PUT",
            |_| "/api/v1/networks/home/compute".into(),
            Some(|| json!({"rates": {"initial_grant": 5}})),
            ADMINS,
        ),
        c(
            "GET",
            |_| "/api/v1/networks/home/ledger/balances".into(),
            None,
            ALL_IN,
        ),
        c(
            "GET",
            |_| "/api/v1/networks/home/ledger/entries".into(),
            None,
            ALL_IN,
        ),
        c(
            "GET",
            |_| "/api/v1/networks/home/ledger/export?format=csv".into(),
            None,
            ADMINS,
        ),
        c(
            "POST",
            |_| "/api/v1/networks/home/ledger/grants".into(),
            Some(|| json!({"amount": 1})),
            ADMINS,
        ),
        c(
            "POST",
            |_| "/api/v1/networks/home/wireguard-peers".into(),
            Some(
                || json!({"name": "printer", "public_key": NodePrivate::generate().public().to_base64()}),
            ),
            ADMINS,
        ),
    ]
}

#[tokio::test]
async fn every_role_on_every_route() {
    let mut failures = Vec::new();
    let cases = cases();
    for case in &cases {
        for who in EVERYONE {
            let w = World::new().await;
            let path = (case.path)(&w);
            let (status, body) = call(
                &w.state,
                Some(w.token(who)),
                case.method,
                &path,
                case.body.map(|b| b()),
            )
            .await;
            let expected_ok = case.allowed.contains(&who);
            let good = if expected_ok {
                status.is_success()
            } else if who == Who::Outsider {
                status == StatusCode::NOT_FOUND
            } else {
                status == (case.refused)(who)
            };
            if !good {
                failures.push(format!(
                    "{} {path} as {who:?}: {status} {body}",
                    case.method
                ));
            }
            if !status.is_success() {
                assert!(body["error"]["code"].is_string(), "errors are JSON: {body}");
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        cases.len() * EVERYONE.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn outsiders_learn_nothing_and_anonymous_callers_are_refused() {
    let w = World::new().await;
    // The same answer for a network that exists and one that does not.
    let (a, body_a) = call(
        &w.state,
        Some(w.token(Who::Outsider)),
        "GET",
        "/api/v1/networks/home/devices",
        None,
    )
    .await;
    let (b, body_b) = call(
        &w.state,
        Some(w.token(Who::Outsider)),
        "GET",
        "/api/v1/networks/nowhere/devices",
        None,
    )
    .await;
    assert_eq!((a, b), (StatusCode::NOT_FOUND, StatusCode::NOT_FOUND));
    assert_eq!(
        body_a["error"]["message"]
            .as_str()
            .unwrap()
            .replace("home", "X"),
        body_b["error"]["message"]
            .as_str()
            .unwrap()
            .replace("nowhere", "X")
    );
    let (_, nets) = call(
        &w.state,
        Some(w.token(Who::Outsider)),
        "GET",
        "/api/v1/networks",
        None,
    )
    .await;
    let names: Vec<_> = nets
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["other"]);
    for (token, code) in [
        (None, "unauthorized"),
        (Some("meshtok-forged"), "unauthorized"),
    ] {
        let (status, body) = call(&w.state, token, "GET", "/api/v1/networks/home", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"]["code"], code);
    }
    // A guest's device list holds only their own (none).
    let (_, devices) = call(
        &w.state,
        Some(w.token(Who::Guest)),
        "GET",
        "/api/v1/networks/home/devices",
        None,
    )
    .await;
    assert_eq!(devices.as_array().unwrap().len(), 0);
    let (_, devices) = call(
        &w.state,
        Some(w.token(Who::Member)),
        "GET",
        "/api/v1/networks/home/devices",
        None,
    )
    .await;
    assert!(devices.as_array().unwrap().len() >= 3);
}
