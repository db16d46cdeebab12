//! The access policy, tags and DNS settings through the router: who may
//! read and write them, refusals that name the line and keep the running
//! policy, the audit diff, live delivery to connected devices (peers
//! appear and go, filters change, unaffected devices hear nothing), tags
//! from pre-auth keys, and evaluation.

use axum::http::StatusCode;
use platform::api::ServerMessage;
use platform::filter::Proto;
use platform::netmap::PeerChange;
use serde_json::{json, Value};

use super::ledger_tests::{call, ok, Dev, World};
use super::test_support::{self, next_msg_any, Ws};

const POLICY: &str = "/api/v1/networks/home/policy";

async fn put_policy(w: &World, token: &str, text: &str) -> (StatusCode, Value) {
    test_support::call(&w.state, Some(token), "PUT", POLICY, Some(text.to_owned())).await
}

async fn stream(addr: std::net::SocketAddr, d: &Dev) -> Ws {
    let mut ws = test_support::open_stream(addr, &d.key, &d.node).await;
    let ServerMessage::Full { .. } = next_msg_any(&mut ws).await else {
        panic!("a full netmap first")
    };
    ws
}

/// Reads messages until `pick` returns something (5 s per message).
async fn until<T>(ws: &mut Ws, mut pick: impl FnMut(&ServerMessage) -> Option<T>) -> T {
    loop {
        let m = next_msg_any(ws).await;
        if let Some(t) = pick(&m) {
            return t;
        }
    }
}

#[tokio::test]
async fn only_admins_replace_the_policy_and_a_bad_one_changes_nothing() {
    let w = World::new().await;
    let ann = w.join("home", "ann", "member").await;
    let doc = w.owner_call("GET", POLICY, None).await;
    assert_eq!(doc["default"], json!(true));
    assert!(doc["policy"].as_str().unwrap().contains("autogroup:member"));

    let good = "// ssh only\n{\"acls\": [{\"src\": [\"ann\"], \"dst\": [\"*:22\"]},],}";
    let (s, v) = put_policy(&w, &ann, good).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");

    let bad = "{\n  \"acls\": [\n    {\"src\": [\"group:ops\"], \"dst\": [\"*:22\"]}\n  ]\n}";
    let (s, v) = put_policy(&w, &w.owner, bad).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("line 3") && msg.contains("unknown group \"group:ops\""),
        "{msg}"
    );
    let failing = "{\"acls\": [{\"src\": [\"ann\"], \"dst\": [\"*:22\"]}],\n \"tests\": [{\"src\": \"ann\", \"accept\": [\"100.64.0.9:80\"]}]}";
    let (s, v) = put_policy(&w, &w.owner, failing).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 2: test failed"),
        "{v}"
    );
    let (s, v) = put_policy(
        &w,
        &w.owner,
        "{\"acls\": [{\"src\": [\"nobody\"], \"dst\": [\"*:22\"]}]}",
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("neither a member"),
        "{v}"
    );
    let huge = format!("{{\"hosts\": {{\"a\": \"{}\"}}}}", "x".repeat(300 * 1024));
    let (s, v) = put_policy(&w, &w.owner, &huge).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_eq!(
        w.owner_call("GET", POLICY, None).await["default"],
        json!(true),
        "nothing changed"
    );

    // A check changes nothing either; a good policy then goes in, with its
    // diff in the audit log.
    let (s, v) = test_support::call(
        &w.state,
        Some(&ann),
        "POST",
        &format!("{POLICY}/check"),
        Some(good.into()),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["rules"], json!(1));
    assert_eq!(
        w.owner_call("GET", POLICY, None).await["default"],
        json!(true)
    );
    let (s, v) = put_policy(&w, &w.owner, good).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let doc = w.owner_call("GET", POLICY, None).await;
    assert_eq!(doc["policy"].as_str(), Some(good));
    let audit = w
        .owner_call("GET", "/api/v1/networks/home/audit", None)
        .await;
    let event = audit
        .as_array()
        .and_then(|a| a.iter().find(|e| e["action"] == "policy.set"))
        .unwrap_or_else(|| panic!("no policy.set event: {audit}"));
    let diff = event["new"].as_str().unwrap_or_default();
    assert!(
        diff.contains("+// ssh only") && diff.contains("-    { \"action\": \"accept\""),
        "{event}"
    );
}

