//! Direct endpoints: this host's interface addresses with the engine's port.

use std::net::{IpAddr, SocketAddr};

use platform::addr::IpPrefix;

/// Whether `ip` is worth telling peers about: not loopback, not IPv6
/// link-local (needs a scope), not inside the overlay itself.
pub fn usable(ip: IpAddr, overlay: &[IpPrefix]) -> bool {
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
        return false;
    }
    if let IpAddr::V6(v6) = ip {
        if v6.segments()[0] & 0xffc0 == 0xfe80 {
            return false;
        }
    }
    !overlay.iter().any(|p| p.contains(ip))
}

/// The endpoints to report, sorted, for a socket on `port`.
pub fn local_endpoints(port: u16, overlay: &[IpPrefix], tun_name: &str) -> Vec<SocketAddr> {
    let Ok(ifaces) = if_addrs::get_if_addrs() else {
        return Vec::new();
    };
    let mut out: Vec<SocketAddr> = ifaces
        .into_iter()
        .filter(|i| i.name != tun_name)
        .map(|i| i.ip())
        .filter(|ip| usable(*ip, overlay))
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use platform::addr::OVERLAY_V4;

    #[test]
    fn filters_addresses_peers_cannot_use() {
        let overlay = [OVERLAY_V4];
        assert!(usable("10.0.0.2".parse().unwrap(), &overlay));
        assert!(usable("2001:db8::1".parse().unwrap(), &overlay));
        assert!(!usable("127.0.0.1".parse().unwrap(), &overlay));
        assert!(!usable("fe80::1".parse().unwrap(), &overlay));
        assert!(!usable("100.64.0.7".parse().unwrap(), &overlay));
        assert!(!usable("::1".parse().unwrap(), &overlay));
    }
}
