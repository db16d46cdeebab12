//! Relay frames: `type u8 | length u32 BE | payload`.
//!
//! Decoding never panics: a short buffer asks for more bytes, a length over
//! [`MAX_FRAME_PAYLOAD`] or a payload of the wrong size for its type is an
//! error, and unknown types decode as [`Frame::Unknown`] for the reader to
//! skip.

use thiserror::Error;

/// Largest payload of any frame: a full-size datagram plus a key.
pub const MAX_FRAME_PAYLOAD: usize = 64 * 1024 + 64;
/// Header: type byte and big-endian length.
pub const HEADER_LEN: usize = 5;

pub type Key = [u8; 32];
/// Which network a node key belongs to, as relays tell each other: a digest
/// of the coordinator's network id (see `server::admission::NetworkTag`).
pub type NetworkTag = [u8; 32];

mod kind {
    pub const SERVER_KEY: u8 = 0x01;
    pub const CLIENT_INFO: u8 = 0x02;
    pub const SERVER_INFO: u8 = 0x03;
    pub const SEND_PACKET: u8 = 0x04;
    pub const RECV_PACKET: u8 = 0x05;
    pub const KEEP_ALIVE: u8 = 0x06;
    pub const PEER_GONE: u8 = 0x07;
    pub const PING: u8 = 0x08;
    pub const PONG: u8 = 0x09;
    pub const CLOSE: u8 = 0x0a;
    pub const PEER_PRESENT: u8 = 0x0b;
    pub const FORWARD_PACKET: u8 = 0x0c;
}

/// Why a peer is unreachable through this relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoneReason {
    /// It was connected and went away.
    Disconnected = 0,
    /// It is not connected here.
    NotHere = 1,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Server → client, first frame: the relay's public key and a fresh
    /// challenge the client's sealed info must include.
    ServerKey {
        key: Key,
        challenge: [u8; 16],
    },
    /// Client → server: its node key and a box sealed to the relay's key.
    ClientInfo {
        node_key: Key,
        nonce: [u8; 12],
        sealed: Vec<u8>,
    },
    /// Server → client: admitted.
    ServerInfo,
    SendPacket {
        dst: Key,
        data: Vec<u8>,
    },
    RecvPacket {
        src: Key,
        data: Vec<u8>,
    },
    KeepAlive,
    PeerGone {
        key: Key,
        reason: GoneReason,
    },
    Ping([u8; 8]),
    Pong([u8; 8]),
    /// Either side is closing the connection, with a reason for the log.
    Close {
        reason: String,
    },
    /// Relay → mesh peer: this client, of this network, is connected here.
    PeerPresent {
        key: Key,
        network: NetworkTag,
    },
    /// Relay → mesh peer: deliver to your client `dst` (never forwarded again).
    ForwardPacket {
        src: Key,
        dst: Key,
        data: Vec<u8>,
    },
    /// A type this version does not know; skipped.
    Unknown {
        kind: u8,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the limit")]
    TooLong(usize),
    #[error("frame type {kind:#04x} with a {len}-byte payload is malformed")]
    Malformed { kind: u8, len: usize },
}

fn key_at(p: &[u8], at: usize) -> Key {
    let mut k = [0u8; 32];
    k.copy_from_slice(&p[at..at + 32]);
    k
}

