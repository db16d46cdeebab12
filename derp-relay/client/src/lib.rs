//! Relay client, used by meshd (and by relays meshing with each other):
//! keeps one connection to one relay open (reconnecting with backoff),
//! sends packets to node keys through it and reports what arrives.
#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, Context as _};
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::header;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use url::{Host, Url};
use x25519_dalek::StaticSecret;

use derp_proto::frame::{Frame, GoneReason, Key, MAX_FRAME_PAYLOAD};
use derp_proto::handshake;
use derp_proto::io::{write_frame, FrameReader};
use derp_proto::UPGRADE_PROTOCOL;

/// Packets waiting to go to the relay before new ones are dropped.
const SEND_QUEUE: usize = 1024;
/// Queued packets are written together up to about this many bytes.
const MAX_BATCH: usize = 64 * 1024;
/// Reconnects are quick: a restarted relay is back in use within seconds.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Largest HTTP response head accepted during the upgrade (hyper's smallest
/// buffer limit).
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

/// A byte stream to a relay (plain TCP or TLS underneath).
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
    RelayUrl::parse(url).map(|u| u.authority())
}

/// A relay URL taken apart: `http[s]://host[:port][/path]`.
#[derive(Debug, PartialEq, Eq)]
struct RelayUrl {
    tls: bool,
    host: Host,
    /// The scheme's port unless the URL names one.
    port: u16,
    /// Path and query of the upgrade request; `/derp` when the URL has none.
    path: String,
}

impl RelayUrl {
    fn parse(url: &str) -> anyhow::Result<Self> {
        let parsed = Url::parse(url).with_context(|| format!("relay URL {url:?}"))?;
        let tls = match parsed.scheme() {
            "https" => true,
            "http" => false,
            _ => bail!("relay URL must start with http:// or https://"),
        };
        let host = parsed
            .host()
            .with_context(|| format!("relay URL {url:?} names no host"))?
            .to_owned();
        let port = parsed
            .port_or_known_default()
            .with_context(|| format!("relay URL {url:?} has no port"))?;
        let path = match (parsed.path(), parsed.query()) {
            ("/", None) => "/derp".to_owned(),
            (path, None) => path.to_owned(),
            (path, Some(query)) => format!("{path}?{query}"),
        };
        Ok(RelayUrl {
            tls,
            host,
            port,
            path,
        })
    }

    /// `host:port`, IPv6 addresses in brackets: what TCP connects to and
    /// the `Host` header names.
    fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The name the relay's certificate must carry.
    fn server_name(&self) -> anyhow::Result<ServerName<'static>> {
        Ok(match &self.host {
            Host::Domain(name) => ServerName::try_from(name.clone()).context("relay host name")?,
            Host::Ipv4(ip) => ServerName::from(IpAddr::V4(*ip)),
            Host::Ipv6(ip) => ServerName::from(IpAddr::V6(*ip)),
        })
    }
}

/// Connects to the relay at `target` (over TLS for `https://`) and upgrades
/// the connection to the relay protocol; what comes back carries frames.
pub async fn connect(target: &RelayTarget) -> anyhow::Result<Box<dyn Conn>> {
    let url = RelayUrl::parse(&target.url)?;
    let authority = url.authority();
    let tcp = TcpStream::connect(&authority)
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    tcp.set_nodelay(true)?;
    let request = Request::get(url.path.as_str())
        .header(header::HOST, authority.as_str())
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, UPGRADE_PROTOCOL)
        .body(Empty::new())
        .context("the upgrade request")?;
    if !url.tls {
        return upgrade(tcp, request).await;
    }
    let connector = tokio_rustls::TlsConnector::from(tls_config(target.ca_pem.as_deref())?);
    let tls = connector
        .connect(url.server_name()?, tcp)
        .await
        .with_context(|| format!("TLS with {authority}"))?;
    upgrade(tls, request).await
}

/// TLS client configuration for relays: the public roots, plus
/// `extra_ca_pem` (a private CA) if given.
pub fn tls_config(
    extra_ca_pem: Option<&str>,
) -> anyhow::Result<std::sync::Arc<tokio_rustls::rustls::ClientConfig>> {
    platform::tls::client_config(extra_ca_pem.map(str::as_bytes)).context("the relay CA PEM")
}

/// Sends the upgrade `request` over `stream`; the relay's `101` turns it
/// into the relay connection. Bytes the relay sent after its response head
/// stay in the upgraded stream.
async fn upgrade<S: Conn + 'static>(
    stream: S,
    request: Request<Empty<Bytes>>,
) -> anyhow::Result<Box<dyn Conn>> {
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_RESPONSE_HEAD)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .context("HTTP with the relay")?;
    // The connection is driven here, beside the request, so that all of it
    // ends with this future. It finishes by itself once it hands the stream
    // over for the upgrade; if the relay closes it instead, the request fails.
    let mut conn = std::pin::pin!(conn.with_upgrades());
    let mut send = std::pin::pin!(sender.send_request(request));
    let mut handed_over = false;
    let response = loop {
        tokio::select! {
            response = send.as_mut() => {
                break response.context("reading the relay's upgrade response")?;
            }
            ended = conn.as_mut(), if !handed_over => {
                ended.context("HTTP with the relay")?;
                handed_over = true;
            }
        }
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        bail!("relay refused the upgrade: {}", response.status());
    }
    if !handed_over {
        conn.await.context("HTTP with the relay")?;
    }
    let upgraded = hyper::upgrade::on(response)
        .await
        .context("upgrading the relay connection")?;
    Ok(Box::new(TokioIo::new(upgraded)))
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
                // Whatever else is already queued goes in the same write:
                // many frames per system call under load, no wait when idle.
                scratch.clear();
                Frame::encode_send_packet(&dst, &data, &mut scratch);
                while scratch.len() < MAX_BATCH {
                    let Ok((dst, data)) = outgoing.try_recv() else { break };
                    Frame::encode_send_packet(&dst, &data, &mut scratch);
                }
                write_all(&mut write, &scratch).await?;
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

