//! TUN offloads, the pure part: the virtio-net header the kernel puts in
//! front of every packet on a TUN device opened with `IFF_VNET_HDR`,
//! finishing checksums the kernel left partial (`TUN_F_CSUM`), and
//! splitting TCP and UDP super-packets (`TUN_F_TSO4/6`, `TUN_F_USO4/6`: up
//! to 64 KiB handed over in one read) into MTU-sized packets before they
//! are encrypted.
//!
//! Everything here reads bytes the local kernel wrote, but checks them as
//! if an attacker had: a header that does not fit the packet is refused
//! ([`Malformed`]) and counted, never a panic.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Which offloads the TUN device has on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offloads {
    /// Packets carry a virtio-net header (`IFF_VNET_HDR`).
    pub vnet_hdr: bool,
    /// The kernel may hand over packets with partial checksums.
    pub checksum: bool,
    /// TCP super-packets (TSO, IPv4 and IPv6).
    pub tso: bool,
    /// UDP super-packets (USO, IPv4 and IPv6; Linux 6.2 and later).
    pub uso: bool,
}

/// The virtio-net header written in front of every packet for the TUN
/// device: no offload asked, the checksums are already whole.
pub const PLAIN_HDR: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

/// Size of `struct virtio_net_hdr` (without `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the L4 checksum is partial.
const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
const GSO_ECN: u8 = 0x80;

/// A super-packet splits into at most this many segments (the kernel's
/// 64 KiB at a typical MSS is about 48).
pub const MAX_SEGMENTS: usize = 128;

const TCP: u8 = 6;
const UDP: u8 = 17;

/// The virtio-net header (host byte order, as the TUN device uses it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let b: &[u8; VNET_HDR_LEN] = b.get(..VNET_HDR_LEN)?.try_into().ok()?;
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    pub fn encode(&self, b: &mut [u8; VNET_HDR_LEN]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
    }
}

/// Why a packet from the TUN device was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// Shorter than its headers say.
    Truncated,
    /// A GSO type we did not enable, or one that does not match the packet.
    GsoType,
    /// A segment size of zero, or more than [`MAX_SEGMENTS`] segments.
    GsoSize,
    /// Checksum start or offset outside the packet.
    Checksum,
}

/// What [`prepare`] made of a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Prepared {
    /// One packet, complete in place.
    Whole,
    /// Segments, written one after another into the scratch buffer.
    Split,
}

/// Makes the packet after a virtio header ready for encryption: a partial
/// checksum is finished in place, a super-packet is split into `scratch`
/// with each segment's range in `segments`.
pub fn prepare(
    hdr: &VnetHdr,
    packet: &mut [u8],
    scratch: &mut Vec<u8>,
    segments: &mut Vec<Range<usize>>,
) -> Result<Prepared, Malformed> {
    match hdr.gso_type & !GSO_ECN {
        GSO_NONE => {
            if hdr.flags & F_NEEDS_CSUM != 0 {
                finish_checksum(packet, hdr.csum_start.into(), hdr.csum_offset.into())?;
            }
            Ok(Prepared::Whole)
        }
        GSO_TCPV4 | GSO_TCPV6 | GSO_UDP_L4 => {
            split(hdr, packet, scratch, segments)?;
            Ok(Prepared::Split)
        }
        _ => Err(Malformed::GsoType),
    }
}

