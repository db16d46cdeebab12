//! Which jobs the API runs, and what it reports about each: the hook
//! between the HTTP API and the device that serves it.
//!
//! The device (meshd) checks a signed ticket in [`Admission::admit`] and
//! signs a receipt in [`Admission::finish`]; this crate sees a ticket only
//! as a request header and a refusal only by its [`Refusal`] kind, so it
//! stays free of keys, netmaps and policies.

use std::any::Any;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, StatusCode};
use sha2::{Digest, Sha256};

/// A kind of job the API runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Workload {
    Embeddings,
    Chat,
}

impl Workload {
    pub fn as_str(self) -> &'static str {
        match self {
            Workload::Embeddings => "embeddings",
            Workload::Chat => "chat",
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job the hook let in, carrying whatever the hook needs back at
/// [`Admission::finish`] (a checked ticket).
pub struct AdmittedJob {
    id: String,
    data: Box<dyn Any + Send>,
}

impl AdmittedJob {
    /// `id` names the job in logs.
    pub fn new(id: impl Into<String>, data: impl Any + Send) -> Self {
        AdmittedJob {
            id: id.into(),
            data: Box::new(data),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// What `new` was given, if it is a `T`.
    pub fn into_data<T: Any>(self) -> Option<T> {
        self.data.downcast::<T>().ok().map(|b| *b)
    }
}

impl fmt::Debug for AdmittedJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdmittedJob").field("id", &self.id).finish()
    }
}

/// How an admitted job ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobStatus {
    Ok,
    /// The engine failed, or the input was unusable once the job ran.
    Failed,
    /// The caller went away before the end (a stream cut short).
    Cancelled,
}

/// What an admitted job did: the facts a receipt states.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobOutcome {
    /// Unix milliseconds: when the job took its slot (or ended, if it
    /// never did), and when it ended.
    pub started_at_ms: u64,
    pub ended_at_ms: u64,
    /// Time on the engine.
    pub runtime_ms: u64,
    /// Completion tokens (chat) or inputs (embeddings).
    pub units: u64,
    /// SHA-256, hex, of the text generated (chat) or of the vectors as
    /// little-endian f32s, in order (embeddings).
    pub output_sha256: String,
    pub status: JobStatus,
}

/// SHA-256 of `bytes`, hex, as [`JobOutcome::output_sha256`] has it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// SHA-256, hex, of embedding vectors as little-endian f32s, in order.
pub fn vectors_sha256(vectors: &[Vec<f32>]) -> String {
    let mut h = Sha256::new();
    for x in vectors.iter().flatten() {
        h.update(x.to_le_bytes());
    }
    hex::encode(h.finalize())
}

/// Why a job was not let in. Each kind is one error code of the API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No ticket came with the request.
    #[error("{0}")]
    TicketRequired(String),
    /// Undecodable, badly signed, or from a device the worker does not know.
    #[error("{0}")]
    TicketInvalid(String),
    /// Expired, or not valid yet.
    #[error("{0}")]
    TicketExpired(String),
    /// A valid ticket for another worker, model, workload, network or
    /// sender.
    #[error("{0}")]
    TicketMismatch(String),
    /// The network's policy does not let this job run here.
    #[error("{0}")]
    PolicyRefused(String),
    /// The ticket was used before.
    #[error("{0}")]
    TicketReplayed(String),
    /// Receipts wait for the coordinator in numbers the worker will not
    /// exceed; it takes no job it could not account for.
    #[error("{0}")]
    ReceiptQueueFull(String),
    /// The worker remembers as many live tickets as it will (to refuse
    /// their replays); it takes no job whose replay it could not refuse.
    #[error("{0}")]
    TooManyTickets(String),
}

impl Refusal {
    /// Every kind, in the order of [`Refusal::index`].
    pub const CODES: [&'static str; 8] = [
        "ticket_required",
        "ticket_invalid",
        "ticket_expired",
        "ticket_mismatch",
        "policy_refused",
        "ticket_replayed",
        "receipt_queue_full",
        "too_many_tickets",
    ];

    /// Position of this kind in [`Refusal::CODES`].
    pub fn index(&self) -> usize {
        match self {
            Refusal::TicketRequired(_) => 0,
            Refusal::TicketInvalid(_) => 1,
            Refusal::TicketExpired(_) => 2,
            Refusal::TicketMismatch(_) => 3,
            Refusal::PolicyRefused(_) => 4,
            Refusal::TicketReplayed(_) => 5,
            Refusal::ReceiptQueueFull(_) => 6,
            Refusal::TooManyTickets(_) => 7,
        }
    }

    /// The API's error code.
    pub fn code(&self) -> &'static str {
        Self::CODES[self.index()]
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::TicketRequired(_) | Refusal::TicketInvalid(_) | Refusal::TicketExpired(_) => {
                StatusCode::UNAUTHORIZED
            }
            Refusal::TicketMismatch(_) | Refusal::PolicyRefused(_) => StatusCode::FORBIDDEN,
            Refusal::TicketReplayed(_) => StatusCode::CONFLICT,
            Refusal::ReceiptQueueFull(_) | Refusal::TooManyTickets(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// OpenAI's error type for the status.
    pub fn kind(&self) -> &'static str {
        match self.status() {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable",
            _ => "invalid_request_error",
        }
    }
}

