//! The inbound packet filter: what peers may send this device, checked on
//! every decrypted packet before it reaches the TUN device.
//!
//! Two things let a packet in: a rule of the netmap's packet filter (the
//! network's access policy reduced to this device), or being the answer to
//! a flow this device started (TCP, UDP, ICMP echo, and ICMP errors about
//! such flows). Everything else is dropped and counted by reason. A
//! fragmented packet is judged by its first fragment; later fragments
//! follow a first one that was let in (at most 1,024 awaited, 30 s each).
//!
//! Rules are precompiled when the netmap changes: each source address maps
//! to one merged set of allowed protocols and port ranges, so a lookup is
//! a hash probe plus a binary search whatever the number of rules. Only
//! sources given as wider prefixes (`*`, CIDRs) are scanned, and there are
//! few of those. The flow table is bounded ([`MAX_FLOWS`]) and entries
//! expire when idle; when it is full, new flows are not recorded (counted)
//! rather than evicting ones in use.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use platform::addr::IpPrefix;
use platform::filter::{PacketFilter, PortRange, Proto};

/// The most flows remembered at once.
pub const MAX_FLOWS: usize = 16_384;
const TCP_IDLE: Duration = Duration::from_secs(600);
const UDP_IDLE: Duration = Duration::from_secs(120);
const ICMP_IDLE: Duration = Duration::from_secs(30);
/// Fragmented packets whose later fragments are awaited, at most, and for
/// how long.
const MAX_FRAGMENTED: usize = 1024;
const FRAGMENT_IDLE: Duration = Duration::from_secs(30);
/// How often a full table is swept for expired flows.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Why an inbound packet was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    /// No rule allows it and it answers no flow of ours.
    NoRule,
    /// Addressed to an address that is not this device's.
    NotForUs,
    /// Too short or inconsistent to classify.
    Malformed,
}

/// What one source may send: merged port ranges per protocol.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Allowed {
    tcp: Vec<PortRange>,
    udp: Vec<PortRange>,
    sctp: Vec<PortRange>,
    /// ICMP and numbered protocols (no ports): allowed by rules for every port.
    portless: Vec<Proto>,
}

impl Allowed {
    fn add(&mut self, proto: Proto, ports: &[PortRange]) {
        match proto {
            Proto::Tcp => self.tcp.extend_from_slice(ports),
            Proto::Udp => self.udp.extend_from_slice(ports),
            Proto::Sctp => self.sctp.extend_from_slice(ports),
            other => {
                if ports.iter().any(PortRange::is_all) && !self.portless.contains(&other) {
                    self.portless.push(other);
                }
            }
        }
    }

    fn finish(&mut self) {
        for ranges in [&mut self.tcp, &mut self.udp, &mut self.sctp] {
            *ranges = merge(std::mem::take(ranges));
        }
    }

    fn allows(&self, proto: Proto, port: Option<u16>) -> bool {
        let ranges = match proto {
            Proto::Tcp => &self.tcp,
            Proto::Udp => &self.udp,
            Proto::Sctp => &self.sctp,
            other => return self.portless.contains(&other),
        };
        // Ports are known for every packet that gets here (later
        // fragments are judged by their first: see `Filter::inbound`).
        let Some(port) = port else {
            return false;
        };
        let i = ranges.partition_point(|r| r.last < port);
        ranges.get(i).is_some_and(|r| r.first <= port)
    }
}

/// Sorted, non-overlapping ranges.
fn merge(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    ranges.sort();
    let mut out: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if u32::from(r.first) <= u32::from(last.last) + 1 => {
                last.last = last.last.max(r.last);
            }
            _ => out.push(r),
        }
    }
    out
}

/// A packet filter compiled for lookups.
#[derive(Debug, Default)]
struct Compiled {
    /// This device's addresses: packets must be for one of them.
    mine: Vec<IpAddr>,
    exact: HashMap<IpAddr, Allowed>,
    prefixes: Vec<(IpPrefix, Allowed)>,
}

impl Compiled {
    fn new(filter: &PacketFilter, mine: &[IpAddr]) -> Self {
        let mut exact: HashMap<IpAddr, Allowed> = HashMap::new();
        let mut prefixes: Vec<(IpPrefix, Allowed)> = Vec::new();
        for rule in &filter.rules {
            for source in &rule.sources {
                let allowed = if source.len == IpPrefix::host(source.addr).len {
                    exact.entry(source.addr).or_default()
                } else {
                    let net = source.network();
                    let i = match prefixes.iter().position(|(p, _)| *p == net) {
                        Some(i) => i,
                        None => {
                            prefixes.push((net, Allowed::default()));
                            prefixes.len() - 1
                        }
                    };
                    &mut prefixes[i].1
                };
                for proto in rule.effective_protos() {
                    allowed.add(*proto, &rule.ports);
                }
            }
        }
        exact.values_mut().for_each(Allowed::finish);
        prefixes.iter_mut().for_each(|(_, a)| a.finish());
        Compiled {
            mine: mine.to_vec(),
            exact,
            prefixes,
        }
    }