/// A frame decoded in place: a packet's bytes borrowed from the buffer
/// they arrived in (the relay forwards them without a copy of their own),
/// any other frame owned.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameRef<'a> {
    SendPacket { dst: Key, data: &'a [u8] },
    RecvPacket { src: Key, data: &'a [u8] },
    ForwardPacket { src: Key, dst: Key, data: &'a [u8] },
    Other(Frame),
}

impl<'a> FrameRef<'a> {
    /// Like [`Frame::decode`], borrowing packets' bytes from `buf`.
    pub fn decode(buf: &'a [u8]) -> Result<Option<(FrameRef<'a>, usize)>, FrameError> {
        let keys = match buf.first() {
            Some(&(kind::SEND_PACKET | kind::RECV_PACKET)) => 1,
            Some(&kind::FORWARD_PACKET) => 2,
            _ => 0,
        };
        if keys > 0 && buf.len() >= HEADER_LEN {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if (32 * keys..=MAX_FRAME_PAYLOAD).contains(&len) {
                if buf.len() < HEADER_LEN + len {
                    return Ok(None);
                }
                let key = key_at(buf, HEADER_LEN);
                let data = &buf[HEADER_LEN + 32 * keys..HEADER_LEN + len];
                let frame = match buf[0] {
                    kind::SEND_PACKET => FrameRef::SendPacket { dst: key, data },
                    kind::RECV_PACKET => FrameRef::RecvPacket { src: key, data },
                    _ => FrameRef::ForwardPacket {
                        src: key,
                        dst: key_at(buf, HEADER_LEN + 32),
                        data,
                    },
                };
                return Ok(Some((frame, HEADER_LEN + len)));
            }
        }
        Ok(Frame::decode(buf)?.map(|(f, n)| (FrameRef::Other(f), n)))
    }
}

impl Frame {
    /// Decodes one frame from the front of `buf`: `Ok(None)` when more bytes
    /// are needed, else the frame and how many bytes it used.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let kind = buf[0];
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if len > MAX_FRAME_PAYLOAD {
            return Err(FrameError::TooLong(len));
        }
        if buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let p = &buf[HEADER_LEN..HEADER_LEN + len];
        let bad = || FrameError::Malformed { kind, len };
        let frame = match kind {
            kind::SERVER_KEY => {
                if len != 48 {
                    return Err(bad());
                }
                let mut challenge = [0u8; 16];
                challenge.copy_from_slice(&p[32..48]);
                Frame::ServerKey {
                    key: key_at(p, 0),
                    challenge,
                }
            }
            kind::CLIENT_INFO => {
                if len < 44 {
                    return Err(bad());
                }
                let mut nonce = [0u8; 12];
                nonce.copy_from_slice(&p[32..44]);
                Frame::ClientInfo {
                    node_key: key_at(p, 0),
                    nonce,
                    sealed: p[44..].to_vec(),
                }
            }
            kind::SERVER_INFO => {
                if len != 0 {
                    return Err(bad());
                }
                Frame::ServerInfo
            }
            kind::SEND_PACKET | kind::RECV_PACKET => {
                if len < 32 {
                    return Err(bad());
                }
                let key = key_at(p, 0);
                let data = p[32..].to_vec();
                if kind == kind::SEND_PACKET {
                    Frame::SendPacket { dst: key, data }
                } else {
                    Frame::RecvPacket { src: key, data }
                }
            }
            kind::KEEP_ALIVE => {
                if len != 0 {
                    return Err(bad());
                }
                Frame::KeepAlive
            }
            kind::PEER_GONE => {
                if len != 33 {
                    return Err(bad());
                }
                let reason = match p[32] {
                    0 => GoneReason::Disconnected,
                    1 => GoneReason::NotHere,
                    _ => return Err(bad()),
                };
                Frame::PeerGone {
                    key: key_at(p, 0),
                    reason,
                }
            }
            kind::PING | kind::PONG => {
                let data: [u8; 8] = p.try_into().map_err(|_| bad())?;
                if kind == kind::PING {
                    Frame::Ping(data)
                } else {
                    Frame::Pong(data)
                }
            }
            kind::CLOSE => Frame::Close {
                reason: String::from_utf8_lossy(p).into_owned(),
            },
            kind::PEER_PRESENT => {
                if len != 64 {
                    return Err(bad());
                }
                Frame::PeerPresent {
                    key: key_at(p, 0),
                    network: key_at(p, 32),
                }
            }
            kind::FORWARD_PACKET => {
                if len < 64 {
                    return Err(bad());
                }
                Frame::ForwardPacket {
                    src: key_at(p, 0),
                    dst: key_at(p, 32),
                    data: p[64..].to_vec(),
                }
            }
            other => Frame::Unknown { kind: other },
        };
        Ok(Some((frame, HEADER_LEN + len)))
    }

    fn kind_and_len(&self) -> (u8, usize) {
        match self {
            Frame::ServerKey { .. } => (kind::SERVER_KEY, 48),
            Frame::ClientInfo { sealed, .. } => (kind::CLIENT_INFO, 44 + sealed.len()),
            Frame::ServerInfo => (kind::SERVER_INFO, 0),
            Frame::SendPacket { data, .. } => (kind::SEND_PACKET, 32 + data.len()),
            Frame::RecvPacket { data, .. } => (kind::RECV_PACKET, 32 + data.len()),
            Frame::KeepAlive => (kind::KEEP_ALIVE, 0),
            Frame::PeerGone { .. } => (kind::PEER_GONE, 33),
            Frame::Ping(_) => (kind::PING, 8),
            Frame::Pong(_) => (kind::PONG, 8),
            Frame::Close { reason } => (kind::CLOSE, reason.len()),
            Frame::PeerPresent { .. } => (kind::PEER_PRESENT, 64),
            Frame::ForwardPacket { data, .. } => (kind::FORWARD_PACKET, 64 + data.len()),
            Frame::Unknown { kind } => (*kind, 0),
        }
    }

    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let (kind, len) = self.kind_and_len();
        if len > MAX_FRAME_PAYLOAD {
            return Err(FrameError::TooLong(len));
        }
        out.reserve(HEADER_LEN + len);
        out.push(kind);
        out.extend_from_slice(&(len as u32).to_be_bytes());
        match self {
            Frame::ServerKey { key, challenge } => {
                out.extend_from_slice(key);
                out.extend_from_slice(challenge);
            }
            Frame::ClientInfo {
                node_key,
                nonce,
                sealed,
            } => {
                out.extend_from_slice(node_key);
                out.extend_from_slice(nonce);
                out.extend_from_slice(sealed);
            }
            Frame::SendPacket { dst: key, data } | Frame::RecvPacket { src: key, data } => {
                out.extend_from_slice(key);
                out.extend_from_slice(data);
            }
            Frame::PeerGone { key, reason } => {
                out.extend_from_slice(key);
                out.push(*reason as u8);
            }
            Frame::Ping(d) | Frame::Pong(d) => out.extend_from_slice(d),
            Frame::Close { reason } => out.extend_from_slice(reason.as_bytes()),
            Frame::PeerPresent { key, network } => {
                out.extend_from_slice(key);
                out.extend_from_slice(network);
            }
            Frame::ForwardPacket { src, dst, data } => {
                out.extend_from_slice(src);
                out.extend_from_slice(dst);
                out.extend_from_slice(data);
            }
            Frame::ServerInfo | Frame::KeepAlive | Frame::Unknown { .. } => {}
        }
        Ok(())
    }

    /// Writes a `RecvPacket` straight into `out` without building a frame.
    /// Appends a forward-packet frame (relay to relay) for `data` from
    /// `src` to `dst`; `data` at most [`MAX_FRAME_PAYLOAD`] - 64 bytes.
    pub fn encode_forward_packet(src: &Key, dst: &Key, data: &[u8], out: &mut Vec<u8>) {
        encode_packet(kind::FORWARD_PACKET, &[src, dst], data, out);
    }

    /// Appends a send-packet frame for `data` to `dst`; `data` at most
    /// [`MAX_FRAME_PAYLOAD`] - 32 bytes.
    pub fn encode_send_packet(dst: &Key, data: &[u8], out: &mut Vec<u8>) {
        encode_packet(kind::SEND_PACKET, &[dst], data, out);
    }

    /// Appends a receive-packet frame for `data` from `src`; `data` at most
    /// [`MAX_FRAME_PAYLOAD`] - 32 bytes.
    pub fn encode_recv_packet(src: &Key, data: &[u8], out: &mut Vec<u8>) {
        encode_packet(kind::RECV_PACKET, &[src], data, out);
    }
}

