//! Relay client, used by meshd: keeps one connection to one relay open
//! (reconnecting with backoff), sends packets to node keys through it and
//! reports what arrives.

use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use x25519_dalek::StaticSecret;

use crate::io::{write_frame, FrameReader};
use crate::proto::frame::{Frame, GoneReason, Key, MAX_FRAME_PAYLOAD};
use crate::proto::handshake;
use crate::server::http::UPGRADE_PROTOCOL;

/// Packets waiting to go to the relay before new ones are dropped.
const SEND_QUEUE: usize = 1024;
/// Reconnects are quick: a restarted relay is back in use within seconds.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Longest HTTP response head accepted during the upgrade.
const MAX_RESPONSE_HEAD: usize = 8 * 1024;
/// Time to connect, upgrade and be admitted.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A keepalive goes to the relay after this long without another frame.
const KEEPALIVE: Duration = Duration::from_secs(10);
/// Nothing from the relay (which sends keepalives every 10 s) for this long:
/// the link is presumed dead and a new one is made.
const READ_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub enum RelayEvent {
    Connected,
    Disconnected { reason: String },
    Packet { src: Key, data: Vec<u8> },
    PeerGone { key: Key, reason: GoneReason },
}

/// A byte stream to a relay: plain TCP or TLS.
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// Where and how to reach a relay.
#[derive(Clone)]
pub struct RelayTarget {
    /// `http://host:port/derp`, or `https://…` for TLS.
    pub url: String,
    /// A private CA the relay's certificate chains to (PEM), trusted beside
    /// the public roots.
    pub ca_pem: Option<String>,
}

impl From<String> for RelayTarget {
    fn from(url: String) -> Self {
        RelayTarget { url, ca_pem: None }
    }
}

/// A live link to one relay; dropping it closes the connection.
pub struct RelayClient {
    tx: mpsc::Sender<(Key, Vec<u8>)>,
    task: JoinHandle<()>,
}

impl Drop for RelayClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RelayClient {
    /// Starts connecting to the relay at `url` (`http://host:port/derp`).
    /// `tag` comes back with every event, to tell relays apart.
    pub fn spawn<T: Clone + Send + Sync + 'static>(
        target: impl Into<RelayTarget>,
        node: StaticSecret,
        tag: T,
        events: mpsc::Sender<(T, RelayEvent)>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(SEND_QUEUE);
        let task = tokio::spawn(run(target.into(), node, tag, events, rx));
        RelayClient { tx, task }
    }

    /// Queues a packet for `dst`; false when the queue is full or the link
    /// is gone (the packet is dropped).
    pub fn send(&self, dst: Key, data: &[u8]) -> bool {
        data.len() + 32 <= MAX_FRAME_PAYLOAD && self.tx.try_send((dst, data.to_vec())).is_ok()
    }
}

