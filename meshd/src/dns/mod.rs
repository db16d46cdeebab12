//! MagicDNS: answers the mesh's own names authoritatively, forwards
//! split-DNS domains and everything else, and points the OS resolver at
//! itself.
//!
//! * [`zone`]: pure lookup tables for mesh names (A/AAAA/PTR, NXDOMAIN/NODATA).
//! * [`server`]: the UDP/TCP server, on hickory-server's types.
//! * [`os`]: installing and restoring the Linux resolver configuration.
//! * [`service`]: the daemon's MagicDNS, following the netmap.
//!
//! Response codes: queries for which no upstream is configured get REFUSED
//! (stub resolvers then try their next nameserver at once); forwards that
//! time out, fail, or exceed the in-flight cap get SERVFAIL.

mod handler;
pub mod os;
pub mod server;
pub mod service;
pub mod zone;

pub use os::{Installed, OsDns, OsDnsError, OsDnsMode, Repair};
pub use server::{Config, DnsError, MagicDns, Options, Stats};
pub use zone::{ExtraRecord, Host, Zone, ZoneAnswer, ZoneError, ZoneSpec};
