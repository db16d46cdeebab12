//! The relay's wire protocol, shared by the relay server and its clients:
//! frames, the client's key proof, STUN, and frames over an async byte
//! stream. Everything but [`io`] is pure.
#![forbid(unsafe_code)]

pub mod frame;
pub mod handshake;
pub mod io;
pub mod stun;

/// The `Upgrade` token of the HTTP request that turns a connection into a
/// relay connection.
pub const UPGRADE_PROTOCOL: &str = "crank-derp";
