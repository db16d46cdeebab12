//! Overlay addresses: IPv4 from 100.64.0.0/10 (CGNAT space) and IPv6 from a
//! unique-local /48 chosen at random per coordinator (RFC 4193).
//!
//! A device gets a sequence number once; both of its addresses derive from it,
//! so they are stable for as long as the device exists.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// The IPv4 overlay range.
pub const OVERLAY_V4: IpPrefix = IpPrefix {
    addr: IpAddr::V4(Ipv4Addr::new(100, 64, 0, 0)),
    len: 10,
};

/// Kept free for MagicDNS.
pub const MAGIC_DNS_V4: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 100);

/// The IPv6 MagicDNS address inside a network's unique-local /48:
/// `<prefix>:ffff::53`. Device addresses keep bytes 6..12 zero (see
/// [`UlaPrefix::address`]), so it is never a device's. None for a prefix
/// that is not an IPv6 /48.
pub fn magic_dns_v6(ula: &IpPrefix) -> Option<Ipv6Addr> {
    match ula.addr {
        IpAddr::V6(a) if ula.len == 48 => {
            let mut b = a.octets();
            b[6..].fill(0);
            b[6] = 0xff;
            b[7] = 0xff;
            b[15] = 0x53;
            Some(Ipv6Addr::from(b))
        }
        _ => None,
    }
}

/// An IP network: address plus prefix length, text form `addr/len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpPrefix {
    pub addr: IpAddr,
    pub len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixParseError {
    #[error("expected ADDRESS/LENGTH")]
    MissingSlash,
    #[error("bad address: {0}")]
    BadAddress(String),
    #[error("prefix length out of range")]
    BadLength,
}

impl IpPrefix {
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, PrefixParseError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(PrefixParseError::BadLength);
        }
        Ok(Self { addr, len })
    }

    /// A prefix covering exactly one address.
    pub fn host(addr: IpAddr) -> Self {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, len }
    }

    /// The same prefix with the host bits cleared (`10.1.2.3/24` → `10.1.2.0/24`).
    pub fn network(&self) -> IpPrefix {
        let addr = match self.addr {
            IpAddr::V4(v4) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        };
        IpPrefix {
            addr,
            len: self.len,
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for IpPrefix {
    type Err = PrefixParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, l) = s.split_once('/').ok_or(PrefixParseError::MissingSlash)?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| PrefixParseError::BadAddress(a.to_owned()))?;
        let len: u8 = l.parse().map_err(|_| PrefixParseError::BadLength)?;
        Self::new(addr, len)
    }
}

impl serde::Serialize for IpPrefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
impl<'de> serde::Deserialize<'de> for IpPrefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A unique-local IPv6 /48 (fdXX:XXXX:XXXX::/48).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UlaPrefix([u8; 6]);

impl UlaPrefix {
    /// Builds the prefix from 40 random bits (RFC 4193 global ID).
    pub fn from_global_id(id: [u8; 5]) -> Self {
        Self([0xfd, id[0], id[1], id[2], id[3], id[4]])
    }

    pub fn prefix(&self) -> IpPrefix {
        let mut b = [0u8; 16];
        b[..6].copy_from_slice(&self.0);
        IpPrefix {
            addr: IpAddr::V6(Ipv6Addr::from(b)),
            len: 48,
        }
    }

    /// The device address for a sequence number: the number in the low bits.
    pub fn address(&self, seq: u32) -> Ipv6Addr {
        let mut b = [0u8; 16];
        b[..6].copy_from_slice(&self.0);
        b[12..].copy_from_slice(&seq.to_be_bytes());
        Ipv6Addr::from(b)
    }
}

impl FromStr for UlaPrefix {
    type Err = PrefixParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let p: IpPrefix = s.parse()?;
        match p.addr {
            IpAddr::V6(v6) if p.len == 48 && v6.octets()[0] == 0xfd => {
                let mut id = [0u8; 6];
                id.copy_from_slice(&v6.octets()[..6]);
                Ok(Self(id))
            }
            _ => Err(PrefixParseError::BadAddress(s.to_owned())),
        }
    }
}

impl fmt::Display for UlaPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.prefix().fmt(f)
    }
}

