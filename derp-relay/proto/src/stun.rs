//! STUN (RFC 8489) binding: just enough to tell a client the address its
//! packets come from.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const MAGIC_COOKIE: u32 = 0x2112_a442;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;
const HEADER_LEN: usize = 20;

pub type TransactionId = [u8; 12];

/// The transaction id of a well-formed binding request, else `None`.
pub fn parse_request(packet: &[u8]) -> Option<TransactionId> {
    if packet.len() < HEADER_LEN {
        return None;
    }
    let kind = u16::from_be_bytes([packet[0], packet[1]]);
    let len = u16::from_be_bytes([packet[2], packet[3]]) as usize;
    let cookie = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    if kind != BINDING_REQUEST
        || cookie != MAGIC_COOKIE
        || !len.is_multiple_of(4)
        || HEADER_LEN + len != packet.len()
    {
        return None;
    }
    let mut tx = [0u8; 12];
    tx.copy_from_slice(&packet[8..20]);
    Some(tx)
}

/// A binding request with transaction id `tx`.
pub fn request(tx: &TransactionId) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(&BINDING_REQUEST.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out.extend_from_slice(tx);
    out
}

/// The success response telling the client it was seen as `seen`.
pub fn response(tx: &TransactionId, seen: SocketAddr) -> Vec<u8> {
    let (family, addr): (u8, Vec<u8>) = match seen.ip() {
        IpAddr::V4(v4) => (1, (u32::from(v4) ^ MAGIC_COOKIE).to_be_bytes().to_vec()),
        IpAddr::V6(v6) => {
            let mut mask = [0u8; 16];
            mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            mask[4..].copy_from_slice(tx);
            (
                2,
                v6.octets().iter().zip(mask).map(|(a, m)| a ^ m).collect(),
            )
        }
    };
    let attr_len = 4 + addr.len();
    let mut out = Vec::with_capacity(HEADER_LEN + 4 + attr_len);
    out.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    out.extend_from_slice(&((4 + attr_len) as u16).to_be_bytes());
    out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out.extend_from_slice(tx);
    out.extend_from_slice(&XOR_MAPPED_ADDRESS.to_be_bytes());
    out.extend_from_slice(&(attr_len as u16).to_be_bytes());
    out.push(0);
    out.push(family);
    out.extend_from_slice(&(seen.port() ^ (MAGIC_COOKIE >> 16) as u16).to_be_bytes());
    out.extend_from_slice(&addr);
    out
}

/// Reads the mapped address from a success response to `tx`.
pub fn parse_response(packet: &[u8], tx: &TransactionId) -> Option<SocketAddr> {
    if packet.len() < HEADER_LEN
        || u16::from_be_bytes([packet[0], packet[1]]) != BINDING_SUCCESS
        || u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]) != MAGIC_COOKIE
        || &packet[8..20] != tx
    {
        return None;
    }
    let len = u16::from_be_bytes([packet[2], packet[3]]) as usize;
    let mut attrs = packet.get(HEADER_LEN..HEADER_LEN + len)?;
    while attrs.len() >= 4 {
        let kind = u16::from_be_bytes([attrs[0], attrs[1]]);
        let alen = u16::from_be_bytes([attrs[2], attrs[3]]) as usize;
        let value = attrs.get(4..4 + alen)?;
        if kind == XOR_MAPPED_ADDRESS && alen >= 8 {
            let port = u16::from_be_bytes([value[2], value[3]]) ^ (MAGIC_COOKIE >> 16) as u16;
            return match (value[1], alen) {
                (1, 8) => {
                    let raw =
                        u32::from_be_bytes([value[4], value[5], value[6], value[7]]) ^ MAGIC_COOKIE;
                    Some(SocketAddr::new(Ipv4Addr::from(raw).into(), port))
                }
                (2, 20) => {
                    let mut mask = [0u8; 16];
                    mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                    mask[4..].copy_from_slice(tx);
                    let mut ip = [0u8; 16];
                    for i in 0..16 {
                        ip[i] = value[4 + i] ^ mask[i];
                    }
                    Some(SocketAddr::new(Ipv6Addr::from(ip).into(), port))
                }
                _ => None,
            };
        }
        let padded = (alen + 3) & !3;
        attrs = attrs.get(4 + padded..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn binding_round_trips(tx in any::<[u8; 12]>(), v4 in any::<u32>(), v6 in any::<u128>(), port in any::<u16>()) {
            let req = request(&tx);
            prop_assert_eq!(parse_request(&req), Some(tx));
            for seen in [SocketAddr::new(Ipv4Addr::from(v4).into(), port), SocketAddr::new(Ipv6Addr::from(v6).into(), port)] {
                let resp = response(&tx, seen);
                prop_assert_eq!(parse_response(&resp, &tx), Some(seen));
                let mut other = tx;
                other[0] ^= 1;
                prop_assert_eq!(parse_response(&resp, &other), None);
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = parse_request(&bytes);
            let _ = parse_response(&bytes, &[0; 12]);
        }
    }

    #[test]
    fn rejects_requests_with_wrong_length_or_cookie() {
        let mut req = request(&[7; 12]);
        req.push(0);
        assert_eq!(parse_request(&req), None);
        let mut req = request(&[7; 12]);
        req[4] ^= 1;
        assert_eq!(parse_request(&req), None);
    }
}
