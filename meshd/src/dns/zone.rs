//! The names of the mesh, as pure data: which names exist, which addresses
//! they have, and which reverse (PTR) names point back at them.
//!
//! This module exists so that every decision about *our own* names is made
//! without any I/O: the server asks [`Zone::lookup`] and either gets a
//! complete authoritative answer (records, response code, SOA for negative
//! answers) or `None`, meaning "not ours, forward it". Keeping it pure makes
//! it cheap to rebuild on every netmap change and easy to test exhaustively.

use platform::netmap::{is_dns_label, is_dns_name};
use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, PTR, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use ipnet::IpNet;

/// Everything needed to build a [`Zone`]: the mesh domain, its hosts, extra
/// records and the overlay ranges whose reverse names we are authoritative for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ZoneSpec {
    /// The mesh domain, e.g. `home.crank.internal`, without a trailing dot.
    pub domain: String,
    /// The hosts of the mesh; each becomes `NAME.DOMAIN.`.
    pub hosts: Vec<Host>,
    /// Additional address records (e.g. a printer on a subnet route).
    pub extra: Vec<ExtraRecord>,
    /// TTL of every record we hand out, and the negative-caching TTL in the SOA.
    pub ttl: u32,
    /// Overlay ranges (network address, prefix length), e.g. `100.64.0.0/10`
    /// and an `fdXX:…/48`. Reverse names inside them are answered locally;
    /// unknown addresses there get NXDOMAIN instead of being forwarded.
    pub reverse_ranges: Vec<(IpAddr, u8)>,
}

/// One mesh host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// A single DNS label (letters, digits, hyphens; 1–63 characters).
    pub name: String,
    /// The host's overlay addresses.
    pub addrs: Vec<IpAddr>,
}

/// An extra address record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtraRecord {
    /// Relative to the domain (`printer`, `nas.office`) or absolute when it
    /// ends with `.` (`nas.example.com.`).
    pub name: String,
    /// The address; A or AAAA follows from its family.
    pub addr: IpAddr,
}

/// Errors that make a whole [`ZoneSpec`] unusable (bad hosts are skipped instead).
#[derive(Debug, thiserror::Error)]
pub enum ZoneError {
    /// The domain is empty or not a valid DNS name.
    #[error("invalid mesh domain {0:?}")]
    InvalidDomain(String),
    /// A reverse range has a prefix longer than its address family allows.
    #[error("invalid reverse range {addr}/{prefix}")]
    InvalidRange {
        /// The network address given.
        addr: IpAddr,
        /// The prefix length given.
        prefix: u8,
    },
}

/// An authoritative answer computed by the zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneAnswer {
    /// `NoError` (with answers, or NODATA when empty) or `NXDomain`.
    pub code: ResponseCode,
    /// Answer section.
    pub answers: Vec<Record>,
    /// Authority section: the SOA for negative answers, empty otherwise.
    pub authority: Vec<Record>,
}

/// Lookup tables built from a [`ZoneSpec`].
#[derive(Clone, Debug)]
pub struct Zone {
    domain: Name,
    ttl: u32,
    /// Lower-cased FQDN → addresses (hosts and extra records merged).
    forward: HashMap<Name, Vec<IpAddr>>,
    /// Names that exist without records (the apex, empty non-terminals).
    interior: BTreeSet<Name>,
    /// Absolute extra names outside the domain: we answer exactly these.
    outside: BTreeSet<Name>,
    /// Address → names pointing at it (hosts first).
    reverse: HashMap<IpAddr, Vec<Name>>,
    ranges: Vec<IpNet>,
    skipped: Vec<String>,
}

fn parse_domain(domain: &str) -> Result<Name, ZoneError> {
    if !is_dns_name(domain) {
        return Err(ZoneError::InvalidDomain(domain.to_string()));
    }
    let trimmed = domain.strip_suffix('.').unwrap_or(domain);
    Name::from_ascii(format!("{trimmed}."))
        .map(|n| n.to_lowercase())
        .map_err(|_| ZoneError::InvalidDomain(domain.to_string()))
}

