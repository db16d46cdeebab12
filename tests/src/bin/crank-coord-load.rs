//! Simulates N devices against a running coordinator with the real
//! protocol, no TUN: signed registration (with the node-key proof), one
//! map stream each (challenge, signed hello, full netmap, deltas),
//! heartbeats every 5 s. Then it measures how long one change (a device's
//! endpoints) takes to reach every other stream.
//!
//! Prints one Markdown table row: devices, registrations per second,
//! median and p99 time from opening a stream to its full netmap, bytes of
//! a full netmap (all its pieces: the tool asks for pieces, as meshd does), fan-out p50/p99 of one change to all streams, bytes of
//! a delta, and (with `--pid`) the coordinator's peak RSS and CPU seconds.
//!
//!   crank-coord-load --coordinator http://127.0.0.1:8080 --auth-key KEY --devices 1000 [--pid PID]
//!
//! Every device talks from its own loopback address (127.x.y.z), as
//! devices do from their own addresses: the coordinator's per-source
//! limits apply to each alone. One tokio runtime, one task per stream;
//! the whole run is bounded by `--deadline` seconds.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use futures_util::{SinkExt as _, StreamExt as _};
use meshd::state::Keys;
use platform::api::{ClientMessage, MapHello, ServerMessage};
use platform::capability::Capabilities;
use platform::keys::{DevicePrivate, DiscoPrivate, NodePrivate, NodePublic};
use platform::netmap::PeerChange;
use platform::signed::{Signed, DOMAIN_MAP};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

/// Registrations and stream opens in flight at once.
const CONCURRENCY: usize = 64;
const HEARTBEAT: Duration = Duration::from_secs(5);
/// Changes whose fan-out is timed.
const CHANGES: usize = 5;

struct Args {
    coordinator: String,
    auth_key: String,
    devices: usize,
    pid: Option<u32>,
    deadline: Duration,
}

fn args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let (mut coordinator, mut auth_key, mut devices, mut pid) = (None, None, 1000, None);
    let mut deadline = Duration::from_secs(900);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--coordinator" => coordinator = Some(value()?),
            "--auth-key" => auth_key = Some(value()?),
            "--devices" => devices = value()?.parse()?,
            "--pid" => pid = Some(value()?.parse()?),
            "--deadline" => deadline = Duration::from_secs(value()?.parse()?),
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(Args {
        coordinator: coordinator.context("--coordinator URL")?,
        auth_key: auth_key.context("--auth-key KEY")?,
        devices,
        pid,
        deadline,
    })
}

/// Device `i`'s own loopback address: 127.1.0.1 upwards.
fn source(i: usize) -> IpAddr {
    let n = i as u32 + 1;
    IpAddr::V4(Ipv4Addr::new(
        127,
        1 + (n >> 16) as u8,
        (n >> 8) as u8,
        n as u8,
    ))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Peak resident memory (MiB) and CPU seconds (user + system) of `pid`.
fn process_usage(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some((hwm_kib / 1024.0, ticks / 100.0))
}

/// Reports the coordinator's resident memory (now and peak) and CPU so
/// far on stderr, to tell which phase costs what.
fn phase(pid: Option<u32>, what: &str) {
    let Some(pid) = pid else { return };
    let rss_now = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default();
    if let Some((peak, cpu)) = process_usage(pid) {
        eprintln!("{what}: coordinator RSS {rss_now}, peak {peak:.0} MiB, CPU {cpu:.1} s");
    }
}

/// One device's open stream, as the load run sees it.
struct Device {
    node: NodePublic,
    /// Sends messages (endpoint reports) on the stream.
    out: tokio::sync::mpsc::Sender<ClientMessage>,
}

/// When each stream heard of each watched change.
#[derive(Default)]
struct Heard {
    /// (changed device, endpoint port) → arrival times.
    arrivals: HashMap<(NodePublic, u16), Vec<Instant>>,
    delta_bytes: Vec<usize>,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// The payload of a (signed) server message. The signature is not
/// checked: devices check their own, and the load run must not spend the
/// coordinator's share of the CPU on it.
fn parse(text: &str) -> anyhow::Result<ServerMessage> {
    match serde_json::from_str(text)? {
        ServerMessage::Signed { frame } => Ok(serde_json::from_str(&frame.payload)?),
        other => Ok(other),
    }
}

async fn next_text(ws: &mut Ws) -> anyhow::Result<Option<String>> {
    while let Some(msg) = ws.next().await {
        match msg? {
            Message::Text(t) => return Ok(Some(t.to_string())),
            Message::Close(_) => return Ok(None),
            _ => continue,
        }
    }
    Ok(None)
}

/// Opens device `i`'s map stream from its own address; returns it with
/// the size of its full netmap.
async fn open(url: &str, server: SocketAddr, i: usize, keys: &Keys) -> anyhow::Result<(Ws, usize)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source(i), 0))?;
    let tcp = socket.connect(server).await.context("connecting")?;
    let (mut ws, _) = tokio_tungstenite::client_async(url, tcp)
        .await
        .context("upgrading to a WebSocket")?;
    let nonce = match parse(
        &next_text(&mut ws)
            .await?
            .context("closed before the challenge")?,
    )? {
        ServerMessage::Challenge { nonce } => nonce,
        other => bail!("expected the challenge, got {}", kind(&other)),
    };
    let hello = Signed::sign(
        &keys.device,
        DOMAIN_MAP,
        &MapHello {
            timestamp: unix_now(),
            node_key: keys.node.public(),
            disco_key: keys.disco.public(),
            nonce,
            full_in_pieces: true,
        },
    );
    ws.send(Message::text(serde_json::to_string(
        &ClientMessage::Hello { hello },
    )?))
    .await?;
    let first = next_text(&mut ws)
        .await?
        .context("closed before the netmap")?;
    let remaining = match parse(&first)? {
        ServerMessage::Full { .. } => 0,
        ServerMessage::PartialFull { remaining, .. } => remaining,
        other => bail!("expected the full netmap, got {}", kind(&other)),
    };
    // The rest of a netmap sent in pieces.
    let mut bytes = first.len();
    for _ in 0..remaining {
        let piece = next_text(&mut ws)
            .await?
            .context("closed in the middle of the netmap")?;
        bytes += piece.len();
    }
    Ok((ws, bytes))
}

