//! People in a network, end to end in network namespaces: an admin removes
//! a device under a running ping (peers and the relay drop it within 5 s),
//! a device that needs approval has no peers until approved (then is
//! reached within 2 s), and a member of one network learns nothing about
//! another. Needs root; run serially.

use std::time::{Duration, Instant};

use crank_e2e::{run_lab, wait_until, Coordinator, Device, Lab, Relay};
use serde_json::{json, Value};

/// Calls the coordinator's API as the holder of `token`; returns the status
/// and the JSON body.
fn api_as(
    coord: &Coordinator,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let url = format!("{}{path}", coord.url);
    let auth = format!("authorization: Bearer {token}");
    let body = body.map(|b| b.to_string());
    let mut args = vec![
        "-sS",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "-X",
        method,
        "-H",
        &auth,
        "-H",
        "content-type: application/json",
    ];
    if let Some(b) = &body {
        args.extend(["--data", b]);
    }
    args.push(&url);
    let out = coord.host.run("curl", &args)?;
    let (text, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
    Ok((
        code.parse()?,
        serde_json::from_str(text).unwrap_or(Value::Null),
    ))
}

fn ok(
    coord: &Coordinator,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let (status, v) = api_as(coord, token, method, path, body)?;
    anyhow::ensure!(
        (200..300).contains(&status),
        "{method} {path}: {status} {v}"
    );
    Ok(v)
}

fn up_with(dev: &Device, coord: &Coordinator, key: &str) -> anyhow::Result<String> {
    dev.meshd(&[
        "up",
        "--coordinator",
        &coord.url,
        "--auth-key",
        key,
        "--hostname",
        &dev.host.name,
    ])
}

/// A new member of `network`, approved; returns their token.
fn member(coord: &Coordinator, network: &str, name: &str) -> anyhow::Result<String> {
    let inv = ok(
        coord,
        &coord.admin_token,
        "POST",
        &format!("/api/v1/networks/{network}/invites"),
        Some(json!({"role": "member"})),
    )?;
    let secret = inv["secret"].as_str().unwrap_or_default();
    // Redeeming needs no token: the link is the credential.
    let url = format!("{}/api/v1/invites/{secret}/redeem", coord.url);
    let body = json!({"username": name}).to_string();
    let mut args = vec![
        "-sS",
        "--fail-with-body",
        "-H",
        "content-type: application/json",
        "--data",
        &body,
    ];
    if let Some(ca) = &coord.ca_file {
        args.extend(["--cacert", ca.to_str().unwrap_or_default()]);
    }
    args.push(&url);
    let red: Value = serde_json::from_str(&coord.host.run("curl", &args)?)?;
    ok(
        coord,
        &coord.admin_token,
        "POST",
        &format!("/api/v1/networks/{network}/members/{name}/approve"),
        None,
    )?;
    Ok(red["token"].as_str().unwrap_or_default().to_owned())
}

fn device_id(coord: &Coordinator, network: &str, name: &str) -> anyhow::Result<i64> {
    let list = ok(
        coord,
        &coord.admin_token,
        "GET",
        &format!("/api/v1/networks/{network}/devices"),
        None,
    )?;
    list.as_array()
        .and_then(|l| l.iter().find(|d| d["name"] == name))
        .and_then(|d| d["id"].as_i64())
        .ok_or_else(|| anyhow::anyhow!("no device {name} in {list}"))
}

#[test]
fn removal_approval_and_isolation() {
    run_lab(scenario);
}

fn scenario(lab: &mut Lab) -> anyhow::Result<()> {
    let coord_host = lab.host("coord", 1)?;
    let relay_host = lab.host("relay", 2)?;
    let map = Relay::map_json(relay_host.addr);
    let coord = Coordinator::start_with_relays(lab, coord_host, "home", Some(&map))?;
    let relay = Relay::start(lab, relay_host, &coord)?;

    let mut devices = Vec::new();
    for (i, name) in ["alpha", "beta"].iter().enumerate() {
        let host = lab.host(name, 11 + i as u8)?;
        let dev = Device::start(lab, host)?;
        dev.up(&coord)?;
        devices.push(dev);
    }
    let (alpha, beta) = (&devices[0], &devices[1]);
    let (b4, _) = beta.overlay()?;
    wait_until(Duration::from_secs(15), "alpha reaches beta", || {
        alpha.host.ping(&b4)
    })?;
    for d in [alpha, beta] {
        let peer = if d.host.name == "alpha" {
            "beta"
        } else {
            "alpha"
        };
        let p = d
            .peer(peer)?
            .ok_or_else(|| anyhow::anyhow!("{peer} missing"))?;
        anyhow::ensure!(p["owner"] == "admin", "peers show their owner: {p}");
    }

    // An admin removes beta while alpha pings it: within 5 s alpha has
    // dropped it, pings fail, and the relay heard the revocation.
    let revoked_before = relay_counter(&relay, "derp_revocations_total")?;
    let id = device_id(&coord, "home", "beta")?;
    let start = Instant::now();
    ok(
        &coord,
        &coord.admin_token,
        "DELETE",
        &format!("/api/v1/networks/home/devices/{id}"),
        None,
    )?;
    wait_until(Duration::from_secs(5), "alpha drops beta", || {
        alpha.peer("beta").is_ok_and(|p| p.is_none())
    })?;
    wait_until(Duration::from_secs(5), "the relay drops beta", || {
        relay_counter(&relay, "derp_revocations_total").is_ok_and(|n| n > revoked_before)
    })?;
    anyhow::ensure!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    eprintln!(
        "beta dropped by alpha and the relay {:?} after removal",
        start.elapsed()
    );
    anyhow::ensure!(
        !alpha.host.ping(&b4),
        "beta is still reachable after removal"
    );
    // It cannot come back on its own: the denylist refuses it.
    let err = up_with(beta, &coord, &coord.auth_key).expect_err("a removed device re-registered");
    anyhow::ensure!(
        format!("{err:#}").contains("re-approve"),
        "unclear refusal: {err:#}"
    );

    // Devices now need approval; a member's new device waits with no peers.
    ok(
        &coord,
        &coord.admin_token,
        "PATCH",
        "/api/v1/networks/home/settings",
        Some(json!({"require_device_approval": true})),
    )?;
    let bob = member(&coord, "home", "bob")?;
    let key = ok(
        &coord,
        &bob,
        "POST",
        "/api/v1/networks/home/preauth-keys",
        Some(json!({})),
    )?;
    let gamma_host = lab.host("gamma", 13)?;
    let gamma = Device::start(lab, gamma_host)?;
    up_with(&gamma, &coord, key["key"].as_str().unwrap_or_default())?;
    let (g4, _) = gamma.overlay()?;
    std::thread::sleep(Duration::from_secs(2));
    let st = gamma.status()?;
    anyhow::ensure!(
        st["peers"].as_array().is_some_and(|p| p.is_empty()),
        "unapproved gamma has peers: {st}"
    );
    anyhow::ensure!(
        alpha.peer("gamma")?.is_none(),
        "alpha knows unapproved gamma"
    );
    anyhow::ensure!(!alpha.host.ping(&g4), "alpha reached unapproved gamma");
    let id = device_id(&coord, "home", "gamma")?;
    ok(
        &coord,
        &coord.admin_token,
        "POST",
        &format!("/api/v1/networks/home/devices/{id}/approve"),
        None,
    )?;
    let approved = Instant::now();
    wait_until(
        Duration::from_secs(2),
        "alpha reaches gamma after approval",
        || alpha.host.ping(&g4),
    )?;
    eprintln!("gamma reached {:?} after approval", approved.elapsed());

    // Network B: bob (a member of A) learns nothing about it, and its
    // devices are unreachable from A.
    ok(
        &coord,
        &coord.admin_token,
        "POST",
        "/api/v1/networks",
        Some(json!({"name": "lab"})),
    )?;
    let lab_key = ok(
        &coord,
        &coord.admin_token,
        "POST",
        "/api/v1/networks/lab/preauth-keys",
        Some(json!({})),
    )?;
    let delta_host = lab.host("delta", 14)?;
    let delta = Device::start(lab, delta_host)?;
    up_with(&delta, &coord, lab_key["key"].as_str().unwrap_or_default())?;
    let (d4, _) = delta.overlay()?;
    for path in [
        "/api/v1/networks/lab",
        "/api/v1/networks/lab/devices",
        "/api/v1/networks/lab/members",
    ] {
        let (status, body) = api_as(&coord, &bob, "GET", path, None)?;
        anyhow::ensure!(status == 404, "bob got {status} for {path}: {body}");
    }
    let nets = ok(&coord, &bob, "GET", "/api/v1/networks", None)?;
    anyhow::ensure!(
        nets.as_array()
            .is_some_and(|n| n.len() == 1 && n[0]["name"] == "home"),
        "bob sees {nets}"
    );
    anyhow::ensure!(
        alpha.peer("delta")?.is_none() && delta.peer("alpha")?.is_none(),
        "networks leak peers"
    );
    anyhow::ensure!(
        !alpha.host.ping(&d4),
        "alpha reached a device of another network"
    );
    Ok(())
}

fn relay_counter(relay: &Relay, name: &str) -> anyhow::Result<u64> {
    let text = relay.metrics()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name).map(str::trim))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no {name} in relay metrics"))
}
