//! The OpenAI-compatible HTTP API: `/v1/models`, `/v1/embeddings`,
//! `/v1/chat/completions` (plain and SSE streaming), `/healthz`, `/metrics`.
//!
//! Jobs run on blocking threads, at most `slots` at once; up to `queue` more
//! wait; beyond that the answer is 429 with `Retry-After`. A body is
//! checked ([`crate::requests`]) before it queues: an embeddings request
//! of more than [`crate::llama::MAX_INPUTS`] inputs or
//! [`crate::llama::MAX_REQUEST_TOKENS`] tokens gets 413. Nothing
//! model-bound runs on an async worker (tokenising, templates, decodes),
//! and a caller that goes away stops its job. A job runs only
//! once the [`Admission`] hook lets it in (a ticket), and the hook hears how
//! every admitted job ended. Errors are JSON in OpenAI's shape. The caller
//! is named by a lookup of its source address (whois), the device serving
//! in every answer.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::Stream;
use prometheus_client::encoding::{text, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Serialize;
use serde_json::json;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use base64::Engine as _;

use crate::admission::{
    sha256_hex, vectors_sha256, Admission, JobReport, JobStatus, Refusal, Workload,
};
use crate::batch::EmbedBatcher;
use crate::llama::{ComputeError, FinishReason, Generator};
use crate::requests::{ChatRequest, EmbeddingsRequest, RequestError};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Most jobs run at once, whatever the settings say.
pub const MAX_SLOTS: usize = 1024;
/// Most jobs waiting beyond the slots, whatever the settings say.
pub const MAX_QUEUE: usize = 1 << 16;

/// Who a source address belongs to.
pub type Whois = Arc<dyn Fn(IpAddr) -> Option<String> + Send + Sync>;
/// Whether the device contributes now: `Err(reason)` when it does not, and
/// every endpoint but `/metrics` answers 503 with that reason.
pub type Gate = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// The engines a server offers, by the name clients ask for. Cheap to
/// clone: the models themselves are shared.
#[derive(Clone)]
pub struct Models {
    /// (name, engine)
    pub embedder: Option<(String, Arc<EmbedBatcher>)>,
    pub generator: Option<(String, Arc<Generator>)>,
}

/// The content type of `/metrics`: OpenMetrics text, as `prometheus_client` encodes it (the same type as the
/// coordinator and relay pages; this crate stands alone).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// The server's metrics, registered once in their registry.
struct Metrics {
    requests: Counter,
    rejected_busy: Counter,
    client_errors: Counter,
    /// `compute_tokens_total{kind="prompt"}` and `{kind="completion"}`.
    prompt_tokens: Counter,
    completion_tokens: Counter,
    /// Jobs the admission hook refused, by [`Refusal::index`].
    refused: Vec<Counter>,
    /// Set when the metrics are read.
    contributing: Gauge,
    queue_depth: Gauge,
    latency: Histogram,
    registry: Registry,
}

/// Upper bounds of the latency histogram's buckets (seconds); `+Inf` follows.
const BUCKETS: [f64; 7] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

impl Metrics {
    fn new(models: &Models) -> Self {
        let mut registry = Registry::default();
        // Counters are named without `_total`: the encoder appends it.
        let requests = Counter::default();
        registry.register("compute_requests", "Requests received", requests.clone());
        let rejected_busy = Counter::default();
        registry.register(
            "compute_rejected_busy",
            "Requests turned away with every slot and queue place taken",
            rejected_busy.clone(),
        );
        let client_errors = Counter::default();
        registry.register(
            "compute_client_errors",
            "Requests answered with a client error",
            client_errors.clone(),
        );
        let tokens = Family::<KindLabels, Counter>::default();
        let prompt_tokens = tokens.get_or_create_owned(&KindLabels { kind: "prompt" });
        let completion_tokens = tokens.get_or_create_owned(&KindLabels { kind: "completion" });
        registry.register("compute_tokens", "Tokens processed, by kind", tokens);
        if let Some((_, b)) = &models.embedder {
            let (decodes, abandoned) = b.counters();
            registry.register(
                "compute_embedding_batches",
                "Embedding decodes run",
                decodes,
            );
            registry.register(
                "compute_embedding_abandoned",
                "Embedding requests dropped unfinished because their caller went away",
                abandoned,
            );
        }
        let refusals = Family::<ReasonLabels, Counter>::default();
        let refused = Refusal::CODES
            .iter()
            .map(|reason| refusals.get_or_create_owned(&ReasonLabels { reason }))
            .collect();
        registry.register(
            "compute_tickets_refused",
            "Jobs the admission hook refused, by reason",
            refusals,
        );
        let contributing = Gauge::default();
        registry.register(
            "compute_contributing",
            "1 while the device contributes",
            contributing.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "compute_queue_depth",
            "Jobs admitted, running or waiting",
            queue_depth.clone(),
        );
        let latency = Histogram::new(BUCKETS);
        registry.register(
            "compute_request_seconds",
            "Time to serve a job, in seconds",
            latency.clone(),
        );
        Metrics {
            requests,
            rejected_busy,
            client_errors,
            prompt_tokens,
            completion_tokens,
            refused,
            contributing,
            queue_depth,
            latency,
            registry,
        }
    }
}

pub struct ComputeServer {
    models: Models,
    device: String,
    whois: Whois,
    gate: Gate,
    admission: Arc<dyn Admission>,
    slots: Arc<Semaphore>,
    /// Jobs admitted (running or waiting).
    admitted: AtomicUsize,
    capacity: usize,
    /// Jobs that run at once (`slots`' permits when all are free).
    slot_count: usize,
    metrics: Metrics,
}

/// An OpenAI-shaped error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            kind,
            code,
            message: message.into(),
        }
    }
    /// 413: the request asks for more work than one request may.
    fn too_large(code: &'static str, message: impl ToString) -> Self {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            code,
            message.to_string(),
        )
    }
    fn bad(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }
}

