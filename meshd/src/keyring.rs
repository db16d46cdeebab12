//! This device's keys as they change at run time: node-key rotation in a
//! crash-safe order of writes, and a watch through which the map stream
//! (and, through it, the engine) learns of a new node key.
//!
//! Rotation order: (1) the new key is written to `keys.json` as *pending*,
//! beside the current one; (2) the coordinator is asked to switch; (3) on
//! its yes the new key is written as current (pending cleared) and
//! published; on a definite no (4xx) the pending key is dropped. When the
//! answer is lost (no answer, 5xx), or the daemon dies between (2) and (3),
//! the coordinator holds one of the two keys and nobody here knows which:
//! the pending key stays, and the next map stream hello settles it — the
//! current key is tried, the pending one if the coordinator refuses that,
//! and the accepted one becomes current ([`KeyRing::settle`]). So a key is
//! never forgotten while the coordinator may hold it, and the old key is
//! never dropped before the coordinator confirmed the new one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use platform::control_auth::{node_proof, ProofPurpose};
use platform::keys::{CoordinatorPublic, NodePrivate, NodePublic, ProofPublic};
use platform::people::RotateKeyResponse;
use platform::signed::{Signed, DOMAIN_ROTATE};
use platform::unix_now;
use tokio::sync::watch;

use crate::control::{self, CoordinatorError, MapState};
use crate::key_expiry::renew_at;
use crate::state::{Keys, StateDir};

/// First wait after a failed renewal; doubles up to the maximum.
const RETRY_FIRST: Duration = Duration::from_secs(30);
const RETRY_MAX: Duration = Duration::from_secs(3600);
/// Longest sleep between looks at the clock (it may jump).
const RECHECK: Duration = Duration::from_secs(3600);

/// Why a rotation did not happen, or may not have.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("an earlier rotation is not settled yet; it settles when the map stream reconnects")]
    Unsettled,
    #[error("storing the new node key: {0:#}")]
    Store(anyhow::Error),
    /// The coordinator did not switch; the current key stays.
    #[error("{0}")]
    Failed(CoordinatorError),
    /// The coordinator may or may not hold the new key; the map stream
    /// reconnects to find out.
    #[error("outcome unknown ({0}); the map stream reconnects to settle it")]
    Unknown(String),
}

pub struct KeyRing {
    state: StateDir,
    current: watch::Sender<Arc<Keys>>,
    /// One rotation at a time.
    rotating: tokio::sync::Mutex<()>,
    /// The expiry the coordinator gave with the key of the last rotation
    /// (the map stream patches its netmap with it: the coordinator does not
    /// send a device its own record).
    rotated_expiry: Mutex<Option<(NodePublic, Option<u64>)>>,
}

impl KeyRing {
    pub fn new(state: StateDir, keys: Keys) -> Self {
        KeyRing {
            state,
            current: watch::channel(Arc::new(keys)).0,
            rotating: tokio::sync::Mutex::new(()),
            rotated_expiry: Mutex::new(None),
        }
    }

    pub fn current(&self) -> Arc<Keys> {
        self.current.borrow().clone()
    }