/// Writes encoded frames; a relay that takes longer than the read deadline
/// to accept them is presumed gone.
async fn write_all<W: AsyncWrite + Unpin>(write: &mut W, bytes: &[u8]) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    tokio::time::timeout(READ_DEADLINE, write.write_all(bytes))
        .await
        .context("the relay stopped reading")?
        .context("writing to the relay")
}

/// Writes one frame; a relay that takes longer than the read deadline to
/// accept it is presumed gone.
async fn send<W: AsyncWrite + Unpin>(
    write: &mut W,
    frame: &Frame,
    scratch: &mut Vec<u8>,
) -> anyhow::Result<()> {
    scratch.clear();
    frame.encode(scratch).context("encoding a frame")?;
    write_all(write, scratch).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(tls: bool, host: Host, port: u16, path: &str) -> RelayUrl {
        RelayUrl {
            tls,
            host,
            port,
            path: path.into(),
        }
    }

    #[test]
    fn urls() {
        let domain = |d: &str| Host::Domain(d.to_owned());
        assert_eq!(
            RelayUrl::parse("http://10.0.0.1:3340/derp").unwrap(),
            url(false, Host::Ipv4([10, 0, 0, 1].into()), 3340, "/derp")
        );
        assert_eq!(
            RelayUrl::parse("http://relay").unwrap(),
            url(false, domain("relay"), 80, "/derp")
        );
        assert_eq!(
            RelayUrl::parse("https://relay.example/derp").unwrap(),
            url(true, domain("relay.example"), 443, "/derp")
        );
        assert_eq!(
            RelayUrl::parse("https://relay.example:8443/").unwrap(),
            url(true, domain("relay.example"), 8443, "/derp")
        );
        assert_eq!(
            RelayUrl::parse("http://[fd00::1]:3340/relay/derp?region=1").unwrap(),
            url(
                false,
                Host::Ipv6("fd00::1".parse().unwrap()),
                3340,
                "/relay/derp?region=1"
            )
        );
        assert_eq!(
            relay_authority("http://[fd00::1]:3340/derp").unwrap(),
            "[fd00::1]:3340"
        );
        assert_eq!(
            relay_authority("https://relay.example").unwrap(),
            "relay.example:443"
        );
        for bad in [
            "ftp://x",
            "relay:3340",
            "http://",
            "http://relay:99999/derp",
        ] {
            assert!(RelayUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tls_names_are_domains_or_addresses() {
        let name = |u: &str| RelayUrl::parse(u).unwrap().server_name().unwrap();
        assert_eq!(
            name("https://relay.example/derp"),
            ServerName::try_from("relay.example").unwrap()
        );
        assert_eq!(
            name("https://[::1]:8443/derp"),
            ServerName::from(IpAddr::from(std::net::Ipv6Addr::LOCALHOST))
        );
    }

    /// A relay that answers the upgrade with its response head and its
    /// first frame in one write: the frame must not be lost.
    #[tokio::test]
    async fn bytes_after_the_upgrade_response_stay_in_the_stream() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let relay = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                head.push(tcp.read_u8().await.unwrap());
            }
            tcp.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: crank-derp\r\nConnection: Upgrade\r\n\r\nfirst frame",
            )
            .await
            .unwrap();
            let mut reply = [0u8; 5];
            tcp.read_exact(&mut reply).await.unwrap();
            (String::from_utf8(head).unwrap(), reply)
        });
        let target = RelayTarget::from(format!("http://{addr}/derp"));
        let mut conn = connect(&target).await.unwrap();
        let mut first = [0u8; 11];
        conn.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"first frame");
        conn.write_all(b"hello").await.unwrap();
        let (head, reply) = relay.await.unwrap();
        assert!(head.starts_with("GET /derp HTTP/1.1\r\n"), "{head}");
        let head = head.to_ascii_lowercase();
        assert!(head.contains(&format!("host: {addr}\r\n")), "{head}");
        assert!(head.contains("upgrade: crank-derp\r\n"), "{head}");
        assert!(head.contains("connection: upgrade\r\n"), "{head}");
        assert_eq!(&reply, b"hello");
    }

    #[tokio::test]
    async fn a_refused_upgrade_says_what_the_relay_answered() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = tcp.read(&mut buf).await;
            let _ = tcp
                .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
                .await;
        });
        let target = RelayTarget::from(format!("http://{addr}/derp"));
        let err = format!("{:#}", connect(&target).await.err().unwrap());
        assert!(
            err.contains("refused the upgrade") && err.contains("503"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_relay_hanging_up_before_answering_is_an_error() {
        use tokio::io::AsyncReadExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = tcp.read(&mut buf).await;
        });
        let target = RelayTarget::from(format!("http://{addr}/derp"));
        let answer = tokio::time::timeout(Duration::from_secs(5), connect(&target)).await;
        assert!(matches!(answer, Ok(Err(_))), "an error, at once");
    }
}
