//! The MagicDNS server: binds UDP and TCP on the daemon's service addresses
//! and serves them with one shared hickory-server `RequestHandler`.
//!
//! It exists to own the sockets and their lifetime (start, atomic update,
//! stop that frees the ports) and to keep the server bounded under abuse.
//! TCP is served by hickory-server's [`Server`] (with its idle timeout).
//! UDP uses a small receive loop of our own that feeds the same handler
//! through hickory-server's `Request`/`ResponseHandler` types: hickory's UDP
//! loop answers or drops malformed datagrams before any handler sees them
//! (so they could not be counted) and spawns one task per datagram without
//! limit; ours counts them and caps the tasks in flight.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_proto::rr::{Name, Record};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder};
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::net::NetError;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use hickory_server::Server;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::handler::{Counters, Handler, Inner, State, Upstream, EDNS_PAYLOAD};
use super::zone::{Zone, ZoneError, ZoneSpec};

/// What the server answers and where it forwards.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// The mesh's own names (answered locally, authoritatively).
    pub zone: ZoneSpec,
    /// Split DNS: (domain, its resolvers). The longest matching suffix wins.
    /// A domain listed with no resolvers is REFUSED rather than leaked upstream.
    pub split: Vec<(String, Vec<SocketAddr>)>,
    /// Default resolvers for everything else. Empty → REFUSED.
    pub upstream: Vec<SocketAddr>,
}

/// Limits; [`Options::default`] is what [`MagicDns::start`] uses.
#[derive(Clone, Debug)]
pub struct Options {
    /// Forwarded queries in flight at once; above it: fast SERVFAIL.
    pub max_inflight_forwards: usize,
    /// Deadline for one forwarded query, all upstream retries included.
    pub forward_timeout: Duration,
    /// A TCP connection idle this long is closed.
    pub tcp_idle_timeout: Duration,
    /// UDP requests being handled at once per socket; above it datagrams are dropped.
    pub max_udp_tasks: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_inflight_forwards: 256,
            forward_timeout: Duration::from_secs(2),
            tcp_idle_timeout: Duration::from_secs(10),
            max_udp_tasks: 1024,
        }
    }
}

/// A snapshot of the server's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Authoritative answers with NOERROR (including NODATA).
    pub local_answers: u64,
    /// Authoritative NXDOMAIN answers (forwarded NXDOMAINs count as `forwarded`).
    pub nxdomain: u64,
    /// Queries an upstream answered (whatever its response code).
    pub forwarded: u64,
    /// Forwards that got no upstream answer (timeout, error, or shed) → SERVFAIL.
    pub forward_failures: u64,
    /// The part of `forward_failures` refused because the in-flight cap was reached.
    pub forward_shed: u64,
    /// REFUSED / NOTIMP: no upstream configured, non-IN class, non-query opcode.
    pub refused: u64,
    /// Undecodable datagrams, wrong question counts, responses sent to us.
    pub malformed: u64,
    /// UDP datagrams dropped because `max_udp_tasks` were busy.
    pub dropped: u64,
}

