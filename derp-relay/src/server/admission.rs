//! Who may use the relay: devices the coordinator knows.
//!
//! Answers are cached: admitted keys for [`ALLOW_TTL`], refused ones for
//! [`DENY_TTL`]. When the coordinator cannot be reached, a key admitted within
//! [`STALE_ALLOW_LIMIT`] is still admitted (devices keep working through a
//! coordinator outage) and any other key is refused: the relay never serves a
//! device it has no word on.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use platform::keys::NodePublic;

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

    /// Folds the coordinator's answer in and decides.
    pub fn decide(&mut self, key: NodePublic, answer: Answer, now: Instant) -> Verdict {
        match answer {
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
}

pub enum Admission {
    /// Everyone with a valid handshake (only for tests and closed labs).
    Open,
    Coordinator {
        url: String,
        token: String,
        http: reqwest::Client,
        cache: Mutex<Cache>,
    },
}

impl Admission {
    pub fn coordinator(url: &str, token: String) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .unwrap_or_default();
        Admission::Coordinator {
            url: url.trim_end_matches('/').to_owned(),
            token,
            http,
            cache: Mutex::new(Cache::default()),
        }
    }

    pub async fn check(&self, key: NodePublic) -> Verdict {
        let Admission::Coordinator {
            url,
            token,
            http,
            cache,
        } = self
        else {
            return Verdict::Admit;
        };
        let lock = || cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = lock().fresh(&key, Instant::now()) {
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
        lock().decide(key, answer, Instant::now())
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
        assert_eq!(c.decide(known, Answer::Known, t0), Verdict::Admit);
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
            c.decide(known, Answer::NoAnswer, t0 + Duration::from_secs(120)),
            Verdict::Admit
        );
        assert_eq!(
            c.decide(known, Answer::NoAnswer, t0 + STALE_ALLOW_LIMIT),
            Verdict::Unavailable
        );
        // A key never admitted is refused while the coordinator is down.
        assert_eq!(
            c.decide(stranger, Answer::NoAnswer, t0),
            Verdict::Unavailable
        );
        assert_eq!(c.decide(stranger, Answer::Unknown, t0), Verdict::Deny);
        assert_eq!(
            c.fresh(&stranger, t0 + Duration::from_secs(1)),
            Some(Verdict::Deny)
        );
        assert_eq!(c.fresh(&stranger, t0 + DENY_TTL), None);
        // Revoked: the coordinator now says unknown.
        assert_eq!(
            c.decide(known, Answer::Unknown, t0 + Duration::from_secs(200)),
            Verdict::Deny
        );
    }
}
