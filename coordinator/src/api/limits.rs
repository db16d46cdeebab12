//! Rate limits: token buckets per source address (for the endpoints anyone
//! can call: registration, pairing, key rotation, opening a map stream) and
//! per device (for the endpoint, capability and home-region reports a
//! device makes on its stream, each of which is a write and a fan-out to
//! every peer).
//!
//! Buckets are kept as one instant each (the generic cell rate algorithm:
//! the time the bucket will be full again), in tables of bounded size. The
//! clock is passed in, so the limits are tested on virtual time.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::SharedState;
use crate::error::AppError;

/// A sustained rate with a burst.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Requests allowed at once after a quiet spell.
    pub burst: u32,
    /// One more request is allowed every `every`.
    pub every: Duration,
}

impl Rate {
    /// No limit at all (tests that are about something else).
    pub const UNLIMITED: Rate = Rate {
        burst: u32::MAX,
        every: Duration::ZERO,
    };

    fn tolerance(&self) -> Duration {
        self.every.saturating_mul(self.burst.saturating_sub(1))
    }
}

/// Token buckets keyed by `K`, at most `max_keys` of them. When the table
/// is full of active buckets, new keys share one overflow bucket: a flood
/// from many addresses then limits itself (and, until it stops, newcomers)
/// instead of growing the table.
pub struct Limiter<K> {
    rate: Rate,
    max_keys: usize,
    inner: Mutex<Table<K>>,
}

struct Table<K> {
    /// key → when its bucket is full again (GCRA's theoretical arrival time)
    full_at: HashMap<K, Instant>,
    overflow: Option<Instant>,
}

impl<K: Hash + Eq> Limiter<K> {
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        Limiter {
            rate,
            max_keys: max_keys.max(1),
            inner: Mutex::new(Table {
                full_at: HashMap::new(),
                overflow: None,
            }),
        }
    }

    /// Takes one request for `key` at `now`. `Err` says how long until one
    /// would be allowed.
    pub fn check(&self, key: K, now: Instant) -> Result<(), Duration> {
        if self.rate == Rate::UNLIMITED {
            return Ok(());
        }
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if !t.full_at.contains_key(&key) && t.full_at.len() >= self.max_keys {
            // Buckets that are full again hold no state worth keeping.
            t.full_at.retain(|_, full_at| *full_at > now);
        }
        let rate = self.rate;
        if t.full_at.len() < self.max_keys || t.full_at.contains_key(&key) {
            let slot = t.full_at.entry(key).or_insert(now);
            take(rate, slot, now)
        } else {
            let slot = t.overflow.get_or_insert(now);
            take(rate, slot, now)
        }
    }

    /// Keys held now.
    pub fn tracked(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .full_at
            .len()
    }
}

fn take(rate: Rate, full_at: &mut Instant, now: Instant) -> Result<(), Duration> {
    let start = (*full_at).max(now);
    let ahead = start - now;
    if ahead > rate.tolerance() {
        return Err(ahead - rate.tolerance());
    }
    *full_at = start + rate.every;
    Ok(())
}

/// The limits of one server.
pub struct Limits {
    /// Unauthenticated device endpoints, per source address.
    pub by_source: Limiter<IpAddr>,
    /// Endpoint, capability and home-region reports, per device.
    pub device_reports: Limiter<i64>,
}

/// Most sources and devices tracked at once.
const MAX_KEYS: usize = 100_000;

impl Default for Limits {
    /// 30 requests at once per source, then one every 2 s; 20 reports at
    /// once per device, then one a second (a device reports on change and
    /// with its heartbeat every few seconds).
    fn default() -> Self {
        Limits {
            by_source: Limiter::new(
                Rate {
                    burst: 30,
                    every: Duration::from_secs(2),
                },
                MAX_KEYS,
            ),
            device_reports: Limiter::new(
                Rate {
                    burst: 20,
                    every: Duration::from_secs(1),
                },
                MAX_KEYS,
            ),
        }
    }
}

impl Limits {
    /// No limits (tests that are about something else).
    pub fn unlimited() -> Self {
        Limits {
            by_source: Limiter::new(Rate::UNLIMITED, 1),
            device_reports: Limiter::new(Rate::UNLIMITED, 1),
        }
    }
}

/// The remote address of a connection, whether plain TCP or TLS.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>>
    for PeerAddr
{
    fn connect_info(s: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        PeerAddr(*s.remote_addr())
    }
}

impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, crate::tls::TlsListener>>
    for PeerAddr
{
    fn connect_info(s: axum::serve::IncomingStream<'_, crate::tls::TlsListener>) -> Self {
        PeerAddr(*s.remote_addr())
    }
}

/// Whom a source-address bucket belongs to: the address for IPv4, its /64
/// for IPv6 (one host usually holds a whole /64).
fn source_key(addr: IpAddr) -> IpAddr {
    match addr.to_canonical() {
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            IpAddr::V6(o.into())
        }
        v4 => v4,
    }
}

/// A 429 with a JSON error and `Retry-After` (whole seconds, at least 1).
pub fn too_many(what: &str, retry_after: Duration) -> Response {
    let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    let secs = secs.max(1);
    let mut resp =
        AppError::TooManyRequests(format!("too many {what}; retry in {secs} s")).into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

/// Middleware: the per-source limit. Requests whose source is unknown
/// (served without connection info) share one bucket.
pub async fn per_source(State(s): State<SharedState>, req: Request, next: Next) -> Response {
    let source = req
        .extensions()
        .get::<ConnectInfo<PeerAddr>>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0 .0.ip());
    let now = tokio::time::Instant::now().into_std();
    match s.limits.by_source.check(source_key(source), now) {
        Ok(()) => next.run(req).await,
        Err(wait) => {
            tracing::debug!(%source, "rate limited");
            too_many("requests from this address", wait)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(burst: u32, secs: u64) -> Rate {
        Rate {
            burst,
            every: Duration::from_secs(secs),
        }
    }

    #[test]
    fn burst_then_sustained_rate() {
        let l = Limiter::new(rate(3, 2), 10);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check(1, t0).is_ok());
        }
        assert_eq!(l.check(1, t0), Err(Duration::from_secs(2)));
        assert!(l.check(2, t0).is_ok(), "keys are independent");
        assert_eq!(
            l.check(1, t0 + Duration::from_secs(1)),
            Err(Duration::from_secs(1))
        );
        assert!(l.check(1, t0 + Duration::from_secs(2)).is_ok());
        assert!(l.check(1, t0 + Duration::from_secs(2)).is_err());
        // After a long quiet spell the burst is back, not more.
        let later = t0 + Duration::from_secs(100);
        for _ in 0..3 {
            assert!(l.check(1, later).is_ok());
        }
        assert!(l.check(1, later).is_err());
    }

    #[test]
    fn the_table_is_bounded() {
        let l = Limiter::new(rate(1, 10), 4);
        let t0 = Instant::now();
        for k in 0..4 {
            assert!(l.check(k, t0).is_ok());
        }
        // A fifth source while four are active: it shares the overflow
        // bucket with every other newcomer.
        assert!(l.check(100, t0).is_ok());
        assert!(l.check(101, t0).is_err(), "newcomers share one bucket");
        assert_eq!(l.tracked(), 4, "the table did not grow");
        // Once the old buckets are full again they make room.
        let later = t0 + Duration::from_secs(10);
        assert!(l.check(102, later).is_ok());
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn ipv6_sources_count_per_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(source_key(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn retry_after_rounds_up() {
        let r = too_many("requests", Duration::from_millis(1500));
        assert_eq!(r.status(), axum::http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
    }
}
