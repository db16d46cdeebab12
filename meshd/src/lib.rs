//! The device daemon as a library: the `meshd` binary is a thin CLI over it,
//! and fuzz targets and embedders reach its decoders and engine from here.
// `unsafe` only in leaf modules that say so (the UDP socket's batched
// receive); everywhere else it is an error.
#![deny(unsafe_code)]

pub mod contribute;
pub mod control;
pub mod daemon;
pub mod dns;
pub mod endpoints;
pub mod engine;
pub mod firewall;
pub mod gateway;
pub mod jobs_cli;
pub mod key_expiry;
pub mod keyring;
pub mod localapi;
pub mod netcheck;
pub mod pairing;
pub mod paths;
pub mod receipts;
pub mod serve_compute;
pub mod state;
pub mod static_tunnel;
pub mod status_text;
pub mod sysinfo;
pub mod tickets;
