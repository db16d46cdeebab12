//! Human-readable `meshd status`.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::localapi::{BackendState, Status};

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

fn addrs(a: &[IpAddr]) -> String {
    a.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ")
}

pub fn render(s: &Status) -> String {
    let mut out = String::new();
    match (&s.backend, &s.self_) {
        (BackendState::Stopped, _) => {
            let _ = writeln!(out, "stopped (run `meshd up`)");
            return out;
        }
        (BackendState::Starting, _) | (_, None) => {
            let _ = writeln!(out, "starting: waiting for the coordinator at {}", s.coordinator.as_deref().unwrap_or("?"));
            return out;
        }
        (BackendState::Running, Some(me)) => {
            let _ = writeln!(out, "{:<28} {:<16} {} (this device, network {})", addrs(&me.addresses), me.name, me.tun, me.network);
        }
    }
    if let Some(me) = &s.self_ {
        match (&me.home_region, me.home_relay_connected) {
            (Some(r), true) => {
                let _ = writeln!(out, "# home relay: {r}");
            }
            (Some(r), false) => {
                let _ = writeln!(out, "# home relay: {r} (not connected)");
            }
            (None, _) => {}
        }
    }
    if !s.coordinator_connected {
        let _ = writeln!(out, "# coordinator unreachable; using the last netmap");
    }
    for p in &s.peers {
        let handshake = p.last_handshake_secs_ago.map_or("never".to_owned(), |t| format!("{t}s ago"));
        let _ = writeln!(
            out,
            "{:<28} {:<16} {:<9} {:<8} {:<28} handshake {:<9} rx {} tx {}",
            addrs(&p.addresses),
            p.name,
            p.kind,
            if p.online { "online" } else { "offline" },
            p.path,
            handshake,
            bytes(p.rx_bytes),
            bytes(p.tx_bytes),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_units() {
        assert_eq!(bytes(5), "5 B");
        assert_eq!(bytes(2048), "2.0 KiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
    }
}
