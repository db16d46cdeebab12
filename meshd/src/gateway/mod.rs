//! The mesh endpoint: one OpenAI-compatible API for the whole network, on
//! this device's loopback (`127.0.0.1:8420/v1` by default). Local apps send
//! it requests with no knowledge of devices; it places each job from this
//! device's own netmap (no round trip to the coordinator), signs a ticket
//! for the worker it chose, forwards the request to that worker's compute
//! API over the overlay, retries elsewhere when a worker declines or fails,
//! and answers with `x-crank-job-id`, `x-crank-served-by` and
//! `x-crank-route`.
//!
//! Options come in headers or JSON fields (the header wins):
//! `x-crank-route` / `"route"` (`auto`, `device:NAME`, `tier:tierN`,
//! `local`), `x-crank-sensitivity` / `"sensitivity"`, `x-crank-timeout-ms`,
//! and `x-crank-dry-run: 1` (placement and estimated cost, no run).
//!
//! Only local processes reach it (it binds loopback); each job is bounded
//! in body size and time, and at most [`MAX_JOBS_IN_FLIGHT`] run at once.

mod credits;
mod dispatch;
mod error;
pub mod joblog;
mod placement;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use platform::jobs::{Route, Sensitivity, Workload};
use serde_json::{json, Map, Value};
use tokio::sync::{watch, Semaphore};

use crate::control::MapState;
use crate::engine::EngineSlot;
use crate::keyring::KeyRing;

pub use error::GatewayError;
use joblog::JobLog;

/// Where the gateway listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8420";
/// Largest request body accepted.
const MAX_BODY: usize = 1 << 20;
/// Jobs forwarded at once; beyond that callers get 429.
pub const MAX_JOBS_IN_FLIGHT: usize = 64;
/// Time a job may take when the caller names none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest a caller may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(600);
/// Silence on a worker's connection is probed this often, and this many
/// unanswered probes end it: a dead worker is given up on in about 8 s.
const DEAD_WORKER_PROBE: Duration = Duration::from_secs(2);
const DEAD_WORKER_PROBES: u32 = 3;

/// What the gateway needs of the joined session.
#[derive(Clone)]
pub struct SessionView {
    pub map: watch::Receiver<MapState>,
    pub engine: Arc<EngineSlot>,
    pub coordinator: String,
    pub ca_file: Option<PathBuf>,
}

pub struct Gateway {
    session: watch::Receiver<Option<SessionView>>,
    keys: Arc<KeyRing>,
    /// Plain HTTP to workers' overlay addresses: the tunnel encrypts it.
    http: reqwest::Client,
    pub jobs: JobLog,
    credits: credits::Credits,
    /// Jobs this device has running on each worker, by name.
    inflight: Mutex<HashMap<String, u32>>,
    limit: Arc<Semaphore>,
}

/// What the caller asked for besides the OpenAI request itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobOptions {
    pub route: Route,
    pub sensitivity: Sensitivity,
    pub timeout: Duration,
    pub dry_run: bool,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, GatewayError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .map_err(|_| GatewayError::bad("bad_header", format!("{name} is not text")))
        })
        .transpose()
}

/// A string field the gateway reads and removes from the body.
fn take_field(body: &mut Map<String, Value>, name: &str) -> Result<Option<String>, GatewayError> {
    match body.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(GatewayError::bad(
            "invalid_field",
            format!("\"{name}\" is a string"),
        )),
    }
}

