//! Relay fallback in network namespaces: a coordinator, a relay, and two
//! devices whose direct UDP is blocked. Needs root; run serially.

use std::time::Duration;

use crank_e2e::{bin, run_lab, wait_until, Device, Lab};

#[test]
fn devices_without_direct_udp_talk_through_the_relay() {
    run_lab(scenario);
}

fn scenario(lab: &mut Lab) -> anyhow::Result<()> {
    let (coord, relay) = lab.coordinator_and_relay()?;

    let alpha_host = lab.host("alpha", 11)?;
    let beta_host = lab.host("beta", 12)?;
    alpha_host.block_udp_with(&beta_host)?;
    let alpha = Device::start(lab, alpha_host)?;
    let beta = Device::start(lab, beta_host)?;
    alpha.up(&coord)?;
    beta.up(&coord)?;
    for d in [&alpha, &beta] {
        wait_until(
            Duration::from_secs(15),
            &format!("{} on its home relay", d.host.name),
            || {
                d.status().is_ok_and(|s| {
                    s["self"]["home_region"] == "lab" && s["self"]["home_relay_connected"] == true
                })
            },
        )?;
    }
    let (a4, a6) = alpha.overlay()?;
    let (b4, _) = beta.overlay()?;

    // Both directions, both families, over the relay only.
    wait_until(Duration::from_secs(15), "alpha → beta", || {
        alpha.host.ping(&b4)
    })?;
    wait_until(Duration::from_secs(10), "beta → alpha", || {
        beta.host.ping(&a4)
    })?;
    wait_until(Duration::from_secs(10), "beta → alpha v6", || {
        beta.host.ping(&a6)
    })?;
    for (d, peer) in [(&alpha, "beta"), (&beta, "alpha")] {
        let p = d
            .peer(peer)?
            .ok_or_else(|| anyhow::anyhow!("{peer} missing"))?;
        anyhow::ensure!(
            p["path"] == "relay lab",
            "{} reaches {peer} by {}",
            d.host.name,
            p["path"]
        );
    }

    // TCP both ways through the relay, checked end to end.
    let httpd = bin("overlay-httpd");
    lab.spawn(
        &alpha.host,
        &httpd,
        &[&format!("{a4}:8000"), "alpha"],
        "httpd-alpha.log",
    )?;
    lab.spawn(
        &beta.host,
        &httpd,
        &[&format!("{b4}:8000"), "beta"],
        "httpd-beta.log",
    )?;
    alpha.host.wait_tcp(&a4, 8000, Duration::from_secs(5))?;
    beta.host.wait_tcp(&b4, 8000, Duration::from_secs(5))?;
    crank_e2e::transfer(lab, &beta.host, &format!("http://{a4}:8000"), 2 << 20)?;
    crank_e2e::transfer(lab, &alpha.host, &format!("http://{b4}:8000"), 2 << 20)?;

    let counters = &alpha.status()?["counters"];
    anyhow::ensure!(
        counters["tx_relayed"].as_u64().unwrap_or(0) > 1000,
        "alpha relayed little: {counters}"
    );
    anyhow::ensure!(
        counters["rx_relayed"].as_u64().unwrap_or(0) > 1000,
        "alpha received little via relay: {counters}"
    );
    let metrics = relay.metrics()?;
    anyhow::ensure!(
        metrics.contains("derp_clients 2"),
        "relay metrics:\n{metrics}"
    );
    Ok(())
}
