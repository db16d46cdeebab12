//! A relay under a flood of connections from random, unknown node keys:
//! how much memory it holds and how many questions its coordinator gets.
//!
//! Starts a stand-in coordinator (it knows no key and counts the questions,
//! per second), starts the relay binary against it, then
//! 1. proves `--connections` random keys, `--concurrency` at a time, and
//! 2. opens `--connections` connections that upgrade and then never prove
//!    a key, all held at once,
//!
//! sampling the relay's resident memory throughout.
//!
//! ulimit -n 65536
//! cargo run --release -p derp-relay --example unknown_key_load -- \
//!     --relay-bin target/release/derp-relay --connections 10000

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use derp_relay::proto::frame::Frame;
use derp_relay::proto::handshake;
use rand_core::OsRng;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use x25519_dalek::StaticSecret;

#[derive(Parser)]
struct Args {
    /// The relay binary to start.
    #[arg(long)]
    relay_bin: PathBuf,
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Key proofs in flight at once in phase 1.
    #[arg(long, default_value_t = 500)]
    concurrency: usize,
    /// Extra flags for the relay.
    #[arg(long, allow_hyphen_values = true, num_args = 0..)]
    relay_args: Vec<String>,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Questions asked so far, and the most in any one second.
#[derive(Default)]
struct Asked {
    total: AtomicU64,
    peak_per_sec: AtomicU64,
}

async fn coordinator(asked: Arc<Asked>) -> anyhow::Result<SocketAddr> {
    let counter = asked.clone();
    let app = axum::Router::new().route(
        "/api/v1/relay/admit/{key}",
        axum::routing::get(move || {
            counter.total.fetch_add(1, Ordering::Relaxed);
            async { axum::http::StatusCode::NOT_FOUND }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    tokio::spawn(async move {
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = asked.total.load(Ordering::Relaxed);
            asked.peak_per_sec.fetch_max(now - last, Ordering::Relaxed);
            last = now;
        }
    });
    Ok(addr)
}

/// Connects and upgrades; returns the stream after the relay's key frame.
async fn upgraded(addr: SocketAddr) -> anyhow::Result<(TcpStream, [u8; 32], [u8; 16])> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET /derp HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: crank-derp\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await?);
        if head.len() > 8192 {
            bail!("response head too long");
        }
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        bail!(
            "refused: {}",
            String::from_utf8_lossy(&head).lines().next().unwrap_or("")
        );
    }
    let mut frame = [0u8; 5 + 48];
    s.read_exact(&mut frame).await?;
    match Frame::decode(&frame)? {
        Some((Frame::ServerKey { key, challenge }, _)) => Ok((s, key, challenge)),
        other => bail!("expected the relay's key, got {other:?}"),
    }
}

/// Proves a fresh random key; returns the relay's closing reason.
async fn prove_random_key(addr: SocketAddr) -> anyhow::Result<String> {
    let (mut s, key, challenge) = upgraded(addr).await?;
    let secret = StaticSecret::random_from_rng(OsRng);
    let mut f = Vec::new();
    handshake::seal(&secret, &key, &challenge, None)?.encode(&mut f)?;
    s.write_all(&f).await?;
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut reply))
        .await
        .context("the relay did not close")??;
    match Frame::decode(&reply)? {
        Some((Frame::Close { reason }, _)) => Ok(reason),
        other => Ok(format!("{other:?}")),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let asked = Arc::new(Asked::default());
    let coord = coordinator(asked.clone()).await?;
    let dir = tempfile::tempdir()?;
    let token = dir.path().join("token");
    derp_relay::secrets::write_atomically(&token, b"load-test-token")?;
    let listen = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let mut relay = tokio::process::Command::new(&args.relay_bin)
        .args([
            "--listen",
            &listen.to_string(),
            "--stun-listen",
            "127.0.0.1:0",
        ])
        .args(["--coordinator", &format!("http://{coord}")])
        .arg("--token-file")
        .arg(&token)
        .arg("--key-file")
        .arg(dir.path().join("key"))
        .args(&args.relay_args)
        .env("RUST_LOG", "error")
        .kill_on_drop(true)
        .spawn()
        .context("starting the relay")?;
    let pid = relay.id().context("relay pid")?;
    let start = Instant::now();
    while TcpStream::connect(listen).await.is_err() {
        if start.elapsed() > Duration::from_secs(10) {
            bail!("the relay did not start listening");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    println!("relay RSS at start: {} KiB", rss_kib(pid));

    // Phase 1: every connection proves a new random key.
    let started = Instant::now();
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
    let mut tasks = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let permit = gate.clone().acquire_owned().await?;
        tasks.push(tokio::spawn(async move {
            let r = prove_random_key(listen).await;
            drop(permit);
            r
        }));
    }
    for t in tasks {
        let reason = match t.await? {
            Ok(r) => r,
            Err(e) => format!("error: {}", e.root_cause()),
        };
        *reasons.entry(reason).or_default() += 1;
    }
    let took = started.elapsed();
    println!(
        "phase 1: {} random keys proved in {:.1} s; outcomes {reasons:?}",
        args.connections,
        took.as_secs_f64()
    );
    println!(
        "phase 1: coordinator asked {} times, at most {} in one second; relay RSS peak {} KiB, now {} KiB",
        asked.total.load(Ordering::Relaxed),
        asked.peak_per_sec.load(Ordering::Relaxed),
        peak.load(Ordering::Relaxed),
        rss_kib(pid)
    );

    // Phase 2: connections that upgrade and then never prove a key, all open.
    let mut held = Vec::new();
    let mut refused = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..args.connections {
        match upgraded(listen).await {
            Ok((s, _, _)) => held.push(s),
            Err(e) => *refused.entry(format!("{}", e.root_cause())).or_default() += 1,
        }
    }
    println!(
        "phase 2: {} stalled handshakes held open, {} refused {refused:?}; relay RSS {} KiB",
        held.len(),
        args.connections - held.len(),
        rss_kib(pid)
    );
    drop(held);
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "after: relay RSS {} KiB (peak {} KiB); coordinator asked {} times in all",
        rss_kib(pid),
        peak.load(Ordering::Relaxed),
        asked.total.load(Ordering::Relaxed)
    );
    sampler.abort();
    relay.kill().await?;
    Ok(())
}
