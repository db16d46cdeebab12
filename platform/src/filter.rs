//! A device's inbound packet filter, as the coordinator sends it in the
//! netmap: the network's access policy reduced to the rules whose
//! destination is this device.
//!
//! Every rule accepts; nothing else is accepted (the device also lets in the
//! answers to flows it started itself). The destination of each rule is the
//! device that holds the filter, so a rule names only who may send (source
//! prefixes), which protocols and which of the device's ports.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::addr::IpPrefix;

/// The rules one device enforces on what its peers send it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PacketFilter {
    pub rules: Vec<FilterRule>,
}

impl PacketFilter {
    /// A filter that accepts everything from everyone: for tunnels that
    /// have no coordinator (static configurations).
    pub fn allow_all() -> Self {
        PacketFilter {
            rules: vec![FilterRule {
                sources: vec![
                    IpPrefix::new([0, 0, 0, 0].into(), 0).expect("valid"),
                    IpPrefix::new([0u16; 8].into(), 0).expect("valid"),
                ],
                protos: Vec::new(),
                ports: vec![PortRange::ALL],
            }],
        }
    }
}

/// One accept rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterRule {
    /// Who may send: overlay addresses of peers, or any prefix.
    pub sources: Vec<IpPrefix>,
    /// Which protocols; empty means TCP, UDP and ICMP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protos: Vec<Proto>,
    /// Destination ports on this device. Protocols without ports (ICMP)
    /// are accepted only by rules that allow every port.
    pub ports: Vec<PortRange>,
}

impl FilterRule {
    /// The protocols this rule accepts (its list, or the default three).
    pub fn effective_protos(&self) -> &[Proto] {
        const DEFAULT: [Proto; 3] = [Proto::Tcp, Proto::Udp, Proto::Icmp];
        if self.protos.is_empty() {
            &DEFAULT
        } else {
            &self.protos
        }
    }
}

/// An IP protocol a rule may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    /// ICMP for IPv4 and ICMPv6 for IPv6.
    Icmp,
    Sctp,
    /// Any other protocol by its IANA number.
    Number(u8),
}

impl Proto {
    /// The protocol of an IP packet's protocol / next-header number.
    pub fn from_number(n: u8) -> Proto {
        match n {
            6 => Proto::Tcp,
            17 => Proto::Udp,
            1 | 58 => Proto::Icmp,
            132 => Proto::Sctp,
            other => Proto::Number(other),
        }
    }

    /// Whether packets of this protocol carry ports.
    pub fn has_ports(self) -> bool {
        matches!(self, Proto::Tcp | Proto::Udp | Proto::Sctp)
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Proto::Tcp => f.write_str("tcp"),
            Proto::Udp => f.write_str("udp"),
            Proto::Icmp => f.write_str("icmp"),
            Proto::Sctp => f.write_str("sctp"),
            Proto::Number(n) => write!(f, "{n}"),
        }
    }
}

impl FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            "icmp" | "ipv6-icmp" | "icmpv6" => Ok(Proto::Icmp),
            "sctp" => Ok(Proto::Sctp),
            other => other
                .parse::<u8>()
                .map(Proto::from_number)
                .map_err(|_| format!("unknown protocol {s:?} (tcp, udp, icmp, sctp or a number)")),
        }
    }
}

impl Serialize for Proto {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Proto {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An inclusive range of ports; text form `22`, `8000-8999` or `*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const ALL: PortRange = PortRange {
        first: 0,
        last: u16::MAX,
    };

    pub fn one(port: u16) -> Self {
        PortRange {
            first: port,
            last: port,
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    pub fn is_all(&self) -> bool {
        *self == Self::ALL
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_all() {
            f.write_str("*")
        } else if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("bad port {p:?} (0-65535)"))
        };
        if s.trim() == "*" {
            return Ok(PortRange::ALL);
        }
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => {
                let p = port(s)?;
                (p, p)
            }
        };
        if first > last {
            return Err(format!("port range {s:?} ends before it starts"));
        }
        Ok(PortRange { first, last })
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses a comma-separated port list (`22,80,8000-8999` or `*`).
pub fn parse_ports(s: &str) -> Result<Vec<PortRange>, String> {
    if s.is_empty() {
        return Err("no ports (use * for every port)".into());
    }
    s.split(',').map(str::parse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn port_ranges_parse_and_print() {
        assert_eq!("*".parse::<PortRange>(), Ok(PortRange::ALL));
        assert_eq!("22".parse::<PortRange>(), Ok(PortRange::one(22)));
        assert_eq!(
            parse_ports("80,8000-8999").unwrap(),
            vec![
                PortRange::one(80),
                PortRange {
                    first: 8000,
                    last: 8999
                }
            ]
        );
        assert!("9-8".parse::<PortRange>().is_err());
        assert!("70000".parse::<PortRange>().is_err());
        assert!(parse_ports("").is_err());
        assert!(parse_ports("22,").is_err());
    }

    #[test]
    fn protocols_parse_by_name_and_number() {
        assert_eq!("TCP".parse::<Proto>(), Ok(Proto::Tcp));
        assert_eq!("6".parse::<Proto>(), Ok(Proto::Tcp));
        assert_eq!("58".parse::<Proto>(), Ok(Proto::Icmp));
        assert_eq!("47".parse::<Proto>(), Ok(Proto::Number(47)));
        assert!("gre".parse::<Proto>().is_err());
        assert!("300".parse::<Proto>().is_err());
    }

    proptest! {
        #[test]
        fn rules_round_trip_through_json(first in any::<u16>(), len in any::<u16>(), n in any::<u8>(), bits in 0u8..=32) {
            let last = first.saturating_add(len);
            let rule = FilterRule {
                sources: vec![IpPrefix::new([100, 64, 1, 2].into(), bits).unwrap()],
                protos: vec![Proto::from_number(n)],
                ports: vec![PortRange { first, last }],
            };
            let f = PacketFilter { rules: vec![rule] };
            let json = serde_json::to_string(&f).unwrap();
            prop_assert_eq!(serde_json::from_str::<PacketFilter>(&json).unwrap(), f);
        }
    }
}