impl Zone {
    /// Builds the lookup tables. Hosts and extra records whose names are not
    /// valid labels are skipped and listed in [`Zone::skipped`].
    pub fn new(spec: &ZoneSpec) -> Result<Zone, ZoneError> {
        let domain = parse_domain(&spec.domain)?;
        let mut ranges = Vec::new();
        for &(addr, prefix) in &spec.reverse_ranges {
            let net =
                IpNet::new(addr, prefix).map_err(|_| ZoneError::InvalidRange { addr, prefix })?;
            ranges.push(net.trunc());
        }
        let mut zone = Zone {
            interior: BTreeSet::from([domain.clone()]),
            domain,
            ttl: spec.ttl,
            forward: HashMap::new(),
            outside: BTreeSet::new(),
            reverse: HashMap::new(),
            ranges,
            skipped: Vec::new(),
        };
        for host in &spec.hosts {
            if !is_dns_label(&host.name) {
                zone.skipped.push(host.name.clone());
                continue;
            }
            match zone.relative(&host.name) {
                Some(name) => zone.insert(name, &host.addrs),
                None => zone.skipped.push(host.name.clone()),
            }
        }
        for extra in &spec.extra {
            match zone.extra_name(&extra.name) {
                Some(name) => zone.insert(name, &[extra.addr]),
                None => zone.skipped.push(extra.name.clone()),
            }
        }
        Ok(zone)
    }

    /// Names of hosts and extra records that were skipped as invalid.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// The mesh domain as a fully qualified, lower-case name.
    pub fn domain(&self) -> &Name {
        &self.domain
    }

    fn relative(&self, rel: &str) -> Option<Name> {
        let name = Name::from_ascii(rel).ok()?;
        name.append_domain(&self.domain)
            .ok()
            .map(|n| n.to_lowercase())
    }

    fn extra_name(&self, raw: &str) -> Option<Name> {
        if !is_dns_name(raw) {
            return None;
        }
        let body = raw.strip_suffix('.').unwrap_or(raw);
        if raw.ends_with('.') {
            Name::from_ascii(raw).ok().map(|n| n.to_lowercase())
        } else {
            self.relative(body)
        }
    }

    fn insert(&mut self, name: Name, addrs: &[IpAddr]) {
        if self.domain.zone_of(&name) {
            // Every ancestor between the name and the apex exists (as an
            // empty non-terminal) so that it answers NODATA, not NXDOMAIN.
            let mut parent = name.base_name();
            while parent.num_labels() > self.domain.num_labels() {
                self.interior.insert(parent.clone());
                parent = parent.base_name();
            }
        } else {
            self.outside.insert(name.clone());
        }
        let entry = self.forward.entry(name.clone()).or_default();
        for addr in addrs {
            if !entry.contains(addr) {
                entry.push(*addr);
            }
            let names = self.reverse.entry(*addr).or_default();
            if !names.contains(&name) {
                names.push(name.clone());
            }
        }
    }

    /// True when this zone answers `name` itself rather than forwarding it.
    pub fn is_authoritative(&self, name: &Name) -> bool {
        let name = name.to_lowercase();
        if self.domain.zone_of(&name) || self.outside.contains(&name) {
            return true;
        }
        match name.parse_arpa_name() {
            Ok(net) => self.reverse_zone(&net).is_some() || self.known_address(&net).is_some(),
            Err(_) => false,
        }
    }

    fn reverse_zone(&self, net: &IpNet) -> Option<&IpNet> {
        self.ranges.iter().find(|r| r.contains(net))
    }

    fn known_address(&self, net: &IpNet) -> Option<IpAddr> {
        (net.prefix_len() == net.max_prefix_len() && self.reverse.contains_key(&net.addr()))
            .then(|| net.addr())
    }

