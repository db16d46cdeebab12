//! Running a placed job: a signed ticket per attempt, the request to the
//! worker over the overlay, and retries on the next-best worker when one
//! declines, refuses the ticket, fails or cannot be reached — for a stream,
//! only until its first bytes have gone to the caller.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use base64::Engine as _;
use futures_util::StreamExt as _;
use platform::jobs::{Ticket, DOMAIN_TICKET, MAX_TICKET_LIFETIME_SECS, TICKET_HEADER};
use platform::netmap::NetMap;
use platform::signed::Signed;
use serde_json::{Map, Value};
use tokio::sync::OwnedSemaphorePermit;

use super::joblog::{Attempt, JobRecord, JobState};
use super::placement::{Placed, Target};
use super::{Gateway, GatewayError, JobOptions};

/// Waits before the 2nd, 3rd and 4th attempts: up to three retries.
const BACKOFF: [Duration; 3] = [
    Duration::from_millis(250),
    Duration::from_millis(750),
    Duration::from_millis(2000),
];
/// Largest answer buffered from a worker (non-streaming): a thousand
/// embeddings of 1,536 floats as JSON fit.
const MAX_ANSWER: usize = 16 << 20;
/// An attempt needs at least this much of the job's time left.
const MIN_ATTEMPT: Duration = Duration::from_millis(100);
/// Largest error body read from a worker.
const MAX_ERROR_BODY: usize = 64 << 10;

