//! Who may use the relay: devices the coordinator knows, each in its network.
//!
//! Answers are cached: admitted keys for [`ALLOW_TTL`], refused ones for
//! [`DENY_TTL`]. When the coordinator cannot be reached, a key admitted within
//! [`STALE_ALLOW_LIMIT`] is still admitted (devices keep working through a
//! coordinator outage) and any other key is refused: the relay never serves a
//! device it has no word on.
//!
//! Everything here is bounded, because anyone who can open a TCP connection
//! and prove *some* key (a fresh random one costs nothing) reaches this code:
//! - the cache holds at most [`AdmissionLimits::max_admitted`] admitted and
//!   [`AdmissionLimits::max_refused`] refused keys, dropping expired entries
//!   first and then the oldest;
//! - questions to the coordinator draw on a token bucket
//!   ([`AdmissionLimits::asks_per_sec`]); a key that finds it empty is treated
//!   as if the coordinator did not answer (so only a recently admitted key
//!   gets in), without asking;
//! - concurrent checks of one key share a single question.
//!
//! The coordinator also pushes revocations (see [`super::revocations`]): a
//! revoked key is denied at once, whatever was cached, and an answer to a
//! question asked before a revocation never overrides it.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use platform::keys::NodePublic;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::sync::OnceCell;
use tokio_rustls::rustls;

use super::metrics::Metrics;
use super::ratelimit::TokenBucket;
pub use crate::proto::frame::NetworkTag;

pub const ALLOW_TTL: Duration = Duration::from_secs(60);
pub const DENY_TTL: Duration = Duration::from_secs(5);
pub const STALE_ALLOW_LIMIT: Duration = Duration::from_secs(600);

/// The one network every client of an open relay is in.
pub const OPEN_NETWORK: NetworkTag = [0; 32];

/// The tag relays use for the coordinator's network `id`: a digest, so the
/// mesh never carries the coordinator's numbering.
pub fn network_tag(id: i64) -> NetworkTag {
    let mut h = Sha256::new();
    h.update(b"crank-mesh relay network\0");
    h.update(id.to_be_bytes());
    h.finalize().into()
}

/// Bounds on what admission remembers and asks.
#[derive(Clone, Copy, Debug)]
pub struct AdmissionLimits {
    /// Admitted keys remembered (each for up to [`STALE_ALLOW_LIMIT`]).
    pub max_admitted: usize,
    /// Refused keys remembered (each for [`DENY_TTL`]).
    pub max_refused: usize,
    /// Questions per second to the coordinator about keys not cached.
    pub asks_per_sec: u64,
    /// Questions that may go out at once above that rate.
    pub ask_burst: u64,
}

impl Default for AdmissionLimits {
    /// 100,000 admitted and 10,000 refused keys; 200 questions a second with
    /// a burst of 1,000 (a relay restart with 10,000 devices is admitted
    /// again within a minute).
    fn default() -> Self {
        AdmissionLimits {
            max_admitted: 100_000,
            max_refused: 10_000,
            asks_per_sec: 200,
            ask_burst: 1_000,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted, as a member of this network.
    Admit(NetworkTag),
    Deny,
    /// The coordinator did not answer (or was not asked: over budget) and
    /// nothing cached covers the key.
    Unavailable,
}

/// What the coordinator said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Known(NetworkTag),
    Unknown,
    NoAnswer,
}

/// The caching and asking policy, separate from I/O, on an injected clock.
pub struct Cache {
    limits: AdmissionLimits,
    admitted: HashMap<NodePublic, (NetworkTag, Instant)>,
    refused: HashMap<NodePublic, Instant>,
    asks: TokenBucket,
}

/// Inserts into a map of at most `cap` entries: when full, expired entries
/// (older than `ttl`) go first, then the oldest one.
fn insert_bounded<K: Eq + Hash + Copy, V>(
    map: &mut HashMap<K, V>,
    cap: usize,
    key: K,
    value: V,
    at: impl Fn(&V) -> Instant,
    ttl: Duration,
    now: Instant,
) {
    if !map.contains_key(&key) && map.len() >= cap.max(1) {
        map.retain(|_, v| now.saturating_duration_since(at(v)) < ttl);
        if map.len() >= cap.max(1) {
            if let Some(oldest) = map.iter().min_by_key(|(_, v)| at(v)).map(|(k, _)| *k) {
                map.remove(&oldest);
            }
        }
    }
    map.insert(key, value);
}

impl Cache {
    pub fn new(limits: AdmissionLimits, now: Instant) -> Self {
        Cache {
            limits,
            admitted: HashMap::new(),
            refused: HashMap::new(),
            asks: TokenBucket::new(limits.asks_per_sec, limits.ask_burst, now),
        }
    }

    /// Keys remembered, admitted and refused.
    pub fn counts(&self) -> (usize, usize) {
        (self.admitted.len(), self.refused.len())
    }