/// Errors from starting or updating the server.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// No bind address was given.
    #[error("no bind addresses")]
    NoBindAddresses,
    /// Binding a socket failed.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address that could not be bound.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The zone specification is unusable.
    #[error(transparent)]
    Zone(#[from] ZoneError),
    /// A split-DNS domain is not a valid name.
    #[error("invalid split-DNS domain {0:?}")]
    InvalidSplitDomain(String),
    /// The forwarder could not be set up.
    #[error("forwarder setup: {0}")]
    Forwarder(#[from] NetError),
    /// Shutting down the listeners failed.
    #[error("shutdown: {0}")]
    Shutdown(String),
}

/// A running MagicDNS server. Dropping it also stops it (without waiting).
pub struct MagicDns {
    handler: Handler,
    tcp: Server<Handler>,
    udp_tasks: Vec<JoinHandle<()>>,
    cancel: CancellationToken,
    addrs: Vec<SocketAddr>,
    opts: Options,
}

impl MagicDns {
    /// Binds UDP and TCP on every address in `binds` (port 0 picks a free
    /// port, the same for UDP and TCP) and starts serving with default
    /// [`Options`]. Needs a tokio runtime.
    pub async fn start(binds: &[SocketAddr], config: Config) -> Result<MagicDns, DnsError> {
        Self::start_with_options(binds, config, Options::default()).await
    }

    /// Like [`MagicDns::start`], with explicit limits.
    pub async fn start_with_options(
        binds: &[SocketAddr],
        config: Config,
        opts: Options,
    ) -> Result<MagicDns, DnsError> {
        if binds.is_empty() {
            return Err(DnsError::NoBindAddresses);
        }
        let mut sockets = Vec::new();
        for addr in binds {
            sockets.push(bind_pair(*addr).await?);
        }
        let addrs: Vec<SocketAddr> = sockets.iter().map(|(_, _, a)| *a).collect();
        let (state, skipped) = build_state(&config, &addrs, &opts)?;
        if skipped > 0 {
            warn!(skipped, "hosts with invalid DNS names were skipped");
        }
        let handler = Handler {
            inner: Arc::new(Inner {
                state: ArcSwap::from_pointee(state),
                stats: Counters::default(),
                forward_slots: Arc::new(Semaphore::new(opts.max_inflight_forwards)),
                forward_timeout: opts.forward_timeout,
            }),
        };
        let cancel = CancellationToken::new();
        let mut tcp = Server::new(handler.clone());
        let mut udp_tasks = Vec::new();
        for (udp, listener, _) in sockets {
            tcp.register_listener(listener, opts.tcp_idle_timeout, 64);
            udp_tasks.push(tokio::spawn(serve_udp(
                Arc::new(udp),
                handler.clone(),
                cancel.clone(),
                opts.max_udp_tasks,
            )));
        }
        Ok(MagicDns {
            handler,
            tcp,
            udp_tasks,
            cancel,
            addrs,
            opts,
        })
    }

    /// The bound addresses (UDP and TCP share each one), in `binds` order.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Replaces zone and forwarding atomically without rebinding. Returns how
    /// many hosts/extra records were skipped for invalid names. On error the
    /// previous configuration stays in force.
    pub fn update(&self, config: Config) -> Result<usize, DnsError> {
        let (state, skipped) = build_state(&config, &self.addrs, &self.opts)?;
        self.handler.inner.state.store(Arc::new(state));
        Ok(skipped)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let c = &self.handler.inner.stats;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            local_answers: get(&c.local_answers),
            nxdomain: get(&c.nxdomain),
            forwarded: get(&c.forwarded),
            forward_failures: get(&c.forward_failures),
            forward_shed: get(&c.forward_shed),
            refused: get(&c.refused),
            malformed: get(&c.malformed),
            dropped: get(&c.dropped),
        }
    }

    /// Stops serving and waits until every socket is closed, so the ports
    /// can be bound again as soon as this returns.
    pub async fn stop(mut self) -> Result<(), DnsError> {
        self.cancel.cancel();
        for task in self.udp_tasks.drain(..) {
            // A task that panicked or was cancelled has released its socket too.
            let _ = task.await;
        }
        self.tcp
            .shutdown_gracefully()
            .await
            .map_err(|e| DnsError::Shutdown(e.to_string()))
    }
}

impl Drop for MagicDns {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.tcp.shutdown_token().cancel();
        for task in &self.udp_tasks {
            task.abort();
        }
    }
}

fn build_state(
    config: &Config,
    own: &[SocketAddr],
    opts: &Options,
) -> Result<(State, usize), DnsError> {
    let zone = Zone::new(&config.zone)?;
    let skipped = zone.skipped().len();
    // Never forward to ourselves: that would loop until the timeout.
    let filter = |servers: &[SocketAddr]| -> Vec<SocketAddr> {
        servers
            .iter()
            .filter(|s| !own.contains(s))
            .copied()
            .collect()
    };
    let mut splits = Vec::new();
    for (domain, servers) in &config.split {
        let trimmed = domain.trim_end_matches('.');
        let name = Name::from_ascii(format!("{trimmed}."))
            .map_err(|_| DnsError::InvalidSplitDomain(domain.clone()))?;
        let up = Upstream::new(
            &filter(servers),
            opts.forward_timeout,
            opts.max_inflight_forwards,
        )?;
        splits.push((name.to_lowercase(), up));
    }
    splits.sort_by_key(|(name, _)| std::cmp::Reverse(name.num_labels()));
    let default = Upstream::new(
        &filter(&config.upstream),
        opts.forward_timeout,
        opts.max_inflight_forwards,
    )?;
    Ok((
        State {
            zone,
            splits,
            default,
        },
        skipped,
    ))
}