impl JobOptions {
    /// Reads the options from `headers` and `body` (removing the gateway's
    /// own fields from it, so workers see a plain OpenAI request).
    pub fn parse(headers: &HeaderMap, body: &mut Map<String, Value>) -> Result<Self, GatewayError> {
        let route_field = take_field(body, "route")?;
        let sensitivity_field = take_field(body, "sensitivity")?;
        let route = match header(headers, "x-crank-route")?
            .map(str::to_owned)
            .or(route_field)
        {
            None => Route::Auto,
            Some(r) => r
                .parse()
                .map_err(|e: String| GatewayError::bad("invalid_route", e))?,
        };
        let sensitivity = match header(headers, "x-crank-sensitivity")?
            .map(str::to_owned)
            .or(sensitivity_field)
        {
            None => Sensitivity::Public,
            Some(s) => s
                .parse()
                .map_err(|e: String| GatewayError::bad("invalid_sensitivity", e))?,
        };
        let timeout = match header(headers, "x-crank-timeout-ms")? {
            None => DEFAULT_TIMEOUT,
            Some(t) => {
                let ms: u64 = t.trim().parse().map_err(|_| {
                    GatewayError::bad(
                        "invalid_timeout",
                        "x-crank-timeout-ms is a whole number of milliseconds",
                    )
                })?;
                let t = Duration::from_millis(ms);
                if t < Duration::from_millis(100) || t > MAX_TIMEOUT {
                    return Err(GatewayError::bad(
                        "invalid_timeout",
                        format!("x-crank-timeout-ms is 100 to {}", MAX_TIMEOUT.as_millis()),
                    ));
                }
                t
            }
        };
        let dry_run = matches!(
            header(headers, "x-crank-dry-run")?.map(str::trim),
            Some("1" | "true" | "yes")
        );
        Ok(JobOptions {
            route,
            sensitivity,
            timeout,
            dry_run,
        })
    }
}

impl Gateway {
    pub fn new(
        session: watch::Receiver<Option<SessionView>>,
        keys: Arc<KeyRing>,
    ) -> anyhow::Result<Arc<Self>> {
        // A worker that dies mid-job goes silent (its tunnel dies with it:
        // no reset reaches us), and a chat answer may take minutes: TCP
        // keepalives find the silence in seconds, so the job moves on to
        // the next worker well within its timeout.
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .tcp_keepalive(DEAD_WORKER_PROBE)
            .tcp_keepalive_interval(DEAD_WORKER_PROBE)
            .tcp_keepalive_retries(DEAD_WORKER_PROBES)
            .tcp_user_timeout(DEAD_WORKER_PROBE * (DEAD_WORKER_PROBES + 1))
            // A worker's redirect would send the caller's request (and a
            // ticket) wherever it pleases, this gateway included.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Arc::new(Gateway {
            session,
            keys,
            http,
            jobs: JobLog::default(),
            credits: credits::Credits::default(),
            inflight: Mutex::new(HashMap::new()),
            limit: Arc::new(Semaphore::new(MAX_JOBS_IN_FLIGHT)),
        }))
    }

    pub fn router(self: &Arc<Self>, listen: SocketAddr) -> Router {
        let hosts = Arc::new(local_hosts(listen));
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/metrics", get(metrics))
            .route("/v1/models", get(list_models))
            .route("/v1/embeddings", post(embeddings))
            .route("/v1/chat/completions", post(chat))
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .layer(axum::middleware::from_fn_with_state(
                hosts,
                local_callers_only,
            ))
            .with_state(self.clone())
    }

    /// Serves on `listen` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listen: SocketAddr) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("binding the gateway on {listen}: {e}"))?;
        tracing::info!(%listen, "gateway listening");
        axum::serve(listener, self.router(listen)).await?;
        Ok(())
    }

    fn view(&self) -> Result<(SessionView, platform::netmap::NetMap), GatewayError> {
        let view = self.session.borrow().clone().ok_or_else(|| {
            GatewayError::unavailable("not_up", "this device is not in a network (meshd up)")
        })?;
        let netmap = view.map.borrow().netmap.clone().ok_or_else(|| {
            GatewayError::unavailable("no_netmap", "no netmap from the coordinator yet")
        })?;
        Ok((view, netmap))
    }

    /// The owner's credits in the network (`meshd ledger show`).
    pub async fn balance(&self) -> anyhow::Result<platform::ledger::BalanceAnswer> {
        let (view, _) = self.view().map_err(|e| anyhow::anyhow!("{}", e.message))?;
        self.credits.ask(self, &view).await
    }

    fn inflight_on(&self, device: &str) -> u32 {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(device)
            .copied()
            .unwrap_or(0)
    }

    fn add_inflight(&self, device: &str, delta: i32) {
        let mut m = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(device.to_owned()).or_insert(0);
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            m.remove(device);
        }
    }

    /// Places and runs one job.
    async fn submit(
        self: &Arc<Self>,
        workload: Workload,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response, GatewayError> {
        let mut body: Map<String, Value> = match serde_json::from_slice(&body) {
            Ok(Value::Object(m)) => m,
            Ok(_) => {
                return Err(GatewayError::bad(
                    "invalid_json",
                    "the body is a JSON object",
                ))
            }
            Err(e) => {
                return Err(GatewayError::bad(
                    "invalid_json",
                    format!("invalid JSON body: {e}"),
                ))
            }
        };
        let opts = JobOptions::parse(&headers, &mut body)?;
        let model = match body.get("model") {
            None | Some(Value::Null) => None,
            Some(Value::String(m)) if !m.is_empty() => Some(m.clone()),
            Some(_) => {
                return Err(GatewayError::bad(
                    "invalid_field",
                    "\"model\" is a model name",
                ))
            }
        };
        let stream =
            workload == Workload::SmallChat && body.get("stream") == Some(&Value::Bool(true));
        let (view, netmap) = self.view()?;
        let placed = placement::place(self, &view, &netmap, workload, model.as_deref(), &opts)?;
        if opts.dry_run {
            return Ok(Json(placed.dry_run_answer(&netmap)).into_response());
        }
        let Ok(permit) = self.limit.clone().try_acquire_owned() else {
            return Err(GatewayError::busy(format!(
                "{MAX_JOBS_IN_FLIGHT} jobs already running through this gateway"
            )));
        };
        self.credits
            .check(self, &view, &netmap, placed.estimated_cost)
            .await
            .inspect_err(|_| self.jobs.refused())?;
        dispatch::run(self.clone(), netmap, placed, body, stream, opts, permit).await
    }
}