/// The one's-complement sum of `data` as 16-bit big-endian words, added
/// to `acc` (not folded).
pub fn sum16(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        acc += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds a sum to 16 bits.
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The pseudo-header sum for an L4 packet of `len` bytes.
fn pseudo(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u64 {
    sum16(dst, sum16(src, 0)) + u64::from(proto) + len as u64
}

/// Finishes a partial checksum: the field holds the pseudo-header sum.
fn finish_checksum(packet: &mut [u8], start: usize, offset: usize) -> Result<(), Malformed> {
    let at = start.checked_add(offset).ok_or(Malformed::Checksum)?;
    if at + 2 > packet.len() || start >= packet.len() {
        return Err(Malformed::Checksum);
    }
    let sum = !fold(sum16(&packet[start..], 0));
    packet[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// The IP version and the source/destination address ranges of `packet`,
/// whose L4 header starts at `l4` (IPv6 extension headers included).
fn ip_layout(packet: &[u8], l4: usize) -> Result<(u8, Range<usize>, Range<usize>), Malformed> {
    match packet.first().map(|b| b >> 4) {
        Some(4) if l4 >= 20 && usize::from(packet[0] & 0x0f) * 4 == l4 && packet.len() > l4 => {
            Ok((4, 12..16, 16..20))
        }
        Some(6) if l4 >= 40 && packet.len() > l4 => Ok((6, 8..24, 24..40)),
        _ => Err(Malformed::Truncated),
    }
}

fn split(
    hdr: &VnetHdr,
    packet: &[u8],
    scratch: &mut Vec<u8>,
    segments: &mut Vec<Range<usize>>,
) -> Result<(), Malformed> {
    scratch.clear();
    segments.clear();
    let l4 = usize::from(hdr.csum_start);
    let (version, src, dst) = ip_layout(packet, l4)?;
    let gso = hdr.gso_type & !GSO_ECN;
    let (proto, l4_len) = match gso {
        GSO_TCPV4 | GSO_TCPV6 => {
            let want = if gso == GSO_TCPV4 { 4 } else { 6 };
            if version != want {
                return Err(Malformed::GsoType);
            }
            let doff = usize::from(*packet.get(l4 + 12).ok_or(Malformed::Truncated)? >> 4) * 4;
            if doff < 20 {
                return Err(Malformed::Truncated);
            }
            (TCP, doff)
        }
        _ => (UDP, 8),
    };
    if version == 4 && packet[9] != proto {
        return Err(Malformed::GsoType);
    }
    let hdr_len = l4 + l4_len;
    if hdr_len > packet.len() {
        return Err(Malformed::Truncated);
    }
    let gso_size = usize::from(hdr.gso_size);
    let payload = &packet[hdr_len..];
    if gso_size == 0 || payload.len().div_ceil(gso_size) > MAX_SEGMENTS {
        return Err(Malformed::GsoSize);
    }
    let count = payload.len().div_ceil(gso_size).max(1);
    let ip_id = u16::from_be_bytes([packet[4], packet[5]]);
    let seq = u32::from_be_bytes(
        packet
            .get(l4 + 4..l4 + 8)
            .and_then(|s| s.try_into().ok())
            .unwrap_or([0; 4]),
    );
    for (i, chunk) in payload.chunks(gso_size).enumerate() {
        let start = scratch.len();
        scratch.extend_from_slice(&packet[..hdr_len]);
        scratch.extend_from_slice(chunk);
        let seg = &mut scratch[start..];
        let total = seg.len();
        let l4_total = total - l4;
        if version == 4 {
            seg[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            seg[4..6].copy_from_slice(&ip_id.wrapping_add(i as u16).to_be_bytes());
            seg[10..12].fill(0);
            let sum = !fold(sum16(&seg[..l4], 0));
            seg[10..12].copy_from_slice(&sum.to_be_bytes());
        } else {
            seg[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        }
        let csum_at = if proto == TCP {
            let s = seq.wrapping_add((i * gso_size) as u32);
            seg[l4 + 4..l4 + 8].copy_from_slice(&s.to_be_bytes());
            let last = i + 1 == count;
            if !last {
                seg[l4 + 13] &= !0x09; // FIN, PSH: only on the last segment
            }
            if i != 0 {
                seg[l4 + 13] &= !0x80; // CWR: only on the first
            }
            l4 + 16
        } else {
            seg[l4 + 4..l4 + 6].copy_from_slice(&(l4_total as u16).to_be_bytes());
            l4 + 6
        };
        seg[csum_at..csum_at + 2].fill(0);
        let mut sum = !fold(sum16(
            &seg[l4..],
            pseudo(&seg[src.clone()], &seg[dst.clone()], proto, l4_total),
        ));
        if proto == UDP && sum == 0 {
            sum = 0xffff;
        }
        seg[csum_at..csum_at + 2].copy_from_slice(&sum.to_be_bytes());
        segments.push(start..scratch.len());
    }
    Ok(())
}

/// Coalescing received TCP segments into super-packets (the receive side
/// of TSO): one TUN write, and one trip through the kernel's TCP stack, for
/// a run of in-order segments of one flow.
///
/// A segment joins the flow's open group when it carries the next
/// sequence number, the same acknowledgement, window, options and IP
/// fields, no SYN/FIN/RST/URG, and no more payload than the group's first
/// (a shorter one, or one with PSH, closes the group). Anything else is
/// written as it came.
#[derive(Default)]
pub struct Coalescer {
    groups: Vec<Group>,
    /// For each packet given, its group.
    member: Vec<usize>,
}

#[derive(Clone, Copy)]
struct Group {
    first: usize,
    last: usize,
    count: usize,
    /// Header bytes (IP + TCP) of the first packet.
    hdr_len: usize,
    l4: usize,
    payload: usize,
    gso_size: usize,
    next_seq: u32,
    /// Open to more segments.
    open: bool,
    tcp: bool,
}

/// The TCP segment fields that decide coalescing, or `None` for a packet
/// that is written alone.
struct Segment {
    l4: usize,
    hdr_len: usize,
    seq: u32,
    payload: usize,
    psh: bool,
}

fn tcp_segment(p: &[u8]) -> Option<Segment> {
    let (l4, proto) = match p.first()? >> 4 {
        4 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*p.get(2)?, *p.get(3)?]));
            // No options, no fragments, the length as received.
            let frag = u16::from_be_bytes([*p.get(6)?, *p.get(7)?]) & 0x3fff;
            if ihl != 20 || total != p.len() || frag != 0 {
                return None;
            }
            (20, p[9])
        }
        6 => {
            let payload = usize::from(u16::from_be_bytes([*p.get(4)?, *p.get(5)?]));
            if payload + 40 != p.len() {
                return None;
            }
            (40, p[6])
        }
        _ => return None,
    };
    if proto != TCP {
        return None;
    }
    let doff = usize::from(*p.get(l4 + 12)? >> 4) * 4;
    let hdr_len = l4 + doff;
    if doff < 20 || hdr_len >= p.len() {
        return None;
    }
    let flags = p[l4 + 13];
    // SYN, FIN, RST, URG (and ECE/CWR signalling) travel alone.
    if flags & !(0x10 | 0x08) != 0 {
        return None;
    }
    Some(Segment {
        l4,
        hdr_len,
        seq: u32::from_be_bytes(p[l4 + 4..l4 + 8].try_into().ok()?),
        payload: p.len() - hdr_len,
        psh: flags & 0x08 != 0,
    })
}

/// Whether `b`'s headers match `a`'s but for what changes between the
/// segments of one run: IPv4 length, ID and checksum; TCP sequence, flags
/// (PSH) and checksum.
fn same_headers(a: &[u8], b: &[u8], l4: usize, hdr_len: usize) -> bool {
    if a.len() < hdr_len || b.len() < hdr_len {
        return false;
    }
    let ip_same = if l4 == 20 {
        a[0..2] == b[0..2] && a[6..10] == b[6..10] && a[12..20] == b[12..20]
    } else {
        a[0..4] == b[0..4] && a[6..40] == b[6..40]
    };
    ip_same
        && a[l4..l4 + 4] == b[l4..l4 + 4]
        && a[l4 + 8..l4 + 13] == b[l4 + 8..l4 + 13]
        && a[l4 + 14..l4 + 16] == b[l4 + 14..l4 + 16]
        && a[l4 + 18..hdr_len] == b[l4 + 18..hdr_len]
}

/// The largest coalesced packet (the kernel takes 64 KiB).
const MAX_COALESCED: usize = 65_535;

impl Coalescer {
    /// Groups `packets`, then appends one TUN write per group to `out`
    /// (virtio-net header first) with its range in `writes`.
    pub fn coalesce(
        &mut self,
        packets: &[&[u8]],
        out: &mut Vec<u8>,
        writes: &mut Vec<Range<usize>>,
    ) {
        self.groups.clear();
        self.member.clear();
        for (i, p) in packets.iter().enumerate() {
            let seg = tcp_segment(p);
            let joined = seg.as_ref().and_then(|s| {
                let g = self.groups.iter().rposition(|g| {
                    g.open
                        && g.l4 == s.l4
                        && g.hdr_len == s.hdr_len
                        && same_headers(packets[g.first], p, s.l4, s.hdr_len)
                })?;
                let group = &mut self.groups[g];
                let fits = s.seq == group.next_seq
                    && s.payload <= group.gso_size
                    && group.hdr_len + group.payload + s.payload <= MAX_COALESCED
                    && group.count < MAX_SEGMENTS;
                if !fits {
                    // Out of order, or too big: the flow starts afresh.
                    group.open = false;
                    return None;
                }
                group.last = i;
                group.count += 1;
                group.payload += s.payload;
                group.next_seq = s.seq.wrapping_add(s.payload as u32);
                group.open = s.payload == group.gso_size && !s.psh;
                Some(g)
            });
            let g = match joined {
                Some(g) => g,
                None => {
                    self.groups.push(match seg {
                        Some(s) => Group {
                            first: i,
                            last: i,
                            count: 1,
                            hdr_len: s.hdr_len,
                            l4: s.l4,
                            payload: s.payload,
                            gso_size: s.payload,
                            next_seq: s.seq.wrapping_add(s.payload as u32),
                            open: !s.psh,
                            tcp: true,
                        },
                        None => Group {
                            first: i,
                            last: i,
                            count: 1,
                            hdr_len: 0,
                            l4: 0,
                            payload: 0,
                            gso_size: 0,
                            next_seq: 0,
                            open: false,
                            tcp: false,
                        },
                    });
                    self.groups.len() - 1
                }
            };
            self.member.push(g);
        }
        for (g, group) in self.groups.iter().enumerate() {
            let start = out.len();
            if group.count == 1 {
                out.extend_from_slice(&PLAIN_HDR);
                out.extend_from_slice(packets[group.first]);
                writes.push(start..out.len());
                continue;
            }
            debug_assert!(group.tcp);
            let first = packets[group.first];
            let (l4, hdr_len) = (group.l4, group.hdr_len);
            let hdr = VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: if l4 == 20 { GSO_TCPV4 } else { GSO_TCPV6 },
                hdr_len: hdr_len as u16,
                gso_size: group.gso_size as u16,
                csum_start: l4 as u16,
                csum_offset: 16,
            };
            let mut h = [0u8; VNET_HDR_LEN];
            hdr.encode(&mut h);
            out.extend_from_slice(&h);
            let ip = out.len();
            out.extend_from_slice(&first[..hdr_len]);
            for (i, p) in packets
                .iter()
                .enumerate()
                .take(group.last + 1)
                .skip(group.first)
            {
                if self.member[i] == g {
                    out.extend_from_slice(&p[hdr_len..]);
                }
            }
            let pkt = &mut out[ip..];
            let total = pkt.len();
            if l4 == 20 {
                pkt[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                pkt[10..12].fill(0);
                let sum = !fold(sum16(&pkt[..20], 0));
                pkt[10..12].copy_from_slice(&sum.to_be_bytes());
            } else {
                pkt[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            }
            // PSH as the last segment had it.
            let last_flags = packets[group.last][l4 + 13];
            pkt[l4 + 13] = (pkt[l4 + 13] & !0x08) | (last_flags & 0x08);
            let (src, dst) = if l4 == 20 {
                (12..16, 16..20)
            } else {
                (8..24, 24..40)
            };
            let partial = fold(pseudo(&pkt[src], &pkt[dst], TCP, total - l4));
            pkt[l4 + 16..l4 + 18].copy_from_slice(&partial.to_be_bytes());
            writes.push(start..out.len());
        }
    }
}

/// Runs arbitrary bytes (a virtio-net header, then a packet) through
/// [`prepare`], and its segments through a [`Coalescer`] and [`prepare`]
/// again; checks what must hold for any input: no panic, at most
/// [`MAX_SEGMENTS`] segments, and coalescing then splitting gives back as
/// many packets with as many bytes. The body of the `tun_offload` fuzz
/// target, and run under proptest in tests.
#[doc(hidden)]
pub fn fuzz_offload(data: &[u8]) {
    let Some(hdr) = VnetHdr::parse(data) else {
        return;
    };
    let mut packet = data[VNET_HDR_LEN..].to_vec();
    let (mut scratch, mut segments) = (Vec::new(), Vec::new());
    let pieces: Vec<&[u8]> = match prepare(&hdr, &mut packet, &mut scratch, &mut segments) {
        Ok(Prepared::Whole) => vec![&packet[..]],
        Ok(Prepared::Split) => segments.iter().map(|r| &scratch[r.clone()]).collect(),
        Err(_) => return,
    };
    assert!(pieces.len() <= MAX_SEGMENTS);
    let (mut out, mut writes) = (Vec::new(), Vec::new());
    Coalescer::default().coalesce(&pieces, &mut out, &mut writes);
    let (mut count, mut bytes) = (0, 0);
    for w in &writes {
        let hdr = VnetHdr::parse(&out[w.clone()]).expect("a header on every write");
        let mut packet = out[w.start + VNET_HDR_LEN..w.end].to_vec();
        let (mut scratch, mut segments) = (Vec::new(), Vec::new());
        match prepare(&hdr, &mut packet, &mut scratch, &mut segments) {
            Ok(Prepared::Whole) => {
                count += 1;
                bytes += packet.len();
            }
            Ok(Prepared::Split) => {
                count += segments.len();
                bytes += segments.iter().map(|r| r.len()).sum::<usize>();
            }
            Err(e) => panic!("a coalesced write does not split again: {e:?}"),
        }
    }
    assert_eq!(count, pieces.len(), "as many packets back");
    assert_eq!(bytes, pieces.iter().map(|p| p.len()).sum::<usize>());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ipv4(proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, proto, 0, 0];
        p.extend_from_slice(&[100, 64, 0, 1, 100, 64, 0, 2]);
        let total = (20 + l4.len()) as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        let sum = !fold(sum16(&p, 0));
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p.extend_from_slice(l4);
        p
    }

    fn ipv6(proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        p.extend_from_slice(&[proto, 64]);
        p.extend_from_slice(&[0xfd, 0x7a, 0x11, 0x5c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p.extend_from_slice(&[0xfd, 0x7a, 0x11, 0x5c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        p.extend_from_slice(l4);
        p
    }

    fn tcp(payload: &[u8], flags: u8) -> Vec<u8> {
        let mut t = vec![0x1f, 0x90, 0x00, 0x50];
        t.extend_from_slice(&1000u32.to_be_bytes());
        t.extend_from_slice(&[0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        t.extend_from_slice(payload);
        t
    }

    fn udp(payload: &[u8]) -> Vec<u8> {
        let mut u = vec![0x1f, 0x90, 0x00, 0x50, 0, 0, 0, 0];
        u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        u.extend_from_slice(payload);
        u
    }

    /// The packet's L4 checksum is right (and its IPv4 header's).
    fn checksums_ok(p: &[u8]) -> bool {
        let (l4, src, dst, proto) = if p[0] >> 4 == 4 {
            if fold(sum16(&p[..20], 0)) != 0xffff {
                return false;
            }
            (20, 12..16, 16..20, p[9])
        } else {
            (40, 8..24, 24..40, p[6])
        };
        let len = p.len() - l4;
        fold(sum16(&p[l4..], pseudo(&p[src], &p[dst], proto, len))) == 0xffff
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn split_all(hdr: VnetHdr, mut packet: Vec<u8>) -> Result<Vec<Vec<u8>>, Malformed> {
        let (mut scratch, mut segs) = (Vec::new(), Vec::new());
        match prepare(&hdr, &mut packet, &mut scratch, &mut segs)? {
            Prepared::Whole => Ok(vec![packet]),
            Prepared::Split => Ok(segs.into_iter().map(|r| scratch[r].to_vec()).collect()),
        }
    }

    fn gso(gso_type: u8, l4: u16, size: u16) -> VnetHdr {
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type,
            hdr_len: 0, // recomputed from the packet, never trusted
            gso_size: size,
            csum_start: l4,
            csum_offset: if gso_type == GSO_UDP_L4 { 6 } else { 16 },
        }
    }

    #[test]
    fn tcp_super_packets_split_into_valid_segments_v4_and_v6() {
        let data = pattern(5000);
        for (packet, l4, kind) in [
            (ipv4(TCP, &tcp(&data, 0x19 | 0x80)), 20, GSO_TCPV4),
            (ipv6(TCP, &tcp(&data, 0x19 | 0x80)), 40, GSO_TCPV6),
        ] {
            let segs = split_all(gso(kind, l4, 1400), packet).unwrap();
            assert_eq!(segs.len(), 4);
            let mut joined = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                assert!(checksums_ok(s), "segment {i} checksum");
                let t = &s[usize::from(l4)..];
                let seq = u32::from_be_bytes(t[4..8].try_into().unwrap());
                assert_eq!(seq, 1000 + 1400 * i as u32);
                let flags = t[13];
                assert_eq!(flags & 0x01 != 0, i == 3, "FIN only last");
                assert_eq!(flags & 0x08 != 0, i == 3, "PSH only last");
                assert_eq!(flags & 0x80 != 0, i == 0, "CWR only first");
                assert_eq!(flags & 0x10, 0x10, "ACK everywhere");
                if kind == GSO_TCPV4 {
                    assert_eq!(
                        usize::from(u16::from_be_bytes([s[2], s[3]])),
                        s.len(),
                        "total length"
                    );
                    assert_eq!(u16::from_be_bytes([s[4], s[5]]), 0x1234 + i as u16);
                } else {
                    assert_eq!(usize::from(u16::from_be_bytes([s[4], s[5]])), s.len() - 40);
                }
                joined.extend_from_slice(&t[20..]);
            }
            assert_eq!(joined, data, "payload survives");
            assert_eq!(segs[3].len(), usize::from(l4) + 20 + 5000 - 3 * 1400);
        }
    }

    #[test]
    fn udp_super_packets_split_with_lengths_and_checksums() {
        let data = pattern(3000);
        for (packet, l4) in [
            (ipv4(UDP, &udp(&data)), 20u16),
            (ipv6(UDP, &udp(&data)), 40),
        ] {
            let segs = split_all(gso(GSO_UDP_L4, l4, 1200), packet).unwrap();
            assert_eq!(segs.len(), 3);
            let mut joined = Vec::new();
            for s in &segs {
                assert!(checksums_ok(s));
                let u = &s[usize::from(l4)..];
                assert_eq!(usize::from(u16::from_be_bytes([u[4], u[5]])), u.len());
                joined.extend_from_slice(&u[8..]);
            }
            assert_eq!(joined, data);
        }
    }

    #[test]
    fn partial_checksums_are_finished_in_place() {
        for mut packet in [
            ipv4(TCP, &tcp(&pattern(333), 0x18)),
            ipv4(UDP, &udp(&pattern(77))),
        ] {
            let proto = packet[9];
            let at = if proto == TCP { 36 } else { 26 };
            let len = packet.len() - 20;
            // What the kernel leaves: the pseudo-header sum, folded.
            let partial = fold(pseudo(&packet[12..16], &packet[16..20], proto, len));
            packet[at..at + 2].copy_from_slice(&partial.to_be_bytes());
            let hdr = VnetHdr {
                flags: F_NEEDS_CSUM,
                csum_start: 20,
                csum_offset: (at - 20) as u16,
                ..VnetHdr::default()
            };
            let whole = split_all(hdr, packet).unwrap();
            assert!(checksums_ok(&whole[0]));
        }
    }

    #[test]
    fn bad_headers_are_refused() {
        let good = ipv4(TCP, &tcp(&pattern(3000), 0x10));
        let cases = [
            (gso(GSO_TCPV4, 20, 0), good.clone(), Malformed::GsoSize),
            (gso(GSO_TCPV4, 20, 10), good.clone(), Malformed::GsoSize),
            (gso(GSO_TCPV6, 20, 1400), good.clone(), Malformed::GsoType),
            (gso(GSO_UDP_L4, 20, 1400), good.clone(), Malformed::GsoType),
            (gso(3, 20, 1400), good.clone(), Malformed::GsoType),
            (gso(GSO_TCPV4, 24, 1400), good.clone(), Malformed::Truncated),
            (
                gso(GSO_TCPV4, 20, 1400),
                good[..30].to_vec(),
                Malformed::Truncated,
            ),
            (
                VnetHdr {
                    flags: F_NEEDS_CSUM,
                    csum_start: 4000,
                    csum_offset: 16,
                    ..VnetHdr::default()
                },
                good.clone(),
                Malformed::Checksum,
            ),
        ];
        for (hdr, packet, want) in cases {
            assert_eq!(split_all(hdr, packet).unwrap_err(), want, "{hdr:?}");
        }
    }

    #[test]
    fn header_round_trip() {
        let h = gso(GSO_TCPV6, 40, 1380);
        let mut b = [0u8; VNET_HDR_LEN];
        h.encode(&mut b);
        assert_eq!(VnetHdr::parse(&b), Some(h));
        assert_eq!(VnetHdr::parse(&b[..9]), None);
    }

    /// Segments `data` as a TCP stream would arrive: split by our own
    /// segmentation, so every checksum is right.
    fn stream(v6: bool, data: &[u8], mss: u16) -> Vec<Vec<u8>> {
        let (packet, l4, kind) = if v6 {
            (ipv6(TCP, &tcp(data, 0x18)), 40, GSO_TCPV6)
        } else {
            (ipv4(TCP, &tcp(data, 0x18)), 20, GSO_TCPV4)
        };
        split_all(gso(kind, l4, mss), packet).unwrap()
    }

    fn coalesced(packets: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let refs: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
        let (mut out, mut writes) = (Vec::new(), Vec::new());
        Coalescer::default().coalesce(&refs, &mut out, &mut writes);
        writes.into_iter().map(|r| out[r].to_vec()).collect()
    }

    /// Splits a TUN write back into the segments it stands for.
    fn resplit(write: &[u8]) -> Vec<Vec<u8>> {
        let hdr = VnetHdr::parse(write).unwrap();
        split_all(hdr, write[VNET_HDR_LEN..].to_vec()).unwrap()
    }

    #[test]
    fn a_run_of_segments_becomes_one_write_that_splits_back_into_them() {
        for v6 in [false, true] {
            let data = pattern(20_000);
            let segs = stream(v6, &data, 1380);
            let writes = coalesced(&segs);
            assert_eq!(writes.len(), 1, "one super-packet");
            let back = resplit(&writes[0]);
            assert_eq!(back.len(), segs.len());
            for (a, b) in back.iter().zip(&segs) {
                // IPv4 IDs are renumbered from the first; all else matches.
                let (mut a, mut b) = (a.clone(), b.clone());
                if !v6 {
                    a[4..6].fill(0);
                    a[10..12].fill(0);
                    b[4..6].fill(0);
                    b[10..12].fill(0);
                }
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn gaps_other_flows_and_control_segments_stay_apart() {
        let data = pattern(14_000);
        let segs = stream(false, &data, 1400);
        assert_eq!(segs.len(), 10);
        // A lost segment: two runs.
        let mut gap = segs.clone();
        gap.remove(4);
        let w = coalesced(&gap);
        assert_eq!(w.len(), 2);
        assert_eq!(resplit(&w[0]).len(), 4);
        assert_eq!(resplit(&w[1]).len(), 5);
        // Another flow (other port) interleaved: each flow its own run.
        let mut other = segs.clone();
        for p in &mut other {
            p[20] = 0x20; // source port
        }
        let mut mixed = Vec::new();
        for (a, b) in segs.iter().zip(&other) {
            mixed.push(a.clone());
            mixed.push(b.clone());
        }
        let w = coalesced(&mixed);
        assert_eq!(w.len(), 2);
        // A FIN travels alone; a UDP packet is written as it came.
        let mut fin = segs[..3].to_vec();
        fin[2][20 + 13] |= 0x01;
        let udp_packet = ipv4(UDP, &udp(&pattern(50)));
        fin.push(udp_packet.clone());
        let w = coalesced(&fin);
        assert_eq!(w.len(), 3);
        assert_eq!(&w[2][VNET_HDR_LEN..], &udp_packet[..]);
        assert_eq!(VnetHdr::parse(&w[2]), Some(VnetHdr::default()));
    }

    #[test]
    fn fuzz_corpus_replays_cleanly() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/tun_offload");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("seed corpus") {
            let path = entry.expect("corpus entry").path();
            fuzz_offload(&std::fs::read(&path).expect("corpus file"));
            n += 1;
        }
        assert!(n >= 20, "seed corpus has {n} files");
    }

    proptest! {
        /// Valid super-packets (our own split of a stream, coalesced back
        /// into one), then mangled at one byte: the fuzz target's checks
        /// hold for all of them.
        #[test]
        fn mangled_super_packets_keep_the_fuzz_checks(
            v6 in any::<bool>(),
            len in 1usize..9000,
            mss in 500u16..1500,
            at in any::<usize>(),
            byte in any::<u8>(),
        ) {
            let segs = stream(v6, &pattern(len), mss);
            let mut write = coalesced(&segs).remove(0);
            fuzz_offload(&write);
            let i = at % write.len();
            write[i] = byte;
            fuzz_offload(&write);
        }

        #[test]
        fn coalescing_arbitrary_packets_never_panics(
            packets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..40),
        ) {
            let _ = coalesced(&packets);
        }
    }

    proptest! {
        #[test]
        fn arbitrary_input_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..3000),
            flags in any::<u8>(),
            gso_type in prop_oneof![Just(0u8), Just(1), Just(4), Just(5), any::<u8>()],
            gso_size in any::<u16>(),
            csum_start in 0u16..100,
            csum_offset in any::<u16>(),
        ) {
            let hdr = VnetHdr { flags, gso_type, hdr_len: 0, gso_size, csum_start, csum_offset };
            let _ = split_all(hdr, bytes);
        }
    }
}