    fn allows(&self, src: IpAddr, proto: Proto, port: Option<u16>) -> bool {
        self.exact.get(&src).is_some_and(|a| a.allows(proto, port))
            || self
                .prefixes
                .iter()
                .any(|(p, a)| p.contains(src) && a.allows(proto, port))
    }
}

/// One flow, from this device's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FlowKey {
    proto: u8,
    local: IpAddr,
    local_port: u16,
    remote: IpAddr,
    remote_port: u16,
}

#[derive(Default)]
struct Flows {
    last_seen: HashMap<FlowKey, Instant>,
    last_sweep: Option<Instant>,
    /// First fragments let in, by (source, identification, protocol): their
    /// later fragments follow them.
    fragments: HashMap<(IpAddr, u32, u8), Instant>,
}

impl Flows {
    fn idle_limit(proto: u8) -> Duration {
        match Proto::from_number(proto) {
            Proto::Tcp | Proto::Sctp => TCP_IDLE,
            Proto::Icmp => ICMP_IDLE,
            _ => UDP_IDLE,
        }
    }

    /// Records a flow; false when the table is full.
    fn touch(&mut self, key: FlowKey, now: Instant) -> bool {
        if let Some(t) = self.last_seen.get_mut(&key) {
            *t = now;
            return true;
        }
        if self.last_seen.len() >= MAX_FLOWS {
            let due = self
                .last_sweep
                .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_EVERY);
            if due {
                self.last_sweep = Some(now);
                self.last_seen
                    .retain(|k, t| now.saturating_duration_since(*t) < Self::idle_limit(k.proto));
            }
            if self.last_seen.len() >= MAX_FLOWS {
                return false;
            }
        }
        self.last_seen.insert(key, now);
        true
    }

    fn remember_fragment(&mut self, key: (IpAddr, u32, u8), now: Instant) {
        if self.fragments.len() >= MAX_FRAGMENTED {
            self.fragments
                .retain(|_, t| now.saturating_duration_since(*t) < FRAGMENT_IDLE);
            if self.fragments.len() >= MAX_FRAGMENTED {
                return;
            }
        }
        self.fragments.insert(key, now);
    }

    /// Refreshes `key` if it is a flow already (no new entry).
    fn refresh(&mut self, key: &FlowKey, now: Instant) {
        if let Some(t) = self.last_seen.get_mut(key) {
            *t = now;
        }
    }

    /// Whether `key` is a live flow; refreshes it if so.
    fn answer(&mut self, key: &FlowKey, now: Instant) -> bool {
        match self.last_seen.get_mut(key) {
            Some(t) if now.saturating_duration_since(*t) < Self::idle_limit(key.proto) => {
                *t = now;
                true
            }
            _ => false,
        }
    }
}

/// The filter of one engine.
pub struct Filter {
    rules: ArcSwap<Compiled>,
    flows: Mutex<Flows>,
}

impl Default for Filter {
    fn default() -> Self {
        Filter {
            rules: ArcSwap::from_pointee(Compiled::default()),
            flows: Mutex::new(Flows::default()),
        }
    }
}

/// What the filter reads from a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    /// Ports (TCP/UDP/SCTP), or the echo identifier as both (ICMP echo).
    /// None for non-first fragments and other protocols.
    ports: Option<(u16, u16)>,
    icmp: Option<Icmp>,
    /// A TCP segment that opens a connection (SYN without ACK).
    opens: bool,
    /// For a fragment: its identification, and whether it is the first.
    frag: Option<(u32, bool)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Icmp {
    EchoRequest,
    EchoReply,
    /// An error about a packet this device sent: the flow it quotes, as
    /// that packet's header.
    Error(Quoted),
    Other,
}

/// The header of the packet an ICMP error quotes (as it was sent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Quoted {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    ports: Option<(u16, u16)>,
}

impl Filter {
    /// Installs the rules of a new netmap.
    pub fn set_rules(&self, filter: &PacketFilter, mine: &[IpAddr]) {
        self.rules.store(Arc::new(Compiled::new(filter, mine)));
    }

