//! Measurements of the network around this device and what follows from
//! them for the coordinator: the home relay region (lowest latency), the
//! public address STUN servers see, and the endpoints peers can try. The
//! map stream only forwards what [`Reporter::check`] returns.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use platform::api::ClientMessage;
use platform::netmap::{NetMap, RelayMap};

use crate::endpoints::local_endpoints;
use crate::engine::Engine;

/// How long a check waits for STUN answers.
const STUN_WAIT: Duration = Duration::from_millis(500);
/// A check without a public address yet is repeated this soon.
const NO_PUBLIC_RETRY: Duration = Duration::from_secs(1);

/// What one check found that the coordinator must hear, and when to
/// check again sooner than usual.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Findings {
    pub messages: Vec<ClientMessage>,
    pub retry_in: Option<Duration>,
}

/// Remembers what the coordinator was told, so only changes are sent.
#[derive(Debug, Default)]
pub struct Reporter {
    reported: Vec<SocketAddr>,
}

impl Reporter {
    /// Measures (home region when none is chosen, STUN) and gathers the
    /// endpoints for `engine`'s socket; tells `engine` what it found.
    pub async fn check(&mut self, engine: &Engine, map: &NetMap) -> Findings {
        let mut messages = Vec::new();
        if engine.home_region().is_none() && !map.relay_map.regions.is_empty() {
            if let Some(region) = pick_home(&relay_latencies(&map.relay_map).await) {
                tracing::info!(region, "home relay region chosen");
                engine.set_home_region(region);
                messages.push(ClientMessage::HomeRegion { region });
            }
        }
        let stun = stun_servers(&map.relay_map).await;
        if !stun.is_empty() {
            // Short wait: the answers usually take a round trip.
            engine.stun_report(&stun, STUN_WAIT).await;
        }
        let local = local_endpoints(engine.udp_port(), &map.routes, engine.tun_name());
        let public = engine.public_endpoint();
        let endpoints = self.decide(local, public);
        engine.set_own_endpoints(endpoints.current.clone());
        if let Some(changed) = endpoints.changed {
            tracing::debug!(endpoints = ?changed, "reporting endpoints");
            messages.push(ClientMessage::Endpoints { endpoints: changed });
        }
        Findings {
            messages,
            retry_in: (!stun.is_empty() && public.is_none()).then_some(NO_PUBLIC_RETRY),
        }
    }

    /// The endpoints now (local ones plus the public one, sorted, without
    /// repeats) and, when they differ from the last report, the new report.
    fn decide(&mut self, mut local: Vec<SocketAddr>, public: Option<SocketAddr>) -> Endpoints {
        local.extend(public);
        local.sort();
        local.dedup();
        let changed = (local != self.reported).then(|| {
            self.reported.clone_from(&local);
            local.clone()
        });
        Endpoints {
            current: local,
            changed,
        }
    }
}

struct Endpoints {
    current: Vec<SocketAddr>,
    changed: Option<Vec<SocketAddr>>,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// TCP connect time to each region's first relay (`None`: unreachable).
pub async fn relay_latencies(map: &RelayMap) -> Vec<(u32, Option<Duration>)> {
    let mut out = Vec::with_capacity(map.regions.len());
    for region in &map.regions {
        let Some(addr) = region
            .urls
            .first()
            .and_then(|u| derp_client::relay_authority(u).ok())
        else {
            out.push((region.id, None));
            continue;
        };
        let start = Instant::now();
        let rtt = match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&addr))
            .await
        {
            Ok(Ok(_)) => Some(start.elapsed()),
            _ => None,
        };
        out.push((region.id, rtt));
    }
    out
}

/// The region with the lowest latency.
pub fn pick_home(latencies: &[(u32, Option<Duration>)]) -> Option<u32> {
    latencies
        .iter()
        .filter_map(|(id, rtt)| rtt.map(|r| (r, *id)))
        .min()
        .map(|(_, id)| id)
}

/// The STUN servers of every region, resolved.
pub async fn stun_servers(map: &RelayMap) -> Vec<std::net::SocketAddr> {
    let mut out = Vec::new();
    for s in map.regions.iter().flat_map(|r| &r.stun) {
        if let Ok(addrs) = tokio::net::lookup_host(s).await {
            out.extend(addrs);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_reported_when_they_change_and_only_then() {
        let a: SocketAddr = "10.0.0.2:41641".parse().unwrap();
        let b: SocketAddr = "192.168.1.5:41641".parse().unwrap();
        let public: SocketAddr = "203.0.113.7:5000".parse().unwrap();
        let mut r = Reporter::default();
        let first = r.decide(vec![b, a], None);
        assert_eq!(first.current, vec![a, b], "sorted");
        assert_eq!(first.changed, Some(vec![a, b]));
        assert_eq!(r.decide(vec![a, b], None).changed, None, "unchanged");
        // STUN found the public address: one new report with it.
        let with_public = r.decide(vec![a, b], Some(public));
        assert_eq!(with_public.changed, Some(vec![a, b, public]));
        // The public address is also a local one: listed once.
        let mut r = Reporter::default();
        assert_eq!(r.decide(vec![a], Some(a)).current, vec![a]);
    }

    #[test]
    fn home_is_the_fastest_reachable_region() {
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(pick_home(&[(1, ms(30)), (2, ms(10)), (3, None)]), Some(2));
        assert_eq!(pick_home(&[(1, None)]), None);
    }
}
