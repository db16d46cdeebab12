//! Floods a WireGuard port with handshake initiations, as fast as one
//! thread can send, for the handshake-flood benchmark
//! (`tests/bench/handshake-flood.sh`).
//!
//! `handshake-flood TARGET NODE_KEY SECONDS [valid|garbage]`
//!
//! `valid` (the default) sends initiations from throwaway keys with a
//! correct MAC1 for `NODE_KEY`, which anyone who knows the target's public
//! key can make: without a cookie check each one costs the target a
//! Diffie-Hellman. `garbage` sends initiation-sized noise (wrong MAC1).
//! Prints how many were sent and the rate.

use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use boringtun::noise::{Tunn, TunnResult};
use platform::keys::{NodePrivate, NodePublic};
use rand_core::RngCore as _;

/// Distinct initiations sent in turn.
const VARIANTS: usize = 64;

fn initiations(target: &NodePublic, valid: bool) -> Vec<Vec<u8>> {
    (0..VARIANTS)
        .map(|i| {
            if valid {
                let me = NodePrivate::generate();
                let mut t = Tunn::new(me.to_dalek(), target.to_dalek(), None, None, i as u32, None);
                let mut buf = vec![0u8; 256];
                match t.format_handshake_initiation(&mut buf, true) {
                    TunnResult::WriteToNetwork(p) => p.to_vec(),
                    _ => Vec::new(),
                }
            } else {
                let mut p = vec![0u8; 148];
                rand_core::OsRng.fill_bytes(&mut p);
                p[..4].copy_from_slice(&[1, 0, 0, 0]);
                p
            }
        })
        .filter(|p| !p.is_empty())
        .collect()
}

fn try_main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [target, key, secs, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: handshake-flood TARGET NODE_KEY SECONDS [valid|garbage]");
    };
    let target: SocketAddr = target.parse().context("TARGET (ip:port)")?;
    let key: NodePublic = key.parse().context("NODE_KEY (nodekey:…)")?;
    let secs: u64 = secs.parse().context("SECONDS")?;
    let valid = match rest.first().map(String::as_str) {
        None | Some("valid") => true,
        Some("garbage") => false,
        Some(other) => anyhow::bail!("mode {other:?}: valid or garbage"),
    };
    let packets = initiations(&key, valid);
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let mut sent = 0u64;
    let mut failed = 0u64;
    while Instant::now() < until {
        for p in &packets {
            // The target's cookie replies and ICMP errors are ignored.
            match socket.send_to(p, target) {
                Ok(_) => sent += 1,
                Err(_) => failed += 1,
            }
        }
    }
    let took = started.elapsed().as_secs_f64();
    println!(
        "sent {sent} initiations ({}) in {took:.1} s: {:.0}/s; {failed} send errors",
        if valid { "valid MAC1" } else { "garbage" },
        sent as f64 / took
    );
    Ok(())
}

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("handshake-flood: {e:#}");
            ExitCode::FAILURE
        }
    }
}
