//! The relay's wire protocol, pure: frames, the client handshake, STUN.

pub mod frame;
pub mod handshake;
pub mod stun;
