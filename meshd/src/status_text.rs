//! Human-readable `meshd status`.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::engine::PingPath;
use platform::capability::Capabilities;

use crate::localapi::{BackendState, ComputeStatus, NetcheckReport, PingReport, Status};

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn addrs(a: &[IpAddr]) -> String {
    a.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn render(s: &Status) -> String {
    let mut out = String::new();
    match (&s.backend, &s.self_) {
        (BackendState::Stopped, _) => {
            let _ = writeln!(out, "stopped (run `meshd up`)");
            return out;
        }
        (BackendState::Starting, _) | (_, None) => {
            let _ = writeln!(
                out,
                "starting: waiting for the coordinator at {}",
                s.coordinator.as_deref().unwrap_or("?")
            );
            return out;
        }
        (BackendState::Running, Some(me)) => {
            let _ = writeln!(
                out,
                "{:<28} {:<16} {} (this device, network {})",
                addrs(&me.addresses),
                me.name,
                me.tun,
                me.network
            );
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
    if let Some(me) = &s.self_ {
        let _ = writeln!(out, "# {}", describe(&me.capabilities));
    }
    if !s.coordinator_connected {
        let _ = writeln!(out, "# coordinator unreachable; using the last netmap");
    }
    for p in &s.peers {
        let handshake = p
            .last_handshake_secs_ago
            .map_or("never".to_owned(), |t| format!("{t}s ago"));
        let _ = writeln!(
            out,
            "{:<28} {:<16} {:<9} {:<8} {:<28} handshake {:<9} rx {} tx {}{}",
            addrs(&p.addresses),
            p.name,
            p.kind,
            if p.online { "online" } else { "offline" },
            p.path,
            handshake,
            bytes(p.rx_bytes),
            bytes(p.tx_bytes),
            match (&p.tier, &p.compute) {
                (Some(t), Some(c)) => format!(" {t} compute {c}"),
                (Some(t), None) => format!(" {t}"),
                _ => String::new(),
            },
        );
    }
    out
}

/// One line on a capability report: tier, hardware, power, heat, compute.
pub fn describe(c: &Capabilities) -> String {
    let mut parts = vec![
        c.tier.to_string(),
        format!("{} cores {}", c.cpu_cores, c.arch),
        format!("{} RAM", bytes(c.ram_bytes)),
    ];
    parts.extend(
        c.gpus
            .iter()
            .map(|g| format!("{} ({} VRAM)", g.name, bytes(g.vram_bytes))),
    );
    if let Some(b) = &c.battery {
        let state = if b.charging {
            ", charging"
        } else if b.on_ac {
            ", on AC"
        } else {
            ""
        };
        parts.push(format!("battery {}%{state}", b.percent));
    }
    if let Some(t) = &c.thermal {
        parts.push(format!("{} °C ({})", t.celsius, t.zone));
    }
    match &c.compute {
        Some(o) if o.serving => {
            let models: Vec<&str> = o.models.iter().map(|m| m.name.as_str()).collect();
            parts.push(format!(
                "compute serving {} on port {}",
                models.join(", "),
                o.port
            ));
        }
        Some(o) => parts.push(format!(
            "compute paused: {}",
            o.reason.as_deref().unwrap_or("unknown")
        )),
        None => parts.push("compute off".into()),
    }
    parts.join(" · ")
}

/// `meshd compute status` output.
pub fn render_compute(s: &ComputeStatus) -> String {
    let mut out = String::new();
    let state = match (&s.settings.enabled, s.serving, &s.reason) {
        (_, true, _) => "serving".to_owned(),
        (_, false, Some(r)) => format!("not serving: {r}"),
        _ => "not serving".to_owned(),
    };
    let _ = writeln!(out, "compute: {state}");
    let p = &s.settings.policy;
    let _ = writeln!(
        out,
        "policy: {:?} mode, idle below {}%, stop under {}% battery or at {} °C",
        p.mode, p.idle_below_percent, p.min_battery_percent, p.max_celsius
    );
    let _ = writeln!(
        out,
        "{}, {} slots, queue {}, {} llama.cpp threads",
        s.tier, s.slots, s.queue, s.threads
    );
    for m in &s.models {
        let _ = writeln!(
            out,
            "model {:<18} {:<10} sha256 {}",
            m.name, m.kind, m.sha256
        );
    }
    for u in &s.urls {
        let _ = writeln!(out, "api {u}");
    }
    out
}

/// `meshd ping` output: one line per ping.
pub fn render_ping(r: &PingReport) -> String {
    let mut out = String::new();
    let who = r
        .address
        .map_or(r.peer.clone(), |a| format!("{} ({a})", r.peer));
    for reply in &r.replies {
        match reply {
            None => {
                let _ = writeln!(out, "timeout waiting for {who}");
            }
            Some(p) => {
                let via = match &p.path {
                    PingPath::Direct { endpoint } => format!("via {endpoint}"),
                    PingPath::Relay { region } => {
                        let code = r
                            .regions
                            .iter()
                            .find(|(id, _)| id == region)
                            .map_or(region.to_string(), |(_, c)| c.clone());
                        format!("via relay {code}")
                    }
                };
                let _ = writeln!(
                    out,
                    "pong from {who} {via} in {:.2} ms",
                    p.rtt_us as f64 / 1000.0
                );
            }
        }
    }
    out
}

/// `meshd netcheck` output.
pub fn render_netcheck(r: &NetcheckReport) -> String {
    let mut out = String::new();
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let _ = writeln!(out, "UDP: {}", yes_no(r.udp));
    let _ = writeln!(
        out,
        "public endpoint: {}",
        r.public_endpoint
            .map_or("unknown".to_owned(), |e| e.to_string())
    );
    let varies = r
        .mapping_varies_by_destination
        .map_or("unknown (fewer than two STUN answers)", |v| yes_no(v));
    let _ = writeln!(out, "mapping varies by destination: {varies}");
    for s in &r.stun {
        let seen = s
            .mapped
            .map_or("no answer".to_owned(), |m| format!("saw {m}"));
        let _ = writeln!(out, "  STUN {}: {seen}", s.server);
    }
    let _ = writeln!(
        out,
        "home relay: {}",
        r.home_region.as_deref().unwrap_or("none")
    );
    for l in &r.relays {
        let lat = l
            .latency_ms
            .map_or("unreachable".to_owned(), |ms| format!("{ms:.2} ms"));
        let _ = writeln!(out, "  relay {} ({}): {lat}", l.code, l.region);
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