impl From<ComputeError> for ApiError {
    fn from(e: ComputeError) -> Self {
        match e {
            ComputeError::EmptyInput => ApiError::bad("empty_input", e.to_string()),
            ComputeError::InputTooLong { .. } | ComputeError::ContextExceeded { .. } => {
                ApiError::bad("context_length_exceeded", e.to_string())
            }
            ComputeError::TooManyInputs { .. } => ApiError::too_large("too_many_inputs", e),
            ComputeError::TooManyTokens { .. } => ApiError::too_large("too_many_tokens", e),
            _ => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "engine_error",
                e.to_string(),
            ),
        }
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::Json(_) => ApiError::bad("invalid_json", e.to_string()),
            RequestError::UnsupportedEncoding(_) => {
                ApiError::bad("unsupported_encoding", e.to_string())
            }
            RequestError::InvalidMaxTokens => ApiError::bad("invalid_max_tokens", e.to_string()),
            RequestError::Input(e) => e.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"message": self.message, "type": self.kind, "code": self.code}});
        let mut resp = (self.status, Json(body)).into_response();
        let retry_after = match self.status {
            StatusCode::TOO_MANY_REQUESTS => Some("1"),
            StatusCode::SERVICE_UNAVAILABLE => Some("30"),
            _ => None,
        };
        if let Some(secs) = retry_after {
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from_static(secs));
        }
        resp
    }
}

/// A JSON body whose failures are OpenAI-shaped 4xx answers.
pub struct Body<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "invalid_request_error",
                        "body_too_large",
                        format!("body over {MAX_BODY_BYTES} bytes"),
                    )
                } else {
                    ApiError::bad("unreadable_body", e.to_string())
                }
            })?;
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| ApiError::bad("invalid_json", format!("invalid JSON body: {e}")))
    }
}

