//! Crank Mesh relay (DERP-style): forwards packets between devices by node
//! key over TCP with an HTTP upgrade, for when no direct UDP path exists, and
//! answers STUN so devices learn their public address. The relay only ever
//! carries WireGuard and sealed path-discovery packets: it sees no plaintext.
#![forbid(unsafe_code)]

// The protocol and the client are crates of their own (`derp-proto`,
// `derp-client`), so devices link neither the server nor its queues.
pub use derp_client as client;
pub use derp_proto as proto;
pub use derp_proto::io;
pub mod secrets;
pub mod server;
pub mod tls;