/// The `Host` values a local client sends to `listen`.
fn local_hosts(listen: SocketAddr) -> Vec<String> {
    let port = listen.port();
    let mut hosts = vec![
        listen.to_string(),
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
    ];
    hosts.dedup();
    hosts
}

/// Loopback keeps other machines out, not web pages: a page in a browser
/// on this machine can POST to 127.0.0.1 (a "simple" cross-origin request
/// needs no preflight) and, through DNS rebinding, read the answers. So
/// requests that name another host, or come from a page (`Origin`), are
/// refused, and jobs must be sent as JSON (which a page cannot do without
/// a preflight this gateway never grants).
async fn local_callers_only(
    State(hosts): State<Arc<Vec<String>>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let h = req.headers();
    let host = h
        .get(axum::http::header::HOST)
        .and_then(|v| v.to_str().ok());
    if !host.is_some_and(|host| hosts.iter().any(|a| a.eq_ignore_ascii_case(host))) {
        return GatewayError::new(
            axum::http::StatusCode::FORBIDDEN,
            "forbidden_host",
            "the gateway answers requests addressed to this device's loopback only",
        )
        .into_response();
    }
    if h.contains_key(axum::http::header::ORIGIN) {
        return GatewayError::new(
            axum::http::StatusCode::FORBIDDEN,
            "browser_origin",
            "the gateway does not serve web pages (a request with an Origin header)",
        )
        .into_response();
    }
    let json = h
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| {
            t.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    if req.method() == axum::http::Method::POST && !json {
        return GatewayError::new(
            axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "json_required",
            "jobs are sent as JSON (content-type: application/json)",
        )
        .into_response();
    }
    next.run(req).await
}

async fn embeddings(State(g): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
    g.submit(Workload::Embeddings, headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn chat(State(g): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
    g.submit(Workload::SmallChat, headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn metrics(State(g): State<Arc<Gateway>>) -> String {
    g.jobs.render_metrics()
}

/// The models on offer anywhere in the network, with where each is served.
async fn list_models(State(g): State<Arc<Gateway>>) -> Result<Json<Value>, GatewayError> {
    let (_, netmap) = g.view()?;
    Ok(Json(models_of(&netmap)))
}

/// The union of the models offered in `netmap` (this device included).
pub fn models_of(netmap: &platform::netmap::NetMap) -> Value {
    use std::collections::BTreeMap;
    let mut models: BTreeMap<String, (String, String, Vec<Value>)> = BTreeMap::new();
    for node in std::iter::once(&netmap.self_node).chain(netmap.peers.values()) {
        let Some(offer) = node.capabilities.as_ref().and_then(|c| c.compute.as_ref()) else {
            continue;
        };
        for m in &offer.models {
            let entry = models
                .entry(m.name.clone())
                .or_insert_with(|| (m.kind.clone(), m.sha256.clone(), Vec::new()));
            entry.2.push(json!({
                "device": node.name,
                "serving": offer.serving && node.online,
                "sha256": m.sha256,
            }));
        }
    }
    let data: Vec<Value> = models
        .into_iter()
        .map(|(name, (kind, sha256, served_by))| {
            json!({
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "crank-mesh",
                "kind": kind,
                "sha256": sha256,
                "served_by": served_by,
            })
        })
        .collect();
    json!({"object": "list", "data": data})
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn options_come_from_headers_before_fields_and_leave_the_body_plain() {
        let mut body = json!({"model": "m", "route": "tier:tier3", "sensitivity": "private"})
            .as_object()
            .unwrap()
            .clone();
        let o = JobOptions::parse(&headers(&[("x-crank-route", "device:gpu")]), &mut body).unwrap();
        assert_eq!(o.route, Route::Devices(vec!["gpu".into()]));
        assert_eq!(o.sensitivity, Sensitivity::Private);
        assert_eq!(o.timeout, DEFAULT_TIMEOUT);
        assert!(!o.dry_run);
        assert_eq!(Value::Object(body), json!({"model": "m"}));

        let mut body = Map::new();
        let o = JobOptions::parse(
            &headers(&[("x-crank-dry-run", "1"), ("x-crank-timeout-ms", "5000")]),
            &mut body,
        )
        .unwrap();
        assert_eq!(o.route, Route::Auto);
        assert!(o.dry_run);
        assert_eq!(o.timeout, Duration::from_secs(5));
    }

    #[tokio::test]
    async fn only_local_json_callers_without_an_origin_get_through() {
        use tower::ServiceExt as _;
        let listen: SocketAddr = "127.0.0.1:8420".parse().unwrap();
        let hosts = Arc::new(local_hosts(listen));
        let app = Router::new()
            .route("/v1/embeddings", post(|| async { "placed" }))
            .route("/v1/models", get(|| async { "models" }))
            .layer(axum::middleware::from_fn_with_state(
                hosts,
                local_callers_only,
            ));
        let call = |method: &str, uri: &str, headers: &[(&str, &str)]| {
            let mut req = axum::http::Request::builder().method(method).uri(uri);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let app = app.clone();
            let req = req.body(axum::body::Body::empty()).unwrap();
            async move { app.oneshot(req).await.unwrap().status().as_u16() }
        };
        let json = ("content-type", "application/json");
        assert_eq!(
            call(
                "POST",
                "/v1/embeddings",
                &[("host", "127.0.0.1:8420"), json]
            )
            .await,
            200
        );
        assert_eq!(
            call(
                "POST",
                "/v1/embeddings",
                &[("host", "localhost:8420"), json]
            )
            .await,
            200
        );
        assert_eq!(
            call("GET", "/v1/models", &[("host", "127.0.0.1:8420")]).await,
            200
        );
        // DNS rebinding: the page's own name in Host.
        assert_eq!(
            call("GET", "/v1/models", &[("host", "evil.example:8420")]).await,
            403
        );
        assert_eq!(call("GET", "/v1/models", &[]).await, 403);
        // A page on this machine posting a "simple" request.
        let page = [
            ("host", "127.0.0.1:8420"),
            ("origin", "https://evil.example"),
            ("content-type", "text/plain"),
        ];
        assert_eq!(call("POST", "/v1/embeddings", &page).await, 403);
        assert_eq!(
            call(
                "POST",
                "/v1/embeddings",
                &[("host", "127.0.0.1:8420"), ("content-type", "text/plain")]
            )
            .await,
            415
        );
    }

    #[test]
    fn bad_options_are_precise_errors() {
        for (h, body, code) in [
            (
                vec![("x-crank-route", "devices:a")],
                json!({}),
                "invalid_route",
            ),
            (vec![], json!({"route": "tier:tier7"}), "invalid_route"),
            (vec![], json!({"route": 5}), "invalid_field"),
            (
                vec![("x-crank-sensitivity", "secret")],
                json!({}),
                "invalid_sensitivity",
            ),
            (
                vec![("x-crank-timeout-ms", "soon")],
                json!({}),
                "invalid_timeout",
            ),
            (
                vec![("x-crank-timeout-ms", "99999999")],
                json!({}),
                "invalid_timeout",
            ),
        ] {
            let mut body = body.as_object().unwrap().clone();
            let e = JobOptions::parse(&headers(&h), &mut body).unwrap_err();
            assert_eq!(e.code, code, "{h:?} {body:?}: {e:?}");
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        }
    }
}
