//! Path-discovery (disco) messages travel beside WireGuard packets, over UDP
//! and through relays. They start with [`MAGIC`], which no WireGuard message
//! does (those start with a type byte 1–4 and three zero bytes), so a relay
//! can give them their own queue without seeing inside.

pub const MAGIC: &[u8; 6] = b"CMdsc\x01";

pub fn is_disco(packet: &[u8]) -> bool {
    packet.starts_with(MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wireguard_messages_are_never_disco() {
        for kind in 1u8..=4 {
            let mut wg = vec![kind, 0, 0, 0];
            wg.extend_from_slice(&[0x43; 40]);
            assert!(!is_disco(&wg));
        }
        assert!(is_disco(b"CMdsc\x01rest"));
        assert!(!is_disco(b"CMd"));
    }
}
