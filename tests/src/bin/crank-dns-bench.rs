//! `crank-dns-bench SERVER_ADDR NAME COUNT CONCURRENCY`: sends COUNT A queries for
//! NAME over UDP with CONCURRENCY in flight and prints queries/s, p50/p99
//! latency (µs) and failures. Exists to measure the server end to end.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use tokio::net::UdpSocket;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        return Err("usage: crank-dns-bench SERVER_ADDR NAME COUNT CONCURRENCY".into());
    }
    let server: SocketAddr = args[1].parse()?;
    let name = Name::from_str(&args[2])?;
    let count: usize = args[3].parse()?;
    let concurrency: usize = args[4].parse::<usize>()?.max(1);

    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (next, name) = (next.clone(), name.clone());
        workers.push(tokio::spawn(worker(server, name, count, next)));
    }
    let mut latencies = Vec::with_capacity(count);
    let mut failed = 0usize;
    for w in workers {
        let (lat, fail) = w.await??;
        latencies.extend(lat);
        failed += fail;
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let pct = |p: f64| -> u128 {
        if latencies.is_empty() {
            return 0;
        }
        let idx = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies[idx.min(latencies.len() - 1)]
    };
    println!(
        "queries={count} concurrency={concurrency} elapsed_ms={} qps={:.0} p50_us={} p99_us={} failed={failed}",
        elapsed.as_millis(),
        count as f64 / elapsed.as_secs_f64(),
        pct(0.50),
        pct(0.99),
    );
    Ok(())
}

/// Sends queries one at a time on its own socket until COUNT are taken.
async fn worker(
    server: SocketAddr,
    name: Name,
    count: usize,
    next: Arc<AtomicUsize>,
) -> Result<(Vec<u128>, usize), BoxError> {
    let sock = UdpSocket::bind(if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .await?;
    sock.connect(server).await?;
    let mut latencies = Vec::new();
    let mut failed = 0;
    let mut buf = vec![0u8; 4096];
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= count {
            break;
        }
        let id = (i % 65536) as u16;
        let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
        msg.metadata.recursion_desired = true;
        msg.add_query(Query::query(name.clone(), RecordType::A));
        let bytes = msg.to_vec()?;
        let t0 = Instant::now();
        sock.send(&bytes).await?;
        let ok = loop {
            match tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf)).await {
                Err(_) | Ok(Err(_)) => break false,
                Ok(Ok(n)) => match Message::from_vec(&buf[..n]) {
                    Ok(reply) if reply.metadata.id == id => {
                        break reply.metadata.response_code == ResponseCode::NoError
                            && !reply.answers.is_empty();
                    }
                    _ => continue, // stray or late reply
                },
            }
        };
        if ok {
            latencies.push(t0.elapsed().as_micros());
        } else {
            failed += 1;
        }
    }
    Ok((latencies, failed))
}