    fn flows(&self) -> std::sync::MutexGuard<'_, Flows> {
        self.flows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A packet this device sends (read from the TUN device): if it starts
    /// a flow, that flow's answers will be let in. Replies to what a rule
    /// let in start nothing (a peer cannot fill the table by making this
    /// device answer, and a revoked rule is not kept alive by a flow), and
    /// a TCP flow starts only with a SYN. Returns false when the flow table
    /// is full (the packet is still sent).
    pub fn outbound(&self, packet: &[u8], now: Instant) -> bool {
        let Some(h) = parse(packet) else { return true };
        let rules = self.rules.load();
        let proto = Proto::from_number(h.proto);
        if h.icmp.is_none() && rules.allows(h.dst, proto, h.ports.map(|(sport, _)| sport)) {
            return true;
        }
        let key = match (h.icmp, h.ports) {
            (Some(Icmp::EchoRequest), Some((id, _))) => FlowKey {
                proto: h.proto,
                local: h.src,
                local_port: id,
                remote: h.dst,
                remote_port: 0,
            },
            (Some(_), _) => return true,
            (None, Some((sport, dport))) => FlowKey {
                proto: h.proto,
                local: h.src,
                local_port: sport,
                remote: h.dst,
                remote_port: dport,
            },
            // Other protocols and later fragments: keyed without ports.
            (None, None) => FlowKey {
                proto: h.proto,
                local: h.src,
                local_port: 0,
                remote: h.dst,
                remote_port: 0,
            },
        };
        if proto == Proto::Tcp && h.ports.is_some() && !h.opens {
            self.flows().refresh(&key, now);
            return true;
        }
        self.flows().touch(key, now)
    }

    /// Whether a decrypted packet from a peer may reach this device.
    pub fn inbound(&self, packet: &[u8], now: Instant) -> Result<(), Drop> {
        let h = parse(packet).ok_or(Drop::Malformed)?;
        let rules = self.rules.load();
        if !rules.mine.contains(&h.dst) {
            return Err(Drop::NotForUs);
        }
        // A later fragment goes where its first went.
        if let Some((id, false)) = h.frag {
            let key = (h.src, id, h.proto);
            return match self.flows().fragments.get(&key) {
                Some(t) if now.saturating_duration_since(*t) < FRAGMENT_IDLE => Ok(()),
                _ => Err(Drop::NoRule),
            };
        }
        let verdict = self.judge(&h, &rules, now);
        if let (Ok(()), Some((id, true))) = (verdict, h.frag) {
            self.flows().remember_fragment((h.src, id, h.proto), now);
        }
        verdict
    }

    /// A whole packet or a first fragment: by rule, or as an answer.
    fn judge(&self, h: &Header, rules: &Compiled, now: Instant) -> Result<(), Drop> {
        let proto = Proto::from_number(h.proto);
        let by_rule = match h.icmp {
            // ICMP is allowed or not as a whole.
            Some(_) => rules.allows(h.src, proto, None),
            None => rules.allows(h.src, proto, h.ports.map(|(_, dport)| dport)),
        };
        if by_rule {
            return Ok(());
        }
        let answer = match (h.icmp, h.ports) {
            (Some(Icmp::EchoReply), Some((id, _))) => Some(FlowKey {
                proto: h.proto,
                local: h.dst,
                local_port: id,
                remote: h.src,
                remote_port: 0,
            }),
            (Some(Icmp::Error(q)), _) => Some(match q.ports {
                Some((sport, dport)) => FlowKey {
                    proto: q.proto,
                    local: q.src,
                    local_port: sport,
                    remote: q.dst,
                    remote_port: dport,
                },
                None => FlowKey {
                    proto: q.proto,
                    local: q.src,
                    local_port: 0,
                    remote: q.dst,
                    remote_port: 0,
                },
            })
            // About a flow between this device and the sender only: a
            // peer cannot speak for the path to another.
            .filter(|k| k.local == h.dst && k.remote == h.src),
            (Some(_), _) => None,
            (None, Some((sport, dport))) => Some(FlowKey {
                proto: h.proto,
                local: h.dst,
                local_port: dport,
                remote: h.src,
                remote_port: sport,
            }),
            (None, None) => Some(FlowKey {
                proto: h.proto,
                local: h.dst,
                local_port: 0,
                remote: h.src,
                remote_port: 0,
            }),
        };
        match answer {
            Some(key) if self.flows().answer(&key, now) => Ok(()),
            _ => Err(Drop::NoRule),
        }
    }

    /// Flows remembered now.
    pub fn flow_count(&self) -> usize {
        self.flows().last_seen.len()
    }
}