/// A place in line: a running or waiting job. Dropped, it frees the place.
struct Place {
    server: Arc<ComputeServer>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.server.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ComputeServer {
    /// `slots` jobs run at once; `queue` more may wait; `admission`
    /// decides which run.
    pub fn new(
        models: Models,
        device: String,
        whois: Whois,
        gate: Gate,
        admission: Arc<dyn Admission>,
        slots: usize,
        queue: usize,
    ) -> Arc<Self> {
        // Settings come from the owner's files and commands: out-of-range
        // ones are clamped here rather than trusted (a semaphore panics
        // above its maximum).
        let slots = slots.clamp(1, MAX_SLOTS);
        let metrics = Metrics::new(&models);
        Arc::new(ComputeServer {
            models,
            device,
            whois,
            gate,
            admission,
            slots: Arc::new(Semaphore::new(slots)),
            admitted: AtomicUsize::new(0),
            capacity: slots.saturating_add(queue.min(MAX_QUEUE)),
            slot_count: slots,
            metrics,
        })
    }

    /// Jobs running now and jobs waiting for a slot (admitted, not yet
    /// running), for the device's capability report.
    pub fn load(&self) -> (usize, usize) {
        let running = self
            .slot_count
            .saturating_sub(self.slots.available_permits());
        let admitted = self.admitted.load(Ordering::Relaxed);
        (running, admitted.saturating_sub(running))
    }

    /// 503 with the reason while the device does not contribute.
    fn open(&self) -> Result<(), ApiError> {
        (self.gate)().map_err(|reason| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "not_contributing",
                reason,
            )
        })
    }

    /// A place in line, or 429.
    fn place(self: &Arc<Self>) -> Result<Place, ApiError> {
        let prior = self.admitted.fetch_add(1, Ordering::AcqRel);
        let place = Place {
            server: self.clone(),
        };
        if prior >= self.capacity {
            self.metrics.rejected_busy.inc();
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "overloaded",
                "all slots and the queue are full; retry shortly",
            ));
        }
        Ok(place)
    }

    /// Asks the hook to let the job in.
    fn admit(
        &self,
        caller: SocketAddr,
        headers: &HeaderMap,
        workload: Workload,
        model: &str,
    ) -> Result<JobReport, ApiError> {
        match self.admission.admit(caller, headers, workload, model) {
            Ok(job) => {
                tracing::debug!(job = job.id(), %workload, "job admitted");
                Ok(JobReport::new(self.admission.clone(), job))
            }
            Err(refusal) => {
                self.metrics.refused[refusal.index()].inc();
                tracing::debug!(code = refusal.code(), reason = %refusal, "job refused");
                Err(ApiError::new(
                    refusal.status(),
                    refusal.kind(),
                    refusal.code(),
                    refusal.to_string(),
                ))
            }
        }
    }

    async fn slot(&self) -> OwnedSemaphorePermit {
        self.slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/healthz", get(healthz))
            .route("/metrics", get(metrics))
            .route("/v1/models", get(list_models))
            .route("/v1/embeddings", post(embeddings))
            .route("/v1/chat/completions", post(chat))
            .fallback(|| async {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    "not_found",
                    "no such endpoint",
                )
            })
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(self.clone())
    }

    fn caller(&self, addr: SocketAddr) -> String {
        (self.whois)(addr.ip().to_canonical()).unwrap_or_else(|| addr.ip().to_string())
    }
}

/// The engine serving `wanted`, if this server has it.
fn pick<E>(
    offered: &Option<(String, Arc<E>)>,
    wanted: &str,
    what: &str,
) -> Result<(String, Arc<E>), ApiError> {
    match offered {
        Some((name, engine)) if name == wanted => Ok((name.clone(), engine.clone())),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("no {what} model {wanted:?} here"),
        )),
    }
}

fn identify(mut resp: Response, server: &ComputeServer, caller: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(&server.device) {
        resp.headers_mut().insert("x-crank-served-by", v);
    }
    if let Ok(v) = HeaderValue::from_str(caller) {
        resp.headers_mut().insert("x-crank-caller", v);
    }
    resp
}

