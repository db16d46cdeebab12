//! The main job on one machine: a coordinator and three devices, each in its
//! own network namespace, joined into one mesh. They ping each other over
//! IPv4 and IPv6 overlay addresses, one fetches a page from another over the
//! overlay, and each prints its `meshd status`. Everything is removed at exit.

use std::process::ExitCode;
use std::time::Duration;

use crank_e2e::{bin, is_root, wait_until, Coordinator, Device, Lab};

fn try_main() -> anyhow::Result<()> {
    anyhow::ensure!(is_root(), "the demo creates network namespaces: run it as root");
    let mut lab = Lab::new()?;
    let result = demo(&mut lab);
    if result.is_err() {
        eprintln!("{}", lab.logs());
    }
    result
}

fn demo(lab: &mut Lab) -> anyhow::Result<()> {
    let coord_host = lab.host("coord", 1)?;
    let coord = Coordinator::start(lab, coord_host, "demo")?;
    println!("coordinator: {} (network \"demo\", SQLite in {})", coord.url, lab.dir.join("coordinator").display());

    let mut devices = Vec::new();
    for (i, name) in ["alpha", "beta", "gamma"].iter().enumerate() {
        let host = lab.host(name, 11 + i as u8)?;
        let dev = Device::start(lab, host)?;
        dev.up(&coord)?;
        let (v4, v6) = dev.overlay()?;
        println!("{name:<6} joined: underlay {} overlay {v4} {v6}", dev.host.addr);
        devices.push(dev);
    }
    let overlay: Vec<(String, String)> = devices.iter().map(Device::overlay).collect::<anyhow::Result<_>>()?;

    println!("\npings over the overlay:");
    for from in &devices {
        for (to, (v4, v6)) in devices.iter().zip(&overlay) {
            if to.host.name == from.host.name {
                continue;
            }
            for target in [v4, v6] {
                wait_until(Duration::from_secs(10), &format!("{} → {target}", from.host.name), || from.host.ping(target))?;
                let out = from.host.run("ping", &["-c", "3", "-i", "0.2", "-q", target])?;
                let rtt = out.lines().find(|l| l.contains("min/avg/max")).unwrap_or("").trim().to_owned();
                println!("  {:<6} → {:<6} {target:<24} {rtt}", from.host.name, to.host.name);
            }
        }
    }

    let (g4, _) = &overlay[2];
    let listen = format!("{g4}:8000");
    lab.spawn(&devices[2].host, &bin("overlay-httpd"), &[&listen, "gamma"], "httpd-gamma.log")?;
    devices[2].host.wait_tcp(g4, 8000, Duration::from_secs(5))?;
    let page = devices[0].host.run("curl", &["-sS", "--max-time", "10", &format!("http://{listen}/")])?;
    println!("\nalpha fetched http://{listen}/ over the overlay:\n  {}", page.trim());

    for dev in &devices {
        println!("\n$ meshd status   # on {}", dev.host.name);
        print!("{}", dev.meshd(&["status"])?);
    }
    Ok(())
}

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => {
            println!("\ndemo finished; namespaces removed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