    /// Every change of the node key (or of its pending successor).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Keys>> {
        self.current.subscribe()
    }

    /// Writes `next` to disk, then publishes it. A failed write is logged and
    /// the change still published when `publish_anyway` (the coordinator
    /// already holds the new key: running on the old one would lock the
    /// device out, and the pending key left on disk settles at next start).
    fn commit(&self, next: Keys, publish_anyway: bool) -> anyhow::Result<()> {
        let written = self.state.save_keys(&next);
        if written.is_ok() || publish_anyway {
            if let Err(e) = &written {
                tracing::error!(
                    error = format!("{e:#}"),
                    "writing keys.json; settles at the next start"
                );
            }
            self.current.send_replace(Arc::new(next));
        }
        written
    }

    /// The coordinator accepted the current node key in a registration just
    /// now: it is fresh, and no pending key can be held any more.
    pub fn registered(&self, now: u64) -> anyhow::Result<()> {
        let mut next = (*self.current()).clone();
        next.pending_node = None;
        next.node_obtained_at = Some(now);
        self.commit(next, false)
    }

    /// Replaces the node key at the coordinator. On success the new key is
    /// current (on disk and in the watch) when this returns.
    pub async fn rotate(
        &self,
        http: &reqwest::Client,
        coordinator: &str,
        proof_key: &ProofPublic,
    ) -> Result<RotateKeyResponse, RotateError> {
        let _one = self.rotating.lock().await;
        let keys = self.current();
        if keys.pending_node.is_some() {
            return Err(RotateError::Unsettled);
        }
        let new = NodePrivate::generate();
        let mut pending = (*keys).clone();
        pending.pending_node = Some(new.clone());
        self.state
            .save_keys(&pending)
            .context("writing the pending key")
            .map_err(RotateError::Store)?;
        let timestamp = unix_now();
        let node_proof = node_proof(
            ProofPurpose::RotateKey,
            &new,
            proof_key,
            &keys.device.public(),
            timestamp,
        )
        .ok_or_else(|| {
            RotateError::Store(anyhow::anyhow!("the coordinator's proof key is unusable"))
        })?;
        let req = platform::people::RotateKeyRequest {
            timestamp,
            old_node_key: keys.node.public(),
            new_node_key: new.public(),
            node_proof,
        };
        let body = Signed::sign(&keys.device, DOMAIN_ROTATE, &req);
        let answer: Result<RotateKeyResponse, _> =
            control::post_signed(http, coordinator, "/api/v1/rotate-key", &body).await;
        match answer {
            Ok(resp) if resp.node_key == new.public() => {
                tracing::info!(old = %keys.node.public().short(), new = %new.public().short(), "node key rotated");
                *self
                    .rotated_expiry
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some((resp.node_key, resp.key_expiry));
                let mut next = (*keys).clone();
                next.node = new;
                next.pending_node = None;
                next.node_obtained_at = Some(unix_now());
                // Published even if the write fails: see `commit`.
                let _ = self.commit(next, true);
                Ok(resp)
            }
            Ok(resp) => {
                self.current.send_replace(Arc::new(pending));
                Err(RotateError::Unknown(format!(
                    "the coordinator answered with key {}",
                    resp.node_key.short()
                )))
            }
            Err(e) if e.not_acted_on() => {
                // The pending key is harmless if this write fails: the next
                // hello finds the current key accepted and drops it.
                if let Err(w) = self.state.save_keys(&keys) {
                    tracing::warn!(error = format!("{w:#}"), "dropping the refused pending key");
                }
                Err(RotateError::Failed(e))
            }
            Err(e) => {
                self.current.send_replace(Arc::new(pending));
                Err(RotateError::Unknown(e.to_string()))
            }
        }
    }

    /// [`KeyRing::rotate`] with the coordinator's HTTP client, against the
    /// pinned coordinator.
    pub async fn rotate_at(
        &self,
        coordinator: &str,
        ca_file: Option<&Path>,
        pin: &CoordinatorPublic,
    ) -> anyhow::Result<RotateKeyResponse> {
        let http = control::coordinator_http(ca_file)?;
        let info = control::coordinator_info(&http, coordinator, Some(pin)).await?;
        Ok(self.rotate(&http, coordinator, &info.proof_key).await?)
    }

    /// The node key's expiry as far as this daemon knows: from the netmap
    /// when it describes the current key, else from the rotation that made
    /// it. `None` when unknown or never.
    pub fn expiry(&self, map: &MapState) -> Option<u64> {
        let node = self.current().node.public();
        match &map.netmap {
            Some(m) if m.self_node.node_key == node => m.self_node.key_expiry,
            _ => self.rotated_expiry(&node).flatten(),
        }
    }

    /// The keys a map stream hello should try, in order: the current one,
    /// then a pending one.
    pub fn hello_candidates(&self) -> Vec<NodePrivate> {
        let keys = self.current();
        std::iter::once(keys.node.clone())
            .chain(keys.pending_node.clone())
            .collect()
    }

    /// The coordinator accepted `accepted` in a map stream hello: a pending
    /// key is promoted (it took the rotation) or dropped (it did not).
    pub fn settle(&self, accepted: &NodePublic) -> anyhow::Result<()> {
        let keys = self.current();
        let Some(pending) = &keys.pending_node else {
            return Ok(());
        };
        let mut next = (*keys).clone();
        next.pending_node = None;
        if pending.public() == *accepted {
            tracing::info!(node = %accepted.short(), "the coordinator took the pending node key");
            next.node = pending.clone();
            next.node_obtained_at = Some(unix_now());
            self.commit(next, true)
        } else if keys.node.public() == *accepted {
            tracing::info!("the coordinator kept the node key; pending key dropped");
            self.commit(next, false)
        } else {
            Ok(())
        }
    }

    /// The expiry the coordinator gave for `key` when this daemon rotated
    /// to it (`Some(None)`: never expires); `None` when unknown.
    pub fn rotated_expiry(&self, key: &NodePublic) -> Option<Option<u64>> {
        self.rotated_expiry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .filter(|(k, _)| k == key)
            .map(|(_, e)| e)
    }
}

