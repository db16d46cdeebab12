//! Who may use the relay: devices the coordinator knows.
//!
//! Answers are cached: admitted keys for [`ALLOW_TTL`], refused ones for
//! [`DENY_TTL`]. When the coordinator cannot be reached, a key admitted within
//! [`STALE_ALLOW_LIMIT`] is still admitted (devices keep working through a
//! coordinator outage) and any other key is refused: the relay never serves a
//! device it has no word on.
//!
//! The coordinator also pushes revocations (see [`super::revocations`]): a
//! revoked key is denied at once, whatever was cached, and an answer to a
//! question asked before a revocation never overrides it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use platform::keys::NodePublic;
use tokio_rustls::rustls;

pub const ALLOW_TTL: Duration = Duration::from_secs(60);
pub const DENY_TTL: Duration = Duration::from_secs(5);
pub const STALE_ALLOW_LIMIT: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Admit,
    Deny,
    /// The coordinator did not answer and nothing cached covers the key.
    Unavailable,
}

/// What the coordinator said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Known,
    Unknown,
    NoAnswer,
}

/// The caching policy, separate from I/O.
#[derive(Default)]
pub struct Cache {
    entries: HashMap<NodePublic, (bool, Instant)>,
}

impl Cache {
    /// A fresh cached verdict, if any.
    pub fn fresh(&self, key: &NodePublic, now: Instant) -> Option<Verdict> {
        let (allowed, at) = self.entries.get(key)?;
        let ttl = if *allowed { ALLOW_TTL } else { DENY_TTL };
        (now.saturating_duration_since(*at) < ttl).then_some(if *allowed {
            Verdict::Admit
        } else {
            Verdict::Deny
        })
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
            Answer::Known
                if self
                    .entries
                    .get(&key)
                    .is_some_and(|(allowed, at)| !allowed && *at >= asked) =>
            {
                Verdict::Deny
            }
            Answer::Known => {
                self.entries.insert(key, (true, now));
                Verdict::Admit
            }
            Answer::Unknown => {
                self.entries.insert(key, (false, now));
                Verdict::Deny
            }
            Answer::NoAnswer => match self.entries.get(&key) {
                Some((true, at)) if now.saturating_duration_since(*at) < STALE_ALLOW_LIMIT => {
                    Verdict::Admit
                }
                _ => Verdict::Unavailable,
            },
        }
    }

    /// The coordinator revoked `key`: denied from now on, until it is asked
    /// again after [`DENY_TTL`] (and the stale-admit of an outage no longer
    /// covers it).
    pub fn revoke(&mut self, key: NodePublic, now: Instant) {
        self.entries.insert(key, (false, now));
    }

    /// Forgets everything: revocations may have been missed, so every key is
    /// asked about again.
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

pub enum Admission {
    /// Everyone with a valid handshake (only for tests and closed labs).
    Open,
    Coordinator {
        url: String,
        token: String,
        http: reqwest::Client,
        /// Whom the relay trusts to be the coordinator: used by `http` and by
        /// the revocation stream alike.
        tls: Arc<rustls::ClientConfig>,
        cache: Mutex<Cache>,
    },
}

impl Admission {
    /// Asks the coordinator at `url`, trusting the public roots plus
    /// `ca_pem` (a private CA) if given.
    pub fn coordinator(url: &str, token: String, ca_pem: Option<&str>) -> anyhow::Result<Self> {
        let tls = crate::tls::client_config(ca_pem)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .use_preconfigured_tls(Arc::unwrap_or_clone(tls.clone()))
            .build()
            .context("building the coordinator HTTP client")?;
        Ok(Admission::Coordinator {
            url: url.trim_end_matches('/').to_owned(),
            token,
            http,
            tls,
            cache: Mutex::new(Cache::default()),
        })
    }

    pub async fn check(&self, key: NodePublic) -> Verdict {
        let Admission::Coordinator {
            url,
            token,
            http,
            cache,
            ..
        } = self
        else {
            return Verdict::Admit;
        };
        let lock = || cache.lock().unwrap_or_else(|p| p.into_inner());
        let asked = Instant::now();
        if let Some(v) = lock().fresh(&key, asked) {
            return v;
        }
        let answer = match http
            .get(format!("{url}/api/v1/relay/admit/{key}"))
            .bearer_auth(token)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => Answer::Known,
            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => Answer::Unknown,
            Ok(r) => {
                tracing::warn!(status = %r.status(), "coordinator refused the admission check");
                Answer::NoAnswer
            }
            Err(e) => {
                tracing::warn!(error = %e, "coordinator unreachable for admission");
                Answer::NoAnswer
            }
        };
        lock().decide(key, answer, asked, Instant::now())
    }

    fn cache(&self) -> Option<std::sync::MutexGuard<'_, Cache>> {
        match self {
            Admission::Open => None,
            Admission::Coordinator { cache, .. } => {
                Some(cache.lock().unwrap_or_else(|p| p.into_inner()))
            }
        }
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
mod tests {
    use super::*;