/// How one attempt went, when it did not work.
#[derive(Debug)]
enum Failure {
    /// Worth trying the next worker: (outcome, cause).
    Retry(&'static str, String),
    /// The caller's request is at fault: the worker's answer goes back.
    Final(Response),
}

/// One job this gateway has running on a worker: counted while it lives.
struct Inflight {
    g: Arc<Gateway>,
    device: String,
}

impl Inflight {
    fn new(g: &Arc<Gateway>, device: &str) -> Self {
        g.add_inflight(device, 1);
        Inflight {
            g: g.clone(),
            device: device.to_owned(),
        }
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.g.add_inflight(&self.device, -1);
    }
}

/// A job's bookkeeping, ended when dropped: after a buffered answer, when a
/// streamed one ends or its caller goes away, or when the caller drops the
/// request mid-attempt. `ok` only once the whole answer went out.
struct Finish {
    g: Arc<Gateway>,
    id: String,
    workload: platform::jobs::Workload,
    started: Instant,
    ok: bool,
    /// A streamed answer broke off after its first bytes went out.
    broken: bool,
    /// The worker it ran on.
    running: Option<Inflight>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Finish {
    fn drop(&mut self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let ok = self.ok && !self.broken;
        self.g.jobs.finish(&self.id, self.workload, ok, ms);
        let event = if ok { "job_completed" } else { "job_failed" };
        let device = self.running.as_ref().map_or("-", |r| r.device.as_str());
        tracing::info!(event, trace_id = %self.id, %device, ms, "job ended");
    }
}

/// The ticket header's value: base64url (no padding) of the signed JSON.
pub(crate) fn encode_ticket(t: &Signed) -> String {
    let json = serde_json::to_vec(t).expect("a signed envelope serializes");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

fn ticket(
    netmap: &NetMap,
    placed: &Placed,
    target: &Target,
    opts: &JobOptions,
    left: Duration,
    attempt: u32,
) -> Ticket {
    let now = platform::unix_now();
    let timeout_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
    let lifetime = (left.as_secs() + 60).min(MAX_TICKET_LIFETIME_SECS);
    let me = &netmap.self_node;
    Ticket {
        job_id: placed.job_id.clone(),
        network: netmap.network.clone(),
        submitter_device: me.name.clone(),
        submitter_user: me.owner.clone().unwrap_or_else(|| me.name.clone()),
        workload: placed.workload,
        model: target.model.clone(),
        route: placed.route.clone(),
        sensitivity: opts.sensitivity,
        max_cost: netmap.compute.rates.estimate(target.tier, timeout_ms),
        timeout_ms,
        issued_at: now,
        expires_at: now + lifetime,
        worker: target.name.clone(),
        worker_key: target.device_key,
        attempt,
    }
}

/// `code: message` from an OpenAI-shaped error body, else its text.
fn cause_of(status: StatusCode, body: &[u8]) -> String {
    let parsed: Option<(String, String)> =
        serde_json::from_slice::<Value>(body).ok().and_then(|v| {
            let e = v.get("error")?;
            Some((
                e.get("code")?.as_str().unwrap_or_default().to_owned(),
                e.get("message")?.as_str().unwrap_or_default().to_owned(),
            ))
        });
    match parsed {
        Some((code, message)) => format!("{} {code}: {message}", status.as_u16()),
        None => format!(
            "{} {}",
            status.as_u16(),
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ),
    }
}

/// Reads a body up to `max` bytes.
async fn read_capped(resp: &mut reqwest::Response, max: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if out.len() + chunk.len() > max {
            return Err(format!("answer over {max} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// What a worker's non-success status means for the job.
async fn classify(mut resp: reqwest::Response) -> Failure {
    let status = resp.status();
    let body = read_capped(&mut resp, MAX_ERROR_BODY)
        .await
        .unwrap_or_default();
    let cause = cause_of(status, &body);
    match status.as_u16() {
        429 | 503 => Failure::Retry("declined", cause),
        // The ticket was refused (invalid, expired, replayed, policy):
        // another worker, with a new ticket, may take it.
        401 | 403 | 409 => Failure::Retry("refused", cause),
        // The worker no longer has the model (a netmap behind it).
        404 => Failure::Retry("declined", cause),
        400..=499 => {
            let mut r = Response::new(Body::from(body));
            *r.status_mut() = status;
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            Failure::Final(r)
        }
        _ => Failure::Retry("failed", cause),
    }
}

fn annotate(resp: &mut Response, placed: &Placed, target: &Target, attempts: usize) {
    let h = resp.headers_mut();
    for (name, value) in [
        ("x-crank-job-id", placed.job_id.clone()),
        ("x-crank-served-by", target.name.clone()),
        ("x-crank-route", placed.route.to_string()),
        ("x-crank-path", target.path.to_owned()),
        ("x-crank-attempts", attempts.to_string()),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
}

pub(super) async fn run(
    g: Arc<Gateway>,
    netmap: NetMap,
    placed: Placed,
    mut body: Map<String, Value>,
    stream: bool,
    opts: JobOptions,
    permit: OwnedSemaphorePermit,
) -> Result<Response, GatewayError> {
    let started = Instant::now();
    let path = match placed.workload {
        platform::jobs::Workload::Embeddings => "/v1/embeddings",
        platform::jobs::Workload::SmallChat => "/v1/chat/completions",
    };
    g.jobs.start(JobRecord {
        id: placed.job_id.clone(),
        workload: placed.workload,
        model: body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        route: placed.route.clone(),
        stream,
        state: JobState::Running,
        started_at_ms: platform::unix_now_ms(),
        latency_ms: None,
        trying: None,
        served_by: None,
        estimated_cost: placed.estimated_cost,
        attempts: Vec::new(),
        error: None,
        placement: serde_json::to_value(&placed.placement).unwrap_or(Value::Null),
    });
    tracing::info!(event = "job_started", trace_id = %placed.job_id, workload = %placed.workload, route = %placed.route, "job started");
    let mut finish = Finish {
        g: g.clone(),
        id: placed.job_id.clone(),
        workload: placed.workload,
        started,
        ok: false,
        broken: false,
        running: None,
        _permit: permit,
    };
    // The job's timeout bounds all its attempts together: what one attempt
    // spends, the next does not get (and its ticket says so, so the runtime
    // billed over all attempts stays within the timeout).
    let deadline = started + opts.timeout;
    let device = g.keys.current().device.clone();
    let mut tried: Vec<Attempt> = Vec::new();
    let mut all_declined = true;
    for (i, target) in placed.targets.iter().take(BACKOFF.len() + 1).enumerate() {
        if i > 0 {
            if deadline.saturating_duration_since(Instant::now()) <= BACKOFF[i - 1] + MIN_ATTEMPT {
                break;
            }
            tokio::time::sleep(BACKOFF[i - 1]).await;
            g.jobs.retried();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = u32::try_from(i + 1).unwrap_or(u32::MAX);
        let t = ticket(&netmap, &placed, target, &opts, left, attempt);
        let signed = Signed::sign(&device, DOMAIN_TICKET, &t);
        body.insert("model".into(), Value::String(target.model.clone()));
        let running = Inflight::new(&g, &target.name);
        g.jobs.update(&placed.job_id, |r| {
            r.trying = Some(target.name.clone());
            r.model.clone_from(&target.model);
        });
        let t0 = Instant::now();
        let sent = g
            .http
            .post(format!("{}{path}", target.base))
            .header(TICKET_HEADER, encode_ticket(&signed))
            .json(&body)
            .timeout(left)
            .send()
            .await;
        let result = match sent {
            Err(e) if e.is_timeout() => Err(Failure::Retry("timeout", e.to_string())),
            Err(e) => Err(Failure::Retry("unreachable", e.to_string())),
            Ok(resp) if !resp.status().is_success() => Err(classify(resp).await),
            Ok(resp) => {
                answer(
                    resp,
                    stream,
                    deadline.saturating_duration_since(Instant::now()),
                )
                .await
            }
        };
        let elapsed_ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        match result {
            Ok(mut ok) => {
                tried.push(Attempt {
                    device: target.name.clone(),
                    outcome: "ok".into(),
                    cause: None,
                    elapsed_ms,
                    path: target.path.into(),
                });
                let attempts = tried.len();
                g.jobs.update(&placed.job_id, |r| {
                    r.attempts = tried;
                    r.served_by = Some(target.name.clone());
                });
                annotate(&mut ok.response, &placed, target, attempts);
                finish.running = Some(running);
                return Ok(ok.finish_with(finish));
            }
            Err(Failure::Final(mut resp)) => {
                tried.push(Attempt {
                    device: target.name.clone(),
                    outcome: "rejected".into(),
                    cause: Some(format!("{}", resp.status())),
                    elapsed_ms,
                    path: target.path.into(),
                });
                g.jobs.update(&placed.job_id, |r| {
                    r.attempts = tried;
                    r.error = Some("the worker rejected the request".into());
                });
                annotate(&mut resp, &placed, target, i + 1);
                return Ok(resp);
            }
            Err(Failure::Retry(outcome, cause)) => {
                all_declined &= outcome == "declined";
                tracing::debug!(trace_id = %placed.job_id, device = %target.name, outcome, %cause, "attempt failed");
                tried.push(Attempt {
                    device: target.name.clone(),
                    outcome: outcome.into(),
                    cause: Some(cause),
                    elapsed_ms,
                    path: target.path.into(),
                });
            }
        }
    }
    let summary = tried
        .iter()
        .map(|a| {
            format!(
                "{}: {} ({})",
                a.device,
                a.outcome,
                a.cause.as_deref().unwrap_or("")
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let message = format!(
        "no worker completed the job after {} attempt(s) within its {} ms: {summary}",
        tried.len(),
        opts.timeout.as_millis()
    );
    g.jobs.update(&placed.job_id, |r| {
        r.attempts = tried;
        r.error = Some(message.clone());
    });
    drop(finish);
    Err(if all_declined {
        GatewayError::unavailable("all_workers_busy", message)
    } else {
        GatewayError::new(StatusCode::BAD_GATEWAY, "all_attempts_failed", message)
    })
}

/// A worker's successful answer, ready to go back to the caller.
struct Answer {
    response: Response,
    /// The rest of a streamed answer, still to be relayed.
    rest: Option<futures_util::stream::BoxStream<'static, Result<Bytes, std::io::Error>>>,
}

impl Answer {
    fn finish_with(self, mut finish: Finish) -> Response {
        let Answer { mut response, rest } = self;
        match rest {
            None => {
                finish.ok = true;
                drop(finish);
                response
            }
            Some(rest) => {
                let first = std::mem::take(response.body_mut());
                let first = first
                    .into_data_stream()
                    .map(|r| r.map_err(std::io::Error::other));
                // The job ends with the stream: complete when it ran to its
                // end, failed when it broke or its caller went away.
                let relayed = futures_util::stream::unfold(
                    (first.chain(rest), Some(finish)),
                    |(mut s, mut finish)| async move {
                        match s.next().await {
                            Some(item) => {
                                if item.is_err() {
                                    if let Some(f) = finish.as_mut() {
                                        f.broken = true;
                                    }
                                }
                                Some((item, (s, finish)))
                            }
                            None => {
                                if let Some(mut f) = finish.take() {
                                    f.ok = true;
                                }
                                None
                            }
                        }
                    },
                );
                *response.body_mut() = Body::from_stream(relayed);
                response
            }
        }
    }
}

/// Reads a worker's answer: whole (within `MAX_ANSWER`), or for a stream
/// up to its first bytes — a failure before then is retried elsewhere.
async fn answer(
    mut resp: reqwest::Response,
    stream: bool,
    left: Duration,
) -> Result<Answer, Failure> {
    let content_type = resp
        .headers()
        .get("content-type")
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("application/json"));
    let status = resp.status();
    let build = |body: Body| {
        let mut r = Response::new(body);
        *r.status_mut() = status;
        r.headers_mut().insert("content-type", content_type.clone());
        r
    };
    if !stream {
        let body = tokio::time::timeout(left, read_capped(&mut resp, MAX_ANSWER))
            .await
            .map_err(|_| Failure::Retry("timeout", "no complete answer in time".into()))?
            .map_err(|e| Failure::Retry("failed", format!("answer cut short: {e}")))?;
        return Ok(Answer {
            response: build(Body::from(body)),
            rest: None,
        });
    }
    let first = match tokio::time::timeout(left, resp.chunk()).await {
        Err(_) => return Err(Failure::Retry("timeout", "no first token in time".into())),
        Ok(Err(e)) => {
            return Err(Failure::Retry(
                "failed",
                format!("stream broke before its first token: {e}"),
            ))
        }
        Ok(Ok(None)) => return Err(Failure::Retry("failed", "empty stream".into())),
        Ok(Ok(Some(b))) => b,
    };
    let mut response = build(Body::from(first));
    response
        .headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    // Until the worker's answer ends or breaks (then once more, with the
    // error).
    let rest = futures_util::stream::unfold(Some(resp), |resp| async move {
        let mut resp = resp?;
        match resp.chunk().await {
            Ok(Some(b)) => Some((Ok(b), Some(resp))),
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e)), None)),
        }
    })
    .boxed();
    Ok(Answer {
        response,
        rest: Some(rest),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_read_from_openai_errors() {
        let body =
            br#"{"error":{"message":"all slots busy","type":"rate_limit_error","code":"busy"}}"#;
        assert_eq!(
            cause_of(StatusCode::TOO_MANY_REQUESTS, body),
            "429 busy: all slots busy"
        );
        assert_eq!(cause_of(StatusCode::BAD_GATEWAY, b"oops"), "502 oops");
    }

    #[test]
    fn tickets_encode_as_unpadded_base64url_json() {
        let k = platform::keys::DevicePrivate::generate();
        let s = Signed::sign(&k, DOMAIN_TICKET, &serde_json::json!({"a": 1}));
        let text = encode_ticket(&s);
        assert!(!text.contains('=') && !text.contains('+') && !text.contains('/'));
        let back: Signed = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(text)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(back, s);
    }
}