async fn metrics(State(s): State<Arc<ComputeServer>>) -> impl IntoResponse {
    let m = &s.metrics;
    m.contributing.set(i64::from((s.gate)().is_ok()));
    m.queue_depth
        .set(i64::try_from(s.admitted.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
    let mut out = String::new();
    // Writing to a String cannot fail. The hook's lines go before `# EOF`.
    let _ = text::encode_registry(&mut out, &m.registry);
    s.admission.metrics(&mut out);
    let _ = text::encode_eof(&mut out);
    ([(header::CONTENT_TYPE, OPENMETRICS)], out)
}

async fn healthz(State(s): State<Arc<ComputeServer>>) -> Result<&'static str, ApiError> {
    s.open().map(|()| "ok")
}

async fn list_models(
    State(s): State<Arc<ComputeServer>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    s.open()?;
    let data: Vec<_> = s
        .models
        .embedder
        .iter()
        .map(|(n, _)| n)
        .chain(s.models.generator.iter().map(|(n, _)| n))
        .map(|n| json!({"id": n, "object": "model", "created": 0, "owned_by": s.device}))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

async fn embeddings(
    State(s): State<Arc<ComputeServer>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Body(req): Body<EmbeddingsRequest>,
) -> Result<Response, ApiError> {
    s.metrics.requests.inc();
    let caller = s.caller(peer);
    let result = async {
        s.open()?;
        // Refused here, a request too big costs no tokenising, queueing
        // or ticket.
        let request = req.check()?;
        let (base64, inputs) = (request.base64, request.inputs);
        let units = u64::try_from(inputs.len()).unwrap_or(u64::MAX);
        let (name, engine) = pick(&s.models.embedder, &request.model, "embedding")?;
        // Embeddings take no chat slot: one worker batches them all. A
        // caller that goes away drops this future, and the worker drops
        // the inputs it has not decoded yet.
        let _place = s.place()?;
        // Tokenised before the ticket is taken: a request over the token
        // budget is refused without spending one.
        let tokens = engine.tokenize(inputs).await?;
        let mut job = s.admit(peer, &headers, Workload::Embeddings, &name)?;
        job.start();
        let started = Instant::now();
        let out = match engine.embed_tokens(tokens).await {
            Ok(out) => out,
            Err(e) => {
                job.end_async(JobStatus::Failed, 0, sha256_hex(b"")).await;
                return Err(e.into());
            }
        };
        s.metrics.latency.observe(started.elapsed().as_secs_f64());
        job.end_async(JobStatus::Ok, units, vectors_sha256(&out.vectors))
            .await;
        s.metrics.prompt_tokens.inc_by(out.prompt_tokens as u64);
        let data: Vec<_> = out
            .vectors
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let embedding = if base64 {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(v)
                };
                json!({"object": "embedding", "index": i, "embedding": embedding})
            })
            .collect();
        Ok(Json(json!({
            "object": "list",
            "data": data,
            "model": name,
            "usage": {"prompt_tokens": out.prompt_tokens, "total_tokens": out.prompt_tokens},
            "served_by": s.device,
            "caller": caller,
        }))
        .into_response())
    }
    .await;
    answer(&s, result, &caller)
}

fn answer(
    s: &ComputeServer,
    result: Result<Response, ApiError>,
    caller: &str,
) -> Result<Response, ApiError> {
    match result {
        Ok(r) => Ok(identify(r, s, caller)),
        Err(e) => {
            if e.status.is_client_error() && e.status != StatusCode::TOO_MANY_REQUESTS {
                s.metrics.client_errors.inc();
            }
            Ok(identify(e.into_response(), s, caller))
        }
    }
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    completion_tokens: usize,
    total_tokens: usize,
}

/// How a generation that ran ends in the job's report.
fn job_status(f: FinishReason) -> JobStatus {
    match f {
        FinishReason::Cancelled => JobStatus::Cancelled,
        FinishReason::Stop | FinishReason::Length => JobStatus::Ok,
    }
}

/// Set when dropped: the request it lives in went away.
#[derive(Default)]
struct CallerGone(Arc<AtomicBool>);

impl Drop for CallerGone {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Cancelled => "length",
    }
}

fn completion_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!(
        "chatcmpl-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

async fn chat(
    State(s): State<Arc<ComputeServer>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Body(req): Body<ChatRequest>,
) -> Result<Response, ApiError> {
    s.metrics.requests.inc();
    let caller = s.caller(peer);
    let result = async {
        s.open()?;
        let req = req.check()?;
        let (name, engine) = pick(&s.models.generator, &req.model, "chat")?;
        let (max_tokens, messages) = (req.max_tokens, req.messages);
        // Rendering the template is the model's work: off the async workers.
        let prompt = {
            let engine = engine.clone();
            tokio::task::spawn_blocking(move || engine.chat_prompt(&messages))
                .await
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "panic", e.to_string()))??
        };
        let place = s.place()?;
        let mut job = s.admit(peer, &headers, Workload::Chat, &name)?;
        let slot = s.slot().await;
        // The device may have stopped contributing while the job waited.
        if let Err(e) = s.open() {
            job.end_async(JobStatus::Failed, 0, sha256_hex(b"")).await;
            return Err(e);
        }
        job.start();
        let id = completion_id();
        if !req.stream {
            let started = Instant::now();
            // Generation stops when this request's future is dropped.
            let gone = CallerGone::default();
            let watch = gone.0.clone();
            let out = tokio::task::spawn_blocking(move || {
                let _held = (slot, place);
                let result = engine.complete(&prompt, max_tokens, |_| !watch.load(Ordering::Relaxed));
                match &result {
                    Ok(out) => job.end(job_status(out.finish), out.completion_tokens as u64, sha256_hex(out.text.as_bytes())),
                    Err(_) => job.end(JobStatus::Failed, 0, sha256_hex(b"")),
                }
                result
            })
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "panic", e.to_string()))??;
            drop(gone);
            s.metrics.latency.observe(started.elapsed().as_secs_f64());
            s.metrics.prompt_tokens.inc_by(out.prompt_tokens as u64);
            s.metrics.completion_tokens.inc_by(out.completion_tokens as u64);
            let usage = Usage { prompt_tokens: out.prompt_tokens, completion_tokens: out.completion_tokens, total_tokens: out.prompt_tokens + out.completion_tokens };
            return Ok(Json(json!({
                "id": id,
                "object": "chat.completion",
                "created": unix_now(),
                "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text}, "finish_reason": finish_reason(out.finish)}],
                "usage": usage,
                "served_by": s.device,
                "caller": caller,
            }))
            .into_response());
        }
        Ok(stream_chat(s.clone(), engine, prompt, max_tokens, id, name, caller.clone(), (slot, place), job).into_response())
    }
    .await;
    answer(&s, result, &caller)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Streams chunks as server-sent events; ends with a usage chunk and