/// A packet frame, encoded in place: its keys, then the packet.
fn encode_packet(kind: u8, keys: &[&Key], data: &[u8], out: &mut Vec<u8>) {
    let len = 32 * keys.len() + data.len();
    debug_assert!(len <= MAX_FRAME_PAYLOAD);
    out.reserve(HEADER_LEN + len);
    out.push(kind);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    for key in keys {
        out.extend_from_slice(*key);
    }
    out.extend_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let key = any::<[u8; 32]>();
        let data = vec(any::<u8>(), 0..2000);
        prop_oneof![
            (key, any::<[u8; 16]>())
                .prop_map(|(key, challenge)| Frame::ServerKey { key, challenge }),
            (key, any::<[u8; 12]>(), data.clone()).prop_map(|(node_key, nonce, sealed)| {
                Frame::ClientInfo {
                    node_key,
                    nonce,
                    sealed,
                }
            }),
            Just(Frame::ServerInfo),
            (key, data.clone()).prop_map(|(dst, data)| Frame::SendPacket { dst, data }),
            (key, data).prop_map(|(src, data)| Frame::RecvPacket { src, data }),
            Just(Frame::KeepAlive),
            (key, any::<bool>()).prop_map(|(key, b)| Frame::PeerGone {
                key,
                reason: if b {
                    GoneReason::Disconnected
                } else {
                    GoneReason::NotHere
                }
            }),
            any::<[u8; 8]>().prop_map(Frame::Ping),
            any::<[u8; 8]>().prop_map(Frame::Pong),
            "[a-z ]{0,40}".prop_map(|reason| Frame::Close { reason }),
            (key, key).prop_map(|(key, network)| Frame::PeerPresent { key, network }),
            (key, key, vec(any::<u8>(), 0..500))
                .prop_map(|(src, dst, data)| Frame::ForwardPacket { src, dst, data }),
        ]
    }

    proptest! {
        /// Decoding in place says what decoding to owned frames says.
        #[test]
        fn borrowed_decoding_agrees_with_owned(bytes in vec(any::<u8>(), 0..200), kind in 0u8..14) {
            let mut bytes = bytes;
            if let Some(b) = bytes.first_mut() {
                *b = kind;
            }
            let owned = Frame::decode(&bytes);
            let borrowed = FrameRef::decode(&bytes);
            match (owned, borrowed) {
                (Ok(None), Ok(None)) => {}
                (Err(a), Err(b)) => prop_assert_eq!(a.to_string(), b.to_string()),
                (Ok(Some((f, n))), Ok(Some((r, m)))) => {
                    prop_assert_eq!(n, m);
                    let back = match r {
                        FrameRef::SendPacket { dst, data } => Frame::SendPacket { dst, data: data.to_vec() },
                        FrameRef::RecvPacket { src, data } => Frame::RecvPacket { src, data: data.to_vec() },
                        FrameRef::ForwardPacket { src, dst, data } => Frame::ForwardPacket { src, dst, data: data.to_vec() },
                        FrameRef::Other(f) => f,
                    };
                    prop_assert_eq!(f, back);
                }
                (a, b) => prop_assert!(false, "{:?} vs {:?}", a, b),
            }
        }
    }

    proptest! {
        #[test]
        fn frames_round_trip(f in arb_frame(), trailing in vec(any::<u8>(), 0..8)) {
            let mut buf = Vec::new();
            f.encode(&mut buf).unwrap();
            let encoded_len = buf.len();
            buf.extend_from_slice(&trailing);
            let (back, used) = Frame::decode(&buf).unwrap().unwrap();
            prop_assert_eq!(back, f);
            prop_assert_eq!(used, encoded_len, "claimed length is the real one");
            // Every strict prefix asks for more.
            for cut in 0..encoded_len {
                prop_assert_eq!(Frame::decode(&buf[..cut]).unwrap(), None);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..200)) {
            if let Ok(Some((_, used))) = Frame::decode(&bytes) {
                prop_assert!(used <= bytes.len());
            }
        }

        #[test]
        fn packet_fast_paths_match(src in any::<[u8; 32]>(), dst in any::<[u8; 32]>(), data in vec(any::<u8>(), 0..300)) {
            let encoded = |f: Frame| {
                let mut v = Vec::new();
                f.encode(&mut v).unwrap();
                v
            };
            let mut b = Vec::new();
            Frame::encode_recv_packet(&src, &data, &mut b);
            prop_assert_eq!(encoded(Frame::RecvPacket { src, data: data.clone() }), b);
            let mut b = Vec::new();
            Frame::encode_send_packet(&dst, &data, &mut b);
            prop_assert_eq!(encoded(Frame::SendPacket { dst, data: data.clone() }), b);
            let mut b = Vec::new();
            Frame::encode_forward_packet(&src, &dst, &data, &mut b);
            prop_assert_eq!(encoded(Frame::ForwardPacket { src, dst, data: data.clone() }), b);
        }
    }

    #[test]
    fn rejects_bad_lengths_and_skips_unknown_types() {
        let mut too_long = vec![kind::SEND_PACKET];
        too_long.extend_from_slice(&((MAX_FRAME_PAYLOAD + 1) as u32).to_be_bytes());
        assert_eq!(
            Frame::decode(&too_long),
            Err(FrameError::TooLong(MAX_FRAME_PAYLOAD + 1))
        );
        let short_send = [kind::SEND_PACKET, 0, 0, 0, 3, 1, 2, 3];
        assert!(matches!(
            Frame::decode(&short_send),
            Err(FrameError::Malformed { .. })
        ));
        let bad_gone = {
            let mut v = vec![kind::PEER_GONE, 0, 0, 0, 33];
            v.extend_from_slice(&[0; 32]);
            v.push(9);
            v
        };
        assert!(matches!(
            Frame::decode(&bad_gone),
            Err(FrameError::Malformed { .. })
        ));
        // A presence without its network (the older 32-byte form) is refused.
        let mut bare_present = vec![kind::PEER_PRESENT, 0, 0, 0, 32];
        bare_present.extend_from_slice(&[0; 32]);
        assert!(matches!(
            Frame::decode(&bare_present),
            Err(FrameError::Malformed { .. })
        ));
        let unknown = [0x7f, 0, 0, 0, 2, 0xaa, 0xbb];
        assert_eq!(
            Frame::decode(&unknown),
            Ok(Some((Frame::Unknown { kind: 0x7f }, 7)))
        );
    }
}
