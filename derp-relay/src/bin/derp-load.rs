//! Load tool for a relay: opens many authenticated client connections, pairs
//! them up, has the pairs send to each other for a while, and reports how
//! many connected, how fast they connected, and the forwarding rate. With
//! `--relay-pid` it also reads the relay's resident memory before and after
//! the clients connect.
//!
//! derp-load --url http://127.0.0.1:3340/derp --clients 1000 --seconds 10

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use derp_relay::client::{RelayClient, RelayEvent};
use rand_core::OsRng;
use tokio::sync::mpsc;
use x25519_dalek::{PublicKey, StaticSecret};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// How long the pairs send.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 1200)]
    packet_size: usize,
    /// Pairs that send (the others only hold their connection).
    #[arg(long, default_value_t = 8)]
    senders: usize,
    /// Relay process to read memory from.
    #[arg(long)]
    relay_pid: Option<u32>,
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.clients >= 2, "need at least two clients");
    let rss_before = args.relay_pid.and_then(rss_kib);

    let (tx, mut events) = mpsc::channel::<(usize, RelayEvent)>(65_536);
    let mut clients = Vec::with_capacity(args.clients);
    let start = Instant::now();
    for i in 0..args.clients {
        let secret = StaticSecret::random_from_rng(OsRng);
        let key = PublicKey::from(&secret).to_bytes();
        clients.push((
            key,
            RelayClient::spawn(args.url.clone(), secret, i, tx.clone()),
        ));
    }
    drop(tx);
    let mut connected = 0;
    let received = Arc::new(AtomicU64::new(0));
    while connected < args.clients {
        match tokio::time::timeout(Duration::from_secs(30), events.recv())
            .await
            .context("clients stopped connecting")?
        {
            Some((_, RelayEvent::Connected)) => connected += 1,
            Some((i, RelayEvent::Disconnected { reason })) => {
                anyhow::bail!("client {i} failed: {reason}")
            }
            Some(_) => {}
            None => anyhow::bail!("event stream ended"),
        }
    }
    let connect_time = start.elapsed();
    // Let the relay settle, then read its memory with everyone connected.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = args.relay_pid.and_then(rss_kib);

    let counter = received.clone();
    let size = args.packet_size;
    tokio::spawn(async move {
        while let Some((_, ev)) = events.recv().await {
            if let RelayEvent::Packet { data, .. } = ev {
                counter.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
    });
    let payload = vec![0x04u8; size];
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let senders = args.senders.min(args.clients / 2);
    let mut sent = 0u64;
    let send_start = Instant::now();
    while Instant::now() < deadline {
        let mut progressed = false;
        for p in 0..senders {
            let (a, b) = (2 * p, 2 * p + 1);
            if clients[a].1.send(clients[b].0, &payload) {
                sent += size as u64;
                progressed = true;
            }
            if clients[b].1.send(clients[a].0, &payload) {
                sent += size as u64;
                progressed = true;
            }
        }
        if !progressed {
            tokio::task::yield_now().await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let elapsed = send_start.elapsed().as_secs_f64();
    let got = received.load(Ordering::Relaxed);
    println!(
        "clients connected:     {connected} in {:.2} s",
        connect_time.as_secs_f64()
    );
    if let (Some(b), Some(a)) = (rss_before, rss_after) {
        println!("relay RSS:             {b} KiB before, {a} KiB with all clients ({:.1} KiB per client)", (a.saturating_sub(b)) as f64 / connected as f64);
    }
    println!(
        "sending pairs:         {senders} ({} B packets, {:.1} s)",
        size, elapsed
    );
    println!(
        "offered:               {:.0} Mbit/s",
        sent as f64 * 8.0 / elapsed / 1e6
    );
    println!(
        "forwarded (received):  {:.0} Mbit/s, {:.0} packets/s",
        got as f64 * 8.0 / elapsed / 1e6,
        got as f64 / size as f64 / elapsed
    );
    Ok(())
}
