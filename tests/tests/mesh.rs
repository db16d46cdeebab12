//! A coordinator and meshd devices in network namespaces on one bridge.
//! Needs root; run serially (`--test-threads=1`).

use std::time::{Duration, Instant};

use crank_e2e::{bin, run_lab, serve_http, transfer, wait_until, Coordinator, Device, Lab};

/// Pings `target` from `from` until it answers or `timeout` passes.
fn reaches(from: &Device, target: &str, timeout: Duration) -> bool {
    wait_until(timeout, target, || from.host.ping(target)).is_ok()
}

#[test]
fn mesh_of_devices_in_namespaces() {
    run_lab(scenario);
}

fn scenario(lab: &mut Lab) -> anyhow::Result<()> {
    let coord_host = lab.host("coord", 1)?;
    let coord = Coordinator::start(lab, coord_host, "home")?;

    let mut devices = Vec::new();
    for (i, name) in ["alpha", "beta", "gamma"].iter().enumerate() {
        let host = lab.host(name, 11 + i as u8)?;
        let dev = Device::start(lab, host)?;
        dev.up(&coord)?;
        devices.push(dev);
    }
    let addrs: Vec<(String, String)> = devices
        .iter()
        .map(Device::overlay)
        .collect::<anyhow::Result<_>>()?;

    // Every pair, both address families.
    for (i, from) in devices.iter().enumerate() {
        for (j, (v4, v6)) in addrs.iter().enumerate() {
            if i == j {
                continue;
            }
            anyhow::ensure!(
                reaches(from, v4, Duration::from_secs(10)),
                "{} cannot ping {v4}",
                from.host.name
            );
            anyhow::ensure!(
                reaches(from, v6, Duration::from_secs(10)),
                "{} cannot ping {v6}",
                from.host.name
            );
        }
    }

    // HTTP over the overlay: gamma serves on its overlay address only.
    let httpd = bin("overlay-httpd");
    let listen = format!("{}:8000", addrs[2].0);
    lab.spawn(
        &devices[2].host,
        &httpd,
        &[&listen, "gamma"],
        "httpd-gamma.log",
    )?;
    devices[2]
        .host
        .wait_tcp(&addrs[2].0, 8000, Duration::from_secs(5))?;
    let page = devices[0].host.run(
        "curl",
        &["-sS", "--max-time", "10", &format!("http://{listen}/")],
    )?;
    anyhow::ensure!(page.contains("hello from gamma"), "unexpected page: {page}");
    anyhow::ensure!(
        page.contains(&format!("you are {}", addrs[0].0)),
        "caller address not preserved: {page}"
    );

    // Status shows handshakes and traffic.
    let beta = devices[0]
        .peer("beta")?
        .ok_or_else(|| anyhow::anyhow!("alpha does not list beta"))?;
    anyhow::ensure!(
        beta["online"] == true,
        "beta not online in alpha's status: {beta}"
    );
    anyhow::ensure!(
        beta["last_handshake_secs_ago"].is_u64(),
        "no handshake with beta: {beta}"
    );
    anyhow::ensure!(
        beta["rx_bytes"].as_u64().unwrap_or(0) > 0,
        "no bytes from beta: {beta}"
    );
    anyhow::ensure!(beta["endpoint"] == "10.99.0.12:41641", "endpoint: {beta}");

    // A fourth device joins later: the others reach it within 2 s of its `up`.
    let host = lab.host("delta", 14)?;
    let mut delta = Device::start(lab, host)?;
    delta.up(&coord)?;
    let joined = Instant::now();
    let (d4, d6) = delta.overlay()?;
    for from in &devices {
        let left = Duration::from_secs(2)
            .saturating_sub(joined.elapsed())
            .max(Duration::from_millis(200));
        anyhow::ensure!(
            reaches(from, &d4, left),
            "{} did not reach the new device within 2 s",
            from.host.name
        );
    }
    anyhow::ensure!(
        reaches(&devices[1], &d6, Duration::from_secs(2)),
        "beta cannot reach delta over IPv6"
    );

    // Garbage sent at a device's WireGuard port is dropped and counted.
    let target = format!("/dev/udp/{}/41641", devices[0].host.addr);
    delta.host.run(
        "bash",
        &[
            "-c",
            &format!("for i in 1 2 3; do printf 'garbage%.0s' {{1..20}} > {target}; done"),
        ],
    )?;
    wait_until(Duration::from_secs(5), "malformed packets counted", || {
        devices[0]
            .status()
            .is_ok_and(|s| s["counters"]["drop_malformed"].as_u64().unwrap_or(0) >= 3)
    })?;
    anyhow::ensure!(
        reaches(&devices[0], &addrs[1].0, Duration::from_secs(5)),
        "garbage disturbed the tunnel"
    );

    // A stopped device shows offline in the others' status within the grace period.
    delta.stop(lab);
    let stopped = Instant::now();
    wait_until(
        Duration::from_secs(25),
        "delta offline in alpha's status",
        || {
            devices[0]
                .peer("delta")
                .ok()
                .flatten()
                .is_some_and(|p| p["online"] == false)
        },
    )?;
    eprintln!("delta offline after {:?}", stopped.elapsed());

    // Re-registering (restart + up again) keeps its addresses.
    delta.restart(lab)?;
    delta.up(&coord)?;
    anyhow::ensure!(
        delta.overlay()? == (d4.clone(), d6),
        "addresses changed on re-registration"
    );
    wait_until(Duration::from_secs(10), "delta online again", || {
        devices[0]
            .peer("delta")
            .ok()
            .flatten()
            .is_some_and(|p| p["online"] == true)
    })?;
    anyhow::ensure!(
        reaches(&devices[0], &d4, Duration::from_secs(5)),
        "alpha cannot reach delta after its restart"
    );

    // The coordinator lists all four.
    let listed = coord.api("GET", "/api/v1/networks/home/devices", None)?;
    anyhow::ensure!(
        listed.as_array().map(Vec::len) == Some(4),
        "device list: {listed}"
    );
    Ok(())
}

