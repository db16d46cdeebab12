//! A handshake-initiation flood against a device carrying an iperf3
//! transfer: how much of its throughput the transfer keeps. Two devices on
//! a direct path and a third host (no meshd) that floods the receiver's
//! WireGuard port with meshd's `handshake-flood` example, with noise
//! (wrong MAC1) and with initiations that pass MAC1 (made for the
//! receiver's public key). Rounds interleave the three cases; medians are
//! printed, with the receiver's drop counters after the run.

use std::process::ExitCode;
use std::time::Duration;

use crank_e2e::{bin, lab_main, wait_until, Coordinator, Device, Host, Lab};

const SECONDS: u32 = 5;
const ROUNDS: usize = 3;

fn iperf(client: &Host, server_ip: &str) -> anyhow::Result<f64> {
    let secs = SECONDS.to_string();
    let out = client.run("iperf3", &["-c", server_ip, "-t", &secs, "-J"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e6)
        .ok_or_else(|| anyhow::anyhow!("no iperf3 result"))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench(lab: &mut Lab) -> anyhow::Result<()> {
    let flood = bin("examples/handshake-flood");
    let coord_host = lab.host("coord", 1)?;
    let coord = Coordinator::start(lab, coord_host, "bench")?;
    let alpha_host = lab.host("alpha", 11)?;
    let alpha = Device::start(lab, alpha_host)?;
    let beta_host = lab.host("beta", 12)?;
    let beta = Device::start(lab, beta_host)?;
    let mallory = lab.host("mallory", 13)?;
    alpha.up(&coord)?;
    beta.up(&coord)?;
    let (b4, _) = beta.overlay()?;
    wait_until(Duration::from_secs(15), "direct path", || {
        alpha.host.ping(&b4)
            && alpha
                .peer("beta")
                .ok()
                .flatten()
                .is_some_and(|p| p["path"].as_str().unwrap_or("").starts_with("direct"))
    })?;
    let beta_key = beta.status()?["self"]["node_key"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no node key in beta's status"))?
        .to_owned();
    let target = format!("{}:41641", beta.host.addr);
    lab.spawn(
        &beta.host,
        std::path::Path::new("iperf3"),
        &["-s", "-B", &b4],
        "iperf3.log",
    )?;
    beta.host.wait_tcp(&b4, 5201, Duration::from_secs(5))?;

    let modes = ["none", "garbage", "valid"];
    let mut mbits: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut rates: Vec<String> = vec![String::new(); modes.len()];
    for round in 0..ROUNDS {
        for (i, mode) in modes.iter().enumerate() {
            let log = format!("flood-{round}-{mode}.log");
            let pid = if *mode == "none" {
                None
            } else {
                // Runs a second longer than the transfer, which starts once
                // the flood is under way.
                let secs = (SECONDS + 2).to_string();
                let pid = lab.spawn(&mallory, &flood, &[&target, &beta_key, &secs, mode], &log)?;
                std::thread::sleep(Duration::from_millis(500));
                Some(pid)
            };
            mbits[i].push(iperf(&alpha.host, &b4)?);
            if let Some(pid) = pid {
                let path = lab.dir.join(&log);
                wait_until(Duration::from_secs(10), "flood report", || {
                    std::fs::read_to_string(&path).is_ok_and(|s| s.contains("sent"))
                })?;
                rates[i] = std::fs::read_to_string(&path)?.trim().to_owned();
                lab.stop(pid);
            }
        }
    }
    let counters = &beta.status()?["counters"];
    let base = median(&mut mbits[0].clone());
    println!("| flood | TCP Mbit/s (iperf3 -t {SECONDS}, median of {ROUNDS}) | vs no flood | rounds | flood sent (last round) |");
    println!("|---|---:|---:|---|---|");
    for (i, mode) in modes.iter().enumerate() {
        let raw: Vec<String> = mbits[i].iter().map(|m| format!("{m:.0}")).collect();
        let m = median(&mut mbits[i]);
        println!(
            "| {mode} | {m:.0} | {:.2} | {} | {} |",
            m / base,
            raw.join("/"),
            rates[i]
        );
    }
    println!(
        "beta's counters: drop_bad_handshake {} cookie_replies {} drop_handshake_queue_full {} drop_unknown_peer {} drop_malformed {}",
        counters["drop_bad_handshake"],
        counters["cookie_replies"],
        counters["drop_handshake_queue_full"],
        counters["drop_unknown_peer"],
        counters["drop_malformed"]
    );
    Ok(())
}

fn main() -> ExitCode {
    lab_main("benchmark", bench)
}