#[tokio::test]
async fn a_policy_change_reaches_exactly_the_devices_it_concerns() {
    let w = World::new().await;
    let ann = w.join("home", "ann", "member").await;
    let bob = w.join("home", "bob", "member").await;
    let a = w.device(&w.owner.clone(), "home", "a").await;
    let b = w.device(&ann, "home", "b").await;
    let c = w.device(&bob, "home", "c").await;
    let addr = test_support::serve(&w.state).await;
    let (mut sa, mut sb, mut sc) = (
        stream(addr, &a).await,
        stream(addr, &b).await,
        stream(addr, &c).await,
    );

    // Only a → b on 8421: c loses both peers, a and b lose c, and b's
    // filter lets a in on 8421 only.
    let text = "{\"acls\": [{\"src\": [\"admin\"], \"dst\": [\"ann:8421\"], \"proto\": \"tcp\"}]}";
    let (s, v) = put_policy(&w, &w.owner, text).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (a_key, b_key, c_key) = (a.node.public(), b.node.public(), c.node.public());
    let gone = |key: platform::keys::NodePublic| {
        move |m: &ServerMessage| match m {
            ServerMessage::Delta { changes } => changes
                .iter()
                .any(|ch| matches!(ch, PeerChange::Removed { node_key } if *node_key == key))
                .then_some(()),
            _ => None,
        }
    };
    until(&mut sa, gone(c_key)).await;
    // c loses both (in one delta or two).
    let mut lost = std::collections::BTreeSet::new();
    until(&mut sc, |m| {
        if let ServerMessage::Delta { changes } = m {
            for ch in changes {
                if let PeerChange::Removed { node_key } = ch {
                    lost.insert(*node_key);
                }
            }
        }
        (lost.contains(&a_key) && lost.contains(&b_key)).then_some(())
    })
    .await;
    let filter = until(&mut sb, |m| match m {
        ServerMessage::Filter { filter } => Some(filter.clone()),
        _ => None,
    })
    .await;
    assert_eq!(filter.rules.len(), 1, "{filter:?}");
    assert_eq!(filter.rules[0].protos, vec![Proto::Tcp]);
    assert_eq!(filter.rules[0].ports[0].to_string(), "8421");
    let a_addrs = &w
        .state
        .store
        .device("home", a.id)
        .await
        .unwrap()
        .addresses()
        .unwrap();
    assert!(a_addrs
        .iter()
        .all(|ip| filter.rules[0].sources.iter().any(|p| p.contains(*ip))));

    // What is left of the first change (b's removal of c, if it came after
    // the filter).
    for ws in [&mut sa, &mut sb] {
        while tokio::time::timeout(std::time::Duration::from_millis(300), next_msg_any(ws))
            .await
            .is_ok()
        {}
    }
    // A change that concerns only c's owner: a and b hear nothing new.
    let text2 = "{\"acls\": [{\"src\": [\"admin\"], \"dst\": [\"ann:8421\"], \"proto\": \"tcp\"}, {\"src\": [\"bob\"], \"dst\": [\"bob:*\"]}]}";
    let (s, v) = put_policy(&w, &w.owner, text2).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    for ws in [&mut sa, &mut sb] {
        let quiet =
            tokio::time::timeout(std::time::Duration::from_millis(300), next_msg_any(ws)).await;
        assert!(quiet.is_err(), "an unaffected device heard {quiet:?}");
    }
    // A new device of ann's appears to a (a may reach ann's devices) at once.
    let b2 = w.device(&ann, "home", "b2").await;
    let b2_key = b2.node.public();
    until(&mut sa, |m| match m {
        ServerMessage::Delta { changes } => changes
            .iter()
            .any(|ch| matches!(ch, PeerChange::Upsert { node } if node.node_key == b2_key))
            .then_some(()),
        _ => None,
    })
    .await;
}

async fn evaluate(w: &World, src: &str, dst: &str) -> Value {
    let body = json!({"src": src, "dst": dst});
    ok(call(
        &w.state,
        Some(&w.owner),
        "POST",
        &format!("{POLICY}/evaluate"),
        Some(body),
    )
    .await)
}

