//! Relays of one region mesh: each opens a link to every other (proving the
//! shared mesh key), announces its clients over it, and forwards packets for
//! the others' clients one hop.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::{encoded, Relay, BULK_QUEUE};
use crate::io::{write_frame, FrameReader};
use crate::proto::frame::Frame;
use crate::proto::handshake;

const RETRY: Duration = Duration::from_secs(1);

/// Constant-time comparison of two mesh keys (through their hashes, so the
/// lengths leak nothing either).
pub fn keys_match(a: &str, b: &str) -> bool {
    let (ha, hb) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    ha.iter()
        .zip(hb.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Keeps a link to the relay at `url` open for as long as the task lives.
pub async fn run_link(relay: Arc<Relay>, target: crate::client::RelayTarget) {
    loop {
        if let Err(e) = link(&relay, &target).await {
            tracing::warn!(url = %target.url, error = format!("{e:#}"), "mesh link down");
        }
        tokio::time::sleep(RETRY).await;
    }
}

async fn link(relay: &Arc<Relay>, target: &crate::client::RelayTarget) -> anyhow::Result<()> {
    let Some(mesh_key) = relay.cfg.mesh_key.clone() else {
        bail!("no mesh key configured")
    };
    let stream = crate::client::connect(target).await?;
    let (read, mut write) = tokio::io::split(stream);
    let mut reader = FrameReader::new(read);
    let mut scratch = Vec::new();
    let (peer, challenge) = match reader.next().await? {
        Some(Frame::ServerKey { key, challenge }) => (key, challenge),
        other => bail!("expected the relay's key, got {other:?}"),
    };
    write_frame(
        &mut write,
        &handshake::seal(&relay.cfg.private, &peer, &challenge, Some(mesh_key))?,
        &mut scratch,
    )
    .await?;
    match reader.next().await? {
        Some(Frame::ServerInfo) => {}
        Some(Frame::Close { reason }) => bail!("mesh peer refused us: {reason}"),
        other => bail!("expected admission, got {other:?}"),
    }
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(BULK_QUEUE);
    let id = relay.next_conn.fetch_add(1, Ordering::Relaxed);
    // Announce every current client, then keep the peer up to date.
    let present: Vec<_> = relay.clients().keys().copied().collect();
    for key in present {
        let _ = tx.try_send(encoded(&Frame::PeerPresent { key }));
    }
    relay.mesh_links().insert(peer, (id, tx));
    tracing::info!(url = %target.url, "mesh link up");
    let result = async {
        loop {
            tokio::select! {
                out = rx.recv() => {
                    let Some(bytes) = out else { return Ok(()) };
                    tokio::io::AsyncWriteExt::write_all(&mut write, &bytes).await?;
                }
                frame = reader.next() => match frame? {
                    None => return Ok(()),
                    Some(Frame::Ping(d)) => write_frame(&mut write, &Frame::Pong(d), &mut scratch).await?,
                    Some(_) => {}
                },
            }
        }
    }
    .await;
    let mut links = relay.mesh_links();
    if links.get(&peer).is_some_and(|(i, _)| *i == id) {
        links.remove(&peer);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_keys_compare_whole() {
        assert!(keys_match("secret", "secret"));
        assert!(!keys_match("secret", "secreT"));
        assert!(!keys_match("secret", "secret "));
        assert!(!keys_match("", "x"));
    }
}