/// A message's type, for errors (a netmap's text would be megabytes).
fn kind(m: &ServerMessage) -> &'static str {
    match m {
        ServerMessage::Challenge { .. } => "challenge",
        ServerMessage::Signed { .. } => "signed",
        ServerMessage::Full { .. } => "full",
        ServerMessage::PartialFull { .. } => "partial_full",
        ServerMessage::Peers { .. } => "peers",
        ServerMessage::Delta { .. } => "delta",
        ServerMessage::Filter { .. } => "filter",
        ServerMessage::RotateKey => "rotate_key",
        ServerMessage::Error { .. } => "error",
    }
}

/// Serves one open stream until the run ends: heartbeats out, deltas in
/// (the watched endpoint changes noted with their arrival time).
async fn serve(
    mut ws: Ws,
    mut out: tokio::sync::mpsc::Receiver<ClientMessage>,
    heard: Arc<Mutex<Heard>>,
    last_message: Arc<Mutex<Instant>>,
) {
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                let hb = ClientMessage::Heartbeat { capabilities: None };
                let Ok(text) = serde_json::to_string(&hb) else { return };
                if ws.send(Message::text(text)).await.is_err() {
                    return;
                }
            }
            msg = out.recv() => {
                let Some(msg) = msg else { return };
                let Ok(text) = serde_json::to_string(&msg) else { return };
                if ws.send(Message::text(text)).await.is_err() {
                    return;
                }
            }
            text = next_text(&mut ws) => {
                let Ok(Some(text)) = text else { return };
                let now = Instant::now();
                *last_message.lock().unwrap_or_else(|p| p.into_inner()) = now;
                let Ok(ServerMessage::Delta { changes }) = parse(&text) else { continue };
                let mut h = heard.lock().unwrap_or_else(|p| p.into_inner());
                h.delta_bytes.push(text.len());
                for c in changes {
                    if let PeerChange::Endpoints { node_key, endpoints } = c {
                        for e in endpoints {
                            h.arrivals.entry((node_key, e.port())).or_default().push(now);
                        }
                    }
                }
            }
        }
    }
}

