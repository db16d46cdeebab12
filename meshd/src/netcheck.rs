//! Measurements of the network around this device: latency to each relay
//! region, to choose the home region.

use std::time::{Duration, Instant};

use platform::netmap::RelayMap;

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
    fn home_is_the_fastest_reachable_region() {
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(pick_home(&[(1, ms(30)), (2, ms(10)), (3, None)]), Some(2));
        assert_eq!(pick_home(&[(1, None)]), None);
    }
}
