//! Compute through the overlay against in-process, in one run: beta serves
//! the models over the mesh and alpha loads it with `compute-load`, once
//! through alpha's gateway (placement, a signed ticket per job, forwarding)
//! and once calling beta directly (with a ticket per request, signed the
//! same way); then the same load runs in-process on the same models. Also
//! beta's peak memory.

use std::process::ExitCode;
use std::time::Duration;

use crank_e2e::{bin, lab_main, models_dir, wait_until, Coordinator, Device, Lab};
use serde_json::Value;

fn bench(lab: &mut Lab) -> anyhow::Result<()> {
    let coord_host = lab.host("coord", 1)?;
    let coord = Coordinator::start(lab, coord_host, "bench")?;
    let a = lab.host("alpha", 11)?;
    let b = lab.host("beta", 12)?;
    let alpha = Device::start(lab, a)?;
    let models = models_dir();
    let beta = Device::start_with(lab, b, &["--compute", "--models-dir", &models])?;
    alpha.up(&coord)?;
    beta.up(&coord)?;
    let (b4, _) = beta.overlay()?;
    let url = format!("http://{b4}:8421");
    wait_until(Duration::from_secs(20), "compute API", || {
        alpha
            .host
            .succeeds("curl", &["-sf", &format!("{url}/healthz")])
    })?;
    let load = bin("compute-load");
    let load = load.to_str().unwrap_or_default();
    let tickets = format!("{},{},bench,beta", alpha.state_dir, beta.state_dir);
    let gateway_url = "http://127.0.0.1:8420";
    wait_until(
        Duration::from_secs(30),
        "beta through alpha's gateway",
        || {
            alpha.host.succeeds(
                "curl",
                &[
                    "-sf",
                    "-H",
                    "content-type: application/json",
                    "-d",
                    r#"{"input":"warm"}"#,
                    &format!("{gateway_url}/v1/embeddings"),
                ],
            )
        },
    )?;
    // Alternating, so that neither gets the quieter moments of the run.
    let mut direct_runs = Vec::new();
    let mut gateway_runs = Vec::new();
    for _ in 0..2 {
        direct_runs.push(serde_json::from_str::<Value>(
            &alpha
                .host
                .run(load, &["--url", &url, "--tickets", &tickets])?,
        )?);
        gateway_runs.push(serde_json::from_str::<Value>(
            &alpha.host.run(load, &["--url", gateway_url])?,
        )?);
    }
    let best = |runs: &[Value], k: &str| {
        runs.iter()
            .max_by(|a, b| {
                let f = |v: &Value| v[k]["per_second"].as_f64().unwrap_or(0.0);
                f(a).total_cmp(&f(b))
            })
            .map(|r| r[k].clone())
            .unwrap_or(Value::Null)
    };
    let overlay = serde_json::json!({"embeddings": best(&direct_runs, "embeddings"), "chat": best(&direct_runs, "chat")});
    let through = serde_json::json!({"embeddings": best(&gateway_runs, "embeddings"), "chat": best(&gateway_runs, "chat")});
    let batched: Value = serde_json::from_str(&alpha.host.run(
        load,
        &[
            "--url",
            &url,
            "--concurrency",
            "8",
            "--embeddings",
            "400",
            "--chats",
            "0",
            "--tickets",
            &tickets,
        ],
    )?)?;
    let metrics = alpha
        .host
        .run("curl", &["-sf", &format!("{url}/metrics")])?;
    let batches = metrics
        .lines()
        .find_map(|l| l.strip_prefix("compute_embedding_batches_total "))
        .unwrap_or("?")
        .to_owned();
    // In-process gets the threads the daemon chose for itself.
    let compute: Value = serde_json::from_str(&beta.meshd(&["compute", "status", "--json"])?)?;
    let threads = compute["threads"].as_u64().unwrap_or(1).to_string();
    let status = std::fs::read_to_string(format!("/proc/{}/status", beta.pid))?;
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap_or("VmHWM: ?")
        .to_owned();
    let local: Value = serde_json::from_str(&String::from_utf8(
        std::process::Command::new(load)
            .args(["--in-process", &models, "--threads", &threads])
            .output()?
            .stdout,
    )?)?;
    println!("| path | embeddings/s | p50 ms | p99 ms | chat tokens/s | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, r) in [
        ("gateway (alpha's 127.0.0.1:8420 → beta)", &through),
        ("direct (alpha → beta:8421, with tickets)", &overlay),
        ("in-process", &local),
    ] {
        let (e, c) = (&r["embeddings"], &r["chat"]);
        let f = |v: &Value| v.as_f64().unwrap_or(0.0);
        println!(
            "| {name} | {:.1} | {:.2} | {:.2} | {:.1} | {:.0} | {:.0} |",
            f(&e["per_second"]),
            f(&e["p50_ms"]),
            f(&e["p99_ms"]),
            f(&c["per_second"]),
            f(&c["p50_ms"]),
            f(&c["p99_ms"])
        );
    }
    let ratio = |k: &str| {
        overlay[k]["per_second"].as_f64().unwrap_or(0.0)
            / local[k]["per_second"].as_f64().unwrap_or(1.0)
    };
    println!(
        "overlay / in-process: embeddings {:.2}, chat tokens {:.2}",
        ratio("embeddings"),
        ratio("chat")
    );
    let vs_direct = |k: &str| {
        through[k]["per_second"].as_f64().unwrap_or(0.0)
            / overlay[k]["per_second"].as_f64().unwrap_or(1.0)
    };
    println!(
        "gateway / direct: embeddings/s {:.3}, chat tokens/s {:.3}; added p50: embeddings {:+.2} ms, chat {:+.0} ms",
        vs_direct("embeddings"),
        vs_direct("chat"),
        through["embeddings"]["p50_ms"].as_f64().unwrap_or(0.0) - overlay["embeddings"]["p50_ms"].as_f64().unwrap_or(0.0),
        through["chat"]["p50_ms"].as_f64().unwrap_or(0.0) - overlay["chat"]["p50_ms"].as_f64().unwrap_or(0.0),
    );
    let e = &batched["embeddings"];
    println!(
        "overlay, 8 concurrent clients: {:.1} embeddings/s (p50 {:.2} ms, p99 {:.2} ms); {batches} decodes for all {} embedding requests of the run",
        e["per_second"].as_f64().unwrap_or(0.0),
        e["p50_ms"].as_f64().unwrap_or(0.0),
        e["p99_ms"].as_f64().unwrap_or(0.0),
        overlay["embeddings"]["requests"].as_u64().unwrap_or(0) + e["requests"].as_u64().unwrap_or(0) + 2,
    );
    println!("llama.cpp threads on both sides: {threads} (the daemon's default for this device)");
    println!(
        "meshd (beta, both models loaded) peak memory: {}",
        hwm.trim_start_matches("VmHWM:").trim()
    );
    Ok(())
}

fn main() -> ExitCode {
    lab_main("benchmark", bench)
}
