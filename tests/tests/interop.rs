//! Interop: a stock WireGuard device (Debian's `wireguard-go`, configured
//! with `wg` from the coordinator's wg-quick config) and a meshd device, in
//! network namespaces. Needs root; run serially.

use std::time::Duration;

use crank_e2e::{bin, run_lab, wait_until, Coordinator, Device, Host, Lab};

const WG_PORT: u16 = 51820;

#[test]
fn meshd_and_wireguard_go_interoperate() {
    run_lab(scenario);
}

fn scenario(lab: &mut Lab) -> anyhow::Result<()> {
    let coord_host = lab.host("coord", 1)?;
    let coord = Coordinator::start(lab, coord_host, "home")?;
    let alpha_host = lab.host("alpha", 11)?;
    let alpha = Device::start(lab, alpha_host)?;
    alpha.up(&coord)?;
    let (a4, a6) = alpha.overlay()?;

    // The stock device's config needs alpha's endpoint: wait until reported.
    wait_until(
        Duration::from_secs(15),
        "alpha's endpoints at the coordinator",
        || {
            coord
                .api("GET", "/api/v1/networks/home/devices", None)
                .is_ok_and(|v| v[0]["endpoints"].as_array().is_some_and(|e| !e.is_empty()))
        },
    )?;

    let wg = lab.host("wgpeer", 30)?;
    let private = wg.run("wg", &["genkey"])?.trim().to_owned();
    let public = wg
        .run("bash", &["-c", &format!("echo {private} | wg pubkey")])?
        .trim()
        .to_owned();
    let body = serde_json::json!({
        "name": "wgpeer",
        "public_key": public,
        "endpoint": format!("{}:{WG_PORT}", wg.addr),
    });
    let created = coord.api(
        "POST",
        "/api/v1/networks/home/wireguard-peers",
        Some(&body.to_string()),
    )?;
    let config = created["wg_quick_config"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no config: {created}"))?;
    anyhow::ensure!(
        config.contains(&format!("Endpoint = {}:41641", alpha.host.addr)),
        "config lacks alpha's endpoint:\n{config}"
    );
    let config = config.replace(coordinator::wgquick::PRIVATE_KEY_PLACEHOLDER, &private);
    let conf_path = lab.dir.join("wg0.conf");
    std::fs::write(&conf_path, &config)?;

    // What wg-quick would do, step by step, with wireguard-go as the device.
    lab.spawn(
        &wg,
        std::path::Path::new("env"),
        &[
            "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1",
            "wireguard-go",
            "-f",
            "wg0",
        ],
        "wireguard-go.log",
    )?;
    wait_until(Duration::from_secs(10), "wg0 to appear", || {
        wg.succeeds("ip", &["link", "show", "wg0"])
    })?;
    let stripped = wg.run(
        "wg-quick",
        &["strip", conf_path.to_str().unwrap_or_default()],
    )?;
    let stripped_path = lab.dir.join("wg0.stripped");
    std::fs::write(&stripped_path, stripped)?;
    wg.run(
        "wg",
        &["setconf", "wg0", stripped_path.to_str().unwrap_or_default()],
    )?;
    let field = |name: &str| -> Vec<String> {
        config
            .lines()
            .filter_map(|l| l.strip_prefix(name))
            .flat_map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_owned())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    for addr in field("Address = ") {
        wg.run("ip", &["addr", "add", &addr, "dev", "wg0"])?;
    }
    wg.run("ip", &["link", "set", "wg0", "mtu", "1420", "up"])?;
    for allowed in field("AllowedIPs = ") {
        wg.run("ip", &["route", "add", &allowed, "dev", "wg0"])?;
    }
    let wg_overlay = created["device"]["addresses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let w4 = wg_overlay
        .first()
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    let w6 = wg_overlay
        .get(1)
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();

    // Ping both ways, both families.
    let pings = |from: &Host, to: &str| {
        wait_until(
            Duration::from_secs(10),
            &format!("{} → {to}", from.name),
            || from.ping(to),
        )
    };
    pings(&alpha.host, &w4)?;
    pings(&wg, &a4)?;
    pings(&wg, &a6)?;
    pings(&alpha.host, &w6)?;
    let handshakes = wg.run("wg", &["show", "wg0", "latest-handshakes"])?;
    anyhow::ensure!(
        handshakes
            .split_whitespace()
            .nth(1)
            .is_some_and(|t| t != "0"),
        "no handshake in wg: {handshakes}"
    );

    // TCP both ways: 4 MB each, checked end to end.
    let httpd = bin("overlay-httpd");
    lab.spawn(
        &alpha.host,
        &httpd,
        &[&format!("{a4}:8000"), "alpha"],
        "httpd-alpha.log",
    )?;
    lab.spawn(
        &wg,
        &httpd,
        &[&format!("{w4}:8000"), "wgpeer"],
        "httpd-wg.log",
    )?;
    alpha.host.wait_tcp(&a4, 8000, Duration::from_secs(5))?;
    wg.wait_tcp(&w4, 8000, Duration::from_secs(5))?;
    crank_e2e::transfer(lab, &wg, &format!("http://{a4}:8000"), 4 << 20)?;
    crank_e2e::transfer(lab, &alpha.host, &format!("http://{w4}:8000"), 4 << 20)?;

    let peer = alpha
        .peer("wgpeer")?
        .ok_or_else(|| anyhow::anyhow!("alpha does not list wgpeer"))?;
    anyhow::ensure!(peer["kind"] == "wireguard", "{peer}");
    anyhow::ensure!(
        peer["rx_bytes"].as_u64().unwrap_or(0) > 4 << 20,
        "rx bytes: {peer}"
    );
    Ok(())
}