/// The data plane carries TCP both ways, over IPv4 and IPv6, large UDP
/// datagrams and ICMP intact with the TUN offloads on: the kernel hands
/// meshd TCP super-packets, which it splits; the receiver coalesces
/// segments back into super-packets; every byte arrives.
#[test]
fn offloaded_traffic_arrives_intact_both_ways() {
    run_lab(|lab| {
        let coord_host = lab.host("coord", 1)?;
        let coord = Coordinator::start(lab, coord_host, "home")?;
        let (a, b) = (lab.host("alpha", 11)?, lab.host("beta", 12)?);
        let alpha = Device::start(lab, a)?;
        let beta = Device::start(lab, b)?;
        alpha.up(&coord)?;
        beta.up(&coord)?;
        let (a4, a6) = alpha.overlay()?;
        let (b4, b6) = beta.overlay()?;
        for target in [&b4, &b6] {
            anyhow::ensure!(
                reaches(&alpha, target, Duration::from_secs(10)),
                "no ping to {target}"
            );
        }
        let offloads = alpha.status()?["offloads"].clone();
        anyhow::ensure!(
            offloads["vnet_hdr"] == true && offloads["checksum"] == true && offloads["tso"] == true,
            "offloads: {offloads}"
        );
        // TCP both ways, both families (the sender's kernel segments less).
        for (server, client, v4, v6) in [(&beta, &alpha, &b4, &b6), (&alpha, &beta, &a4, &a6)] {
            let url = serve_http(lab, &server.host, v4)?;
            transfer(lab, &client.host, &url, 8 << 20)?;
            lab.spawn(
                &server.host,
                &bin("overlay-httpd"),
                &[&format!("[{v6}]:8001"), &server.host.name],
                &format!("httpd6-{}.log", server.host.name),
            )?;
            server.host.wait_tcp(v6, 8001, Duration::from_secs(5))?;
            transfer(lab, &client.host, &format!("http://[{v6}]:8001"), 8 << 20)?;
        }
        for d in [&alpha, &beta] {
            let c = d.status()?["counters"].clone();
            anyhow::ensure!(
                c["tun_super_packets"].as_u64().unwrap_or(0) > 0,
                "{}: no super-packets split: {c}",
                d.host.name
            );
            anyhow::ensure!(
                c["tun_coalesced"].as_u64().unwrap_or(0) > 0,
                "{}: no received segments coalesced: {c}",
                d.host.name
            );
            anyhow::ensure!(c["drop_tun_malformed"] == 0, "{}: {c}", d.host.name);
        }
        // UDP datagrams up to 60,000 bytes (IP-fragmented before meshd).
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/udp-echo.py");
        let script = script.to_str().unwrap_or_default().to_owned();
        for addr in [&b4, &b6] {
            lab.spawn(
                &beta.host,
                std::path::Path::new("/usr/bin/python3"),
                &[&script, "serve", addr, "9999"],
                &format!("udp-echo-{}.log", addr.len()),
            )?;
            std::thread::sleep(Duration::from_millis(300));
            let out = alpha
                .host
                .run("python3", &[&script, "check", addr, "9999"])?;
            anyhow::ensure!(out.trim() == "ok", "UDP over {addr}: {out}");
        }
        Ok(())
    });
}
