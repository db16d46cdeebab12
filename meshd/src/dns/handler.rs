//! The request handler shared by the UDP and TCP listeners: answer from the
//! zone, or forward to the split-DNS / default upstreams.
//!
//! It exists separately from `server.rs` so that the routing and forwarding
//! policy (what is ours, where the rest goes, how forwarding is bounded) can
//! be read in one place, apart from socket plumbing. It reads the current
//! [`State`] through an `ArcSwap`, so a config update is a single pointer
//! swap: a query sees either the old state or the new one, never a mix.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_proto::op::{
    DnsRequest, DnsRequestOptions, Edns, Header, HeaderCounts, MessageType, Metadata, OpCode,
    ResponseCode,
};
use hickory_proto::rr::{DNSClass, Name, Record};
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverOpts};
use hickory_resolver::net::runtime::{Time, TokioRuntimeProvider};
use hickory_resolver::net::xfer::FirstAnswer;
use hickory_resolver::net::{DnsError as NetDnsError, DnsHandle, NetError};
use hickory_resolver::{NameServerPool, PoolContext, TlsConfig};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::sync::Semaphore;
use tracing::debug;

use super::zone::Zone;

/// The EDNS UDP payload size we advertise (RFC 9715 / DNS flag day 2020).
pub(crate) const EDNS_PAYLOAD: u16 = 1232;

/// Counters, updated lock-free by every request.
#[derive(Default)]
pub(crate) struct Counters {
    pub local_answers: AtomicU64,
    pub nxdomain: AtomicU64,
    pub forwarded: AtomicU64,
    pub forward_failures: AtomicU64,
    pub forward_shed: AtomicU64,
    pub refused: AtomicU64,
    pub malformed: AtomicU64,
    pub dropped: AtomicU64,
}

impl Counters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A set of upstream servers reached through one hickory-resolver pool.
pub(crate) struct Upstream {
    pool: Option<NameServerPool<TokioRuntimeProvider>>,
}

impl Upstream {
    /// Builds a pool for `servers` (any port; UDP with TCP fallback).
    pub fn new(
        servers: &[SocketAddr],
        timeout: Duration,
        max_active: usize,
    ) -> Result<Self, NetError> {
        if servers.is_empty() {
            return Ok(Self { pool: None });
        }
        let configs = servers.iter().map(|addr| {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
        });
        let mut opts = ResolverOpts::default();
        opts.timeout = timeout;
        opts.cache_size = 0;
        opts.max_active_requests = max_active.max(1);
        // Built without TLS features, so this config is empty and unused.
        let cx = Arc::new(PoolContext::new(opts, TlsConfig::new()?));
        Ok(Self {
            pool: Some(NameServerPool::from_config(
                configs,
                cx,
                TokioRuntimeProvider::new(),
            )),
        })
    }
}

/// Everything a query needs, swapped atomically on update.
pub(crate) struct State {
    pub zone: Zone,
    /// Split-DNS routes, longest domain first.
    pub splits: Vec<(Name, Upstream)>,
    pub default: Upstream,
}

impl State {
    fn route(&self, name: &Name) -> &Upstream {
        self.splits
            .iter()
            .find(|(domain, _)| domain.zone_of(name))
            .map_or(&self.default, |(_, up)| up)
    }
}

/// Shared by all listeners; cheap to clone.
#[derive(Clone)]
pub(crate) struct Handler {
    pub inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub state: ArcSwap<State>,
    pub stats: Counters,
    pub forward_slots: Arc<Semaphore>,
    pub forward_timeout: Duration,
}

/// What we send back: header fields plus the three record sections.
struct Reply<'r> {
    metadata: Metadata,
    answers: &'r [Record],
    authorities: &'r [Record],
    additionals: &'r [Record],
}

impl Reply<'static> {
    fn code(request: &Request, code: ResponseCode) -> Self {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.response_code = code;
        metadata.recursion_available = true;
        Reply {
            metadata,
            answers: &[],
            authorities: &[],
            additionals: &[],
        }
    }
}

