//! Node keys over their life, end to end: `meshd rotate-key` in the middle
//! of a TCP stream, an admin rotating every key of the network, and
//! device-code pairing (`meshd up` without a key).
//! Needs root; run serially (`--test-threads=1`).

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use crank_e2e::{bin, run_lab, wait_until, Coordinator, Device, Lab, Relay};
use serde_json::Value;

/// A coordinator with a relay, and two devices up on it.
fn network(lab: &mut Lab) -> anyhow::Result<(Coordinator, Device, Device)> {
    let coord_host = lab.host("coord", 1)?;
    let relay_host = lab.host("relay", 2)?;
    let map = Relay::map_json(relay_host.addr);
    let coord = Coordinator::start_with_relays(lab, coord_host, "home", Some(&map))?;
    Relay::start(lab, relay_host, &coord)?;
    let alpha_host = lab.host("alpha", 11)?;
    let alpha = Device::start(lab, alpha_host)?;
    alpha.up(&coord)?;
    let beta_host = lab.host("beta", 12)?;
    let beta = Device::start(lab, beta_host)?;
    beta.up(&coord)?;
    Ok((coord, alpha, beta))
}

fn own_key(d: &Device) -> anyhow::Result<String> {
    d.status()?["self"]["node_key"]
        .as_str()
        .map(str::to_owned)
        .context("no node key in status")
}

