//! The main job on one machine: a coordinator and three devices, each in its
//! own network namespace, joined into one mesh. They ping each other over
//! IPv4 and IPv6 overlay addresses, one fetches a page from another by its
//! MagicDNS name over the overlay, an app on alpha asks the network (through alpha's gateway) for
//! an embedding and a chat answer, which beta computes, the ledger settles
//! the jobs, and each device prints its `meshd status`. Everything is
//! removed at exit.

use std::process::ExitCode;
use std::time::Duration;

use crank_e2e::{bin, lab_main, models_dir, wait_until, Coordinator, Device, Lab};

fn demo(lab: &mut Lab) -> anyhow::Result<()> {
    let coord_host = lab.host("coord", 1)?;
    let coord = Coordinator::start(lab, coord_host, "demo")?;
    println!(
        "coordinator: {} (network \"demo\", SQLite in {})",
        coord.url,
        lab.dir.join("coordinator").display()
    );

    let mut devices = Vec::new();
    for (i, name) in ["alpha", "beta", "gamma"].iter().enumerate() {
        let host = lab.host(name, 11 + i as u8)?;
        // beta offers compute with the models fetched by `meshd models fetch`.
        let dev = if *name == "beta" {
            Device::start_with(lab, host, &["--compute", "--models-dir", &models_dir()])?
        } else {
            Device::start(lab, host)?
        };
        dev.up(&coord)?;
        let (v4, v6) = dev.overlay()?;
        println!(
            "{name:<6} joined: underlay {} overlay {v4} {v6}",
            dev.host.addr
        );
        devices.push(dev);
    }
    let overlay: Vec<(String, String)> = devices
        .iter()
        .map(Device::overlay)
        .collect::<anyhow::Result<_>>()?;

    println!("\npings over the overlay:");
    for from in &devices {
        for (to, (v4, v6)) in devices.iter().zip(&overlay) {
            if to.host.name == from.host.name {
                continue;
            }
            for target in [v4, v6] {
                wait_until(
                    Duration::from_secs(10),
                    &format!("{} → {target}", from.host.name),
                    || from.host.ping(target),
                )?;
                let out = from
                    .host
                    .run("ping", &["-c", "3", "-i", "0.2", "-q", target])?;
                let rtt = out
                    .lines()
                    .find(|l| l.contains("min/avg/max"))
                    .unwrap_or("")
                    .trim()
                    .to_owned();
                println!(
                    "  {:<6} → {:<6} {target:<24} {rtt}",
                    from.host.name, to.host.name
                );
            }
        }
    }

    let (g4, _) = &overlay[2];
    let listen = format!("{g4}:8000");
    lab.spawn(
        &devices[2].host,
        &bin("overlay-httpd"),
        &[&listen, "gamma"],
        "httpd-gamma.log",
    )?;
    devices[2].host.wait_tcp(g4, 8000, Duration::from_secs(5))?;
    // By name: MagicDNS on alpha answers for gamma (the search domain
    // makes the bare name work).
    let by_name = "http://gamma:8000/";
    wait_until(Duration::from_secs(10), "gamma by name", || {
        devices[0].host.succeeds(
            "curl",
            &["-sS", "-o", "/dev/null", "--max-time", "2", by_name],
        )
    })?;
    let page = devices[0]
        .host
        .run("curl", &["-sS", "--max-time", "10", by_name])?;
    println!(
        "\nalpha fetched {by_name} over the overlay (gamma is {g4} by MagicDNS):\n  {}",
        page.trim()
    );

    // Apps on alpha use the network's one OpenAI endpoint, alpha's gateway:
    // it places each job (beta is the one device serving), signs a ticket
    // for it and forwards it over the overlay.
    let gateway = "http://127.0.0.1:8420";
    let body = serde_json::json!({"input": "a private mesh of my own devices"});
    wait_until(
        Duration::from_secs(60),
        "beta serving through alpha's gateway",
        || {
            devices[0]
                .host
                .post_json(&format!("{gateway}/v1/embeddings"), &body)
                .is_ok_and(|(s, _)| s == 200)
        },
    )?;
    let (status, v) = devices[0]
        .host
        .post_json(&format!("{gateway}/v1/embeddings"), &body)?;
    anyhow::ensure!(status == 200, "embeddings: {status} {v}");
    let dims = v["data"][0]["embedding"].as_array().map_or(0, Vec::len);
    let head: Vec<String> = v["data"][0]["embedding"]
        .as_array()
        .into_iter()
        .flatten()
        .take(4)
        .map(|x| format!("{:.4}", x.as_f64().unwrap_or(0.0)))
        .collect();
    println!(
        "\nalpha → {gateway}/v1/embeddings: {dims} dimensions [{} …], served by {}, caller {}",
        head.join(", "),
        v["served_by"],
        v["caller"]
    );
    let question = "What is the capital of France?";
    println!("\n$ meshd run chat --prompt {question:?}   # on alpha");
    let answer = devices[0].meshd(&["run", "chat", "--prompt", question, "--max-tokens", "48"])?;
    anyhow::ensure!(!answer.trim().is_empty(), "no answer to {question:?}");
    println!("{}", answer.trim());
    println!("\n$ meshd jobs   # on alpha");
    print!("{}", devices[0].meshd(&["jobs"])?);

    // The workers' receipts reach the ledger: alpha's owner burned credits,
    // beta's minted them.
    wait_until(Duration::from_secs(30), "receipts in the ledger", || {
        coord
            .api(
                "GET",
                "/api/v1/networks/demo/ledger/entries?limit=100",
                None,
            )
            .is_ok_and(|v| v.to_string().contains("\"burn\""))
    })?;
    let balances = coord.api("GET", "/api/v1/networks/demo/ledger/balances", None)?;
    println!("\nledger balances (credits; the mint account is minus what circulates):");
    for a in balances["accounts"].as_array().into_iter().flatten() {
        println!(
            "  {:<16} {:>14}",
            a["user"].as_str().or(a["account"].as_str()).unwrap_or("?"),
            platform::ledger::format_credits(a["balance"].as_i64().unwrap_or(0))
        );
    }

    for dev in &devices {
        println!("\n$ meshd status   # on {}", dev.host.name);
        print!("{}", dev.meshd(&["status"])?);
    }
    Ok(())
}

fn main() -> ExitCode {
    let code = lab_main("demo", demo);
    if code == ExitCode::SUCCESS {
        println!("\ndemo finished; namespaces removed");
    }
    code
}