    /// A fresh cached verdict, if any.
    pub fn fresh(&self, key: &NodePublic, now: Instant) -> Option<Verdict> {
        if let Some(at) = self.refused.get(key) {
            if now.saturating_duration_since(*at) < DENY_TTL {
                return Some(Verdict::Deny);
            }
        }
        let (network, at) = self.admitted.get(key)?;
        (now.saturating_duration_since(*at) < ALLOW_TTL).then_some(Verdict::Admit(*network))
    }

    /// Whether a question to the coordinator fits the budget now (taking it).
    pub fn may_ask(&mut self, now: Instant) -> bool {
        self.asks.take(1, now)
    }

    fn admit(&mut self, key: NodePublic, network: NetworkTag, now: Instant) {
        self.refused.remove(&key);
        let cap = self.limits.max_admitted;
        insert_bounded(
            &mut self.admitted,
            cap,
            key,
            (network, now),
            |(_, at)| *at,
            STALE_ALLOW_LIMIT,
            now,
        );
    }

    fn refuse(&mut self, key: NodePublic, now: Instant) {
        self.admitted.remove(&key);
        let cap = self.limits.max_refused;
        insert_bounded(&mut self.refused, cap, key, now, |at| *at, DENY_TTL, now);
    }

    /// Folds the coordinator's answer to a question asked at `asked` in and
    /// decides.
    pub fn decide(
        &mut self,
        key: NodePublic,
        answer: Answer,
        asked: Instant,
        now: Instant,
    ) -> Verdict {
        match answer {
            // Denied (revoked, say) after the question went out: the answer is
            // older news than the denial.
            Answer::Known(_) if self.refused.get(&key).is_some_and(|at| *at >= asked) => {
                Verdict::Deny
            }
            Answer::Known(network) => {
                self.admit(key, network, now);
                Verdict::Admit(network)
            }
            Answer::Unknown => {
                self.refuse(key, now);
                Verdict::Deny
            }
            Answer::NoAnswer => match self.admitted.get(&key) {
                Some((network, at)) if now.saturating_duration_since(*at) < STALE_ALLOW_LIMIT => {
                    Verdict::Admit(*network)
                }
                _ => Verdict::Unavailable,
            },
        }
    }

    /// The coordinator revoked `key`: denied from now on, until it is asked
    /// again after [`DENY_TTL`] (and the stale-admit of an outage no longer
    /// covers it).
    pub fn revoke(&mut self, key: NodePublic, now: Instant) {
        self.refuse(key, now);
    }

    /// Forgets every answer: revocations may have been missed, so every key
    /// is asked about again.
    pub fn clear(&mut self) {
        self.admitted.clear();
        self.refused.clear();
    }
}

/// The coordinator's answer body to an admission question.
#[derive(Deserialize)]
struct Admitted {
    network_id: i64,
}

/// Most keys in one batch question (the coordinator's limit).
pub const BATCH: usize = 500;

/// The coordinator's answer to a batch question: the keys admitted.
#[derive(Deserialize)]
struct BatchAnswer {
    admitted: Vec<BatchAdmitted>,
}

#[derive(Deserialize)]
struct BatchAdmitted {
    node_key: NodePublic,
    network_id: i64,
}

/// Admission by asking a coordinator.
pub struct CoordinatorAdmission {
    pub(crate) url: String,
    pub(crate) token: String,
    http: reqwest::Client,
    /// Whom the relay trusts to be the coordinator: used by `http` and by the
    /// revocation stream alike.
    pub(crate) tls: Arc<rustls::ClientConfig>,
    cache: Mutex<Cache>,
    /// Questions in flight, by key: later checks of the key wait for the
    /// same answer. At most one entry per connection in its handshake.
    inflight: Mutex<HashMap<NodePublic, Arc<OnceCell<Verdict>>>>,
}

pub enum Admission {
    /// Everyone with a valid handshake, all in one network (only for tests
    /// and closed labs).
    Open,
    Coordinator(Box<CoordinatorAdmission>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes a key's in-flight entry out when its check ends or is dropped
/// (unless a newer question replaced it).
struct Inflight<'a> {
    map: &'a Mutex<HashMap<NodePublic, Arc<OnceCell<Verdict>>>>,
    key: NodePublic,
    cell: Arc<OnceCell<Verdict>>,
}

impl std::ops::Drop for Inflight<'_> {
    fn drop(&mut self) {
        let mut map = lock(self.map);
        if map
            .get(&self.key)
            .is_some_and(|c| Arc::ptr_eq(c, &self.cell))
        {
            map.remove(&self.key);
        }
    }
}

impl CoordinatorAdmission {
    async fn check(&self, key: NodePublic, metrics: &Metrics) -> Verdict {
        if let Some(v) = lock(&self.cache).fresh(&key, Instant::now()) {
            return v;
        }
        let cell = lock(&self.inflight).entry(key).or_default().clone();
        let guard = Inflight {
            map: &self.inflight,
            key,
            cell,
        };
        let verdict = *guard.cell.get_or_init(|| self.ask(key, metrics)).await;
        drop(guard);
        verdict
    }