async fn run(a: Args) -> anyhow::Result<String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let info = meshd::control::coordinator_info(&http, &a.coordinator, None).await?;
    let server: SocketAddr = a
        .coordinator
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .context("--coordinator must be http://IP:PORT")?;
    let url = format!("ws://{server}/api/v1/map");
    let n = a.devices;
    let keys: Vec<Arc<Keys>> = (0..n)
        .map(|_| {
            Arc::new(Keys {
                node: NodePrivate::generate(),
                pending_node: None,
                node_obtained_at: None,
                disco: DiscoPrivate::generate(),
                device: DevicePrivate::generate(),
            })
        })
        .collect();

    // Registration, each device from its own address.
    let gate = Arc::new(Semaphore::new(CONCURRENCY));
    let info = Arc::new(info);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for (i, k) in keys.iter().enumerate() {
        let (gate, info, k, coordinator, auth) = (
            gate.clone(),
            info.clone(),
            k.clone(),
            a.coordinator.clone(),
            a.auth_key.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await?;
            let http = reqwest::Client::builder()
                .local_address(source(i))
                .timeout(Duration::from_secs(60))
                .build()?;
            meshd::control::register(
                &http,
                &coordinator,
                &info,
                &k,
                &auth,
                &format!("load-{i}"),
                Capabilities::default(),
            )
            .await
            .map(|_| ())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let registration = started.elapsed();
    phase(a.pid, "registered");

    // Map streams.
    let heard = Arc::new(Mutex::new(Heard::default()));
    let last_message = Arc::new(Mutex::new(Instant::now()));
    let opened = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(n);
    for (i, k) in keys.iter().enumerate() {
        let (gate, k, url, heard, last, opened) = (
            gate.clone(),
            k.clone(),
            url.clone(),
            heard.clone(),
            last_message.clone(),
            opened.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await?;
            let t0 = Instant::now();
            let (ws, full_bytes) = open(&url, server, i, &k).await?;
            let to_full = t0.elapsed();
            drop(permit);
            opened.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tokio::spawn(serve(ws, rx, heard, last));
            anyhow::Ok((
                Device {
                    node: k.node.public(),
                    out: tx,
                },
                to_full,
                full_bytes,
            ))
        }));
    }
    let mut devices = Vec::with_capacity(n);
    let mut to_full = Vec::with_capacity(n);
    let mut full_bytes = 0;
    for t in tasks {
        let (d, t, b) = t.await??;
        devices.push(d);
        to_full.push(t);
        full_bytes = full_bytes.max(b);
    }
    to_full.sort();
    phase(a.pid, "streams open");

    // Let the announcements of the last devices drain.
    let quiet_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let last = *last_message.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() > Duration::from_secs(2)
            || quiet_since.elapsed() > Duration::from_secs(120)
        {
            break;
        }
    }
    heard
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .delta_bytes
        .clear();

    // Fan-out: one device reports new endpoints; every other stream must
    // hear of it.
    let mut latencies = Vec::new();
    let mut missed = 0;
    for c in 0..CHANGES {
        let who = &devices[c * 7919 % n];
        let port = 20_000 + c as u16;
        let endpoint = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), port);
        let t0 = Instant::now();
        who.out
            .send(ClientMessage::Endpoints {
                endpoints: vec![endpoint],
            })
            .await
            .ok();
        let wait_until = t0 + Duration::from_secs(30);
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let got = heard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .arrivals
                .get(&(who.node, port))
                .map_or(0, Vec::len);
            if got >= n - 1 || Instant::now() > wait_until {
                break;
            }
        }
        let times = heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .arrivals
            .get(&(who.node, port))
            .cloned()
            .unwrap_or_default();
        missed += (n - 1).saturating_sub(times.len());
        latencies.extend(times.iter().map(|t| t.duration_since(t0)));
        // Reports are rate limited per device: the next one comes from
        // another device anyway, but give the fan-out a moment to settle.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    latencies.sort();
    phase(a.pid, "changes timed");
    let delta_bytes = {
        let h = heard.lock().unwrap_or_else(|p| p.into_inner());
        let mut b = h.delta_bytes.clone();
        b.sort_unstable();
        b.get(b.len() / 2).copied().unwrap_or(0)
    };
    let usage = a.pid.and_then(process_usage);
    let ms = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1000.0);
    Ok(format!(
        "| {n} | {:.0} | {} / {} | {} | {} / {} ms{} | {} | {} | {} |",
        n as f64 / registration.as_secs_f64(),
        ms(percentile(&to_full, 0.5)),
        ms(percentile(&to_full, 0.99)),
        full_bytes,
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        if missed > 0 {
            format!(" ({missed} missed)")
        } else {
            String::new()
        },
        delta_bytes,
        usage.map_or("-".into(), |(rss, _)| format!("{rss:.0}")),
        usage.map_or("-".into(), |(_, cpu)| format!("{cpu:.1}")),
    ))
}

fn main() -> std::process::ExitCode {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("crank-coord-load: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("crank-coord-load: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let deadline = a.deadline;
    match rt.block_on(async { tokio::time::timeout(deadline, run(a)).await }) {
        Ok(Ok(row)) => {
            println!("{row}");
            std::process::ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("crank-coord-load: {e:#}");
            std::process::ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("crank-coord-load: the run passed its deadline of {deadline:?}");
            std::process::ExitCode::FAILURE
        }
    }
}