    /// Answers `name`/`qtype` if the zone is authoritative for `name`, or
    /// returns `None` when the query belongs to someone else.
    pub fn lookup(&self, name: &Name, qtype: RecordType) -> Option<ZoneAnswer> {
        let name = name.to_lowercase();
        if self.domain.zone_of(&name) || self.outside.contains(&name) {
            return Some(self.forward_lookup(&name, qtype));
        }
        let net = name.parse_arpa_name().ok()?;
        if let Some(addr) = self.known_address(&net) {
            let names = self
                .reverse
                .get(&addr)
                .map(Vec::as_slice)
                .unwrap_or_default();
            if qtype == RecordType::PTR || qtype == RecordType::ANY {
                let answers = names
                    .iter()
                    .map(|target| {
                        Record::from_rdata(name.clone(), self.ttl, RData::PTR(PTR(target.clone())))
                    })
                    .collect();
                return Some(self.positive(answers));
            }
            return Some(self.negative(ResponseCode::NoError, self.reverse_apex(&net, &name)));
        }
        let range = self.reverse_zone(&net)?;
        let apex = reverse_apex_of(range);
        if name == apex && qtype == RecordType::SOA {
            return Some(self.positive(vec![self.soa(apex)]));
        }
        // A partial reverse name above known addresses is an empty non-terminal.
        let has_below =
            net.prefix_len() < net.max_prefix_len() && self.reverse.keys().any(|a| net.contains(a));
        let code = if has_below || name == apex {
            ResponseCode::NoError
        } else {
            ResponseCode::NXDomain
        };
        Some(self.negative(code, apex))
    }

    fn forward_lookup(&self, name: &Name, qtype: RecordType) -> ZoneAnswer {
        let apex = if self.outside.contains(name) {
            name.clone()
        } else {
            self.domain.clone()
        };
        if *name == self.domain && qtype == RecordType::SOA {
            return self.positive(vec![self.soa(apex)]);
        }
        let Some(addrs) = self.forward.get(name) else {
            let code = if self.interior.contains(name) {
                ResponseCode::NoError
            } else {
                ResponseCode::NXDomain
            };
            return self.negative(code, apex);
        };
        let answers: Vec<Record> = addrs
            .iter()
            .filter_map(|addr| {
                let rdata = match (addr, qtype) {
                    (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => RData::A(A(*v4)),
                    (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => RData::AAAA(AAAA(*v6)),
                    _ => return None,
                };
                Some(Record::from_rdata(name.clone(), self.ttl, rdata))
            })
            .collect();
        if answers.is_empty() {
            self.negative(ResponseCode::NoError, apex)
        } else {
            self.positive(answers)
        }
    }

    fn reverse_apex(&self, net: &IpNet, name: &Name) -> Name {
        match self.reverse_zone(net) {
            Some(range) => reverse_apex_of(range),
            None => name.clone(),
        }
    }

    fn positive(&self, answers: Vec<Record>) -> ZoneAnswer {
        ZoneAnswer {
            code: ResponseCode::NoError,
            answers,
            authority: Vec::new(),
        }
    }

    fn negative(&self, code: ResponseCode, apex: Name) -> ZoneAnswer {
        ZoneAnswer {
            code,
            answers: Vec::new(),
            authority: vec![self.soa(apex)],
        }
    }

    /// The SOA for `apex`. The serial is fixed: nobody transfers this zone,
    /// the SOA only carries the negative-caching TTL (RFC 2308).
    fn soa(&self, apex: Name) -> Record {
        let rname = Name::from_ascii("hostmaster")
            .and_then(|h| h.append_domain(&self.domain))
            .unwrap_or_else(|_| self.domain.clone());
        let soa = SOA::new(self.domain.clone(), rname, 1, 3600, 600, 86400, self.ttl);
        Record::from_rdata(apex, self.ttl, RData::SOA(soa))
    }
}

/// The reverse name of `range` rounded up to a label boundary (8 bits for
/// IPv4, 4 bits for IPv6): 100.64.0.0/10 → `100.in-addr.arpa.`.
fn reverse_apex_of(range: &IpNet) -> Name {
    let full = Name::from(range.addr());
    let (step, max) = match range {
        IpNet::V4(_) => (8u8, 32u8),
        IpNet::V6(_) => (4u8, 128u8),
    };
    let keep = range.prefix_len() / step;
    let drop = (max / step - keep) as usize;
    let mut apex = full;
    for _ in 0..drop {
        apex = apex.base_name();
    }
    apex
}

#[cfg(test)]
#[path = "zone_tests.rs"]
mod tests;