/// The key `d` knows its peer `name` by.
fn peer_key(d: &Device, name: &str) -> String {
    d.peer(name)
        .ok()
        .flatten()
        .and_then(|p| p["node_key"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn on_home_relay(d: &Device, timeout: Duration) -> anyhow::Result<()> {
    wait_until(
        timeout,
        &format!("{} on its home relay", d.host.name),
        || {
            d.status()
                .is_ok_and(|s| s["self"]["home_relay_connected"] == true)
        },
    )
}

/// The longest run of consecutive receiver intervals in which (almost)
/// nothing arrived, in seconds.
fn longest_stall(server_intervals: &[Value], bits_per_second: f64) -> f64 {
    let mut longest: f64 = 0.0;
    let mut current = 0.0;
    for i in server_intervals {
        let secs = i["sum"]["seconds"].as_f64().unwrap_or(0.0);
        let bytes = i["sum"]["bytes"].as_f64().unwrap_or(0.0);
        if bytes < 0.05 * bits_per_second / 8.0 * secs {
            current += secs;
            longest = longest.max(current);
        } else {
            current = 0.0;
        }
    }
    longest
}

#[test]
fn rotation_mid_transfer_and_by_an_admin() {
    run_lab(|lab| {
        let (coord, alpha, beta) = network(lab)?;
        on_home_relay(&alpha, Duration::from_secs(15))?;
        let (b4, _) = beta.overlay()?;
        let (a4, _) = alpha.overlay()?;
        wait_until(Duration::from_secs(10), "alpha reaches beta", || {
            alpha.host.ping(&b4)
        })?;
        let old = own_key(&alpha)?;
        anyhow::ensure!(peer_key(&beta, "alpha") == old, "beta knows alpha's key");

        // A rate-limited TCP stream alpha → beta, reported by the receiver
        // every half second; the key changes two seconds in.
        const RATE: f64 = 20e6;
        const SECS: f64 = 6.0;
        lab.spawn(
            &beta.host,
            Path::new("iperf3"),
            &["-s", "-B", &b4, "-i", "0.5", "-J"],
            "iperf3-beta.log",
        )?;
        beta.host.wait_tcp(&b4, 5201, Duration::from_secs(5))?;
        let client = {
            let (host, target) = (alpha.host.clone(), b4.clone());
            std::thread::spawn(move || -> anyhow::Result<Value> {
                let out = host.run(
                    "iperf3",
                    &[
                        "-c",
                        &target,
                        "-t",
                        "6",
                        "-b",
                        "20M",
                        "-i",
                        "0.5",
                        "-J",
                        "--get-server-output",
                    ],
                )?;
                Ok(serde_json::from_str(&out)?)
            })
        };
        std::thread::sleep(Duration::from_secs(2));
        let rotated: Value = serde_json::from_str(&alpha.meshd(&["rotate-key", "--json"])?)?;
        let new = rotated["self"]["node_key"]
            .as_str()
            .context("no node key after rotation")?
            .to_owned();
        anyhow::ensure!(new != old, "rotate-key kept the key {old}");

        let report = client
            .join()
            .map_err(|_| anyhow::anyhow!("iperf3 thread panicked"))??;
        let server = &report["server_output_json"];
        let received = server["end"]["sum_received"]["bytes"]
            .as_f64()
            .or_else(|| report["end"]["sum_received"]["bytes"].as_f64())
            .unwrap_or(0.0);
        let intervals = server["intervals"].as_array().cloned().unwrap_or_default();
        let stall = longest_stall(&intervals, RATE);
        eprintln!(
            "TCP across the rotation: {received} bytes, longest stall {stall:.1} s over {} intervals",
            intervals.len()
        );
        anyhow::ensure!(!intervals.is_empty(), "no receiver report: {report}");
        anyhow::ensure!(
            received >= 0.7 * RATE * SECS / 8.0,
            "the stream lost too much at the rotation: {received} bytes"
        );
        anyhow::ensure!(stall <= 2.0, "the stream stalled for {stall:.1} s");
        let tail = intervals
            .last()
            .and_then(|i| i["sum"]["bits_per_second"].as_f64())
            .unwrap_or(0.0);
        anyhow::ensure!(tail > 0.5 * RATE, "nothing flowed at the end: {tail} bit/s");

        // Peers know the new key; the old one is gone everywhere.
        wait_until(Duration::from_secs(5), "beta shows alpha's new key", || {
            peer_key(&beta, "alpha") == new
        })?;
        anyhow::ensure!(own_key(&alpha)? == new, "alpha's status shows its new key");
        // The relay link came back under the new key.
        on_home_relay(&alpha, Duration::from_secs(10))?;
        anyhow::ensure!(
            beta.host.ping(&a4),
            "beta cannot reach alpha after the rotation"
        );

        // The new key survives a restart (it was stored before use).
        let mut alpha = alpha;
        alpha.restart(lab)?;
        wait_until(Duration::from_secs(15), "alpha back up", || {
            alpha.status().is_ok_and(|s| s["backend"] == "running")
        })?;
        anyhow::ensure!(own_key(&alpha)? == new, "alpha came back with another key");
        wait_until(
            Duration::from_secs(10),
            "alpha reaches beta after restart",
            || alpha.host.ping(&b4),
        )?;

        // An admin rotates every key of the network: both devices renew
        // and keep reaching each other.
        let before = (own_key(&alpha)?, own_key(&beta)?);
        coord.api(
            "POST",
            &format!("/api/v1/networks/{}/rotate-keys", coord.network),
            None,
        )?;
        wait_until(Duration::from_secs(10), "both devices renew", || {
            own_key(&alpha).is_ok_and(|k| k != before.0)
                && own_key(&beta).is_ok_and(|k| k != before.1)
        })?;
        wait_until(
            Duration::from_secs(5),
            "peers learn the renewed keys",
            || {
                own_key(&alpha).is_ok_and(|k| peer_key(&beta, "alpha") == k)
                    && own_key(&beta).is_ok_and(|k| peer_key(&alpha, "beta") == k)
            },
        )?;
        wait_until(
            Duration::from_secs(5),
            "alpha reaches beta after renewal",
            || alpha.host.ping(&b4),
        )?;

        Ok(())
    });
}

#[test]
fn pairing_by_device_code() {
    run_lab(|lab| {
        let (coord, alpha, _beta) = network(lab)?;
        let gamma_host = lab.host("gamma", 13)?;
        let gamma = Device::start(lab, gamma_host)?;

        // `meshd up` without a key waits for approval.
        let up = {
            let (host, socket, url) = (gamma.host.clone(), gamma.socket.clone(), coord.url.clone());
            let ca = coord.ca_file.clone();
            std::thread::spawn(move || {
                let meshd = bin("meshd");
                let mut args = vec![
                    "--socket",
                    &socket,
                    "up",
                    "--coordinator",
                    &url,
                    "--hostname",
                    "gamma",
                ];
                let ca = ca.as_deref().and_then(Path::to_str).map(str::to_owned);
                if let Some(ca) = &ca {
                    args.extend(["--ca-file", ca]);
                }
                host.run(meshd.to_str().unwrap_or_default(), &args)
            })
        };
        let mut code = String::new();
        wait_until(
            Duration::from_secs(10),
            "gamma shows its pairing code",
            || match gamma.status() {
                Ok(s) => match s["pairing"]["code"].as_str() {
                    Some(c) => {
                        code = c.to_owned();
                        true
                    }
                    None => false,
                },
                Err(_) => false,
            },
        )?;
        anyhow::ensure!(!up.is_finished(), "meshd up returned before approval");
        coord.api(
            "POST",
            &format!(
                "/api/v1/networks/{}/device-codes/{code}/approve",
                coord.network
            ),
            None,
        )?;
        let out = up
            .join()
            .map_err(|_| anyhow::anyhow!("meshd up panicked"))??;
        anyhow::ensure!(out.contains(&code), "the code was not printed: {out}");
        anyhow::ensure!(
            out.contains("this device"),
            "no status after pairing: {out}"
        );
        let status = gamma.status()?;
        anyhow::ensure!(status["backend"] == "running", "gamma not up: {status}");
        anyhow::ensure!(
            status["self"]["owner"].is_string(),
            "gamma has no owner: {status}"
        );
        anyhow::ensure!(
            status.get("pairing").is_none(),
            "pairing still shown: {status}"
        );
        let (a4, _) = alpha.overlay()?;
        wait_until(Duration::from_secs(10), "gamma reaches alpha", || {
            gamma.host.ping(&a4)
        })?;
        Ok(())
    });
}