async fn run<T: Clone + Send + Sync + 'static>(
    target: RelayTarget,
    node: StaticSecret,
    tag: T,
    events: mpsc::Sender<(T, RelayEvent)>,
    mut outgoing: mpsc::Receiver<(Key, Vec<u8>)>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let reason = match session(&target, &node, &tag, &events, &mut outgoing).await {
            Ok(()) => "closed".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        if events
            .send((tag.clone(), RelayEvent::Disconnected { reason }))
            .await
            .is_err()
        {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The `host:port` a relay URL connects to.
pub fn relay_authority(url: &str) -> anyhow::Result<String> {
    split_url(url).map(|(_, authority, _)| authority)
}

/// `http[s]://host:port/path` → (TLS?, `host:port`, `/path`).
fn split_url(url: &str) -> anyhow::Result<(bool, String, String)> {
    let (tls, rest) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
        (Some(rest), _) => (true, rest),
        (None, Some(rest)) => (false, rest),
        _ => bail!("relay URL must start with http:// or https://"),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/derp"),
    };
    let authority = if authority.contains(':') || authority.ends_with(']') {
        authority.to_owned()
    } else {
        format!("{authority}:{}", if tls { 443 } else { 80 })
    };
    Ok((tls, authority, path.to_owned()))
}

pub(crate) async fn connect(target: &RelayTarget) -> anyhow::Result<Box<dyn Conn>> {
    let (tls, authority, path) = split_url(&target.url)?;
    let tcp = TcpStream::connect(&authority)
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    tcp.set_nodelay(true)?;
    let mut stream: Box<dyn Conn> = if tls {
        let host = authority
            .rsplit_once(':')
            .map_or(authority.as_str(), |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name =
            rustls_pki_types::ServerName::try_from(host.to_owned()).context("relay host name")?;
        let connector =
            tokio_rustls::TlsConnector::from(crate::tls::client_config(target.ca_pem.as_deref())?);
        Box::new(
            connector
                .connect(name, tcp)
                .await
                .with_context(|| format!("TLS with {authority}"))?,
        )
    } else {
        Box::new(tcp)
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade\r\nUpgrade: {UPGRADE_PROTOCOL}\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await?;
    // Read the response head byte by byte so no frame byte is consumed.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > MAX_RESPONSE_HEAD {
            bail!("relay response head too long");
        }
        let b = stream
            .read_u8()
            .await
            .context("reading the relay's upgrade response")?;
        head.push(b);
    }
    let status = String::from_utf8_lossy(&head);
    if !status.starts_with("HTTP/1.1 101") {
        bail!(
            "relay refused the upgrade: {}",
            status.lines().next().unwrap_or("")
        );
    }
    Ok(stream)
}

async fn session<T: Clone + Send + Sync>(
    target: &RelayTarget,
    node: &StaticSecret,
    tag: &T,
    events: &mpsc::Sender<(T, RelayEvent)>,
    outgoing: &mut mpsc::Receiver<(Key, Vec<u8>)>,
) -> anyhow::Result<()> {
    let handshake = async {
        let stream = connect(target).await?;
        let (read, mut write) = tokio::io::split(stream);
        let mut reader = FrameReader::new(read);
        let mut scratch = Vec::new();
        let (relay_key, challenge) = match reader.next().await? {
            Some(Frame::ServerKey { key, challenge }) => (key, challenge),
            other => bail!("expected the relay's key, got {other:?}"),
        };
        write_frame(
            &mut write,
            &handshake::seal(node, &relay_key, &challenge, None)?,
            &mut scratch,
        )
        .await?;
        match reader.next().await? {
            Some(Frame::ServerInfo) => {}
            Some(Frame::Close { reason }) => bail!("relay refused us: {reason}"),
            other => bail!("expected admission, got {other:?}"),
        }
        Ok((reader, write, scratch))
    };
    let (mut reader, mut write, mut scratch) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .context("the relay did not admit us in time")??;
    events.send((tag.clone(), RelayEvent::Connected)).await.ok();
    let mut idle = Box::pin(tokio::time::sleep(KEEPALIVE));
    let mut deadline = Box::pin(tokio::time::sleep(READ_DEADLINE));
    loop {
        let frame = tokio::select! {
            out = outgoing.recv() => {
                let Some((dst, data)) = out else { return Ok(()) };
                send(&mut write, &Frame::SendPacket { dst, data }, &mut scratch).await?;
                idle.as_mut().reset(tokio::time::Instant::now() + KEEPALIVE);
                continue;
            }
            () = &mut idle => {
                send(&mut write, &Frame::KeepAlive, &mut scratch).await?;
                idle.as_mut().reset(tokio::time::Instant::now() + KEEPALIVE);
                continue;
            }
            () = &mut deadline => {
                bail!("nothing from the relay in {} s", READ_DEADLINE.as_secs())
            }
            frame = reader.next() => frame?,
        };
        deadline
            .as_mut()
            .reset(tokio::time::Instant::now() + READ_DEADLINE);
        let event = match frame {
            None => return Ok(()),
            Some(Frame::RecvPacket { src, data }) => RelayEvent::Packet { src, data },
            Some(Frame::PeerGone { key, reason }) => RelayEvent::PeerGone { key, reason },
            Some(Frame::Ping(d)) => {
                send(&mut write, &Frame::Pong(d), &mut scratch).await?;
                continue;
            }
            Some(Frame::Close { reason }) => bail!("relay closed the connection: {reason}"),
            Some(_) => continue,
        };
        if events.send((tag.clone(), event)).await.is_err() {
            return Ok(());
        }
    }
}

/// Writes one frame; a relay that takes longer than the read deadline to
/// accept it is presumed gone.
async fn send<W: AsyncWrite + Unpin>(
    write: &mut W,
    frame: &Frame,
    scratch: &mut Vec<u8>,
) -> anyhow::Result<()> {
    tokio::time::timeout(READ_DEADLINE, write_frame(write, frame, scratch))
        .await
        .context("the relay stopped reading")?
        .context("writing to the relay")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            split_url("http://10.0.0.1:3340/derp").unwrap(),
            (false, "10.0.0.1:3340".into(), "/derp".into())
        );
        assert_eq!(
            split_url("http://relay").unwrap(),
            (false, "relay:80".into(), "/derp".into())
        );
        assert_eq!(
            split_url("https://relay.example/derp").unwrap(),
            (true, "relay.example:443".into(), "/derp".into())
        );
        assert!(split_url("ftp://x").is_err());
    }
}