/// Decides which jobs run, and hears how each admitted job ended.
pub trait Admission: Send + Sync {
    /// Called once the request is understood (its model known and served
    /// here) and a place in line is free, before the job waits for a slot.
    /// `caller` is the connection's source.
    fn admit(
        &self,
        caller: SocketAddr,
        headers: &HeaderMap,
        workload: Workload,
        model: &str,
    ) -> Result<AdmittedJob, Refusal>;

    /// Called exactly once for every admitted job, whether it ran to the
    /// end, failed, or its caller went away; always on a thread that may
    /// block (it may write to disk).
    fn finish(&self, job: AdmittedJob, outcome: JobOutcome);

    /// Lines this hook adds to `/metrics`, in the OpenMetrics text format:
    /// they go before the closing `# EOF`, and a counter's `# TYPE` line
    /// names it without its `_total` suffix.
    fn metrics(&self, _out: &mut String) {}
}

/// An admitted job until its end is told to the hook: exactly once, by
/// [`JobReport::end`] or, when the report is dropped unended (the request's
/// future went away; a panic), as cancelled or failed.
pub(crate) struct JobReport {
    admission: Arc<dyn Admission>,
    job: Option<AdmittedJob>,
    /// When the job took its slot.
    started: Option<(Instant, u64)>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl JobReport {
    pub(crate) fn new(admission: Arc<dyn Admission>, job: AdmittedJob) -> Self {
        JobReport {
            admission,
            job: Some(job),
            started: None,
        }
    }

    /// The job runs from now.
    pub(crate) fn start(&mut self) {
        self.started = Some((Instant::now(), unix_ms()));
    }

    fn outcome(&self, status: JobStatus, units: u64, output_sha256: String) -> JobOutcome {
        let ended_at_ms = unix_ms();
        let (started_at_ms, runtime_ms) = match self.started {
            Some((at, ms)) => (
                ms.min(ended_at_ms),
                u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX),
            ),
            None => (ended_at_ms, 0),
        };
        JobOutcome {
            started_at_ms,
            ended_at_ms,
            runtime_ms,
            units,
            output_sha256,
            status,
        }
    }

    /// Tells the hook how the job ended; blocks while it records that.
    pub(crate) fn end(mut self, status: JobStatus, units: u64, output_sha256: String) {
        if let Some(job) = self.job.take() {
            let outcome = self.outcome(status, units, output_sha256);
            self.admission.finish(job, outcome);
        }
    }

    /// [`JobReport::end`] from async code: on a blocking thread, which
    /// finishes even if the caller stops waiting.
    pub(crate) async fn end_async(self, status: JobStatus, units: u64, output_sha256: String) {
        let _ = tokio::task::spawn_blocking(move || self.end(status, units, output_sha256)).await;
    }
}

impl Drop for JobReport {
    fn drop(&mut self) {
        let Some(job) = self.job.take() else {
            return;
        };
        let status = if std::thread::panicking() {
            JobStatus::Failed
        } else {
            JobStatus::Cancelled
        };
        let outcome = self.outcome(status, 0, sha256_hex(b""));
        let admission = self.admission.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || admission.finish(job, outcome))),
            Err(_) => admission.finish(job, outcome),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_have_precise_statuses() {
        let all = [
            Refusal::TicketRequired(String::new()),
            Refusal::TicketInvalid(String::new()),
            Refusal::TicketExpired(String::new()),
            Refusal::TicketMismatch(String::new()),
            Refusal::PolicyRefused(String::new()),
            Refusal::TicketReplayed(String::new()),
            Refusal::ReceiptQueueFull(String::new()),
            Refusal::TooManyTickets(String::new()),
        ];
        let got: Vec<_> = all
            .iter()
            .map(|r| (r.code(), r.status().as_u16()))
            .collect();
        assert_eq!(
            got,
            [
                ("ticket_required", 401),
                ("ticket_invalid", 401),
                ("ticket_expired", 401),
                ("ticket_mismatch", 403),
                ("policy_refused", 403),
                ("ticket_replayed", 409),
                ("receipt_queue_full", 503),
                ("too_many_tickets", 503),
            ]
        );
    }

    #[test]
    fn vectors_hash_as_their_little_endian_bytes() {
        let v = vec![vec![1.0f32, -2.5], vec![0.25]];
        let bytes: Vec<u8> = [1.0f32, -2.5, 0.25]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(vectors_sha256(&v), sha256_hex(&bytes));
        assert_eq!(vectors_sha256(&[]), sha256_hex(b""));
    }

    #[test]
    fn admitted_jobs_give_back_their_data() {
        let job = AdmittedJob::new("ab12", (7u32, "x".to_owned()));
        assert_eq!(job.id(), "ab12");
        assert_eq!(job.into_data::<(u32, String)>(), Some((7, "x".into())));
        assert_eq!(AdmittedJob::new("a", 1u8).into_data::<u16>(), None);
    }
}