/// Binds UDP then TCP on the same port; with port 0, retries if the port
/// the kernel chose for UDP is taken for TCP.
async fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener, SocketAddr), DnsError> {
    let bind_err = |addr, source| DnsError::Bind { addr, source };
    let mut attempts = 0;
    loop {
        let udp = UdpSocket::bind(addr).await.map_err(|e| bind_err(addr, e))?;
        let local = udp.local_addr().map_err(|e| bind_err(addr, e))?;
        match TcpListener::bind(local).await {
            Ok(tcp) => return Ok((udp, tcp, local)),
            Err(e) if addr.port() == 0 && attempts < 16 => {
                debug!(%local, error = %e, "TCP port taken, retrying");
                attempts += 1;
            }
            Err(e) => return Err(bind_err(local, e)),
        }
    }
}

async fn serve_udp(
    sock: Arc<UdpSocket>,
    handler: Handler,
    cancel: CancellationToken,
    max_tasks: usize,
) {
    let stats = &handler.inner.stats;
    let slots = Arc::new(Semaphore::new(max_tasks.max(1)));
    let mut tasks = JoinSet::new();
    let mut buf = vec![0u8; 65535];
    loop {
        let (len, src) = tokio::select! {
            _ = cancel.cancelled() => break,
            received = sock.recv_from(&mut buf) => match received {
                Ok(v) => v,
                // e.g. ECONNREFUSED from an ICMP error for an earlier reply.
                Err(error) => { debug!(%error, "udp recv"); continue; }
            },
        };
        while tasks.try_join_next().is_some() {}
        if src.port() == 0 {
            continue;
        }
        let raw = &buf[..len];
        let request = match Request::from_bytes(raw.to_vec(), src, Protocol::Udp) {
            Ok(request) => request,
            Err(error) => {
                debug!(%src, %error, "malformed datagram");
                Counters::bump(&stats.malformed);
                if let Some(reply) = formerr_for(raw) {
                    let _ = sock.send_to(&reply, src).await;
                }
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            Counters::bump(&stats.dropped);
            continue;
        };
        let max_size = request.max_payload().min(EDNS_PAYLOAD);
        let responder = UdpResponder {
            sock: sock.clone(),
            dst: src,
            max_size,
        };
        let handler = handler.clone();
        tasks.spawn(async move {
            let _permit = permit;
            handler
                .handle_request::<_, TokioTime>(&request, responder)
                .await;
        });
    }
    tasks.shutdown().await;
}

/// A header-only FORMERR reply for a datagram whose header parses but whose
/// body does not; `None` for runts and for datagrams that are responses.
fn formerr_for(raw: &[u8]) -> Option<Vec<u8>> {
    let header = Header::read(&mut BinDecoder::new(raw)).ok()?;
    if header.metadata.message_type != hickory_proto::op::MessageType::Query {
        return None;
    }
    let mut metadata = Metadata::response_from_request(&header.metadata);
    metadata.response_code = ResponseCode::FormErr;
    let reply = Header {
        metadata,
        counts: HeaderCounts::default(),
    };
    let mut out = Vec::with_capacity(12);
    reply.emit(&mut BinEncoder::new(&mut out)).ok()?;
    Some(out)
}

/// Sends one UDP reply, truncating (TC) to what the client can take.
#[derive(Clone)]
struct UdpResponder {
    sock: Arc<UdpSocket>,
    dst: SocketAddr,
    max_size: u16,
}

#[async_trait::async_trait]
impl ResponseHandler for UdpResponder {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let fallback = *response.metadata();
        let mut buf = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut buf);
        encoder.set_max_size(self.max_size);
        let info = match response.destructive_emit(&mut encoder) {
            Ok(info) => info,
            Err(error) => {
                // Same fallback as hickory's own encoder: header-only SERVFAIL.
                debug!(%error, "encoding response failed");
                buf.clear();
                let mut metadata = fallback;
                metadata.response_code = ResponseCode::ServFail;
                let header = Header {
                    metadata,
                    counts: HeaderCounts::default(),
                };
                header.emit(&mut BinEncoder::new(&mut buf))?;
                ResponseInfo::from(header)
            }
        };
        self.sock.send_to(&buf, self.dst).await?;
        Ok(info)
    }
}