    #[test]
    fn caching_and_outage_policy() {
        let t0 = Instant::now();
        let known = NodePublic::from_bytes([1; 32]);
        let stranger = NodePublic::from_bytes([2; 32]);
        let mut c = Cache::default();
        assert_eq!(c.fresh(&known, t0), None);
        assert_eq!(c.decide(known, Answer::Known, t0, t0), Verdict::Admit);
        assert_eq!(
            c.fresh(&known, t0 + Duration::from_secs(30)),
            Some(Verdict::Admit)
        );
        assert_eq!(
            c.fresh(&known, t0 + ALLOW_TTL),
            None,
            "re-asked after the TTL"
        );
        // Coordinator down: the known key keeps working for a while, then not.
        assert_eq!(
            c.decide(
                known,
                Answer::NoAnswer,
                t0 + Duration::from_secs(120),
                t0 + Duration::from_secs(120)
            ),
            Verdict::Admit
        );
        assert_eq!(
            c.decide(
                known,
                Answer::NoAnswer,
                t0 + STALE_ALLOW_LIMIT,
                t0 + STALE_ALLOW_LIMIT
            ),
            Verdict::Unavailable
        );
        // A key never admitted is refused while the coordinator is down.
        assert_eq!(
            c.decide(stranger, Answer::NoAnswer, t0, t0),
            Verdict::Unavailable
        );
        assert_eq!(c.decide(stranger, Answer::Unknown, t0, t0), Verdict::Deny);
        assert_eq!(
            c.fresh(&stranger, t0 + Duration::from_secs(1)),
            Some(Verdict::Deny)
        );
        assert_eq!(c.fresh(&stranger, t0 + DENY_TTL), None);
        // Revoked: the coordinator now says unknown.
        assert_eq!(
            c.decide(
                known,
                Answer::Unknown,
                t0 + Duration::from_secs(200),
                t0 + Duration::from_secs(200)
            ),
            Verdict::Deny
        );
    }

    #[test]
    fn revocations_deny_at_once_and_beat_older_answers() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let key = NodePublic::from_bytes([3; 32]);
        let mut c = Cache::default();
        assert_eq!(c.decide(key, Answer::Known, t0, t0), Verdict::Admit);
        c.revoke(key, t0 + ms(1000));
        assert_eq!(
            c.fresh(&key, t0 + ms(1000)),
            Some(Verdict::Deny),
            "no waiting for the admit TTL"
        );
        // Asked before the revocation, answered after: stale news.
        assert_eq!(
            c.decide(key, Answer::Known, t0 + ms(900), t0 + ms(1100)),
            Verdict::Deny
        );
        assert_eq!(c.fresh(&key, t0 + ms(1100)), Some(Verdict::Deny));
        // A coordinator outage does not bring a revoked key back.
        assert_eq!(
            c.decide(key, Answer::NoAnswer, t0 + ms(2000), t0 + ms(2000)),
            Verdict::Unavailable
        );
        // Asked again after the deny TTL: the coordinator has the last word.
        assert_eq!(c.fresh(&key, t0 + ms(1000) + DENY_TTL), None);
        assert_eq!(
            c.decide(key, Answer::Unknown, t0 + ms(7000), t0 + ms(7000)),
            Verdict::Deny
        );
        // A key never seen can be revoked too (it was admitted elsewhere).
        let other = NodePublic::from_bytes([4; 32]);
        c.revoke(other, t0);
        assert_eq!(c.fresh(&other, t0), Some(Verdict::Deny));
        // An answer to a later question wins over an older denial.
        assert_eq!(
            c.decide(other, Answer::Known, t0 + ms(1), t0 + ms(2)),
            Verdict::Admit
        );
    }

    #[test]
    fn clear_forgets_every_answer() {
        let t0 = Instant::now();
        let admitted = NodePublic::from_bytes([5; 32]);
        let refused = NodePublic::from_bytes([6; 32]);
        let mut c = Cache::default();
        c.decide(admitted, Answer::Known, t0, t0);
        c.decide(refused, Answer::Unknown, t0, t0);
        c.clear();
        assert_eq!(c.fresh(&admitted, t0), None, "asked again");
        assert_eq!(c.fresh(&refused, t0), None, "asked again");
        // Nothing vouches for the once-admitted key in an outage any more.
        assert_eq!(
            c.decide(admitted, Answer::NoAnswer, t0, t0),
            Verdict::Unavailable
        );
    }
}