async fn send<R: ResponseHandler>(request: &Request, mut rh: R, reply: Reply<'_>) -> ResponseInfo {
    let edns = request.edns.as_ref().map(|_| {
        let mut e = Edns::new();
        e.set_max_payload(EDNS_PAYLOAD);
        e
    });
    let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
    let metadata = reply.metadata;
    let response = builder.build(
        metadata,
        reply.answers.iter(),
        reply.authorities.iter(),
        std::iter::empty(),
        reply.additionals.iter(),
    );
    match rh.send_response(response).await {
        Ok(info) => info,
        Err(error) => {
            debug!(%error, "failed to send response");
            ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            })
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        let stats = &self.inner.stats;
        if request.metadata.message_type != MessageType::Query {
            // Never answer responses (reflection); nothing is sent.
            Counters::bump(&stats.malformed);
            return ResponseInfo::from(Header {
                metadata: request.metadata,
                counts: HeaderCounts::default(),
            });
        }
        if request.metadata.op_code != OpCode::Query {
            Counters::bump(&stats.refused);
            return send(
                request,
                response_handle,
                Reply::code(request, ResponseCode::NotImp),
            )
            .await;
        }
        let Ok(info) = request.request_info() else {
            Counters::bump(&stats.malformed);
            return send(
                request,
                response_handle,
                Reply::code(request, ResponseCode::FormErr),
            )
            .await;
        };
        let query = info.query;
        let name = Name::from(query.name().clone());
        let state = self.inner.state.load_full();

        if state.zone.is_authoritative(&name) {
            if query.query_class() != DNSClass::IN {
                Counters::bump(&stats.refused);
                return send(
                    request,
                    response_handle,
                    Reply::code(request, ResponseCode::Refused),
                )
                .await;
            }
            if let Some(ans) = state.zone.lookup(&name, query.query_type()) {
                let counter = if ans.code == ResponseCode::NXDomain {
                    &stats.nxdomain
                } else {
                    &stats.local_answers
                };
                Counters::bump(counter);
                let mut reply = Reply::code(request, ans.code);
                reply.metadata.authoritative = true;
                reply.answers = &ans.answers;
                reply.authorities = &ans.authority;
                return send(request, response_handle, reply).await;
            }
        }

        let Some(pool) = state.route(&name).pool.as_ref() else {
            // Documented choice: no upstream configured → REFUSED, so stub
            // resolvers move on to their next nameserver immediately.
            Counters::bump(&stats.refused);
            return send(
                request,
                response_handle,
                Reply::code(request, ResponseCode::Refused),
            )
            .await;
        };
        let Ok(_permit) = self.inner.forward_slots.clone().try_acquire_owned() else {
            Counters::bump(&stats.forward_failures);
            Counters::bump(&stats.forward_shed);
            return send(
                request,
                response_handle,
                Reply::code(request, ResponseCode::ServFail),
            )
            .await;
        };

        let mut opts = DnsRequestOptions::default();
        opts.recursion_desired = request.metadata.recursion_desired;
        opts.edns_payload_len = EDNS_PAYLOAD;
        let upstream_req = DnsRequest::from_query(query.original().clone(), opts);
        let result = tokio::time::timeout(
            self.inner.forward_timeout,
            pool.send(upstream_req).first_answer(),
        )
        .await;

        match result {
            Ok(Ok(resp)) => {
                Counters::bump(&stats.forwarded);
                let mut reply = Reply::code(request, resp.metadata.response_code);
                reply.metadata.authoritative = resp.metadata.authoritative;
                reply.metadata.truncation = resp.metadata.truncation;
                reply.metadata.recursion_available = resp.metadata.recursion_available;
                reply.metadata.authentic_data = resp.metadata.authentic_data;
                reply.answers = &resp.answers;
                reply.authorities = &resp.authorities;
                reply.additionals = &resp.additionals;
                send(request, response_handle, reply).await
            }
            // hickory-resolver turns answer-less and error responses into
            // errors; rebuild them so the upstream's verdict reaches the client.
            Ok(Err(NetError::Dns(NetDnsError::NoRecordsFound(nr)))) => {
                Counters::bump(&stats.forwarded);
                let mut authorities: Vec<Record> =
                    nr.authorities.as_deref().unwrap_or_default().to_vec();
                if authorities.is_empty() {
                    if let Some(soa) = nr.soa {
                        authorities.push(soa.into_record_of_rdata());
                    }
                }
                let mut reply = Reply::code(request, nr.response_code);
                reply.authorities = &authorities;
                send(request, response_handle, reply).await
            }
            Ok(Err(NetError::Dns(NetDnsError::ResponseCode(code)))) => {
                Counters::bump(&stats.forwarded);
                send(request, response_handle, Reply::code(request, code)).await
            }
            Ok(Err(error)) => {
                debug!(%error, %name, "forward failed");
                Counters::bump(&stats.forward_failures);
                send(
                    request,
                    response_handle,
                    Reply::code(request, ResponseCode::ServFail),
                )
                .await
            }
            Err(_elapsed) => {
                debug!(%name, "forward timed out");
                Counters::bump(&stats.forward_failures);
                send(
                    request,
                    response_handle,
                    Reply::code(request, ResponseCode::ServFail),
                )
                .await
            }
        }
    }
}