/// The IPv4 overlay address for sequence number `seq` (1-based), or `None`
/// when that slot is reserved (network/broadcast-looking `.0`/`.255` hosts
/// and the MagicDNS address) or outside the /10.
pub fn ipv4_for_seq(seq: u32) -> Option<Ipv4Addr> {
    const SIZE: u32 = 1 << 22;
    if seq == 0 || seq >= SIZE {
        return None;
    }
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + seq);
    let last = ip.octets()[3];
    if last == 0 || last == 255 || ip == MAGIC_DNS_V4 {
        return None;
    }
    Some(ip)
}

/// The first usable sequence number after `seq`.
pub fn next_seq(mut seq: u32) -> Option<u32> {
    loop {
        seq = seq.checked_add(1)?;
        if seq >= 1 << 22 {
            return None;
        }
        if ipv4_for_seq(seq).is_some() {
            return Some(seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn first_addresses() {
        assert_eq!(next_seq(0), Some(1));
        assert_eq!(ipv4_for_seq(1), Some(Ipv4Addr::new(100, 64, 0, 1)));
        assert_eq!(ipv4_for_seq(255), None);
        assert_eq!(next_seq(254), Some(257));
        let dns_seq = u32::from(MAGIC_DNS_V4) - u32::from(Ipv4Addr::new(100, 64, 0, 0));
        assert_eq!(ipv4_for_seq(dns_seq), None);
        assert_eq!(next_seq((1 << 22) - 2), None);
    }

    #[test]
    fn ula_addresses() {
        let p = UlaPrefix::from_global_id([1, 2, 3, 4, 5]);
        assert_eq!(p.to_string(), "fd01:203:405::/48");
        assert_eq!(p.address(7).to_string(), "fd01:203:405::7");
        assert_eq!(p.to_string().parse::<UlaPrefix>().unwrap(), p);
        assert!("fc00::/48".parse::<UlaPrefix>().is_err());
        assert!(p.prefix().contains(IpAddr::V6(p.address(99))));
    }

    #[test]
    fn prefix_contains() {
        assert!(OVERLAY_V4.contains("100.127.255.254".parse().unwrap()));
        assert!(!OVERLAY_V4.contains("100.128.0.1".parse().unwrap()));
        assert!(!OVERLAY_V4.contains("fd00::1".parse().unwrap()));
        let zero: IpPrefix = "0.0.0.0/0".parse().unwrap();
        assert!(zero.contains("8.8.8.8".parse().unwrap()));
        assert!("1.2.3.4/33".parse::<IpPrefix>().is_err());
        assert!("1.2.3.4".parse::<IpPrefix>().is_err());
        let p: IpPrefix = "100.64.3.1/24".parse().unwrap();
        assert_eq!(p.network().to_string(), "100.64.3.0/24");
        let p: IpPrefix = "fd01:203:405::7/48".parse().unwrap();
        assert_eq!(p.network().to_string(), "fd01:203:405::/48");
        assert_eq!(
            "1.2.3.4/0"
                .parse::<IpPrefix>()
                .unwrap()
                .network()
                .to_string(),
            "0.0.0.0/0"
        );
    }

    proptest! {
        #[test]
        fn allocated_v4_is_in_overlay(seq in 0u32..(1 << 22)) {
            if let Some(ip) = ipv4_for_seq(seq) {
                prop_assert!(OVERLAY_V4.contains(IpAddr::V4(ip)));
                prop_assert_ne!(ip, MAGIC_DNS_V4);
            }
        }

        #[test]
        fn network_contains_its_addresses(a in any::<u32>(), len in 0u8..=32) {
            let ip = IpAddr::V4(Ipv4Addr::from(a));
            let p = IpPrefix::new(ip, len).unwrap();
            prop_assert!(p.network().contains(ip));
            prop_assert_eq!(p.network().network(), p.network());
        }

        #[test]
        fn prefix_text_round_trips(a in any::<[u8; 16]>(), len in 0u8..=128) {
            let p = IpPrefix::new(IpAddr::V6(Ipv6Addr::from(a)), len).unwrap();
            prop_assert_eq!(p.to_string().parse::<IpPrefix>().unwrap(), p);
            let json = serde_json::to_string(&p).unwrap();
            prop_assert_eq!(serde_json::from_str::<IpPrefix>(&json).unwrap(), p);
        }
    }
}
