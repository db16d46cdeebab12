//! Revocations pushed by the coordinator: a revoked node key is denied and its
//! client evicted at once, instead of when the admission cache expires.
//!
//! The relay keeps `GET /api/v1/relay/revocations` (a WebSocket, one
//! [`RevocationMessage`] per frame) open for as long as it runs, reconnecting
//! with backoff. Each stream opens with `resync`, and the coordinator says it
//! again when the relay fell behind: the relay then cannot know which keys it
//! missed, so it forgets every cached admission and asks again about every
//! connected client. The coordinator is trusted exactly as for admission
//! checks (the `tls` of [`Admission::Coordinator`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::StreamExt as _;
use platform::api::{RevocationMessage, REVOCATION_KEEPALIVE_SECS};
use platform::keys::NodePublic;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::Connector;

use super::admission::{self, Admission};
use super::Relay;

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest wait for the coordinator to accept the stream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Silence after which the stream is presumed dead: three missed keepalives.
const SILENCE: Duration = Duration::from_secs(3 * REVOCATION_KEEPALIVE_SECS);

impl Relay {
    /// The coordinator revoked `key`: deny it from now on and evict its
    /// client, if one is connected here.
    pub fn revoke(&self, key: NodePublic) {
        // Denied first, looked up second: a client being admitted right now
        // checks the other way round (see `serve_conn`), so none slips through.
        self.cfg.admission.revoke(key, Instant::now());
        self.metrics.revocations.inc();
        if self.evict(key) {
            tracing::info!(node = %key.short(), "revoked client evicted");
        } else {
            tracing::debug!(node = %key.short(), "node key revoked");
        }
    }

    /// Ends the connection of the client with `key`; false when none is here.
    fn evict(&self, key: NodePublic) -> bool {
        self.clients()
            .get(key.as_bytes())
            .map(|c| c.evict.notify_one())
            .is_some()
    }

    /// Revocations may have been missed: forget every cached admission (then
    /// [`Relay::recheck_clients`]).
    pub fn resync(&self) {
        self.cfg.admission.clear();
        self.metrics.revocation_resyncs.inc();
    }

    /// Asks again about each connected client and evicts those now refused.
    pub async fn recheck_clients(self: Arc<Self>) {
        let Admission::Coordinator(coordinator) = &self.cfg.admission else {
            return;
        };
        let connected: Vec<NodePublic> = self
            .clients()
            .keys()
            .map(|k| NodePublic::from_bytes(*k))
            .collect();
        // Batch questions, one at a time: 20 for 10,000 clients, so a resync
        // of every relay after a coordinator restart is no burst. An
        // unanswered batch keeps its clients (as a coordinator outage would).
        for batch in connected.chunks(admission::BATCH) {
            let Some(refused) = coordinator.recheck(batch, &self.metrics).await else {
                continue;
            };
            for key in refused {
                if self.evict(key) {
                    tracing::info!(node = %key.short(), "client refused after resync, evicted");
                }
            }
        }
    }
}

/// Keeps the revocation stream open while the task lives; returns at once
/// when the relay does not ask a coordinator.
pub async fn run(relay: Arc<Relay>) {
    let Admission::Coordinator(coordinator) = &relay.cfg.admission else {
        return;
    };
    let (url, token, tls) = (&coordinator.url, &coordinator.token, &coordinator.tls);
    let stream_url = match stream_url(url) {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "no revocation stream");
            return;
        }
    };
    let mut backoff = FIRST_BACKOFF;
    loop {
        let tls = Connector::Rustls(tls.clone());
        let result = session(&relay, &stream_url, token, tls, &mut backoff).await;
        relay.metrics.revocation_stream_up.set(0);
        match result {
            Ok(()) => tracing::warn!("revocation stream closed by the coordinator"),
            Err(e) => tracing::warn!(error = format!("{e:#}"), "revocation stream down"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// `http[s]://coordinator` → `ws[s]://coordinator/api/v1/relay/revocations`.
fn stream_url(coordinator: &str) -> anyhow::Result<String> {
    let base = coordinator.trim_end_matches('/');
    let ws = if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        bail!("the coordinator URL must start with http:// or https://")
    };
    Ok(format!("{ws}/api/v1/relay/revocations"))
}

/// One stream, to its end. Resets `backoff` once the coordinator has spoken.
async fn session(
    relay: &Arc<Relay>,
    url: &str,
    token: &str,
    tls: Connector,
    backoff: &mut Duration,
) -> anyhow::Result<()> {
    let mut req = url.into_client_request().context("revocation stream URL")?;
    let mut auth =
        HeaderValue::from_str(&format!("Bearer {token}")).context("relay token is not a header")?;
    auth.set_sensitive(true);
    req.headers_mut().insert("authorization", auth);
    let connect = tokio_tungstenite::connect_async_tls_with_config(req, None, false, Some(tls));
    let (mut ws, _) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .context("coordinator did not answer")?
        .context("opening the revocation stream")?;
    // The latest resync's checks; a newer resync supersedes them.
    let mut recheck: Option<JoinHandle<()>> = None;
    loop {
        let msg = match tokio::time::timeout(SILENCE, ws.next()).await {
            Err(_) => bail!("no word from the coordinator in {} s", SILENCE.as_secs()),
            Ok(None) => return Ok(()),
            Ok(Some(msg)) => msg.context("reading the revocation stream")?,
        };
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(_) => return Ok(()),
            Message::Binary(_) => bail!("binary message on the revocation stream"),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
        };
        match serde_json::from_str::<RevocationMessage>(&text) {
            Ok(RevocationMessage::Revoked { node_key }) => relay.revoke(node_key),
            Ok(RevocationMessage::Resync) => {
                if relay.metrics.revocation_stream_up.set(1) == 0 {
                    tracing::info!("revocation stream open");
                    *backoff = FIRST_BACKOFF;
                }
                // Cleared here, in stream order, so no later revocation is
                // cleared with it.
                relay.resync();
                if let Some(old) = recheck.take() {
                    old.abort();
                }
                recheck = Some(tokio::spawn(relay.clone().recheck_clients()));
            }
            Ok(RevocationMessage::KeepAlive) => {}
            // A message kind from a newer coordinator: nothing to act on.
            Err(e) => tracing::debug!(error = %e, "unknown revocation stream message"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_urls() {
        assert_eq!(
            stream_url("http://10.0.0.1:8080/").unwrap(),
            "ws://10.0.0.1:8080/api/v1/relay/revocations"
        );
        assert_eq!(
            stream_url("https://coord.example").unwrap(),
            "wss://coord.example/api/v1/relay/revocations"
        );
        assert!(stream_url("coord.example").is_err());
    }
}