#[tokio::test]
async fn tags_come_from_admins_owners_and_keys_and_select_devices() {
    let w = World::new().await;
    let ann = w.join("home", "ann", "member").await;
    let bob = w.join("home", "bob", "member").await;
    let text = "{\"tags\": {\"tag:gpu\": [\"ann\"]}, \"acls\": [{\"src\": [\"autogroup:member\"], \"dst\": [\"tag:gpu:8421\"]}]}";
    let (s, v) = put_policy(&w, &w.owner, text).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let d = w.device(&bob, "home", "box").await;
    let tags = |id: i64| format!("/api/v1/networks/home/devices/{id}/tags");
    let (s, v) = call(
        &w.state,
        Some(&bob),
        "PUT",
        &tags(d.id),
        Some(json!({"tags": ["tag:gpu"]})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "bob does not own tag:gpu: {v}");
    let (s, v) = call(
        &w.state,
        Some(&ann),
        "PUT",
        &tags(d.id),
        Some(json!({"tags": ["tag:cpu"]})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // ann owns the tag but not bob's device: a tag would take bob's
    // identity from it.
    let (s, v) = call(
        &w.state,
        Some(&ann),
        "PUT",
        &tags(d.id),
        Some(json!({"tags": ["tag:gpu"]})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let mine = w.device(&ann, "home", "anns").await;
    let v = ok(call(
        &w.state,
        Some(&ann),
        "PUT",
        &tags(mine.id),
        Some(json!({"tags": ["tag:gpu"]})),
    )
    .await);
    assert_eq!(v["tags"], json!(["tag:gpu"]));
    let v = ok(call(
        &w.state,
        Some(&w.owner),
        "PUT",
        &tags(d.id),
        Some(json!({"tags": ["tag:gpu"]})),
    )
    .await);
    assert_eq!(v["tags"], json!(["tag:gpu"]), "admins tag any device");

    // A key with tags gives them to what it registers; only owners make one.
    let (s, _) = call(
        &w.state,
        Some(&bob),
        "POST",
        "/api/v1/networks/home/preauth-keys",
        Some(json!({"tags": ["tag:gpu"]})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let key = ok(call(
        &w.state,
        Some(&ann),
        "POST",
        "/api/v1/networks/home/preauth-keys",
        Some(json!({"tags": ["tag:gpu"]})),
    )
    .await)["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let (dev, node) = (
        platform::keys::DevicePrivate::generate(),
        platform::keys::NodePrivate::generate(),
    );
    let body = test_support::register_body(&dev, &node, &key, "gpu2", platform::unix_now());
    let v = ok(test_support::call(&w.state, None, "POST", "/api/v1/register", Some(body)).await);
    let row = w
        .state
        .store
        .device("home", v["device_id"].as_i64().unwrap())
        .await
        .unwrap();
    assert_eq!(row.tags().unwrap(), vec!["tag:gpu".to_owned()]);

    // The tagged box is a destination for members, and no longer bob's own.
    let v = evaluate(&w, "bob", "box:8421").await;
    assert_eq!(
        (v["allowed"].clone(), v["line"].clone()),
        (json!(true), json!(1))
    );
    assert_eq!(evaluate(&w, "bob", "box:22").await["allowed"], json!(false));
    let (s, _) = call(
        &w.state,
        Some(&w.owner),
        "POST",
        &format!("{POLICY}/evaluate"),
        Some(json!({"src": "group:x", "dst": "box:1"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn dns_settings_are_checked_and_reach_devices() {
    let w = World::new().await;
    let a = w.device(&w.owner.clone(), "home", "a").await;
    let addr = test_support::serve(&w.state).await;
    let mut sa = stream(addr, &a).await;
    let dns = "/api/v1/networks/home/dns";
    assert_eq!(
        w.owner_call("GET", dns, None).await["suffix"],
        json!("crank.internal")
    );
    let (s, v) = call(
        &w.state,
        Some(&w.owner),
        "PUT",
        dns,
        Some(json!({"extra_records": [{"name": "bad name", "address": "10.0.0.1"}]})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = call(
        &w.state,
        Some(&w.owner),
        "PUT",
        dns,
        Some(json!({"split": {"corp.example": []}})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let set = json!({
        "extra_records": [{"name": "printer", "address": "100.64.9.9"}],
        "split": {"corp.example": ["10.1.0.53:53"]},
    });
    w.owner_call("PUT", dns, Some(set)).await;
    let map = until(&mut sa, |m| match m {
        ServerMessage::Full { netmap } => Some(netmap.clone()),
        _ => None,
    })
    .await;
    assert_eq!(map.dns.suffix, "crank.internal");
    assert_eq!(map.dns.zone("home").as_deref(), Some("home.crank.internal"));
    assert_eq!(map.dns.extra_records[0].name, "printer");
    assert_eq!(map.dns.split["corp.example"][0].to_string(), "10.1.0.53:53");
}