    async fn ask(&self, key: NodePublic, metrics: &Metrics) -> Verdict {
        let asked = Instant::now();
        let may_ask = {
            let mut cache = lock(&self.cache);
            // Answered while this check waited for its turn.
            if let Some(v) = cache.fresh(&key, asked) {
                return v;
            }
            cache.may_ask(asked)
        };
        let answer = if may_ask {
            metrics.admission_asks.inc();
            self.query(key).await
        } else {
            metrics.admission_throttled.inc();
            Answer::NoAnswer
        };
        lock(&self.cache).decide(key, answer, asked, Instant::now())
    }

    /// Asks about `keys` (at most [`BATCH`]) in one question, folds the
    /// answers into the cache and returns the keys now refused; `None` when
    /// the coordinator did not answer (nothing changes then).
    pub(crate) async fn recheck(
        &self,
        keys: &[NodePublic],
        metrics: &Metrics,
    ) -> Option<Vec<NodePublic>> {
        let asked = Instant::now();
        metrics.admission_asks.inc();
        let response = self
            .http
            .post(format!("{}/api/v1/relay/admit", self.url))
            .bearer_auth(&self.token)
            .json(&serde_json::json!({ "node_keys": keys }))
            .send()
            .await;
        let answer: BatchAnswer = match response {
            Ok(r) if r.status().is_success() => match r.json().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "coordinator's batch answer unreadable");
                    return None;
                }
            },
            Ok(r) => {
                tracing::warn!(status = %r.status(), "coordinator refused the batch check");
                return None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "coordinator unreachable for the batch check");
                return None;
            }
        };
        let admitted: HashMap<NodePublic, NetworkTag> = answer
            .admitted
            .into_iter()
            .map(|a| (a.node_key, network_tag(a.network_id)))
            .collect();
        let now = Instant::now();
        let mut cache = lock(&self.cache);
        let refused = keys
            .iter()
            .filter(|key| {
                let answer = admitted
                    .get(key)
                    .map_or(Answer::Unknown, |n| Answer::Known(*n));
                cache.decide(**key, answer, asked, now) == Verdict::Deny
            })
            .copied()
            .collect();
        Some(refused)
    }

    async fn query(&self, key: NodePublic) -> Answer {
        let response = self
            .http
            .get(format!("{}/api/v1/relay/admit/{key}", self.url))
            .bearer_auth(&self.token)
            .send()
            .await;
        match response {
            Ok(r) if r.status().is_success() => match r.json::<Admitted>().await {
                Ok(a) => Answer::Known(network_tag(a.network_id)),
                Err(e) => {
                    tracing::warn!(error = %e, "coordinator's admission answer unreadable");
                    Answer::NoAnswer
                }
            },
            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => Answer::Unknown,
            Ok(r) => {
                tracing::warn!(status = %r.status(), "coordinator refused the admission check");
                Answer::NoAnswer
            }
            Err(e) => {
                tracing::warn!(error = %e, "coordinator unreachable for admission");
                Answer::NoAnswer
            }
        }
    }
}

impl Admission {
    /// Asks the coordinator at `url`, trusting the public roots plus
    /// `ca_pem` (a private CA) if given.
    pub fn coordinator(
        url: &str,
        token: String,
        ca_pem: Option<&str>,
        limits: AdmissionLimits,
    ) -> anyhow::Result<Self> {
        let tls = crate::tls::client_config(ca_pem)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .use_preconfigured_tls(Arc::unwrap_or_clone(tls.clone()))
            .build()
            .context("building the coordinator HTTP client")?;
        Ok(Admission::Coordinator(Box::new(CoordinatorAdmission {
            url: url.trim_end_matches('/').to_owned(),
            token,
            http,
            tls,
            cache: Mutex::new(Cache::new(limits, Instant::now())),
            inflight: Mutex::new(HashMap::new()),
        })))
    }

    pub async fn check(&self, key: NodePublic, metrics: &Metrics) -> Verdict {
        match self {
            Admission::Open => Verdict::Admit(OPEN_NETWORK),
            Admission::Coordinator(c) => c.check(key, metrics).await,
        }
    }

    fn cache(&self) -> Option<MutexGuard<'_, Cache>> {
        match self {
            Admission::Open => None,
            Admission::Coordinator(c) => Some(lock(&c.cache)),
        }
    }

    /// Keys remembered, admitted and refused.
    pub fn cached(&self) -> (usize, usize) {
        self.cache().map_or((0, 0), |c| c.counts())
    }

    /// Denies `key` from now on (see [`Cache::revoke`]).
    pub fn revoke(&self, key: NodePublic, now: Instant) {
        if let Some(mut c) = self.cache() {
            c.revoke(key, now);
        }
    }

    /// Whether `key` is freshly denied (revoked moments ago, say).
    pub fn denies(&self, key: &NodePublic, now: Instant) -> bool {
        self.cache()
            .is_some_and(|c| c.fresh(key, now) == Some(Verdict::Deny))
    }

    /// Forgets every cached answer (see [`Cache::clear`]).
    pub fn clear(&self) {
        if let Some(mut c) = self.cache() {
            c.clear();
        }
    }
}

#[cfg(test)]
#[path = "admission_tests.rs"]
mod tests;
