//! NAT traversal and relay failure in network namespaces: NAT routers with
//! nftables masquerade, a relay, and meshd devices. Needs root; run serially.

use std::time::{Duration, Instant};

use crank_e2e::{
    bin, epoch_secs, iperf_stream, longest_gap, run_lab, serve_http, transfer, wait_until, Device,
    Nat, Relay,
};
use serde_json::Value;

fn path_to(d: &Device, peer: &str) -> String {
    d.peer(peer)
        .ok()
        .flatten()
        .and_then(|p| p["path"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn on_home_relay(d: &Device) -> anyhow::Result<()> {
    wait_until(
        Duration::from_secs(15),
        &format!("{} on its home relay", d.host.name),
        || {
            d.status().is_ok_and(|s| {
                s["self"]["home_relay_connected"] == true
                    && s["self"]["public_endpoint"].is_string()
            })
        },
    )
}

#[test]
fn both_behind_nat_relay_first_then_direct_within_two_seconds() {
    run_lab(|lab| {
        let (coord, _relay) = lab.coordinator_and_relay()?;
        let (_ra, a) = lab.host_behind_nat("alpha", 21, Nat::EndpointIndependent)?;
        let (_rb, b) = lab.host_behind_nat("beta", 22, Nat::EndpointIndependent)?;
        let alpha = Device::start(lab, a)?;
        let beta = Device::start(lab, b)?;
        alpha.up(&coord)?;
        beta.up(&coord)?;
        on_home_relay(&alpha)?;
        on_home_relay(&beta)?;
        let (b4, _) = beta.overlay()?;

        // The first traffic gets through at once (relayed)…
        // Both know each other, and where to find each other on the relay.
        wait_until(
            Duration::from_secs(5),
            "peers in each other's netmap",
            || path_to(&alpha, "beta") == "relay lab" && path_to(&beta, "alpha") == "relay lab",
        )?;
        let start = Instant::now();
        anyhow::ensure!(
            alpha.host.succeeds("ping", &["-c", "1", "-W", "2", &b4]),
            "the first ping did not get through"
        );
        let first = start.elapsed();
        let relayed = alpha.status()?["counters"]["tx_relayed"]
            .as_u64()
            .unwrap_or(0);
        anyhow::ensure!(
            relayed > 0,
            "the first packets did not go through the relay"
        );
        // …and moves to a direct path through both NATs within 2 s.
        wait_until(Duration::from_secs(2), "direct path", || {
            alpha.host.succeeds("ping", &["-c", "1", "-W", "1", &b4]);
            path_to(&alpha, "beta").starts_with("direct 10.99.0.22:")
                && path_to(&beta, "alpha").starts_with("direct 10.99.0.21:")
        })?;
        eprintln!(
            "first ping after {first:?}, direct after {:?}",
            start.elapsed()
        );
        // A TCP transfer over the punched path.
        let url = serve_http(lab, &beta.host, &b4)?;
        transfer(lab, &alpha.host, &url, 2 << 20)?;
        anyhow::ensure!(
            path_to(&alpha, "beta").starts_with("direct"),
            "fell off the direct path"
        );
        Ok(())
    });
}

#[test]
fn a_direct_path_that_dies_either_way_fails_over_to_the_relay_within_seven_seconds() {
    run_lab(|lab| {
        let (coord, _relay) = lab.coordinator_and_relay()?;
        let (ra, a) = lab.host_behind_nat("alpha", 21, Nat::EndpointIndependent)?;
        let (rb, b) = lab.host_behind_nat("beta", 22, Nat::EndpointIndependent)?;
        let alpha = Device::start(lab, a)?;
        let beta = Device::start(lab, b)?;
        alpha.up(&coord)?;
        beta.up(&coord)?;
        on_home_relay(&alpha)?;
        on_home_relay(&beta)?;
        let (b4, _) = beta.overlay()?;
        let both_direct = || {
            path_to(&alpha, "beta").starts_with("direct")
                && path_to(&beta, "alpha").starts_with("direct")
        };
        // Each cut: UDP from one NAT's public address to the other's is
        // dropped by the sending router (alpha's NAT is 10.99.0.21, beta's
        // 10.99.0.22), while a 20 Hz ping runs from alpha.
        let cuts: [(&str, &[(&crank_e2e::Host, &str)]); 3] = [
            ("both ways", &[(&ra, "10.99.0.22"), (&rb, "10.99.0.21")]),
            ("alpha → beta only", &[(&ra, "10.99.0.22")]),
            ("beta → alpha only", &[(&rb, "10.99.0.21")]),
        ];
        for (what, routers) in cuts {
            wait_until(Duration::from_secs(10), "a direct path", || {
                alpha.host.ping(&b4);
                both_direct()
            })?;
            let pings = alpha.host.ping_stream(&b4, 14);
            std::thread::sleep(Duration::from_secs(2));
            let cut = epoch_secs();
            for (router, to) in routers {
                router.cut_udp_to(to.parse()?, true)?;
            }
            let answers = pings
                .join()
                .map_err(|_| anyhow::anyhow!("ping thread panicked"))??;
            let end = epoch_secs();
            let outage = longest_gap(&answers, cut, end);
            eprintln!("{what}: outage {outage:.2} s");
            anyhow::ensure!(outage <= 7.0, "{what}: no answer for {outage:.2} s");
            // Packets still arriving one way do not bring the dead path back.
            anyhow::ensure!(
                path_to(&alpha, "beta") == "relay lab" && path_to(&beta, "alpha") == "relay lab",
                "{what}: paths {} / {}",
                path_to(&alpha, "beta"),
                path_to(&beta, "alpha")
            );
            for (router, to) in routers {
                router.cut_udp_to(to.parse()?, false)?;
            }
        }
        wait_until(Duration::from_secs(10), "direct again once healed", || {
            alpha.host.ping(&b4);
            both_direct()
        })?;
        Ok(())
    });
}

#[test]
fn symmetric_nat_to_a_public_peer_works_and_ping_tells_the_path() {
    run_lab(|lab| {
        let (coord, _relay) = lab.coordinator_and_relay()?;
        let (_r, a) = lab.host_behind_nat("alpha", 21, Nat::Symmetric)?;
        let b = lab.host("beta", 12)?;
        let alpha = Device::start(lab, a)?;
        let beta = Device::start(lab, b)?;
        alpha.up(&coord)?;
        beta.up(&coord)?;
        on_home_relay(&alpha)?;
        on_home_relay(&beta)?;

        // netcheck sees the mapping change per destination behind this NAT,
        // and not on the public host.
        let nc: Value = serde_json::from_str(&alpha.meshd(&["netcheck", "--json"])?)?;
        anyhow::ensure!(
            nc["udp"] == true && nc["mapping_varies_by_destination"] == true,
            "alpha netcheck: {nc}"
        );
        let nc: Value = serde_json::from_str(&beta.meshd(&["netcheck", "--json"])?)?;
        anyhow::ensure!(
            nc["mapping_varies_by_destination"] == false,
            "beta netcheck: {nc}"
        );
        anyhow::ensure!(
            nc["relays"][0]["latency_ms"].is_f64(),
            "relay latency: {nc}"
        );

        let (b4, _) = beta.overlay()?;
        wait_until(Duration::from_secs(5), "ping over the overlay", || {
            alpha.host.ping(&b4)
        })?;
        // meshd ping: every answer names its path, and a direct one names
        // beta's real endpoint.
        let report: Value =
            serde_json::from_str(&alpha.meshd(&["ping", "beta", "--count", "10", "--json"])?)?;
        let replies = report["replies"].as_array().cloned().unwrap_or_default();
        anyhow::ensure!(replies.iter().any(|r| !r.is_null()), "no pong: {report}");
        for r in replies.iter().filter(|r| !r.is_null()) {
            match r["path"]["via"].as_str() {
                Some("direct") => anyhow::ensure!(
                    r["path"]["endpoint"] == "10.99.0.12:41641",
                    "direct via {r}"
                ),
                Some("relay") => anyhow::ensure!(r["path"]["region"] == 1, "relay {r}"),
                _ => anyhow::bail!("reply without a path: {r}"),
            }
        }
        let last = replies.last().cloned().unwrap_or_default();
        anyhow::ensure!(
            last["path"]["via"] == "direct",
            "a public peer is reachable directly from behind a symmetric NAT: {report}"
        );
        let text = alpha.meshd(&["ping", "beta", "--count", "1"])?;
        anyhow::ensure!(
            text.contains("via 10.99.0.12:41641"),
            "human output: {text}"
        );
        Ok(())
    });
}

#[test]
fn relay_failure_spares_direct_paths_and_relayed_peers_recover() {
    run_lab(|lab| {
        let (coord, relay) = lab.coordinator_and_relay()?;
        let a = lab.host("alpha", 11)?;
        let b = lab.host("beta", 12)?;
        let g = lab.host("gamma", 13)?;
        // gamma reaches alpha only through the relay.
        g.block_udp_with(&a)?;
        let alpha = Device::start(lab, a)?;
        let beta = Device::start(lab, b)?;
        let gamma = Device::start(lab, g)?;
        for d in [&alpha, &beta, &gamma] {
            d.up(&coord)?;
            on_home_relay(d)?;
        }
        let (b4, _) = beta.overlay()?;
        let (g4, _) = gamma.overlay()?;
        wait_until(Duration::from_secs(5), "alpha → beta direct", || {
            alpha.host.ping(&b4);
            path_to(&alpha, "beta").starts_with("direct")
        })?;
        wait_until(Duration::from_secs(10), "alpha → gamma relayed", || {
            alpha.host.ping(&g4)
        })?;
        anyhow::ensure!(
            path_to(&alpha, "gamma") == "relay lab",
            "gamma path: {}",
            path_to(&alpha, "gamma")
        );

        // The relay crashes (SIGKILL, no goodbye to anyone) while a steady
        // TCP stream and pings run on the direct path and gamma's pings go
        // through it.
        let stream = iperf_stream(lab, &alpha.host, &beta.host, &b4, 3, "50M")?;
        let pinger = std::thread::spawn({
            let host = alpha.host.clone();
            let target = b4.clone();
            move || host.run("ping", &["-c", "30", "-i", "0.1", "-q", &target])
        });
        let relayed = std::thread::spawn({
            let host = alpha.host.clone();
            let target = g4.clone();
            move || host.run("ping", &["-c", "20", "-i", "0.05", "-q", &target])
        });
        std::thread::sleep(Duration::from_millis(700));
        lab.kill(relay.pid);
        let _ = relayed.join();
        let summary = pinger
            .join()
            .map_err(|_| anyhow::anyhow!("pinger panicked"))??;
        anyhow::ensure!(
            summary.contains(" 0% packet loss"),
            "direct path lost packets while the relay died:\n{summary}"
        );
        let report = stream
            .join()
            .map_err(|_| anyhow::anyhow!("iperf3 thread panicked"))??;
        let retransmits = report["end"]["sum_sent"]["retransmits"]
            .as_u64()
            .unwrap_or(u64::MAX);
        let received = report["end"]["sum_received"]["bytes"]
            .as_f64()
            .unwrap_or(0.0);
        anyhow::ensure!(
            received >= 0.8 * 50e6 * 3.0 / 8.0,
            "the stream stalled when the relay died: {received} bytes"
        );
        eprintln!("TCP across the relay's death: {received} bytes, {retransmits} retransmits");
        anyhow::ensure!(
            path_to(&alpha, "beta").starts_with("direct"),
            "left the direct path"
        );

        // The relay comes back: relayed-only peers recover within 5 s.
        let relay_host = relay.host.clone();
        let restarted = Instant::now();
        let _relay = Relay::start(lab, relay_host, &coord)?;
        wait_until(
            Duration::from_secs(5),
            "alpha → gamma through the restarted relay",
            || alpha.host.ping(&g4),
        )?;
        eprintln!(
            "relayed path back {:?} after the relay restarted",
            restarted.elapsed()
        );
        Ok(())
    });
}

#[test]
fn the_relay_refuses_devices_the_coordinator_does_not_know() {
    run_lab(|lab| {
        let (_coord, relay) = lab.coordinator_and_relay()?;
        let client = lab.host("stranger", 40)?;
        // Two clients with fresh keys that no coordinator has registered.
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &client.ns])
            .arg(bin("derp-load"))
            .args([
                "--url",
                &format!("{}/derp", relay.url),
                "--clients",
                "2",
                "--seconds",
                "1",
            ])
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        anyhow::ensure!(
            !out.status.success() && stderr.contains("admission_denied"),
            "stranger was served: {stderr}"
        );
        let metrics = relay.metrics()?;
        anyhow::ensure!(
            metrics.contains("derp_drops_total{reason=\"admission_denied\"}"),
            "{metrics}"
        );
        anyhow::ensure!(metrics.contains("derp_clients 0"), "{metrics}");
        Ok(())
    });
}

#[test]
fn a_device_that_changes_address_keeps_its_sessions() {
    run_lab(|lab| {
        let (coord, _relay) = lab.coordinator_and_relay()?;
        let a = lab.host("alpha", 11)?;
        let b = lab.host("beta", 12)?;
        let alpha = Device::start(lab, a)?;
        let beta = Device::start(lab, b)?;
        alpha.up(&coord)?;
        beta.up(&coord)?;
        let (b4, _) = beta.overlay()?;
        wait_until(Duration::from_secs(5), "direct path", || {
            alpha.host.ping(&b4);
            path_to(&beta, "alpha") == "direct 10.99.0.11:41641"
        })?;
        // A steady TCP stream (iperf3, 20 Mbit/s for 4 s) across the change:
        // a receiver's buffers cannot swallow it early.
        let client = iperf_stream(lab, &alpha.host, &beta.host, &b4, 4, "20M")?;
        std::thread::sleep(Duration::from_millis(1500));
        alpha.host.run("ip", &["addr", "flush", "dev", "eth0"])?;
        alpha
            .host
            .run("ip", &["addr", "add", "10.99.0.31/24", "dev", "eth0"])?;
        let report = client
            .join()
            .map_err(|_| anyhow::anyhow!("iperf3 thread panicked"))??;
        let received = report["end"]["sum_received"]["bytes"]
            .as_f64()
            .unwrap_or(0.0);
        anyhow::ensure!(
            received >= 0.8 * 20e6 * 4.0 / 8.0,
            "the stream lost its way at the address change: {received} bytes"
        );
        let intervals = report["intervals"].as_array().cloned().unwrap_or_default();
        let last = intervals
            .last()
            .map_or(0.0, |i| i["sum"]["bits_per_second"].as_f64().unwrap_or(0.0));
        anyhow::ensure!(last > 10e6, "nothing flowed at the end: {last} bit/s");
        wait_until(
            Duration::from_secs(5),
            "beta follows alpha's new address",
            || {
                alpha.host.ping(&b4);
                path_to(&beta, "alpha") == "direct 10.99.0.31:41641"
            },
        )
        .map_err(|e| {
            anyhow::anyhow!("{e}: beta's path to alpha is {:?}", path_to(&beta, "alpha"))
        })?;
        Ok(())
    });
}