/// `[DONE]`. A client that goes away stops the generation.
#[allow(clippy::too_many_arguments)]
fn stream_chat(
    s: Arc<ComputeServer>,
    engine: Arc<Generator>,
    prompt: String,
    max_tokens: usize,
    id: String,
    model: String,
    caller: String,
    held: (OwnedSemaphorePermit, Place),
    job: JobReport,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::channel::<Event>(64);
    let created = unix_now();
    let chunk = {
        let (id, model, device, caller) =
            (id.clone(), model.clone(), s.device.clone(), caller.clone());
        move |delta: serde_json::Value, finish: Option<&str>| {
            json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                "served_by": device, "caller": caller,
            })
        }
    };
    tokio::task::spawn_blocking(move || {
        let _held = held;
        let started = Instant::now();
        let first = Event::default()
            .data(chunk(json!({"role": "assistant", "content": ""}), None).to_string());
        if tx.blocking_send(first).is_err() {
            job.end(JobStatus::Cancelled, 0, sha256_hex(b""));
            return;
        }
        let result = engine.complete(&prompt, max_tokens, |piece| {
            tx.blocking_send(
                Event::default().data(chunk(json!({"content": piece}), None).to_string()),
            )
            .is_ok()
        });
        s.metrics.latency.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(out) => {
                s.metrics.prompt_tokens.inc_by(out.prompt_tokens as u64);
                s.metrics
                    .completion_tokens
                    .inc_by(out.completion_tokens as u64);
                // Told before the last chunk: the answer is whole only
                // once the job is on record.
                job.end(
                    job_status(out.finish),
                    out.completion_tokens as u64,
                    sha256_hex(out.text.as_bytes()),
                );
                if out.finish == FinishReason::Cancelled {
                    return;
                }
                let mut last = chunk(json!({}), Some(finish_reason(out.finish)));
                last["usage"] = json!(Usage {
                    prompt_tokens: out.prompt_tokens,
                    completion_tokens: out.completion_tokens,
                    total_tokens: out.prompt_tokens + out.completion_tokens,
                });
                let _ = tx.blocking_send(Event::default().data(last.to_string()));
            }
            Err(e) => {
                job.end(JobStatus::Failed, 0, sha256_hex(b""));
                let _ = tx.blocking_send(
                    Event::default().data(
                        json!({"error": {"message": e.to_string(), "type": "server_error"}})
                            .to_string(),
                    ),
                );
            }
        }
        let _ = tx.blocking_send(Event::default().data("[DONE]"));
    });
    let stream =
        futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
        );
    Sse::new(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::{AdmittedJob, JobOutcome};
    use crate::llama::MAX_INPUTS;

    /// Admits nothing: a request refused before admission must never get here.
    struct NoJobs;

    impl Admission for NoJobs {
        fn admit(
            &self,
            _: SocketAddr,
            _: &HeaderMap,
            _: Workload,
            _: &str,
        ) -> Result<AdmittedJob, Refusal> {
            panic!("a request over the limits reached admission")
        }
        fn finish(&self, _: AdmittedJob, _: JobOutcome) {}
    }

    /// A server without models on loopback.
    async fn serve() -> String {
        let server = ComputeServer::new(
            Models {
                embedder: None,
                generator: None,
            },
            "beta".into(),
            Arc::new(|_| None),
            Arc::new(|| Ok(())),
            Arc::new(NoJobs),
            1,
            0,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = server
            .router()
            .into_make_service_with_connect_info::<SocketAddr>();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    async fn post(base: &str, body: String) -> (u16, serde_json::Value) {
        let r = reqwest::Client::new()
            .post(format!("{base}/v1/embeddings"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    #[tokio::test]
    async fn an_embeddings_request_with_too_many_inputs_is_refused_before_any_work() {
        let base = serve().await;
        // The request that kept a daemon busy for minutes: 200,000
        // one-letter inputs, just under the body limit.
        let inputs = vec!["a"; 200_000];
        let body = json!({"model": "m", "input": inputs}).to_string();
        assert!(body.len() < MAX_BODY_BYTES);
        let (status, answer) = post(&base, body).await;
        assert_eq!(status, 413, "{answer}");
        assert_eq!(answer["error"]["code"], "too_many_inputs");
        assert_eq!(answer["error"]["type"], "invalid_request_error");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains("200000") && message.contains(&MAX_INPUTS.to_string()));

        // Within the limit, the same server goes on to the model lookup.
        let body = json!({"model": "m", "input": vec!["a"; MAX_INPUTS]}).to_string();
        let (status, answer) = post(&base, body).await;
        assert_eq!(status, 404, "{answer}");
        assert_eq!(answer["error"]["code"], "model_not_found");
    }

    #[test]
    fn out_of_range_slots_and_queue_are_clamped_not_fatal() {
        let models = || Models {
            embedder: None,
            generator: None,
        };
        let server = |slots, queue| {
            ComputeServer::new(
                models(),
                "beta".into(),
                Arc::new(|_| None),
                Arc::new(|| Ok(())),
                Arc::new(NoJobs),
                slots,
                queue,
            )
        };
        // `Semaphore::new(usize::MAX)` panicked.
        let huge = server(usize::MAX, usize::MAX);
        assert_eq!(huge.load(), (0, 0));
        assert_eq!(huge.slot_count, MAX_SLOTS);
        assert_eq!(huge.capacity, MAX_SLOTS + MAX_QUEUE);
        assert_eq!(server(0, 0).slot_count, 1);
    }

    #[tokio::test]
    async fn blank_inputs_are_refused_before_the_model_is_looked_up() {
        let base = serve().await;
        for input in [json!([]), json!(""), json!(["ok", "  "])] {
            let (status, answer) =
                post(&base, json!({"model": "m", "input": input}).to_string()).await;
            assert_eq!(status, 400, "{input}: {answer}");
            assert_eq!(answer["error"]["code"], "empty_input");
        }
    }

    #[tokio::test]
    async fn metrics_are_openmetrics_text_with_every_series() {
        let base = serve().await;
        let (status, _) = post(&base, json!({"model": "m", "input": []}).to_string()).await;
        assert_eq!(status, 400);
        let r = reqwest::get(format!("{base}/metrics")).await.unwrap();
        assert_eq!(r.headers()["content-type"], OPENMETRICS);
        let text = r.text().await.unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for line in [
            "# TYPE compute_requests counter",
            "compute_requests_total 1",
            "compute_client_errors_total 1",
            "compute_rejected_busy_total 0",
            "compute_tokens_total{kind=\"prompt\"} 0",
            "compute_tokens_total{kind=\"completion\"} 0",
            "compute_contributing 1",
            "compute_queue_depth 0",
            "# TYPE compute_request_seconds histogram",
            "compute_request_seconds_bucket{le=\"0.01\"} 0",
            "compute_request_seconds_bucket{le=\"+Inf\"} 0",
            "compute_request_seconds_count 0",
        ] {
            assert!(lines.contains(&line), "{line} in\n{text}");
        }
        for reason in Refusal::CODES {
            let line = format!("compute_tickets_refused_total{{reason=\"{reason}\"}} 0");
            assert!(lines.contains(&line.as_str()), "{line} in\n{text}");
        }
        // No embedder: no embedding counters.
        assert!(!text.contains("compute_embedding"), "{text}");
        assert_eq!(lines.last(), Some(&"# EOF"));
    }
}
