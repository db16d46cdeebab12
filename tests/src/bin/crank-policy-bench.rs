//! What the access policy and MagicDNS cost, in one run: a coordinator and
//! two devices in network namespaces.
//!
//! - Throughput alpha → beta (iperf3, TCP, 5 s) under an allow-all policy
//!   and under a 200-rule policy (100 host rules, 100 CIDR rules, then the
//!   one that lets alpha in), alternating, three rounds each; the ratio of
//!   medians.
//! - DNS from alpha: queries/s and p50/p99 for a mesh name answered by
//!   MagicDNS, for a name MagicDNS forwards to the namespace's resolver, and
//!   for that resolver asked directly.
//!
//!     sudo target/debug/crank-policy-bench

use std::process::ExitCode;
use std::time::Duration;

use crank_e2e::{
    bin, iperf_mbps, lab_main, wait_until, Coordinator, Device, Host, Lab, LAB_RESOLVER,
};

const SECONDS: u32 = 5;

fn allow_all() -> String {
    r#"{"acls": [{"src": ["*"], "dst": ["*:*"]}]}"#.into()
}

/// 200 rules for beta; only the last one names alpha's owner.
fn two_hundred(b4: &str) -> String {
    let mut acls = Vec::new();
    for i in 0..100 {
        acls.push(format!(
            r#"{{"src": ["100.64.{}.{}"], "dst": ["{b4}:{}"]}}"#,
            100 + i / 200,
            1 + i % 200,
            10_000 + i
        ));
    }
    for i in 0..99 {
        acls.push(format!(
            r#"{{"src": ["10.{i}.0.0/16"], "dst": ["{b4}:{}"], "proto": "udp"}}"#,
            20_000 + i
        ));
    }
    acls.push(format!(r#"{{"src": ["admin"], "dst": ["{b4}:*"]}}"#));
    format!(r#"{{"acls": [{}]}}"#, acls.join(",\n"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn dns(from: &Host, server: &str, name: &str) -> anyhow::Result<String> {
    let out = from.run(
        bin("crank-dns-bench").to_str().unwrap_or_default(),
        &[server, name, "20000", "32"],
    )?;
    Ok(out.trim().to_owned())
}

fn bench(lab: &mut Lab) -> anyhow::Result<()> {
    let coord_host = lab.host("coord", 1)?;
    let coord = Coordinator::start(lab, coord_host, "home")?;
    let (a, b) = (lab.host("alpha", 11)?, lab.host("beta", 12)?);
    let upstream = lab.host("upstream", 53)?;
    lab.spawn(
        &upstream,
        &bin("zone-server"),
        &[
            &format!("{LAB_RESOLVER}:53"),
            "example.net",
            "www=192.0.2.80",
        ],
        "upstream-dns.log",
    )?;
    let alpha = Device::start(lab, a.clone())?;
    let beta = Device::start(lab, b.clone())?;
    alpha.up(&coord)?;
    beta.up(&coord)?;
    let (b4, _) = beta.overlay()?;
    wait_until(Duration::from_secs(20), "peers", || {
        a.succeeds("ping", &["-c", "1", "-W", "1", &b4])
    })?;
    let policies = [("allow-all", allow_all()), ("200 rules", two_hundred(&b4))];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(), Vec::new()];
    for round in 0..3 {
        for (i, (name, text)) in policies.iter().enumerate() {
            coord.api("PUT", "/api/v1/networks/home/policy", Some(text))?;
            // Let the new filter arrive before measuring.
            std::thread::sleep(Duration::from_millis(500));
            let mbps = iperf_mbps(lab, &a, &b, &b4, SECONDS)?;
            println!("round {round} {name}: {mbps:.0} Mbit/s");
            results[i].push(mbps);
        }
    }
    let (open, ruled) = (median(results[0].clone()), median(results[1].clone()));
    println!(
        "throughput median: allow-all {open:.0} Mbit/s, 200 rules {ruled:.0} Mbit/s, ratio {:.3}",
        ruled / open
    );
    let filtered = beta.status()?["counters"]["drop_filter_no_rule"].clone();
    println!("beta dropped by the filter during the run: {filtered}");

    wait_until(Duration::from_secs(10), "MagicDNS", || {
        a.run(
            "dig",
            &["+short", "@100.100.100.100", "beta.home.crank.internal"],
        )
        .is_ok_and(|o| o.trim() == b4)
    })?;
    println!(
        "dns local (MagicDNS): {}",
        dns(&a, "100.100.100.100:53", "beta.home.crank.internal")?
    );
    println!(
        "dns forwarded (MagicDNS → upstream): {}",
        dns(&a, "100.100.100.100:53", "www.example.net")?
    );
    println!(
        "dns upstream directly: {}",
        dns(&a, &format!("{LAB_RESOLVER}:53"), "www.example.net")?
    );
    Ok(())
}

fn main() -> ExitCode {
    lab_main("crank-policy-bench", bench)
}
