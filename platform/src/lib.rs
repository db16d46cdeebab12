//! The shared vocabulary of Crank Mesh: keys, overlay addresses, the netmap
//! and its deltas, control API types and signed requests. Pure code: no
//! sockets, no clocks, no async runtime.
#![forbid(unsafe_code)]

pub mod addr;
pub mod api;
pub mod capability;
pub mod control_auth;
pub mod disco;
pub mod filter;
#[doc(hidden)]
pub mod fuzzing;
pub mod jobs;
pub mod keys;
pub mod ledger;
pub mod netmap;
pub mod people;
pub mod signed;
#[cfg(feature = "tls")]
pub mod tls;

/// The content type of every `/metrics` page (OpenMetrics text, as
/// `prometheus_client::encoding::text::encode` writes it).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Seconds since the Unix epoch (for callers that have a clock).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch (for callers that have a clock).
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
