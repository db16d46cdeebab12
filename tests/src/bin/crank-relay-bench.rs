//! Throughput and RTT between two devices over the direct path and over the
//! relay, in one run: a coordinator, a relay and two devices in network
//! namespaces; iperf3 and ping over the overlay, first direct, then with UDP
//! between the devices blocked (so traffic falls back to the relay).

use std::process::ExitCode;
use std::time::Duration;

use crank_e2e::{iperf_mbps, lab_main, wait_until, Coordinator, Device, Host, Lab, Relay};

const SECONDS: u32 = 5;

fn rtt(client: &Host, target: &str) -> anyhow::Result<String> {
    let out = client.run("ping", &["-c", "50", "-i", "0.01", "-q", target])?;
    Ok(out
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .unwrap_or("?")
        .trim()
        .to_owned())
}

fn path(d: &Device, peer: &str) -> String {
    d.peer(peer)
        .ok()
        .flatten()
        .map(|p| p["path"].as_str().unwrap_or("?").to_owned())
        .unwrap_or_default()
}

fn bench(lab: &mut Lab) -> anyhow::Result<()> {
    let coord_host = lab.host("coord", 1)?;
    let relay_host = lab.host("relay", 2)?;
    let map = Relay::map_json(relay_host.addr);
    let coord = Coordinator::start_with_relays(lab, coord_host, "bench", Some(&map))?;
    let _relay = Relay::start(lab, relay_host, &coord)?;
    let alpha_host = lab.host("alpha", 11)?;
    let beta_host = lab.host("beta", 12)?;
    let alpha = Device::start(lab, alpha_host)?;
    let beta = Device::start(lab, beta_host)?;
    alpha.up(&coord)?;
    beta.up(&coord)?;
    let (b4, _) = beta.overlay()?;
    wait_until(Duration::from_secs(15), "direct path", || {
        alpha.host.ping(&b4) && path(&alpha, "beta").starts_with("direct")
    })?;
    let direct_bw = iperf_mbps(lab, &alpha.host, &beta.host, &b4, SECONDS)?;
    let direct_rtt = rtt(&alpha.host, &b4)?;
    let direct_path = path(&alpha, "beta");

    // Block UDP between the two; the direct path goes quiet and traffic
    // falls back to the relay.
    alpha.host.block_udp_with(&beta.host)?;
    wait_until(Duration::from_secs(40), "relayed path", || {
        alpha.host.ping(&b4);
        path(&alpha, "beta").starts_with("relay") && path(&beta, "alpha").starts_with("relay")
    })?;
    wait_until(Duration::from_secs(10), "ping over relay", || {
        alpha.host.ping(&b4)
    })?;
    let relay_bw = iperf_mbps(lab, &alpha.host, &beta.host, &b4, SECONDS)?;
    let relay_rtt = rtt(&alpha.host, &b4)?;

    println!("| path | TCP Mbit/s (iperf3 -t {SECONDS}) | ping RTT min/avg/max/mdev ms |");
    println!("|---|---:|---|");
    println!("| {direct_path} | {direct_bw:.0} | {direct_rtt} |");
    println!("| {} | {relay_bw:.0} | {relay_rtt} |", path(&alpha, "beta"));
    println!("relay/direct throughput ratio: {:.2}", relay_bw / direct_bw);
    Ok(())
}

fn main() -> ExitCode {
    lab_main("benchmark", bench)
}