/// Reads the addresses, protocol and ports of an IPv4 or IPv6 packet.
fn parse(p: &[u8]) -> Option<Header> {
    let (src, dst, proto, frag, l4) = match p.first()? >> 4 {
        4 => {
            if p.len() < 20 {
                return None;
            }
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
            if ihl < 20 || total < ihl || total > p.len() {
                return None;
            }
            let offset = u16::from_be_bytes([p[6], p[7]]) & 0x1fff;
            let more = p[6] & 0x20 != 0;
            let id = u32::from(u16::from_be_bytes([p[4], p[5]]));
            let frag = (more || offset != 0).then_some((id, offset == 0));
            let src = IpAddr::V4(Ipv4Addr::new(p[12], p[13], p[14], p[15]));
            let dst = IpAddr::V4(Ipv4Addr::new(p[16], p[17], p[18], p[19]));
            (src, dst, p[9], frag, &p[ihl..total])
        }
        6 => {
            if p.len() < 40 {
                return None;
            }
            let payload = usize::from(u16::from_be_bytes([p[4], p[5]]));
            let end = 40usize.checked_add(payload)?;
            if end > p.len() {
                return None;
            }
            let octets = |at: usize| -> [u8; 16] { p[at..at + 16].try_into().expect("16 bytes") };
            let src = IpAddr::V6(Ipv6Addr::from(octets(8)));
            let dst = IpAddr::V6(Ipv6Addr::from(octets(24)));
            let (proto, frag, at) = skip_extensions(&p[..end], p[6], 40)?;
            (src, dst, proto, frag, &p[at..end])
        }
        _ => return None,
    };
    let proto_kind = Proto::from_number(proto);
    let mut header = Header {
        src,
        dst,
        proto,
        ports: None,
        icmp: None,
        opens: false,
        frag,
    };
    if frag.is_some_and(|(_, first)| !first) {
        return Some(header);
    }
    if proto_kind.has_ports() {
        if l4.len() < 4 {
            return None;
        }
        header.ports = Some((
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        ));
        // Flags: SYN 0x02, ACK 0x10.
        header.opens = proto_kind == Proto::Tcp && l4.get(13).is_some_and(|f| f & 0x12 == 0x02);
    } else if proto_kind == Proto::Icmp {
        if l4.len() < 8 {
            return None;
        }
        let v6 = proto == 58;
        let kind = match (v6, l4[0]) {
            (false, 8) | (true, 128) => Icmp::EchoRequest,
            (false, 0) | (true, 129) => Icmp::EchoReply,
            (false, 3 | 11 | 12) | (true, 1..=4) => match quoted(&l4[8..]) {
                Some(q) => Icmp::Error(q),
                None => Icmp::Other,
            },
            _ => Icmp::Other,
        };
        if matches!(kind, Icmp::EchoRequest | Icmp::EchoReply) {
            let id = u16::from_be_bytes([l4[4], l4[5]]);
            header.ports = Some((id, id));
        }
        header.icmp = Some(kind);
    }
    Some(header)
}

/// The IPv6 upper-layer protocol after at most 8 extension headers, the
/// fragment it is (identification, first or not), and where its header
/// starts.
#[allow(clippy::type_complexity)]
fn skip_extensions(
    p: &[u8],
    mut next: u8,
    mut at: usize,
) -> Option<(u8, Option<(u32, bool)>, usize)> {
    let mut frag = None;
    for _ in 0..8 {
        match next {
            // Hop-by-hop, routing, destination options.
            0 | 43 | 60 => {
                let len = (usize::from(*p.get(at + 1)?) + 1) * 8;
                next = *p.get(at)?;
                at = at.checked_add(len)?;
            }
            // Fragment.
            44 => {
                let h = p.get(at..at + 8)?;
                next = h[0];
                let first = u16::from_be_bytes([h[2], h[3]]) >> 3 == 0;
                frag = Some((u32::from_be_bytes([h[4], h[5], h[6], h[7]]), first));
                at += 8;
            }
            other => return (at <= p.len()).then_some((other, frag, at)),
        }
    }
    None
}

/// The header of the packet an ICMP error quotes (it may be truncated
/// after the ports).
fn quoted(p: &[u8]) -> Option<Quoted> {
    let (src, dst, proto, l4) = match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            (
                IpAddr::V4(Ipv4Addr::new(p[12], p[13], p[14], p[15])),
                IpAddr::V4(Ipv4Addr::new(p[16], p[17], p[18], p[19])),
                p[9],
                p.get(ihl..)?,
            )
        }
        6 if p.len() >= 40 => {
            let octets = |at: usize| -> [u8; 16] { p[at..at + 16].try_into().expect("16 bytes") };
            (
                IpAddr::V6(Ipv6Addr::from(octets(8))),
                IpAddr::V6(Ipv6Addr::from(octets(24))),
                p[6],
                &p[40..],
            )
        }
        _ => return None,
    };
    let echo_request = matches!((proto, l4.first()), (1, Some(8)) | (58, Some(128)));
    let ports = if Proto::from_number(proto).has_ports() && l4.len() >= 4 {
        Some((
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        ))
    } else if echo_request && l4.len() >= 6 {
        // Keyed like the echo flow it belongs to: (identifier, 0).
        Some((u16::from_be_bytes([l4[4], l4[5]]), 0))
    } else {
        None
    };
    Some(Quoted {
        src,
        dst,
        proto,
        ports,
    })
}

#[cfg(test)]
#[path = "filter_tests.rs"]
mod tests;
