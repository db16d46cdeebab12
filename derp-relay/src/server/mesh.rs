//! Relays of one region mesh: each opens a link to every other (proving the
//! shared mesh key), announces its clients over it, and forwards packets for
//! the others' clients one hop.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use sha2::{Digest, Sha256};

use super::outbox::{outbox, write_loop, Lane};
use super::{encoded, Relay};
use crate::client::RelayTarget;
use crate::io::{write_frame, FrameReader};
use crate::proto::frame::{Frame, Key};
use crate::proto::handshake;

const RETRY: Duration = Duration::from_secs(1);

/// Constant-time comparison of two mesh keys (through their hashes, so the
/// lengths leak nothing either).
pub fn keys_match(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    let (ha, hb) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    ha.as_slice().ct_eq(hb.as_slice()).into()
}

/// Another relay of the region: where it is and the public key it must
/// present. The mesh key is sealed to that key only, so a man in the middle
/// of a plain-TCP link (or a host that took over the name) never sees it.
#[derive(Clone)]
pub struct MeshPeer {
    pub target: RelayTarget,
    pub key: Key,
}

impl MeshPeer {
    /// `<relay key, hex>@<url>`, as `--mesh-with` takes it.
    pub fn parse(spec: &str) -> anyhow::Result<Self> {
        let (key, url) = spec
            .split_once('@')
            .context("a mesh peer is <relay key>@<url>")?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(key, &mut bytes)
            .context("a mesh peer's relay key is 64 hex digits")?;
        crate::client::relay_authority(url)?;
        Ok(MeshPeer {
            target: RelayTarget {
                url: url.to_owned(),
                ca_pem: None,
            },
            key: bytes,
        })
    }
}

/// Keeps a link to `peer` open for as long as the task lives.
pub async fn run_link(relay: Arc<Relay>, peer: MeshPeer) {
    loop {
        if let Err(e) = link(&relay, &peer).await {
            tracing::warn!(url = %peer.target.url, error = format!("{e:#}"), "mesh link down");
        }
        tokio::time::sleep(RETRY).await;
    }
}

async fn link(relay: &Arc<Relay>, peer: &MeshPeer) -> anyhow::Result<()> {
    let Some(mesh_key) = relay.cfg.mesh_key.clone() else {
        bail!("no mesh key configured")
    };
    let limits = relay.cfg.limits;
    let stream = tokio::time::timeout(
        limits.handshake_timeout,
        crate::client::connect(&peer.target),
    )
    .await
    .context("connecting timed out")??;
    let (read, mut write) = tokio::io::split(stream);
    let mut reader = FrameReader::new(read);
    let mut scratch = Vec::new();
    let hello = tokio::time::timeout(limits.handshake_timeout, async {
        let challenge = match reader.next().await? {
            Some(Frame::ServerKey { key, challenge }) if key == peer.key => challenge,
            Some(Frame::ServerKey { key, .. }) => {
                relay.metrics.mesh_key_mismatches.inc();
                bail!(
                    "the relay presented key {}, not the configured {}; the mesh key is not sent",
                    hex::encode(key),
                    hex::encode(peer.key)
                )
            }
            other => bail!("expected the relay's key, got {other:?}"),
        };
        let info = handshake::seal(&relay.cfg.private, &peer.key, &challenge, Some(mesh_key))?;
        write_frame(&mut write, &info, &mut scratch).await?;
        match reader.next().await? {
            Some(Frame::ServerInfo) => Ok::<(), anyhow::Error>(()),
            Some(Frame::Close { reason }) => bail!("mesh peer refused us: {reason}"),
            other => bail!("expected admission, got {other:?}"),
        }
    });
    hello.await.context("mesh handshake timed out")??;
    let (out, inbox) = outbox(limits.queue_bytes);
    let id = relay.next_conn.fetch_add(1, Ordering::Relaxed);
    // Announce every current client, then keep the peer up to date.
    let present: Vec<_> = relay
        .clients()
        .iter()
        .map(|(key, c)| (*key, c.network))
        .collect();
    for (key, network) in present {
        out.push(&encoded(&Frame::PeerPresent { key, network }), Lane::Disco);
    }
    relay.mesh_links().insert(peer.key, (id, out.clone()));
    tracing::info!(url = %peer.target.url, "mesh link up");
    let mut writer = tokio::spawn({
        let relay = relay.clone();
        async move { write_loop(&relay.metrics, write, inbox, limits.writer()).await }
    });
    let result = async {
        loop {
            tokio::select! {
                _ = &mut writer => bail!("the mesh peer stopped reading"),
                frame = tokio::time::timeout(limits.idle_timeout, reader.next()) => match frame {
                    Err(_) => bail!("nothing from the mesh peer in {:?}", limits.idle_timeout),
                    Ok(frame) => match frame? {
                        None => return Ok(()),
                        Some(Frame::Ping(d)) => {
                            out.push(&encoded(&Frame::Pong(d)), Lane::Disco);
                        }
                        Some(_) => {}
                    },
                },
            }
        }
    }
    .await;
    {
        let mut links = relay.mesh_links();
        if links.get(&peer.key).is_some_and(|(i, _)| *i == id) {
            links.remove(&peer.key);
        }
    }
    writer.abort();
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

    #[test]
    fn mesh_peers_name_their_key() {
        let key = "ab".repeat(32);
        let p = MeshPeer::parse(&format!("{key}@http://relay2:3340/derp")).unwrap();
        assert_eq!(p.key, [0xab; 32]);
        assert_eq!(p.target.url, "http://relay2:3340/derp");
        assert!(
            MeshPeer::parse("http://relay2:3340/derp").is_err(),
            "no key"
        );
        assert!(MeshPeer::parse("abcd@http://relay2:3340/derp").is_err());
        assert!(MeshPeer::parse(&format!("{key}@relay2:3340")).is_err());
    }
}
