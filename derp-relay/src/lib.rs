//! Crank Mesh relay (DERP-style): forwards packets between devices by node
//! key over TCP with an HTTP upgrade, for when no direct UDP path exists, and
//! answers STUN so devices learn their public address. The relay only ever
//! carries WireGuard and sealed path-discovery packets: it sees no plaintext.
#![forbid(unsafe_code)]

pub mod client;
pub mod io;
pub mod proto;
pub mod secrets;
pub mod server;
pub mod tls;