/// Renews the node key while the map stream is up: when [`renew_at`] says
/// it is time, and when the coordinator asks (an admin rotated the
/// network's keys). Failures are retried with backoff. Runs for as long as
/// the session does.
pub async fn keep_renewed(
    keys: Arc<KeyRing>,
    coordinator: String,
    ca_file: Option<PathBuf>,
    pin: CoordinatorPublic,
    mut map: watch::Receiver<MapState>,
) {
    let mut answered = map.borrow().rotate_requests;
    let mut retry: Option<(tokio::time::Instant, Duration)> = None;
    loop {
        let (connected, expiry, requests) = {
            let m = map.borrow_and_update();
            (m.connected, keys.expiry(&m), m.rotate_requests)
        };
        let now = unix_now();
        let due_at = renew_at(keys.current().node_obtained_at, expiry);
        let backing_off = retry.is_some_and(|(at, _)| tokio::time::Instant::now() < at);
        let asked = requests > answered;
        if connected && !backing_off && (asked || due_at.is_some_and(|t| t <= now)) {
            answered = requests;
            let why = if asked {
                "the coordinator asked"
            } else {
                "expiry near"
            };
            tracing::info!(why, "renewing the node key");
            match keys.rotate_at(&coordinator, ca_file.as_deref(), &pin).await {
                Ok(_) => retry = None,
                Err(e) => {
                    let gap = retry.map_or(RETRY_FIRST, |(_, g)| (g * 2).min(RETRY_MAX));
                    tracing::warn!(error = format!("{e:#}"), retry_in = ?gap, "renewing the node key");
                    retry = Some((tokio::time::Instant::now() + gap, gap));
                }
            }
            continue;
        }
        let wait = match (retry, connected, due_at) {
            (Some((at, _)), _, _) if backing_off => {
                at.saturating_duration_since(tokio::time::Instant::now())
            }
            (_, true, Some(t)) => Duration::from_secs(t.saturating_sub(now)).min(RECHECK),
            _ => RECHECK,
        };
        tokio::select! {
            changed = map.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use axum::routing::post;
    use axum::{Json, Router};
    use platform::people::RotateKeyRequest;

    /// A coordinator whose rotate-key answers with `status` (and the key
    /// asked for on 200).
    async fn coordinator(status: StatusCode) -> String {
        let app = Router::new().route(
            "/api/v1/rotate-key",
            post(move |Json(body): Json<Signed>| async move {
                let req: RotateKeyRequest = body
                    .verify(DOMAIN_ROTATE, unix_now())
                    .expect("signed by the device");
                if status == StatusCode::OK {
                    let resp = RotateKeyResponse {
                        node_key: req.new_node_key,
                        key_expiry: Some(123),
                    };
                    (status, serde_json::to_string(&resp).unwrap())
                } else {
                    (
                        status,
                        r#"{"error":{"code":"x","message":"no"}}"#.to_owned(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    fn proof_key() -> ProofPublic {
        platform::keys::ProofPrivate::generate().public()
    }

    fn ring() -> (tempfile::TempDir, StateDir, KeyRing) {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let keys = state.keys().unwrap();
        let ring = KeyRing::new(state.clone(), keys);
        (dir, state, ring)
    }

    #[tokio::test]
    async fn accepted_rotation_is_stored_then_published() {
        let (_dir, state, ring) = ring();
        let old = ring.current().node.public();
        let mut watch = ring.subscribe();
        let url = coordinator(StatusCode::OK).await;
        let resp = ring
            .rotate(&reqwest::Client::new(), &url, &proof_key())
            .await
            .unwrap();
        let now = ring.current();
        assert_eq!(now.node.public(), resp.node_key);
        assert_ne!(now.node.public(), old);
        assert!(now.pending_node.is_none());
        assert!(now.node_obtained_at.is_some());
        assert!(watch.has_changed().unwrap());
        assert_eq!(watch.borrow_and_update().node.public(), resp.node_key);
        let disk = state.keys().unwrap();
        assert_eq!(disk.node.public(), resp.node_key);
        assert!(disk.pending_node.is_none());
        assert_eq!(ring.rotated_expiry(&resp.node_key), Some(Some(123)));
        assert_eq!(ring.rotated_expiry(&old), None);
    }

    #[tokio::test]
    async fn refused_rotation_keeps_the_old_key_only() {
        let (_dir, state, ring) = ring();
        let old = ring.current().node.public();
        let url = coordinator(StatusCode::FORBIDDEN).await;
        let err = ring
            .rotate(&reqwest::Client::new(), &url, &proof_key())
            .await
            .unwrap_err();
        assert!(matches!(err, RotateError::Failed(_)), "{err}");
        assert_eq!(ring.current().node.public(), old);
        let disk = state.keys().unwrap();
        assert_eq!(disk.node.public(), old);
        assert!(disk.pending_node.is_none());
        assert_eq!(ring.hello_candidates().len(), 1);
    }

    #[tokio::test]
    async fn lost_answer_keeps_both_keys_until_a_hello_settles_it() {
        for (coordinator_took_it, status) in [
            (true, StatusCode::INTERNAL_SERVER_ERROR),
            (false, StatusCode::BAD_GATEWAY),
        ] {
            let (_dir, state, ring) = ring();
            let old = ring.current().node.public();
            let url = coordinator(status).await;
            let err = ring
                .rotate(&reqwest::Client::new(), &url, &proof_key())
                .await
                .unwrap_err();
            assert!(matches!(err, RotateError::Unknown(_)), "{err}");
            let candidates = ring.hello_candidates();
            assert_eq!(candidates.len(), 2);
            assert_eq!(candidates[0].public(), old, "current key first");
            let pending = candidates[1].public();
            // A restart in between finds both on disk.
            let disk = state.keys().unwrap();
            assert_eq!(disk.pending_node.map(|k| k.public()), Some(pending));
            // No second rotation on top of an unsettled one.
            assert!(matches!(
                ring.rotate(&reqwest::Client::new(), &url, &proof_key())
                    .await,
                Err(RotateError::Unsettled)
            ));

            let accepted = if coordinator_took_it { pending } else { old };
            ring.settle(&accepted).unwrap();
            assert_eq!(ring.current().node.public(), accepted);
            assert!(ring.current().pending_node.is_none());
            let disk = state.keys().unwrap();
            assert_eq!(disk.node.public(), accepted);
            assert!(disk.pending_node.is_none());
        }
    }

    #[tokio::test]
    async fn unreachable_coordinator_changes_nothing() {
        let (_dir, state, ring) = ring();
        // Nothing listens on port 9 of localhost: the request never left.
        let err = ring
            .rotate(&reqwest::Client::new(), "http://127.0.0.1:9", &proof_key())
            .await
            .unwrap_err();
        assert!(matches!(err, RotateError::Failed(_)), "{err}");
        assert_eq!(ring.hello_candidates().len(), 1);
        assert!(state.keys().unwrap().pending_node.is_none());
    }
}
