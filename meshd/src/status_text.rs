//! Human-readable `meshd status` and the CLI's other views, and the one way
//! the CLI prints text ([`for_terminal`], [`print`]): names, reasons and
//! reports come from peers, workers and the coordinator, and a terminal
//! obeys the control sequences hidden in them.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::IpAddr;

use crate::engine::PingPath;
use platform::capability::Capabilities;

use crate::gateway::joblog::JobRecord;
use crate::localapi::{
    BackendState, ComputeStatus, NetcheckReport, PairingInfo, PingReport, Status,
};

/// This device's key is flagged in `meshd status` this long before expiry.
const EXPIRY_WARNING_SECS: u64 = 14 * 24 * 3600;

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

/// A stretch of time for people: `3 days`, `1 hour`, `40 minutes`.
fn span(secs: u64) -> String {
    const DAY: u64 = 24 * 3600;
    let (n, unit) = match secs {
        s if s >= DAY => (s / DAY, "day"),
        s if s >= 3600 => (s / 3600, "hour"),
        s if s >= 60 => (s / 60, "minute"),
        s => (s, "second"),
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

/// The warning about this device's node key at `now`, if one is due.
fn key_expiry_warning(expiry: Option<u64>, now: u64) -> Option<String> {
    let t = expiry?;
    if t <= now {
        return Some(format!(
            "node key expired {} ago: peers no longer accept it; register again with `meshd up`",
            span(now - t)
        ));
    }
    (t - now <= EXPIRY_WARNING_SECS).then(|| {
        format!(
            "node key expires in {}; it renews automatically while online, or run `meshd rotate-key`",
            span(t - now)
        )
    })
}

/// What `meshd up` without a key prints while it waits.
pub fn render_pairing(p: &PairingInfo, now: u64) -> String {
    format!(
        "To add this device, have a member run:\n\n    coordinator device approve {} --network <network>\n\nor open {}\n\nWaiting for approval; the code expires in {}. (Ctrl-C stops only this wait: the\ndaemon keeps waiting until the code expires, and `meshd down` cancels it.)\n",
        p.code,
        p.verification_url,
        span(p.expires_at.saturating_sub(now))
    )
}

/// `text` with every character a terminal would act on instead of show
/// (C0 and C1 controls, ESC and DEL among them, and the bidirectional
/// overrides and isolates that reorder what is shown) written as a
/// visible `\u{…}` escape. Line breaks and tabs stay.
pub fn for_terminal(text: &str) -> Cow<'_, str> {
    fn acts(c: char) -> bool {
        (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    }
    if !text.chars().any(acts) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if acts(c) {
            let _ = write!(out, "{}", c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Prints `text` to stdout through [`for_terminal`].
pub fn print(text: &str) {
    print!("{}", for_terminal(text));
}

/// Prints `text` and a line break to stderr through [`for_terminal`].
pub fn eprintln(text: &str) {
    eprintln!("{}", for_terminal(text));
}

pub fn render(s: &Status) -> String {
    render_at(s, platform::unix_now())
}

/// [`render`] at `now` (unix seconds), which expiry warnings count from.
pub fn render_at(s: &Status, now: u64) -> String {
    let mut out = String::new();
    match (&s.backend, &s.self_) {
        (BackendState::Stopped, _) => {
            match &s.pairing {
                Some(p) => {
                    let _ = writeln!(
                        out,
                        "pairing: waiting for a member to approve code {} (expires in {}; or open {})",
                        p.code,
                        span(p.expires_at.saturating_sub(now)),
                        p.verification_url
                    );
                }
                None => {
                    let _ = writeln!(out, "stopped (run `meshd up`)");
                }
            }
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
                "{:<28} {:<16} {} (this device, network {}{})",
                addrs(&me.addresses),
                me.name,
                me.tun,
                me.network,
                me.owner
                    .as_deref()
                    .map_or(String::new(), |o| format!(", owner {o}"))
            );
            if me.awaiting_approval {
                let _ = writeln!(out, "# waiting for an admin to approve this device");
            }
            if let Some(warning) = key_expiry_warning(me.key_expiry, now) {
                let _ = writeln!(out, "# {warning}");
            }
            if let Some(warning) = &me.firewall_warning {
                let _ = writeln!(out, "# WARNING: {warning}");
            }
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
    if let Some(d) = &s.dns {
        match &d.error {
            Some(e) => {
                let _ = writeln!(out, "# WARNING: {e}");
            }
            None => {
                let _ = writeln!(
                    out,
                    "# MagicDNS: {} on {} (OS resolver: {}); answered {}, forwarded {}, failed {}",
                    d.zone,
                    addrs(&d.servers),
                    d.os,
                    d.local_answers + d.nxdomain,
                    d.forwarded,
                    d.forward_failures
                );
            }
        }
    }
    let c = &s.counters;
    let filtered = c.drop_filter_no_rule + c.drop_filter_not_for_us + c.drop_filter_malformed;
    if filtered > 0 || c.filter_flows_full > 0 {
        let _ = writeln!(
            out,
            "# packet filter dropped {filtered}: {} no rule, {} not for this device, {} malformed; {} flows not tracked (table full)",
            c.drop_filter_no_rule, c.drop_filter_not_for_us, c.drop_filter_malformed, c.filter_flows_full
        );
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
            match (p.key_expired, p.online) {
                (true, _) => "expired",
                (false, true) => "online",
                (false, false) => "offline",
            },
            p.path,
            handshake,
            bytes(p.rx_bytes),
            bytes(p.tx_bytes),
            match (&p.tier, &p.compute) {
                (Some(t), Some(c)) => format!(" {t} compute {c}"),
                (Some(t), None) => format!(" {t}"),
                _ => String::new(),
            } + &p
                .owner
                .as_deref()
                .map_or(String::new(), |o| format!(" owner {o}")),
        );
    }
    out
}

/// `meshd whois`: who holds an address.
pub fn render_whois(w: &crate::localapi::WhoIs) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}{} ({}, network {})",
        w.fqdn.as_deref().unwrap_or(&w.name),
        if w.this_device { " (this device)" } else { "" },
        w.kind,
        w.network,
    );
    let _ = writeln!(out, "addresses: {}", addrs(&w.addresses).trim_end());
    let _ = writeln!(
        out,
        "owner: {}{}",
        w.owner.as_deref().unwrap_or("none"),
        w.role.map_or(String::new(), |r| format!(" ({r})"))
    );
    if !w.tags.is_empty() {
        let _ = writeln!(out, "tags: {}", w.tags.join(", "));
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

fn credits(micro: u64) -> String {
    format!("{:.2}", micro as f64 / platform::jobs::MICRO as f64)
}

/// `meshd jobs`: one line per job, newest first.
pub fn render_jobs(jobs: &[JobRecord]) -> String {
    let mut out = String::new();
    if jobs.is_empty() {
        out.push_str("no jobs yet\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<10} {:<11} {:<10} {:>8} {:<14} {:>3}  model",
        "job", "workload", "state", "ms", "served by", "try"
    );
    for j in jobs {
        let _ = writeln!(
            out,
            "{:<10} {:<11} {:<10} {:>8} {:<14} {:>3}  {}",
            &j.id[..j.id.len().min(10)],
            j.workload.as_str(),
            format!("{:?}", j.state).to_lowercase(),
            j.latency_ms
                .map(|m| m.to_string())
                .unwrap_or_else(|| "-".into()),
            j.served_by.as_deref().unwrap_or("-"),
            j.attempts.len(),
            j.model
        );
    }
    out
}

/// `meshd jobs show`: why the job went where it went.
pub fn render_job(j: &JobRecord) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "job {}", j.id);
    let _ = writeln!(
        out,
        "  {} with {} · route {} · {}{}",
        j.workload,
        if j.model.is_empty() {
            "any model"
        } else {
            &j.model
        },
        j.route,
        format!("{:?}", j.state).to_lowercase(),
        j.latency_ms
            .map(|m| format!(" in {m} ms"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "  estimated cost at most {} credits",
        credits(j.estimated_cost)
    );
    if let Some(e) = &j.error {
        let _ = writeln!(out, "  error: {e}");
    }
    let p = &j.placement;
    let ranked = p["ranked"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(out, "eligible devices, best first:");
    if ranked.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for r in ranked.iter().take(5) {
        let chosen = j.served_by.as_deref() == r["name"].as_str();
        let _ = writeln!(
            out,
            "  {} {:<14} score {:>7.3}  {} {}",
            if chosen { "→" } else { " " },
            r["name"].as_str().unwrap_or("?"),
            r["score"].as_f64().unwrap_or(0.0),
            r["tier"].as_str().unwrap_or(""),
            if r["direct"].as_bool() == Some(true) {
                "direct"
            } else {
                "relayed"
            }
        );
        let terms: Vec<String> = r["terms"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                format!(
                    "{} {:+.3}",
                    t["feature"].as_str().unwrap_or("?"),
                    t["contribution"].as_f64().unwrap_or(0.0)
                )
            })
            .collect();
        if !terms.is_empty() {
            let _ = writeln!(out, "      {}", terms.join(", "));
        }
    }
    let rejected = p["rejected"].as_array().cloned().unwrap_or_default();
    if !rejected.is_empty() {
        let _ = writeln!(out, "not eligible:");
        for r in rejected.iter().take(10) {
            let _ = writeln!(
                out,
                "    {:<14} {}: {}",
                r["name"].as_str().unwrap_or("?"),
                r["failed_filter"].as_str().unwrap_or("?"),
                r["detail"].as_str().unwrap_or("")
            );
        }
        if rejected.len() > 10 {
            let _ = writeln!(out, "    … and {} more", rejected.len() - 10);
        }
    }
    let _ = writeln!(out, "attempts:");
    if j.attempts.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for (i, a) in j.attempts.iter().enumerate() {
        let _ = writeln!(
            out,
            "  {}. {:<14} {:<11} {:>6} ms  {}{}",
            i + 1,
            a.device,
            a.outcome,
            a.elapsed_ms,
            a.path,
            a.cause
                .as_deref()
                .map(|c| format!("  {c}"))
                .unwrap_or_default()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::localapi::{PeerStatus, SelfStatus};

    const DAY: u64 = 24 * 3600;
    const NOW: u64 = 1_700_000_000;

    fn running(key_expiry: Option<u64>, awaiting_approval: bool) -> Status {
        Status {
            backend: BackendState::Running,
            coordinator: Some("http://c".into()),
            coordinator_connected: true,
            self_: Some(SelfStatus {
                name: "alpha".into(),
                network: "home".into(),
                node_key: "nodekey:00".into(),
                addresses: vec![IpAddr::from([100, 64, 0, 1])],
                tun: "mesh0".into(),
                udp_port: 41641,
                home_region: None,
                home_relay_connected: false,
                public_endpoint: None,
                capabilities: Capabilities::default(),
                owner: Some("ann".into()),
                key_expiry,
                awaiting_approval,
                firewall_warning: None,
            }),
            peers: vec![PeerStatus {
                name: "beta".into(),
                kind: "meshd".into(),
                node_key: "nodekey:01".into(),
                addresses: vec![IpAddr::from([100, 64, 0, 2])],
                online: true,
                path: "direct 10.0.0.2:41641".into(),
                endpoint: None,
                last_handshake_secs_ago: Some(3),
                rx_bytes: 0,
                tx_bytes: 0,
                tier: None,
                compute: None,
                owner: Some("bob".into()),
                key_expiry: Some(NOW + 100 * DAY),
                key_expired: false,
            }],
            counters: Default::default(),
            pairing: None,
            dns: None,
            offloads: None,
        }
    }

    /// Every character a terminal acts on that `for_terminal` must hide.
    const HOSTILE: [char; 9] = [
        '\u{1b}', '\u{7}', '\u{8}', '\r', '\u{7f}', '\u{9b}', '\u{202e}', '\u{2066}', '\u{200f}',
    ];

    #[test]
    fn peer_strings_reach_the_terminal_escaped() {
        let mut s = running(None, false);
        s.peers[0].name = "beta\u{1b}]0;owned\u{7}".into();
        s.peers[0].compute = Some("paused: \u{1b}[2J\u{202e}llun\r".into());
        s.peers[0].owner = Some("bob\u{9b}31m\u{2066}\u{200f}\u{8}\u{7f}".into());
        s.peers[0].tier = Some(platform::capability::Tier::Tier2);
        let me = s.self_.as_mut().unwrap();
        me.capabilities.gpus = vec![platform::capability::Gpu {
            name: "GPU\u{1b}[31m".into(),
            vram_bytes: 1 << 30,
        }];
        let raw = render_at(&s, NOW);
        assert!(
            raw.contains('\u{1b}'),
            "the views themselves keep the data as it is"
        );
        let shown = for_terminal(&raw);
        for c in HOSTILE {
            assert!(
                !shown.contains(c),
                "{:?} reached the terminal: {shown:?}",
                c
            );
        }
        assert!(shown.contains("beta\\u{1b}]0;owned\\u{7}"), "{shown}");
        assert!(shown.contains("GPU\\u{1b}[31m"), "{shown}");
        assert_eq!(
            shown.lines().count(),
            raw.lines().count(),
            "line breaks stay"
        );
    }

    #[test]
    fn plain_text_passes_untouched() {
        let text = "alpha\tbeta · 48 °C (acpitz) — ünïcode ✓\n";
        assert!(matches!(for_terminal(text), Cow::Borrowed(t) if t == text));
    }

    #[test]
    fn owners_are_shown_for_this_device_and_peers() {
        let text = render_at(&running(None, false), NOW);
        let mut lines = text.lines();
        assert!(lines
            .next()
            .unwrap()
            .ends_with("(this device, network home, owner ann)"));
        let peer = text.lines().find(|l| l.contains("beta")).unwrap();
        assert!(peer.ends_with(" owner bob"), "{peer}");
        assert!(peer.contains(" online "), "{peer}");
        assert!(
            !text.contains("node key"),
            "no warning for a key that never expires"
        );
    }

    #[test]
    fn an_unguarded_overlay_is_shown() {
        let mut s = running(None, false);
        assert!(!render_at(&s, NOW).contains("WARNING"));
        if let Some(me) = s.self_.as_mut() {
            me.firewall_warning = Some("no firewall: `nft` was not found".into());
        }
        assert!(render_at(&s, NOW).contains("\n# WARNING: no firewall: `nft` was not found\n"));
    }

    #[test]
    fn key_expiry_warnings() {
        let far = render_at(&running(Some(NOW + 30 * DAY), false), NOW);
        assert!(!far.contains("node key"), "{far}");
        let near = render_at(&running(Some(NOW + 3 * DAY + 3600), false), NOW);
        assert!(
            near.contains("# node key expires in 3 days; it renews automatically while online, or run `meshd rotate-key`"),
            "{near}"
        );
        let edge = render_at(&running(Some(NOW + 14 * DAY), false), NOW);
        assert!(edge.contains("node key expires in 14 days"), "{edge}");
        let soon = render_at(&running(Some(NOW + 90), false), NOW);
        assert!(soon.contains("expires in 1 minute;"), "{soon}");
        let gone = render_at(&running(Some(NOW - 2 * 3600), false), NOW);
        assert!(gone.contains("# node key expired 2 hours ago"), "{gone}");
    }

    #[test]
    fn approval_and_expired_peers() {
        let mut s = running(None, true);
        s.peers[0].key_expired = true;
        let text = render_at(&s, NOW);
        assert!(
            text.contains("# waiting for an admin to approve this device"),
            "{text}"
        );
        let peer = text.lines().find(|l| l.contains("beta")).unwrap();
        assert!(peer.contains(" expired "), "{peer}");
    }

    #[test]
    fn pairing_is_shown_while_it_waits() {
        let info = PairingInfo {
            coordinator: "http://c".into(),
            hostname: "alpha".into(),
            code: "BCDF-GHJK".into(),
            verification_url: "http://c/api/v1/device-codes/BCDF-GHJK".into(),
            expires_at: NOW + 600,
        };
        let text = render_pairing(&info, NOW);
        assert!(
            text.contains("coordinator device approve BCDF-GHJK --network <network>"),
            "{text}"
        );
        assert!(
            text.contains("or open http://c/api/v1/device-codes/BCDF-GHJK"),
            "{text}"
        );
        assert!(text.contains("expires in 10 minutes"), "{text}");
        let mut s = running(None, false);
        s.backend = BackendState::Stopped;
        s.self_ = None;
        s.pairing = Some(info);
        let status = render_at(&s, NOW + 60);
        assert!(
            status.starts_with(
                "pairing: waiting for a member to approve code BCDF-GHJK (expires in 9 minutes"
            ),
            "{status}"
        );
        s.pairing = None;
        assert_eq!(render_at(&s, NOW), "stopped (run `meshd up`)\n");
    }

    #[test]
    fn spans_read_naturally() {
        assert_eq!(span(0), "0 seconds");
        assert_eq!(span(1), "1 second");
        assert_eq!(span(119), "1 minute");
        assert_eq!(span(7200), "2 hours");
        assert_eq!(span(DAY), "1 day");
        assert_eq!(span(20 * DAY), "20 days");
    }

    #[test]
    fn byte_units() {
        assert_eq!(bytes(5), "5 B");
        assert_eq!(bytes(2048), "2.0 KiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
    }
}
